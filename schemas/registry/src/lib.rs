//! A Confluent-compatible schema registry, stored in PostgreSQL.
//!
//! Production points its clients at any Confluent-compatible registry by URL; development, the
//! tests and the default run use this one. It implements the part of the Confluent REST API that
//! serializers, deserializers and admin clients call (register, look up by id, by subject and
//! version, latest, list subjects and versions, compatibility checks, config, soft and permanent
//! deletes), with the same paths, bodies and `{"error_code", "message"}` errors, so that clients
//! written by others (`schema_registry_converter`, `confluent-kafka`, the Java serializers) work
//! against it unchanged. Only Avro schemas are accepted.
//!
//! Module map:
//! - this file: configuration and the server process (`build`, `local_addr`, `run_until_stopped`);
//! - [`api`]: the HTTP routes and handlers, which hold the rules of each endpoint;
//! - `store`: the SQL, the migrations and the locks;
//! - `schema`: parsing a submitted Avro schema and the form that decides its identity;
//! - `compat`: compatibility levels and the Avro schema-resolution check;
//! - `error`: the library error and the Confluent error replies;
//! - [`access`]: HTTP Basic credentials for every write (and, if configured, every read).
//!
//! Ids are global (one per distinct schema across subjects) and stable across restarts; a
//! registration runs in one transaction holding an advisory lock of the registry, so concurrent
//! registrations of the same schema get one id and versions never collide.

pub mod access;
pub mod api;
mod compat;
mod error;
mod schema;
mod store;

use std::future::Future;
use std::net::SocketAddr;

use serde::Deserialize;
use tokio::net::TcpListener;

pub use api::{router, AppState};
pub use compat::CompatibilityLevel;
pub use error::{ApiError, RegistryError};
pub use schema::SchemaReference;

/// Configuration of the registry process, read from the environment (prefix `REGISTRY_`).
/// Its `Debug` hides the password of the database URL.
#[derive(Clone, Deserialize)]
pub struct RegistryConfig {
    /// `REGISTRY_DATABASE_URL`: PostgreSQL connection URL of the database that holds the
    /// registry. Default `postgres://postgres@127.0.0.1:5432/postgres`. Never logged (it may
    /// carry a password).
    #[serde(default = "default_database_url")]
    pub database_url: String,
    /// `REGISTRY_DB_SCHEMA`: PostgreSQL schema (namespace) inside that database that holds the
    /// registry's tables, created at start-up. Default `schema_registry`. Lower-case letters,
    /// digits and `_`, starting with a letter or `_`, at most 63 characters.
    #[serde(default = "default_db_schema")]
    pub db_schema: String,
    /// `REGISTRY_LISTEN`: address the HTTP API listens on. Default `127.0.0.1:8081` (the
    /// Confluent port); port 0 picks a free port (see [`RegistryServer::local_addr`]).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `REGISTRY_BASIC_AUTH`: `user:password` that every write (register, config, delete) must
    /// present with HTTP Basic authentication, as Confluent clients send `basic.auth.user.info`
    /// and ours `SCHEMA_REGISTRY_BASIC_AUTH`. Required: the registry does not start without it.
    /// Never logged.
    #[serde(default)]
    pub basic_auth: Option<String>,
    /// `REGISTRY_ANONYMOUS_READS`: whether look-ups, listings and compatibility checks need no
    /// credentials (default `true`; `false` asks for them on every request but `/health`).
    #[serde(default = "default_anonymous_reads")]
    pub anonymous_reads: bool,
}

const fn default_anonymous_reads() -> bool {
    true
}

fn default_database_url() -> String {
    "postgres://postgres@127.0.0.1:5432/postgres".to_owned()
}

fn default_db_schema() -> String {
    "schema_registry".to_owned()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            database_url: default_database_url(),
            db_schema: default_db_schema(),
            listen: default_listen(),
            basic_auth: None,
            anonymous_reads: default_anonymous_reads(),
        }
    }
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("database_url", &redact_password(&self.database_url))
            .field("db_schema", &self.db_schema)
            .field("listen", &self.listen)
            .field(
                "basic_auth",
                &self.basic_auth.as_ref().map(|_| "<redacted>"),
            )
            .field("anonymous_reads", &self.anonymous_reads)
            .finish()
    }
}

/// `scheme://user:***@host/...`: the URL without its password, for logs.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((user_info, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match user_info.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl RegistryConfig {
    /// Reads the configuration from the `REGISTRY_*` environment variables and validates it, so a
    /// wrong value stops the process at start-up rather than at the first request.
    pub fn from_env() -> Result<Self, RegistryError> {
        let config: Self = envy::prefixed("REGISTRY_").from_env()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that the type system does not.
    pub fn validate(&self) -> Result<(), RegistryError> {
        store::validate_schema_name(&self.db_schema)?;
        self.access().map(|_| ())
    }

    /// Who may write (and read): the credentials of `REGISTRY_BASIC_AUTH`.
    pub fn access(&self) -> Result<access::AccessPolicy, RegistryError> {
        let credentials = self
            .basic_auth
            .as_deref()
            .and_then(access::Credentials::parse)
            .ok_or(RegistryError::MissingCredentials)?;
        Ok(access::AccessPolicy {
            credentials,
            anonymous_reads: self.anonymous_reads,
        })
    }
}

/// The registry process: connected to PostgreSQL, migrated, and bound to its address.
#[derive(Debug)]
pub struct RegistryServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    access: access::AccessPolicy,
}

impl RegistryServer {
    /// Connects to the database, applies the migrations and binds the listener; the server does
    /// not answer requests until [`RegistryServer::run_until_stopped`].
    pub async fn build(config: RegistryConfig) -> Result<Self, RegistryError> {
        let state = AppState::connect(&config).await?;
        let access = config.access()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| RegistryError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| RegistryError::Bind {
                addr: config.listen,
                source,
            })?;
        tracing::info!(%local_addr, db_schema = %config.db_schema, "schema registry ready");
        Ok(Self {
            listener,
            local_addr,
            state,
            access,
        })
    }

    /// The address the server is bound to (the real port when the configuration asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves requests until `shutdown` completes, then stops accepting connections, lets the
    /// requests in flight finish and closes the database pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RegistryError> {
        let state = self.state.clone();
        let app = router(self.state, self.access);
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        state.close().await;
        tracing::info!(local_addr = %self.local_addr, "schema registry stopped");
        served.map_err(RegistryError::Serve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_debug_form_of_the_config_hides_the_database_password() {
        let config = RegistryConfig {
            database_url: "postgres://registry:s3cret@db:5432/app".to_owned(),
            ..RegistryConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://registry:***@db:5432/app"),
            "{shown}"
        );
    }

    #[test]
    fn the_config_comes_from_registry_variables_with_defaults() {
        let config: RegistryConfig = envy::prefixed("REGISTRY_")
            .from_iter([
                ("REGISTRY_DB_SCHEMA".to_owned(), "reg".to_owned()),
                ("REGISTRY_LISTEN".to_owned(), "0.0.0.0:9081".to_owned()),
            ])
            .expect("the variables deserialize");
        assert_eq!(config.db_schema, "reg");
        assert_eq!(config.listen, SocketAddr::from(([0, 0, 0, 0], 9081)));
        assert_eq!(config.database_url, default_database_url());
    }
}
