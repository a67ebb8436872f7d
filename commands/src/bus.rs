//! The command bus of one aggregate type: `CqrsFramework` plus metadata, retries and the
//! committed position.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, DomainEvent, EventEnvelope, Query};
use rand::Rng;
use tracing::Instrument;
use uuid::Uuid;

use crate::repeat::{repeating, ExecutedBefore};
use crate::snapshots::SnapshotStore;
use crate::store::EventStoreDb;
use crate::trace::TraceParent;

/// Metadata keys every event carries (in the `metadata` column and in Kafka headers).
pub mod meta {
    pub const CORRELATION_ID: &str = "correlation_id";
    pub const CAUSATION_ID: &str = "causation_id";
    pub const ACTOR: &str = "actor";
    pub const COMMAND_ID: &str = "command_id";
    pub const OCCURRED_AT: &str = "occurred_at";
    /// W3C trace context of the command span that appended the event (see [`crate::trace`]).
    pub const TRACEPARENT: &str = crate::trace::TRACEPARENT;
}

/// Who asks, and why: carried into the metadata of every event the command produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    /// Identifies the command; the idempotency key of process managers derives from it.
    pub command_id: Uuid,
    /// Shared by everything one business transaction causes (one placed order and its effects):
    /// the id of the command that started it, or a caller's own id (`x-correlation-id`, any
    /// printable text; see the API).
    pub correlation_id: String,
    /// The command or event that caused this command.
    pub causation_id: Uuid,
    /// Who issued it: `customer:<id>`, `store:<id>`, `system:<process>`.
    pub actor: String,
    /// The same command may arrive again (a process manager reacting to a redelivered event, a
    /// client retrying with an idempotency key): the bus then answers a repeat with what the
    /// first execution committed instead of running it again.
    pub may_repeat: bool,
    /// The trace this command continues (a caller's `traceparent`, the order's own trace, the
    /// event a process manager reacts to); `None`: the current span's.
    pub trace_parent: Option<TraceParent>,
}

impl CommandContext {
    /// A context for a command that starts a new business transaction.
    pub fn new(actor: impl Into<String>) -> Self {
        let command_id = Uuid::new_v4();
        Self {
            command_id,
            correlation_id: command_id.to_string(),
            causation_id: command_id,
            actor: actor.into(),
            may_repeat: false,
            trace_parent: None,
        }
    }

    /// A command whose id is derived from what caused it (`key`, e.g. the causing event id and
    /// the step), so that issuing it again is recognised as a repeat.
    pub fn repeatable(actor: impl Into<String>, key: &str) -> Self {
        let command_id = Uuid::new_v5(&COMMAND_NAMESPACE, key.as_bytes());
        Self {
            command_id,
            correlation_id: command_id.to_string(),
            causation_id: command_id,
            actor: actor.into(),
            may_repeat: true,
            trace_parent: None,
        }
    }

    /// Records what caused this command (an event id).
    #[must_use]
    pub fn caused_by(mut self, causation_id: Uuid) -> Self {
        self.causation_id = causation_id;
        self
    }

    /// Continues an existing business transaction (for example from an HTTP correlation header).
    #[must_use]
    pub fn with_correlation(mut self, correlation_id: impl fmt::Display) -> Self {
        self.correlation_id = correlation_id.to_string();
        self
    }

    /// Continues the trace of `parent` (when there is one).
    #[must_use]
    pub fn continuing(mut self, parent: Option<TraceParent>) -> Self {
        if parent.is_some() {
            self.trace_parent = parent;
        }
        self
    }

    /// The metadata of the events this command appends, `span` being the command's span: its
    /// trace context is stored (without an exporter there is none, and the trace this command
    /// continues is passed on as it came).
    fn metadata(&self, span: &tracing::Span) -> HashMap<String, String> {
        let mut metadata = HashMap::from([
            (meta::COMMAND_ID.to_owned(), self.command_id.to_string()),
            (meta::CORRELATION_ID.to_owned(), self.correlation_id.clone()),
            (meta::CAUSATION_ID.to_owned(), self.causation_id.to_string()),
            (meta::ACTOR.to_owned(), self.actor.clone()),
            (
                meta::OCCURRED_AT.to_owned(),
                Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        ]);
        if let Some(trace) = TraceParent::of(span).or_else(|| self.trace_parent.clone()) {
            metadata.insert(meta::TRACEPARENT.to_owned(), trace.to_string());
        }
        metadata
    }
}

/// Namespace of command ids derived from their cause.
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x6261_636b_626f_6e65_2d63_6d64_2d69_6473);

/// What a command committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub aggregate_id: String,
    /// Sequence of the last event the command appended (the read-your-writes position), or the
    /// aggregate's current sequence if the command appended nothing.
    pub last_sequence: u64,
    /// Event types appended, in order.
    pub event_types: Vec<String>,
    /// True when this was a repeat of a command already committed: nothing new was appended,
    /// and the fields above describe the first execution.
    pub repeated: bool,
}

/// Why a command was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    /// The command broke a business rule.
    #[error(transparent)]
    Rejected(E),
    /// Other writers kept changing the aggregate; the caller may retry.
    #[error("the aggregate kept changing under {attempts} attempts; retry the request")]
    Contended { attempts: u32 },
    /// The store failed (connection, query, an event that does not deserialize).
    #[error("event store failure: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// The store's failure inside a framework error, with its source kept (loading an aggregate
/// never breaks a business rule or conflicts, so those two only travel as their message).
fn store_failure<E: std::error::Error>(
    error: AggregateError<E>,
) -> Box<dyn std::error::Error + Send + Sync + 'static> {
    match error {
        AggregateError::DatabaseConnectionError(e)
        | AggregateError::DeserializationError(e)
        | AggregateError::UnexpectedError(e) => e,
        other => other.to_string().into(),
    }
}

/// Bounded retries of optimistic-concurrency conflicts, with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 12,
            base_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(200),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let micros = u64::try_from(exp.as_micros()).unwrap_or(u64::MAX).max(1);
        Duration::from_micros(rand::rng().random_range(0..=micros))
    }
}

tokio::task_local! {
    /// The events the current command committed, handed over by [`CaptureCommitted`].
    static COMMITTED: RefCell<Vec<(usize, String)>>;
}

/// Hands the committed envelopes of the running command back to [`CommandBus::execute`].
/// `cqrs-es` dispatches queries inline, in the task that executes the command, right after
/// the commit; this is only a return channel, never a path to read models.
struct CaptureCommitted;

#[async_trait]
impl<A: Aggregate> Query<A> for CaptureCommitted {
    async fn dispatch(&self, _aggregate_id: &str, events: &[EventEnvelope<A>]) {
        // Outside `execute` there is no slot to fill, and nothing to report.
        let _ = COMMITTED.try_with(|slot| {
            slot.borrow_mut()
                .extend(events.iter().map(|e| (e.sequence, e.payload.event_type())));
        });
    }
}

type Store<A> = SnapshotStore<A>;
type Framework<A> = CqrsFramework<A, Store<A>>;

/// The postgres-es event store of aggregate type `A`, reading old shapes through the upcasters,
/// with snapshots where [`crate::snapshots`] keeps them.
fn event_store<A: Aggregate>(store: &EventStoreDb) -> Store<A> {
    SnapshotStore::new(store.pool())
}

/// Executes commands of aggregate type `A` against the event store.
pub struct CommandBus<A: Aggregate> {
    framework: Framework<A>,
    store: EventStoreDb,
    retry: RetryPolicy,
}

impl<A: Aggregate> fmt::Debug for CommandBus<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBus")
            .field("aggregate_type", &A::TYPE)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<A> CommandBus<A>
where
    A: Aggregate + 'static,
    A::Command: Clone,
{
    pub fn new(store: EventStoreDb, services: A::Services) -> Self {
        let framework = CqrsFramework::new(
            event_store(&store),
            vec![Box::new(CaptureCommitted)],
            services,
        );
        Self {
            framework,
            store,
            retry: RetryPolicy::default(),
        }
    }

    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Runs `command` against aggregate `aggregate_id`, retrying conflicts, in a span of its
    /// own whose trace context every appended event records (see [`crate::trace`]).
    pub async fn execute(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: &CommandContext,
    ) -> Result<Committed, CommandError<A::Error>> {
        let span = tracing::info_span!(
            "command",
            otel.name = %format_args!("command {}", A::TYPE),
            aggregate_type = A::TYPE,
            aggregate_id,
            correlation_id = %context.correlation_id,
            actor = %context.actor,
            events = tracing::field::Empty,
        );
        if let Some(parent) = &context.trace_parent {
            parent.adopt(&span);
        }
        let outcome = self
            .execute_in(aggregate_id, command, context, &span)
            .instrument(span.clone())
            .await;
        if let Ok(committed) = &outcome {
            span.record("events", committed.event_types.join(",").as_str());
        }
        outcome
    }

    async fn execute_in(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: &CommandContext,
        span: &tracing::Span,
    ) -> Result<Committed, CommandError<A::Error>> {
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let execution = COMMITTED.scope(RefCell::new(Vec::new()), async {
                let outcome = self
                    .framework
                    .execute_with_metadata(aggregate_id, command.clone(), context.metadata(span))
                    .await;
                (outcome, COMMITTED.with(|c| c.take()))
            });
            // A repeatable command's earlier execution is found in the load (see `repeat`).
            let result = if context.may_repeat {
                repeating(context.command_id, execution).await
            } else {
                execution.await
            };
            if let (Err(AggregateError::UnexpectedError(e)), _) = &result {
                if let Some(before) = e.downcast_ref::<ExecutedBefore>() {
                    return Ok(self.repeated(aggregate_id, &before.events));
                }
            }
            match result {
                (Ok(()), events) => {
                    metrics::histogram!("command_duration_seconds", "aggregate_type" => A::TYPE)
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("commands_total", "aggregate_type" => A::TYPE, "outcome" => "committed")
                        .increment(1);
                    return self.committed(aggregate_id, events).await;
                }
                (Err(AggregateError::AggregateConflict), _)
                    if attempt < self.retry.max_attempts =>
                {
                    metrics::counter!("command_conflicts_total", "aggregate_type" => A::TYPE)
                        .increment(1);
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                }
                (Err(AggregateError::AggregateConflict), _) => {
                    metrics::counter!("commands_total", "aggregate_type" => A::TYPE, "outcome" => "contended")
                        .increment(1);
                    return Err(CommandError::Contended { attempts: attempt });
                }
                (Err(AggregateError::UserError(e)), _) => {
                    // A repeat that lost the race to its twin sees the state the twin made.
                    if let Some(first) = self.earlier_execution(aggregate_id, context).await? {
                        return Ok(first);
                    }
                    metrics::counter!("commands_total", "aggregate_type" => A::TYPE, "outcome" => "rejected")
                        .increment(1);
                    return Err(CommandError::Rejected(e));
                }
                (
                    Err(
                        AggregateError::DatabaseConnectionError(e)
                        | AggregateError::DeserializationError(e)
                        | AggregateError::UnexpectedError(e),
                    ),
                    _,
                ) => {
                    metrics::counter!("commands_total", "aggregate_type" => A::TYPE, "outcome" => "failed")
                        .increment(1);
                    return Err(CommandError::Store(e));
                }
            }
        }
    }

    async fn committed(
        &self,
        aggregate_id: &str,
        events: Vec<(usize, String)>,
    ) -> Result<Committed, CommandError<A::Error>> {
        let last_sequence = match events.last() {
            Some((sequence, _)) => *sequence as u64,
            None => self
                .current_sequence(aggregate_id)
                .await
                .map_err(|e| CommandError::Store(e.into()))?,
        };
        Ok(Committed {
            aggregate_id: aggregate_id.to_owned(),
            last_sequence,
            event_types: events.into_iter().map(|(_, t)| t).collect(),
            repeated: false,
        })
    }

    /// What an earlier execution of the same repeatable command committed, if there was one,
    /// asked of the store itself: after a refusal, a twin may have committed since the load.
    async fn earlier_execution(
        &self,
        aggregate_id: &str,
        context: &CommandContext,
    ) -> Result<Option<Committed>, CommandError<A::Error>> {
        if !context.may_repeat {
            return Ok(None);
        }
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT sequence, event_type FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND metadata->>'command_id' = $3 \
             ORDER BY sequence",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(context.command_id.to_string())
        .fetch_all(self.store.pool())
        .await
        .map_err(|e| CommandError::Store(e.into()))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let events: Vec<(usize, String)> = rows
            .into_iter()
            .map(|(sequence, event_type)| {
                (usize::try_from(sequence).unwrap_or_default(), event_type)
            })
            .collect();
        Ok(Some(self.repeated(aggregate_id, &events)))
    }

    /// What a repeat of a command answers: the events its earlier execution appended.
    fn repeated(&self, aggregate_id: &str, events: &[(usize, String)]) -> Committed {
        metrics::counter!("commands_total", "aggregate_type" => A::TYPE, "outcome" => "repeated")
            .increment(1);
        Committed {
            aggregate_id: aggregate_id.to_owned(),
            last_sequence: events.last().map_or(0, |(sequence, _)| *sequence as u64),
            event_types: events.iter().map(|(_, t)| t.clone()).collect(),
            repeated: true,
        }
    }

    /// Reads an aggregate's current state (upcast and applied as for a command) through `read`.
    /// For decisions at the boundary that need another aggregate's state, such as whether a
    /// customer's subscription gives free delivery.
    pub async fn state<R>(
        &self,
        aggregate_id: &str,
        read: impl FnOnce(&A) -> R,
    ) -> Result<R, CommandError<A::Error>> {
        use cqrs_es::{AggregateContext, EventStore};
        let mut context = event_store::<A>(&self.store)
            .load_aggregate(aggregate_id)
            .await
            .map_err(|e| CommandError::Store(store_failure(e)))?;
        Ok(read(context.aggregate()))
    }

    /// The sequence of the last stored event of an aggregate (0 if it has none).
    pub async fn current_sequence(&self, aggregate_id: &str) -> Result<u64, sqlx::Error> {
        let sequence = crate::log::last_sequence(self.store.pool(), A::TYPE, aggregate_id).await?;
        Ok(sequence.map_or(0, |s| u64::try_from(s).unwrap_or(0)))
    }
}
