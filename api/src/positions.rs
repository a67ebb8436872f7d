//! Read-your-writes: every command answers with the position of its last event, as a token
//! `<aggregate_type>:<aggregate_id>:<sequence>`; a query that passes it as `position` waits
//! (bounded) until its read model has applied that event.
//!
//! The check is the consumer runtime's own dedup table (`<read model>.applied`), written in
//! the same transaction as the read model's rows, so "reached" means the rows are there. It
//! works for every read model alike, whichever aggregate the command changed.

use std::time::Instant;

use tokio::sync::broadcast;

use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Principal;
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

/// The aggregate types whose events a read model follows (`None`: not a read model).
fn followed_by(read_model: &str) -> Option<&'static [&'static str]> {
    projections::read_models::by_name(read_model)
        .ok()
        .map(|projection| projection.aggregate_types())
}

/// The per-client cap on read-your-writes waits (`API_MAX_WAITS_PER_CLIENT`).
pub fn wait_slots(max_per_client: usize) -> std::sync::Arc<crate::live::StreamSlots> {
    crate::live::StreamSlots::with_refusal(max_per_client, |max| {
        format!(
            "this client already has {max} queries waiting for a `position`, the most it may; \
             retry once one of them has answered"
        )
    })
}

/// Waits until `read_model` has applied the event at `position` (no position: returns at
/// once). Answers 400 for a malformed token, one of an aggregate type the read model does not
/// follow, or one no command ever returned (the event store has no such event: waiting would
/// never end), 429 when the caller already has `API_MAX_WAITS_PER_CLIENT` waits in flight, 503
/// with Retry-After when the wait runs out.
///
/// A wait does not poll. The consumer runtime signals `applied.<read model>` with the
/// aggregate's key in the transaction that moves its position (delivered on commit), and the
/// process's one `LISTEN` connection ([`crate::live::LiveHub`]) fans the signals out; a waiter
/// re-reads the dedup table only when a signal may concern its aggregate (its own key, a
/// lagging receiver, a reconnect of the listener), and once more at its deadline, since a
/// signal sent while the listener reconnects is lost.
pub async fn wait_for_position(
    state: &AppState,
    principal: &Principal,
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
    let reached = || async {
        let reached: Option<i64> = sqlx::query_scalar(&sql)
            .bind(&position.aggregate_type)
            .bind(&position.aggregate_id)
            .fetch_optional(&state.pool)
            .await
            .map_err(ApiError::internal)?;
        Ok::<bool, ApiError>(reached.is_some_and(|r| r >= wanted))
    };
    // Subscribed before the first look, so a signal sent right after it is not missed.
    let mut signals = state.live.subscribe();
    if reached().await? {
        return Ok(());
    }
    // Not there yet: a position a command returned is committed in the store (one primary-key
    // look-up, only on this slow path).
    require_committed(state, &position, token).await?;
    // Only a request that really waits takes one of its client's slots.
    let _slot = state.waits.acquire(&principal.actor())?;
    let channel = streams::consumer::applied_channel(read_model);
    let key = format!("{}:{}", position.aggregate_type, position.aggregate_id);
    loop {
        // Re-checked after the slot was taken, and after each signal that may concern us.
        if reached().await? {
            return Ok(());
        }
        let woken = tokio::time::timeout_at(deadline.into(), async {
            loop {
                match signals.recv().await {
                    Ok(change) if change.concerns(&channel, &key) => return true,
                    Ok(_) => {}
                    // Signals were dropped: ours may have been one of them.
                    Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    // The hub closed (shutting down): nothing more will come.
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await;
        if woken != Ok(true) {
            break;
        }
    }
    // The deadline (or the end of the signals): one last look, for a signal that was lost.
    if reached().await? {
        return Ok(());
    }
    Err(ApiError::NotYet(format!(
        "the {read_model} view has not applied {token} yet; retry shortly with the same position"
    )))
}

/// Refuses a position no command committed (a made-up or mistyped token).
async fn require_committed(
    state: &AppState,
    position: &Position,
    token: &str,
) -> Result<(), ApiError> {
    let wanted = i64::try_from(position.sequence).unwrap_or(i64::MAX);
    let committed = commands::log::event_committed(
        &state.pool,
        &position.aggregate_type,
        &position.aggregate_id,
        wanted,
    )
    .await
    .map_err(ApiError::internal)?;
    if !committed {
        return Err(ApiError::BadRequest(format!(
            "position `{token}` was never committed (the {} has no event {wanted}); pass \
             `position.token` from a command's response",
            position.aggregate_type
        )));
    }
    Ok(())
}
