//! Liveness and readiness. Ready means: the database answers, the broker answers a metadata
//! request, and the schema registry answers.
//!
//! The checks run in the background every `API_READINESS_INTERVAL_MS` ([`Dependencies::run`])
//! and `/health/ready` serves the last result from memory: a probe, or a flood of anonymous
//! calls, costs no database query, broker client or registry call. Anyone sees whether the API
//! is ready and when that was checked; which dependency failed and why (raw error text) only an
//! operator's token (admin, analyst, auditor) sees.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use sqlx::PgPool;
use streams::{KafkaConfig, RegistryConfig};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::auth::{Principal, Role};
use crate::AppState;

/// What readiness depends on, and the last result of checking them.
pub struct Dependencies {
    pool: PgPool,
    kafka: KafkaConfig,
    registry: RegistryConfig,
    http: reqwest::Client,
    /// One broker client for every check (building one per check costs threads and sockets).
    consumer: Mutex<Option<Arc<BaseConsumer>>>,
    latest: RwLock<Option<Arc<Readiness>>>,
}

impl std::fmt::Debug for Dependencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dependencies").finish_non_exhaustive()
    }
}

impl Dependencies {
    pub fn new(pool: PgPool, kafka: KafkaConfig, registry: RegistryConfig) -> Self {
        Self {
            pool,
            kafka,
            registry,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            consumer: Mutex::new(None),
            latest: RwLock::new(None),
        }
    }

    /// Checks every `interval` until `stop`; the first check right away.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let readiness = Arc::new(self.check_now().await);
            if !readiness.ready {
                tracing::warn!(?readiness, "not ready");
            }
            if let Ok(mut latest) = self.latest.write() {
                *latest = Some(readiness);
            }
        }
    }

    /// The last result, if a check finished yet.
    pub fn latest(&self) -> Option<Arc<Readiness>> {
        self.latest.read().ok().and_then(|latest| latest.clone())
    }

    async fn check_now(&self) -> Readiness {
        let (database, broker, registry) =
            tokio::join!(self.database(), self.broker(), self.registry());
        Readiness {
            ready: database.is_ok() && broker.is_ok() && registry.is_ok(),
            checked_at: Some(Utc::now()),
            database: Some(check(database)),
            broker: Some(check(broker)),
            registry: Some(check(registry)),
        }
    }

    async fn database(&self) -> Result<(), String> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn broker(&self) -> Result<(), String> {
        let consumer = {
            let mut cached = self
                .consumer
                .lock()
                .map_err(|_| "broker client poisoned".to_owned())?;
            match &*cached {
                Some(consumer) => consumer.clone(),
                None => {
                    let consumer: Arc<BaseConsumer> = Arc::new(
                        self.kafka
                            .client_config()
                            .create()
                            .map_err(|e| e.to_string())?,
                    );
                    *cached = Some(consumer.clone());
                    consumer
                }
            }
        };
        tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn registry(&self) -> Result<(), String> {
        let url = format!(
            "{}/subjects",
            self.registry.schema_registry_url.trim_end_matches('/')
        );
        let mut request = self.http.get(url);
        if let Some((user, password)) = self
            .registry
            .schema_registry_basic_auth
            .as_deref()
            .and_then(|auth| auth.split_once(':'))
        {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("registry answered {}", response.status()))
        }
    }
}

/// One dependency's state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Check {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Readiness report: `ready` and `checked_at` for anyone; the dependencies for operators.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// When the dependencies were last checked (absent before the first check finished).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<Check>,
}

fn check(result: Result<(), String>) -> Check {
    match result {
        Ok(()) => Check {
            ok: true,
            error: None,
        },
        Err(e) => Check {
            ok: false,
            error: Some(e),
        },
    }
}

/// The process is running.
#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, description = "Alive")))]
pub async fn live() -> &'static str {
    "ok"
}

/// The process can serve: database, broker and registry answered the last background check.
/// Which one failed, and why, only with an operator's token (admin, analyst, auditor).
#[utoipa::path(get, path = "/health/ready", tag = "health", responses(
    (status = 200, description = "Ready", body = Readiness),
    (status = 503, description = "A dependency is down, or not checked yet", body = Readiness),
))]
pub async fn ready(
    State(state): State<AppState>,
    principal: Option<Principal>,
) -> (StatusCode, axum::Json<Readiness>) {
    let readiness = state.health.latest().map_or(
        Readiness {
            ready: false,
            checked_at: None,
            database: None,
            broker: None,
            registry: None,
        },
        |latest| (*latest).clone(),
    );
    let operator =
        principal.is_some_and(|p| matches!(p.role, Role::Admin | Role::Analyst | Role::Auditor));
    let readiness = if operator {
        readiness
    } else {
        Readiness {
            database: None,
            broker: None,
            registry: None,
            ..readiness
        }
    };
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness))
}
