//! The analytics read model served, for dashboards: a summary per region, store or hour,
//! cancellations, top items, and rewards points. Definitions are in
//! [`projections::analytics`]; in short, every order figure belongs to the UTC hour its order
//! was placed in, money is integer minor units and is grouped by currency, never summed across
//! currencies.
//!
//! Every endpoint takes `from`/`to` (RFC 3339, `from` inclusive, `to` exclusive), `region`,
//! `store_id` and `currency` filters, and `position` (read-your-writes: a command's
//! `position.token`).

use std::future::Future;
use std::time::Instant;

use axum::extract::State;
use chrono::{DateTime, Timelike, Utc};
use domain::{Currency, RegionCode};
use projections::analytics::{self, Filter, GroupBy, TopBy};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::QueryParams;
use crate::positions::wait_for_position;
use crate::AppState;

mod rewards;

pub use rewards::*;

mod top_items;

pub use top_items::*;

mod cancellations;

pub use cancellations::*;

/// The read model these endpoints serve (its schema).
const READ_MODEL: &str = "analytics";

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// Parses the filters every endpoint shares.
fn parse_filter(
    from: Option<&str>,
    to: Option<&str>,
    region: Option<&str>,
    store_id: Option<&str>,
    currency: Option<&str>,
) -> Result<Filter, ApiError> {
    let (from, to) = crate::paging::time_range(from, to)?;
    let region = region
        .map(|r| {
            RegionCode::parse(r)
                .map(|code| code.as_str().to_owned())
                .map_err(|e| bad(format!("region: {e}")))
        })
        .transpose()?;
    let store_id = store_id
        .map(|s| {
            Uuid::parse_str(s)
                .map_err(|_| bad(format!("store_id `{s}` is not a store id (a UUID)")))
        })
        .transpose()?;
    let currency = currency
        .map(|c| {
            Currency::parse(c)
                .map(|c| c.as_str().to_owned())
                .map_err(|e| bad(format!("currency: {e}")))
        })
        .transpose()?;
    Ok(Filter {
        from,
        to,
        region,
        store_id,
        currency,
    })
}

fn parse_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    raw.parse::<i64>()
        .ok()
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or_else(|| {
            bad(format!(
                "limit `{raw}` is not allowed; use a whole number from 1 to {MAX_LIMIT} \
                 (default {DEFAULT_LIMIT})"
            ))
        })
}

/// An opaque page cursor: the last (key, currency) of a page, tagged with the list it belongs
/// to, as hex of a JSON array.
fn encode_cursor(scope: &str, key: &str, currency: &str) -> String {
    let json = serde_json::json!([scope, key, currency]).to_string();
    json.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(scope: &str, raw: Option<&str>) -> Result<Option<(String, String)>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    let invalid = || {
        bad(format!(
            "cursor `{raw}` is not one this endpoint returned for these parameters; pass \
             next_cursor from the previous page unchanged, or omit cursor for the first page"
        ))
    };
    if raw.len() % 2 != 0 || raw.len() > 4096 {
        return Err(invalid());
    }
    let bytes = (0..raw.len())
        .step_by(2)
        .map(|i| {
            raw.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(invalid)?;
    let parts: Vec<String> = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    match <[String; 3]>::try_from(parts) {
        Ok([s, key, currency]) if s == scope => Ok(Some((key, currency))),
        _ => Err(invalid()),
    }
}

/// Runs a query, recording its duration as `analytics_query_seconds{endpoint}`.
async fn timed<T>(
    endpoint: &'static str,
    query: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = query.await.map_err(ApiError::internal);
    metrics::histogram!("analytics_query_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
    result
}

/// p50, p90 and p99 of a duration, in seconds (continuous percentiles, interpolated).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct PercentilesView {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl From<analytics::Percentiles> for PercentilesView {
    fn from(p: analytics::Percentiles) -> Self {
        Self {
            p50: p.p50,
            p90: p.p90,
            p99: p.p99,
        }
    }
}

/// One group of orders, in one currency.
#[derive(Debug, Serialize, ToSchema)]
pub struct SummaryRowView {
    /// With `group_by=region`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// With `group_by=store`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_id: Option<Uuid>,
    /// With `group_by=hour`: the UTC hour the orders were placed in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hour: Option<DateTime<Utc>>,
    /// ISO 4217 code of every amount in this row.
    pub currency: String,
    /// Orders placed.
    pub orders: i64,
    /// Orders that reached Completed.
    pub completed: i64,
    /// Orders cancelled (by anyone) or rejected by the store.
    pub cancelled: i64,
    /// Of `cancelled`, the store rejections.
    pub rejected: i64,
    /// Sum of the final totals (after modifications) of the completed orders, in minor units.
    pub revenue_minor: i64,
    /// revenue_minor / completed, rounded to the nearest minor unit; null without completed
    /// orders.
    pub aov_minor: Option<i64>,
    /// Placed → accepted, over the accepted orders; null if none.
    pub acceptance_seconds: Option<PercentilesView>,
    /// Placed → delivered, over the delivered orders; null if none.
    pub delivery_seconds: Option<PercentilesView>,
}

/// A page of summary groups.
#[derive(Debug, Serialize, ToSchema)]
pub struct SummaryView {
    /// `region`, `store`, `hour` or `none`.
    pub group_by: String,
    /// Ordered by the group key, then currency.
    pub rows: Vec<SummaryRowView>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

/// Summary parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SummaryQuery {
    /// `region`, `store`, `hour` (UTC hour of placement) or `none` (default: one row per
    /// currency).
    pub group_by: Option<String>,
    /// Orders placed at or after this time: RFC 3339, a whole UTC hour (the summary is read
    /// from hourly buckets).
    pub from: Option<String>,
    /// Orders placed before this time: RFC 3339, a whole UTC hour, after `from`.
    pub to: Option<String>,
    /// Only this region, e.g. `uk`.
    pub region: Option<String>,
    /// Only this store.
    #[param(value_type = Option<Uuid>)]
    pub store_id: Option<String>,
    /// Only this currency, e.g. `GBP`.
    pub currency: Option<String>,
    /// Groups per page, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Read-your-writes: a command's `position.token`; waits (bounded) until the view has it.
    pub position: Option<String>,
}

fn whole_hour(name: &str, time: Option<DateTime<Utc>>) -> Result<(), ApiError> {
    match time {
        Some(t) if t.minute() != 0 || t.second() != 0 || t.nanosecond() != 0 => Err(bad(format!(
            "{name} ({}) must be a whole UTC hour such as {}: the summary is kept per hour",
            t.to_rfc3339(),
            t.format("%Y-%m-%dT%H:00:00Z")
        ))),
        _ => Ok(()),
    }
}

/// Orders, completions, cancellations, revenue, average order value and acceptance and
/// delivery time percentiles, per region, store or placement hour, per currency.
#[utoipa::path(
    get, path = "/analytics/summary", tag = "analytics",
    params(SummaryQuery),
    responses(
        (status = 200, description = "A page of groups", body = SummaryView),
        (status = 400, description = "A parameter is not valid (the detail names it and what is allowed)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The view has not reached `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn summary(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<SummaryQuery>,
) -> Result<axum::Json<SummaryView>, ApiError> {
    principal.authorize_any(Action::ViewAnalytics)?;
    let group_by = match query.group_by.as_deref().unwrap_or("none") {
        "region" => GroupBy::Region,
        "store" => GroupBy::Store,
        "hour" => GroupBy::Hour,
        "none" => GroupBy::None,
        other => {
            return Err(bad(format!(
                "group_by `{other}` is not known; use region, store, hour or none"
            )))
        }
    };
    let filter = parse_filter(
        query.from.as_deref(),
        query.to.as_deref(),
        query.region.as_deref(),
        query.store_id.as_deref(),
        query.currency.as_deref(),
    )?;
    whole_hour("from", filter.from)?;
    whole_hour("to", filter.to)?;
    let limit = parse_limit(query.limit.as_deref())?;
    let scope = format!("summary:{}", group_by.as_str());
    let after = decode_cursor(&scope, query.cursor.as_deref())?;
    wait_for_position(&state, &principal, READ_MODEL, query.position.as_deref()).await?;

    let after_ref = after.as_ref().map(|(k, c)| (k.as_str(), c.as_str()));
    let mut rows = timed(
        "summary",
        analytics::summary(&state.pool, group_by, &filter, after_ref, limit + 1),
    )
    .await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = match rows.last() {
        Some(last) if more => Some(encode_cursor(&scope, &last.key, &last.currency)),
        _ => None,
    };
    let rows = rows
        .into_iter()
        .map(|row| {
            let aov_minor = row.aov_minor();
            let (mut region, mut store_id, mut hour) = (None, None, None);
            match group_by {
                GroupBy::Region => region = Some(row.key.clone()),
                GroupBy::Store => store_id = Uuid::parse_str(&row.key).ok(),
                GroupBy::Hour => {
                    hour = DateTime::parse_from_rfc3339(&row.key)
                        .ok()
                        .map(|t| t.with_timezone(&Utc));
                }
                GroupBy::None => {}
            }
            SummaryRowView {
                region,
                store_id,
                hour,
                currency: row.currency,
                orders: row.orders,
                completed: row.completed,
                cancelled: row.cancelled,
                rejected: row.rejected,
                revenue_minor: row.revenue_minor,
                aov_minor,
                acceptance_seconds: row.acceptance_seconds.map(Into::into),
                delivery_seconds: row.delivery_seconds.map(Into::into),
            }
        })
        .collect();
    Ok(axum::Json(SummaryView {
        group_by: group_by.as_str().to_owned(),
        rows,
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_decodes_to_what_was_encoded_in_its_own_scope_only() {
        let cursor = encode_cursor("summary:region", "uk", "GBP");
        assert_eq!(
            decode_cursor("summary:region", Some(&cursor))
                .ok()
                .flatten(),
            Some(("uk".to_owned(), "GBP".to_owned()))
        );
        assert!(decode_cursor("summary:store", Some(&cursor)).is_err());
        assert!(decode_cursor("summary:region", Some("zz")).is_err());
        assert!(decode_cursor("summary:region", Some("abc")).is_err());
        assert!(decode_cursor("summary:region", None)
            .ok()
            .flatten()
            .is_none());
    }

    #[test]
    fn limits_outside_1_to_500_are_refused() {
        assert_eq!(parse_limit(None).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(parse_limit(Some("500")).ok(), Some(500));
        for bad in ["0", "501", "-1", "x", ""] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad}");
        }
    }
}
