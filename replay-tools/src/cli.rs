//! The `replay-tools` command line.

use std::io::Write;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use projections::operations::{self, RedriveRequest};
use sqlx::PgPool;

/// Tools for the backbone's operators, analysts and auditors.
#[derive(Debug, Parser)]
#[command(name = "replay-tools", version, about)]
pub struct Cli {
    /// The backbone's database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = commands::store::DEFAULT_DATABASE_URL,
        hide_env_values = true
    )]
    pub database_url: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every read model with its lag (events, seconds) and dead-letter counts, as JSON lines.
    Lag,
    /// A read model's dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Exports events (filtered by aggregate type, event type, aggregate id, recorded time) to
    /// JSON lines, CSV or Parquet, from the event store or from the topics.
    Export(crate::export::ExportArgs),
    /// One aggregate's events with all their metadata (who, when, correlation, causation,
    /// command, schema version, payload), for auditors.
    History(crate::history::HistoryArgs),
    /// Recomputes the hash chain of every stored event and checks the anchors (or, with
    /// `--topics`, the copy on the topics); names every event altered, deleted, inserted or
    /// reordered, and fails on any finding.
    Verify(crate::chain::VerifyArgs),
    /// Records a global checkpoint: the root hash over every aggregate's chain head, chained to
    /// the previous anchor (`--every SECS` to keep taking them).
    Anchor(crate::chain::AnchorArgs),
    /// Compares the event store, the topics and the read models (counts, last sequence per
    /// aggregate, checksums, tracking rows); prints every difference and fails on any.
    Reconcile(crate::reconcile::ReconcileArgs),
    /// Rebuilds a read model from the topics or the event store into shadow tables
    /// (`<read model>__rebuild`) while the live one keeps serving; `--swap` swaps it in
    /// atomically, `--as-of` builds it as it was at an instant, `--resume` continues an
    /// interrupted one.
    Rebuild(crate::rebuild::RebuildArgs),
    /// Compares a read model with another version of it (its rebuild by default) table by
    /// table and prints every difference; exits non-zero on any.
    Check(crate::check::CheckArgs),
    /// One aggregate's state as it was at an instant, replayed from the event store (JSON).
    AsOf(crate::asof::AsOfArgs),
    /// Erases a customer's personal data (deletes their data key): it then reads as
    /// `[erased]` in history, exports and replays; no event changes, so `verify` still passes.
    EraseCustomer(crate::privacy::EraseArgs),
    /// Order-flow steps that could not proceed (the process manager's refusals): list them,
    /// retry once the cause is fixed, or resolve by cancelling the order with compensation.
    #[command(subcommand)]
    StuckFlows(StuckFlows),
    /// Applies the event store's migrations and creates every read model's schema, then exits
    /// (what the API, the process manager and the projectors otherwise do as they start): the
    /// deployment's migration job. Idempotent; concurrent runs wait for each other.
    Migrate,
    /// Rebuilds a lost event store from the topics (every event as stored, its hash chain
    /// verified record by record, the outbox marked published), then every read model, and sets
    /// the process manager to take again the reactions the loss may have dropped: the disaster
    /// recovery. Run it against an empty database before starting the backbone on it.
    Restore(crate::restore::RestoreArgs),
}

#[derive(Debug, Subcommand)]
pub enum StuckFlows {
    /// Lists stuck flows, oldest first, as JSON lines (by default those waiting for an
    /// operator: open, or with a retry or resolution pending).
    List {
        /// Only those in this state: open, retry_requested, resolve_requested, retried,
        /// resolved, or all.
        #[arg(long)]
        status: Option<String>,
        /// Only this order's.
        #[arg(long)]
        order: Option<String>,
    },
    /// Asks the process manager to apply the flow's reaction again (after the cause was
    /// fixed); it does so within about a second.
    Retry {
        /// The stuck flows to retry.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Asks the process manager to cancel the order as the system with this reason: the
    /// payment is voided, redeemed points given back, a requested delivery cancelled, the
    /// customer told; every open stuck flow of the order is resolved.
    Resolve {
        /// The stuck flow.
        id: i64,
        /// Why (becomes the order's cancellation reason).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// Lists dead letters, oldest first, as JSON lines.
    List {
        /// The read model (e.g. `tracking`).
        read_model: String,
        /// Only those in this state: dead, redrive_requested or redriven.
        #[arg(long)]
        status: Option<String>,
    },
    /// Asks the read model's projector to apply dead letters again, once each (after the cause
    /// was fixed). The projector does it within about a second.
    Redrive {
        /// The read model.
        read_model: String,
        /// The dead letters to re-drive.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every dead letter still `dead`.
        #[arg(long)]
        all: bool,
    },
}

async fn read_model(pool: &PgPool, name: &str) -> anyhow::Result<String> {
    match operations::find(pool, name).await? {
        Some(found) => Ok(found),
        None => bail!(
            "no read model `{name}` in this database; known: {}",
            operations::read_models(pool).await?.join(", ")
        ),
    }
}

/// Runs one command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> anyhow::Result<()> {
    // An export connects to what its source needs (and to the database for the data keys).
    if let Command::Export(args) = cli.command {
        return crate::export::run(args, &cli.database_url, out).await;
    }
    let pool = PgPool::connect(&cli.database_url)
        .await
        .context("connecting to the database (DATABASE_URL)")?;
    match cli.command {
        Command::Lag => {
            for name in operations::read_models(&pool).await? {
                let status = operations::status(&pool, name).await?;
                writeln!(out, "{}", serde_json::to_string(&status)?)?;
            }
        }
        Command::DeadLetters(DeadLetters::List {
            read_model: name,
            status,
        }) => {
            if let Some(status) = &status {
                if !operations::STATUSES.contains(&status.as_str()) {
                    bail!(
                        "status `{status}` is not one of {}",
                        operations::STATUSES.join(", ")
                    );
                }
            }
            let name = read_model(&pool, &name).await?;
            let mut after = 0;
            loop {
                let page =
                    operations::dead_letters(&pool, &name, status.as_deref(), after, 500).await?;
                let Some(last) = page.last() else { break };
                after = last.id;
                for letter in &page {
                    writeln!(out, "{}", serde_json::to_string(letter)?)?;
                }
            }
        }
        Command::Export(args) => crate::export::run(args, &cli.database_url, out).await?,
        Command::History(args) => crate::history::run(args, &pool, out).await?,
        Command::Verify(args) => crate::chain::verify(&pool, args, out).await?,
        Command::Anchor(args) => crate::chain::run_anchor(&pool, args, out).await?,
        Command::Reconcile(args) => crate::reconcile::reconcile(&pool, args, out).await?,
        Command::Rebuild(args) => crate::rebuild::run(args, &pool, out).await?,
        Command::Check(args) => crate::check::run(args, &pool, out).await?,
        Command::AsOf(args) => crate::asof::run(args, &pool, out).await?,
        Command::EraseCustomer(args) => crate::privacy::erase(args, &pool, out).await?,
        Command::StuckFlows(command) => stuck_flows(&pool, command, out).await?,
        Command::Migrate => migrate(pool, out).await?,
        Command::Restore(args) => crate::restore::run(args, &pool, out).await?,
        Command::DeadLetters(DeadLetters::Redrive {
            read_model: name,
            ids,
            all,
        }) => {
            let name = read_model(&pool, &name).await?;
            if all {
                let requested = operations::request_redrive_all(&pool, &name).await?;
                writeln!(
                    out,
                    "re-drive requested for {} dead letters",
                    requested.len()
                )?;
            }
            let mut refused = Vec::new();
            for id in ids {
                match operations::request_redrive(&pool, &name, id).await? {
                    RedriveRequest::Requested => writeln!(out, "{id}: re-drive requested")?,
                    RedriveRequest::AlreadyRedriven => {
                        refused.push(format!("{id} was already re-driven (never applied twice)"));
                    }
                    RedriveRequest::NotFound => {
                        refused.push(format!("{id} is not a dead letter of {name}"))
                    }
                }
            }
            if !refused.is_empty() {
                bail!("{}", refused.join("; "));
            }
        }
    }
    Ok(())
}

/// The event store's migrations, then every read model's schema.
pub(crate) async fn migrate(pool: PgPool, out: &mut impl Write) -> anyhow::Result<()> {
    commands::EventStoreDb::with_pool(pool.clone())
        .await
        .context("applying the event store's migrations")?;
    writeln!(out, "event store migrated")?;
    for read_model in projections::read_models::all() {
        streams::consumer::ensure_schema(read_model.as_ref(), &pool)
            .await
            .with_context(|| format!("creating the schema of read model {}", read_model.name()))?;
        writeln!(out, "read model {} ready", read_model.name())?;
    }
    Ok(())
}

/// Who asks, as recorded with a stuck-flow request.
fn operator() -> String {
    format!(
        "operator:{}",
        std::env::var("USER").unwrap_or_else(|_| "replay-tools".to_owned())
    )
}

async fn stuck_flows(
    pool: &PgPool,
    command: StuckFlows,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    use commands::stuck::{self, Request};
    match command {
        StuckFlows::List { status, order } => {
            if let Some(status) = &status {
                if status != "all" && !stuck::STATUSES.contains(&status.as_str()) {
                    bail!(
                        "status `{status}` is not one of all, {}",
                        stuck::STATUSES.join(", ")
                    );
                }
            }
            let mut filter = stuck::Filter {
                status,
                order_id: order,
                after: 0,
                limit: 500,
            };
            loop {
                let page = stuck::list(pool, &filter).await?;
                let Some(last) = page.last() else { break };
                filter.after = last.id;
                for record in &page {
                    writeln!(out, "{}", serde_json::to_string(record)?)?;
                }
            }
        }
        StuckFlows::Retry { ids } => {
            let mut refused = Vec::new();
            for id in ids {
                match stuck::request(pool, id, Request::Retry, &operator(), None).await {
                    Ok(_) => writeln!(out, "{id}: retry requested")?,
                    Err(stuck::RequestError::Database(e)) => return Err(e.into()),
                    Err(e) => refused.push(e.to_string()),
                }
            }
            if !refused.is_empty() {
                bail!("{}", refused.join("; "));
            }
        }
        StuckFlows::Resolve { id, reason } => {
            let reason = reason.trim();
            if reason.is_empty() || reason.chars().count() > 400 {
                bail!("--reason: give 1 to 400 characters; it becomes the cancellation reason");
            }
            stuck::request(pool, id, Request::Resolve, &operator(), Some(reason)).await?;
            writeln!(
                out,
                "{id}: resolution requested (the order will be cancelled)"
            )?;
        }
    }
    Ok(())
}
