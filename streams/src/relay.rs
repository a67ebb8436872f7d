//! The outbox relay: committed events → Kafka, at least once, in per-aggregate order.
//!
//! Each round reads the oldest unpublished outbox rows (all of them that are visible, in id
//! order: a row whose transaction commits late is simply found by a later round, never skipped),
//! encodes each event into the Confluent wire format, hands the whole batch to an idempotent
//! producer, waits for every acknowledgement, and marks published exactly the rows the broker
//! acknowledged — per aggregate, only up to its first failure, so a failed event and its
//! successors are sent again together, in order. Consumers deduplicate by (aggregate, sequence).
//!
//! Only one relay publishes at a time: the active one holds a PostgreSQL advisory lock, others
//! wait as hot standbys.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Deserialize;
use serde_json::Value as Json;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::codec::{EncodeError, EventEncoder};
use crate::config::{KafkaConfig, RegistryConfig, Topics};
use crate::headers::EventMeta;

/// Relay settings.
#[derive(Debug, Clone, Deserialize)]
pub struct RelayConfig {
    /// `RELAY_BATCH_SIZE`: outbox rows per round (default 1000).
    #[serde(default = "default_batch")]
    pub relay_batch_size: i64,
    /// `RELAY_IDLE_POLL_MS`: pause when the outbox is empty (default 20).
    #[serde(default = "default_idle")]
    pub relay_idle_poll_ms: u64,
    /// `RELAY_RETENTION_HOURS`: published outbox rows are deleted after this long (default 24);
    /// the events themselves stay in the event store forever.
    #[serde(default = "default_retention")]
    pub relay_retention_hours: i64,
}

const fn default_batch() -> i64 {
    1000
}
const fn default_idle() -> u64 {
    20
}
const fn default_retention() -> i64 {
    24
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_batch_size: default_batch(),
            relay_idle_poll_ms: default_idle(),
            relay_retention_hours: default_retention(),
        }
    }
}

impl RelayConfig {
    pub fn from_env() -> Result<Self, envy::Error> {
        envy::from_env()
    }
}

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding: {0}")]
    Encode(#[from] EncodeError),
}

/// Key of the advisory lock that elects the active relay.
const RELAY_LOCK_KEY: i64 = 0x6f75_7462_6f78; // "outbox"

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: Json,
    metadata: Json,
    event_id: Uuid,
    recorded_at: DateTime<Utc>,
}

/// Outcome of one round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub read: usize,
    pub published: usize,
    pub failed: usize,
}

/// The outbox relay.
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    encoder: EventEncoder,
    topics: Topics,
    config: RelayConfig,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("topics", &self.topics)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Builds a relay: an idempotent producer (`acks=all`) and a registry-backed encoder.
    pub fn new(
        pool: PgPool,
        kafka: &KafkaConfig,
        registry: &RegistryConfig,
        config: RelayConfig,
    ) -> Result<Self, RelayError> {
        let producer: FutureProducer = kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("compression.type", "lz4")
            // Same partition for a key as Java clients choose (murmur2), so other producers of
            // these topics agree on where an aggregate lives.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self {
            pool,
            producer,
            encoder: EventEncoder::new(registry)?,
            topics: kafka.topics(),
            config,
        })
    }

    /// Publishes until `shutdown` is cancelled; flushes what is in flight before returning.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let Some(_leadership) = self.acquire_leadership(&shutdown).await? else {
            return Ok(());
        };
        tracing::info!("relay is active");
        let idle = Duration::from_millis(self.config.relay_idle_poll_ms);
        let mut last_gauges = Instant::now() - Duration::from_secs(60);
        let mut last_prune = Instant::now();
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            let report = self.publish_round().await;
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                self.export_gauges().await?;
                last_gauges = Instant::now();
            }
            if last_prune.elapsed() >= Duration::from_secs(60) {
                self.prune().await?;
                last_prune = Instant::now();
            }
            let pause = match report {
                Ok(r) if r.failed == 0 && r.read > 0 => {
                    failures = 0;
                    continue;
                }
                Ok(r) if r.failed == 0 => idle,
                Ok(r) => {
                    failures += 1;
                    tracing::warn!(
                        failed = r.failed,
                        "some events were not acknowledged; retrying"
                    );
                    backoff(failures)
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "relay round failed; retrying");
                    backoff(failures)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        self.producer.flush(Duration::from_secs(10))?;
        tracing::info!("relay stopped");
        Ok(())
    }

    /// Waits until this relay holds the advisory lock (or shutdown). The returned connection
    /// keeps the lock for as long as it lives.
    async fn acquire_leadership(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<PoolConnection<Postgres>>, RelayError> {
        let mut connection = self.pool.acquire().await?;
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK_KEY)
                .fetch_one(&mut *connection)
                .await?;
            if locked {
                return Ok(Some(connection));
            }
            tracing::info!("another relay is active; standing by");
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One round: read, encode, produce, await acknowledgements, mark.
    pub async fn publish_round(&self) -> Result<RoundReport, RelayError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT o.id, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, \
                    e.event_version, e.payload, e.metadata, e.event_id, e.recorded_at \
             FROM outbox o \
             JOIN events e USING (aggregate_type, aggregate_id, sequence) \
             WHERE o.published_at IS NULL \
             ORDER BY o.id \
             LIMIT $1",
        )
        .bind(self.config.relay_batch_size)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(RoundReport::default());
        }
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in &rows {
            deliveries.push(self.send(row).await);
        }
        let results = join_all(deliveries.into_iter().map(|d| async move {
            match d {
                Ok(future) => matches!(future.await, Ok(Ok(_))),
                Err(()) => false,
            }
        }))
        .await;

        // Per aggregate, only the acknowledged prefix is marked.
        let mut blocked: HashSet<(&str, &str)> = HashSet::new();
        let mut published = Vec::with_capacity(rows.len());
        for (row, acked) in rows.iter().zip(&results) {
            let key = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
            if *acked && !blocked.contains(&key) {
                published.push(row.id);
            } else {
                blocked.insert(key);
            }
        }
        sqlx::query("UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1)")
            .bind(&published)
            .execute(&self.pool)
            .await?;
        metrics::counter!("relay_published_total").increment(published.len() as u64);
        let failed = rows.len() - published.len();
        if failed > 0 {
            metrics::counter!("relay_failed_total").increment(failed as u64);
        }
        Ok(RoundReport {
            read: rows.len(),
            published: published.len(),
            failed,
        })
    }

    /// Encodes and enqueues one event; `Err(())` if it could not even be enqueued (logged).
    async fn send(&self, row: &OutboxRow) -> Result<rdkafka::producer::DeliveryFuture, ()> {
        let Some(topic) = self.topics.for_aggregate(&row.aggregate_type) else {
            tracing::error!(aggregate_type = %row.aggregate_type, "no topic for aggregate type");
            return Err(());
        };
        let (version, payload) =
            schemas::upcast(&row.event_type, &row.event_version, row.payload.clone());
        let bytes = match self
            .encoder
            .encode_payload(&topic, &row.aggregate_type, &payload)
            .await
        {
            Ok((_, bytes)) => bytes,
            Err(e) => {
                tracing::error!(error = %e, event_id = %row.event_id, "cannot encode event");
                return Err(());
            }
        };
        let meta = meta_of(row, version);
        let headers = meta.to_headers();
        let record = FutureRecord::to(&topic)
            .key(row.aggregate_id.as_bytes())
            .payload(&bytes)
            .headers(headers);
        self.producer.send_result(record).map_err(|(e, _)| {
            tracing::warn!(error = %e, "producer queue refused an event");
        })
    }

    async fn export_gauges(&self) -> Result<(), RelayError> {
        let (backlog, oldest): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM clock_timestamp() - min(created_at))::float8 \
             FROM outbox WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        metrics::gauge!("relay_backlog_events").set(backlog as f64);
        metrics::gauge!("relay_oldest_unpublished_age_seconds").set(oldest.unwrap_or(0.0));
        Ok(())
    }

    async fn prune(&self) -> Result<(), RelayError> {
        sqlx::query(
            "DELETE FROM outbox WHERE published_at < clock_timestamp() - make_interval(hours => $1)",
        )
        .bind(i32::try_from(self.config.relay_retention_hours).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)))
}

fn meta_of(row: &OutboxRow, event_version: String) -> EventMeta {
    let text = |key: &str| {
        row.metadata
            .get(key)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    EventMeta {
        event_id: row.event_id,
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        sequence: u64::try_from(row.sequence).unwrap_or_default(),
        event_type: row.event_type.clone(),
        event_version,
        occurred_at: text("occurred_at"),
        recorded_at: row.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        correlation_id: text("correlation_id"),
        causation_id: text("causation_id"),
        actor: text("actor"),
        command_id: text("command_id"),
    }
}
