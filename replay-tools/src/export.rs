//! `replay-tools export`: events for analysts, as JSON lines, CSV or Parquet.
//!
//! ## What is exported
//!
//! One row per event, with these columns (the same names in every format):
//!
//! | column | type (Parquet / Arrow) | |
//! |---|---|---|
//! | `event_id` | string (UUID) | stable id of the event |
//! | `aggregate_type`, `aggregate_id` | string | |
//! | `sequence` | int64 | position in its aggregate, from 1 |
//! | `event_type`, `event_version` | string | version of the payload shape as exported |
//! | `occurred_at` | timestamp\[us, UTC\], nullable | when the command that caused it ran |
//! | `recorded_at` | timestamp\[us, UTC\] | when the event store recorded it |
//! | `correlation_id`, `causation_id`, `actor`, `command_id` | string, nullable | |
//! | `payload` | string (JSON) | the event's body in the contract's JSON form |
//!
//! **Personal data.** The delivery address text and the contact of an order are stored and
//! published as `pii:v1` envelopes (see `commands::pii`); every export shows them revealed:
//! plaintext while the customer's data key exists, `[erased]` once the customer was erased.
//! So an export from the topics reads the data keys from the database too (`DATABASE_URL`).
//!
//! JSON lines carry the payload as a nested JSON object (it is JSON already) and timestamps as
//! RFC 3339 strings with microseconds; CSV carries the payload as JSON text, absent values as
//! empty fields.
//!
//! **Typed payload columns (Parquet).** When the export is restricted to exactly one event type
//! (`--event-type` once), the Parquet file also holds that event's fields as typed columns,
//! derived from its Avro contract: `payload_<field>`, nested records flattened
//! (`payload_total_minor` int64, `payload_total_currency` string), Avro `int`/`long`/`float`/
//! `double`/`boolean` as the Arrow types of the same width, `timestamp-*` as timestamp\[us, UTC\],
//! strings, enums and UUIDs as strings, and arrays and maps as JSON text. They are always
//! nullable. The `payload` JSON column stays, so the file has the same first 13 columns whatever
//! the filter. `--payload-columns json` turns the typed columns off.
//!
//! ## Sources
//!
//! - `--source store` (default): the event store, one `REPEATABLE READ` snapshot, streamed in
//!   `recorded_at` order (then aggregate, sequence). Stored payloads are upcast and put through
//!   their contract, exactly as the relay publishes them, so the rows equal those of a topic
//!   export.
//! - `--source topics`: the Kafka topics (all partitions, from the beginning up to the high
//!   watermark seen at the start), decoded through the schema registry with
//!   [`streams::EventDecoder`]; metadata comes from the record headers. A record delivered twice
//!   (at-least-once) is exported once. Use it when the store was trimmed, or to export a copy of
//!   the topics. Rows come out per partition, not globally by time.
//!
//! ## Long exports
//!
//! Rows are read and written in batches (`--batch-size`), never the whole history in memory; a
//! progress bar on stderr shows events, rate and ETA. Ctrl-C (or SIGTERM) stops after the batch
//! in hand: the file is closed properly (a Parquet file gets its footer and opens as usual), the
//! command says how many events it holds and exits non-zero. A Parquet file records whether it is
//! complete in its key-value metadata (`backbone.export.complete`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use apache_avro::Schema as AvroSchema;
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, ValueEnum};
use commands::log::{StoredEvent, STORED_COLUMNS};
use futures::TryStreamExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use schemas::{Contracts, EventContract};
use serde::Serialize;
use serde_json::Value as Json;
use sqlx::postgres::PgPoolOptions;
use streams::Published;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::privacy::Revealer;
use crate::progress;

/// The columns every export has, in order.
pub const COLUMNS: [&str; 13] = [
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "event_type",
    "event_version",
    "occurred_at",
    "recorded_at",
    "correlation_id",
    "causation_id",
    "actor",
    "command_id",
    "payload",
];

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet (Snappy), with proper column types.
    Parquet,
}

impl Format {
    const fn name(self) -> &'static str {
        match self {
            Self::Jsonl => "JSON lines",
            Self::Csv => "CSV",
            Self::Parquet => "Parquet",
        }
    }
}

/// Where the events are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// The PostgreSQL event store (`DATABASE_URL`).
    Store,
    /// The Kafka topics (`KAFKA_*`), decoded through the schema registry (`SCHEMA_REGISTRY_*`).
    Topics,
}

/// Whether a single-event-type Parquet export gets typed payload columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PayloadColumns {
    /// Typed `payload_*` columns when exactly one event type is exported (Parquet only).
    Auto,
    /// Only the `payload` JSON column.
    Json,
}

/// `replay-tools export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, value_enum)]
    pub format: Format,
    /// The file to write (created, or replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Only events of this aggregate type: order, delivery, payment, rewards or ads.
    #[arg(long)]
    pub aggregate_type: Option<String>,
    /// Only events of this type, e.g. OrderPlaced (repeat for several).
    #[arg(long = "event-type", value_name = "EVENT_TYPE")]
    pub event_types: Vec<String>,
    /// Only the events of this aggregate id (of every type unless --aggregate-type is given).
    #[arg(long)]
    pub aggregate_id: Option<String>,
    /// Only events recorded at or after this instant (RFC 3339, e.g. 2026-11-21T00:00:00Z).
    #[arg(long, value_parser = parse_instant)]
    pub from: Option<DateTime<Utc>>,
    /// Only events recorded before this instant (RFC 3339; exclusive).
    #[arg(long, value_parser = parse_instant)]
    pub to: Option<DateTime<Utc>>,
    /// Read the event store, or the Kafka topics through the schema registry.
    #[arg(long, value_enum, default_value_t = Source::Store)]
    pub source: Source,
    /// Parquet only: typed payload columns when one event type is exported, or JSON only.
    #[arg(long, value_enum, default_value_t = PayloadColumns::Auto)]
    pub payload_columns: PayloadColumns,
    /// Events per batch (read, converted and written together).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// With --source topics: skip records that cannot be decoded (counted and listed in the
    /// summary) instead of stopping at the first one.
    #[arg(long)]
    pub skip_undecodable: bool,
}

/// A `--from`/`--to` value.
fn parse_instant(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 instant ({e}); use e.g. 2026-11-21T18:00:00Z"))
}

/// One exported event.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRow {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub occurred_at: Option<DateTime<Utc>>,
    pub recorded_at: DateTime<Utc>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub actor: Option<String>,
    pub command_id: Option<String>,
    /// The body of the event in the contract's JSON form.
    pub payload: Json,
    /// No contract maps this stored payload: it is exported as stored (never the case for an
    /// event the relay could publish).
    pub payload_as_stored: bool,
}

/// The checked filters of one export.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub aggregate_type: Option<String>,
    pub event_types: Vec<String>,
    pub aggregate_id: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl Filter {
    /// Checks the filters against the backbone's aggregate types and event contracts.
    pub fn parse(args: &ExportArgs, contracts: &Contracts) -> anyhow::Result<Self> {
        if let Some(aggregate_type) = &args.aggregate_type {
            if !known_aggregate_types().contains(&aggregate_type.as_str()) {
                bail!(
                    "--aggregate-type `{aggregate_type}` is not an aggregate type of the backbone; \
                     use one of {}",
                    known_aggregate_types().join(", ")
                );
            }
        }
        for event_type in &args.event_types {
            let known = contracts.iter().any(|c| {
                c.event_type == event_type
                    && args
                        .aggregate_type
                        .as_deref()
                        .is_none_or(|a| a == c.aggregate_type)
            });
            if !known {
                let mut names: Vec<&str> = contracts
                    .iter()
                    .filter(|c| {
                        args.aggregate_type
                            .as_deref()
                            .is_none_or(|a| a == c.aggregate_type)
                    })
                    .map(|c| c.event_type)
                    .collect();
                names.sort_unstable();
                bail!(
                    "--event-type `{event_type}` is not an event type{}; known: {}",
                    args.aggregate_type
                        .as_deref()
                        .map(|a| format!(" of aggregate type `{a}`"))
                        .unwrap_or_default(),
                    names.join(", ")
                );
            }
        }
        if let Some(id) = &args.aggregate_id {
            if id.trim().is_empty() {
                bail!("--aggregate-id is empty");
            }
        }
        if let (Some(from), Some(to)) = (args.from, args.to) {
            if from >= to {
                bail!(
                    "--from ({}) must be before --to ({}): from is inclusive, to exclusive",
                    from.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                    to.to_rfc3339_opts(SecondsFormat::AutoSi, true)
                );
            }
        }
        let mut event_types = args.event_types.clone();
        event_types.sort_unstable();
        event_types.dedup();
        Ok(Self {
            aggregate_type: args.aggregate_type.clone(),
            event_types,
            aggregate_id: args.aggregate_id.clone(),
            from: args.from,
            to: args.to,
        })
    }

    /// The aggregate types whose events can pass.
    fn aggregate_types(&self, contracts: &Contracts) -> Vec<&'static str> {
        known_aggregate_types()
            .into_iter()
            .filter(|a| self.aggregate_type.as_deref().is_none_or(|t| t == *a))
            .filter(|a| {
                self.event_types.is_empty()
                    || contracts.iter().any(|c| {
                        c.aggregate_type == *a && self.event_types.iter().any(|e| e == c.event_type)
                    })
            })
            .collect()
    }

    /// The one contract every exported event has, if the filter names exactly one event type.
    fn single_contract(&self, contracts: &'static Contracts) -> Option<&'static EventContract> {
        let [event_type] = self.event_types.as_slice() else {
            return None;
        };
        let mut matching = contracts.iter().filter(|c| {
            c.event_type == event_type
                && self
                    .aggregate_type
                    .as_deref()
                    .is_none_or(|a| a == c.aggregate_type)
        });
        let first = matching.next()?;
        matching.next().is_none().then_some(first)
    }

    fn passes(&self, meta: &streams::EventMeta, recorded_at: DateTime<Utc>) -> bool {
        self.aggregate_type
            .as_deref()
            .is_none_or(|a| a == meta.aggregate_type)
            && (self.event_types.is_empty() || self.event_types.contains(&meta.event_type))
            && self
                .aggregate_id
                .as_deref()
                .is_none_or(|id| id == meta.aggregate_id)
            && self.from.is_none_or(|from| recorded_at >= from)
            && self.to.is_none_or(|to| recorded_at < to)
    }

    /// The filters, for the Parquet file's metadata.
    fn describe(&self) -> Json {
        serde_json::json!({
            "aggregate_type": self.aggregate_type,
            "event_types": self.event_types,
            "aggregate_id": self.aggregate_id,
            "from": self.from.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
            "to": self.to.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
        })
    }
}

/// The backbone's aggregate types (each has its topic).
pub fn known_aggregate_types() -> Vec<&'static str> {
    streams::config::AGGREGATE_TOPICS
        .iter()
        .map(|(aggregate, _)| *aggregate)
        .collect()
}

/// What a reader hands the writer.
enum Chunk {
    /// How many records the reader will go through (the progress bar's length).
    Total(u64),
    /// Rows to write, and how many records were gone through to find them.
    Rows { rows: Vec<ExportRow>, read: u64 },
    /// A record that could not be decoded and was skipped (`--skip-undecodable`).
    Skipped(String),
}

type Chunks = mpsc::Receiver<anyhow::Result<Chunk>>;

/// Runs `replay-tools export`, writing a one-line summary to `out`.
pub async fn run(args: ExportArgs, database_url: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let interrupted = progress::interrupted();
    let contracts = Contracts::global().context("loading the event contracts")?;
    let filter = Filter::parse(&args, contracts)?;
    if args.skip_undecodable && args.source != Source::Topics {
        bail!("--skip-undecodable applies to --source topics only");
    }
    let typed = match (args.format, args.payload_columns) {
        (Format::Parquet, PayloadColumns::Auto) => filter.single_contract(contracts),
        _ => None,
    };
    let batch_size = usize::try_from(args.batch_size).unwrap_or(1000);

    // Connect before creating the file, so a bad setting leaves nothing behind. The database
    // holds the customers' data keys, needed whatever the source.
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect(database_url)
        .await
        .context("connecting to the event store (DATABASE_URL)")?;
    let revealer = Revealer::new(pool.clone());
    enum Reader {
        Store(sqlx::PgPool),
        Topics(Box<TopicReader>),
    }
    let reader = match args.source {
        Source::Store => Reader::Store(pool),
        Source::Topics => {
            let kafka = streams::KafkaConfig::from_env().context("KAFKA_* settings")?;
            let registry =
                streams::RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
            Reader::Topics(Box::new(
                TopicReader::connect(
                    &kafka,
                    &registry,
                    filter.clone(),
                    contracts,
                    batch_size,
                    args.skip_undecodable,
                )
                .await?,
            ))
        }
    };
    let mut sink = open_sink(args.format, &args.out, typed, &filter, args.source)?;

    let (sender, chunks) = mpsc::channel(2);
    let stop_reading = CancellationToken::new();
    let reader = match reader {
        Reader::Store(pool) => tokio::spawn(read_store(
            pool,
            filter.clone(),
            contracts,
            batch_size,
            sender,
        )),
        Reader::Topics(topics) => tokio::spawn(topics.run(sender, stop_reading.clone())),
    };
    let outcome = pump(chunks, sink.as_mut(), &revealer, &interrupted).await;
    stop_reading.cancel();
    reader.abort();
    let written = match &outcome {
        Ok(done) => done.written,
        Err((partial, _)) => partial.written,
    };
    let complete = matches!(&outcome, Ok(done) if !done.interrupted);
    sink.finish(complete, written)
        .with_context(|| format!("closing {}", args.out.display()))?;
    let done = match outcome {
        Ok(done) => done,
        Err((_, error)) => {
            return Err(error.context(format!(
                "export stopped after {written} events; {} is closed and holds them",
                args.out.display()
            )))
        }
    };
    if done.interrupted {
        bail!(
            "export interrupted after {written} events: {} is a valid {} file holding them \
             (incomplete)",
            args.out.display(),
            args.format.name()
        );
    }
    let source = match args.source {
        Source::Store => "event store",
        Source::Topics => "topics",
    };
    write!(
        out,
        "exported {written} events from the {source} to {} ({}",
        args.out.display(),
        args.format.name()
    )?;
    if let Some(contract) = typed {
        write!(
            out,
            ", typed payload columns of {} {}",
            contract.event_type, contract.event_version
        )?;
    }
    if done.kept_as_stored > 0 {
        write!(
            out,
            "; {} payloads had no contract mapping and are exported as stored",
            done.kept_as_stored
        )?;
    }
    writeln!(out, ")")?;
    if done.skipped > 0 {
        writeln!(out, "skipped {} undecodable records:", done.skipped)?;
        for skipped in &done.skipped_examples {
            writeln!(out, "  {skipped}")?;
        }
        if done.skipped > done.skipped_examples.len() as u64 {
            writeln!(out, "  ...")?;
        }
    }
    Ok(())
}

/// What the writer did.
#[derive(Debug, Default)]
struct Pumped {
    written: u64,
    kept_as_stored: u64,
    skipped: u64,
    /// The first skipped records (topic/partition@offset: error).
    skipped_examples: Vec<String>,
    interrupted: bool,
}

/// Skipped records listed in the summary.
const SKIPPED_LISTED: usize = 100;

/// Writes what the reader sends until it is done, it fails, or the user interrupts; personal
/// data is revealed (or shown as erased) here, for every source and format.
async fn pump(
    mut chunks: Chunks,
    sink: &mut dyn RowSink,
    revealer: &Revealer,
    interrupted: &CancellationToken,
) -> Result<Pumped, (Pumped, anyhow::Error)> {
    let mut done = Pumped::default();
    let mut bar = None;
    loop {
        let next = tokio::select! {
            biased;
            () = interrupted.cancelled() => {
                done.interrupted = true;
                break;
            }
            next = chunks.recv() => next,
        };
        match next {
            None => break,
            Some(Ok(Chunk::Total(total))) => bar = Some(progress::bar("export", Some(total))),
            Some(Ok(Chunk::Rows { mut rows, read })) => {
                let revealed = revealer
                    .reveal(rows.iter_mut().map(|r| &mut r.payload))
                    .await;
                if let Err(e) = revealed.and_then(|()| sink.write(&rows)) {
                    if let Some(bar) = &bar {
                        bar.abandon();
                    }
                    return Err((done, e));
                }
                done.written += rows.len() as u64;
                done.kept_as_stored += rows.iter().filter(|r| r.payload_as_stored).count() as u64;
                if let Some(bar) = &bar {
                    bar.inc(read);
                }
            }
            Some(Ok(Chunk::Skipped(what))) => {
                done.skipped += 1;
                if done.skipped_examples.len() < SKIPPED_LISTED {
                    done.skipped_examples.push(what);
                }
            }
            Some(Err(e)) => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                return Err((done, e));
            }
        }
    }
    if let Some(bar) = bar {
        if done.interrupted {
            bar.abandon();
        } else {
            bar.finish_and_clear();
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------------------
// The event store

const STORE_FILTER: &str = "($1::text IS NULL OR aggregate_type = $1) \
     AND (cardinality($2::text[]) = 0 OR event_type = ANY($2)) \
     AND ($3::text IS NULL OR aggregate_id = $3) \
     AND ($4::timestamptz IS NULL OR recorded_at >= $4) \
     AND ($5::timestamptz IS NULL OR recorded_at < $5)";

/// Streams the matching events of one snapshot of the store, in recorded order, in batches.
async fn read_store(
    pool: sqlx::PgPool,
    filter: Filter,
    contracts: &'static Contracts,
    batch_size: usize,
    sender: mpsc::Sender<anyhow::Result<Chunk>>,
) {
    let result = async {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let total: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM events WHERE {STORE_FILTER}"))
                .bind(&filter.aggregate_type)
                .bind(&filter.event_types)
                .bind(&filter.aggregate_id)
                .bind(filter.from)
                .bind(filter.to)
                .fetch_one(&mut *tx)
                .await?;
        if sender
            .send(Ok(Chunk::Total(u64::try_from(total).unwrap_or(0))))
            .await
            .is_err()
        {
            return Ok(());
        }
        let sql = format!(
            "SELECT {STORED_COLUMNS} FROM events e WHERE {STORE_FILTER} \
             ORDER BY e.recorded_at, e.aggregate_type, e.aggregate_id, e.sequence"
        );
        let mut rows = sqlx::query_as::<_, StoredEvent>(&sql)
            .bind(&filter.aggregate_type)
            .bind(&filter.event_types)
            .bind(&filter.aggregate_id)
            .bind(filter.from)
            .bind(filter.to)
            .fetch(&mut *tx);
        let mut batch = Vec::with_capacity(batch_size);
        while let Some(stored) = rows.try_next().await? {
            batch.push(from_store(stored, contracts));
            if batch.len() >= batch_size {
                let rows = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
                let read = rows.len() as u64;
                if sender.send(Ok(Chunk::Rows { rows, read })).await.is_err() {
                    return Ok(());
                }
            }
        }
        if !batch.is_empty() {
            let read = batch.len() as u64;
            let _ = sender.send(Ok(Chunk::Rows { rows: batch, read })).await;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        let _ = sender.send(Err(e.context("reading the event store"))).await;
    }
}

/// A stored event as the relay publishes it: upcast, mapped through its contract.
fn from_store(stored: StoredEvent, contracts: &Contracts) -> ExportRow {
    let (event_id, aggregate_type, aggregate_id, sequence, recorded_at) = (
        stored.event_id,
        stored.aggregate_type.clone(),
        stored.aggregate_id.clone(),
        stored.sequence,
        stored.recorded_at,
    );
    let published = Published::of(stored);
    let body = published.body();
    let Published { meta, .. } = published;
    let text = |value: String| Some(value).filter(|v| !v.is_empty());
    let occurred_at = parse_instant(&meta.occurred_at).ok();
    let (event_version, payload, payload_as_stored) = match contracts
        .get(&aggregate_type, &meta.event_type)
        .and_then(|c| Ok((c, c.to_avro(&body)?)))
        .and_then(|(c, avro)| Ok((c, c.from_avro_as_is(&avro)?)))
    {
        Ok((contract, json)) => (contract.event_version.to_owned(), json, false),
        Err(_) => (meta.event_version, body, true),
    };
    ExportRow {
        event_id,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type: meta.event_type,
        event_version,
        occurred_at,
        recorded_at,
        correlation_id: text(meta.correlation_id),
        causation_id: text(meta.causation_id),
        actor: text(meta.actor),
        command_id: text(meta.command_id),
        payload,
        payload_as_stored,
    }
}

// ---------------------------------------------------------------------------------------------
// The topics

/// Reads the event topics from the beginning to the high watermarks seen at the start.
struct TopicReader {
    consumer: StreamConsumer,
    decoder: streams::EventDecoder,
    /// Per (topic, partition): the offset after the last record to read.
    ends: HashMap<(String, i32), i64>,
    total: u64,
    filter: Filter,
    batch_size: usize,
    skip_undecodable: bool,
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

impl TopicReader {
    async fn connect(
        kafka: &streams::KafkaConfig,
        registry: &streams::RegistryConfig,
        filter: Filter,
        contracts: &Contracts,
        batch_size: usize,
        skip_undecodable: bool,
    ) -> anyhow::Result<Self> {
        let topic_names = kafka.topics();
        let topics: Vec<String> = filter
            .aggregate_types(contracts)
            .into_iter()
            .filter_map(|a| topic_names.for_aggregate(a))
            .collect();
        let consumer: StreamConsumer = kafka
            .client_config()
            .set(
                "group.id",
                format!("replay-tools-export-{}", Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "fetch.wait.max.ms",
                kafka.kafka_fetch_wait_max_ms.to_string(),
            )
            .create()
            .context("creating the Kafka consumer (KAFKA_*)")?;
        let decoder = streams::EventDecoder::new(registry)
            .map_err(|e| anyhow!("schema registry (SCHEMA_REGISTRY_*): {e}"))?;
        // The broker calls below block: keep them off the runtime's worker threads.
        let (consumer, ends, total) = tokio::task::spawn_blocking(move || {
            let mut ends = HashMap::new();
            let mut total = 0u64;
            let mut assignment = TopicPartitionList::new();
            for topic in &topics {
                let metadata = consumer
                    .fetch_metadata(Some(topic.as_str()), KAFKA_TIMEOUT)
                    .with_context(|| format!("reading the metadata of topic {topic}"))?;
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .filter(|t| t.error().is_none())
                    .map(|t| t.partitions().len())
                    .unwrap_or(0);
                if partitions == 0 {
                    bail!(
                        "topic {topic} does not exist on the broker (KAFKA_BOOTSTRAP_SERVERS, \
                         KAFKA_TOPIC_PREFIX)"
                    );
                }
                for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
                    let (low, high) = consumer
                        .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
                        .with_context(|| format!("reading the offsets of {topic}/{partition}"))?;
                    if high > low {
                        total += u64::try_from(high - low).unwrap_or(0);
                        ends.insert((topic.clone(), partition), high);
                        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
                    }
                }
            }
            if !ends.is_empty() {
                consumer.assign(&assignment)?;
            }
            Ok((consumer, ends, total))
        })
        .await??;
        Ok(Self {
            consumer,
            decoder,
            ends,
            total,
            filter,
            batch_size,
            skip_undecodable,
        })
    }

    async fn run(
        self: Box<Self>,
        sender: mpsc::Sender<anyhow::Result<Chunk>>,
        stop: CancellationToken,
    ) {
        let total = self.total;
        if sender.send(Ok(Chunk::Total(total))).await.is_err() {
            return;
        }
        if let Err(e) = (*self).read(&sender, &stop).await {
            let _ = sender.send(Err(e.context("reading the topics"))).await;
        }
    }

    async fn read(
        mut self,
        sender: &mpsc::Sender<anyhow::Result<Chunk>>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        // Per aggregate, the last sequence exported: a record sent twice is exported once.
        let mut last_sequence: HashMap<(String, String), u64> = HashMap::new();
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut read = 0u64;
        while !self.ends.is_empty() && !stop.is_cancelled() {
            let message =
                match tokio::time::timeout(Duration::from_secs(2), self.consumer.recv()).await {
                    Ok(message) => message.context("consuming")?,
                    Err(_) => {
                        // Nothing for a while: a partition may end with offsets that hold no record.
                        self.drop_finished_partitions()?;
                        if !batch.is_empty() {
                            let rows = std::mem::take(&mut batch);
                            if sender.send(Ok(Chunk::Rows { rows, read })).await.is_err() {
                                return Ok(());
                            }
                            read = 0;
                        }
                        continue;
                    }
                };
            let key = (message.topic().to_owned(), message.partition());
            let Some(&end) = self.ends.get(&key) else {
                continue;
            };
            if message.offset() >= end {
                self.ends.remove(&key);
                continue;
            }
            if message.offset() + 1 >= end {
                self.ends.remove(&key);
            }
            read += 1;
            match self.decode(&message).await {
                Ok(Some(row)) => {
                    let aggregate = (row.aggregate_type.clone(), row.aggregate_id.clone());
                    let sequence = u64::try_from(row.sequence).unwrap_or(0);
                    let seen = last_sequence.get(&aggregate).copied().unwrap_or(0);
                    if sequence > seen {
                        last_sequence.insert(aggregate, sequence);
                        batch.push(row);
                    }
                }
                Ok(None) => {}
                Err(e) if self.skip_undecodable => {
                    let what = format!(
                        "{}/{}@{}: {e:#}",
                        message.topic(),
                        message.partition(),
                        message.offset()
                    );
                    if sender.send(Ok(Chunk::Skipped(what))).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    // What came before it is written; the file then ends there.
                    let rows = std::mem::take(&mut batch);
                    let _ = sender.send(Ok(Chunk::Rows { rows, read })).await;
                    return Err(e.context(format!(
                        "record {}/{}@{} cannot be decoded (--skip-undecodable skips such \
                         records)",
                        message.topic(),
                        message.partition(),
                        message.offset()
                    )));
                }
            }
            // Filtered-out records move the progress bar too.
            let batch_rows = self.batch_size as u64;
            if batch.len() >= self.batch_size
                || read >= batch_rows.saturating_mul(10)
                || self.ends.is_empty()
            {
                let rows = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size));
                if sender.send(Ok(Chunk::Rows { rows, read })).await.is_err() {
                    return Ok(());
                }
                read = 0;
            }
        }
        if !batch.is_empty() || read > 0 {
            let _ = sender.send(Ok(Chunk::Rows { rows: batch, read })).await;
        }
        Ok(())
    }

    /// Forgets the partitions whose position reached the end.
    fn drop_finished_partitions(&mut self) -> anyhow::Result<()> {
        let positions = self.consumer.position()?;
        for element in positions.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if let (Some(&end), Offset::Offset(position)) = (self.ends.get(&key), element.offset())
            {
                if position >= end {
                    self.ends.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// The row of a record, or `None` if the filter leaves it out (checked on the headers,
    /// before the payload is decoded).
    async fn decode(&self, message: &impl Message) -> anyhow::Result<Option<ExportRow>> {
        let meta = streams::EventMeta::from_headers(message.headers())?;
        let recorded_at = parse_instant(&meta.recorded_at)
            .map_err(|e| anyhow!("header recorded_at `{}`: {e}", meta.recorded_at))?;
        if !self.filter.passes(&meta, recorded_at) {
            return Ok(None);
        }
        let mut attempt = 0;
        let decoded = loop {
            attempt += 1;
            match self.decoder.decode(message).await {
                Ok(decoded) => break decoded,
                Err(e) if e.is_retryable() && attempt < 5 => {
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let optional = |s: String| (!s.is_empty()).then_some(s);
        let payload = decoded.payload()?;
        let meta = decoded.meta;
        Ok(Some(ExportRow {
            event_id: meta.event_id,
            sequence: i64::try_from(meta.sequence)?,
            event_type: decoded.contract.event_type.to_owned(),
            event_version: decoded.contract.event_version.to_owned(),
            occurred_at: parse_instant(&meta.occurred_at).ok(),
            recorded_at,
            correlation_id: optional(meta.correlation_id),
            causation_id: optional(meta.causation_id),
            actor: optional(meta.actor),
            command_id: optional(meta.command_id),
            aggregate_type: meta.aggregate_type,
            aggregate_id: meta.aggregate_id,
            payload,
            payload_as_stored: false,
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// The formats

/// Where rows go.
trait RowSink: Send {
    fn write(&mut self, rows: &[ExportRow]) -> anyhow::Result<()>;
    /// Closes the file so that it is valid, whether the export completed or not.
    fn finish(self: Box<Self>, complete: bool, rows: u64) -> anyhow::Result<()>;
}

fn open_sink(
    format: Format,
    path: &Path,
    typed: Option<&'static EventContract>,
    filter: &Filter,
    source: Source,
) -> anyhow::Result<Box<dyn RowSink>> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(match format {
        Format::Jsonl => Box::new(JsonLines(BufWriter::new(file))),
        Format::Csv => {
            let mut writer = csv::Writer::from_writer(file);
            writer.write_record(COLUMNS)?;
            writer.flush()?;
            Box::new(Csv(writer))
        }
        Format::Parquet => Box::new(ParquetSink::create(file, typed, filter, source)?),
    })
}

fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A row as one JSON line.
#[derive(Serialize)]
struct JsonRow<'a> {
    event_id: Uuid,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    occurred_at: Option<String>,
    recorded_at: String,
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    actor: Option<&'a str>,
    command_id: Option<&'a str>,
    payload: &'a Json,
}

impl<'a> From<&'a ExportRow> for JsonRow<'a> {
    fn from(row: &'a ExportRow) -> Self {
        Self {
            event_id: row.event_id,
            aggregate_type: &row.aggregate_type,
            aggregate_id: &row.aggregate_id,
            sequence: row.sequence,
            event_type: &row.event_type,
            event_version: &row.event_version,
            occurred_at: row.occurred_at.map(instant),
            recorded_at: instant(row.recorded_at),
            correlation_id: row.correlation_id.as_deref(),
            causation_id: row.causation_id.as_deref(),
            actor: row.actor.as_deref(),
            command_id: row.command_id.as_deref(),
            payload: &row.payload,
        }
    }
}

struct JsonLines(BufWriter<File>);

impl RowSink for JsonLines {
    fn write(&mut self, rows: &[ExportRow]) -> anyhow::Result<()> {
        for row in rows {
            serde_json::to_writer(&mut self.0, &JsonRow::from(row))?;
            self.0.write_all(b"\n")?;
        }
        self.0.flush()?;
        Ok(())
    }

    fn finish(mut self: Box<Self>, _complete: bool, _rows: u64) -> anyhow::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_all()?;
        Ok(())
    }
}

struct Csv(csv::Writer<File>);

impl RowSink for Csv {
    fn write(&mut self, rows: &[ExportRow]) -> anyhow::Result<()> {
        for row in rows {
            let optional = |s: &Option<String>| s.clone().unwrap_or_default();
            self.0.write_record([
                row.event_id.to_string(),
                row.aggregate_type.clone(),
                row.aggregate_id.clone(),
                row.sequence.to_string(),
                row.event_type.clone(),
                row.event_version.clone(),
                row.occurred_at.map(instant).unwrap_or_default(),
                instant(row.recorded_at),
                optional(&row.correlation_id),
                optional(&row.causation_id),
                optional(&row.actor),
                optional(&row.command_id),
                row.payload.to_string(),
            ])?;
        }
        self.0.flush()?;
        Ok(())
    }

    fn finish(mut self: Box<Self>, _complete: bool, _rows: u64) -> anyhow::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_all()?;
        Ok(())
    }
}

/// Rows per Parquet row group.
const ROW_GROUP_ROWS: usize = 64 * 1024;

struct ParquetSink {
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    typed: Vec<TypedColumn>,
}

impl ParquetSink {
    fn create(
        file: File,
        contract: Option<&'static EventContract>,
        filter: &Filter,
        source: Source,
    ) -> anyhow::Result<Self> {
        let typed = contract.map(typed_columns).unwrap_or_default();
        let timestamp = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let mut fields = vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("aggregate_type", DataType::Utf8, false),
            Field::new("aggregate_id", DataType::Utf8, false),
            Field::new("sequence", DataType::Int64, false),
            Field::new("event_type", DataType::Utf8, false),
            Field::new("event_version", DataType::Utf8, false),
            Field::new("occurred_at", timestamp.clone(), true),
            Field::new("recorded_at", timestamp, false),
            Field::new("correlation_id", DataType::Utf8, true),
            Field::new("causation_id", DataType::Utf8, true),
            Field::new("actor", DataType::Utf8, true),
            Field::new("command_id", DataType::Utf8, true),
            Field::new("payload", DataType::Utf8, false),
        ];
        fields.extend(
            typed
                .iter()
                .map(|c| Field::new(c.name.clone(), c.kind.data_type(), true)),
        );
        let schema = Arc::new(Schema::new(fields));
        let mut metadata = vec![
            KeyValue::new(
                "backbone.export.source".to_owned(),
                match source {
                    Source::Store => "store",
                    Source::Topics => "topics",
                }
                .to_owned(),
            ),
            KeyValue::new(
                "backbone.export.filter".to_owned(),
                filter.describe().to_string(),
            ),
        ];
        if let Some(contract) = contract.filter(|_| !typed.is_empty()) {
            metadata.push(KeyValue::new(
                "backbone.export.payload_contract".to_owned(),
                format!("{} {}", contract.record_name, contract.event_version),
            ));
        }
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_created_by(format!("replay-tools {}", env!("CARGO_PKG_VERSION")))
            .set_key_value_metadata(Some(metadata))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties))?;
        Ok(Self {
            writer,
            schema,
            typed,
        })
    }

    fn batch(&self, rows: &[ExportRow]) -> anyhow::Result<RecordBatch> {
        let strings = |f: fn(&ExportRow) -> Option<&str>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<StringArray>())
        };
        let timestamps = |f: fn(&ExportRow) -> Option<DateTime<Utc>>| -> ArrayRef {
            Arc::new(
                rows.iter()
                    .map(|r| f(r).map(|t| t.timestamp_micros()))
                    .collect::<TimestampMicrosecondArray>()
                    .with_timezone("UTC"),
            )
        };
        let event_ids: Vec<String> = rows.iter().map(|r| r.event_id.to_string()).collect();
        let payloads: Vec<String> = rows.iter().map(|r| r.payload.to_string()).collect();
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(&event_ids)),
            strings(|r| Some(r.aggregate_type.as_str())),
            strings(|r| Some(r.aggregate_id.as_str())),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.sequence),
            )),
            strings(|r| Some(r.event_type.as_str())),
            strings(|r| Some(r.event_version.as_str())),
            timestamps(|r| r.occurred_at),
            timestamps(|r| Some(r.recorded_at)),
            strings(|r| r.correlation_id.as_deref()),
            strings(|r| r.causation_id.as_deref()),
            strings(|r| r.actor.as_deref()),
            strings(|r| r.command_id.as_deref()),
            Arc::new(StringArray::from_iter_values(&payloads)),
        ];
        for column in &self.typed {
            columns.push(column.array(rows)?);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

impl RowSink for ParquetSink {
    fn write(&mut self, rows: &[ExportRow]) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = self.batch(rows)?;
        self.writer.write(&batch)?;
        Ok(())
    }

    fn finish(self: Box<Self>, complete: bool, rows: u64) -> anyhow::Result<()> {
        let Self { mut writer, .. } = *self;
        writer.append_key_value_metadata(KeyValue::new(
            "backbone.export.complete".to_owned(),
            complete.to_string(),
        ));
        writer.append_key_value_metadata(KeyValue::new(
            "backbone.export.rows".to_owned(),
            rows.to_string(),
        ));
        let file = writer.into_inner()?;
        file.sync_all()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Typed payload columns (Parquet, one event type)

/// The Arrow type of a payload leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeafKind {
    Boolean,
    Int32,
    Int64,
    Float32,
    Float64,
    Utf8,
    Timestamp,
    /// Arrays, maps and anything else: JSON text.
    Json,
}

impl LeafKind {
    fn data_type(self) -> DataType {
        match self {
            Self::Boolean => DataType::Boolean,
            Self::Int32 => DataType::Int32,
            Self::Int64 => DataType::Int64,
            Self::Float32 => DataType::Float32,
            Self::Float64 => DataType::Float64,
            Self::Utf8 | Self::Json => DataType::Utf8,
            Self::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }
}

/// One typed column: a leaf of the payload, at `path`.
#[derive(Debug, Clone)]
struct TypedColumn {
    name: String,
    path: Vec<String>,
    kind: LeafKind,
}

/// The typed columns of a contract; none if two leaves would get the same column name.
fn typed_columns(contract: &EventContract) -> Vec<TypedColumn> {
    let mut names = HashMap::new();
    collect_names(&contract.schema, &mut names);
    let mut columns = Vec::new();
    leaves(&contract.schema, &names, &mut Vec::new(), &mut columns, 0);
    let mut seen = std::collections::HashSet::new();
    if columns.iter().all(|c| seen.insert(c.name.clone())) {
        columns
    } else {
        Vec::new()
    }
}

fn collect_names(schema: &AvroSchema, names: &mut HashMap<String, AvroSchema>) {
    match schema {
        AvroSchema::Record(r) => {
            names.insert(r.name.fullname(None), schema.clone());
            for field in &r.fields {
                collect_names(&field.schema, names);
            }
        }
        AvroSchema::Enum(e) => {
            names.insert(e.name.fullname(None), schema.clone());
        }
        AvroSchema::Array(a) => collect_names(&a.items, names),
        AvroSchema::Map(m) => collect_names(&m.types, names),
        AvroSchema::Union(u) => {
            for variant in u.variants() {
                collect_names(variant, names);
            }
        }
        _ => {}
    }
}

/// Nesting deeper than this is exported as JSON text.
const MAX_DEPTH: usize = 6;

fn leaves(
    schema: &AvroSchema,
    names: &HashMap<String, AvroSchema>,
    path: &mut Vec<String>,
    out: &mut Vec<TypedColumn>,
    depth: usize,
) {
    let schema = match schema {
        AvroSchema::Ref { name } => match names.get(&name.fullname(None)) {
            Some(found) => found,
            None => return push_leaf(path, LeafKind::Json, out),
        },
        other => other,
    };
    let kind = match schema {
        AvroSchema::Record(r) if depth < MAX_DEPTH => {
            for field in &r.fields {
                path.push(field.name.clone());
                leaves(&field.schema, names, path, out, depth + 1);
                path.pop();
            }
            return;
        }
        AvroSchema::Union(u) => {
            let mut values = u
                .variants()
                .iter()
                .filter(|v| !matches!(v, AvroSchema::Null));
            match (values.next(), values.next()) {
                (Some(only), None) => return leaves(only, names, path, out, depth),
                _ => LeafKind::Json,
            }
        }
        AvroSchema::Boolean => LeafKind::Boolean,
        AvroSchema::Int => LeafKind::Int32,
        AvroSchema::Long => LeafKind::Int64,
        AvroSchema::Float => LeafKind::Float32,
        AvroSchema::Double => LeafKind::Float64,
        AvroSchema::String | AvroSchema::Enum(_) | AvroSchema::Uuid(_) => LeafKind::Utf8,
        AvroSchema::TimestampMicros | AvroSchema::TimestampMillis => LeafKind::Timestamp,
        _ => LeafKind::Json,
    };
    push_leaf(path, kind, out);
}

fn push_leaf(path: &[String], kind: LeafKind, out: &mut Vec<TypedColumn>) {
    if path.is_empty() {
        return;
    }
    out.push(TypedColumn {
        name: format!("payload_{}", path.join("_")),
        path: path.to_vec(),
        kind,
    });
}

impl TypedColumn {
    fn value<'a>(&self, payload: &'a Json) -> Option<&'a Json> {
        let mut value = payload;
        for step in &self.path {
            value = value.get(step)?;
        }
        (!value.is_null()).then_some(value)
    }

    fn mismatch(&self, row: &ExportRow, value: &Json) -> anyhow::Error {
        anyhow!(
            "event {} ({} #{} of {}): payload field {} is {value}, not {:?}",
            row.event_id,
            row.event_type,
            row.sequence,
            row.aggregate_id,
            self.path.join("."),
            self.kind
        )
    }

    fn array(&self, rows: &[ExportRow]) -> anyhow::Result<ArrayRef> {
        let values = rows.iter().map(|row| (row, self.value(&row.payload)));
        Ok(match self.kind {
            LeafKind::Boolean => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| v.as_bool().ok_or_else(|| self.mismatch(row, v)))
                            .transpose()
                    })
                    .collect::<anyhow::Result<BooleanArray>>()?,
            ),
            LeafKind::Int32 => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| {
                            v.as_i64()
                                .and_then(|i| i32::try_from(i).ok())
                                .ok_or_else(|| self.mismatch(row, v))
                        })
                        .transpose()
                    })
                    .collect::<anyhow::Result<Int32Array>>()?,
            ),
            LeafKind::Int64 => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| v.as_i64().ok_or_else(|| self.mismatch(row, v)))
                            .transpose()
                    })
                    .collect::<anyhow::Result<Int64Array>>()?,
            ),
            LeafKind::Float32 => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| {
                            // A `float` field holds 32 bits; narrowing gives its value back.
                            #[allow(clippy::cast_possible_truncation)]
                            v.as_f64()
                                .map(|f| f as f32)
                                .ok_or_else(|| self.mismatch(row, v))
                        })
                        .transpose()
                    })
                    .collect::<anyhow::Result<Float32Array>>()?,
            ),
            LeafKind::Float64 => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| v.as_f64().ok_or_else(|| self.mismatch(row, v)))
                            .transpose()
                    })
                    .collect::<anyhow::Result<Float64Array>>()?,
            ),
            LeafKind::Utf8 | LeafKind::Json => Arc::new(
                values
                    .map(|(_, v)| {
                        v.map(|v| match v {
                            Json::String(s) if self.kind == LeafKind::Utf8 => s.clone(),
                            other => other.to_string(),
                        })
                    })
                    .collect::<StringArray>(),
            ),
            LeafKind::Timestamp => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| {
                            v.as_str()
                                .and_then(|s| parse_instant(s).ok())
                                .map(|t| t.timestamp_micros())
                                .ok_or_else(|| self.mismatch(row, v))
                        })
                        .transpose()
                    })
                    .collect::<anyhow::Result<TimestampMicrosecondArray>>()?
                    .with_timezone("UTC"),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_placed_contract_gives_flat_typed_columns() {
        let contracts = Contracts::global().expect("contracts");
        let contract = contracts.get("order", "OrderPlaced").expect("OrderPlaced");
        let columns = typed_columns(contract);
        let kind = |name: &str| {
            columns
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.kind)
                .unwrap_or_else(|| panic!("no column {name} in {columns:?}"))
        };
        assert_eq!(kind("payload_customer_id"), LeafKind::Utf8);
        assert_eq!(kind("payload_region"), LeafKind::Utf8);
        assert_eq!(kind("payload_lines"), LeafKind::Json);
        assert_eq!(kind("payload_total_minor"), LeafKind::Int64);
        assert_eq!(kind("payload_subtotal_minor"), LeafKind::Int64);
        assert_eq!(kind("payload_rating_window_days"), LeafKind::Int32);
        assert_eq!(kind("payload_free_delivery"), LeafKind::Boolean);
        assert_eq!(kind("payload_placed_at"), LeafKind::Timestamp);
        assert_eq!(kind("payload_promotion_code"), LeafKind::Utf8);
    }

    #[test]
    fn instants_must_be_rfc_3339() {
        assert!(parse_instant("2026-11-21T18:00:00Z").is_ok());
        assert!(parse_instant("2026-11-21T18:00:00+01:00").is_ok());
        assert!(parse_instant("yesterday").is_err());
        assert!(parse_instant("2026-11-21").is_err());
    }
}
