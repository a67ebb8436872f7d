//! The process manager process: the order flow (orders ⇄ payments ⇄ rewards) and its deadline
//! scheduler. Configuration: `DATABASE_URL`, `KAFKA_*`, `SCHEMA_REGISTRY_*`, `PROJECTOR_*` (it
//! runs on the consumer runtime, consumer group `<prefix>order_flow`), `FLOW_*` (below),
//! `METRICS_LISTEN` and `READY_*` (the operations endpoint, see `streams::process`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use commands::catalogue::seed_catalogue;
use commands::{CatalogueStore, EventStoreDb};
use flows::OrderFlow;
use futures::future::try_join_all;
use streams::consumer::{lag_probe, Projection, Projector, ProjectorConfig};
use streams::process::{
    connect_from_env, init_tracing, ready_max_lag_seconds, serve_ops_from_env, shutdown_token,
    Probe,
};

/// The process manager's own settings.
#[derive(Debug, serde::Deserialize)]
struct FlowConfig {
    /// `FLOW_CONSUMERS`: members of the flow's consumer group in this process (default 4). A
    /// member applies its batch one reaction after another, each a command's round trips to
    /// PostgreSQL; members work on their own partitions side by side. More than the partitions
    /// of the busiest topic leaves some idle.
    #[serde(default = "default_consumers")]
    flow_consumers: usize,
    /// `CATALOGUE_PATH`: seeds an empty catalogue table (default: the built-in demo catalogue).
    catalogue_path: Option<String>,
}

const fn default_consumers() -> usize {
    4
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = init_tracing("process-manager")?;
    let config = ProjectorConfig::from_env().context("PROJECTOR_* settings")?;
    let flow_config: FlowConfig = envy::from_env().context("FLOW_* settings")?;
    let consumers = flow_config.flow_consumers.max(1);
    let catalogue =
        seed_catalogue(flow_config.catalogue_path.as_deref()).map_err(anyhow::Error::msg)?;
    // Each member holds a connection for its batch's transaction and one for the command in
    // hand; the rest serve the deadlines, the catalogue refresh and the probes.
    let pool_size = u32::try_from(2 * consumers + 4).unwrap_or(u32::MAX);
    let connections = connect_from_env(pool_size).await?;
    let db = EventStoreDb::with_pool(connections.pool).await?;
    let catalogue = Arc::new(CatalogueStore::load(db.pool().clone(), &catalogue).await?);
    let flow = Arc::new(OrderFlow::new(db.clone(), catalogue.clone()));
    let mut members = Vec::with_capacity(consumers);
    for _ in 0..consumers {
        members.push(
            Projector::new(
                flow.clone(),
                db.pool().clone(),
                &connections.kafka,
                &connections.registry,
                config.clone(),
            )
            .await?,
        );
    }
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
    let running = try_join_all(
        members
            .into_iter()
            .map(|member| member.run_until_stopped(shutdown.clone())),
    )
    .await;
    shutdown.cancel();
    running?;
    deadlines.await?;
    refresh.await?;
    Ok(())
}
