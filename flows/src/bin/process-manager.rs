//! The process manager process: the order flow (orders ⇄ payments ⇄ rewards) and its deadline
//! scheduler. Configuration: `DATABASE_URL`, `KAFKA_*`, `SCHEMA_REGISTRY_*`, `PROJECTOR_*` (it
//! runs on the consumer runtime, consumer group `<prefix>order_flow`), `CATALOGUE_PATH`
//! (seeds an empty catalogue table; default: the built-in demo catalogue), `METRICS_LISTEN` and
//! `READY_*` (the operations endpoint, see `streams::process`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use commands::catalogue::seed_catalogue;
use commands::{CatalogueStore, EventStoreDb};
use domain::services::Catalogue;
use flows::OrderFlow;
use streams::consumer::{lag_probe, Projection, Projector, ProjectorConfig};
use streams::process::{
    connect_from_env, init_tracing, ready_max_lag_seconds, serve_ops_from_env, shutdown_token,
    Probe,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = init_tracing("process-manager")?;
    let config = ProjectorConfig::from_env().context("PROJECTOR_* settings")?;
    let catalogue = catalogue()?;
    let connections = connect_from_env(8).await?;
    let db = EventStoreDb::with_pool(connections.pool).await?;
    let catalogue = Arc::new(CatalogueStore::load(db.pool().clone(), &catalogue).await?);
    let flow = Arc::new(OrderFlow::new(db.clone(), catalogue.clone()));
    let projector = Projector::new(
        flow.clone(),
        db.pool().clone(),
        &connections.kafka,
        &connections.registry,
        config,
    )
    .await?;
    let shutdown = shutdown_token();
    // Ready: the database and the broker answer, and no event waits for its reaction longer
    // than READY_MAX_LAG_SECONDS on a partition this process owns.
    serve_ops_from_env(
        vec![
            Probe::database(db.pool().clone()),
            Probe::broker(&connections.kafka),
            lag_probe(db.pool().clone(), &[flow.name()], ready_max_lag_seconds()),
        ],
        shutdown.clone(),
    )
    .await?;
    let refresh = {
        let (catalogue, shutdown) = (catalogue.clone(), shutdown.clone());
        tokio::spawn(async move {
            catalogue
                .refresh_every(Duration::from_secs(5), shutdown)
                .await;
        })
    };
    let deadlines = {
        let (flow, pool, shutdown) = (flow.clone(), db.pool().clone(), shutdown.clone());
        tokio::spawn(async move {
            flow.run_deadlines_until_stopped(pool, Duration::from_secs(1), shutdown)
                .await;
        })
    };
    projector.run_until_stopped(shutdown.clone()).await?;
    shutdown.cancel();
    deadlines.await?;
    refresh.await?;
    Ok(())
}

fn catalogue() -> anyhow::Result<Catalogue> {
    let path = std::env::var("CATALOGUE_PATH").ok();
    seed_catalogue(path.as_deref()).map_err(anyhow::Error::msg)
}
