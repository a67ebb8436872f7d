//! `schema-registry`: the Confluent-compatible schema registry as a process.
//!
//! Configured by environment variables (`REGISTRY_DATABASE_URL`, `REGISTRY_DB_SCHEMA`,
//! `REGISTRY_LISTEN`, `REGISTRY_BASIC_AUTH` (required: the writers' `user:password`),
//! `REGISTRY_ANONYMOUS_READS`; see `registry::RegistryConfig`) and `RUST_LOG` for the log filter
//! (default `info`). Stops gracefully on SIGINT or SIGTERM: no new connections, requests in
//! flight finish, the database pool closes.

use anyhow::Context;
use registry::{RegistryConfig, RegistryServer};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let config = RegistryConfig::from_env().context("reading the REGISTRY_* configuration")?;
    let server = RegistryServer::build(config)
        .await
        .context("starting the schema registry")?;
    server
        .run_until_stopped(shutdown_signal())
        .await
        .context("running the schema registry")
}

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
