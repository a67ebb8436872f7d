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
    apply_replayed, create_tables, use_schema, Projection, ProjectionError, ProjectorConfig,
    ReplayVerdict, ReplayedEvent,
};
use streams::{
    DecodedEvent, EventDecoder, EventMeta, KafkaConfig, Published, RegistryConfig, Topics,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::progress;

mod feed;
mod report;

pub use feed::bulk_consumer_config;
use feed::*;
use report::*;

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
        }),
        _ => None,
    }
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
    // The shadow's renames need a live schema. Only created when missing: the DDL of an
    // existing one takes table locks that would deadlock with a running projector's batch.
    let live_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{live}.applied"))
        .fetch_one(pool)
        .await?;
    if !live_exists {
        streams::consumer::ensure_schema(projection.as_ref(), pool)
            .await
            .with_context(|| format!("creating the live read model {live}"))?;
    }

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
    let existing = rebuild.state().await?;
    let finished = existing.is_some() && rebuild.finished().await?;
    // A finished rebuild asked to swap goes straight to the swap (which first catches up with
    // what the live model applied since).
    let mut build = true;
    let (source, state) = match existing {
        Some(state) if finished && !args.restart && !args.resume => {
            if state.as_of.is_some() {
                bail!(
                    "the rebuild in {} is finished and {}: a past state is never swapped in;                      query or `check` it, or --restart to rebuild the current state",
                    schemas.shadow,
                    describe_as_of(state.as_of)
                );
            }
            if !args.swap {
                bail!(
                    "a finished rebuild of {live} is in {} ({} events applied since {}): pass                      --swap to swap it in (it first catches up with the live model), or                      --restart to discard it and start over",
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
            rebuild.as_of = as_of;
            rebuild.create_shadow(source).await?;
            (source, rebuild.state().await?)
        }
        Some(state) if args.resume => {
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
            rebuild.as_of = state.as_of;
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
            rebuild.as_of = as_of;
            rebuild.create_shadow(source).await?;
            (source, rebuild.state().await?)
        }
    };
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
        writeln!(
        out,
        "{live}: {} into {} from the {}{}: {} events read, {} applied, {} duplicates, {} after a \
         missing one (gaps), {} dead letters{}, in {:.1} s ({:.0} events/s)",
        if completed {
            "rebuilt"
        } else {
            "interrupted rebuild"
        },
        schemas.shadow,
        source.as_str(),
        rebuild
            .as_of
            .map(|t| format!(" as of {}", t.to_rfc3339_opts(SecondsFormat::Micros, true)))
            .unwrap_or_default(),
        tally.read,
        tally.applied,
        tally.duplicates,
        tally.gaps,
        tally.dead,
        if tally.later > 0 {
            format!(", {} recorded after the as-of instant", tally.later)
        } else {
            String::new()
        },
        elapsed.as_secs_f64(),
        tally.read as f64 / elapsed.as_secs_f64().max(1e-9),
    )?;
        writeln!(out, "{live}: {}", rebuild.profile.describe())?;
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
        let swapped = rebuild.swap(&interrupted).await?;
        let old = &swapped.old;
        writeln!(
            out,
            "{live}: swapped in, after catching up {} events the live model applied meanwhile \
             ({} of them under the lock); the previous read model is kept as {old} (`DROP \
             SCHEMA {old} CASCADE` once satisfied)",
            swapped.caught_up + swapped.under_lock,
            swapped.under_lock
        )?;
    }
    Ok(())
}

/// Takes the per-read-model rebuild lock on a connection of its own (released when dropped).
async fn exclusive(pool: &PgPool, live: &str) -> anyhow::Result<PgConnection> {
    let mut connection = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(format!("replay-tools rebuild {live}"))
        .fetch_one(&mut connection)
        .await?;
    if !locked {
        bail!("another rebuild of {live} is running");
    }
    Ok(connection)
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

impl Rebuild {
    /// The shadow's state; `None` without a shadow.
    /// Whether the shadow's build finished: `rebuild_state` is made durable (logged) last, once
    /// every table and index is in place.
    async fn finished(&self) -> anyhow::Result<bool> {
        let persistence: Option<String> = sqlx::query_scalar(
            "SELECT relpersistence::text FROM pg_class WHERE oid = to_regclass($1)",
        )
        .bind(format!("{}.rebuild_state", self.schemas.shadow))
        .fetch_optional(&self.pool)
        .await?;
        Ok(persistence.as_deref() == Some("p"))
    }

    async fn state(&self) -> anyhow::Result<Option<State>> {
        let shadow = &self.schemas.shadow;
        let (schema, table): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1), \
                    to_regclass($2) IS NOT NULL",
        )
        .bind(shadow)
        .bind(format!("{shadow}.rebuild_state"))
        .fetch_one(&self.pool)
        .await?;
        if !schema {
            return Ok(None);
        }
        if !table {
            bail!(
                "the schema {shadow} exists but is not a rebuild (no rebuild_state table); \
                 rename or drop it first"
            );
        }
        let state: Option<State> = sqlx::query_as(&format!(
            "SELECT source, as_of, started_at, applied, store_recorded_at, store_aggregate_type, \
                    store_aggregate_id, store_sequence FROM {shadow}.rebuild_state"
        ))
        .fetch_optional(&self.pool)
        .await?;
        state.map(Some).with_context(|| {
            format!(
                "{shadow}.rebuild_state is empty: a rebuild's tables are unlogged until it \
                     completes, and PostgreSQL empties unlogged tables when it recovers from a \
                     crash; start over with --restart"
            )
        })
    }

    /// Opens a transaction in which the handlers' unqualified names are the shadow's.
    async fn enter(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        use_schema(&mut tx, &self.schemas.shadow).await?;
        Ok(tx)
    }

    /// Opens a transaction in which the shadow carries the live name: for the projection's DDL,
    /// which names the live schema.
    async fn enter_renamed(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let Schemas {
            live,
            shadow,
            parked,
        } = &self.schemas;
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(&format!(
            "ALTER SCHEMA {live} RENAME TO {parked}; ALTER SCHEMA {shadow} RENAME TO {live}"
        ))
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }

    /// Gives the names back and commits.
    async fn leave_renamed(
        &self,
        mut tx: Transaction<'static, Postgres>,
    ) -> Result<(), sqlx::Error> {
        let Schemas {
            live,
            shadow,
            parked,
        } = &self.schemas;
        sqlx::raw_sql(&format!(
            "ALTER SCHEMA {live} RENAME TO {shadow}; ALTER SCHEMA {parked} RENAME TO {live}"
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Creates the shadow with the projection's own DDL, under the live name.
    async fn create_shadow(&self, source: Source) -> anyhow::Result<()> {
        let Schemas { live, parked, .. } = &self.schemas;
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(&format!(
            "ALTER SCHEMA {live} RENAME TO {parked}; CREATE SCHEMA {live}"
        ))
        .execute(&mut *tx)
        .await?;
        create_tables(self.projection.as_ref(), &mut tx).await?;
        sqlx::raw_sql(&format!(
            "CREATE TABLE {live}.rebuild_state ( \
               one                  boolean PRIMARY KEY DEFAULT true CHECK (one), \
               source               text        NOT NULL, \
               as_of                timestamptz, \
               started_at           timestamptz NOT NULL DEFAULT clock_timestamp(), \
               applied              bigint      NOT NULL DEFAULT 0, \
               store_recorded_at    timestamptz, \
               store_aggregate_type text, \
               store_aggregate_id   text, \
               store_sequence       bigint, \
               store_dead_letters   bigint      NOT NULL DEFAULT 0)"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO {live}.rebuild_state (source, as_of) VALUES ($1, $2)"
        ))
        .bind(source.as_str())
        .bind(self.as_of)
        .execute(&mut *tx)
        .await?;
        // Bulk mode until `finish_build`: unlogged tables, the query-only indexes left out.
        for table in tables_of(&mut *tx, live, Persistence::Logged).await? {
            sqlx::raw_sql(&format!("ALTER TABLE {live}.{table} SET UNLOGGED"))
                .execute(&mut *tx)
                .await?;
        }
        for index in self.projection.query_only_indexes() {
            sqlx::raw_sql(&format!("DROP INDEX {live}.{index}"))
                .execute(&mut *tx)
                .await
                .with_context(|| format!("dropping the query-only index {index} of {live}"))?;
        }
        self.leave_renamed(tx).await?;
        Ok(())
    }

    /// Ends the bulk mode of a shadow whose history is applied: its tables made durable (one
    /// sequential rewrite each, with its indexes rebuilt by sorting; the largest first, a few
    /// side by side) and the query-only indexes built. `rebuild_state` is made durable last:
    /// until it is, a database crash empties it with the rest, and the rebuild starts over,
    /// never from a half-durable shadow. Idempotent: a resumed rebuild that had got this far
    /// does it again.
    async fn finish_build(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let shadow = &self.schemas.shadow;
        let tables = tables_of(&self.pool, shadow, Persistence::Unlogged).await?;
        futures::stream::iter(tables.iter().filter(|t| *t != "rebuild_state"))
            .map(|table| async move {
                sqlx::raw_sql(&format!("ALTER TABLE {shadow}.{table} SET LOGGED"))
                    .execute(&self.pool)
                    .await
                    .with_context(|| format!("making {shadow}.{table} durable"))
            })
            .buffer_unordered(FINISHING_SIDE_BY_SIDE)
            .try_collect::<Vec<_>>()
            .await?;
        let mut tx = self.enter_renamed().await?;
        let live = self.schemas.live;
        // The projection's DDL is idempotent: it creates what is missing, the indexes left out.
        create_tables(self.projection.as_ref(), &mut tx)
            .await
            .with_context(|| format!("building the indexes of {shadow}"))?;
        sqlx::raw_sql(&format!("ALTER TABLE {live}.rebuild_state SET LOGGED"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("making {shadow}.rebuild_state durable"))?;
        self.leave_renamed(tx).await?;
        self.profile.finish.add(started);
        Ok(())
    }

    /// Reads every partition of the read model's topics from the shadow's checkpoint to its
    /// end offset now. `false` if interrupted.
    async fn read_topics(
        &self,
        connections: &Connections,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        let topic_names: Vec<String> = self
            .projection
            .aggregate_types()
            .iter()
            .filter_map(|a| connections.kafka.topics().for_aggregate(a))
            .collect();
        let group = format!("{}{}-rebuild", connections.group_prefix, self.schemas.live);
        let probe: BaseConsumer = connections
            .kafka
            .client_config()
            .set("group.id", &group)
            .create()
            .context("creating the Kafka consumer")?;
        let names = topic_names.clone();
        let partitions = tokio::task::spawn_blocking(move || watermarks(&probe, &names))
            .await
            .context("reading the topics' offsets")??;
        let checkpoints: HashMap<(String, i32), i64> =
            sqlx::query_as::<_, (String, i32, i64)>(&format!(
                "SELECT topic, partition, next_offset FROM {}.checkpoints",
                self.schemas.shadow
            ))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|(t, p, o)| ((t, p), o))
            .collect();
        let mut ends = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        let mut total = 0u64;
        for (topic, partition, low, high) in partitions {
            let from = checkpoints.get(&(topic.clone(), partition)).copied();
            if from.unwrap_or(0) < low {
                bail!(
                    "{topic} partition {partition} now begins at offset {low} (older records \
                     were deleted by retention), before which the rebuild has not read: \
                     rebuild from the event store (--source store --restart)"
                );
            }
            let from = from.unwrap_or(low);
            if from < high {
                assignment
                    .add_partition_offset(&topic, partition, Offset::Offset(from))
                    .context("assigning a partition")?;
                total += u64::try_from(high - from).unwrap_or(0);
                ends.insert((topic, partition), high);
            }
        }
        let bar = progress::bar("rebuild", Some(total));
        if ends.is_empty() {
            bar.finish_and_clear();
            return Ok(true);
        }
        let consumer: StreamConsumer = bulk_consumer_config(&connections.kafka, &group)
            .create()
            .context("creating the Kafka consumer")?;
        consumer.assign(&assignment)?;
        let decoder = EventDecoder::new(&connections.registry)?;
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..self.appliers).map(|_| mpsc::channel(2)).unzip();
        let feeder = tokio::spawn(feed_topics(
            consumer,
            decoder,
            ends,
            self.batch_size,
            senders,
            self.profile.clone(),
        ));
        let completed = self.drain_all(receivers, &bar, interrupted, tally).await;
        finish(feeder, completed, &bar).await
    }

    /// One applier per receiver, side by side, each in its own transactions; `false` when
    /// interrupted (each finishes the batch in hand).
    async fn drain_all(
        &self,
        receivers: Vec<mpsc::Receiver<Vec<Item>>>,
        bar: &ProgressBar,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        let appliers = receivers.into_iter().map(|receiver| async move {
            let mut own = Tally::default();
            let completed = self.drain(receiver, bar, interrupted, &mut own).await?;
            Ok::<_, anyhow::Error>((completed, own))
        });
        let mut completed = true;
        for (done, own) in futures::future::try_join_all(appliers).await? {
            completed &= done;
            tally.add(&own);
        }
        Ok(completed)
    }

    /// Reads the event store in recorded order from the shadow's position, then sweeps up the
    /// events committed late. `false` if interrupted.
    async fn read_store(
        &self,
        state: &State,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        let after = match (
            state.store_recorded_at,
            &state.store_aggregate_type,
            &state.store_aggregate_id,
            state.store_sequence,
        ) {
            (Some(r), Some(t), Some(i), Some(s)) => Some((r, t.clone(), i.clone(), s)),
            _ => None,
        };
        let types = self.aggregate_types();
        let total: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events e WHERE e.aggregate_type = ANY($1) \
               AND ($2::timestamptz IS NULL OR e.recorded_at <= $2) \
               AND ($3::timestamptz IS NULL \
                    OR (e.recorded_at, e.aggregate_type, e.aggregate_id, e.sequence) > ($3, $4, $5, $6))",
        )
        .bind(&types)
        .bind(self.as_of)
        .bind(after.as_ref().map(|a| a.0))
        .bind(after.as_ref().map(|a| a.1.clone()))
        .bind(after.as_ref().map(|a| a.2.clone()))
        .bind(after.as_ref().map(|a| a.3))
        .fetch_one(&self.pool)
        .await?;
        let bar = progress::bar("rebuild", Some(u64::try_from(total).unwrap_or(0)));
        if !self
            .store_pass(StoreQuery::Recorded { after }, &bar, interrupted, tally)
            .await?
        {
            return Ok(false);
        }
        let bar = progress::bar("late commits", None);
        self.store_pass(StoreQuery::Sweep, &bar, interrupted, tally)
            .await
    }

    fn aggregate_types(&self) -> Vec<String> {
        self.projection
            .aggregate_types()
            .iter()
            .map(|a| (*a).to_owned())
            .collect()
    }

    async fn store_pass(
        &self,
        query: StoreQuery,
        bar: &ProgressBar,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        let (sender, receiver) = mpsc::channel(2);
        let feeder = tokio::spawn(feed_store(
            self.pool.clone(),
            query,
            self.aggregate_types(),
            self.as_of,
            self.schemas.clone(),
            self.topics.clone(),
            self.batch_size,
            sender,
            self.profile.clone(),
        ));
        let completed = self.drain(receiver, bar, interrupted, tally).await;
        finish(feeder, completed, bar).await
    }

    /// Applies batches as they come; `false` when interrupted (the batch in hand is applied).
    async fn drain(
        &self,
        mut receiver: mpsc::Receiver<Vec<Item>>,
        bar: &ProgressBar,
        interrupted: &CancellationToken,
        tally: &mut Tally,
    ) -> anyhow::Result<bool> {
        loop {
            let waiting = Instant::now();
            let batch = tokio::select! {
                biased;
                () = interrupted.cancelled() => return Ok(false),
                batch = receiver.recv() => batch,
            };
            self.profile.starved.add(waiting);
            let Some(batch) = batch else {
                return Ok(true);
            };
            self.apply(&batch, tally).await?;
            bar.inc(batch.len() as u64);
        }
    }

    /// Applies a batch as the projector does: the whole batch, retried; then event by event,
    /// an event that keeps failing dead-lettered.
    async fn apply(&self, items: &[Item], tally: &mut Tally) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.apply_once(items, None).await {
                Ok(done) => {
                    tally.add(&done);
                    return Ok(());
                }
                Err(e) if is_contention(&e) => {
                    // Appliers side by side met on shared rows; not the batch's fault.
                    attempt -= 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) if attempt < self.attempts => {
                    eprintln!("replay-tools: batch failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
                Err(e) => {
                    eprintln!("replay-tools: batch failed ({e}); isolating the failing events");
                    break;
                }
            }
        }
        for item in items {
            let one = std::slice::from_ref(item);
            let mut error = None;
            for _ in 0..self.attempts {
                match self.apply_once(one, None).await {
                    Ok(done) => {
                        tally.add(&done);
                        error = None;
                        break;
                    }
                    Err(e) => error = Some(e.to_string()),
                }
            }
            if let Some(error) = error {
                let done = self.apply_once(one, Some(&error)).await?;
                tally.add(&done);
            }
        }
        Ok(())
    }

    /// One transaction in the shadow: dedup, handlers, dead letters,
    /// position. With `refuse`, the (single) event is dead-lettered with that error.
    async fn apply_once(
        &self,
        items: &[Item],
        refuse: Option<&str>,
    ) -> Result<Tally, ProjectionError> {
        let shadow = &self.schemas.shadow;
        let mut done = Tally {
            read: items.len() as u64,
            ..Tally::default()
        };
        let phase = Instant::now();
        let mut tx = self.enter().await?;
        self.profile.enter.add(phase);
        let phase = Instant::now();
        let mut replayed = Vec::with_capacity(items.len());
        let mut of_item = Vec::with_capacity(items.len());
        let mut dead: Vec<(&Item, String)> = Vec::new();
        for item in items {
            if let (Some(as_of), Some(recorded_at)) = (self.as_of, item.recorded_at()) {
                if recorded_at > as_of {
                    done.later += 1;
                    continue;
                }
            }
            let Some(meta) = &item.meta else {
                // Not ours to order (no readable headers): dead-lettered, as the projector does.
                let error = match (&item.event, refuse) {
                    (_, Some(e)) => e.to_owned(),
                    (Err(e), None) => e.clone(),
                    (Ok(_), None) => "record without event headers".to_owned(),
                };
                dead.push((item, error));
                continue;
            };
            replayed.push(ReplayedEvent {
                aggregate_type: &meta.aggregate_type,
                aggregate_id: &meta.aggregate_id,
                sequence: i64::try_from(meta.sequence).unwrap_or(i64::MAX),
                event: match (refuse, &item.event) {
                    (Some(e), _) => Err(e),
                    (None, Err(e)) => Err(e.as_str()),
                    (None, Ok(event)) => Ok(event),
                },
            });
            of_item.push(item);
        }
        let verdicts = apply_replayed(self.projection.as_ref(), shadow, &mut tx, &replayed).await?;
        self.profile.handlers.add(phase);
        let phase = Instant::now();
        for ((verdict, item), replayed) in verdicts.iter().zip(&of_item).zip(&replayed) {
            match verdict {
                ReplayVerdict::Applied => done.applied += 1,
                ReplayVerdict::Duplicate => done.duplicates += 1,
                ReplayVerdict::Gap => done.gaps += 1,
                ReplayVerdict::Refused => {
                    let error = replayed.event.err().unwrap_or_default().to_owned();
                    dead.push((*item, error));
                }
            }
        }
        for (item, error) in &dead {
            self.record_dead_letter(&mut tx, item, error).await?;
            done.dead += 1;
        }
        // Where the rebuild stands: per partition for the topics, in recorded order for the
        // store.
        let mut checkpoints: HashMap<(&str, i32), (i64, Option<&str>)> = HashMap::new();
        let mut position = None;
        for item in items {
            match &item.origin {
                Origin::Topic(record) => {
                    let entry = checkpoints
                        .entry((record.topic.as_str(), record.partition))
                        .or_insert((0, None));
                    entry.0 = entry.0.max(record.offset + 1);
                    if let Some(meta) = &item.meta {
                        entry.1 = Some(meta.recorded_at.as_str());
                    }
                }
                Origin::Store {
                    recorded_at,
                    advances: true,
                } => position = Some((recorded_at, item.meta.as_ref())),
                Origin::Store { .. } => {}
            }
        }
        for ((topic, partition), (next_offset, recorded)) in checkpoints {
            let recorded_at = recorded.and_then(|r| DateTime::parse_from_rfc3339(r).ok());
            sqlx::query(&format!(
                "INSERT INTO {shadow}.checkpoints (topic, partition, next_offset, last_recorded_at) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (topic, partition) DO UPDATE \
                 SET next_offset = greatest({shadow}.checkpoints.next_offset, excluded.next_offset), \
                     last_recorded_at = coalesce(excluded.last_recorded_at, {shadow}.checkpoints.last_recorded_at), \
                     updated_at = clock_timestamp()"
            ))
            .bind(topic)
            .bind(partition)
            .bind(next_offset)
            .bind(recorded_at)
            .execute(&mut *tx)
            .await?;
        }
        if let Some((recorded_at, Some(meta))) = position {
            sqlx::query(&format!(
                "UPDATE {shadow}.rebuild_state SET store_recorded_at = $1, store_aggregate_type = $2, \
                   store_aggregate_id = $3, store_sequence = $4"
            ))
            .bind(recorded_at)
            .bind(&meta.aggregate_type)
            .bind(&meta.aggregate_id)
            .bind(i64::try_from(meta.sequence).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(&format!(
            "UPDATE {shadow}.rebuild_state SET applied = applied + $1"
        ))
        .bind(i64::try_from(done.applied).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        self.profile.bookkeeping.add(phase);
        let phase = Instant::now();
        tx.commit().await?;
        self.profile.commit.add(phase);
        self.profile.transactions.fetch_add(1, Ordering::Relaxed);
        Ok(done)
    }

    /// A dead letter in the shadow, as the projector records one. An event from the store has
    /// no record: partition -1 and a negative offset numbered by the rebuild.
    async fn record_dead_letter(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        item: &Item,
        error: &str,
    ) -> Result<(), ProjectionError> {
        let shadow = &self.schemas.shadow;
        let meta = item.meta.as_ref();
        let (topic, partition, offset, key, payload, names, values, timestamp_ms) =
            match &item.origin {
                Origin::Topic(r) => (
                    r.topic.clone(),
                    r.partition,
                    r.offset,
                    r.key.clone(),
                    r.payload.clone(),
                    r.header_names.clone(),
                    r.header_values.clone(),
                    r.timestamp_ms,
                ),
                Origin::Store { .. } => {
                    let number: i64 = sqlx::query_scalar(&format!(
                    "UPDATE {shadow}.rebuild_state SET store_dead_letters = store_dead_letters + 1 \
                         RETURNING store_dead_letters"
                ))
                    .fetch_one(&mut **tx)
                    .await?;
                    let topic = meta
                        .and_then(|m| self.topics.for_aggregate(&m.aggregate_type))
                        .unwrap_or_default();
                    (topic, -1, -number, None, None, vec![], vec![], None)
                }
            };
        sqlx::query(&format!(
            "INSERT INTO {shadow}.dead_letters (topic, partition, \"offset\", event_id, aggregate_type, \
               aggregate_id, sequence, event_type, error, record_key, payload, header_names, \
               header_values, timestamp_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (topic, partition, \"offset\") DO NOTHING"
        ))
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .bind(meta.map(|m| m.event_id.to_string()))
        .bind(meta.map(|m| m.aggregate_type.as_str()))
        .bind(meta.map(|m| m.aggregate_id.as_str()))
        .bind(meta.map(|m| i64::try_from(m.sequence).unwrap_or(i64::MAX)))
        .bind(meta.map(|m| m.event_type.as_str()))
        .bind(error)
        .bind(key)
        .bind(payload)
        .bind(names)
        .bind(values)
        .bind(timestamp_ms)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Swaps the shadow in (see the module's documentation).
    async fn swap(&self, interrupted: &CancellationToken) -> anyhow::Result<Swapped> {
        // Most of what the live model applied meanwhile, without holding anything.
        let bar = progress::bar("catch up", None);
        let mut tally = Tally::default();
        if !self
            .store_pass(StoreQuery::TopUp, &bar, interrupted, &mut tally)
            .await?
        {
            bail!(
                "interrupted before the swap; run `replay-tools rebuild {} --resume --swap`",
                self.schemas.live
            );
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.swap_once().await {
                Ok((old, under_lock)) => {
                    return Ok(Swapped {
                        old,
                        caught_up: tally.applied,
                        under_lock,
                    })
                }
                Err(e) if attempt < 3 && is_lock_conflict(&e) => {
                    eprintln!("replay-tools: swap attempt {attempt} failed ({e:#}); retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.context("swap failed; nothing was changed")),
            }
        }
    }

    /// Returns where the previous read model is kept, and the events applied under the lock.
    async fn swap_once(&self) -> anyhow::Result<(String, u64)> {
        let Schemas { live, shadow, .. } = &self.schemas;
        let live = *live;
        let mut lock = self.pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '30s'")
            .execute(&mut *lock)
            .await?;
        let worker = worker_state(live);
        let tables: Vec<String> = ["applied", "checkpoints", "dead_letters"]
            .iter()
            .chain(worker.map_or(&[][..], |w| w.tables))
            .map(|t| format!("{live}.{t}"))
            .collect();
        // The live projector's next batch waits here (it starts by locking its `applied` rows);
        // readers go on.
        sqlx::raw_sql(&format!(
            "LOCK TABLE {} IN EXCLUSIVE MODE",
            tables.join(", ")
        ))
        .execute(&mut *lock)
        .await?;
        let bar = ProgressBar::hidden();
        let mut tally = Tally::default();
        self.store_pass(
            StoreQuery::TopUp,
            &bar,
            &CancellationToken::new(),
            &mut tally,
        )
        .await?;
        let behind: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {live}.applied l \
             LEFT JOIN {shadow}.applied s USING (aggregate_type, aggregate_id) \
             WHERE s.last_sequence IS NULL OR s.last_sequence < l.last_sequence"
        ))
        .fetch_one(&mut *lock)
        .await?;
        if behind > 0 {
            bail!(
                "{behind} aggregates are further in the live read model than in the rebuilt one \
                 even after catching up from the event store (events missing from the store?)"
            );
        }
        sqlx::query(&format!(
            "INSERT INTO {shadow}.checkpoints (topic, partition, next_offset, last_recorded_at) \
             SELECT topic, partition, next_offset, last_recorded_at FROM {live}.checkpoints \
             ON CONFLICT (topic, partition) DO UPDATE \
             SET next_offset = greatest({shadow}.checkpoints.next_offset, excluded.next_offset), \
                 last_recorded_at = greatest({shadow}.checkpoints.last_recorded_at, excluded.last_recorded_at)"
        ))
        .execute(&mut *lock)
        .await?;
        if let Some(worker) = worker {
            let sql = worker
                .carry_over
                .replace("{live}", live)
                .replace("{shadow}", shadow);
            sqlx::raw_sql(&sql).execute(&mut *lock).await?;
        }
        let old = format!("{live}__old_{}", Utc::now().format("%Y%m%d_%H%M%S"));
        sqlx::raw_sql(&format!(
            "DROP TABLE {shadow}.rebuild_state; \
             ALTER SCHEMA {live} RENAME TO {old}; \
             ALTER SCHEMA {shadow} RENAME TO {live}"
        ))
        .execute(&mut *lock)
        .await?;
        lock.commit().await?;
        Ok((old, tally.applied))
    }
}

/// A deadlock or a serialization failure: the transaction lost a race and is worth running
/// again as it is.
fn is_contention(error: &ProjectionError) -> bool {
    matches!(
        error,
        ProjectionError::Database(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("40P01" | "40001"))
    )
}

/// A deadlock or a lock wait that timed out: worth another attempt.
fn is_lock_conflict(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .is_some_and(|code| code == "40P01" || code == "55P03")
    })
}

/// Waits for a feeder: its error wins; an interrupted drain stops it.
async fn finish(
    feeder: tokio::task::JoinHandle<anyhow::Result<()>>,
    completed: anyhow::Result<bool>,
    bar: &ProgressBar,
) -> anyhow::Result<bool> {
    bar.finish_and_clear();
    match completed {
        Ok(true) => {
            feeder.await.context("the event reader stopped")??;
            Ok(true)
        }
        Ok(false) => {
            feeder.abort();
            Ok(false)
        }
        Err(e) => {
            feeder.abort();
            Err(e)
        }
    }
}
