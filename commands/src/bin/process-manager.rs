//! The process manager process: links orders and payments. Configuration: `DATABASE_URL`,
//! `KAFKA_*`, `SCHEMA_REGISTRY_*`, `PROJECTOR_*` (it runs on the projector runtime, consumer
//! group `<prefix>order_payment_flow`), `METRICS_LISTEN`.

use std::sync::Arc;

use anyhow::Context;
use commands::process::OrderPaymentFlow;
use commands::{CommandBus, EventStoreDb};
use domain::payment::PaymentServices;
use domain::services::{Catalogue, OrderServices, SystemClock};
use projections::{Projector, ProjectorConfig};
use streams::process::{connect_from_env, init_tracing, serve_metrics_from_env, shutdown_token};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    serve_metrics_from_env()?;
    let config = ProjectorConfig::from_env().context("PROJECTOR_* settings")?;
    let connections = connect_from_env(8).await?;
    let db = EventStoreDb::with_pool(connections.pool).await?;
    let flow = flow(&db);
    let projector = Projector::new(
        Arc::new(flow),
        db.pool().clone(),
        &connections.kafka,
        &connections.registry,
        config,
    )
    .await?;
    projector.run_until_stopped(shutdown_token()).await?;
    Ok(())
}

/// The flow's command buses. The order bus never prices here (the flow does not place
/// orders), so it gets an empty catalogue.
fn flow(db: &EventStoreDb) -> OrderPaymentFlow {
    let clock = Arc::new(SystemClock);
    let orders = CommandBus::new(
        db.clone(),
        OrderServices::new(Arc::new(Catalogue::default()), clock.clone()),
    );
    let payments = CommandBus::new(db.clone(), PaymentServices::new(clock));
    OrderPaymentFlow::new(Arc::new(orders), Arc::new(payments))
}
