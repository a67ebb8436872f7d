//! # api: the HTTP face of the backbone
//!
//! Commands in (`POST /orders`, `POST /orders/{id}/actions`, delivery steps
//! `POST /deliveries/{order_id}/actions`, rewards `POST /customers/{id}/rewards/actions`,
//! payment provider webhooks `POST /payments/{order_id}/webhooks`),
//! read models out (`GET /orders/{id}/tracking`), the auditors' read-only history of any
//! aggregate (`GET /audit/{aggregate_type}/{aggregate_id}/events`, [`audit`]), the erasure of a
//! customer's personal data (`POST /admin/customers/{id}/erasure`, [`privacy`]), an OpenAPI
//! document (`/openapi.json`),
//! Prometheus metrics (`/metrics`), health (`/health/live`, `/health/ready`) and the operations
//! console's page (`/console/`, [`console`]). Every client
//! mistake is answered with an `application/problem+json` document ([`error`]). Every mutating
//! request may carry an `Idempotency-Key` to be retried safely ([`idempotency`]).
//!
//! Place in the flow: requests become domain commands here (parsed at the boundary with
//! `TryFrom`), run through `commands`, and the views are read from the tables that
//! `projections` keeps.

pub mod admin;
pub mod admission;
pub mod ads;
pub mod analytics;
pub mod audit;
pub mod auth;
pub mod config;
pub mod console;
pub mod correlation;
pub mod deliveries;
pub mod error;
pub mod extract;
pub mod health;
pub mod http_metrics;
pub mod idempotency;
pub mod limits;
pub mod live;
pub mod notifications;
pub mod openapi;
pub mod orders;
pub mod paging;
pub mod payments;
pub mod positions;
pub mod privacy;
pub mod ratings;
pub mod read_models;
pub mod request_span;
pub mod rewards;
pub mod route_table;
pub mod routes;
pub mod serve;
pub mod stuck_flows;
pub mod tracking;

pub use config::ApiConfig;
pub use route_table::{routes, ApiDoc};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use commands::{CatalogueStore, CommandBus, EventStoreDb};
use domain::ads::{AdAudience, AdsServices};
use domain::delivery::{Delivery, DeliveryServices};
use domain::order::Order;
use domain::payment::{Payment, PaymentServices};
use domain::rewards::{RewardsLedger, RewardsServices};
use domain::services::{OrderServices, SystemClock};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use streams::{KafkaConfig, RegistryConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub orders: Arc<CommandBus<Order>>,
    pub deliveries: Arc<CommandBus<Delivery>>,
    pub payments: Arc<CommandBus<Payment>>,
    pub rewards: Arc<CommandBus<RewardsLedger>>,
    pub ads: Arc<CommandBus<AdAudience>>,
    pub catalogue: Arc<CatalogueStore>,
    pub pool: PgPool,
    pub health: Arc<health::Dependencies>,
    pub read_your_writes_wait: Duration,
    /// Uses of once-per-customer promotions.
    pub promotion_claims: commands::promotions::PromotionClaims,
    /// Read-your-writes waits in flight per client (capped).
    pub waits: Arc<live::StreamSlots>,
    pub live: Arc<live::LiveHub>,
    /// Open event streams per client (capped).
    pub streams: Arc<live::StreamSlots>,
    /// Verifies payment providers' webhook signatures (`None`: webhooks are refused).
    pub webhooks: Option<Arc<payments::WebhookVerifier>>,
    /// Customers' data keys: seals personal data, reveals it for people, erases it.
    pub pii: Arc<commands::pii::PiiVault>,
    /// The operations console's files.
    pub console: Arc<console::Console>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The process-wide Prometheus recorder (installed once, shared by every app in the process;
/// histograms as Prometheus histograms, see [`streams::process::prometheus`]).
pub fn prometheus() -> PrometheusHandle {
    streams::process::prometheus()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see /openapi.json".to_owned())
}

/// The API's background upkeep until `stop`: the catalogue refreshed (other instances' admin
/// changes arrive within the interval), expired idempotency keys purged every minute (they are
/// never replayed meanwhile).
fn start_upkeep(
    config: &ApiConfig,
    pool: &PgPool,
    catalogue: &Arc<CatalogueStore>,
    stop: &CancellationToken,
) {
    {
        let stop = stop.clone();
        let catalogue = catalogue.clone();
        tokio::spawn(async move {
            catalogue.refresh_every(Duration::from_secs(5), stop).await;
        });
    }
    let purge = config
        .idempotency(pool.clone())
        .purge_every(Duration::from_secs(60));
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = purge => {}
            () = stop.cancelled() => {}
        }
    });
}

impl AppState {
    /// The handlers' state: a command bus per aggregate over `db`, the shared services and the
    /// per-client limits of `config`.
    fn new(
        config: &ApiConfig,
        db: EventStoreDb,
        catalogue: Arc<CatalogueStore>,
        health: Arc<health::Dependencies>,
        live: Arc<live::LiveHub>,
    ) -> Self {
        let clock = Arc::new(SystemClock);
        let pool = db.pool().clone();
        let services = OrderServices::new(catalogue.clone(), clock.clone());
        AppState {
            orders: Arc::new(CommandBus::new(db.clone(), services)),
            deliveries: Arc::new(CommandBus::new(
                db.clone(),
                DeliveryServices::new(clock.clone()),
            )),
            payments: Arc::new(CommandBus::new(
                db.clone(),
                PaymentServices::new(clock.clone()),
            )),
            ads: Arc::new(CommandBus::new(
                db.clone(),
                AdsServices::new(catalogue.clone(), clock.clone()),
            )),
            rewards: Arc::new(CommandBus::new(db, RewardsServices::new(clock))),
            catalogue,
            health,
            pii: Arc::new(commands::pii::PiiVault::new(pool.clone())),
            console: Arc::new(console::Console::new(&config.api_console_dir)),
            // A claim whose order has not appeared stays reserved for longer than any placement
            // may run (the request timeout), then frees.
            promotion_claims: commands::promotions::PromotionClaims::new(
                pool.clone(),
                Duration::from_millis(config.api_request_timeout_ms.saturating_mul(2))
                    .max(Duration::from_secs(60)),
            ),
            pool,
            read_your_writes_wait: Duration::from_millis(config.api_read_your_writes_wait_ms),
            live,
            streams: live::StreamSlots::new(config.api_max_streams_per_client),
            waits: positions::wait_slots(config.api_max_waits_per_client),
            webhooks: config.payments_webhook_secret.clone().map(|secret| {
                Arc::new(payments::WebhookVerifier::new(
                    secret,
                    config.payments_webhook_tolerance_seconds,
                ))
            }),
        }
    }
}

/// The router with every route and layer. Layers from the outside in: request timeout, body
/// limit, authentication (the principal), rate limit (per principal or peer), the role gate
/// ([`auth::gate`]), the webhooks' signatures, admission (the API's capacity, [`admission`]),
/// idempotency.
pub fn router(
    state: AppState,
    config: &ApiConfig,
    authenticator: Arc<auth::Authenticator>,
    limiter: Option<Arc<limits::ClientLimiter>>,
) -> Router {
    let (routes, policy) = routes().into_parts();
    let routes = routes
        .fallback(not_found)
        // Inside authentication (its `CallerScope`), the body limit and the timeout.
        .layer(axum::middleware::from_fn_with_state(
            config.idempotency(state.pool.clone()),
            idempotency::middleware,
        ));
    // Admission, once the caller is known to be allowed (a refusal takes no slot).
    let routes = routes.layer(axum::middleware::from_fn_with_state(
        config.admission(&state.pool),
        admission::admit,
    ));
    // Payment webhooks authenticate by signature, bound to their order, before idempotency and
    // the size check: an unauthenticated one stores nothing under its key.
    let routes = routes.layer(axum::middleware::from_fn_with_state(
        state.webhooks.clone(),
        payments::authenticate_webhooks,
    ));
    // Every route's role check, before it reads anything (inside authentication, outside the
    // idempotency layer: a refused request claims no key).
    let routes = routes.layer(axum::middleware::from_fn_with_state(policy, auth::gate));
    let routes = match &limiter {
        Some(limiter) => routes.layer(axum::middleware::from_fn_with_state(
            limiter.clone(),
            limits::rate_limit,
        )),
        None => routes,
    };
    routes
        .layer(axum::middleware::from_fn_with_state(
            (authenticator, limiter),
            auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(config.api_body_limit_bytes))
        .layer(axum::Extension(extract::BodyLimit(
            config.api_body_limit_bytes,
        )))
        .layer(axum::middleware::from_fn_with_state(
            Duration::from_millis(config.api_request_timeout_ms),
            time_limit,
        ))
        // Every answer, a timeout or a refusal too, echoes the caller's id.
        .layer(axum::middleware::from_fn(correlation::layer))
        // Every answer is counted, with its route and status (`http_requests_total`).
        .layer(axum::middleware::from_fn(http_metrics::layer))
        // Outermost: the request's span, under the caller's trace.
        .layer(axum::middleware::from_fn(request_span::layer))
        .with_state(state)
}

/// Answers `408` with a problem document when a request runs past `limit` (until its response
/// starts: an event stream, once open, is not cut).
async fn time_limit(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::timed_out(limit).into_response(),
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("event store: {0}")]
    Store(#[from] commands::StoreError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("read models: {0}")]
    ReadModel(#[from] sqlx::Error),
    #[error("authentication: {0}")]
    Auth(#[from] auth::AuthConfigError),
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
}

/// A bound, ready-to-run API server.
#[derive(Debug)]
pub struct ApiServer {
    listener: TcpListener,
    router: Router,
    limits: serve::ConnectionLimits,
    live: Arc<live::LiveHub>,
    housekeeping: CancellationToken,
}

impl ApiServer {
    /// Connects to the event store (applying its migrations) and binds the listener.
    pub async fn build(
        config: ApiConfig,
        store: commands::EventStoreConfig,
        kafka: KafkaConfig,
        registry: RegistryConfig,
    ) -> Result<Self, StartError> {
        let authenticator = Arc::new(auth::Authenticator::from_config(&config.auth)?);
        // Background upkeep (catalogue refresh, key purge, rate-limit table) ends with the server.
        let housekeeping = CancellationToken::new();
        // Stops the upkeep again if the build fails half-way.
        let failed_start = housekeeping.clone().drop_guard();
        let db = EventStoreDb::connect(&store).await?;
        let catalogue = config.catalogue().map_err(StartError::Config)?;
        let pool = db.pool().clone();
        let catalogue = Arc::new(
            CatalogueStore::load(pool.clone(), &catalogue)
                .await
                .map_err(|e| StartError::Config(e.to_string()))?,
        );
        start_upkeep(&config, &pool, &catalogue, &housekeeping);
        for read_model in projections::read_models::all() {
            streams::consumer::ensure_schema(read_model.as_ref(), &pool).await?;
        }
        let live = Arc::new(live::LiveHub::start(&pool).await?);
        let health = Arc::new(health::Dependencies::new(pool.clone(), kafka, registry));
        let state = AppState::new(&config, db, catalogue, health, live);
        // Readiness is checked in the background; `/health/ready` serves the last result.
        tokio::spawn(state.health.clone().run(
            Duration::from_millis(config.api_readiness_interval_ms),
            housekeeping.clone(),
        ));
        let _ = prometheus();
        let limiter = limits::ClientLimiter::new(
            config.api_rate_limit_per_second,
            config.api_rate_limit_burst,
        );
        if let Some(limiter) = &limiter {
            limiter.spawn_housekeeping(housekeeping.clone());
        }
        let listener = TcpListener::bind(config.api_listen).await?;
        failed_start.disarm();
        let limits = serve::ConnectionLimits {
            header_read_timeout: Duration::from_millis(config.api_header_read_timeout_ms),
            idle_timeout: Duration::from_millis(config.api_idle_timeout_ms),
            max_connections: config.api_max_connections,
            max_header_bytes: config.api_max_header_bytes,
        };
        Ok(Self {
            limits,
            live: state.live.clone(),
            router: router(state, &config, authenticator, limiter),
            listener,
            housekeeping,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let live = self.live;
        let _housekeeping = self.housekeeping.drop_guard();
        serve::serve(
            self.listener,
            self.router,
            self.limits,
            shutdown,
            move || {
                // Open event streams end, so the drain does not wait for them forever.
                live.close();
            },
        )
        .await
    }
}
