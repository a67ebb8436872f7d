//! The event log, read: the one definition of a stored event and the queries every reader of
//! the store shares (the relay, rebuilds, exports, the hash chain's checks, auditors' histories,
//! as-of views). Writers append through [`crate::CommandBus`] only.

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use sqlx::PgPool;
use uuid::Uuid;

/// One row of the event store, as committed (payload in the version it was written in).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredEvent {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Json,
    pub metadata: Json,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
}

/// The columns of [`StoredEvent`], for a query that names the `events` table `e`.
pub const STORED_COLUMNS: &str = "e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, \
     e.event_version, e.payload, e.metadata, e.event_id, e.recorded_at";

/// A text field of an event's metadata (who, why, when it occurred); `None` when absent or empty.
pub fn metadata_text<'a>(metadata: &'a Json, key: &str) -> Option<&'a str> {
    metadata
        .get(key)
        .and_then(Json::as_str)
        .filter(|text| !text.is_empty())
}

impl StoredEvent {
    /// A text field of the metadata (see [`metadata_text`]).
    pub fn metadata_text(&self, key: &str) -> Option<&str> {
        metadata_text(&self.metadata, key)
    }

    /// The payload in the current version of its event type (old shapes upcast), with that
    /// version: what the relay publishes and what the domain reads.
    pub fn upcast(&self) -> (String, Json) {
        schemas::upcast(&self.event_type, &self.event_version, self.payload.clone())
    }

    /// The body of the payload: the value inside its `{"<EventType>": ...}` envelope (the whole
    /// payload when it has none).
    pub fn body(payload: Json, event_type: &str) -> Json {
        match payload {
            Json::Object(mut map) if map.len() == 1 && map.contains_key(event_type) => {
                map.remove(event_type).unwrap_or(Json::Null)
            }
            other => other,
        }
    }
}

/// One page of an aggregate's events after `after_sequence`, in sequence order.
pub async fn aggregate_page(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    after_sequence: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {STORED_COLUMNS} FROM events e \
         WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.sequence > $3 \
         ORDER BY e.sequence LIMIT $4"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(after_sequence)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Every event of an aggregate, in sequence order.
pub async fn aggregate_history(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    aggregate_page(pool, aggregate_type, aggregate_id, 0, i64::MAX).await
}

/// Whether the store holds any event of the aggregate.
pub async fn aggregate_exists(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2)",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_one(pool)
    .await
}

/// Whether the aggregate has an event at `sequence`: a position a command committed, as opposed
/// to a made-up one.
pub async fn event_committed(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3)",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(sequence)
    .fetch_one(pool)
    .await
}

/// The sequence of the aggregate's last event (`None` when it has none).
pub async fn last_sequence(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT max(sequence) FROM events WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_one(pool)
    .await
}

/// The metadata of the aggregate's first event (the business transaction and the trace it began
/// in), read without its payload; `None` when the aggregate has no events.
pub async fn first_metadata(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Option<Json>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT metadata FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
         AND sequence = 1",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_optional(pool)
    .await
}

/// How many events the store holds.
pub async fn count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
}

/// An event as auditors read it: the stored payload's body (not upcast: the version it was
/// written in) and the metadata's who and why as optional fields. `replay-tools history` prints
/// it; the API's audit endpoint serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditedEvent {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub event_version: String,
    pub occurred_at: Option<String>,
    pub recorded_at: String,
    pub actor: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub command_id: Option<String>,
    pub payload: Json,
}

impl From<StoredEvent> for AuditedEvent {
    fn from(stored: StoredEvent) -> Self {
        let text = |key: &str| stored.metadata_text(key).map(str::to_owned);
        let (occurred_at, actor, correlation_id, causation_id, command_id) = (
            text("occurred_at"),
            text("actor"),
            text("correlation_id"),
            text("causation_id"),
            text("command_id"),
        );
        Self {
            recorded_at: stored
                .recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            payload: StoredEvent::body(stored.payload, &stored.event_type),
            aggregate_type: stored.aggregate_type,
            aggregate_id: stored.aggregate_id,
            sequence: stored.sequence,
            event_id: stored.event_id,
            event_type: stored.event_type,
            event_version: stored.event_version,
            occurred_at,
            actor,
            correlation_id,
            causation_id,
            command_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StoredEvent;

    #[test]
    fn the_event_type_tag_is_taken_off_the_payload() {
        let stored = serde_json::json!({"OrderAccepted": {"by": "store"}});
        assert_eq!(
            StoredEvent::body(stored, "OrderAccepted"),
            serde_json::json!({"by": "store"})
        );
        let untagged = serde_json::json!({"a": 1, "b": 2});
        assert_eq!(
            StoredEvent::body(untagged.clone(), "OrderAccepted"),
            untagged
        );
    }
}
