//! Lag: what the consumer has not applied yet, measured from its own fetch statistics.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use sqlx::PgPool;

use super::*;
use crate::DecodedEvent;

/// One owned partition's (topic, partition, low and high watermark) as a lag measurement saw them.
/// An idle projector re-records its (unchanged, zero) lag this often, so `measured_at` shows it
/// alive; a busy one records every second.
pub(super) const IDLE_LAG_REFRESH: Duration = Duration::from_secs(15);

pub(super) type HighWatermark = (String, i32, i64, i64);

/// Keeps each partition's high watermark as the consumer's own fetches report it (librdkafka
/// statistics, every second), so lag is measured without a single extra request to the broker,
/// and when each high watermark was first seen: a record below it was on the broker by then,
/// which bounds the age of a record the consumer has not received yet.
#[derive(Debug, Default)]
pub struct WatermarkContext {
    /// (low, high) watermark per (topic, partition).
    marks: std::sync::Mutex<HashMap<(String, i32), (i64, i64)>>,
    /// Per (topic, partition): each higher high watermark and when it was first seen, oldest
    /// first (pruned as the checkpoint passes them).
    first_seen: std::sync::Mutex<HashMap<PartitionKey, VecDeque<(i64, At)>>>,
}

/// A topic and partition.
type PartitionKey = (String, i32);
/// An instant.
type At = chrono::DateTime<chrono::Utc>;

/// High watermarks remembered per partition (an hour of statistics at one per second).
const MAX_WATERMARK_HISTORY: usize = 3600;

impl rdkafka::ClientContext for WatermarkContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let now = chrono::Utc::now();
        if let Ok(mut seen) = self.first_seen.lock() {
            for (name, topic) in &statistics.topics {
                for (partition, state) in &topic.partitions {
                    if *partition < 0 || state.hi_offset < 0 {
                        continue;
                    }
                    let history = seen.entry((name.clone(), *partition)).or_default();
                    if history
                        .back()
                        .is_none_or(|(high, _)| state.hi_offset > *high)
                    {
                        history.push_back((state.hi_offset, now));
                        if history.len() > MAX_WATERMARK_HISTORY {
                            history.pop_front();
                        }
                    }
                }
            }
        }
        if let Ok(mut marks) = self.marks.lock() {
            for (name, topic) in statistics.topics {
                for (partition, state) in topic.partitions {
                    if partition >= 0 && state.hi_offset >= 0 {
                        marks.insert(
                            (name.clone(), partition),
                            (state.lo_offset.max(0), state.hi_offset),
                        );
                    }
                }
            }
        }
    }
}

impl ConsumerContext for WatermarkContext {}

impl WatermarkContext {
    pub(super) fn marks(&self, topic: &str, partition: i32) -> Option<(i64, i64)> {
        self.marks
            .lock()
            .ok()?
            .get(&(topic.to_owned(), partition))
            .copied()
    }

    /// When the record at `offset` was known to be on the broker: the first time a high
    /// watermark above it was seen. Forgets the watermarks at or below `offset` (the checkpoint
    /// only moves forward).
    pub(super) fn on_broker_since(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let mut seen = self.first_seen.lock().ok()?;
        let history = seen.get_mut(&(topic.to_owned(), partition))?;
        while history.front().is_some_and(|(high, _)| *high <= offset) {
            history.pop_front();
        }
        history.front().map(|(_, at)| *at)
    }
}

/// Records received but not yet applied: per (topic, partition), the first offset of each batch
/// received and when that record was recorded in the event store. The oldest one at or above a
/// partition's checkpoint is the oldest record still waiting there.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    records: std::sync::Mutex<HashMap<PartitionKey, BTreeMap<i64, At>>>,
}

impl Waiting {
    pub(super) fn note(
        &self,
        batch: &[BorrowedMessage<'_>],
        decoded: &[Result<DecodedEvent, String>],
    ) {
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        for (message, event) in batch.iter().zip(decoded) {
            let recorded = event
                .as_ref()
                .ok()
                .and_then(|e| chrono::DateTime::parse_from_rfc3339(&e.meta.recorded_at).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
                .or_else(|| {
                    message
                        .timestamp()
                        .to_millis()
                        .and_then(chrono::DateTime::from_timestamp_millis)
                })
                .unwrap_or_else(chrono::Utc::now);
            let partition = records
                .entry((message.topic().to_owned(), message.partition()))
                .or_default();
            // The earliest time wins (a redelivered record keeps its first sighting).
            partition
                .entry(message.offset())
                .and_modify(|t| *t = (*t).min(recorded))
                .or_insert(recorded);
        }
    }

    /// When the oldest received record at or after `next` was recorded; forgets those before.
    pub(super) fn oldest_from(
        &self,
        topic: &str,
        partition: i32,
        next: i64,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let mut records = self.records.lock().ok()?;
        let waiting = records.get_mut(&(topic.to_owned(), partition))?;
        *waiting = waiting.split_off(&next);
        waiting.values().min().copied()
    }
}

/// The readiness check on lag of a process running the projectors of `schemas` (read models or
/// process managers): the oldest record not yet applied on the partitions this instance owns
/// is at most `max_seconds` old. A measurement that stopped (a stuck consumer loop) ages with
/// the time since it was taken while records were waiting.
pub fn lag_probe(pool: PgPool, schemas: &[&str], max_seconds: f64) -> crate::process::Probe {
    let owner = instance().replace('\'', "''");
    let parts: Vec<String> = schemas
        .iter()
        .map(|schema| {
            format!(
                "SELECT lag_seconds + CASE WHEN lag_events > 0 \
                   THEN extract(epoch FROM clock_timestamp() - measured_at) ELSE 0 END AS age \
                 FROM {schema}.lag WHERE owner = '{owner}'"
            )
        })
        .collect();
    let sql = format!(
        "SELECT max(age)::float8 FROM ({}) waiting",
        parts.join(" UNION ALL ")
    );
    crate::process::Probe::lag(pool, sql, max_seconds)
}

/// This projector instance, as `host/pid`.
pub(super) fn instance() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("{host}/{}", std::process::id())
}

impl Projector {
    /// False when the last measurement found the projector caught up, nothing was applied
    /// since and the broker's high watermarks are the same: the lag is still zero, and an idle
    /// projector need not query and rewrite it every second.
    pub(super) fn lag_may_have_changed(&self) -> bool {
        let applied = self
            .applied
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        let marks = self.owned_marks().unwrap_or_default();
        let mut caught_up = self.caught_up.lock().unwrap_or_else(|p| p.into_inner());
        match caught_up.as_ref() {
            Some((last, at)) if !applied && *last == marks && at.elapsed() < IDLE_LAG_REFRESH => {
                false
            }
            _ => {
                *caught_up = None;
                true
            }
        }
    }

    /// (topic, partition, low, high) of every partition this instance owns, as the consumer's
    /// statistics last reported them.
    fn owned_marks(&self) -> Result<Vec<(String, i32, i64, i64)>, ProjectorError> {
        let context = self.consumer.context();
        let assignment = self.consumer.assignment()?;
        Ok(assignment
            .elements()
            .iter()
            .filter_map(|e| {
                let (low, high) = context.marks(e.topic(), e.partition())?;
                Some((e.topic().to_owned(), e.partition(), low, high))
            })
            .collect())
    }

    /// Measures each owned partition's lag (records not yet applied, from the broker's high
    /// watermark known to the consumer) and its age, exports them and records them for the API.
    ///
    /// The age is that of the oldest record not yet applied (the one at the checkpoint), not the
    /// time since the last applied one (which is idle time, not lag): when it was recorded in the
    /// event store if the consumer already received it, else at least since a high watermark
    /// above it was first seen. No records waiting: 0.
    pub(super) async fn measure_lag(&self) -> Result<(), ProjectorError> {
        let marks = self.owned_marks()?;
        let schema = self.schema;
        let positions: Vec<(String, i32, i64)> = sqlx::query_as(&format!(
            "SELECT topic, partition, next_offset FROM {schema}.checkpoints"
        ))
        .fetch_all(&self.pool)
        .await?;
        let context = self.consumer.context();
        let now = chrono::Utc::now();
        let (mut topics, mut partitions, mut highs, mut nexts, mut lags, mut ages) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut total, mut oldest) = (0i64, 0f64);
        let measured = marks.clone();
        for (topic, partition, low, high) in marks {
            let known = positions
                .iter()
                .find(|(t, p, _)| *t == topic && *p == partition);
            // A partition with no checkpoint yet: everything still on it is lag.
            let next = known.map_or(low, |k| k.2);
            let lag = (high - next).max(0);
            let received = self.waiting.oldest_from(&topic, partition, next);
            let on_broker = context.on_broker_since(&topic, partition, next);
            let age = if lag > 0 {
                [received, on_broker]
                    .into_iter()
                    .flatten()
                    .map(|since| now.signed_duration_since(since).num_milliseconds() as f64 / 1e3)
                    .fold(0.0, f64::max)
            } else {
                0.0
            };
            total += lag;
            oldest = oldest.max(age);
            topics.push(topic);
            partitions.push(partition);
            highs.push(high);
            nexts.push(next);
            lags.push(lag);
            ages.push(age);
        }
        metrics::gauge!("projector_lag_events", "projection" => schema).set(total as f64);
        metrics::gauge!("projector_lag_seconds", "projection" => schema).set(oldest);
        sqlx::query(&format!(
            "INSERT INTO {schema}.lag (topic, partition, high_watermark, next_offset, lag_events, lag_seconds, owner) \
             SELECT *, $7 FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::float8[]) \
             ON CONFLICT (topic, partition) DO UPDATE SET high_watermark = excluded.high_watermark, \
               next_offset = excluded.next_offset, lag_events = excluded.lag_events, \
               lag_seconds = excluded.lag_seconds, owner = excluded.owner, measured_at = clock_timestamp()"
        ))
        .bind(&topics)
        .bind(&partitions)
        .bind(&highs)
        .bind(&nexts)
        .bind(&lags)
        .bind(&ages)
        .bind(instance())
        .execute(&self.pool)
        .await?;
        if total == 0 {
            *self.caught_up.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((measured, Instant::now()));
        }
        Ok(())
    }
}
