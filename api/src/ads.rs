//! Ads: exposures to experiments (command), and from the ads read model a customer's profile,
//! the promotion to show them (targeting) and each experiment's results per variant.
//!
//! Targeting (`GET /customers/{id}/ads/promotion`): among the experiments the customer is
//! assigned to (exposed at least once), most recent assignment first, the first one that is
//! active, whose audience includes the customer's region, and whose variant's promotion (if any)
//! is active and offered in that region, decides: its variant's promotion, or no promotion for a
//! variant without one (a control group sees nothing, never a fallback). The region is the
//! `region` parameter, else the region of the customer's last order. Without such an
//! experiment the fallback is no promotion (`source: "none"`): the profile alone never earns a
//! discount, so every discount shown is measured by an experiment.

use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use domain::ads::{AdsCommand, AdsError, ExperimentId};
use domain::services::Catalogue;
use domain::{CustomerId, RegionCode};
use projections::ads::{self as model, ExposureRow};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Action, Owner, Principal};
use crate::error::{command_error, ApiError, Problem, RuleViolation};
use crate::extract::{Body, PathParams, QueryParams};
use crate::idempotency::IdempotencyKey;
use crate::orders::context;
use crate::positions::{wait_for_position, Position};
use crate::tracking::MoneyView;
use crate::AppState;

/// The read model these endpoints serve (its schema).
const READ_MODEL: &str = "ads";

impl RuleViolation for AdsError {
    fn is_not_found(&self) -> bool {
        Self::is_not_found(self)
    }
    fn is_state_conflict(&self) -> bool {
        Self::is_state_conflict(self)
    }
}

fn parse_customer(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("`{raw}` is not a customer id (a UUID)")))
}

fn served_regions(catalogue: &Catalogue) -> String {
    catalogue
        .regions
        .keys()
        .map(RegionCode::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A customer is about to see an experiment.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExposureRequest {
    /// The experiment, e.g. `welcome-offer`.
    #[schema(example = "welcome-offer", max_length = 64)]
    pub experiment_id: String,
    /// Where in the app, e.g. `checkout-banner` (1 to 64 letters, digits, '-', '_').
    #[schema(example = "checkout-banner", max_length = 64)]
    pub placement: String,
    /// The region (market) the app shows, e.g. `uk`.
    #[schema(example = "uk")]
    pub region: String,
}

/// What the customer sees.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExposureAccepted {
    pub customer_id: Uuid,
    pub experiment_id: String,
    pub layer: String,
    /// The customer's variant: the same on every exposure to this experiment.
    pub variant: String,
    /// The promotion code to show; `null` for a variant that shows none.
    pub promotion_code: Option<String>,
    /// When the customer was first exposed (assigned).
    pub first_exposed_at: DateTime<Utc>,
    /// Exposures of this customer to this experiment, this one included.
    pub exposures: u64,
    /// Read-your-writes: pass `position.token` as `position` to the ads queries.
    pub position: Position,
}

/// Record that a customer sees an experiment, and get their variant.
#[utoipa::path(
    post, path = "/customers/{customer_id}/ads/exposures", tag = "ads",
    params(("customer_id" = Uuid, Path, description = "The customer")),
    request_body = ExposureRequest,
    responses(
        (status = 200, description = "Recorded; the customer's variant and the promotion to show", body = ExposureAccepted),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such experiment", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The customer is not in this experiment (outside its traffic share or audience, or in another experiment of its layer), or it is inactive", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values (experiment id, placement, region)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn record_exposure(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    key: Option<IdempotencyKey>,
    PathParams(raw_id): PathParams<String>,
    Body(request): Body<ExposureRequest>,
) -> Result<axum::Json<ExposureAccepted>, ApiError> {
    let customer_id = parse_customer(&raw_id)?;
    principal.authorize(Action::RecordAdExposure, &Owner::customer(customer_id))?;
    let experiment_id = ExperimentId::parse(request.experiment_id)
        .map_err(|e| ApiError::Unprocessable(format!("experiment_id: {e}")))?;
    let region = RegionCode::parse(request.region)
        .map_err(|e| ApiError::Unprocessable(format!("region: {e}")))?;
    let catalogue = state.catalogue.current();
    if !catalogue.regions.contains_key(&region) {
        return Err(ApiError::Unprocessable(format!(
            "region `{region}` is not served; use one of: {}",
            served_regions(&catalogue)
        )));
    }
    let aggregate_id = customer_id.to_string();
    let command = AdsCommand::RecordExposure {
        customer_id: CustomerId::from_uuid(customer_id),
        experiment_id: experiment_id.clone(),
        placement: request.placement,
        region,
    };
    let committed = state
        .ads
        .execute(
            &aggregate_id,
            command,
            &context(&headers, key, principal.actor()),
        )
        .await
        .map_err(command_error)?;
    let assignment = state
        .ads
        .state(&aggregate_id, |audience| {
            audience.assignments.get(&experiment_id).cloned()
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::internal("the exposure just recorded is missing"))?;
    Ok(axum::Json(ExposureAccepted {
        customer_id,
        experiment_id: experiment_id.to_string(),
        layer: assignment.layer,
        variant: assignment.variant,
        promotion_code: assignment.promotion_code,
        first_exposed_at: assignment.first_exposed_at,
        exposures: assignment.exposures,
        position: Position::new(
            domain::ads::AGGREGATE_TYPE,
            &committed.aggregate_id,
            committed.last_sequence,
        ),
    }))
}

/// Read-your-writes only.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ProfileQuery {
    /// Wait (bounded) until the ads view has applied this event: a command's `position.token`
    /// (`<aggregate_type>:<aggregate_id>:<sequence>`, of an order, rewards or ads command).
    pub position: Option<String>,
}

/// Units of one menu category.
#[derive(Debug, Serialize, ToSchema)]
pub struct CategoryUnits {
    pub category: String,
    pub units: i64,
}

/// The customer's subscription, as the rewards ledger reported it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// `none`, `active`, `cancelled` (benefits until `until`) or `lapsed`.
    pub status: String,
    /// `Standard`, `Plus` or `Premium`.
    pub tier: Option<String>,
    pub until: Option<DateTime<Utc>>,
}

/// One experiment the customer is assigned to.
#[derive(Debug, Serialize, ToSchema)]
pub struct AssignmentView {
    pub experiment_id: String,
    pub layer: String,
    pub variant: String,
    /// The promotion shown at the first exposure.
    pub promotion_code: Option<String>,
    pub first_exposed_at: DateTime<Utc>,
    pub last_exposed_at: DateTime<Utc>,
    pub exposures: i64,
}

impl From<ExposureRow> for AssignmentView {
    fn from(row: ExposureRow) -> Self {
        Self {
            experiment_id: row.experiment_id,
            layer: row.layer,
            variant: row.variant,
            promotion_code: row.promotion_code,
            first_exposed_at: row.first_exposed_at,
            last_exposed_at: row.last_exposed_at,
            exposures: row.exposures,
        }
    }
}

/// What targeting knows of a customer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProfileView {
    pub customer_id: Uuid,
    /// Orders placed and not cancelled or rejected.
    pub orders_count: i64,
    pub cancelled_orders: i64,
    pub first_order_at: Option<DateTime<Utc>>,
    pub last_order_at: Option<DateTime<Utc>>,
    /// Whole days since the last order (at the time of the request); `null` without orders.
    pub recency_days: Option<i64>,
    /// `new` (no order), `active` (last order within 30 days), `lapsing` (31 to 90 days) or
    /// `lapsed` (more than 90 days).
    pub recency_segment: String,
    /// Region of the most recent order.
    pub region: Option<String>,
    /// Totals of the counted orders, per currency.
    pub total_spent: Vec<MoneyView>,
    /// Units ordered per menu category, most ordered first.
    pub favourite_categories: Vec<CategoryUnits>,
    pub subscription: SubscriptionView,
    /// Experiments the customer is assigned to, most recent first.
    pub experiments: Vec<AssignmentView>,
}

fn recency_segment(days: Option<i64>) -> &'static str {
    match days {
        None => "new",
        Some(d) if d <= 30 => "active",
        Some(d) if d <= 90 => "lapsing",
        Some(_) => "lapsed",
    }
}

/// A customer's ads profile: order frequency, spend, favourite categories, region,
/// subscription, recency and experiment assignments.
#[utoipa::path(
    get, path = "/customers/{customer_id}/ads/profile", tag = "ads",
    params(("customer_id" = Uuid, Path, description = "The customer"), ProfileQuery),
    responses(
        (status = 200, description = "The profile as projected", body = ProfileView),
        (status = 400, description = "Malformed id or query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The ads view knows no order, subscription or exposure of this customer", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The view has not applied `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn profile(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
    QueryParams(query): QueryParams<ProfileQuery>,
) -> Result<axum::Json<ProfileView>, ApiError> {
    let customer_id = parse_customer(&raw_id)?;
    principal.authorize(Action::ViewAdProfile, &Owner::customer(customer_id))?;
    wait_for_position(&state, &principal, READ_MODEL, query.position.as_deref()).await?;
    let profile = model::profile(&state.pool, customer_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::NotFound(
                "the ads view knows no order, subscription or exposure of this customer".to_owned(),
            )
        })?;
    let row = profile.row.unwrap_or(model::ProfileRow {
        orders_count: 0,
        cancelled_orders: 0,
        first_order_at: None,
        last_order_at: None,
        region: None,
        subscription_status: "none".to_owned(),
        subscription_tier: None,
        subscription_until: None,
    });
    let recency_days = row
        .last_order_at
        .map(|last| Utc::now().signed_duration_since(last).num_days().max(0));
    Ok(axum::Json(ProfileView {
        customer_id,
        orders_count: row.orders_count,
        cancelled_orders: row.cancelled_orders,
        first_order_at: row.first_order_at,
        last_order_at: row.last_order_at,
        recency_days,
        recency_segment: recency_segment(recency_days).to_owned(),
        region: row.region,
        total_spent: profile
            .spend
            .into_iter()
            .map(|a| MoneyView {
                minor: a.minor,
                currency: a.currency,
            })
            .collect(),
        favourite_categories: profile
            .categories
            .into_iter()
            .map(|(category, units)| CategoryUnits { category, units })
            .collect(),
        subscription: SubscriptionView {
            status: row.subscription_status,
            tier: row.subscription_tier,
            until: row.subscription_until,
        },
        experiments: profile.exposures.into_iter().map(Into::into).collect(),
    }))
}

/// The region and read-your-writes position of a targeting request.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TargetingQuery {
    /// The region (market) the app shows, e.g. `uk`; default: the region of the customer's
    /// last order.
    pub region: Option<String>,
    /// Wait (bounded) until the ads view has applied this event (a command's `position.token`).
    pub position: Option<String>,
}

/// The promotion to show a customer.
#[derive(Debug, Serialize, ToSchema)]
pub struct TargetingView {
    pub customer_id: Uuid,
    /// The promotion code to show; `null` to show none.
    pub promotion_code: Option<String>,
    /// Its discount, in basis points of the subtotal.
    pub percent_off_bp: Option<u32>,
    /// `experiment` (decided by the customer's variant of `experiment_id`) or `none` (the
    /// fallback: no experiment applies, so no promotion).
    pub source: String,
    pub experiment_id: Option<String>,
    pub variant: Option<String>,
    /// The region the decision was made for (`null` when neither given nor known).
    pub region: Option<String>,
}

/// The promotion a variant shows now, if the experiment still applies to `region`: `None` when
/// not eligible, `Some(None)` for a variant without a promotion.
fn eligible_promotion<'c>(
    catalogue: &'c Catalogue,
    assignment: &ExposureRow,
    region: Option<&RegionCode>,
) -> Option<Option<(&'c str, u32)>> {
    let experiment = catalogue
        .experiments
        .get(assignment.experiment_id.as_str())?;
    if !experiment.active {
        return None;
    }
    if !experiment.regions.is_empty() && !region.is_some_and(|r| experiment.regions.contains(r)) {
        return None;
    }
    let variant = experiment
        .variants
        .iter()
        .find(|v| v.name == assignment.variant)?;
    let Some(code) = &variant.promotion_code else {
        return Some(None);
    };
    let (code, promotion) = catalogue.promotions.get_key_value(code)?;
    let offered_here =
        promotion.regions.is_empty() || region.is_some_and(|r| promotion.regions.contains(r));
    (promotion.active && offered_here).then_some(Some((code.as_str(), promotion.percent_off_bp)))
}

/// The promotion to show a customer (targeting): their assigned experiment variant's, else
/// none. See the module documentation for the rules.
#[utoipa::path(
    get, path = "/customers/{customer_id}/ads/promotion", tag = "ads",
    params(("customer_id" = Uuid, Path, description = "The customer"), TargetingQuery),
    responses(
        (status = 200, description = "The decision (possibly no promotion)", body = TargetingView),
        (status = 400, description = "Malformed id or query, or a region that is not served", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The view has not applied `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn promotion(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
    QueryParams(query): QueryParams<TargetingQuery>,
) -> Result<axum::Json<TargetingView>, ApiError> {
    let customer_id = parse_customer(&raw_id)?;
    principal.authorize(Action::ViewAdProfile, &Owner::customer(customer_id))?;
    let catalogue = state.catalogue.current();
    let region = query
        .region
        .as_deref()
        .map(|raw| {
            RegionCode::parse(raw)
                .ok()
                .filter(|r| catalogue.regions.contains_key(r))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "region `{raw}` is not served; use one of: {}",
                        served_regions(&catalogue)
                    ))
                })
        })
        .transpose()?;
    wait_for_position(&state, &principal, READ_MODEL, query.position.as_deref()).await?;
    let region = match region {
        Some(region) => Some(region),
        None => model::profile(&state.pool, customer_id)
            .await
            .map_err(ApiError::internal)?
            .and_then(|p| p.row)
            .and_then(|row| row.region)
            .and_then(|r| RegionCode::parse(r).ok()),
    };
    let assignments = model::exposures(&state.pool, customer_id)
        .await
        .map_err(ApiError::internal)?;
    let decision = assignments.iter().find_map(|assignment| {
        eligible_promotion(&catalogue, assignment, region.as_ref()).map(|p| (assignment, p))
    });
    let view = match decision {
        Some((assignment, promotion)) => TargetingView {
            customer_id,
            promotion_code: promotion.map(|(code, _)| code.to_owned()),
            percent_off_bp: promotion.map(|(_, bp)| bp),
            source: "experiment".to_owned(),
            experiment_id: Some(assignment.experiment_id.clone()),
            variant: Some(assignment.variant.clone()),
            region: region.map(|r| r.to_string()),
        },
        None => TargetingView {
            customer_id,
            promotion_code: None,
            percent_off_bp: None,
            source: "none".to_owned(),
            experiment_id: None,
            variant: None,
            region: region.map(|r| r.to_string()),
        },
    };
    Ok(axum::Json(view))
}

/// Read-your-writes only.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ResultsQuery {
    /// Wait (bounded) until the ads view has applied this event (a command's `position.token`).
    pub position: Option<String>,
}

/// A conversion rate's 95 % confidence interval.
#[derive(Debug, Serialize, ToSchema)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// One variant's figures.
#[derive(Debug, Serialize, ToSchema)]
pub struct VariantResultView {
    pub variant: String,
    /// The promotion the variant shows now (per the catalogue).
    pub promotion_code: Option<String>,
    /// Customers assigned (exposed at least once).
    pub exposed_customers: i64,
    pub exposures: i64,
    /// Customers with at least one order within the attribution window after their first
    /// exposure (cancelled and rejected orders do not count).
    pub converted_customers: i64,
    /// Orders attributed (counted ones).
    pub conversions: i64,
    /// converted_customers / exposed_customers; `null` without exposed customers.
    pub conversion_rate: Option<f64>,
    /// 95 % Wilson score interval of the conversion rate; `null` without exposed customers.
    pub conversion_rate_interval: Option<Interval>,
    /// Totals of the attributed orders, per currency.
    pub revenue: Vec<MoneyView>,
}

/// An experiment's results.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExperimentResults {
    pub experiment_id: String,
    /// The configuration, if the experiment is still in the catalogue.
    pub layer: Option<String>,
    pub active: Option<bool>,
    pub traffic_bp: Option<u32>,
    pub attribution_window_hours: Option<u32>,
    /// Confidence level of the intervals (0.95).
    pub confidence: f64,
    /// The configured variants in order (with zeros until exposed), then any variant that is
    /// no longer configured but has exposures.
    pub variants: Vec<VariantResultView>,
}

/// An experiment's results per variant: exposures, conversions, conversion rate with its 95 %
/// Wilson interval, revenue.
#[utoipa::path(
    get, path = "/ads/experiments/{experiment_id}/results", tag = "ads",
    params(("experiment_id" = String, Path, description = "The experiment, e.g. `welcome-offer`"), ResultsQuery),
    responses(
        (status = 200, description = "Results per variant", body = ExperimentResults),
        (status = 400, description = "Malformed id or query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such experiment in the catalogue or the view", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The view has not applied `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn results(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
    QueryParams(query): QueryParams<ResultsQuery>,
) -> Result<axum::Json<ExperimentResults>, ApiError> {
    principal.authorize_any(Action::ViewAnalytics)?;
    let id = ExperimentId::parse(raw_id.as_str())
        .map_err(|e| ApiError::BadRequest(format!("experiment id: {e}")))?;
    wait_for_position(&state, &principal, READ_MODEL, query.position.as_deref()).await?;
    let catalogue = state.catalogue.current();
    let configured = catalogue.experiments.get(&id);
    let mut measured = model::results(&state.pool, id.as_str())
        .await
        .map_err(ApiError::internal)?;
    if configured.is_none() && measured.is_empty() {
        return Err(ApiError::NotFound(format!(
            "experiment `{id}` is neither configured nor measured; see the experiments of GET /catalogue"
        )));
    }
    let view = |result: model::VariantResult, promotion_code: Option<String>| VariantResultView {
        variant: result.variant,
        promotion_code,
        exposed_customers: result.exposed_customers,
        exposures: result.exposures,
        converted_customers: result.converted_customers,
        conversions: result.conversions,
        conversion_rate: result.conversion_rate,
        conversion_rate_interval: result.interval.map(|(low, high)| Interval { low, high }),
        revenue: result
            .revenue
            .into_iter()
            .map(|a| MoneyView {
                minor: a.minor,
                currency: a.currency,
            })
            .collect(),
    };
    let mut variants = Vec::new();
    for variant in configured
        .map(|e| e.variants.as_slice())
        .unwrap_or_default()
    {
        let result = match measured.iter().position(|r| r.variant == variant.name) {
            Some(index) => measured.remove(index),
            None => model::VariantResult {
                variant: variant.name.clone(),
                exposed_customers: 0,
                exposures: 0,
                converted_customers: 0,
                conversions: 0,
                conversion_rate: None,
                interval: None,
                revenue: vec![],
            },
        };
        variants.push(view(result, variant.promotion_code.clone()));
    }
    variants.extend(measured.into_iter().map(|r| view(r, None)));
    Ok(axum::Json(ExperimentResults {
        experiment_id: id.to_string(),
        layer: configured.map(|e| e.layer.clone()),
        active: configured.map(|e| e.active),
        traffic_bp: configured.map(|e| e.traffic_bp),
        attribution_window_hours: configured.map(|e| e.attribution_window_hours),
        confidence: 0.95,
        variants,
    }))
}
