//! The outbox relay: committed events → Kafka, at least once, in per-aggregate order.
//!
//! Each round reads the oldest unpublished outbox rows (all of them that are visible, in id
//! order: a row whose transaction commits late is simply found by a later round, never skipped),
//! encodes each event into the Confluent wire format, hands the whole batch to an idempotent
//! producer, waits for every acknowledgement, and marks published exactly the rows the broker
//! acknowledged — per aggregate, only up to its first failure, so a failed event and its
//! successors are sent again together, in order. Consumers deduplicate by (aggregate, sequence).
//!
//! While one batch waits for its acknowledgements, the next is read and encoded (excluding the
//! rows in flight); it is sent only once the previous batch is fully acknowledged and marked, and
//! thrown away if anything in the previous batch failed, so batches reach the broker strictly in
//! order and a failed event is always re-sent before its successors.
//!
//! Only one relay publishes at a time: the active one holds a PostgreSQL advisory lock, others
//! wait as hot standbys.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use commands::log::{StoredEvent, STORED_COLUMNS};
use commands::TraceParent;
use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Deserialize;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::codec::{EncodeError, EventEncoder};
use crate::config::{KafkaConfig, RegistryConfig, Topics};
use crate::headers::{self, EventMeta, StoredText};
use crate::published::Published;

/// Relay settings.
#[derive(Debug, Clone, Deserialize)]
pub struct RelayConfig {
    /// `RELAY_BATCH_SIZE`: outbox rows per round (default 1000).
    #[serde(default = "default_batch")]
    pub relay_batch_size: i64,
    /// `RELAY_IDLE_POLL_MS`: pause when the outbox is empty (default 20).
    #[serde(default = "default_idle")]
    pub relay_idle_poll_ms: u64,
    /// `RELAY_IDLE_AFTER_MS`: once the outbox has been empty this long, the relay stops polling
    /// and sleeps until an append notifies it (default 1000).
    #[serde(default = "default_idle_after")]
    pub relay_idle_after_ms: u64,
    /// `RELAY_IDLE_WAIT_MS`: how long a sleeping relay waits for a notification before it looks
    /// anyway (default 1000; it bounds the delay of an append that races the relay falling
    /// asleep, and of one made while the notification connection was lost).
    #[serde(default = "default_idle_wait")]
    pub relay_idle_wait_ms: u64,
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
const fn default_idle_after() -> u64 {
    1000
}
const fn default_idle_wait() -> u64 {
    1000
}
const fn default_retention() -> i64 {
    24
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_batch_size: default_batch(),
            relay_idle_poll_ms: default_idle(),
            relay_idle_after_ms: default_idle_after(),
            relay_idle_wait_ms: default_idle_wait(),
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

/// The relay's producer settings: idempotent (`acks=all`, no duplicates or reordering on
/// retries), batched and compressed. Public so that benchmarks measure the same producer.
pub fn producer_config(kafka: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut config = kafka.client_config();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("compression.type", "lz4")
        // Same partition for a key as Java clients choose (murmur2), so other producers of
        // these topics agree on where an aggregate lives.
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000");
    config
}

/// Key of the advisory lock that elects the active relay.
const RELAY_LOCK_KEY: i64 = 0x6f75_7462_6f78; // "outbox"

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    #[sqlx(flatten)]
    event: StoredEvent,
    chain_prev: Vec<u8>,
    chain_hash: Vec<u8>,
    /// The `payload` and `metadata` columns' text, byte for byte (what the chain hash covers).
    payload_text: String,
    metadata_text: String,
}

/// An encoded event ready to send: `record` is `(topic, value)`, or `None` if it could not be
/// encoded.
struct Outgoing {
    id: i64,
    record: Option<(String, Vec<u8>)>,
    meta: EventMeta,
    /// `chain_prev` and `chain_hash` of the event in the store's hash chain.
    chain: (Vec<u8>, Vec<u8>),
    /// The event as stored, sent along so that the topics can restore the store.
    stored: StoredText,
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
        let producer: FutureProducer = producer_config(kafka).create()?;
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
        let topics = self.topics.clone();
        self.encoder
            .check_compatibility(|aggregate| topics.for_aggregate(aggregate))
            .await?;
        let Some(_leadership) = self.acquire_leadership(&shutdown).await? else {
            return Ok(());
        };
        tracing::info!("relay is active");
        let idle = Duration::from_millis(self.config.relay_idle_poll_ms);
        let idle_after = Duration::from_millis(self.config.relay_idle_after_ms);
        let idle_wait = Duration::from_millis(self.config.relay_idle_wait_ms);
        let mut wakeup = Wakeup::listen(&self.pool).await?;
        let mut last_busy = Instant::now();
        let mut upkeep = Upkeep {
            last_gauges: Instant::now() - Duration::from_secs(60),
            last_prune: Instant::now(),
        };
        let mut failures: u32 = 0;
        let mut prepared: Option<Vec<Outgoing>> = None;
        while !shutdown.is_cancelled() {
            let round = match prepared.take() {
                Some(batch) => self.publish(batch).await,
                None => match self.prepare(&[]).await {
                    Ok(batch) => self.publish(batch).await,
                    Err(e) => Err(e),
                },
            };
            let empty = matches!(round, Ok((report, _)) if report.read == 0);
            self.upkeep(&mut upkeep, empty).await;
            let pause = match round {
                Ok((report, next)) if report.failed == 0 && report.read > 0 => {
                    failures = 0;
                    prepared = next;
                    last_busy = Instant::now();
                    wakeup.busy(&self.pool).await?;
                    continue;
                }
                Ok((report, _)) if report.failed == 0 => {
                    if last_busy.elapsed() < idle_after {
                        idle
                    } else if !wakeup.is_waiting() {
                        // Announce first, then look once more before sleeping: an append that
                        // committed before the announcement is found by that look.
                        wakeup.announce(&self.pool).await?;
                        continue;
                    } else {
                        wakeup.wait(idle_wait, &shutdown).await;
                        continue;
                    }
                }
                Ok((report, _)) => {
                    failures += 1;
                    tracing::warn!(
                        failed = report.failed,
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

    /// The backlog gauges (once a second while busy) and the pruning of published rows (once a
    /// minute). Both are for operators: a failure is logged and publishing goes on.
    async fn upkeep(&self, upkeep: &mut Upkeep, empty: bool) {
        if empty {
            // Nothing unpublished is visible: no need to count it.
            export_empty_gauges();
        } else if upkeep.last_gauges.elapsed() >= Duration::from_secs(1) {
            if let Err(e) = self.export_gauges().await {
                tracing::warn!(error = %e, "could not count the backlog for the gauges");
            }
            upkeep.last_gauges = Instant::now();
        }
        if upkeep.last_prune.elapsed() >= Duration::from_secs(60) {
            // A failed prune is retried next minute.
            if let Err(e) = self.prune().await {
                tracing::warn!(error = %e, "could not prune published outbox rows");
            }
            upkeep.last_prune = Instant::now();
        }
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

    /// Reads the oldest unpublished rows (except `in_flight`) and encodes them.
    async fn prepare(&self, in_flight: &[i64]) -> Result<Vec<Outgoing>, RelayError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(&format!(
            "SELECT o.id, {STORED_COLUMNS}, e.chain_prev, e.chain_hash, \
                    e.payload::text AS payload_text, e.metadata::text AS metadata_text \
             FROM outbox o \
             JOIN events e USING (aggregate_type, aggregate_id, sequence) \
             WHERE o.published_at IS NULL AND o.id <> ALL($2) \
             ORDER BY o.id \
             LIMIT $1"
        ))
        .bind(self.config.relay_batch_size)
        .bind(in_flight)
        .fetch_all(&self.pool)
        .await?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            batch.push(self.encode(row).await);
        }
        Ok(batch)
    }

    /// Encodes one event; an event that cannot be encoded travels as `record: None` and counts
    /// as a failure of its aggregate.
    async fn encode(&self, row: OutboxRow) -> Outgoing {
        let OutboxRow {
            id,
            event,
            chain_prev,
            chain_hash,
            payload_text,
            metadata_text,
        } = row;
        let stored = StoredText {
            version: event.event_version.clone(),
            payload: payload_text,
            metadata: metadata_text,
        };
        let Published { meta, payload } = Published::of(event);
        let topic = self.topics.for_aggregate(&meta.aggregate_type);
        let bytes = match &topic {
            Some(topic) => match self
                .encoder
                .encode_payload(topic, &meta.aggregate_type, &payload)
                .await
            {
                Ok((_, bytes)) => Some(bytes),
                Err(e) => {
                    tracing::error!(error = %e, event_id = %meta.event_id, "cannot encode event");
                    None
                }
            },
            None => {
                tracing::error!(aggregate_type = %meta.aggregate_type, "no topic for aggregate type");
                None
            }
        };
        Outgoing {
            id,
            record: topic.zip(bytes),
            meta,
            chain: (chain_prev, chain_hash),
            stored,
        }
    }

    /// Sends a batch, prepares the next one while the acknowledgements come in, marks the
    /// acknowledged prefix of each aggregate. The next batch is returned only if this one fully
    /// succeeded.
    async fn publish(
        &self,
        batch: Vec<Outgoing>,
    ) -> Result<(RoundReport, Option<Vec<Outgoing>>), RelayError> {
        if batch.is_empty() {
            return Ok((RoundReport::default(), None));
        }
        let started = Instant::now();
        // An aggregate's events after one that could not be encoded are not sent: on the topic
        // they would overtake it when it is sent again (after a registry outage, say).
        let mut unsendable: HashSet<(&str, &str)> = HashSet::new();
        let deliveries: Vec<_> = batch
            .iter()
            .map(|out| {
                let key = (
                    out.meta.aggregate_type.as_str(),
                    out.meta.aggregate_id.as_str(),
                );
                let sent = if unsendable.contains(&key) {
                    None
                } else {
                    self.send(out)
                };
                if sent.is_none() {
                    unsendable.insert(key);
                }
                (sent, publication_span(&out.meta))
            })
            .collect();
        let in_flight: Vec<i64> = batch.iter().map(|out| out.id).collect();
        let acknowledged = join_all(deliveries.into_iter().map(|(d, span)| {
            async move {
                match d {
                    Some(future) => matches!(future.await, Ok(Ok(_))),
                    None => false,
                }
            }
            .instrument(span)
        }));
        let (results, next) = tokio::join!(acknowledged, self.prepare(&in_flight));
        let acked = started.elapsed();

        // Per aggregate, only the acknowledged prefix is marked.
        let mut blocked: HashSet<(&str, &str)> = HashSet::new();
        let mut published = Vec::with_capacity(batch.len());
        for (out, ok) in batch.iter().zip(&results) {
            let key = (
                out.meta.aggregate_type.as_str(),
                out.meta.aggregate_id.as_str(),
            );
            if *ok && !blocked.contains(&key) {
                published.push(out.id);
            } else {
                blocked.insert(key);
            }
        }
        sqlx::query("UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1)")
            .bind(&published)
            .execute(&self.pool)
            .await?;
        tracing::debug!(rows = batch.len(), ?acked, marked = ?started.elapsed(), "relay round");
        metrics::counter!("relay_published_total").increment(published.len() as u64);
        let failed = batch.len() - published.len();
        if failed > 0 {
            metrics::counter!("relay_failed_total").increment(failed as u64);
        }
        let report = RoundReport {
            read: batch.len(),
            published: published.len(),
            failed,
        };
        // A failure means the pre-read batch may hold successors of a failed event: drop it.
        let next = if failed == 0 { next.ok() } else { None };
        Ok((report, next))
    }

    /// Enqueues one record; `None` if it could not be encoded or enqueued (logged).
    fn send(&self, out: &Outgoing) -> Option<rdkafka::producer::DeliveryFuture> {
        let (topic, bytes) = out.record.as_ref()?;
        let record = FutureRecord::to(topic)
            .key(out.meta.aggregate_id.as_bytes())
            .payload(bytes)
            .headers(out.stored.add_to(headers::with_chain(
                out.meta.to_headers(),
                &out.chain.0,
                &out.chain.1,
            )));
        self.producer
            .send_result(record)
            .map_err(|(e, _)| tracing::warn!(error = %e, "producer queue refused an event"))
            .ok()
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

/// When the relay last did its upkeep.
struct Upkeep {
    last_gauges: Instant,
    last_prune: Instant,
}

/// The span of one publication (enqueued until acknowledged), under the span of the command
/// that appended the event; none when the process exports no traces.
fn publication_span(meta: &EventMeta) -> tracing::Span {
    if !commands::trace::exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {}", meta.event_type),
        otel.kind = "producer",
        event_id = %meta.event_id,
        aggregate_type = %meta.aggregate_type,
        aggregate_id = %meta.aggregate_id,
        sequence = meta.sequence,
    );
    if let Some(parent) = TraceParent::parse(&meta.traceparent) {
        parent.adopt(&span);
    }
    span
}

fn export_empty_gauges() {
    metrics::gauge!("relay_backlog_events").set(0.0);
    metrics::gauge!("relay_oldest_unpublished_age_seconds").set(0.0);
}

/// Notification channel of the outbox (migration `outbox_wakeup`).
const WAKEUP_CHANNEL: &str = "backbone_outbox";

/// How an idle relay sleeps without polling: it sets `outbox_relay_state.waiting`, and the
/// outbox trigger notifies [`WAKEUP_CHANNEL`] while that is set. A busy relay clears it, so
/// busy writers take no notification lock (see the migration `outbox_wakeup`).
struct Wakeup {
    listener: PgListener,
    waiting: bool,
}

impl Wakeup {
    /// Listens on the channel and clears `waiting` (a relay that died while waiting left it
    /// set).
    async fn listen(pool: &PgPool) -> Result<Self, RelayError> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(WAKEUP_CHANNEL).await?;
        let mut wakeup = Self {
            listener,
            waiting: true,
        };
        wakeup.busy(pool).await?;
        Ok(wakeup)
    }

    fn is_waiting(&self) -> bool {
        self.waiting
    }

    /// From now on, every append notifies.
    async fn announce(&mut self, pool: &PgPool) -> Result<(), RelayError> {
        // Notifications left from before are stale: the look after this call covers them.
        while self.listener.next_buffered().is_some() {}
        sqlx::query("UPDATE outbox_relay_state SET waiting = true")
            .execute(pool)
            .await?;
        self.waiting = true;
        Ok(())
    }

    /// Appends stop notifying.
    async fn busy(&mut self, pool: &PgPool) -> Result<(), RelayError> {
        if self.waiting {
            sqlx::query("UPDATE outbox_relay_state SET waiting = false")
                .execute(pool)
                .await?;
            self.waiting = false;
        }
        Ok(())
    }

    /// Sleeps until a notification, `timeout` or shutdown. A lost listener connection only
    /// means sleeping until the timeout (sqlx reconnects it on the next call).
    async fn wait(&mut self, timeout: Duration, shutdown: &CancellationToken) {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(timeout) => {}
            received = self.listener.recv() => {
                if let Err(e) = received {
                    tracing::warn!(error = %e, "outbox notifications interrupted; polling");
                    tokio::time::sleep(timeout).await;
                }
            }
        }
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)))
}
