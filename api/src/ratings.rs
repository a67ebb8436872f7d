//! The ratings read model served: per menu item, store or courier, best first.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{PathParams, QueryParams};
use crate::AppState;

/// One subject's ratings.
#[derive(Debug, Serialize, ToSchema)]
pub struct RatingView {
    pub id: String,
    pub count: i64,
    pub mean: f64,
    /// Ratings with 1, 2, 3, 4 and 5 stars.
    pub distribution: Vec<i64>,
    /// The mean pulled towards the mean of all subjects of the kind by 10 virtual ratings, so a
    /// single 5-star review does not top the chart.
    pub bayesian_average: f64,
}

/// How many to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RatingsQuery {
    /// At most this many (1 to 500, default 50).
    pub limit: Option<i64>,
}

/// Ratings of menu items, stores or couriers, best Bayesian average first.
#[utoipa::path(
    get, path = "/ratings/{kind}", tag = "ratings",
    params(("kind" = String, Path, description = "`item`, `store` or `courier`"), RatingsQuery),
    responses(
        (status = 200, description = "The ranking", body = [RatingView]),
        (status = 400, description = "Unknown kind or bad limit", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ratings(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(kind): PathParams<String>,
    QueryParams(query): QueryParams<RatingsQuery>,
) -> Result<axum::Json<Vec<RatingView>>, ApiError> {
    principal.authorize_any(Action::ViewRatings)?;
    if !matches!(kind.as_str(), "item" | "store" | "courier") {
        return Err(ApiError::BadRequest(format!(
            "`{kind}` is not rated; use item, store or courier"
        )));
    }
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 500".to_owned(),
        ));
    }
    let ranking = projections::ratings::ranking(&state.pool, &kind, limit)
        .await
        .map_err(ApiError::internal)?;
    Ok(axum::Json(
        ranking
            .into_iter()
            .map(|r| RatingView {
                id: r.id,
                count: r.count,
                mean: r.mean,
                distribution: r.distribution,
                bayesian_average: r.bayesian_average,
            })
            .collect(),
    ))
}
