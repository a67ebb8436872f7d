//! What every backbone process does the same way: logs, metrics endpoint, shutdown signal.

use std::net::SocketAddr;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); `LOG_FORMAT=json` for JSON lines.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A subscriber set by an embedding process (tests) wins.
    drop(result);
}

/// Serves Prometheus metrics on `METRICS_LISTEN` (for example `127.0.0.1:9101`), if set.
pub fn serve_metrics_from_env() -> anyhow::Result<()> {
    let Ok(listen) = std::env::var("METRICS_LISTEN") else {
        return Ok(());
    };
    let addr: SocketAddr = listen.parse()?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}

/// What a Kafka-side process connects to, read from the environment.
#[derive(Debug)]
pub struct Connections {
    pub kafka: crate::KafkaConfig,
    pub registry: crate::RegistryConfig,
    pub pool: PgPool,
}

/// Reads `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/backbone`), `KAFKA_*`
/// and `SCHEMA_REGISTRY_*`, connects a pool of `max_connections`, and creates the event topics
/// if they are missing.
pub async fn connect_from_env(max_connections: u32) -> anyhow::Result<Connections> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/backbone".to_owned());
    let kafka = crate::KafkaConfig::from_env().context("KAFKA_* settings")?;
    let registry = crate::RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .connect(&database_url)
        .await
        .context("connecting to PostgreSQL")?;
    crate::admin::ensure_topics(&kafka, &kafka.topics().all())
        .await
        .context("creating topics")?;
    Ok(Connections {
        kafka,
        registry,
        pool,
    })
}

/// A token cancelled on SIGINT or SIGTERM: the one shutdown path of a process.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
