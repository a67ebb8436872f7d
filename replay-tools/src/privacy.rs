//! Customers' personal data in what replay-tools shows, and `replay-tools erase-customer`.
//!
//! Events hold personal strings only as `pii:v1` envelopes sealed with the customer's data key
//! (`commands::pii`). Every payload this tool prints or writes for people (`history`, `export`
//! from the store and from the topics, `as-of`) goes through [`Revealer::reveal`] first:
//! plaintext while the customer's key exists, `[erased]` once the customer was erased
//! (`[unreadable]` for a damaged envelope). Commands that compare or rebuild (`verify`,
//! `reconcile`, `rebuild`, `check`) work on the stored form and never reveal.

use std::io::Write;

use anyhow::Context;
use chrono::SecondsFormat;
use clap::Args;
use commands::pii::PiiVault;
use serde_json::{json, Value as Json};
use sqlx::PgPool;
use uuid::Uuid;

/// Reveals the personal data in payloads, loading the keys of one batch with one query.
#[derive(Debug, Clone)]
pub struct Revealer {
    vault: PiiVault,
}

impl Revealer {
    /// Over the database holding the customers' data keys (the event store's).
    pub fn new(pool: PgPool) -> Self {
        Self {
            vault: PiiVault::new(pool),
        }
    }

    /// Replaces every envelope in `payloads` with what people may see.
    pub async fn reveal<'a>(
        &self,
        payloads: impl IntoIterator<Item = &'a mut Json>,
    ) -> anyhow::Result<()> {
        self.vault
            .reveal_all(payloads)
            .await
            .context("reading the customers' data keys")
    }
}

/// `replay-tools erase-customer`.
#[derive(Debug, Args)]
pub struct EraseArgs {
    /// The customer whose personal data is erased.
    pub customer_id: Uuid,
    /// Why, for the record (e.g. the ticket of the customer's request); 1 to 500 characters.
    #[arg(long)]
    pub reason: String,
    /// Who erases (recorded as `replay-tools:<by>`).
    #[arg(long, env = "USER", default_value = "operator", hide_env_values = true)]
    pub by: String,
}

/// Erases a customer's personal data (deletes their data key); prints the erasure as JSON.
pub async fn erase(args: EraseArgs, pool: &PgPool, out: &mut impl Write) -> anyhow::Result<()> {
    let reason = args.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        anyhow::bail!("--reason must hold 1 to 500 characters");
    }
    let erasure = PiiVault::new(pool.clone())
        .erase(
            args.customer_id,
            &format!("replay-tools:{}", args.by),
            reason,
        )
        .await
        .context("erasing the customer's data key")?;
    writeln!(
        out,
        "{}",
        json!({
            "customer_id": erasure.customer_id,
            "erased_at": erasure.erased_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            "already_erased": erasure.already_erased,
        })
    )?;
    Ok(())
}
