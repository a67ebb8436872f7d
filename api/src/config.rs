//! The API's settings, read from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use domain::services::Catalogue;
use serde::Deserialize;
use sqlx::PgPool;

use crate::{auth, idempotency};

/// API settings.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiConfig {
    /// `API_LISTEN`: address to listen on (default `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub api_listen: SocketAddr,
    /// `API_BODY_LIMIT_BYTES`: largest accepted request body (default 65536).
    #[serde(default = "default_body_limit")]
    pub api_body_limit_bytes: usize,
    /// `API_REQUEST_TIMEOUT_MS`: requests taking longer are answered 408 (default 10000).
    #[serde(default = "default_timeout")]
    pub api_request_timeout_ms: u64,
    /// `API_READ_YOUR_WRITES_WAIT_MS`: how long a query with `position` waits at most for its read
    /// model to apply that event (default 3000); it wakes on the projector's signal, not a timer.
    #[serde(default = "default_ryw")]
    pub api_read_your_writes_wait_ms: u64,
    /// `API_MAX_WAITS_PER_CLIENT`: read-your-writes waits (queries with `position` that the read
    /// model has not reached yet) one client may have in flight at once; one more is answered
    /// 429 (default 8).
    #[serde(default = "default_max_waits")]
    pub api_max_waits_per_client: usize,
    /// `API_IDEMPOTENCY_TTL_SECONDS`: how long the response to a request with an
    /// `Idempotency-Key` is kept and replayed; after that the key is forgotten (default 86400).
    #[serde(default = "default_idempotency_ttl")]
    pub api_idempotency_ttl_seconds: u64,
    /// `CATALOGUE_PATH`: JSON catalogue of menu and regions (default: the built-in demo menu).
    #[serde(default)]
    pub catalogue_path: Option<String>,
    /// `API_RATE_LIMIT_PER_SECOND`: sustained requests per second per client (default 50; 0 turns
    /// the limit off).
    #[serde(default = "default_rate")]
    pub api_rate_limit_per_second: u32,
    /// `API_RATE_LIMIT_BURST`: requests a client may send at once above the rate (default 100).
    #[serde(default = "default_burst")]
    pub api_rate_limit_burst: u32,
    /// `PAYMENTS_WEBHOOK_SECRET`: the HMAC-SHA256 key payment providers sign webhooks with
    /// (required to accept webhooks; without it they are refused). Never logged.
    #[serde(default)]
    pub payments_webhook_secret: Option<auth::Secret>,
    /// `PAYMENTS_WEBHOOK_TOLERANCE_SECONDS`: how old a signed webhook may be (default 300).
    #[serde(default = "default_webhook_tolerance")]
    pub payments_webhook_tolerance_seconds: i64,
    /// `API_HEADER_READ_TIMEOUT_MS`: the head of a request must arrive within this, counted
    /// from when the server waits for it (a new connection, or between keep-alive requests);
    /// otherwise the connection is closed (default 10000).
    #[serde(default = "default_header_read_timeout")]
    pub api_header_read_timeout_ms: u64,
    /// `API_IDLE_TIMEOUT_MS`: a connection on which no byte moves for this long is closed
    /// (default 60000; event streams send a keep-alive every 15 s).
    #[serde(default = "default_idle_timeout")]
    pub api_idle_timeout_ms: u64,
    /// `API_ADMISSION_LIMIT`: requests the handlers hold at once; one more waits for a slot
    /// (default 0: twice the database pool, enough to keep every connection busy). See
    /// [`crate::admission`].
    #[serde(default)]
    pub api_admission_limit: usize,
    /// `API_ADMISSION_WAIT_MS`: how long a request waits for a slot before it is answered 503
    /// with `Retry-After` (default 1000; placements, new work, wait a quarter of it).
    #[serde(default = "default_admission_wait")]
    pub api_admission_wait_ms: u64,
    /// `API_MAX_CONNECTIONS`: open connections at most; beyond, new ones wait to be accepted
    /// (default 1024).
    #[serde(default = "default_max_connections")]
    pub api_max_connections: usize,
    /// `API_MAX_HEADER_BYTES`: the largest request head (request line and headers); a larger one
    /// is answered 431 (default 65536).
    #[serde(default = "default_max_header_bytes")]
    pub api_max_header_bytes: usize,
    /// `API_READINESS_INTERVAL_MS`: how often the dependencies of `/health/ready` are checked in
    /// the background (default 5000); the endpoint serves the last result.
    #[serde(default = "default_readiness_interval")]
    pub api_readiness_interval_ms: u64,
    /// `API_MAX_STREAMS_PER_CLIENT`: event streams (SSE) one client may hold open at once; one
    /// more is answered 429 (default 4).
    #[serde(default = "default_max_streams")]
    pub api_max_streams_per_client: usize,
    /// `API_CONSOLE_DIR`: the built operations console served at `/console/` (default
    /// `api/console/dist`, where the project's scripts build it, relative to the repository
    /// root they run from).
    #[serde(default = "default_console_dir")]
    pub api_console_dir: std::path::PathBuf,
    /// The token settings (`AUTH_*`, see [`auth::AuthConfig`]).
    #[serde(skip)]
    pub auth: auth::AuthConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_console_dir() -> std::path::PathBuf {
    std::path::PathBuf::from("api/console/dist")
}
const fn default_body_limit() -> usize {
    64 * 1024
}
const fn default_timeout() -> u64 {
    10_000
}
const fn default_ryw() -> u64 {
    3_000
}
const fn default_max_waits() -> usize {
    8
}
const fn default_rate() -> u32 {
    50
}
const fn default_burst() -> u32 {
    100
}
const fn default_webhook_tolerance() -> i64 {
    300
}
const fn default_idempotency_ttl() -> u64 {
    86_400
}
const fn default_max_streams() -> usize {
    4
}
const fn default_readiness_interval() -> u64 {
    5_000
}
const fn default_header_read_timeout() -> u64 {
    10_000
}
const fn default_idle_timeout() -> u64 {
    60_000
}
const fn default_admission_wait() -> u64 {
    1_000
}
const fn default_max_connections() -> usize {
    1024
}
const fn default_max_header_bytes() -> usize {
    64 * 1024
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            api_listen: default_listen(),
            api_body_limit_bytes: default_body_limit(),
            api_request_timeout_ms: default_timeout(),
            api_read_your_writes_wait_ms: default_ryw(),
            api_max_waits_per_client: default_max_waits(),
            api_idempotency_ttl_seconds: default_idempotency_ttl(),
            catalogue_path: None,
            api_rate_limit_per_second: default_rate(),
            api_rate_limit_burst: default_burst(),
            payments_webhook_secret: None,
            payments_webhook_tolerance_seconds: default_webhook_tolerance(),
            api_header_read_timeout_ms: default_header_read_timeout(),
            api_idle_timeout_ms: default_idle_timeout(),
            api_admission_limit: 0,
            api_admission_wait_ms: default_admission_wait(),
            api_max_connections: default_max_connections(),
            api_max_header_bytes: default_max_header_bytes(),
            api_readiness_interval_ms: default_readiness_interval(),
            api_max_streams_per_client: default_max_streams(),
            api_console_dir: default_console_dir(),
            auth: auth::AuthConfig::default(),
        }
    }
}

impl ApiConfig {
    pub fn from_env() -> Result<Self, envy::Error> {
        let mut config: Self = envy::from_env()?;
        config.auth = envy::from_env()?;
        Ok(config)
    }

    /// The catalogue that prices orders.
    pub fn catalogue(&self) -> Result<Catalogue, String> {
        commands::catalogue::seed_catalogue(self.catalogue_path.as_deref())
    }

    /// The admission limit: `API_ADMISSION_LIMIT` requests in the handlers (0, the default: twice
    /// `pool`'s connections), each waiting at most `API_ADMISSION_WAIT_MS` for a slot.
    pub fn admission(&self, pool: &PgPool) -> std::sync::Arc<crate::admission::Admission> {
        let limit = match self.api_admission_limit {
            0 => 2 * pool.options().get_max_connections() as usize,
            limit => limit,
        };
        crate::admission::Admission::new(limit, Duration::from_millis(self.api_admission_wait_ms))
    }

    /// The store of idempotency keys, with this configuration's expiry and request timeout.
    pub fn idempotency(&self, pool: PgPool) -> idempotency::Idempotency {
        idempotency::Idempotency::new(
            pool,
            Duration::from_secs(self.api_idempotency_ttl_seconds),
            Duration::from_millis(self.api_request_timeout_ms),
        )
    }
}
