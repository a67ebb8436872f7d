//! Read-only endpoints for auditors: one aggregate's events with all their metadata, straight
//! from the event store (the CLI twin is `replay-tools history`).
//!
//! Each event is shown as recorded: who (`actor`), when (`occurred_at`: the command ran;
//! `recorded_at`: the store wrote it), why (`correlation_id`, `causation_id`, `command_id`), the
//! schema version of the stored payload (`event_version`, not upcast) and the payload (the stored
//! body without its event-type tag, its sealed personal data revealed or shown as `[erased]`). Pages follow the sequence: pass `next_cursor` as `cursor`.
//!
//! **Access.** The handler asks the caller's principal for [`Action::ReadAudit`] before it reads
//! anything; the route table (`crate::auth`) lists the roles that hold it.

use axum::extract::State;
use commands::log::{self, AuditedEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{PathParams, QueryParams};
use crate::paging;
use crate::AppState;

/// One recorded event with its metadata.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEvent {
    /// Position in the aggregate, from 1.
    pub sequence: i64,
    pub event_id: Uuid,
    #[schema(example = "OrderPlaced")]
    pub event_type: String,
    /// Version of the payload's shape as stored.
    #[schema(example = "1.0")]
    pub event_version: String,
    /// When the command that caused it ran (RFC 3339, as recorded).
    pub occurred_at: Option<String>,
    /// When the event store recorded it (RFC 3339, microseconds, UTC).
    pub recorded_at: String,
    /// Who issued the command, e.g. `customer:<id>`, `store`, `system:order-flow`.
    pub actor: Option<String>,
    /// The business transaction it belongs to.
    pub correlation_id: Option<String>,
    /// The command or event that caused it.
    pub causation_id: Option<String>,
    pub command_id: Option<String>,
    /// The stored payload (without the event-type tag), personal data revealed: plaintext, or
    /// `[erased]` for an erased customer (`[unreadable]` for a damaged envelope).
    #[schema(value_type = Object)]
    pub payload: Json,
}

/// A page of one aggregate's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditHistory {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// In sequence order.
    pub events: Vec<AuditEvent>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// Paging of a history.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// From a previous page's `next_cursor` (the last sequence seen).
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// The aggregate types of the backbone.
fn aggregate_types() -> impl Iterator<Item = &'static str> {
    streams::config::AGGREGATE_TOPICS.iter().map(|(a, _)| *a)
}

impl From<AuditedEvent> for AuditEvent {
    fn from(event: AuditedEvent) -> Self {
        Self {
            sequence: event.sequence,
            event_id: event.event_id,
            event_type: event.event_type,
            event_version: event.event_version,
            occurred_at: event.occurred_at,
            recorded_at: event.recorded_at,
            actor: event.actor,
            correlation_id: event.correlation_id,
            causation_id: event.causation_id,
            command_id: event.command_id,
            payload: event.payload,
        }
    }
}

/// One aggregate's events with all their metadata (who, when, correlation, causation, command,
/// schema version, payload), in sequence order.
#[utoipa::path(
    get, path = "/audit/{aggregate_type}/{aggregate_id}/events", tag = "audit",
    params(
        ("aggregate_type" = String, Path, description = "order, delivery, payment, rewards or ads"),
        ("aggregate_id" = Uuid, Path, description = "An order id (order, delivery, payment) or a customer id (rewards, ads)"),
        HistoryQuery
    ),
    responses(
        (status = 200, description = "A page of the aggregate's events", body = AuditHistory),
        (status = 400, description = "Unknown aggregate type, malformed id, cursor or limit", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The aggregate has no events", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    principal: Principal,
    PathParams((aggregate_type, raw_id)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<HistoryQuery>,
) -> Result<axum::Json<AuditHistory>, ApiError> {
    principal.authorize_any(Action::ReadAudit)?;
    if !aggregate_types().any(|a| a == aggregate_type) {
        return Err(ApiError::BadRequest(format!(
            "`{aggregate_type}` is not an aggregate type; use one of {}",
            aggregate_types().collect::<Vec<_>>().join(", ")
        )));
    }
    let aggregate_id = Uuid::parse_str(&raw_id)
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "`{raw_id}` is not a valid {aggregate_type} id: aggregate ids are UUIDs"
            ))
        })?
        .to_string();
    let limit = paging::limit(query.limit)?;
    let after = paging::id_cursor(query.cursor.as_deref())?;
    let rows = log::aggregate_page(
        &state.pool,
        &aggregate_type,
        &aggregate_id,
        after,
        limit + 1,
    )
    .await
    .map_err(ApiError::internal)?;
    if rows.is_empty()
        && !log::aggregate_exists(&state.pool, &aggregate_type, &aggregate_id)
            .await
            .map_err(ApiError::internal)?
    {
        return Err(ApiError::NotFound(format!(
            "no events for {aggregate_type} {aggregate_id}"
        )));
    }
    let mut events: Vec<AuditEvent> = rows
        .into_iter()
        .map(|stored| AuditEvent::from(AuditedEvent::from(stored)))
        .collect();
    // Personal data as people may see it: plaintext, or `[erased]`, never the envelopes.
    state
        .pii
        .reveal_all(events.iter_mut().map(|e| &mut e.payload))
        .await?;
    let (events, next_cursor) = paging::page(events, limit, |e| e.sequence.to_string());
    Ok(axum::Json(AuditHistory {
        aggregate_type,
        aggregate_id,
        events,
        next_cursor,
    }))
}
