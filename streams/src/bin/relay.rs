//! The outbox relay process. Configuration: `DATABASE_URL`, `KAFKA_*`, `SCHEMA_REGISTRY_*`,
//! `RELAY_*`, `METRICS_LISTEN` (see `streams::config` and `streams::relay`).

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use streams::process::{init_tracing, serve_metrics_from_env, shutdown_token};
use streams::{admin, KafkaConfig, RegistryConfig, Relay, RelayConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    serve_metrics_from_env()?;
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/backbone".to_owned());
    let kafka = KafkaConfig::from_env().context("KAFKA_* settings")?;
    let registry = RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
    let config = RelayConfig::from_env().context("RELAY_* settings")?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url)
        .await
        .context("connecting to the event store")?;
    admin::ensure_topics(&kafka, &kafka.topics().all())
        .await
        .context("creating topics")?;
    let relay = Relay::new(pool, &kafka, &registry, config)?;
    relay.run_until_stopped(shutdown_token()).await?;
    Ok(())
}
