//! `replay-tools as-of`: one aggregate's state as it was at an instant.
//!
//! The aggregate's stored events recorded at or before the instant, in sequence order, upcast
//! as the command side reads them, applied one by one through the domain aggregate's own
//! `apply` (the code the command side rebuilds it with before every command); the state is
//! printed as JSON with where it stands (last sequence applied, when it was recorded, how many
//! events came later), its personal data revealed or shown as `[erased]` ([`crate::privacy`]).

use std::io::Write;

use anyhow::{bail, Context};
use chrono::SecondsFormat;
use clap::Args;
use commands::log::StoredEvent;
use cqrs_es::Aggregate;
use serde_json::{json, Value as Json};
use sqlx::PgPool;

use crate::privacy::Revealer;
use crate::rebuild::parse_time;

/// `replay-tools as-of`.
#[derive(Debug, Clone, Args)]
pub struct AsOfArgs {
    /// The aggregate type: order, delivery, payment, rewards or ads.
    pub aggregate_type: String,
    /// The aggregate's id: an order id (order, delivery, payment) or a customer id (rewards,
    /// ads).
    pub aggregate_id: String,
    /// The instant (RFC 3339, e.g. 2026-11-21T18:00:00Z): the events recorded at or before it
    /// are replayed.
    pub time: String,
}

/// The aggregate types, and how each is replayed.
type Replay = fn(&[StoredEvent]) -> anyhow::Result<Json>;

const AGGREGATES: [(&str, Replay); 5] = [
    (
        domain::order::AGGREGATE_TYPE,
        replay::<domain::order::Order>,
    ),
    (
        domain::delivery::AGGREGATE_TYPE,
        replay::<domain::delivery::Delivery>,
    ),
    (
        domain::payment::AGGREGATE_TYPE,
        replay::<domain::payment::Payment>,
    ),
    (
        domain::rewards::AGGREGATE_TYPE,
        replay::<domain::rewards::RewardsLedger>,
    ),
    (
        domain::ads::AGGREGATE_TYPE,
        replay::<domain::ads::AdAudience>,
    ),
];

/// Prints the aggregate's state at the instant.
pub async fn run(args: AsOfArgs, pool: &PgPool, out: &mut impl Write) -> anyhow::Result<()> {
    let Some((aggregate_type, replay)) = AGGREGATES
        .iter()
        .find(|(name, _)| *name == args.aggregate_type)
    else {
        bail!(
            "unknown aggregate type `{}`; known: {}",
            args.aggregate_type,
            AGGREGATES.map(|(name, _)| name).join(", ")
        );
    };
    let at = parse_time(&args.time)?;
    let events = commands::log::aggregate_history(pool, aggregate_type, &args.aggregate_id).await?;
    let Some(first) = events.first() else {
        bail!(
            "no {aggregate_type} `{}` in the event store",
            args.aggregate_id
        );
    };
    // The events up to the instant, as a prefix of the aggregate's history.
    let known = events.iter().take_while(|e| e.recorded_at <= at).count();
    if known == 0 {
        bail!(
            "{aggregate_type} `{}` did not exist yet at {}: its first event was recorded at {}",
            args.aggregate_id,
            at.to_rfc3339_opts(SecondsFormat::Micros, true),
            first
                .recorded_at
                .to_rfc3339_opts(SecondsFormat::Micros, true)
        );
    }
    let mut state = replay(&events[..known])?;
    Revealer::new(pool.clone())
        .reveal(std::iter::once(&mut state))
        .await?;
    let last = &events[known - 1];
    let document = json!({
        "aggregate_type": aggregate_type,
        "aggregate_id": args.aggregate_id,
        "as_of": at.to_rfc3339_opts(SecondsFormat::Micros, true),
        "sequence": last.sequence,
        "event_type": last.event_type,
        "recorded_at": last.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        "later_events": events.len() - known,
        "state": state,
    });
    writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
    Ok(())
}

/// Folds events into a fresh aggregate with its own `apply`.
fn replay<A: Aggregate>(events: &[StoredEvent]) -> anyhow::Result<Json> {
    let mut state = A::default();
    for event in events {
        let (_, payload) = event.upcast();
        let domain_event: A::Event = serde_json::from_value(payload).with_context(|| {
            format!(
                "event #{} ({} {}) does not read as a {} event",
                event.sequence,
                event.event_type,
                event.event_version,
                A::TYPE
            )
        })?;
        state.apply(domain_event);
    }
    Ok(serde_json::to_value(&state)?)
}
