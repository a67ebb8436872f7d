//! `replay-tools rebuild`: a read model rebuilt from the topics or from the event store into a
//! shadow schema while the live one keeps serving, then (`--swap`) swapped in atomically.
//!
//! ## The same handlers write the shadow, through the transaction's search path
//!
//! A read model lives in the schema named after it; the shadow is the schema `<name>__rebuild`.
//! Handlers name their tables without a schema (`INSERT INTO orders ...`) and every transaction
//! that runs them first points its `search_path` at one schema and nothing else
//! ([`streams::consumer::use_schema`]): the live one in the projector, the shadow here (the
//! runtime's dedup, then `Projection::apply_batch`: [`streams::consumer::apply_replayed`]).
//! A table missing from that schema is an error, never another schema's table. The live
//! projector and the API never wait on the rebuild, and the rebuild's transactions run side by
//! side: from the topics, `--appliers` transactions (default 2) each apply the partitions
//! `p mod appliers` (an aggregate lives in one partition, so its events keep their order; a
//! deadlock on shared rows, such as a rollup's, is retried without counting as a failure).
//!
//! The projection's DDL (`.sql`) names the live schema, so the two steps that run it (creating
//! the shadow, and building its indexes at the end) rename the live schema to `<name>__live`
//! and the shadow to `<name>` inside their transaction and back before committing. Catalog
//! changes are transactional: no other session sees the renames, which cancel out at commit.
//! Only one rebuild per read model runs at a time (an advisory lock).
//!
//! The run's report ends with where the time went (reading, decoding, waiting on each other,
//! handlers, bookkeeping, commit; the appliers' phases summed): the reader fetches and decodes
//! the next batches while the current ones are applied, so whichever side waits less is the
//! bottleneck.
//!
//! The runtime's bookkeeping lives in the shadow too (`applied`, `checkpoints`, `dead_letters`),
//! with the rebuild's own `rebuild_state` (source, as-of instant, position in the event store):
//! an interrupted rebuild (Ctrl-C, crash) continues where its last transaction committed
//! (`--resume`).
//!
//! ## Bulk mode: unlogged, without the query-only indexes, until the history is applied
//!
//! A shadow is built as a bulk load: its tables are created `UNLOGGED` (no write-ahead log for
//! the rows nor for their index entries, nothing for a checkpoint to flush) and without the
//! indexes that only queries read ([`Projection::query_only_indexes`]). Once the history is
//! applied, its tables are made durable a few side by side (`SET LOGGED`: a sequential rewrite
//! whose indexes are rebuilt by sorting), then one transaction creates the missing indexes from
//! the projection's own DDL and makes `rebuild_state` durable last; only then is the model
//! swapped in or handed over as an as-of model. The price is on a
//! database crash: PostgreSQL empties unlogged tables when it recovers, bookkeeping included,
//! so a rebuild interrupted by a crash of the database (not of this tool) starts over, and
//! says so. A standby sees the shadow once it is durable, before any swap.
//!
//! ## Sources
//!
//! - **topics**: each partition of the read model's topics, assigned (consumer group
//!   `<PROJECTOR_GROUP_PREFIX><name>-rebuild`, used for nothing else) from the shadow's
//!   checkpoint (the beginning at first) up to its end offset captured when the run started.
//!   A partition whose beginning was trimmed by retention is refused: use the store.
//! - **store**: the `events` table in recorded order (one snapshot, streamed), mapped to the
//!   same decoded events the topics carry (upcast, then mapped to the Avro contract), then a
//!   sweep for the events whose transactions committed after that snapshot with an earlier
//!   `recorded_at`, in aggregate order.
//!
//! With `--as-of TIME` only the events recorded at or before TIME are applied: the read model as
//! it was then, to query or `check`; it is never swapped in (the live projector would meet
//! sequence gaps).
//!
//! ## The swap
//!
//! The live projector's consumer group is past the records where the rebuild stopped (it kept
//! serving meanwhile) and will not read them again. So the swap, in one transaction, locks the
//! live model's `applied`, `checkpoints` and `dead_letters` (EXCLUSIVE: readers go on, the
//! projector's next batch waits), applies from the event store the events the live model has
//! applied and the shadow has not (first once without the lock, so that little is left), checks
//! that the shadow has every aggregate at least as far as the live model, merges the
//! checkpoints, carries over the state a worker keeps beside the read model (the notifications
//! webhook log), and renames live → `<name>__old_<UTC time>` and shadow → `<name>`. Readers see
//! the old model or the new one, never a mix. The waiting projector batch then runs against the
//! new tables (PostgreSQL resolves the names again after a lock wait), and whatever the
//! projector reads from then on, wherever its consumer group stands, is at or below the rebuilt
//! model's last sequence of its aggregate (a duplicate, skipped) or the next one (applied once).

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, ValueEnum};
use commands::log::{StoredEvent, STORED_COLUMNS};
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use streams::consumer::{
    apply_isolating, apply_replayed, create_tables, use_schema, Projection, ProjectionError,
    ProjectorConfig, ReplayVerdict, ReplayedEvent,
};
use streams::{
    DecodedEvent, EventDecoder, EventMeta, KafkaConfig, Published, RegistryConfig, Topics,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::progress;

mod apply;
mod feed;
mod report;
mod shadow;
mod swap;

pub use feed::bulk_consumer_config;
use feed::*;
use report::*;
use swap::*;

/// Where a rebuild reads the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// The read model's topics, from the beginning to their ends when the rebuild started.
    Topics,
    /// The event store, in recorded order (when the topics were trimmed).
    Store,
}

impl Source {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Topics => "topics",
            Self::Store => "store",
        }
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        match text {
            "topics" => Ok(Self::Topics),
            "store" => Ok(Self::Store),
            other => bail!("unknown rebuild source `{other}`"),
        }
    }
}

/// `replay-tools rebuild`.
#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    /// The read model: tracking, ratings, analytics, ads or notifications.
    pub read_model: String,
    /// Where the events come from [default: topics; with --resume, what the rebuild started
    /// with].
    #[arg(long, value_enum)]
    pub source: Option<Source>,
    /// Only events recorded at or before this instant (RFC 3339, e.g. 2026-11-21T18:00:00Z):
    /// the read model as it was then, left in `<read model>__rebuild` to query or `check`.
    #[arg(long, value_name = "TIME")]
    pub as_of: Option<String>,
    /// Continues an interrupted rebuild from the shadow's checkpoint.
    #[arg(long, conflicts_with = "restart")]
    pub resume: bool,
    /// Discards an unfinished rebuild (its shadow) and starts over.
    #[arg(long)]
    pub restart: bool,
    /// Swaps the rebuilt model in when it is done, atomically; the previous one is kept as
    /// `<read model>__old_<UTC time>`.
    #[arg(long, conflicts_with = "as_of")]
    pub swap: bool,
    /// Events applied per transaction.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Transactions applied side by side when reading the topics, each for its share of the
    /// partitions (an aggregate lives in one partition, so its events stay in order). The store
    /// is read in one recorded order and applied by one.
    #[arg(long, default_value_t = DEFAULT_APPLIERS, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub appliers: u32,
}

/// Transactions a rebuild from the topics applies side by side unless `--appliers` says
/// otherwise: one applier leaves the machine partly idle while it alternates between preparing
/// a batch and waiting on PostgreSQL.
pub const DEFAULT_APPLIERS: u32 = 2;

/// Events applied per rebuild transaction unless `--batch-size` says otherwise. Measured
/// (analytics, 200,000 events from the topics, when each transaction still renamed the schemas):
/// the renames and the commit cost 0.6 s of 16.7 s at 2,000 events per transaction, 0.1 s of
/// 15.8 s at 10,000; an interruption still stops
/// within a second or so (the batch in hand is finished).
pub const DEFAULT_BATCH_SIZE: u32 = 10_000;

/// Tables made durable side by side at the end of a rebuild.
const FINISHING_SIDE_BY_SIDE: usize = 3;

/// The shadow schema a rebuild of `live` builds.
pub fn shadow_name(live: &str) -> String {
    format!("{live}__rebuild")
}

/// Tables of the runtime's and the rebuild's bookkeeping: where a projector stands, not what it
/// projected (and so not compared by `check`). `applied` is compared: it is what was applied.
pub const BOOKKEEPING_TABLES: [&str; 4] = ["checkpoints", "lag", "dead_letters", "rebuild_state"];

/// What a worker keeps beside a read model, in its schema, that no event produces: a rebuild
/// cannot recreate it, so the swap carries it over, and `check` leaves it out.
#[derive(Debug, Clone, Copy)]
pub struct WorkerState {
    /// Tables written by the worker only.
    pub tables: &'static [&'static str],
    /// `(table, column)` pairs written by the worker in the projection's tables.
    pub columns: &'static [(&'static str, &'static str)],
    /// SQL run at the swap (`{live}` and `{shadow}` replaced), under the lock.
    carry_over: &'static str,
    /// SQL run on the model rebuilt by a restore after a disaster (`{live}` replaced): the
    /// worker's effects for the history count as done, since nobody can tell which of them the
    /// lost environment carried out (at most once).
    history_done: &'static str,
}

/// The worker state of a read model, if it has one.
pub fn worker_state(read_model: &str) -> Option<WorkerState> {
    match read_model {
        // The webhook log is what makes a notification's webhook at most once, even across a
        // rebuild: carried over (pointing at the rebuilt records' ids), and the records it
        // names are marked claimed, as the worker had them.
        "notifications" => Some(WorkerState {
            tables: &["webhook_deliveries"],
            columns: &[("records", "webhook_claimed")],
            carry_over: "INSERT INTO {shadow}.webhook_deliveries \
                   (customer_id, event_id, notification_id, status, attempted_at, http_status, \
                    error, delivered_at, finished_at) \
                 SELECT d.customer_id, d.event_id, coalesce(r.id, d.notification_id), d.status, \
                        d.attempted_at, d.http_status, d.error, d.delivered_at, d.finished_at \
                 FROM {live}.webhook_deliveries d \
                 LEFT JOIN {shadow}.records r \
                   ON r.customer_id = d.customer_id AND r.event_id = d.event_id \
                 ON CONFLICT (customer_id, event_id) DO NOTHING; \
                 UPDATE {shadow}.records r SET webhook_claimed = true \
                 FROM {shadow}.webhook_deliveries d \
                 WHERE d.customer_id = r.customer_id AND d.event_id = r.event_id \
                   AND NOT r.webhook_claimed",
            history_done: "UPDATE {live}.records SET webhook_claimed = true \
                           WHERE NOT webhook_claimed",
        }),
        _ => None,
    }
}

/// After a restore: marks what the read model's worker did for the history as done (see
/// [`WorkerState`]); nothing for a model without a worker.
pub async fn history_done_by_workers(pool: &PgPool, read_model: &str) -> anyhow::Result<()> {
    if let Some(state) = worker_state(read_model) {
        sqlx::raw_sql(&state.history_done.replace("{live}", read_model))
            .execute(pool)
            .await
            .with_context(|| format!("marking the history done for {read_model}'s worker"))?;
    }
    Ok(())
}

/// An instant given on the command line.
pub fn parse_time(text: &str) -> anyhow::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            anyhow::anyhow!(
                "`{text}` is not an RFC 3339 instant such as 2026-11-21T18:00:00Z or \
                 2026-11-21T19:00:00.5+01:00 ({e})"
            )
        })
}

/// Runs `replay-tools rebuild` with the `KAFKA_*`, `SCHEMA_REGISTRY_*` and
/// `PROJECTOR_GROUP_PREFIX` settings of the environment.
pub async fn run(args: RebuildArgs, pool: &PgPool, out: &mut impl Write) -> anyhow::Result<()> {
    let kafka = KafkaConfig::from_env().context("KAFKA_* settings")?;
    let registry = RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
    let projector = ProjectorConfig::from_env().context("PROJECTOR_* settings")?;
    rebuild(
        pool,
        &Connections {
            kafka,
            registry,
            group_prefix: projector.projector_group_prefix,
            max_attempts: projector.projector_max_attempts.max(1),
        },
        args,
        progress::interrupted(),
        out,
    )
    .await
}

/// What a rebuild connects to, besides the database.
#[derive(Debug, Clone)]
pub struct Connections {
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    /// Consumer groups are `<prefix><read model>-rebuild`.
    pub group_prefix: String,
    /// Attempts before an event that fails is dead-lettered.
    pub max_attempts: u32,
}

/// Rebuilds a read model; stops cleanly (the batch in hand committed) when `interrupted` is
/// cancelled, and then fails with how to resume.
pub async fn rebuild(
    pool: &PgPool,
    connections: &Connections,
    args: RebuildArgs,
    interrupted: CancellationToken,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let projection = projections::read_models::by_name(&args.read_model)?;
    let as_of = args.as_of.as_deref().map(parse_time).transpose()?;
    let live = projection.name();
    let schemas = Schemas::of(live);
    // One rebuild of a read model at a time: the session lock lives as long as this connection.
    let _exclusive = exclusive(pool, live).await?;
    ensure_live_schema(pool, projection.as_ref()).await?;

    let mut rebuild = Rebuild {
        pool: pool.clone(),
        projection: projection.clone(),
        schemas: schemas.clone(),
        as_of: None,
        attempts: connections.max_attempts,
        topics: connections.kafka.topics(),
        batch_size: usize::try_from(args.batch_size).unwrap_or(usize::MAX),
        appliers: usize::try_from(args.appliers).unwrap_or(1).max(1),
        profile: Arc::default(),
    };
    let (source, state, build) = rebuild.start_or_resume(&args, as_of).await?;
    let state = state.context("the shadow has no rebuild state")?;

    let started = Instant::now();
    let mut tally = Tally::default();
    let completed = match source {
        _ if !build => true,
        Source::Topics => {
            rebuild
                .read_topics(connections, &interrupted, &mut tally)
                .await?
        }
        Source::Store => rebuild.read_store(&state, &interrupted, &mut tally).await?,
    };
    if !build {
        writeln!(
            out,
            "{live}: the rebuild in {} is finished ({} events applied from the {}); swapping it in",
            schemas.shadow,
            state.applied,
            source.as_str()
        )?;
    } else if completed {
        rebuild.finish_build().await?;
    }
    let elapsed = started.elapsed();
    if build {
        report_build(out, &rebuild, source, completed, &tally, elapsed)?;
    }
    if !completed {
        bail!(
            "interrupted: {} keeps everything applied up to its checkpoint; run `replay-tools \
             rebuild {live} --resume{}` to continue",
            schemas.shadow,
            if args.swap { " --swap" } else { "" }
        );
    }
    if tally.gaps > 0 && source == Source::Topics {
        writeln!(
            out,
            "warning: {} events came after a missing event of their aggregate and were not \
             applied; if the topics were trimmed, rebuild from the event store (--source store)",
            tally.gaps
        )?;
    }
    if args.swap {
        swap_in(out, &rebuild, &interrupted).await?;
    }
    Ok(())
}

/// Creates the live read model when it is missing: the shadow's renames need one. Only then, since
/// the DDL of an existing one takes table locks that would deadlock with a running projector's
/// batch.
async fn ensure_live_schema(pool: &PgPool, projection: &dyn Projection) -> anyhow::Result<()> {
    let live = projection.name();
    let live_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{live}.applied"))
        .fetch_one(pool)
        .await?;
    if !live_exists {
        streams::consumer::ensure_schema(projection, pool)
            .await
            .with_context(|| format!("creating the live read model {live}"))?;
    }
    Ok(())
}

impl Rebuild {
    /// Where this run starts: a new shadow, the unfinished one resumed, or a finished one to
    /// swap in (`build` false); refuses what the arguments and the shadow's state rule out.
    async fn start_or_resume(
        &mut self,
        args: &RebuildArgs,
        as_of: Option<DateTime<Utc>>,
    ) -> anyhow::Result<(Source, Option<State>, bool)> {
        let live = self.schemas.live;
        let schemas = &self.schemas;
        let pool = &self.pool;
        let existing = self.state().await?;
        let finished = existing.is_some() && self.finished().await?;
        // A finished rebuild asked to swap goes straight to the swap (which first catches up with
        // what the live model applied since).
        let mut build = true;
        let (source, state) = match existing {
            Some(state) if finished && !args.restart && !args.resume => {
                if state.as_of.is_some() {
                    bail!(
                        "the rebuild in {} is finished and {}: a past state is never swapped in; \
                         query or `check` it, or --restart to rebuild the current state",
                        schemas.shadow,
                        describe_as_of(state.as_of)
                    );
                }
                if !args.swap {
                    bail!(
                        "a finished rebuild of {live} is in {} ({} events applied since {}): pass \
                         --swap to swap it in (it first catches up with the live model), or \
                         --restart to discard it and start over",
                        schemas.shadow,
                        state.applied,
                        state.started_at.to_rfc3339_opts(SecondsFormat::Secs, true)
                    );
                }
                build = false;
                (Source::parse(&state.source)?, Some(state))
            }
            Some(_) if args.restart => {
                sqlx::raw_sql(&format!("DROP SCHEMA {} CASCADE", schemas.shadow))
                    .execute(pool)
                    .await?;
                let source = args.source.unwrap_or(Source::Topics);
                self.as_of = as_of;
                self.create_shadow(source).await?;
                (source, self.state().await?)
            }
            Some(state) if args.resume => {
                let recorded = self.resumable(args, as_of, &state)?;
                self.as_of = state.as_of;
                (recorded, Some(state))
            }
            Some(state) => bail!(
                "an unfinished rebuild of {live} is in {} ({}, {} events applied since {}): pass \
                 --resume to continue it, or --restart to discard it",
                schemas.shadow,
                describe_as_of(state.as_of),
                state.applied,
                state.started_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
            None if args.resume => bail!(
                "nothing to resume: there is no rebuild of {live} ({} does not exist)",
                schemas.shadow
            ),
            None => {
                let source = args.source.unwrap_or(Source::Topics);
                self.as_of = as_of;
                self.create_shadow(source).await?;
                (source, self.state().await?)
            }
        };
        Ok((source, state, build))
    }

    /// The source of the unfinished rebuild `state` records, if these arguments can resume it.
    fn resumable(
        &self,
        args: &RebuildArgs,
        as_of: Option<DateTime<Utc>>,
        state: &State,
    ) -> anyhow::Result<Source> {
        let schemas = &self.schemas;
        let recorded = Source::parse(&state.source)?;
        if let Some(asked) = args.source.filter(|s| *s != recorded) {
            bail!(
                "the rebuild in {} reads from the {}; it cannot resume from the {} \
                     (use --restart to start over from there)",
                schemas.shadow,
                recorded.as_str(),
                asked.as_str()
            );
        }
        if as_of.is_some() && as_of != state.as_of {
            bail!(
                "the rebuild in {} is {}; it cannot resume as of {} (use --restart)",
                schemas.shadow,
                describe_as_of(state.as_of),
                args.as_of.as_deref().unwrap_or_default()
            );
        }
        if args.swap && state.as_of.is_some() {
            bail!(
                "the rebuild in {} is {}: a past state is never swapped in (the live \
                     projector would meet the later events' gaps)",
                schemas.shadow,
                describe_as_of(state.as_of)
            );
        }
        Ok(recorded)
    }
}

/// Which tables [`tables_of`] lists.
#[derive(Debug, Clone, Copy)]
enum Persistence {
    Logged,
    Unlogged,
}

/// The tables of a schema that are logged, or unlogged, the largest first.
async fn tables_of(
    executor: impl sqlx::PgExecutor<'_>,
    schema: &str,
    persistence: Persistence,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT quote_ident(relname) FROM pg_class \
         WHERE relnamespace = to_regnamespace($1) AND relkind = 'r' AND relpersistence = $2 \
         ORDER BY pg_total_relation_size(oid) DESC, relname",
    )
    .bind(schema)
    .bind(match persistence {
        Persistence::Logged => "p",
        Persistence::Unlogged => "u",
    })
    .fetch_all(executor)
    .await
}

fn describe_as_of(as_of: Option<DateTime<Utc>>) -> String {
    match as_of {
        Some(t) => format!("as of {}", t.to_rfc3339_opts(SecondsFormat::Micros, true)),
        None => "up to date".to_owned(),
    }
}

/// The schemas a rebuild works with.
#[derive(Debug, Clone)]
struct Schemas {
    live: &'static str,
    shadow: String,
    /// The live schema's name while the shadow carries the live name, inside one transaction.
    parked: String,
}

impl Schemas {
    fn of(live: &'static str) -> Self {
        Self {
            live,
            shadow: shadow_name(live),
            parked: format!("{live}__live"),
        }
    }
}

/// The rebuild's own bookkeeping, one row in the shadow.
#[derive(Debug, Clone, sqlx::FromRow)]
struct State {
    source: String,
    as_of: Option<DateTime<Utc>>,
    started_at: DateTime<Utc>,
    applied: i64,
    store_recorded_at: Option<DateTime<Utc>>,
    store_aggregate_type: Option<String>,
    store_aggregate_id: Option<String>,
    store_sequence: Option<i64>,
}

/// What a swap did.
#[derive(Debug)]
struct Swapped {
    /// Where the previous read model is kept.
    old: String,
    /// Events the live model had applied and the shadow had not, applied before the lock.
    caught_up: u64,
    /// The same, under the lock.
    under_lock: u64,
}

struct Rebuild {
    pool: PgPool,
    projection: Arc<dyn Projection>,
    schemas: Schemas,
    as_of: Option<DateTime<Utc>>,
    attempts: u32,
    topics: Topics,
    batch_size: usize,
    /// Appliers side by side (topics only).
    appliers: usize,
    profile: Arc<Profile>,
}
