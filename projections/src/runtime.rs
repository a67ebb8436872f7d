//! The projector runtime: consume, decode, dedup, apply, checkpoint — in one transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use serde::Deserialize;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use streams::{DecodeError, DecodedEvent, EventDecoder, KafkaConfig, RegistryConfig};

/// An event the runtime has proven to be the next unapplied event of its aggregate, inside the
/// transaction that will record it as applied. Handlers receive nothing else, so every handler
/// is replay-safe by construction: it cannot see a redelivery.
#[derive(Debug, Clone, Copy)]
pub struct FirstDelivery<'e> {
    event: &'e DecodedEvent,
}

impl std::ops::Deref for FirstDelivery<'_> {
    type Target = DecodedEvent;
    fn deref(&self) -> &DecodedEvent {
        self.event
    }
}

/// Why a handler could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event: {0}")]
    Event(String),
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

/// Projector settings.
#[derive(Debug, Clone, Deserialize)]
pub struct ProjectorConfig {
    /// `PROJECTOR_GROUP_PREFIX`: consumer groups are `<prefix><projection>` (default `backbone-`).
    #[serde(default = "default_group_prefix")]
    pub projector_group_prefix: String,
    /// `PROJECTOR_BATCH_SIZE`: records applied per transaction at most (default 2000).
    #[serde(default = "default_batch")]
    pub projector_batch_size: usize,
    /// `PROJECTOR_MAX_ATTEMPTS`: attempts before an event that fails goes to the dead letters
    /// (default 3).
    #[serde(default = "default_attempts")]
    pub projector_max_attempts: u32,
}

fn default_group_prefix() -> String {
    "backbone-".to_owned()
}
const fn default_batch() -> usize {
    2000
}
const fn default_attempts() -> u32 {
    3
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            projector_group_prefix: default_group_prefix(),
            projector_batch_size: default_batch(),
            projector_max_attempts: default_attempts(),
        }
    }
}

impl ProjectorConfig {
    pub fn from_env() -> Result<Self, envy::Error> {
        envy::from_env()
    }
}

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
}

/// Creates a projection's tables and the runtime's bookkeeping (idempotent). Readers of the read
/// model (the API) call it too, so a query before the first projector start is a 404, not an
/// error.
pub async fn ensure_schema(projection: &dyn Projection, pool: &PgPool) -> Result<(), sqlx::Error> {
    let schema = projection.name();
    let mut tx = pool.begin().await?;
    // Processes starting at once must not race on CREATE.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    let runtime_sql = include_str!("../sql/runtime.sql").replace("{schema}", schema);
    sqlx::raw_sql(&runtime_sql).execute(&mut *tx).await?;
    sqlx::raw_sql(projection.schema_sql())
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Closes a consumer (leaving its group) without waiting forever: librdkafka's close blocks
/// until the broker answers, and a broker that is gone (stopped by the same Ctrl-C) never does.
/// The checkpoint is in PostgreSQL, so nothing depends on the close succeeding.
async fn leave_group(consumer: StreamConsumer) {
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
    projection: Arc<dyn Projection>,
    pool: PgPool,
    consumer: StreamConsumer,
    decoder: EventDecoder,
    config: ProjectorConfig,
    schema: &'static str,
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
        let consumer: StreamConsumer = kafka
            .client_config()
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
            .set("heartbeat.interval.ms", "1000")
            .create()?;
        let refs: Vec<&str> = topic_names.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;
        Ok(Self {
            projection,
            pool,
            consumer,
            decoder: EventDecoder::new(registry)?,
            config,
            schema,
        })
    }

    /// Consumes until `shutdown`; the batch in flight is committed before returning.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
    ) -> Result<(), ProjectorError> {
        tracing::info!(projection = self.projection.name(), "projector started");
        // While one batch is applied in PostgreSQL, the next is fetched and decoded.
        let mut pending = self.next_batch(&shutdown).await?;
        while let Some((batch, decoded)) = pending {
            let apply = async {
                self.process(&batch, &decoded).await?;
                for message in &batch {
                    self.consumer.store_offset_from_message(message)?;
                }
                Ok::<(), ProjectorError>(())
            };
            let (applied, next) = tokio::join!(apply, self.next_batch(&shutdown));
            applied?;
            pending = next?;
        }
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
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            message = self.consumer.recv() => message?,
        };
        let mut batch = vec![first];
        while batch.len() < self.config.projector_batch_size {
            match tokio::time::timeout(Duration::from_millis(2), self.consumer.recv()).await {
                Ok(Ok(message)) => batch.push(message),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
        let mut decoded = Vec::with_capacity(batch.len());
        for message in &batch {
            decoded.push(self.decode_with_retry(message).await);
        }
        Ok(Some((batch, decoded)))
    }

    async fn process(
        &self,
        batch: &[BorrowedMessage<'_>],
        decoded: &[Result<DecodedEvent, String>],
    ) -> Result<(), ProjectorError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.apply_batch(batch, decoded, None).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < self.config.projector_max_attempts => {
                    tracing::warn!(error = %e, attempt, "batch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "batch failed; isolating the failing events");
                    return self.apply_one_by_one(batch, decoded).await;
                }
            }
        }
    }

    /// Decodes a record; retries while the registry is unreachable, since those bytes will decode
    /// once it is back. Any other failure is a poison record.
    async fn decode_with_retry(
        &self,
        message: &BorrowedMessage<'_>,
    ) -> Result<DecodedEvent, String> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.decoder.decode(message).await {
                Ok(event) => return Ok(event),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "registry unavailable; retrying decode");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn apply_one_by_one(
        &self,
        batch: &[BorrowedMessage<'_>],
        decoded: &[Result<DecodedEvent, String>],
    ) -> Result<(), ProjectorError> {
        for index in 0..batch.len() {
            let mut last_error = None;
            for attempt in 1..=self.config.projector_max_attempts {
                match self
                    .apply_batch(&batch[index..=index], &decoded[index..=index], None)
                    .await
                {
                    Ok(()) => {
                        last_error = None;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "event failed");
                        last_error = Some(e.to_string());
                    }
                }
            }
            if let Some(error) = last_error {
                self.apply_batch(&batch[index..=index], &decoded[index..=index], Some(error))
                    .await?;
            }
        }
        Ok(())
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
        let mut tx = self.pool.begin().await?;
        let mut last: HashMap<(String, String), i64> =
            self.load_sequences(&mut tx, decoded).await?;
        let mut checkpoints: HashMap<(&str, i32), i64> = HashMap::new();
        let (mut applied, mut duplicates) = (0u64, 0u64);
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut newest_recorded = None;
        for (message, event) in batch.iter().zip(decoded) {
            checkpoints.insert((message.topic(), message.partition()), message.offset() + 1);
            let error = match (event, &dead_letter) {
                (Err(e), _) => Some(e.clone()),
                (Ok(_), Some(e)) => Some(e.clone()),
                (Ok(_), None) => None,
            };
            if let Some(error) = error {
                self.record_dead_letter(&mut tx, message, event.as_ref().ok(), &error)
                    .await?;
                continue;
            }
            let Ok(event) = event else { continue };
            let key = (
                event.meta.aggregate_type.clone(),
                event.meta.aggregate_id.clone(),
            );
            let current = last.get(&key).copied().unwrap_or(0);
            let sequence = i64::try_from(event.meta.sequence).unwrap_or(i64::MAX);
            let verdict = match sequence {
                s if s <= current => Verdict::Duplicate,
                s if s == current + 1 => Verdict::Apply,
                _ => Verdict::Gap,
            };
            match verdict {
                Verdict::Duplicate => duplicates += 1,
                Verdict::Gap => {
                    // The relay re-sends an aggregate's events from the first unacknowledged
                    // one, so the missing events and this one arrive again, in order.
                    metrics::counter!("projector_sequence_gaps_total", "projection" => schema)
                        .increment(1);
                    tracing::warn!(aggregate_id = %event.meta.aggregate_id, sequence, current, "sequence gap; waiting for redelivery");
                }
                Verdict::Apply => {
                    deliveries.push(FirstDelivery { event });
                    last.insert(key, sequence);
                    applied += 1;
                    newest_recorded = Some(event.meta.recorded_at.clone());
                }
            }
        }
        self.projection.apply_batch(&mut tx, &deliveries).await?;
        self.store_sequences(&mut tx, &last).await?;
        for ((topic, partition), next_offset) in &checkpoints {
            sqlx::query(&format!(
                "INSERT INTO {schema}.checkpoints (topic, partition, next_offset) VALUES ($1, $2, $3) \
                 ON CONFLICT (topic, partition) DO UPDATE \
                 SET next_offset = greatest({schema}.checkpoints.next_offset, excluded.next_offset), \
                     updated_at = clock_timestamp()"
            ))
            .bind(topic)
            .bind(partition)
            .bind(next_offset)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        metrics::counter!("projector_applied_total", "projection" => schema).increment(applied);
        metrics::counter!("projector_duplicates_total", "projection" => schema)
            .increment(duplicates);
        if let Some(recorded) = newest_recorded
            .as_deref()
            .and_then(|r| chrono::DateTime::parse_from_rfc3339(r).ok())
        {
            let lag = chrono::Utc::now().signed_duration_since(recorded);
            metrics::gauge!("projector_lag_seconds", "projection" => schema)
                .set(lag.num_microseconds().unwrap_or(0) as f64 / 1e6);
        }
        Ok(())
    }

    async fn load_sequences(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        decoded: &[Result<DecodedEvent, String>],
    ) -> Result<HashMap<(String, String), i64>, ProjectionError> {
        let (types, ids): (Vec<&str>, Vec<&str>) = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .map(|e| (e.meta.aggregate_type.as_str(), e.meta.aggregate_id.as_str()))
            .unzip();
        let rows: Vec<(String, String, i64)> = sqlx::query_as(&format!(
            "SELECT a.aggregate_type, a.aggregate_id, a.last_sequence \
             FROM {}.applied a \
             JOIN unnest($1::text[], $2::text[]) AS k(aggregate_type, aggregate_id) \
               USING (aggregate_type, aggregate_id) \
             FOR UPDATE OF a",
            self.schema
        ))
        .bind(&types)
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        Ok(rows.into_iter().map(|(t, i, s)| ((t, i), s)).collect())
    }

    async fn store_sequences(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        last: &HashMap<(String, String), i64>,
    ) -> Result<(), ProjectionError> {
        let mut types = Vec::with_capacity(last.len());
        let mut ids = Vec::with_capacity(last.len());
        let mut sequences = Vec::with_capacity(last.len());
        for ((t, i), s) in last {
            types.push(t.as_str());
            ids.push(i.as_str());
            sequences.push(*s);
        }
        let schema = self.schema;
        sqlx::query(&format!(
            "INSERT INTO {schema}.applied (aggregate_type, aggregate_id, last_sequence) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
             SET last_sequence = greatest({schema}.applied.last_sequence, excluded.last_sequence)"
        ))
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn record_dead_letter(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &BorrowedMessage<'_>,
        event: Option<&DecodedEvent>,
        error: &str,
    ) -> Result<(), ProjectionError> {
        tracing::error!(topic = message.topic(), partition = message.partition(), offset = message.offset(), %error, "dead-lettering a record");
        metrics::counter!("projector_dead_letters_total", "projection" => self.schema).increment(1);
        sqlx::query(&format!(
            "INSERT INTO {}.dead_letters (topic, partition, \"offset\", event_id, aggregate_id, error) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (topic, partition, \"offset\") DO NOTHING",
            self.schema
        ))
        .bind(message.topic())
        .bind(message.partition())
        .bind(message.offset())
        .bind(event.map(|e| e.meta.event_id.to_string()))
        .bind(event.map(|e| e.meta.aggregate_id.clone()))
        .bind(error)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
