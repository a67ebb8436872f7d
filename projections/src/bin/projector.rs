//! Projector host process: runs the read models named in `PROJECTIONS` (comma-separated;
//! default: all of them, see `projections::read_models`), each with its own
//! consumer group. Configuration: `DATABASE_URL`,
//! `KAFKA_*`, `SCHEMA_REGISTRY_*`, `PROJECTOR_*`, `METRICS_LISTEN` and `READY_*` (the operations
//! endpoint, see `streams::process`); with `notifications`,
//! `NOTIFICATIONS_WEBHOOK_*` (see `projections::notifier`).

use anyhow::Context;
use projections::read_models;
use streams::consumer::{lag_probe, Projector, ProjectorConfig, ProjectorError};
use streams::process::{
    connect_from_env, init_tracing, ready_max_lag_seconds, serve_ops_from_env, shutdown_token,
    Probe,
};

/// Which read models this process runs.
#[derive(Debug, serde::Deserialize)]
struct Hosted {
    /// `PROJECTIONS`: read model names, comma-separated (default: every read model).
    projections: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = init_tracing("projector")?;
    let hosted: Hosted = envy::from_env().context("PROJECTIONS")?;
    let names = hosted
        .projections
        .unwrap_or_else(|| read_models::names().join(","));
    let config = ProjectorConfig::from_env().context("PROJECTOR_* settings")?;
    let connections = connect_from_env(8).await?;
    let (pool, kafka, registry) = (connections.pool, connections.kafka, connections.registry);
    let shutdown = shutdown_token();
    let names: Vec<&str> = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    let projections = names
        .iter()
        .map(|name| read_models::by_name(name))
        .collect::<Result<Vec<_>, _>>()?;
    // Ready: the database and the broker answer, and no record waits longer than
    // READY_MAX_LAG_SECONDS on a partition this process owns.
    let schemas: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    serve_ops_from_env(
        vec![
            Probe::database(pool.clone()),
            Probe::broker(&kafka),
            lag_probe(pool.clone(), &schemas, ready_max_lag_seconds()),
        ],
        shutdown.clone(),
    )
    .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for (name, projection) in names.iter().copied().zip(projections) {
        let projector = Projector::new(projection, pool.clone(), &kafka, &registry, config.clone())
            .await
            .with_context(|| format!("starting projection {name}"))?;
        tasks.spawn(projector.run_until_stopped(shutdown.clone()));
        if name == projections::notifications::NAME {
            // The webhook worker runs beside the notifications projection when a URL is set.
            let webhook = projections::notifier::WebhookConfig::from_env()
                .context("NOTIFICATIONS_WEBHOOK_* settings")?;
            if webhook.enabled() {
                let notifier = projections::notifier::Notifier::new(pool.clone(), &webhook)
                    .await
                    .context("starting the notification webhook worker")?;
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    notifier
                        .run_until_stopped(stop)
                        .await
                        .map_err(|e| ProjectorError::Config(format!("webhook worker: {e}")))
                });
            }
        }
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result? {
            shutdown.cancel();
            return Err(e.into());
        }
    }
    Ok(())
}
