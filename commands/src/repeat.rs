//! A repeatable command's earlier execution, found in the events its aggregate is loaded from.
//!
//! A repeatable command (its id derived from its cause, see
//! [`crate::CommandContext::repeatable`]) must not append twice. Its events carry its id in their
//! metadata, and `cqrs-es` loads every event of the aggregate (or every event after its
//! snapshot, see [`crate::snapshots`]), metadata included, before it decides. So the check
//! rides on that load instead of costing a query of its own: while a repeatable command runs,
//! [`RepeatAwareRepository`] looks for its id among the loaded events and, when they hold it,
//! ends the execution with [`ExecutedBefore`], which the bus answers with what that earlier
//! execution committed.

use std::future::Future;

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use uuid::Uuid;

use crate::bus::meta;

tokio::task_local! {
    /// The id of the repeatable command this task is executing.
    static REPEATING: Uuid;
}

/// Runs `execution` as the execution of repeatable command `command_id`.
pub(crate) async fn repeating<F: Future>(command_id: Uuid, execution: F) -> F::Output {
    REPEATING.scope(command_id, execution).await
}

/// The command being executed had appended these events before: `(sequence, event type)`.
#[derive(Debug, thiserror::Error)]
#[error("this command was executed before (its events end at sequence {})", last_sequence(.events))]
pub(crate) struct ExecutedBefore {
    pub events: Vec<(usize, String)>,
}

fn last_sequence(events: &[(usize, String)]) -> usize {
    events.last().map_or(0, |(sequence, _)| *sequence)
}

/// `postgres-es`'s repository, which ends a repeatable command's load with [`ExecutedBefore`]
/// when the aggregate already holds that command's events.
pub(crate) struct RepeatAwareRepository {
    inner: PostgresEventRepository,
}

impl std::fmt::Debug for RepeatAwareRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepeatAwareRepository")
            .finish_non_exhaustive()
    }
}

impl RepeatAwareRepository {
    pub(crate) const fn new(inner: PostgresEventRepository) -> Self {
        Self { inner }
    }
}

/// The events among `events` that command `command_id` appended.
fn appended_by(events: &[SerializedEvent], command_id: Uuid) -> Vec<(usize, String)> {
    let id = command_id.to_string();
    events
        .iter()
        .filter(|event| event.metadata.get(meta::COMMAND_ID).and_then(Value::as_str) == Some(&id))
        .map(|event| (event.sequence, event.event_type.clone()))
        .collect()
}

/// `events`, or [`ExecutedBefore`] when the repeatable command this task runs appended some of
/// them.
fn unless_executed_before(
    events: Vec<SerializedEvent>,
) -> Result<Vec<SerializedEvent>, PersistenceError> {
    if let Ok(command_id) = REPEATING.try_with(|id| *id) {
        let earlier = appended_by(&events, command_id);
        if !earlier.is_empty() {
            return Err(PersistenceError::UnknownError(Box::new(ExecutedBefore {
                events: earlier,
            })));
        }
    }
    Ok(events)
}

impl PersistedEventRepository for RepeatAwareRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let events = self.inner.get_events::<A>(aggregate_id).await?;
        unless_executed_before(events)
    }

    /// A snapshotted aggregate's load: the events after its snapshot, which are all a repeat
    /// can be looked for in (see [`crate::snapshots`] for why that is enough).
    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let events = self
            .inner
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await?;
        unless_executed_before(events)
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.inner.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        self.inner.persist::<A>(events, snapshot_update).await
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.inner.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.inner.stream_all_events::<A>().await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(sequence: usize, command_id: &str) -> SerializedEvent {
        SerializedEvent::new(
            "o-1".to_owned(),
            sequence,
            "order".to_owned(),
            format!("Event{sequence}"),
            "1.0".to_owned(),
            json!({}),
            json!({ meta::COMMAND_ID: command_id }),
        )
    }

    #[test]
    fn only_the_commands_own_events_count_as_its_earlier_execution() {
        let mine = Uuid::new_v4();
        let other = Uuid::new_v4().to_string();
        let events = [
            event(1, &other),
            event(2, &mine.to_string()),
            event(3, &mine.to_string()),
            event(4, &other),
        ];
        assert_eq!(
            appended_by(&events, mine),
            vec![(2, "Event2".to_owned()), (3, "Event3".to_owned())]
        );
        assert!(appended_by(&events, Uuid::new_v4()).is_empty());
    }
}
