//! Stuck flows: steps of the order flow that could not proceed, made visible and clearable.
//!
//! When a command the order flow issues is refused for a reason that does not mean "already
//! done" or "moot" (the delivery is over, the payment already voided), or the catalogue lacks
//! what the step needs, the flow records the step here, in the transaction of its checkpoint:
//! the order, the step, the causing event, the refused command and why, since when. The order
//! stays where it is until an operator acts:
//!
//! - **retry** once the cause is fixed (a store moved back in range, a region's settings
//!   corrected): the process manager applies its reaction to the causing event again. Steps
//!   that went through the first time are not repeated (their command ids are derived from
//!   the event and the step); the refused one is tried again with today's catalogue. Refused
//!   again, the record is open again with the new reason and one more attempt.
//! - **resolve**: the process manager cancels the order as the system, with the operator's
//!   reason; the flow's reaction to that cancellation gives the compensation (the payment
//!   voided, redeemed points given back, a requested delivery cancelled, the customer told).
//!   Every open record of the order is then resolved.
//!
//! Operators ask through the API (`/admin/stuck-flows`) or `replay-tools stuck-flows`; both
//! only mark the record, so the process manager (which owns the commands and the catalogue)
//! does the work, within a second. The table is created by a migration
//! (`20261215000007_stuck_flows.sql`). Metrics: `process_manager_stuck_flows_total{step}`
//! counts new records, `process_manager_stuck_flows_open` the records waiting for an operator.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// Statuses of a record. `open`, `retry_requested` and `resolve_requested` are unresolved.
pub const STATUSES: [&str; 5] = [
    "open",
    "retry_requested",
    "resolve_requested",
    "retried",
    "resolved",
];

/// One stuck step, as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct StuckFlow {
    pub id: i64,
    pub order_id: String,
    pub step: String,
    /// The event the step reacted to.
    pub event_id: Uuid,
    pub event_type: String,
    /// The refused command (domain JSON), if the step got as far as building it.
    pub command: Option<serde_json::Value>,
    pub command_type: String,
    /// Why it could not proceed.
    pub reason: String,
    pub status: String,
    pub attempts: i32,
    /// Stuck since.
    pub since: DateTime<Utc>,
    pub last_refused_at: DateTime<Utc>,
    pub requested_by: Option<String>,
    pub requested_at: Option<DateTime<Utc>>,
    /// The operator's reason for a resolution.
    pub note: Option<String>,
    pub resolution: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, order_id, step, event_id, event_type, command, command_type, reason, \
                       status, attempts, since, last_refused_at, requested_by, requested_at, \
                       note, resolution, resolved_at";

/// A step that could not proceed, as the flow records it.
#[derive(Debug, Clone)]
pub struct NewStuckFlow<'a> {
    pub order_id: &'a str,
    pub step: &'a str,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub cause: serde_json::Value,
    pub command: Option<serde_json::Value>,
    pub command_type: &'a str,
    pub reason: String,
}

/// Records (or, for a step stuck before, re-opens with the new reason and one more attempt)
/// a stuck step in the flow's transaction. True when the record is new.
pub async fn record(
    tx: &mut Transaction<'static, Postgres>,
    stuck: &NewStuckFlow<'_>,
) -> Result<bool, sqlx::Error> {
    let inserted: bool = sqlx::query_scalar(
        "INSERT INTO order_flow.stuck_flows \
           (order_id, step, event_id, event_type, cause, command, command_type, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (event_id, step) DO UPDATE \
         SET reason = excluded.reason, command = excluded.command, \
             attempts = order_flow.stuck_flows.attempts + 1, last_refused_at = now(), \
             status = 'open', resolution = NULL, resolved_at = NULL \
         RETURNING (xmax = 0)",
    )
    .bind(stuck.order_id)
    .bind(stuck.step)
    .bind(stuck.event_id)
    .bind(stuck.event_type)
    .bind(&stuck.cause)
    .bind(&stuck.command)
    .bind(stuck.command_type)
    .bind(&stuck.reason)
    .fetch_one(&mut **tx)
    .await?;
    Ok(inserted)
}

/// Which records to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// One status; `None` lists the unresolved ones (open or with a request pending);
    /// `Some("all")` every record.
    pub status: Option<String>,
    pub order_id: Option<String>,
    /// Records with an id above this one (the cursor).
    pub after: i64,
    pub limit: i64,
}

/// Stuck flows by id, oldest first.
pub async fn list(pool: &PgPool, filter: &Filter) -> Result<Vec<StuckFlow>, sqlx::Error> {
    let status = filter.status.as_deref();
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM order_flow.stuck_flows \
         WHERE id > $1 \
           AND CASE WHEN $2::text IS NULL \
                    THEN status IN ('open', 'retry_requested', 'resolve_requested') \
                    WHEN $2 = 'all' THEN true ELSE status = $2 END \
           AND ($3::text IS NULL OR order_id = $3) \
         ORDER BY id LIMIT $4"
    ))
    .bind(filter.after)
    .bind(status)
    .bind(filter.order_id.as_deref())
    .bind(filter.limit)
    .fetch_all(pool)
    .await
}

/// One record.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<StuckFlow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM order_flow.stuck_flows WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// What an operator asks of a stuck flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Retry,
    Resolve,
}

impl Request {
    const fn status(self) -> &'static str {
        match self {
            Self::Retry => "retry_requested",
            Self::Resolve => "resolve_requested",
        }
    }
}

/// Why a request was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no stuck flow {0}")]
    NotFound(i64),
    #[error("stuck flow {id} is already {status}; nothing is left to do")]
    AlreadyDone { id: i64, status: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Asks the process manager to retry or resolve an unresolved record (a repeat of a pending
/// request changes nothing but who asked). Returns the record as it now stands.
pub async fn request(
    pool: &PgPool,
    id: i64,
    request: Request,
    requested_by: &str,
    note: Option<&str>,
) -> Result<StuckFlow, RequestError> {
    let updated: Option<StuckFlow> = sqlx::query_as(&format!(
        "UPDATE order_flow.stuck_flows \
         SET status = $2, requested_by = $3, requested_at = now(), note = $4 \
         WHERE id = $1 AND status IN ('open', 'retry_requested', 'resolve_requested') \
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(request.status())
    .bind(requested_by)
    .bind(note)
    .fetch_optional(pool)
    .await?;
    if let Some(record) = updated {
        return Ok(record);
    }
    match get(pool, id).await? {
        Some(record) => Err(RequestError::AlreadyDone {
            id,
            status: record.status,
        }),
        None => Err(RequestError::NotFound(id)),
    }
}

/// A request claimed by the process manager (locked until its transaction ends).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub order_id: String,
    pub status: String,
    pub cause: serde_json::Value,
    pub requested_by: Option<String>,
    pub note: Option<String>,
}

/// Claims the oldest pending request, skipping those another instance holds.
pub async fn claim_request(
    tx: &mut Transaction<'static, Postgres>,
) -> Result<Option<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, order_id, status, cause, requested_by, note FROM order_flow.stuck_flows \
         WHERE status IN ('retry_requested', 'resolve_requested') \
         ORDER BY requested_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(&mut **tx)
    .await
}

/// The status of a record inside a transaction.
pub async fn status(
    tx: &mut Transaction<'static, Postgres>,
    id: i64,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM order_flow.stuck_flows WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
}

/// Closes a record as retried or resolved.
pub async fn close(
    tx: &mut Transaction<'static, Postgres>,
    id: i64,
    status: &str,
    resolution: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE order_flow.stuck_flows \
         SET status = $2, resolution = $3, resolved_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(resolution)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Resolves every unresolved record of an order (it was cancelled: nothing is left to do).
pub async fn resolve_order(
    tx: &mut Transaction<'static, Postgres>,
    order_id: &str,
    resolution: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE order_flow.stuck_flows \
         SET status = 'resolved', resolution = $2, resolved_at = now() \
         WHERE order_id = $1 AND status IN ('open', 'retry_requested', 'resolve_requested')",
    )
    .bind(order_id)
    .bind(resolution)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// A request that could not be carried out goes back to `open` with why.
pub async fn reopen(
    tx: &mut Transaction<'static, Postgres>,
    id: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE order_flow.stuck_flows \
         SET status = 'open', reason = $2, attempts = attempts + 1, last_refused_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How many records wait for an operator (open or with a request pending).
pub async fn unresolved(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM order_flow.stuck_flows \
         WHERE status IN ('open', 'retry_requested', 'resolve_requested')",
    )
    .fetch_one(pool)
    .await
}
