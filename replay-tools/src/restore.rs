//! `replay-tools restore`: the event store rebuilt from the topics after a disaster (the
//! database lost), then every read model, so that the backbone can resume taking orders.
//!
//! ## What the topics hold
//!
//! The relay sends every event with its identity and metadata headers, its place in the hash
//! chain (`chain_prev`, `chain_hash`) and the event exactly as stored (`stored_version`,
//! `stored_payload`, `stored_metadata`: see [`streams::headers::StoredText`]). So each record
//! gives back the stored row byte for byte, and its chain hash can be recomputed from it.
//!
//! ## Verified as it goes
//!
//! Records are read from the beginning of every event topic to the end each partition had when
//! the run started. Per aggregate, in sequence order (an aggregate lives in one partition): the
//! next record must be the next sequence, chained to the previous one's hash, and its content
//! must hash to its own `chain_hash`. Redeliveries (the relay is at least once) carry the same
//! hash and are skipped; a copy that differs, a gap, or content that does not hash to its header
//! is a finding, and the aggregate's later records are not restored (its chain cannot be trusted
//! past that point). Every finding is printed and the run fails, after restoring everything that
//! verified. The database recomputes each hash itself as the rows are inserted (its trigger) and
//! the two must agree.
//!
//! Rows are inserted in batches, one transaction each, with their outbox rows marked published
//! in the same transaction: the restored relay sends only what is appended after. A run that
//! stops midway continues where it stopped when run again (what the store holds is the start).
//!
//! ## Then
//!
//! - the promotion claims are taken again from the orders ([`commands::promotions::PromotionClaims`]);
//! - an anchor is recorded over the restored chains;
//! - each read model is rebuilt from the restored store (it needs no schema registry: the
//!   records' schema ids stay valid only if the registry's own store survived) and swapped in
//!   ([`crate::rebuild`]); what a
//!   worker did for the history (a notification's webhook) counts as done, since nobody can tell
//!   whether the lost environment did it (at most once);
//! - the process manager starts again `--flow-rewind` before the last restored event: its
//!   consumer group is set to the records published since, and every aggregate counts as applied
//!   up to its last event recorded before, so the reactions the lost environment committed but
//!   never published are taken again; its reactions are repeatable, so those it did are not
//!   doubled. Reactions to events recorded before that instant count as done: the rewind must be
//!   longer than the process manager's lag at the loss. Its own records of orders are read again
//!   from the log as it meets them.
//!
//! Not in the topics, and lost with the database: customers' data keys (personal data of the
//! history reads as erased unless `pii_keys` was kept elsewhere), idempotency records, stuck-flow
//! records, and events the relay had not published (the recovery point: the relay's backlog at
//! the moment of loss).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use streams::consumer::ProjectorConfig;
use streams::headers::{StoredText, CHAIN_HASH, CHAIN_PREV};
use streams::{EventMeta, KafkaConfig, RegistryConfig};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::chain::{header, next_batch, EventContent, Hash, TopicScan, GENESIS};
use crate::progress;
use crate::rebuild::{self, Connections, RebuildArgs, Source};

/// `replay-tools restore`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// Events inserted per transaction.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Restore the event store only (no read models, no move of the process manager's group).
    #[arg(long)]
    pub store_only: bool,
    /// How far before the last restored event the process manager starts again (seconds):
    /// longer than the relay's backlog and the process manager's lag can have been at the loss
    /// (seconds when healthy: see their metrics' last values). Every event of that window passes
    /// through the process manager again before new ones (a check per reaction), so a longer
    /// rewind delays the first new order's confirmation.
    #[arg(long, default_value_t = 120)]
    pub flow_rewind: u64,
}

/// One record that verified, as the row to insert.
#[derive(Debug)]
struct Row {
    meta: EventMeta,
    stored: StoredText,
    recorded_at: DateTime<Utc>,
    hash: Hash,
}

/// What the run saw.
#[derive(Debug, Default)]
struct Tally {
    records: u64,
    restored: u64,
    duplicates: u64,
    /// Records of an aggregate whose chain broke earlier in the run.
    skipped: u64,
    findings: Vec<String>,
    last_recorded: Option<DateTime<Utc>>,
}

/// Every aggregate's chain as restored so far (index `sequence - 1`).
#[derive(Debug, Default)]
struct Chains {
    hashes: HashMap<(String, String), Vec<Hash>>,
    broken: HashSet<(String, String)>,
}

impl Chains {
    /// The chains the store already holds (a run that continues an interrupted one).
    async fn of_store(pool: &PgPool) -> anyhow::Result<Self> {
        let rows: Vec<(String, String, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT aggregate_type, aggregate_id, sequence, chain_hash FROM events \
             ORDER BY aggregate_type, aggregate_id, sequence",
        )
        .fetch_all(pool)
        .await
        .context("reading the chains already restored")?;
        let mut chains = Self::default();
        for (aggregate_type, aggregate_id, sequence, hash) in rows {
            let chain = chains
                .hashes
                .entry((aggregate_type, aggregate_id))
                .or_default();
            let hash: Hash = hash.as_slice().try_into().context("a stored chain hash")?;
            if usize::try_from(sequence).ok() != Some(chain.len() + 1) {
                bail!("the store to restore into has a gap in its chains; restore into an empty database");
            }
            chain.push(hash);
        }
        Ok(chains)
    }

    /// Checks one record against its aggregate's chain: `Ok(Some(row))` to insert, `Ok(None)` for
    /// a redelivery or a record of a broken chain, `Err(finding)` when it does not verify.
    fn check(&mut self, message: &OwnedMessage, tally: &mut Tally) -> Result<Option<Row>, String> {
        let at = || {
            format!(
                "{}/{}@{}",
                message.topic(),
                message.partition(),
                message.offset()
            )
        };
        let meta =
            EventMeta::from_headers(message.headers()).map_err(|e| format!("{}: {e}", at()))?;
        let key = (meta.aggregate_type.clone(), meta.aggregate_id.clone());
        if self.broken.contains(&key) {
            tally.skipped += 1;
            return Ok(None);
        }
        let chain = self.hashes.get(&key).map_or(&[][..], Vec::as_slice);
        let row = verify(message, meta, chain, at).inspect_err(|_| {
            self.broken.insert(key.clone());
        })?;
        match row {
            None => {
                tally.duplicates += 1;
                Ok(None)
            }
            Some(row) => {
                self.hashes.entry(key).or_default().push(row.hash);
                Ok(Some(row))
            }
        }
    }
}

/// A record as a finding names it: where it is, and which event it claims to be.
struct RecordName<'a, F> {
    at: &'a F,
    meta: &'a EventMeta,
}

impl<F: Fn() -> String> std::fmt::Display for RecordName<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let meta = self.meta;
        write!(
            f,
            "{} ({} {} #{})",
            (self.at)(),
            meta.aggregate_type,
            meta.aggregate_id,
            meta.sequence
        )
    }
}

/// The record as the next row of its aggregate's `chain` (as restored so far), or `None` for a
/// redelivery of one restored; `at` names the record in a finding (built only for one).
fn verify(
    message: &OwnedMessage,
    meta: EventMeta,
    chain: &[Hash],
    at: impl Fn() -> String,
) -> Result<Option<Row>, String> {
    let what = RecordName {
        at: &at,
        meta: &meta,
    };
    let hash_of = |name: &str| -> Result<Hash, String> {
        let text = header(message, name).ok_or_else(|| format!("{what}: no `{name}` header"))?;
        crate::chain::parse_hash(text).map_err(|e| format!("{what}: `{name}`: {e}"))
    };
    let (prev, hash) = (hash_of(CHAIN_PREV)?, hash_of(CHAIN_HASH)?);
    let sequence = usize::try_from(meta.sequence).unwrap_or(usize::MAX);
    if sequence >= 1 && sequence <= chain.len() {
        return if chain[sequence - 1] == hash {
            Ok(None)
        } else {
            Err(format!(
                "{what}: a second, different copy of an event already restored"
            ))
        };
    }
    if sequence != chain.len() + 1 {
        return Err(format!(
            "{what}: a gap: the next event of this aggregate is #{}",
            chain.len() + 1
        ));
    }
    if prev != *chain.last().unwrap_or(&GENESIS) {
        return Err(format!(
            "{what}: not chained to the event before it (`chain_prev` differs)"
        ));
    }
    let stored = StoredText::from_headers(message.headers())
        .map_err(|e| format!("{what}: {e}"))?
        .ok_or_else(|| {
            format!(
                "{what}: the record carries no stored form (published by a relay older than \
                     the `stored_*` headers); restore needs every event as stored"
            )
        })?;
    let recorded_at = DateTime::parse_from_rfc3339(&meta.recorded_at)
        .map_err(|e| format!("{what}: `recorded_at` {}: {e}", meta.recorded_at))?
        .with_timezone(&Utc);
    let content = EventContent {
        aggregate_type: &meta.aggregate_type,
        aggregate_id: &meta.aggregate_id,
        sequence: i64::try_from(meta.sequence).unwrap_or(i64::MAX),
        event_type: &meta.event_type,
        event_version: &stored.version,
        payload: &stored.payload,
        metadata: &stored.metadata,
        event_id: meta.event_id,
        recorded_at_micros: recorded_at.timestamp_micros(),
    };
    if content.chain_hash(&prev) != hash {
        return Err(format!(
            "{what}: its content does not hash to its `chain_hash` (altered on the way)"
        ));
    }
    Ok(Some(Row {
        meta,
        stored,
        recorded_at,
        hash,
    }))
}

/// Runs `replay-tools restore` with the `KAFKA_*`, `SCHEMA_REGISTRY_*` and `PROJECTOR_*`
/// settings of the environment.
pub async fn run(args: RestoreArgs, pool: &PgPool, out: &mut impl Write) -> anyhow::Result<()> {
    let kafka = KafkaConfig::from_env().context("KAFKA_* settings")?;
    let registry = RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
    let projector = ProjectorConfig::from_env().context("PROJECTOR_* settings")?;
    let connections = Connections {
        kafka,
        registry,
        group_prefix: projector.projector_group_prefix,
        max_attempts: projector.projector_max_attempts.max(1),
    };
    restore(pool, &connections, &args, progress::interrupted(), out).await
}

/// Restores the event store from the topics, then (unless `store_only`) the read models and the
/// process manager's starting point.
pub async fn restore(
    pool: &PgPool,
    connections: &Connections,
    args: &RestoreArgs,
    interrupted: CancellationToken,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let started = Instant::now();
    crate::cli::migrate(pool.clone(), &mut std::io::sink()).await?;
    let tally = restore_events(pool, &connections.kafka, args, &interrupted, out).await?;
    let store_took = started.elapsed();
    let claims = commands::promotions::PromotionClaims::restore_from_events(pool)
        .await
        .context("taking the promotion claims again")?;
    writeln!(out, "promotion claims taken again: {claims}")?;
    if !tally.findings.is_empty() {
        for finding in &tally.findings {
            writeln!(out, "finding: {finding}")?;
        }
        bail!(
            "{} records did not verify (listed above); the {} that did are restored, and each \
             aggregate named ends at its last event that verified. The read models were not \
             rebuilt: investigate (another copy of the topics, a backup of the store) before \
             starting the backbone on this database",
            tally.findings.len(),
            tally.restored
        );
    }
    let anchor = crate::chain::anchor(pool)
        .await
        .context("anchoring the restored chains")?;
    writeln!(
        out,
        "anchor {} over {} aggregates and {} events: {}",
        anchor.id,
        anchor.aggregates,
        anchor.events,
        hex::encode(anchor.hash)
    )?;
    if args.store_only {
        writeln!(
            out,
            "restore: event store in {:.1} s (read models left)",
            store_took.as_secs_f64()
        )?;
        return Ok(());
    }
    let models_started = Instant::now();
    rebuild_read_models(pool, connections, &interrupted, out).await?;
    let models_took = models_started.elapsed();
    let flow_started = Instant::now();
    if let Some(last) = tally.last_recorded {
        let from =
            last - chrono::Duration::seconds(i64::try_from(args.flow_rewind).unwrap_or(i64::MAX));
        let positioned = position_flow(pool, connections, from).await?;
        writeln!(
            out,
            "process manager: starts again from the events recorded since {from} \
             ({positioned} aggregates positioned before it)"
        )?;
    }
    writeln!(
        out,
        "restore: event store {:.1} s, read models {:.1} s, process manager positioned {:.1} s \
         (its lost members leaving the consumer group), in all {:.1} s",
        store_took.as_secs_f64(),
        models_took.as_secs_f64(),
        flow_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

/// Rebuilds every read model from the restored store and swaps it in; their workers' history
/// counts as done (no notification webhook is sent twice).
async fn rebuild_read_models(
    pool: &PgPool,
    connections: &Connections,
    interrupted: &CancellationToken,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    for projection in projections::read_models::all() {
        let name = projection.name().to_owned();
        rebuild::rebuild(
            pool,
            connections,
            RebuildArgs {
                read_model: name.clone(),
                source: Some(Source::Store),
                as_of: None,
                resume: false,
                restart: true,
                swap: true,
                batch_size: rebuild::DEFAULT_BATCH_SIZE,
                appliers: rebuild::DEFAULT_APPLIERS,
            },
            interrupted.clone(),
            out,
        )
        .await
        .with_context(|| format!("rebuilding read model {name}"))?;
        rebuild::history_done_by_workers(pool, &name).await?;
    }
    Ok(())
}

/// Reads the topics into the store, verifying every record; returns what it saw.
async fn restore_events(
    pool: &PgPool,
    kafka: &KafkaConfig,
    args: &RestoreArgs,
    interrupted: &CancellationToken,
    out: &mut impl Write,
) -> anyhow::Result<Tally> {
    let mut chains = Chains::of_store(pool).await?;
    let already: usize = chains.hashes.values().map(Vec::len).sum();
    let topics = kafka.topics().all();
    let mut scan = TopicScan::open(kafka, &topics)?;
    let bar = progress::bar("restore", Some(scan.total));
    let mut tally = Tally::default();
    let batch_size = usize::try_from(args.batch_size).unwrap_or(5000);
    let started = Instant::now();
    loop {
        let batch = next_batch(&mut scan, batch_size).await?;
        if batch.is_empty() {
            break;
        }
        let mut rows = Vec::with_capacity(batch.len());
        for message in &batch {
            tally.records += 1;
            if scan.is_trimmed(message.topic(), message.partition()) {
                bail!(
                    "{}/{} lost its oldest records to retention: the topics no longer hold the \
                     whole history, so they cannot restore the store",
                    message.topic(),
                    message.partition()
                );
            }
            match chains.check(message, &mut tally) {
                Ok(Some(row)) => rows.push(row),
                Ok(None) => {}
                Err(finding) => tally.findings.push(finding),
            }
        }
        insert(pool, &rows).await?;
        tally.restored += rows.len() as u64;
        if let Some(last) = rows.iter().map(|r| r.recorded_at).max() {
            tally.last_recorded = tally.last_recorded.max(Some(last));
        }
        bar.set_position(tally.records);
        if interrupted.is_cancelled() {
            bar.finish_and_clear();
            bail!(
                "interrupted after {} events; run restore again to continue",
                tally.restored
            );
        }
    }
    bar.finish_and_clear();
    if tally.last_recorded.is_none() && already > 0 {
        tally.last_recorded = sqlx::query_scalar("SELECT max(recorded_at) FROM events")
            .fetch_one(pool)
            .await?;
    }
    let took = started.elapsed();
    writeln!(
        out,
        "event store: {} records read from {} topics, {} events restored ({} already there), \
         {} redeliveries skipped, {} records after a finding skipped, {} findings, in {:.1} s \
         ({:.0} events/s)",
        tally.records,
        topics.len(),
        tally.restored,
        already,
        tally.duplicates,
        tally.skipped,
        tally.findings.len(),
        took.as_secs_f64(),
        tally.restored as f64 / took.as_secs_f64().max(1e-3)
    )?;
    Ok(tally)
}

/// Inserts verified rows in one transaction (the database chains them again and must agree)
/// and marks their outbox rows published.
async fn insert(pool: &PgPool, rows: &[Row]) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&Row) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let sequences: Vec<i64> = rows
        .iter()
        .map(|r| i64::try_from(r.meta.sequence).unwrap_or(i64::MAX))
        .collect();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.meta.event_id).collect();
    let recorded: Vec<DateTime<Utc>> = rows.iter().map(|r| r.recorded_at).collect();
    let mut tx = pool.begin().await?;
    let hashes: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata, event_id, recorded_at) \
         SELECT t, i, s, et, ev, p::json, m::json, id, r \
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], \
                     $7::text[], $8::uuid[], $9::timestamptz[]) \
              WITH ORDINALITY AS u(t, i, s, et, ev, p, m, id, r, n) \
         ORDER BY n \
         RETURNING event_id, chain_hash",
    )
    .bind(column(|r| r.meta.aggregate_type.clone()))
    .bind(column(|r| r.meta.aggregate_id.clone()))
    .bind(&sequences)
    .bind(column(|r| r.meta.event_type.clone()))
    .bind(column(|r| r.stored.version.clone()))
    .bind(column(|r| r.stored.payload.clone()))
    .bind(column(|r| r.stored.metadata.clone()))
    .bind(&ids)
    .bind(&recorded)
    .fetch_all(&mut *tx)
    .await
    .context("inserting restored events (is the backbone writing to this database? stop it)")?;
    let expected: HashMap<Uuid, &Hash> = rows.iter().map(|r| (r.meta.event_id, &r.hash)).collect();
    for (event_id, hash) in &hashes {
        if expected.get(event_id).map(|h| h.as_slice()) != Some(hash.as_slice()) {
            bail!("the database chained event {event_id} to another hash than its record's");
        }
    }
    sqlx::query(
        "UPDATE outbox SET published_at = clock_timestamp() \
         WHERE published_at IS NULL AND event_id = ANY($1)",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Where the process manager starts: at the events recorded since `from` (see
/// [`streams::consumer::resume_from`] and [`rewind_flow`]); it must not be running. Returns the
/// aggregates counted as applied up to their last event before `from`.
pub async fn position_flow(
    pool: &PgPool,
    connections: &Connections,
    from: DateTime<Utc>,
) -> anyhow::Result<u64> {
    let positioned = streams::consumer::resume_from(
        pool,
        flows::order_flow::NAME,
        flows::order_flow::AGGREGATE_TYPES,
        from,
    )
    .await
    .context("positioning the process manager")?;
    rewind_flow(connections, from).await?;
    Ok(positioned)
}

/// Sets the process manager's consumer group to the first records published at or after `from`
/// on each of its partitions (a record is published after its event is recorded, so no event
/// recorded since `from` is before them; those recorded before count as applied:
/// [`streams::consumer::resume_from`]).
async fn rewind_flow(connections: &Connections, from: DateTime<Utc>) -> anyhow::Result<()> {
    let connections = connections.clone();
    tokio::task::spawn_blocking(move || rewind_flow_blocking(&connections, from)).await?
}

fn rewind_flow_blocking(connections: &Connections, from: DateTime<Utc>) -> anyhow::Result<()> {
    let group = format!("{}{}", connections.group_prefix, flows::order_flow::NAME);
    let consumer: BaseConsumer = connections
        .kafka
        .client_config()
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating a Kafka consumer (KAFKA_BOOTSTRAP_SERVERS)")?;
    let timeout = Duration::from_secs(15);
    let topics = connections.kafka.topics();
    let mut wanted = TopicPartitionList::new();
    for aggregate_type in flows::order_flow::AGGREGATE_TYPES {
        let topic = topics
            .for_aggregate(aggregate_type)
            .context("the process manager's topics")?;
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            wanted.add_partition_offset(
                &topic,
                partition.id(),
                Offset::Offset(from.timestamp_millis()),
            )?;
        }
    }
    let at_time = consumer.offsets_for_times(wanted, timeout)?;
    let mut target = TopicPartitionList::new();
    for element in at_time.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let (_, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        let rewound = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => high, // nothing recorded since `from`
        };
        target.add_partition_offset(topic, partition, Offset::Offset(rewound))?;
    }
    // The broker takes offsets from outside the group only while it has no member; one that
    // died with the lost environment stays a member until its session times out.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match consumer.commit(&target, CommitMode::Sync) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline && still_has_members(&e) => {
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "moving consumer group {group} (is the process manager running? stop it)"
                    )
                })
            }
        }
    }
}

/// The broker refused a commit because the group still has members.
fn still_has_members(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::IllegalGeneration
        )
    )
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Headers, OwnedHeaders, OwnedMessage, Timestamp};
    use streams::headers::with_chain;

    use super::*;

    /// A record as the relay sends it: `payload` stored for `sequence`, chained after `prev`.
    fn record(sequence: u64, prev: Hash, payload: &str, offset: i64) -> (OwnedMessage, Hash) {
        let meta = EventMeta {
            event_id: Uuid::from_u128(u128::from(sequence)),
            aggregate_type: "order".into(),
            aggregate_id: "o1".into(),
            sequence,
            event_type: "OrderPlaced".into(),
            event_version: "2.0".into(),
            recorded_at: "2026-12-07T18:00:00.000001Z".into(),
            ..EventMeta::default()
        };
        let stored = StoredText {
            version: "1.0".into(),
            payload: payload.into(),
            metadata: r#"{"z":"1","a":"2"}"#.into(),
        };
        let hash = EventContent {
            aggregate_type: "order",
            aggregate_id: "o1",
            sequence: i64::try_from(sequence).unwrap_or_default(),
            event_type: "OrderPlaced",
            event_version: &stored.version,
            payload: &stored.payload,
            metadata: &stored.metadata,
            event_id: meta.event_id,
            recorded_at_micros: 1_796_666_400_000_001,
        }
        .chain_hash(&prev);
        let headers = stored.add_to(with_chain(meta.to_headers(), &prev, &hash));
        (message(headers, offset), hash)
    }

    fn message(headers: OwnedHeaders, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            None,
            Some(b"o1".to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            Some(headers),
        )
    }

    #[test]
    fn a_chain_restores_once_and_redeliveries_are_skipped() {
        let (first, h1) = record(1, GENESIS, r#"{"OrderPlaced":{"b":1,"a":2}}"#, 0);
        let (second, h2) = record(2, h1, r#"{"OrderPlaced":{"x":1}}"#, 1);
        let (mut chains, mut tally) = (Chains::default(), Tally::default());
        let row = chains
            .check(&first, &mut tally)
            .expect("verifies")
            .expect("a row");
        assert_eq!(row.stored.payload, r#"{"OrderPlaced":{"b":1,"a":2}}"#);
        assert_eq!(
            row.stored.version, "1.0",
            "the stored version, not the published one"
        );
        assert!(chains
            .check(&second, &mut tally)
            .expect("verifies")
            .is_some());
        assert!(chains
            .check(&first, &mut tally)
            .expect("a redelivery")
            .is_none());
        assert_eq!(tally.duplicates, 1);
        assert_eq!(chains.hashes[&("order".into(), "o1".into())], vec![h1, h2]);
    }

    #[test]
    fn altered_gapped_or_unlinked_records_are_findings_and_stop_their_aggregate() {
        let (_, h1) = record(1, GENESIS, "{}", 0);
        // Content changed on the way: it no longer hashes to its header.
        let (forged, _) = record(1, GENESIS, "{}", 0);
        let mut headers = OwnedHeaders::new();
        for header in forged.headers().expect("headers").iter() {
            let value = if header.key == streams::headers::STORED_PAYLOAD {
                Some(&b"{\"changed\":1}"[..])
            } else {
                header.value
            };
            headers = headers.insert(rdkafka::message::Header {
                key: header.key,
                value,
            });
        }
        let mut tally = Tally::default();
        let finding = Chains::default()
            .check(&message(headers, 0), &mut tally)
            .expect_err("altered");
        assert!(finding.contains("does not hash"), "{finding}");

        // A gap: the second event before the first.
        let (second, _) = record(2, h1, "{}", 1);
        let mut chains = Chains::default();
        let finding = chains.check(&second, &mut tally).expect_err("a gap");
        assert!(finding.contains("gap"), "{finding}");
        // The aggregate stops there: its first event, arriving later, is not restored.
        let (first, _) = record(1, GENESIS, "{}", 0);
        assert!(chains.check(&first, &mut tally).expect("skipped").is_none());
        assert_eq!(tally.skipped, 1);

        // Chained to another event than the one before it.
        let (first, _) = record(1, GENESIS, "{}", 0);
        let (unlinked, _) = record(2, [7; 32], "{}", 1);
        let mut chains = Chains::default();
        chains.check(&first, &mut tally).expect("verifies");
        let finding = chains.check(&unlinked, &mut tally).expect_err("unlinked");
        assert!(finding.contains("not chained"), "{finding}");
    }

    #[test]
    fn a_record_without_its_stored_form_is_a_finding() {
        let meta = EventMeta {
            event_id: Uuid::from_u128(1),
            aggregate_type: "order".into(),
            aggregate_id: "o1".into(),
            sequence: 1,
            ..EventMeta::default()
        };
        let headers = with_chain(meta.to_headers(), &GENESIS, &[1; 32]);
        let finding = Chains::default()
            .check(&message(headers, 0), &mut Tally::default())
            .expect_err("no stored form");
        assert!(finding.contains("no stored form"), "{finding}");
    }
}
