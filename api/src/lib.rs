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
pub mod ads;
pub mod analytics;
pub mod audit;
pub mod auth;
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
pub mod routes;
pub mod serve;
pub mod stuck_flows;
pub mod tracking;

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
use domain::services::{Catalogue, OrderServices, SystemClock};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use sqlx::PgPool;
use streams::{KafkaConfig, RegistryConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::error::ApiError;
use crate::idempotency::IdempotencyDoc;
use crate::openapi::Shared as SharedResponses;
use crate::routes::Routes;

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

    /// The store of idempotency keys, with this configuration's expiry and request timeout.
    pub fn idempotency(&self, pool: PgPool) -> idempotency::Idempotency {
        idempotency::Idempotency::new(
            pool,
            Duration::from_secs(self.api_idempotency_ttl_seconds),
            Duration::from_millis(self.api_request_timeout_ms),
        )
    }
}

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

/// The OpenAPI document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Order backbone API",
        description = "Commands and read models of the event-sourced order backbone."
    ),
    paths(
        orders::place_order,
        orders::act_on_order,
        tracking::list,
        tracking::tracking,
        tracking::stream,
        deliveries::act_on_delivery,
        rewards::act_on_rewards,
        rewards::balance,
        ads::record_exposure,
        ads::profile,
        ads::promotion,
        ads::results,
        payments::receive_webhook,
        admin::put_region,
        admin::put_item,
        admin::put_store,
        admin::put_promotion,
        admin::put_experiment,
        admin::catalogue,
        ratings::ratings,
        analytics::summary,
        analytics::cancellations,
        analytics::top_items,
        analytics::rewards,
        notifications::list,
        notifications::stream,
        notifications::webhook_failures,
        read_models::list,
        read_models::show,
        read_models::dead_letters,
        read_models::redrive,
        read_models::redrive_all,
        audit::events,
        privacy::erase_customer,
        stuck_flows::list,
        stuck_flows::retry,
        stuck_flows::resolve,
        health::live,
        health::ready,
        metrics_endpoint,
        openapi
    ),
    components(schemas(error::Problem)),
    modifiers(&IdempotencyDoc, &SharedResponses)
)]
pub struct ApiDoc;

/// The process-wide Prometheus recorder (installed once, shared by every app in the process;
/// histograms as Prometheus histograms, see [`streams::process::prometheus`]).
pub fn prometheus() -> PrometheusHandle {
    streams::process::prometheus()
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "The metrics of this process", body = String, content_type = "text/plain"),
))]
async fn metrics_endpoint() -> String {
    prometheus().render()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see /openapi.json".to_owned())
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/openapi.json", tag = "health", responses(
    (status = 200, description = "The OpenAPI document of this API", body = Object),
))]
async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// Every operation of the API with who may call it (see [`routes`]).
pub fn routes() -> Routes {
    use auth::Action as A;
    use routes::Gate::{Needs, Public};
    Routes::new()
        .post("/orders", Needs(&[A::PlaceOrder]), orders::place_order)
        .get("/orders", Needs(&[A::ListOrders]), tracking::list)
        .post(
            "/orders/{order_id}/actions",
            Needs(&[
                A::CustomerOrderStep,
                A::StoreOrderStep,
                A::CourierOrderStep,
                A::SystemOrderStep,
            ]),
            orders::act_on_order,
        )
        .get(
            "/orders/{order_id}/tracking",
            Needs(&[A::ViewOrder]),
            tracking::tracking,
        )
        .get(
            "/orders/{order_id}/tracking/stream",
            Needs(&[A::ViewOrder]),
            tracking::stream,
        )
        .post(
            "/deliveries/{order_id}/actions",
            Needs(&[
                A::CourierDeliveryStep,
                A::DispatchDeliveryStep,
                A::RateCourier,
            ]),
            deliveries::act_on_delivery,
        )
        .post(
            "/customers/{customer_id}/rewards/actions",
            Needs(&[A::CustomerRewardsAction, A::OperatorRewardsAction]),
            rewards::act_on_rewards,
        )
        .get(
            "/customers/{customer_id}/rewards",
            Needs(&[A::ViewRewards]),
            rewards::balance,
        )
        .post(
            "/customers/{customer_id}/ads/exposures",
            Needs(&[A::RecordAdExposure]),
            ads::record_exposure,
        )
        .get(
            "/customers/{customer_id}/ads/profile",
            Needs(&[A::ViewAdProfile]),
            ads::profile,
        )
        .get(
            "/customers/{customer_id}/ads/promotion",
            Needs(&[A::ViewAdProfile]),
            ads::promotion,
        )
        .get(
            "/ads/experiments/{experiment_id}/results",
            Needs(&[A::ViewAnalytics]),
            ads::results,
        )
        .post(
            "/payments/{order_id}/webhooks",
            Public,
            payments::receive_webhook,
        )
        .get("/catalogue", Needs(&[A::ViewCatalogue]), admin::catalogue)
        .get(
            "/ratings/{kind}",
            Needs(&[A::ViewRatings]),
            ratings::ratings,
        )
        .get(
            "/analytics/summary",
            Needs(&[A::ViewAnalytics]),
            analytics::summary,
        )
        .get(
            "/analytics/cancellations",
            Needs(&[A::ViewAnalytics]),
            analytics::cancellations,
        )
        .get(
            "/analytics/top-items",
            Needs(&[A::ViewAnalytics]),
            analytics::top_items,
        )
        .get(
            "/analytics/rewards",
            Needs(&[A::ViewAnalytics]),
            analytics::rewards,
        )
        .get(
            "/customers/{customer_id}/notifications",
            Needs(&[A::ViewNotifications]),
            notifications::list,
        )
        .get(
            "/customers/{customer_id}/notifications/stream",
            Needs(&[A::ViewNotifications]),
            notifications::stream,
        )
        .get(
            "/admin/notifications/webhook-failures",
            Needs(&[A::ViewOperations]),
            notifications::webhook_failures,
        )
        .get(
            "/projections",
            Needs(&[A::ViewOperations]),
            read_models::list,
        )
        .get(
            "/projections/{name}",
            Needs(&[A::ViewOperations]),
            read_models::show,
        )
        .get(
            "/projections/{name}/dead-letters",
            Needs(&[A::ViewOperations]),
            read_models::dead_letters,
        )
        .post(
            "/projections/{name}/dead-letters/redrive",
            Needs(&[A::RedriveDeadLetters]),
            read_models::redrive_all,
        )
        .post(
            "/projections/{name}/dead-letters/{id}/redrive",
            Needs(&[A::RedriveDeadLetters]),
            read_models::redrive,
        )
        .put(
            "/admin/regions/{code}",
            Needs(&[A::ManageCatalogue]),
            admin::put_region,
        )
        .put(
            "/admin/menu/items/{item_id}",
            Needs(&[A::ManageCatalogue]),
            admin::put_item,
        )
        .put(
            "/admin/stores/{store_id}",
            Needs(&[A::ManageCatalogue]),
            admin::put_store,
        )
        .put(
            "/admin/promotions/{code}",
            Needs(&[A::ManageCatalogue]),
            admin::put_promotion,
        )
        .put(
            "/admin/experiments/{experiment_id}",
            Needs(&[A::ManageCatalogue]),
            admin::put_experiment,
        )
        .post(
            "/admin/customers/{customer_id}/erasure",
            Needs(&[A::EraseCustomer]),
            privacy::erase_customer,
        )
        .get(
            "/admin/stuck-flows",
            Needs(&[A::ViewStuckFlows]),
            stuck_flows::list,
        )
        .post(
            "/admin/stuck-flows/{id}/retry",
            Needs(&[A::ManageStuckFlows]),
            stuck_flows::retry,
        )
        .post(
            "/admin/stuck-flows/{id}/resolve",
            Needs(&[A::ManageStuckFlows]),
            stuck_flows::resolve,
        )
        .get(
            "/audit/{aggregate_type}/{aggregate_id}/events",
            Needs(&[A::ReadAudit]),
            audit::events,
        )
        .get("/openapi.json", Public, openapi)
        .get("/metrics", Public, metrics_endpoint)
        .get("/health/live", Public, health::live)
        .get("/health/ready", Public, health::ready)
        .assets("/console", console::redirect)
        .assets("/console/", console::file)
        .assets("/console/{*path}", console::file)
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
/// ([`auth::gate`]), idempotency.
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
