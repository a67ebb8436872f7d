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
    request_body(content = bodies::RegionSettings, content_type = "application/json"),
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
    request_body(content = bodies::MenuItem, content_type = "application/json"),
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
    request_body(content = bodies::StoreSettings, content_type = "application/json"),
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
    request_body(content = bodies::Promotion, content_type = "application/json"),
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
    request_body(content = bodies::Experiment, content_type = "application/json"),
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

/// The request bodies of the administrators' PUTs as the OpenAPI document describes them: the
/// domain's catalogue types (which know nothing of OpenAPI) mirrored field for field; a test
/// checks that the mirrors and the domain types name the same fields.
pub mod bodies {
    use std::collections::BTreeMap;

    use utoipa::ToSchema;

    /// A region's settings.
    #[derive(Debug, serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct RegionSettings {
        /// ISO 4217 code, e.g. `GBP`.
        #[schema(example = "GBP", min_length = 3, max_length = 3)]
        pub currency: String,
        /// Sales tax in basis points of the discounted subtotal (2000 = 20 %), at most 10000.
        #[schema(maximum = 10_000)]
        pub tax_basis_points: u32,
        /// Delivery fee in minor units of `currency`, not negative.
        #[schema(minimum = 0)]
        pub delivery_fee_minor: i64,
        /// Minutes a store has to accept an order before it is cancelled.
        pub accept_within_minutes: u32,
        /// Days after delivery during which an order can be rated.
        pub rating_window_days: u32,
        /// Rewards points earned per 100 minor units of a completed order's total (default 1).
        #[serde(default)]
        pub points_per_100_minor: Option<u32>,
        /// Days until earned points expire (default 365).
        #[serde(default)]
        pub points_expire_in_days: Option<u32>,
        /// Average courier speed for delivery estimates, km/h, 1 to 120 (default 15).
        #[serde(default)]
        #[schema(minimum = 1, maximum = 120)]
        pub courier_speed_kmh: Option<u32>,
        /// Discount, in minor units, that 100 redeemed points are worth (default 100).
        #[serde(default)]
        pub redeem_minor_per_100_points: Option<u32>,
        /// Minor units a charity receives for 100 donated points (default 50).
        #[serde(default)]
        pub donation_minor_per_100_points: Option<u32>,
    }

    /// One option of a menu item with its surcharge.
    #[derive(Debug, serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct MenuOption {
        pub name: String,
        /// Surcharge in minor units, in every region's currency.
        pub surcharge_minor: i64,
    }

    /// A menu item.
    #[derive(Debug, serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct MenuItem {
        pub name: String,
        pub category: String,
        /// Price in minor units per region code; an item without a price in a region is not
        /// sold there.
        pub prices: BTreeMap<String, i64>,
        /// Options by code, e.g. `extra-cheese`.
        pub options: BTreeMap<String, MenuOption>,
        pub available: bool,
    }

    /// A store: where couriers pick its orders up.
    #[derive(Debug, serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct StoreSettings {
        pub name: String,
        /// Region code, e.g. `uk`.
        pub region: String,
        /// WGS84 degrees.
        #[schema(minimum = -90, maximum = 90)]
        pub latitude: f64,
        #[schema(minimum = -180, maximum = 180)]
        pub longitude: f64,
    }

    /// A promotion code: a share off the subtotal.
    #[derive(Debug, serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Promotion {
        /// Share of the subtotal taken off, in basis points (1000 = 10 %).
        pub percent_off_bp: u32,
        /// Smallest subtotal, in minor units, the code applies to (default 0).
        #[serde(default)]
        pub min_subtotal_minor: Option<i64>,
        /// Region codes where it applies; empty or absent means everywhere.
        #[serde(default)]
        pub regions: Option<Vec<String>>,
        /// Whether the code can be used now.
        pub active: bool,
        /// Whether each customer may use it on one order only (default false): a second
        /// order of the same customer naming it is refused (422 naming `promotion_code`).
        #[serde(default)]
        pub once_per_customer: Option<bool>,
    }

    /// One arm of an experiment.
    #[derive(Debug, serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Variant {
        /// Such as `control` or `welcome10`.
        pub name: String,
        /// Relative share of the experiment's customers (1 to 1000000).
        #[schema(minimum = 1, maximum = 1_000_000)]
        pub weight: u32,
        /// The promotion code (from the catalogue) this variant shows; null shows none.
        #[serde(default)]
        pub promotion_code: Option<String>,
    }

    /// An ad experiment.
    #[derive(Debug, serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Experiment {
        /// The layer: a customer is in at most one experiment of a layer.
        pub layer: String,
        /// Share of the layer's customers in this experiment, in basis points (0 to 10000;
        /// the experiments of a layer share at most 10000).
        #[schema(maximum = 10_000)]
        pub traffic_bp: u32,
        pub variants: Vec<Variant>,
        /// Hours after the first exposure during which an order is a conversion (1 to 2160).
        #[schema(minimum = 1, maximum = 2160)]
        pub attribution_window_hours: u32,
        /// Whether customers are exposed now.
        pub active: bool,
        /// Region codes whose customers take part; empty or absent means every region.
        #[serde(default)]
        pub regions: Option<Vec<String>>,
    }

    #[cfg(test)]
    mod tests {
        use std::collections::BTreeSet;

        use serde_json::{json, Value};
        use utoipa::openapi::schema::Schema;
        use utoipa::openapi::RefOr;
        use utoipa::PartialSchema;

        fn documented<T: PartialSchema>() -> BTreeSet<String> {
            match T::schema() {
                RefOr::T(Schema::Object(object)) => object.properties.keys().cloned().collect(),
                _ => panic!("not an object schema"),
            }
        }

        fn keys(value: &Value) -> BTreeSet<String> {
            value
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        }

        /// The domain type reads `sample` (so the mirror's fields are all accepted) and writes
        /// back exactly the mirror's fields.
        fn same_fields<T, D>(sample: Value)
        where
            T: PartialSchema,
            D: serde::de::DeserializeOwned + serde::Serialize,
        {
            let domain: D = serde_json::from_value(sample).expect("the domain type reads it");
            let written = serde_json::to_value(&domain).expect("serializes");
            assert_eq!(documented::<T>(), keys(&written));
        }

        #[test]
        fn the_documented_admin_bodies_name_the_fields_of_the_domain_types() {
            same_fields::<super::RegionSettings, domain::services::RegionSettings>(json!({
                "currency": "GBP", "tax_basis_points": 2000, "delivery_fee_minor": 250,
                "accept_within_minutes": 10, "rating_window_days": 7, "points_per_100_minor": 1,
                "points_expire_in_days": 365, "courier_speed_kmh": 15,
                "redeem_minor_per_100_points": 100, "donation_minor_per_100_points": 50
            }));
            same_fields::<super::MenuItem, domain::services::MenuItem>(json!({
                "name": "Margherita", "category": "pizza", "prices": {"uk": 900},
                "options": {"extra-cheese": {"name": "Extra cheese", "surcharge_minor": 150}},
                "available": true
            }));
            same_fields::<super::MenuOption, domain::services::MenuOption>(json!({
                "name": "Extra cheese", "surcharge_minor": 150
            }));
            same_fields::<super::StoreSettings, domain::services::StoreSettings>(json!({
                "name": "Soho", "region": "uk", "latitude": 51.5, "longitude": -0.13
            }));
            same_fields::<super::Promotion, domain::services::Promotion>(json!({
                "percent_off_bp": 1000, "min_subtotal_minor": 0, "regions": ["uk"], "active": true
            }));
            same_fields::<super::Variant, domain::ads::Variant>(json!({
                "name": "control", "weight": 1, "promotion_code": null
            }));
            same_fields::<super::Experiment, domain::ads::Experiment>(json!({
                "layer": "welcome", "traffic_bp": 5000, "attribution_window_hours": 24,
                "active": true, "regions": [],
                "variants": [{"name": "control", "weight": 1, "promotion_code": null}]
            }));
        }
    }
}
