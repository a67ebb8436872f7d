//! Administrators manage the catalogue: regions (currency, tax, fees, rates, deadlines), menu
//! items (prices per region, options, availability), stores, promotion codes and ad
//! experiments. Every change
//! is recorded with who made it and priced into new orders at once on this instance (others
//! within their refresh interval); orders already placed keep the prices they were placed at.

use axum::extract::State;
use domain::ads::{Experiment, ExperimentId};
use domain::services::{Catalogue, MenuItem, Promotion, RegionSettings, StoreSettings};
use domain::{MenuItemId, RegionCode, StoreId};
use utoipa::ToSchema;

use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{Body, PathParams};
use crate::AppState;

fn stored(result: Result<(), commands::CatalogueError>) -> Result<(), ApiError> {
    result.map_err(|e| match e {
        commands::CatalogueError::Invalid { .. } => ApiError::Unprocessable(e.to_string()),
        commands::CatalogueError::Database(e) => ApiError::internal(e),
    })
}

fn check(ok: bool, message: &str) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(message.to_owned()))
    }
}

/// The catalogue as (region, item, store, promotion) entries (schema: see the domain docs).
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct CatalogueView {
    #[schema(value_type = Object)]
    pub catalogue: serde_json::Value,
}

/// The current catalogue: regions, menu, stores, promotions.
#[utoipa::path(get, path = "/catalogue", tag = "catalogue", responses(
    (status = 200, description = "The catalogue", body = CatalogueView),
))]
pub async fn catalogue(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<axum::Json<CatalogueView>, ApiError> {
    principal.authorize_any(Action::ViewCatalogue)?;
    let current: std::sync::Arc<Catalogue> = state.catalogue.current();
    Ok(axum::Json(CatalogueView {
        catalogue: serde_json::to_value(current.as_ref()).map_err(ApiError::internal)?,
    }))
}

/// Create or replace a region's settings.
#[utoipa::path(put, path = "/admin/regions/{code}", tag = "catalogue",
    params(("code" = String, Path, description = "Region code, e.g. `uk`")),
    request_body(content = Object, description = "RegionSettings: currency, tax_basis_points, delivery_fee_minor, accept_within_minutes, rating_window_days, points_per_100_minor, points_expire_in_days, courier_speed_kmh, redeem_minor_per_100_points, donation_minor_per_100_points"),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn put_region(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(code): PathParams<String>,
    Body(settings): Body<RegionSettings>,
) -> Result<axum::http::StatusCode, ApiError> {
    principal.authorize_any(Action::ManageCatalogue)?;
    let code = RegionCode::parse(code).map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    // Values the order flow would be refused with later, in the background.
    settings
        .check()
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    stored(
        state
            .catalogue
            .put_region(&code, &settings, &principal.actor())
            .await,
    )?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Create or replace a menu item: prices per region, options, availability.
#[utoipa::path(put, path = "/admin/menu/items/{item_id}", tag = "catalogue",
    params(("item_id" = String, Path, description = "Menu item code")),
    request_body(content = Object, description = "MenuItem: name, category, prices {region: minor}, options {code: {name, surcharge_minor}}, available"),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn put_item(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(item_id): PathParams<String>,
    Body(item): Body<MenuItem>,
) -> Result<axum::http::StatusCode, ApiError> {
    principal.authorize_any(Action::ManageCatalogue)?;
    let id = MenuItemId::parse(item_id).map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    check(
        !item.name.trim().is_empty() && item.name.len() <= 200,
        "name must be 1 to 200 characters",
    )?;
    check(
        item.prices.values().all(|p| *p >= 0),
        "prices cannot be negative",
    )?;
    check(
        item.options.values().all(|o| o.surcharge_minor >= 0),
        "option surcharges cannot be negative",
    )?;
    stored(
        state
            .catalogue
            .put_item(&id, &item, &principal.actor())
            .await,
    )?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Create or replace a store.
#[utoipa::path(put, path = "/admin/stores/{store_id}", tag = "catalogue",
    params(("store_id" = uuid::Uuid, Path, description = "The store")),
    request_body(content = Object, description = "StoreSettings: name, region, latitude, longitude"),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn put_store(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(store_id): PathParams<String>,
    Body(store): Body<StoreSettings>,
) -> Result<axum::http::StatusCode, ApiError> {
    principal.authorize_any(Action::ManageCatalogue)?;
    let id: StoreId = store_id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("`{store_id}` is not a store id (a UUID)")))?;
    store
        .check(&state.catalogue.current())
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    stored(
        state
            .catalogue
            .put_store(id, &store, &principal.actor())
            .await,
    )?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Create or replace a promotion code.
#[utoipa::path(put, path = "/admin/promotions/{code}", tag = "catalogue",
    params(("code" = String, Path, description = "The code customers enter, e.g. `WELCOME10`")),
    request_body(content = Object, description = "Promotion: percent_off_bp, min_subtotal_minor, regions, active"),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn put_promotion(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(code): PathParams<String>,
    Body(promotion): Body<Promotion>,
) -> Result<axum::http::StatusCode, ApiError> {
    principal.authorize_any(Action::ManageCatalogue)?;
    check(
        !code.is_empty() && code.len() <= 32 && code.bytes().all(|b| b.is_ascii_alphanumeric()),
        "a promotion code is 1 to 32 ASCII letters and digits",
    )?;
    check(
        promotion.percent_off_bp <= 10_000,
        "percent_off_bp is at most 10000 (100 %)",
    )?;
    stored(
        state
            .catalogue
            .put_promotion(&code, &promotion, &principal.actor())
            .await,
    )?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Create or replace an ad experiment. Customers keep the variant they were first exposed to;
/// the experiments of a layer own consecutive bucket ranges in id order, so changing one share
/// moves the ranges of the experiments after it for customers not yet exposed.
#[utoipa::path(put, path = "/admin/experiments/{experiment_id}", tag = "catalogue",
    params(("experiment_id" = String, Path, description = "Experiment id, e.g. `welcome-offer` (1 to 64 letters, digits, '-', '_')")),
    request_body(content = Object, description = "Experiment: layer, traffic_bp (0 to 10000; the experiments of a layer share at most 10000), variants [{name, weight (1 to 1000000), promotion_code (a catalogue promotion) or null}], attribution_window_hours (1 to 2160), active, regions (catalogue regions; empty = all)"),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values, unknown promotion or region, or the layer would exceed 100 % of traffic", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn put_experiment(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(experiment_id): PathParams<String>,
    Body(experiment): Body<Experiment>,
) -> Result<axum::http::StatusCode, ApiError> {
    principal.authorize_any(Action::ManageCatalogue)?;
    let id =
        ExperimentId::parse(experiment_id).map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    stored(
        state
            .catalogue
            .put_experiment(&id, &experiment, &principal.actor())
            .await,
    )?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
