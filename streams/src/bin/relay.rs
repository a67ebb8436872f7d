//! The outbox relay process. Configuration: `DATABASE_URL`, `KAFKA_*`, `SCHEMA_REGISTRY_*`,
//! `RELAY_*`, `METRICS_LISTEN` (see `streams::config` and `streams::relay`).

use anyhow::Context;
use streams::process::{connect_from_env, init_tracing, serve_metrics_from_env, shutdown_token};
use streams::{Relay, RelayConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    serve_metrics_from_env()?;
    let config = RelayConfig::from_env().context("RELAY_* settings")?;
    let connections = connect_from_env(4).await?;
    let relay = Relay::new(
        connections.pool,
        &connections.kafka,
        &connections.registry,
        config,
    )?;
    relay.run_until_stopped(shutdown_token()).await?;
    Ok(())
}
