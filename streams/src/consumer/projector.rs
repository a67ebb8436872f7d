//! One consumer's loop: consume, decode, dedup, apply, checkpoint, in one transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use super::lag::{HighWatermark, Waiting};
use super::replay::locked_positions;
use super::schema::{begin_in_schema, record_batch};
use super::*;
use crate::{DecodeError, DecodedEvent, EventDecoder, EventMeta, KafkaConfig, RegistryConfig};

/// Why a projector stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("decoder: {0}")]
    Decoder(#[from] DecodeError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("projection: {0}")]
    Projection(#[from] ProjectionError),
    #[error("topics: {0}")]
    Topics(#[from] crate::admin::AdminError),
}

/// The topic (without the configured prefix) that receives a copy of every dead-lettered
/// record, with the projection and the error in `dead-letter-*` headers.
pub const DEAD_LETTER_TOPIC: &str = "dead-letters";

/// Closes a consumer (leaving its group) without waiting forever: librdkafka's close blocks
/// until the broker answers, and a broker that is gone (stopped by the same Ctrl-C) never does.
/// The checkpoint is in PostgreSQL, so nothing depends on the close succeeding.
async fn leave_group(consumer: StreamConsumer<WatermarkContext>) {
    let (done, closed) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        drop(consumer);
        let _ = done.send(());
    });
    if tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .is_err()
    {
        tracing::warn!("the broker did not confirm that the consumer left its group");
    }
}

/// One projection's consumer loop.
pub struct Projector {
    pub(super) projection: Arc<dyn Projection>,
    pub(super) pool: PgPool,
    pub(super) consumer: StreamConsumer<WatermarkContext>,
    pub(super) decoder: EventDecoder,
    /// The dead-letter topic's producer, made on the first dead letter: an idle rdkafka
    /// producer's polling thread costs CPU, and most projectors never dead-letter anything.
    pub(super) producer: tokio::sync::OnceCell<FutureProducer>,
    pub(super) producer_config: rdkafka::ClientConfig,
    pub(super) dead_letter_topic: String,
    pub(super) config: ProjectorConfig,
    pub(super) schema: &'static str,
    /// Set when a batch is applied; read by the lag measurement.
    pub(super) applied: std::sync::atomic::AtomicBool,
    /// The last lag measurement that found nothing to apply, and when it was recorded.
    pub(super) caught_up: std::sync::Mutex<Option<(Vec<HighWatermark>, Instant)>>,
    /// Records received and not applied yet (for the age of the oldest waiting record).
    pub(super) waiting: Waiting,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("projection", &self.projection.name())
            .finish_non_exhaustive()
    }
}

/// Records and their decoding (a poison record decodes to its error).
type DecodedBatch<'c> = (Vec<BorrowedMessage<'c>>, Vec<Result<DecodedEvent, String>>);

enum Verdict {
    Apply,
    Duplicate,
    Gap,
}

/// Who an event is: from the decoded event, or from the headers of a record whose value does not
/// decode.
pub(super) type Identity = (String, String, i64);

fn identity(
    message: &BorrowedMessage<'_>,
    event: &Result<DecodedEvent, String>,
) -> Option<Identity> {
    let meta = match event {
        Ok(event) => std::borrow::Cow::Borrowed(&event.meta),
        Err(_) => std::borrow::Cow::Owned(EventMeta::from_headers(message.headers()).ok()?),
    };
    Some((
        meta.aggregate_type.clone(),
        meta.aggregate_id.clone(),
        i64::try_from(meta.sequence).unwrap_or(i64::MAX),
    ))
}

/// A record to dead-letter in the batch's transaction.
pub(super) struct DeadLetter<'m> {
    pub(super) message: &'m BorrowedMessage<'m>,
    pub(super) identity: Option<Identity>,
    pub(super) event_type: Option<String>,
    pub(super) error: String,
}

impl Projector {
    /// Creates the read model's tables and subscribes its consumer group.
    pub async fn new(
        projection: Arc<dyn Projection>,
        pool: PgPool,
        kafka: &KafkaConfig,
        registry: &RegistryConfig,
        config: ProjectorConfig,
    ) -> Result<Self, ProjectorError> {
        let schema = projection.name();
        ensure_schema(projection.as_ref(), &pool).await?;

        let topics = kafka.topics();
        let topic_names: Vec<String> = projection
            .aggregate_types()
            .iter()
            .map(|a| {
                topics
                    .for_aggregate(a)
                    .ok_or_else(|| ProjectorError::Config(format!("no topic for aggregate {a}")))
            })
            .collect::<Result<_, _>>()?;
        let consumer: StreamConsumer<WatermarkContext> = kafka
            .client_config()
            .set("statistics.interval.ms", "1000")
            .set(
                "fetch.min.bytes",
                config.projector_fetch_min_bytes.to_string(),
            )
            .set(
                "group.id",
                format!("{}{}", config.projector_group_prefix, projection.name()),
            )
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            .set(
                "fetch.wait.max.ms",
                kafka.kafka_fetch_wait_max_ms.to_string(),
            )
            .set("session.timeout.ms", "10000")
            // A third of the session timeout, as Kafka advises: an idle group costs the broker
            // one heartbeat every 3 s per member.
            .set("heartbeat.interval.ms", "3000")
            .create_with_context(WatermarkContext::default())?;
        let refs: Vec<&str> = topic_names.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;
        let dead_letter_topic = topics.named(DEAD_LETTER_TOPIC);
        crate::admin::ensure_topics(kafka, std::slice::from_ref(&dead_letter_topic)).await?;
        let producer_config = crate::relay::producer_config(kafka);
        Ok(Self {
            projection,
            pool,
            consumer,
            decoder: EventDecoder::new(registry)?,
            producer: tokio::sync::OnceCell::new(),
            producer_config,
            applied: std::sync::atomic::AtomicBool::new(false),
            caught_up: std::sync::Mutex::new(None),
            dead_letter_topic,
            config,
            schema,
            waiting: Waiting::default(),
        })
    }

    /// Consumes until `shutdown`; the batch in flight is committed before returning.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
    ) -> Result<(), ProjectorError> {
        tracing::info!(projection = self.projection.name(), "projector started");
        // Ends the side work when the consumer loop ends, without cancelling the caller's token
        // (other tasks of the process may share it).
        let done = shutdown.child_token();
        let consume = async {
            // While one batch is applied in PostgreSQL, the next is fetched and decoded.
            let mut pending = self.next_batch(&shutdown).await?;
            while let Some((batch, decoded)) = pending {
                let apply = async {
                    self.process(&batch, &decoded).await?;
                    self.applied
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    for message in &batch {
                        // A rebalance may have taken the partition away meanwhile: the offset
                        // is then not ours to store. Nothing depends on it (the checkpoint and
                        // the dedup are in PostgreSQL); the new owner skips what is applied.
                        if let Err(e) = self.consumer.store_offset_from_message(message) {
                            tracing::debug!(error = %e, partition = message.partition(), "offset not stored");
                        }
                    }
                    Ok::<(), ProjectorError>(())
                };
                let (applied, next) = tokio::join!(apply, self.next_batch(&shutdown));
                applied?;
                pending = next?;
            }
            Ok::<(), ProjectorError>(())
        };
        let side_work = async {
            // Lag is measured and re-drives are served beside the consumer loop.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = done.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if self.lag_may_have_changed() {
                    if let Err(e) = self.measure_lag().await {
                        tracing::warn!(error = %e, "could not measure lag");
                    }
                }
                if let Err(e) = self.redrive_requested().await {
                    tracing::warn!(error = %e, "re-drive failed; will retry");
                }
            }
        };
        let (consumed, ()) = tokio::join!(
            async {
                let result = consume.await;
                // The consumer loop ending (error or shutdown) ends the side work too.
                done.cancel();
                result
            },
            side_work
        );
        consumed?;
        // Hand the final positions to the group before leaving it.
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "nothing to commit on shutdown");
        }
        let name = self.projection.name();
        leave_group(self.consumer).await;
        tracing::info!(projection = name, "projector stopped");
        Ok(())
    }

    /// The next batch of records, decoded: waits for the first, then takes what is already
    /// there, up to the batch size. `None` once shutdown is requested.
    async fn next_batch(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<DecodedBatch<'_>>, ProjectorError> {
        let first = loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                message = self.consumer.recv() => match message {
                    Ok(message) => break message,
                    Err(e) if broker_out_of_reach(&e) => {
                        tracing::warn!(error = %e, "the broker is out of reach; the consumer reconnects");
                    }
                    Err(e) => return Err(e.into()),
                },
            }
        };
        let mut batch = vec![first];
        while batch.len() < self.config.projector_batch_size {
            match tokio::time::timeout(Duration::from_millis(2), self.consumer.recv()).await {
                Ok(Ok(message)) => batch.push(message),
                // The batch in hand is applied; the next wait reports it.
                Ok(Err(e)) if broker_out_of_reach(&e) => break,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
        let mut decoded = Vec::with_capacity(batch.len());
        for message in &batch {
            decoded.push(self.decode_with_retry(message).await);
        }
        self.waiting.note(&batch, &decoded);
        Ok(Some((batch, decoded)))
    }

    /// Applies a batch through [`apply_isolating`]: retried whole, then event by event, an event
    /// that keeps failing dead-lettered.
    async fn process(
        &self,
        batch: &[BorrowedMessage<'_>],
        decoded: &[Result<DecodedEvent, String>],
    ) -> Result<(), ProjectorError> {
        apply_isolating(
            batch.len(),
            self.config.projector_max_attempts,
            |_| false,
            |range, dead_letter| {
                self.apply_batch(&batch[range.clone()], &decoded[range], dead_letter)
            },
        )
        .await?;
        Ok(())
    }

    /// Decodes a record; retries while the registry is unreachable, since those bytes will decode
    /// once it is back. Any other failure is a poison record.
    async fn decode_with_retry(
        &self,
        message: &BorrowedMessage<'_>,
    ) -> Result<DecodedEvent, String> {
        self.decoder
            .decode_waiting(message, None, |e| {
                tracing::warn!(error = %e, "registry unavailable; retrying decode");
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// One transaction: dedup, apply, dead-letter poison records, checkpoint, record sequences.
    /// With `dead_letter` set, the (single) record is dead-lettered with that error instead.
    async fn apply_batch(
        &self,
        batch: &[BorrowedMessage<'_>],
        decoded: &[Result<DecodedEvent, String>],
        dead_letter: Option<String>,
    ) -> Result<(), ProjectionError> {
        let schema = self.schema;
        let mut tx = begin_in_schema(&self.pool, schema).await?;
        let identities: Vec<Option<Identity>> = batch
            .iter()
            .zip(decoded)
            .map(|(message, event)| identity(message, event))
            .collect();
        let last = self.load_sequences(&mut tx, &identities).await?;
        let mut sorted = Sorted::of(
            schema,
            batch,
            decoded,
            identities,
            last,
            dead_letter.as_ref(),
        );
        // A span per applied event (when exporting), under the span of the command that
        // appended it, open until the batch commits (a failed batch ends them as it retries).
        let spans: Vec<tracing::Span> = sorted
            .deliveries
            .iter()
            .map(|event| projection_span(schema, &event.meta))
            .collect();
        self.projection
            .apply_batch(&mut tx, &sorted.deliveries)
            .await?;
        for letter in &sorted.dead {
            self.record_dead_letter(&mut tx, letter).await?;
        }
        // The copy on the dead-letter topic is acknowledged before the transaction commits: a
        // failure here retries the batch, so the topic misses nothing the table has.
        for letter in &sorted.dead {
            self.publish_dead_letter(letter).await?;
        }
        // A plain loop, not a lazy closure over the maps: the future stays `Send` for whatever
        // lifetime the spawner picks.
        let mut checkpoints = Vec::with_capacity(sorted.checkpoints.len());
        for (&(topic, partition), &next) in &sorted.checkpoints {
            let recorded = sorted.recorded.get(&(topic, partition)).copied();
            checkpoints.push((topic, partition, next, recorded));
        }
        // Read-your-writes waiters in the API wake on the signal that the aggregates moved
        // (`applied.<read model>`, delivered on commit) instead of polling `applied`. A NOTIFY
        // serializes the commits of the transactions that notify (PostgreSQL takes one
        // database-wide lock on its notification queue at commit): acceptable for a
        // projector's few batch commits a second, never for the command side.
        let moved: Vec<String> = std::mem::take(&mut sorted.moved).into_iter().collect();
        record_batch(&mut tx, schema, &sorted.last, &checkpoints, &moved).await?;
        tx.commit().await?;
        drop(spans);
        sorted.record_metrics(schema);
        Ok(())
    }

    async fn load_sequences(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        identities: &[Option<Identity>],
    ) -> Result<HashMap<(String, String), i64>, ProjectionError> {
        let keys = identities
            .iter()
            .flatten()
            .map(|(t, i, _)| (t.as_str(), i.as_str()));
        let rows = locked_positions(tx, self.schema, keys).await?;
        Ok(rows.into_iter().map(|(t, i, s)| ((t, i), s)).collect())
    }
}

/// A batch sorted by the runtime's dedup: what to apply, what to dead-letter, and where each
/// aggregate, partition and read model then stands.
struct Sorted<'b> {
    deliveries: Vec<FirstDelivery<'b>>,
    dead: Vec<DeadLetter<'b>>,
    /// The last applied (or dead-lettered) sequence per aggregate.
    last: HashMap<(String, String), i64>,
    /// The next offset per partition.
    checkpoints: HashMap<(&'b str, i32), i64>,
    /// The store's commit time of the last applied event per partition.
    recorded: HashMap<(&'b str, i32), &'b str>,
    recorded_ats: Vec<&'b str>,
    /// `<aggregate_type>:<aggregate_id>` of each aggregate this batch moves forward.
    moved: HashSet<String>,
    applied: u64,
    duplicates: u64,
}

impl<'b> Sorted<'b> {
    /// Each record's verdict against `last` (the applied sequences before the batch): the next
    /// one of its aggregate is applied (or dead-lettered when it cannot be decoded, or when
    /// `dead_letter` says so), an earlier one is a duplicate, a later one waits for the
    /// redelivery of the missing ones.
    fn of(
        schema: &'static str,
        batch: &'b [BorrowedMessage<'b>],
        decoded: &'b [Result<DecodedEvent, String>],
        identities: Vec<Option<Identity>>,
        last: HashMap<(String, String), i64>,
        dead_letter: Option<&String>,
    ) -> Self {
        let mut sorted = Sorted {
            deliveries: Vec::with_capacity(batch.len()),
            dead: Vec::new(),
            last,
            checkpoints: HashMap::new(),
            recorded: HashMap::new(),
            recorded_ats: Vec::with_capacity(batch.len()),
            moved: HashSet::new(),
            applied: 0,
            duplicates: 0,
        };
        for ((message, event), who) in batch.iter().zip(decoded).zip(identities) {
            sorted
                .checkpoints
                .insert((message.topic(), message.partition()), message.offset() + 1);
            match sorted.verdict(who.as_ref()) {
                Verdict::Duplicate => {
                    sorted.duplicates += 1;
                    continue;
                }
                Verdict::Gap => {
                    // The relay re-sends an aggregate's events from the first unacknowledged
                    // one, so the missing events and this one arrive again, in order.
                    metrics::counter!("projector_sequence_gaps_total", "projection" => schema)
                        .increment(1);
                    tracing::warn!(?who, "sequence gap; waiting for redelivery");
                    continue;
                }
                Verdict::Apply => {}
            }
            if let Some((aggregate_type, aggregate_id, sequence)) = &who {
                // Applied or dead-lettered, this event is done with: the aggregate's next
                // events go on (a re-drive applies a dead letter later, once).
                sorted
                    .last
                    .insert((aggregate_type.clone(), aggregate_id.clone()), *sequence);
                sorted
                    .moved
                    .insert(format!("{aggregate_type}:{aggregate_id}"));
            }
            let error = match (event, dead_letter) {
                (Err(e), _) | (Ok(_), Some(e)) => Some(e.clone()),
                (Ok(_), None) => None,
            };
            if let Some(error) = error {
                sorted.dead.push(DeadLetter {
                    message,
                    identity: who,
                    event_type: event.as_ref().ok().map(|e| e.meta.event_type.clone()),
                    error,
                });
                continue;
            }
            let Ok(event) = event else { continue };
            sorted.deliveries.push(FirstDelivery { event });
            sorted.applied += 1;
            sorted.recorded_ats.push(event.meta.recorded_at.as_str());
            sorted.recorded.insert(
                (message.topic(), message.partition()),
                event.meta.recorded_at.as_str(),
            );
        }
        sorted
    }

    fn verdict(&self, who: Option<&Identity>) -> Verdict {
        match who {
            Some((aggregate_type, aggregate_id, sequence)) => {
                let current = self
                    .last
                    .get(&(aggregate_type.clone(), aggregate_id.clone()))
                    .copied()
                    .unwrap_or(0);
                match *sequence {
                    s if s <= current => Verdict::Duplicate,
                    s if s == current + 1 => Verdict::Apply,
                    _ => Verdict::Gap,
                }
            }
            // Not ours to order (no readable headers): dead-lettered.
            None => Verdict::Apply,
        }
    }

    /// Applied and duplicate counts, and the end-to-end delay of each applied event (recorded
    /// in the store → applied here).
    fn record_metrics(&self, schema: &'static str) {
        metrics::counter!("projector_applied_total", "projection" => schema)
            .increment(self.applied);
        metrics::counter!("projector_duplicates_total", "projection" => schema)
            .increment(self.duplicates);
        let now = chrono::Utc::now();
        let delay = metrics::histogram!("projector_event_delay_seconds", "projection" => schema);
        for recorded in &self.recorded_ats {
            if let Ok(recorded) = chrono::DateTime::parse_from_rfc3339(recorded) {
                delay.record(
                    now.signed_duration_since(recorded)
                        .num_microseconds()
                        .unwrap_or(0) as f64
                        / 1e6,
                );
            }
        }
    }
}

/// The span of applying one event to read model (or process manager) `name`; none when the
/// process exports no traces.
fn projection_span(name: &str, meta: &EventMeta) -> tracing::Span {
    if !commands::trace::exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "project",
        otel.name = %format_args!("project {name} {}", meta.event_type),
        otel.kind = "consumer",
        read_model = name,
        event_id = %meta.event_id,
        aggregate_id = %meta.aggregate_id,
        sequence = meta.sequence,
    );
    if let Some(parent) = commands::TraceParent::parse(&meta.traceparent) {
        parent.adopt(&span);
    }
    span
}

/// An error event of the consumer that only reports the broker out of reach: librdkafka keeps
/// reconnecting by itself, so the consumer waits instead of ending (a broker restart then costs
/// a pause, not a process).
fn broker_out_of_reach(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error,
        rdkafka::error::KafkaError::MessageConsumption(
            Code::AllBrokersDown
                | Code::BrokerTransportFailure
                | Code::BrokerNotAvailable
                | Code::NetworkException
                | Code::RequestTimedOut
                | Code::OperationTimedOut
                | Code::CoordinatorNotAvailable
                | Code::NotCoordinator
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
        )
    )
}
