//! Mints a development bearer token for the API (HS256 with `AUTH_JWT_SECRET`, the issuer and
//! audience of `AUTH_JWT_ISSUER`/`AUTH_JWT_AUDIENCE`). Production tokens come from the identity
//! provider, signed with its RS256/ES256 key; this tool cannot make those.
//!
//! ```sh
//! AUTH_JWT_SECRET=... mint-token --role customer --subject 8d0c...  # prints the token
//! ```

use std::io::Write;

use anyhow::Context;
use api::auth::{mint_hs256, AuthConfig, Claims, Role};
use clap::Parser;
use uuid::Uuid;

/// Mint a development token.
#[derive(Debug, Parser)]
#[command(name = "mint-token", version)]
struct Args {
    /// customer, store, courier, admin, analyst or auditor.
    #[arg(long)]
    role: Role,
    /// The caller's id (the customer's, store's or courier's id for those roles); a new one when
    /// left out.
    #[arg(long)]
    subject: Option<Uuid>,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    ttl_seconds: i64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: AuthConfig = envy::from_env().context("AUTH_* settings")?;
    let subject = args.subject.unwrap_or_else(Uuid::new_v4);
    let claims = Claims::new(&config, args.role, subject, args.ttl_seconds);
    let token = mint_hs256(&config, &claims)?;
    writeln!(std::io::stdout(), "{token}").context("stdout")?;
    Ok(())
}
