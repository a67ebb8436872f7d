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
        default_value = "postgres://postgres@127.0.0.1:5432/backbone",
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
