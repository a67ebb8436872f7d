//! The notifications read model served: a customer's notifications as a cursor-paginated list
//! and as a live Server-Sent Events stream, and the failed webhook deliveries for operators.
//!
//! Both the list and the stream read by id after a cursor. The projection draws a customer's
//! record ids under a per-customer lock held until commit, so a customer's records become
//! visible in id order: reading "after the last id seen" never skips one.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures::Stream;
use projections::notifications::{self as model, Notification, NotificationKind};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Action, Owner, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{PathParams, QueryParams};
use crate::positions::wait_for_position;
use crate::AppState;

/// One notification.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NotificationView {
    /// Increases with every notification: the cursor, and the SSE event id.
    pub id: i64,
    pub customer_id: Uuid,
    /// `order_confirmed`, `order_out_for_delivery`, `order_delivered`, `order_rejected`,
    /// `order_cancelled`, `delivery_failed` or `points_earned`.
    #[schema(example = "order_confirmed")]
    pub kind: String,
    /// The order it is about (for points: the order that earned them).
    pub order_id: Option<String>,
    /// The event that caused it.
    pub event_id: Uuid,
    /// What the app shows: `order_id`, `status`, `total` {minor, currency} and `at` for order
    /// notifications (with `reason` for a rejection, `cancelled_by` and `reason` for a
    /// cancellation, `reason` such as `CustomerUnreachable` for a failed delivery); `order_id`,
    /// `points`, `order_total`, `multiplier_bp`, `expires_at` and `at` for points earned.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// When the causing event was recorded.
    pub created_at: DateTime<Utc>,
}

impl From<Notification> for NotificationView {
    fn from(n: Notification) -> Self {
        Self {
            id: n.id,
            customer_id: n.customer_id,
            kind: n.kind,
            order_id: n.order_id,
            event_id: n.event_id,
            payload: n.payload,
            created_at: n.created_at,
        }
    }
}

/// A page of notifications, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationPage {
    pub items: Vec<NotificationView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Paging, filter and read-your-writes.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NotificationsQuery {
    /// From a previous page's `next_cursor` (default: the first page).
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// Only this kind: `order_confirmed`, `order_out_for_delivery`, `order_delivered`,
    /// `order_rejected`, `order_cancelled`, `delivery_failed` or `points_earned`.
    pub kind: Option<String>,
    /// A command's `position.token` (an order or rewards command): wait (bounded) until the
    /// notifications include its effects; 503 with Retry-After if they do not yet.
    pub position: Option<String>,
}

/// Where a notification stream starts.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NotificationStreamQuery {
    /// Send the notifications after this id (default: from the beginning); the
    /// `Last-Event-ID` header of a reconnecting client takes precedence.
    pub after: Option<String>,
}

/// One webhook delivery that failed (or whose outcome is unknown); never resent automatically.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct WebhookFailureView {
    pub notification_id: i64,
    pub customer_id: Uuid,
    pub event_id: Uuid,
    pub kind: Option<String>,
    pub order_id: Option<String>,
    pub attempted_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The receiver's status code, when it answered.
    pub http_status: Option<i32>,
    /// What went wrong: the answer, a timeout, a connection error, or an unknown outcome.
    pub error: Option<String>,
}

/// A page of failed webhook deliveries, oldest notification first.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookFailurePage {
    pub items: Vec<WebhookFailureView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Paging of the failed webhook deliveries.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WebhookFailuresQuery {
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<i64>,
}

fn parse_customer(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("customer_id `{raw}` is not a UUID")))
}

fn parse_kind(kind: Option<&str>) -> Result<Option<NotificationKind>, ApiError> {
    kind.map(|k| {
        NotificationKind::parse(k).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "kind `{k}` is not a notification kind; use one of {}",
                NotificationKind::ALL
                    .map(NotificationKind::as_str)
                    .join(", ")
            ))
        })
    })
    .transpose()
}

/// A page of a list read with `limit + 1` rows: the rows and the next cursor.
fn page<T>(mut rows: Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> (Vec<T>, Option<String>) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more
        .then(|| rows.last().map(|r| id(r).to_string()))
        .flatten();
    (rows, next)
}

/// A customer's notifications, oldest first.
#[utoipa::path(
    get, operation_id = "list_notifications", path = "/customers/{customer_id}/notifications", tag = "notifications",
    params(("customer_id" = Uuid, Path, description = "The customer"), NotificationsQuery),
    responses(
        (status = 200, description = "A page of notifications", body = NotificationPage),
        (status = 400, description = "Malformed customer id, cursor, limit, kind or position", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The notifications have not reached `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
    QueryParams(query): QueryParams<NotificationsQuery>,
) -> Result<axum::Json<NotificationPage>, ApiError> {
    let customer = parse_customer(&raw_id)?;
    principal.authorize(Action::ViewNotifications, &Owner::customer(customer))?;
    let limit = crate::paging::limit(query.limit)?;
    let after = crate::paging::id_cursor(query.cursor.as_deref())?;
    let kind = parse_kind(query.kind.as_deref())?;
    wait_for_position(&state, &principal, model::NAME, query.position.as_deref()).await?;
    let rows = model::list(&state.pool, customer, after, limit + 1, kind)
        .await
        .map_err(ApiError::internal)?;
    let (rows, next_cursor) = page(rows, limit, |n| n.id);
    Ok(axum::Json(NotificationPage {
        items: rows.into_iter().map(NotificationView::from).collect(),
        next_cursor,
    }))
}

/// The id a stream resumes after: `Last-Event-ID`, else `after`, else 0. It must be 0 or the id
/// of one of this customer's notifications.
async fn resume_point(
    state: &AppState,
    customer: Uuid,
    headers: &HeaderMap,
    after: Option<&str>,
) -> Result<i64, ApiError> {
    let (raw, what) = match headers.get("last-event-id") {
        Some(value) => (
            value.to_str().map_err(|_| {
                ApiError::BadRequest(
                    "Last-Event-ID must be the id of an event this stream sent".to_owned(),
                )
            })?,
            "Last-Event-ID",
        ),
        None => match after {
            Some(after) => (after, "after"),
            None => return Ok(0),
        },
    };
    let unknown = || {
        ApiError::BadRequest(format!(
            "{what} `{raw}` is not the id of one of this customer's notifications; pass the id of \
             the last event received, or 0 for all"
        ))
    };
    let id = raw
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|id| *id >= 0)
        .ok_or_else(unknown)?;
    if id == 0 {
        return Ok(0);
    }
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM notifications.records WHERE id = $1 AND customer_id = $2)",
    )
    .bind(id)
    .bind(customer)
    .fetch_one(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    if known {
        Ok(id)
    } else {
        Err(unknown())
    }
}

/// How many notifications one stream reads at a time.
const STREAM_PAGE: i64 = 200;

/// A customer's notifications as Server-Sent Events, in id order, live: every notification
/// after `Last-Event-ID` (or `after`; default: from the beginning), each with `id:` = its id,
/// `event:` = its kind and `data:` = the notification as JSON. The stream stays open; it wakes
/// when the customer's notifications change (and re-reads every 2 s anyway); keep-alive comments
/// every 15 s. A reconnecting client sends `Last-Event-ID` and resumes without repeats.
#[utoipa::path(
    get, operation_id = "stream_notifications", path = "/customers/{customer_id}/notifications/stream", tag = "notifications",
    params(
        ("customer_id" = Uuid, Path, description = "The customer"),
        ("Last-Event-ID" = Option<i64>, Header, description = "The id of the last event received (takes precedence over `after`)"),
        NotificationStreamQuery
    ),
    responses(
        (status = 200, description = "An event stream (`text/event-stream`)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed customer id, or an `after` / Last-Event-ID that is not one of this customer's notification ids", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
    QueryParams(query): QueryParams<NotificationStreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let customer = parse_customer(&raw_id)?;
    principal.authorize(Action::ViewNotifications, &Owner::customer(customer))?;
    // Subscribed before the first read, so no change between the read and the wait is missed.
    let mut changes = state.live.subscribe();
    let after = resume_point(&state, customer, &headers, query.after.as_deref()).await?;
    let key = customer.to_string();
    let slot = state.streams.acquire(&principal.actor())?;
    let stream = async_stream::stream! {
        // Held while the stream is open.
        let _slot = slot;
        let mut cursor = after;
        loop {
            let mut full_page = false;
            let read = {
                let pool = state.pool.clone();
                crate::live::read_through(async move {
                    model::list(&pool, customer, cursor, STREAM_PAGE, None).await
                })
                .await
            };
            let Some(read) = read else {
                return;
            };
            match read {
                Ok(rows) => {
                    full_page = usize::try_from(STREAM_PAGE).is_ok_and(|p| rows.len() >= p);
                    for row in rows {
                        cursor = row.id;
                        let event = Event::default()
                            .id(row.id.to_string())
                            .event(row.kind.clone())
                            .json_data(NotificationView::from(row));
                        match event {
                            Ok(event) => yield Ok(event),
                            Err(e) => tracing::error!(error = %e, cursor, "notification not serializable"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "notification stream could not read"),
            }
            if full_page {
                continue;
            }
            // Wake on this customer's change signal, or re-read every 2 s anyway.
            if !crate::live::changed(&mut changes, model::LIVE_CHANNEL, &key, Duration::from_secs(2)).await {
                return;
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Webhook deliveries that failed — the receiver answered non-2xx, timed out, could not be
/// reached, or the worker stopped during the POST (outcome unknown). At most once: they are not
/// resent; this list is for an operator to follow up.
#[utoipa::path(
    get, path = "/admin/notifications/webhook-failures", tag = "notifications",
    params(WebhookFailuresQuery),
    responses(
        (status = 200, description = "A page of failed deliveries", body = WebhookFailurePage),
        (status = 400, description = "Malformed cursor or limit", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn webhook_failures(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<WebhookFailuresQuery>,
) -> Result<axum::Json<WebhookFailurePage>, ApiError> {
    principal.authorize_any(Action::ViewOperations)?;
    let limit = crate::paging::limit(query.limit)?;
    let after = crate::paging::id_cursor(query.cursor.as_deref())?;
    let rows: Vec<WebhookFailureView> = sqlx::query_as(
        "SELECT d.notification_id, d.customer_id, d.event_id, r.kind, r.order_id, \
                d.attempted_at, d.finished_at, d.http_status, d.error \
         FROM notifications.webhook_deliveries d \
         LEFT JOIN notifications.records r \
           ON r.customer_id = d.customer_id AND r.event_id = d.event_id \
         WHERE d.status = 'failed' AND d.notification_id > $1 \
         ORDER BY d.notification_id LIMIT $2",
    )
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    let (items, next_cursor) = page(rows, limit, |r| r.notification_id);
    Ok(axum::Json(WebhookFailurePage { items, next_cursor }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_has_a_next_cursor_only_when_more_rows_follow() {
        let (rows, next) = page(vec![1, 2, 3], 2, |r| *r);
        assert_eq!((rows, next), (vec![1, 2], Some("2".to_owned())));
        let (rows, next) = page(vec![1, 2], 2, |r| *r);
        assert_eq!((rows, next), (vec![1, 2], None));
    }

    #[test]
    fn bad_parameters_are_client_errors_naming_what_is_allowed() {
        assert!(crate::paging::limit(Some(0)).is_err());
        assert!(crate::paging::limit(Some(501)).is_err());
        assert_eq!(crate::paging::limit(None).ok(), Some(50));
        assert!(crate::paging::id_cursor(Some("-1")).is_err());
        assert!(crate::paging::id_cursor(Some("abc")).is_err());
        match parse_kind(Some("order_placed")) {
            Err(ApiError::BadRequest(detail)) => assert!(detail.contains("points_earned")),
            other => panic!("unexpected {other:?}"),
        }
    }
}
