//! The HTTP API process. Configuration: `API_*`, `CATALOGUE_PATH`, `DATABASE_URL`,
//! `KAFKA_*` and `SCHEMA_REGISTRY_*` (readiness checks).

use anyhow::Context;
use api::{ApiConfig, ApiServer};
use streams::process::{init_tracing, shutdown_token};
use streams::{KafkaConfig, RegistryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = init_tracing("api")?;
    let config = ApiConfig::from_env().context("API_* settings")?;
    let store: commands::EventStoreConfig = envy::from_env().context("DATABASE_* settings")?;
    let kafka = KafkaConfig::from_env().context("KAFKA_* settings")?;
    let registry = RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
    let server = ApiServer::build(config, store, kafka, registry).await?;
    tracing::info!(addr = %server.local_addr()?, "API listening");
    let shutdown = shutdown_token();
    server
        .run_until_stopped(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
