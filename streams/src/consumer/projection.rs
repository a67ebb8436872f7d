//! What a consumer of the event topics implements: a read model or a process manager.

use async_trait::async_trait;
use sqlx::{Postgres, Transaction};

use crate::DecodedEvent;

/// An event the runtime has proven to be the next unapplied event of its aggregate, inside the
/// transaction that will record it as applied. Handlers receive nothing else, so every handler
/// is replay-safe by construction: it cannot see a redelivery.
#[derive(Debug, Clone, Copy)]
pub struct FirstDelivery<'e> {
    pub(super) event: &'e DecodedEvent,
}

impl std::ops::Deref for FirstDelivery<'_> {
    type Target = DecodedEvent;
    fn deref(&self) -> &DecodedEvent {
        self.event
    }
}

/// What made an event unreadable for a handler, kept as the error it was (a decoding error, an
/// invalid id, ...) or a sentence.
pub type EventFault = Box<dyn std::error::Error + Send + Sync>;

/// Why a handler could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The event itself cannot be applied (it is dead-lettered, with this reason).
    #[error("event: {0}")]
    Event(#[source] EventFault),
}

impl ProjectionError {
    pub fn event(fault: impl Into<EventFault>) -> Self {
        Self::Event(fault.into())
    }
}

/// A read model.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Name of the read model: its consumer group suffix and its PostgreSQL schema.
    fn name(&self) -> &'static str;
    /// Aggregate types whose topics it reads.
    fn aggregate_types(&self) -> &'static [&'static str];
    /// SQL creating its tables (idempotent).
    fn schema_sql(&self) -> &'static str;
    /// Indexes of `schema_sql` that only queries read (no handler looks rows up through
    /// them). A rebuild leaves them out while it applies the history and builds each once, by
    /// sorting, before the rebuilt model is used: cheaper than keeping them up to date event
    /// by event. An index a handler reads must not be listed (its lookups would scan).
    fn query_only_indexes(&self) -> &'static [&'static str] {
        &[]
    }
    /// Applies one event in the runtime's transaction.
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: FirstDelivery<'_>,
    ) -> Result<(), ProjectionError>;

    /// Applies a batch of events, in topic order, in the runtime's transaction. The default
    /// applies them one by one; a read model can override it with set-based statements.
    async fn apply_batch(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        events: &[FirstDelivery<'_>],
    ) -> Result<(), ProjectionError> {
        for event in events {
            self.apply(tx, *event).await?;
        }
        Ok(())
    }
}
