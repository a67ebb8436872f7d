//! What every backbone process does the same way: logs and traces ([`init_tracing`]), the
//! operations endpoint (metrics, liveness, readiness), shutdown signal.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use crate::telemetry::{init_tracing, Telemetry};

/// Histogram buckets, in seconds, of every `*_seconds` histogram (delays, durations, query
/// times): from a millisecond to ten minutes.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// The process-wide Prometheus recorder (installed once; another one installed first, as in a
/// test process, wins and this one only renders).
///
/// Histograms are exported as Prometheus histograms (cumulative `_bucket` counters), not as
/// summaries: a summary's quantiles cover a rolling window and read 0 once the window has no
/// samples, which a dashboard cannot tell from "fast"; buckets never go back, and
/// `histogram_quantile(rate(...[5m]))` says "no data" for a quiet window.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(SECONDS_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            let upkeep = handle.clone();
            // The recorder's upkeep (normally run by its exporter) keeps memory bounded.
            std::thread::Builder::new()
                .name("metrics-upkeep".to_owned())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .ok();
            handle
        })
        .clone()
}

/// A readiness check: `Ok` with a short note, or why the process cannot serve.
pub type CheckResult = Result<String, String>;

type CheckFn = Arc<dyn Fn() -> BoxFuture<'static, CheckResult> + Send + Sync>;

/// One thing readiness depends on (the database, the broker, the lag).
#[derive(Clone)]
pub struct Probe {
    name: &'static str,
    check: CheckFn,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe").field("name", &self.name).finish()
    }
}

impl Probe {
    pub fn new<F, Fut>(name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckResult> + Send + 'static,
    {
        Self {
            name,
            check: Arc::new(move || Box::pin(check())),
        }
    }

    /// PostgreSQL answers a query.
    pub fn database(pool: PgPool) -> Self {
        Self::new("database", move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| "answers".to_owned())
                    .map_err(|e| e.to_string())
            }
        })
    }

    /// The broker answers a metadata request. One client serves every round: a new one per
    /// check would open a connection (and librdkafka's threads) every few seconds, idle or not.
    pub fn broker(kafka: &crate::KafkaConfig) -> Self {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let client: Result<Arc<BaseConsumer>, String> = kafka
            .client_config()
            .create()
            .map(Arc::new)
            .map_err(|e| e.to_string());
        Self::new("broker", move || {
            let client = client.clone();
            async move {
                let consumer = client?;
                tokio::task::spawn_blocking(move || {
                    consumer
                        .fetch_metadata(None, Duration::from_secs(3))
                        .map(|m| format!("{} broker(s)", m.brokers().len()))
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            }
        })
    }

    /// The process is less than `max_seconds` behind: `sql` returns one `float8`, the age in
    /// seconds of the oldest work not yet done (NULL: nothing waits).
    pub fn lag(pool: PgPool, sql: String, max_seconds: f64) -> Self {
        Self::new("lag", move || {
            let (pool, sql) = (pool.clone(), sql.clone());
            async move {
                let seconds: Option<f64> = sqlx::query_scalar(&sql)
                    .fetch_one(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                let seconds = seconds.unwrap_or(0.0);
                if seconds <= max_seconds {
                    Ok(format!("{seconds:.1} s behind (limit {max_seconds} s)"))
                } else {
                    Err(format!(
                        "{seconds:.1} s behind, over the limit of {max_seconds} s"
                    ))
                }
            }
        })
    }
}

/// Settings of the operations endpoint of the relay, the projector and the process manager.
#[derive(Debug, Clone, Deserialize)]
pub struct OpsConfig {
    /// `METRICS_LISTEN`: address of `/metrics`, `/health/live` and `/health/ready` (for example
    /// `127.0.0.1:9101`); unset: none is served.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// `READY_MAX_LAG_SECONDS`: readiness fails while the oldest waiting work (an unpublished
    /// outbox row, an unapplied record) is older than this (default 60).
    #[serde(default = "default_max_lag")]
    pub ready_max_lag_seconds: f64,
    /// `READY_CHECK_INTERVAL_MS`: how often readiness is checked in the background; the
    /// endpoint answers from memory (default 5000).
    #[serde(default = "default_check_interval")]
    pub ready_check_interval_ms: u64,
}

const fn default_max_lag() -> f64 {
    60.0
}
const fn default_check_interval() -> u64 {
    5_000
}

impl OpsConfig {
    pub fn from_env() -> Result<Self, envy::Error> {
        envy::from_env()
    }
}

/// One check's last outcome.
#[derive(Debug, Clone, Serialize)]
pub struct CheckState {
    pub ok: bool,
    pub detail: String,
}

/// The last readiness round, as served.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// When the round finished (none yet: not ready).
    pub checked_at: Option<chrono::DateTime<chrono::Utc>>,
    pub checks: BTreeMap<&'static str, CheckState>,
}

#[derive(Debug)]
struct OpsState {
    readiness: RwLock<Readiness>,
    /// When the checker last finished a round: liveness.
    heartbeat: RwLock<Instant>,
    /// A round older than this means the process is stuck.
    stale_after: Duration,
}

/// How long one check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics`, `/health/live` and `/health/ready` on `listen` until `shutdown`, and
/// checks `probes` every `interval` in the background (the endpoint answers from memory, so a
/// probe never waits on the broker). Returns the bound address.
pub async fn serve_ops(
    listen: SocketAddr,
    probes: Vec<Probe>,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let _ = prometheus();
    let state = Arc::new(OpsState {
        readiness: RwLock::new(Readiness {
            ready: false,
            checked_at: None,
            checks: BTreeMap::new(),
        }),
        heartbeat: RwLock::new(Instant::now()),
        stale_after: (interval * 10).max(Duration::from_secs(30)),
    });
    spawn_checker(state.clone(), probes, interval, shutdown.clone());
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async { prometheus().render() }),
        )
        .route("/health/live", axum::routing::get(live))
        .route("/health/ready", axum::routing::get(ready))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this process serves /metrics, /health/live and /health/ready\n",
            )
        })
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the operations endpoint stopped");
        }
    });
    tracing::info!(%addr, "metrics at http://{addr}/metrics, health at /health/live and /health/ready");
    Ok(addr)
}

/// Checks `probes` every `interval` until `shutdown`, keeping the last round (readiness) and
/// when it finished (liveness) in `state`.
fn spawn_checker(
    state: Arc<OpsState>,
    probes: Vec<Probe>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let stop = shutdown;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let results = futures::future::join_all(probes.iter().map(|probe| async {
                let outcome = tokio::time::timeout(CHECK_TIMEOUT, (probe.check)())
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")));
                (probe.name, outcome)
            }))
            .await;
            let mut checks = BTreeMap::new();
            for (name, outcome) in results {
                let (ok, detail) = match outcome {
                    Ok(note) => (true, note),
                    Err(why) => (false, why),
                };
                checks.insert(name, CheckState { ok, detail });
            }
            let readiness = Readiness {
                ready: checks.values().all(|c| c.ok),
                checked_at: Some(chrono::Utc::now()),
                checks,
            };
            if let Ok(mut current) = state.readiness.write() {
                *current = readiness;
            }
            if let Ok(mut beat) = state.heartbeat.write() {
                *beat = Instant::now();
            }
        }
    });
}

/// Serves the operations endpoint on `METRICS_LISTEN` if it is set (see [`OpsConfig`]).
pub async fn serve_ops_from_env(
    probes: Vec<Probe>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let config = OpsConfig::from_env().context("METRICS_LISTEN and READY_* settings")?;
    let Some(listen) = config.metrics_listen else {
        return Ok(None);
    };
    let interval = Duration::from_millis(config.ready_check_interval_ms.max(100));
    serve_ops(listen, probes, interval, shutdown)
        .await
        .map(Some)
}

/// The readiness limit on lag (`READY_MAX_LAG_SECONDS`, default 60).
pub fn ready_max_lag_seconds() -> f64 {
    OpsConfig::from_env().map_or(default_max_lag(), |c| c.ready_max_lag_seconds)
}

/// Alive while the background checker keeps finishing rounds (a stuck runtime stops it).
async fn live(State(state): State<Arc<OpsState>>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let since = state
        .heartbeat
        .read()
        .map(|beat| beat.elapsed())
        .unwrap_or(Duration::MAX);
    let alive = since <= state.stale_after;
    let status = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({
            "alive": alive,
            "seconds_since_last_check": since.as_secs_f64(),
        })),
    )
}

/// Ready when the last round of checks passed (never checked yet: not ready).
async fn ready(State(state): State<Arc<OpsState>>) -> (StatusCode, axum::Json<Readiness>) {
    let readiness = state
        .readiness
        .read()
        .map(|r| r.clone())
        .unwrap_or_else(|_| Readiness {
            ready: false,
            checked_at: None,
            checks: BTreeMap::new(),
        });
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness))
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
    let database: commands::EventStoreConfig = envy::from_env().context("DATABASE_* settings")?;
    let kafka = crate::KafkaConfig::from_env().context("KAFKA_* settings")?;
    let registry = crate::RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .connect(&database.database_url)
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
