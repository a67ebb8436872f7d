//! The outbox relay process. Configuration: `DATABASE_URL`, `KAFKA_*`, `SCHEMA_REGISTRY_*`,
//! `RELAY_*`, `METRICS_LISTEN` and `READY_*` (see `streams::config`, `streams::relay` and
//! `streams::process`).

use anyhow::Context;
use streams::process::{
    connect_from_env, init_tracing, ready_max_lag_seconds, serve_ops_from_env, shutdown_token,
    Probe,
};
use streams::{Relay, RelayConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = init_tracing("relay")?;
    let config = RelayConfig::from_env().context("RELAY_* settings")?;
    let connections = connect_from_env(4).await?;
    let shutdown = shutdown_token();
    // Ready: the database and the broker answer, and no committed event waits for publication
    // longer than READY_MAX_LAG_SECONDS.
    serve_ops_from_env(
        vec![
            Probe::database(connections.pool.clone()),
            Probe::broker(&connections.kafka),
            Probe::lag(
                connections.pool.clone(),
                "SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8 \
                 FROM outbox WHERE published_at IS NULL"
                    .to_owned(),
                ready_max_lag_seconds(),
            ),
        ],
        shutdown.clone(),
    )
    .await?;
    let relay = Relay::new(
        connections.pool,
        &connections.kafka,
        &connections.registry,
        config,
    )?;
    relay.run_until_stopped(shutdown).await?;
    Ok(())
}
