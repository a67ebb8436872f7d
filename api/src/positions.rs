//! Read-your-writes: every command answers with the position of its last event, as a token
//! `<aggregate_type>:<aggregate_id>:<sequence>`; a query that passes it as `position` waits
//! (bounded) until its read model has applied that event.
//!
//! The check is the projector runtime's own dedup table (`<read model>.applied`), written in
//! the same transaction as the read model's rows, so "reached" means the rows are there. It
//! works for every read model alike, whichever aggregate the command changed.

use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::AppState;

/// Where a command left its aggregate. Pass `token` as the `position` parameter of a query to
/// read your own write.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Position {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: u64,
    /// `<aggregate_type>:<aggregate_id>:<sequence>`.
    pub token: String,
}

impl Position {
    pub fn new(aggregate_type: &str, aggregate_id: &str, sequence: u64) -> Self {
        Self {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence,
            token: format!("{aggregate_type}:{aggregate_id}:{sequence}"),
        }
    }

    /// Reads a token.
    pub fn parse(token: &str) -> Result<Self, ApiError> {
        let malformed = || {
            ApiError::BadRequest(format!(
                "position `{token}` is not a position token; pass `position.token` from a command's \
                 response (`<aggregate_type>:<aggregate_id>:<sequence>`)"
            ))
        };
        let mut parts = token.splitn(3, ':');
        let (Some(aggregate_type), Some(aggregate_id), Some(sequence)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let sequence: u64 = sequence.parse().map_err(|_| malformed())?;
        // Sequences are positive and stored as bigint.
        if aggregate_id.is_empty()
            || aggregate_id.len() > 100
            || sequence == 0
            || i64::try_from(sequence).is_err()
        {
            return Err(malformed());
        }
        if !AGGREGATE_TYPES.contains(&aggregate_type) {
            return Err(ApiError::BadRequest(format!(
                "position `{token}` names aggregate type `{aggregate_type}`; known: {}",
                AGGREGATE_TYPES.join(", ")
            )));
        }
        Ok(Self::new(aggregate_type, aggregate_id, sequence))
    }
}

const AGGREGATE_TYPES: [&str; 5] = ["order", "delivery", "payment", "rewards", "ads"];

/// The aggregate types whose events a read model follows (`None`: not known here).
fn followed_by(read_model: &str) -> Option<&'static [&'static str]> {
    Some(match read_model {
        "tracking" | "ratings" => &["order", "delivery"],
        "analytics" | "notifications" => &["order", "rewards"],
        "ads" => &["order", "rewards", "ads"],
        _ => return None,
    })
}

/// Waits until `read_model` has applied the event at `position` (no position: returns at
/// once). Answers 400 for a malformed token, one of an aggregate type the read model does not
/// follow, or one no command ever returned (the event store has no such event: waiting would
/// never end), 503 with Retry-After when the wait runs out.
pub async fn wait_for_position(
    state: &AppState,
    read_model: &'static str,
    position: Option<&str>,
) -> Result<(), ApiError> {
    let Some(token) = position else {
        return Ok(());
    };
    let position = Position::parse(token)?;
    if let Some(followed) = followed_by(read_model) {
        if !followed.contains(&position.aggregate_type.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "the {read_model} view is built from {} events, not {}; pass the position of a \
                 command on one of those",
                followed.join(" and "),
                position.aggregate_type
            )));
        }
    }
    let wanted = i64::try_from(position.sequence).unwrap_or(i64::MAX);
    let deadline = Instant::now() + state.read_your_writes_wait;
    let sql = format!(
        "SELECT last_sequence FROM {read_model}.applied WHERE aggregate_type = $1 AND aggregate_id = $2"
    );
    let mut first = true;
    loop {
        let reached: Option<i64> = sqlx::query_scalar(&sql)
            .bind(&position.aggregate_type)
            .bind(&position.aggregate_id)
            .fetch_optional(&state.pool)
            .await
            .map_err(ApiError::internal)?;
        if reached.is_some_and(|r| r >= wanted) {
            return Ok(());
        }
        if std::mem::take(&mut first) {
            // Not there yet: a position a command returned is committed in the store (one
            // primary-key look-up, only on this slow path).
            let committed: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM events \
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3)",
            )
            .bind(&position.aggregate_type)
            .bind(&position.aggregate_id)
            .bind(wanted)
            .fetch_one(&state.pool)
            .await
            .map_err(ApiError::internal)?;
            if !committed {
                return Err(ApiError::BadRequest(format!(
                    "position `{token}` was never committed (the {} has no event {wanted}); pass \
                     `position.token` from a command's response",
                    position.aggregate_type
                )));
            }
        }
        if Instant::now() >= deadline {
            return Err(ApiError::NotYet(format!(
                "the {read_model} view has not applied {token} yet; retry shortly with the same position"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
