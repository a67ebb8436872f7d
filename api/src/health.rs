//! Liveness and readiness. Ready means: the database answers, the broker answers a metadata
//! request, and the schema registry answers.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use sqlx::PgPool;
use streams::{KafkaConfig, RegistryConfig};
use utoipa::ToSchema;

use crate::AppState;

/// What readiness depends on.
pub struct Dependencies {
    pool: PgPool,
    kafka: KafkaConfig,
    registry: RegistryConfig,
    http: reqwest::Client,
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
        let config = self.kafka.client_config();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
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
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("registry answered {}", response.status()))
        }
    }
}

/// One dependency's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Readiness report.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub database: Check,
    pub broker: Check,
    pub registry: Check,
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

/// The process can serve: database, broker and registry answer.
#[utoipa::path(get, path = "/health/ready", tag = "health", responses(
    (status = 200, description = "Ready", body = Readiness),
    (status = 503, description = "A dependency is down", body = Readiness),
))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, axum::Json<Readiness>) {
    let deps: &Arc<Dependencies> = &state.health;
    let (database, broker, registry) =
        tokio::join!(deps.database(), deps.broker(), deps.registry());
    let readiness = Readiness {
        ready: database.is_ok() && broker.is_ok() && registry.is_ok(),
        database: check(database),
        broker: check(broker),
        registry: check(registry),
    };
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness))
}
