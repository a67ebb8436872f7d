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

mod columns;
mod formats;
mod store;
mod topics;

use columns::*;
use formats::*;
use store::*;
use topics::*;

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
    let reader = Reader::open(&args, pool, &filter, contracts, batch_size).await?;
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
    report(out, &args, typed, written, &done)
}

/// Where an export reads.
enum Reader {
    Store(sqlx::PgPool),
    Topics(Box<TopicReader>),
}

impl Reader {
    async fn open(
        args: &ExportArgs,
        pool: sqlx::PgPool,
        filter: &Filter,
        contracts: &'static Contracts,
        batch_size: usize,
    ) -> anyhow::Result<Self> {
        Ok(match args.source {
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
        })
    }
}

/// What the export wrote, said to the analyst.
fn report(
    out: &mut impl Write,
    args: &ExportArgs,
    typed: Option<&EventContract>,
    written: u64,
    done: &Pumped,
) -> anyhow::Result<()> {
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
