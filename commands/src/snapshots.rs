//! Which aggregate types the event store keeps snapshots of, and how often.
//!
//! An order, a delivery and a payment end after a few dozen events, so loading them whole
//! costs the same for the first customer as for the millionth. A customer's rewards ledger and
//! ad audience never end: every order earns points, every screen records an exposure, and a
//! loyal customer's ledger holds thousands of events after a few years. For those,
//! `cqrs-es`'s snapshot store keeps the aggregate's state every [`EVERY`] events, written in
//! the same transaction as the event that completes the interval (`postgres-es` updates it
//! only from the snapshot it was loaded with, so two writers cannot both move it), and a load
//! reads the snapshot and only the events after it: at most `EVERY - 1` of them, whatever the
//! history.
//!
//! No event is applied twice, and none skipped: a snapshot is the state after a given event,
//! recorded with that event's sequence, and a load applies only the events after it. The
//! snapshot is written here ([`SnapshotStore`]), not by `cqrs-es`: its snapshot store (0.5)
//! folds a command's events into an aggregate to which the handler's `EventSink::write` has
//! already applied them (each would count twice: points earned twice), and `postgres-es` (0.5)
//! records the commit's last sequence even when the snapshot was folded only up to an earlier
//! event of the commit (the rest would never be applied). Here the snapshot is the state the
//! handler left, which is the state after the commit's last event, at that event's sequence.
//! A snapshot that no longer reads as the aggregate's state (its shape changed in a release)
//! is ignored and the aggregate replayed from its first event; a release that changes what a
//! state means without changing its shape deletes that type's snapshots in its migration.
//! Neither ledger holds personal data (order ids, points, keys, experiment assignments), so a
//! snapshot keeps nothing an erasure must reach.
//!
//! A snapshotted aggregate's earlier events are not loaded, so the bus's check for a repeated
//! command ([`crate::repeat`]) sees only the events after the snapshot. That is enough here:
//! every rewards write carries its own idempotency key, which the ledger remembers (in the
//! snapshot too) for `domain::rewards::BOOKS_OPEN_DAYS` and answers as a no-op when seen again
//! (the process manager repeats a command within minutes); and exposures are only ever recorded
//! by client requests, which the API's idempotency keys deduplicate, never by a repeatable
//! command. An aggregate type added here must be one of those kinds.

use std::collections::HashMap;

use cqrs_es::persist::{
    EventStoreAggregateContext, PersistedEventRepository, PersistedEventStore, SerializedEvent,
};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore};

use crate::repeat::RepeatAwareRepository;

/// Events between two snapshots of a snapshotted aggregate.
pub const EVERY: usize = 50;

/// How many events apart snapshots of `aggregate_type` are kept, if they are kept.
pub fn every(aggregate_type: &str) -> Option<usize> {
    match aggregate_type {
        domain::rewards::AGGREGATE_TYPE | domain::ads::AGGREGATE_TYPE => Some(EVERY),
        _ => None,
    }
}

/// Whether a commit of `new_events` after `current_sequence` reaches the next multiple of
/// `every`: the interval it completes gets its snapshot.
const fn due(every: usize, current_sequence: usize, new_events: usize) -> bool {
    new_events > 0 && current_sequence % every + new_events >= every
}

/// `postgres-es`'s event store, which writes the snapshots itself (see the module
/// documentation): loads read the snapshot and the events after it (through `cqrs-es`, with
/// the upcasters); commits append, and at the end of each interval write the state after the
/// commit with them, in one transaction.
pub(crate) struct SnapshotStore<A: Aggregate> {
    inner: PersistedEventStore<RepeatAwareRepository, A>,
    /// The same repository, for the commits that write a snapshot.
    repo: RepeatAwareRepository,
    pool: sqlx::PgPool,
    every: Option<usize>,
}

impl<A: Aggregate> SnapshotStore<A> {
    pub(crate) fn new(pool: &sqlx::PgPool) -> Self {
        let every = every(A::TYPE);
        let repo =
            || RepeatAwareRepository::new(postgres_es::PostgresEventRepository::new(pool.clone()));
        let inner = match every {
            Some(every) => PersistedEventStore::new_snapshot_store(repo(), every),
            None => PersistedEventStore::new_event_store(repo()),
        }
        .with_upcasters(schemas::upcasters());
        Self {
            inner,
            repo: repo(),
            pool: pool.clone(),
            every,
        }
    }

    async fn drop_snapshots(&self, aggregate_id: &str) -> Result<(), AggregateError<A::Error>> {
        sqlx::query("DELETE FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2")
            .bind(A::TYPE)
            .bind(aggregate_id)
            .execute(&self.pool)
            .await
            .map_err(|e| AggregateError::UnexpectedError(Box::new(e)))?;
        Ok(())
    }
}

impl<A: Aggregate> EventStore<A> for SnapshotStore<A> {
    type AC = EventStoreAggregateContext<A>;

    async fn load_events(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        self.inner.load_events(aggregate_id).await
    }

    async fn load_aggregate(
        &self,
        aggregate_id: &str,
    ) -> Result<Self::AC, AggregateError<A::Error>> {
        self.inner.load_aggregate(aggregate_id).await
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        context: Self::AC,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let Some(every) = self
            .every
            .filter(|&every| due(every, context.current_sequence, events.len()))
        else {
            // No interval completed: nothing for `cqrs-es` to snapshot either.
            return self.inner.commit(events, context, metadata).await;
        };
        let envelopes: Vec<EventEnvelope<A>> = events
            .into_iter()
            .zip(context.current_sequence + 1..)
            .map(|(payload, sequence)| EventEnvelope {
                aggregate_id: context.aggregate_id.clone(),
                sequence,
                payload,
                metadata: metadata.clone(),
            })
            .collect();
        let serialized = envelopes
            .iter()
            .map(SerializedEvent::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        // The handler applied each event to this state as it wrote it: it is the state after
        // the last one, which `postgres-es` records the snapshot at.
        let state = serde_json::to_value(&context.aggregate)
            .map_err(|e| AggregateError::UnexpectedError(Box::new(e)))?;
        let next = match context.current_snapshot {
            Some(current) => current + 1,
            None => {
                // Loaded without a snapshot: there is none, or it no longer reads as the
                // aggregate's state (its shape changed). Such a row would be read, and passed
                // over, by every load from now on: it goes before the first new one is written.
                self.drop_snapshots(&context.aggregate_id).await?;
                1
            }
        };
        tracing::debug!(
            aggregate_type = A::TYPE,
            every,
            snapshot = next,
            "snapshot written"
        );
        self.repo
            .persist::<A>(&serialized, Some((context.aggregate_id, state, next)))
            .await?;
        Ok(envelopes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_when_a_commit_completes_an_interval() {
        assert!(!due(50, 0, 49));
        assert!(due(50, 0, 50));
        assert!(due(50, 49, 1));
        assert!(!due(50, 50, 49));
        assert!(
            due(50, 48, 3),
            "a commit past the boundary snapshots at its last event"
        );
        assert!(!due(50, 50, 0));
    }

    #[test]
    fn the_ledgers_that_never_end_are_snapshotted_and_the_orders_lifecycles_are_not() {
        assert_eq!(every("rewards"), Some(EVERY));
        assert_eq!(every("ads"), Some(EVERY));
        for bounded in ["order", "delivery", "payment"] {
            assert_eq!(every(bounded), None, "{bounded}");
        }
    }
}
