//! Operating read models, shared by the API and the command line: which read models exist,
//! how far behind each is (per partition, as its projector last measured), and their dead
//! letters (list, request a re-drive). The projector that owns a read model carries out the
//! re-drives (it holds the handler code), each once.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

/// One partition of a projector's input.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The next offset the read model will apply.
    pub next_offset: i64,
    /// The partition's end as last seen by the projector.
    pub high_watermark: i64,
    pub lag_events: i64,
    /// Age of the oldest record not applied yet (since it was recorded in the event store), or
    /// 0 when nothing waits.
    pub lag_seconds: f64,
    pub measured_at: DateTime<Utc>,
    /// The projector instance (`host/pid`) that owns the partition.
    pub owner: String,
}

/// A read model and how it is doing.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadModelStatus {
    pub name: String,
    /// Records on its topics not applied yet, over all partitions.
    pub lag_events: i64,
    /// The largest lag in seconds over its partitions.
    pub lag_seconds: f64,
    pub partitions: Vec<PartitionLag>,
    /// Dead letters waiting for a fix.
    pub dead_letters: i64,
    /// Dead letters waiting for the projector to re-drive them.
    pub redrives_pending: i64,
}

/// A record a projector could not apply.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<String>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub sequence: Option<i64>,
    pub event_type: Option<String>,
    /// Why it could not be applied (the latest attempt).
    pub error: String,
    /// `dead`, `redrive_requested` or `redriven`.
    pub status: String,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
    pub redrive_requested_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// The states of a dead letter.
pub const STATUSES: [&str; 3] = ["dead", "redrive_requested", "redriven"];

/// What a re-drive request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveRequest {
    /// Waiting for the projector.
    Requested,
    /// Applied already; never applied twice.
    AlreadyRedriven,
    NotFound,
}

/// The read models in this database: every schema with the consumer runtime's tables.
pub async fn read_models(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT d.table_schema::text FROM information_schema.tables d \
         JOIN information_schema.tables a ON a.table_schema = d.table_schema AND a.table_name = 'applied' \
         WHERE d.table_name = 'dead_letters' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
}

/// `name` if it is a read model here (names become part of SQL only through this check).
pub async fn find(pool: &PgPool, name: &str) -> Result<Option<String>, sqlx::Error> {
    Ok(read_models(pool).await?.into_iter().find(|m| m == name))
}

/// A read model's lag and dead-letter counts. `name` must come from [`find`] or
/// [`read_models`].
pub async fn status(pool: &PgPool, name: String) -> Result<ReadModelStatus, sqlx::Error> {
    let partitions: Vec<PartitionLag> = sqlx::query_as(&format!(
        "SELECT topic, partition, next_offset, high_watermark, lag_events, lag_seconds, measured_at, owner \
         FROM {name}.lag ORDER BY topic, partition"
    ))
    .fetch_all(pool)
    .await?;
    let (dead, pending): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE status = 'dead'), \
                count(*) FILTER (WHERE status = 'redrive_requested') FROM {name}.dead_letters"
    ))
    .fetch_one(pool)
    .await?;
    Ok(ReadModelStatus {
        lag_events: partitions.iter().map(|p| p.lag_events).sum(),
        lag_seconds: partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max),
        name,
        partitions,
        dead_letters: dead,
        redrives_pending: pending,
    })
}

/// Dead letters with an id above `after`, oldest first, optionally of one status.
pub async fn dead_letters(
    pool: &PgPool,
    name: &str,
    status: Option<&str>,
    after: i64,
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT id, topic, partition, \"offset\", event_id, aggregate_type, aggregate_id, sequence, \
                event_type, error, status, attempts, failed_at, redrive_requested_at, resolved_at \
         FROM {name}.dead_letters WHERE id > $1 AND ($2::text IS NULL OR status = $2) \
         ORDER BY id LIMIT $3"
    ))
    .bind(after)
    .bind(status)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Asks for one dead letter to be applied again.
pub async fn request_redrive(
    pool: &PgPool,
    name: &str,
    id: i64,
) -> Result<RedriveRequest, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar(&format!(
        "UPDATE {name}.dead_letters \
         SET status = CASE WHEN status = 'redriven' THEN status ELSE 'redrive_requested' END, \
             redrive_requested_at = CASE WHEN status = 'dead' THEN clock_timestamp() ELSE redrive_requested_at END \
         WHERE id = $1 RETURNING status"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(match status.as_deref() {
        None => RedriveRequest::NotFound,
        Some("redriven") => RedriveRequest::AlreadyRedriven,
        Some(_) => RedriveRequest::Requested,
    })
}

/// Asks for every dead letter of a read model to be applied again; returns their ids.
pub async fn request_redrive_all(pool: &PgPool, name: &str) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "UPDATE {name}.dead_letters SET status = 'redrive_requested', redrive_requested_at = clock_timestamp() \
         WHERE status = 'dead' RETURNING id"
    ))
    .fetch_all(pool)
    .await
}
