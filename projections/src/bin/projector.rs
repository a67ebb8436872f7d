//! Projector host process: runs the projections named in `PROJECTIONS` (comma-separated;
//! default `tracking`), each with its own consumer group. Configuration: `DATABASE_URL`,
//! `KAFKA_*`, `SCHEMA_REGISTRY_*`, `PROJECTOR_*`, `METRICS_LISTEN`.

use std::sync::Arc;

use anyhow::{bail, Context};
use projections::{Projection, Projector, ProjectorConfig, TrackingProjection};
use sqlx::postgres::PgPoolOptions;
use streams::process::{init_tracing, serve_metrics_from_env, shutdown_token};
use streams::{admin, KafkaConfig, RegistryConfig};

fn projection(name: &str) -> anyhow::Result<Arc<dyn Projection>> {
    match name {
        "tracking" => Ok(Arc::new(TrackingProjection)),
        other => bail!("unknown projection `{other}`; known: tracking"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    serve_metrics_from_env()?;
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/backbone".to_owned());
    let names = std::env::var("PROJECTIONS").unwrap_or_else(|_| "tracking".to_owned());
    let kafka = KafkaConfig::from_env().context("KAFKA_* settings")?;
    let registry = RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
    let config = ProjectorConfig::from_env().context("PROJECTOR_* settings")?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&database_url)
        .await
        .context("connecting to the read-model database")?;
    admin::ensure_topics(&kafka, &kafka.topics().all())
        .await
        .context("creating topics")?;
    let shutdown = shutdown_token();
    let mut tasks = tokio::task::JoinSet::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let projector = Projector::new(
            projection(name)?,
            pool.clone(),
            &kafka,
            &registry,
            config.clone(),
        )
        .await
        .with_context(|| format!("starting projection {name}"))?;
        tasks.spawn(projector.run_until_stopped(shutdown.clone()));
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result? {
            shutdown.cancel();
            return Err(e.into());
        }
    }
    Ok(())
}
