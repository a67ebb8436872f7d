//! The PostgreSQL event store: connection pool and the migrations the project applies itself.

use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// The database every component uses when `DATABASE_URL` is unset: the development one
/// `scripts/run-backbone` creates.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/backbone";

/// Connection settings of the event store, from the environment.
#[derive(Clone, Deserialize)]
pub struct EventStoreConfig {
    /// `DATABASE_URL`: PostgreSQL URL of the event store.
    #[serde(default = "default_url")]
    pub database_url: String,
    /// `DATABASE_MAX_CONNECTIONS`: pool size (default 16).
    #[serde(default = "default_pool")]
    pub database_max_connections: u32,
}

/// The URL without its password: what logs and panics may show.
pub fn redacted_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((credentials, host)) => {
                let user = credentials.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_owned(),
        },
        None => "***".to_owned(),
    }
}

impl std::fmt::Debug for EventStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStoreConfig")
            .field("database_url", &redacted_url(&self.database_url))
            .field("database_max_connections", &self.database_max_connections)
            .finish()
    }
}

fn default_url() -> String {
    DEFAULT_DATABASE_URL.to_owned()
}

const fn default_pool() -> u32 {
    16
}

impl Default for EventStoreConfig {
    fn default() -> Self {
        Self {
            database_url: default_url(),
            database_max_connections: default_pool(),
        }
    }
}

/// Why the event store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the event store: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot migrate the event store: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The event store database.
#[derive(Debug, Clone)]
pub struct EventStoreDb {
    pool: PgPool,
}

impl EventStoreDb {
    /// Connects and applies the migrations (idempotent; concurrent starts serialize on sqlx's
    /// migration lock).
    pub async fn connect(config: &EventStoreConfig) -> Result<Self, StoreError> {
        let options: PgConnectOptions = config.database_url.parse().map_err(StoreError::Connect)?;
        let pool = PgPoolOptions::new()
            .max_connections(config.database_max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(StoreError::Connect)?;
        let db = Self { pool };
        db.migrate().await?;
        Ok(db)
    }

    /// Wraps an existing pool and applies the migrations.
    pub async fn with_pool(pool: PgPool) -> Result<Self, StoreError> {
        let db = Self { pool };
        db.migrate().await?;
        Ok(db)
    }

    /// Applies the event store migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::{redacted_url, EventStoreConfig};

    #[test]
    fn the_config_never_shows_the_password() {
        let config = EventStoreConfig {
            database_url: "postgres://backbone:s3cret@db.internal:5432/backbone".to_owned(),
            database_max_connections: 4,
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("backbone:***@db.internal:5432/backbone"),
            "{shown}"
        );
        assert_eq!(
            redacted_url("postgres://postgres@127.0.0.1:5432/backbone"),
            "postgres://postgres:***@127.0.0.1:5432/backbone"
        );
    }
}
