//! `GET /analytics/top-items`: the best-selling items of completed orders.

use super::*;

/// Top-items parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TopItemsQuery {
    /// `quantity` (default) or `revenue`.
    pub by: Option<String>,
    /// Orders placed at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Orders placed before this time (RFC 3339), after `from`.
    pub to: Option<String>,
    /// Only this region, e.g. `uk`.
    pub region: Option<String>,
    /// Only this store.
    #[param(value_type = Option<Uuid>)]
    pub store_id: Option<String>,
    /// Only orders in this currency, e.g. `GBP` (else an item sold in two currencies has a
    /// row per currency).
    pub currency: Option<String>,
    /// How many items, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// Read-your-writes: a command's `position.token`; waits (bounded) until the view has it.
    pub position: Option<String>,
}

/// One item's sales in one currency.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopItemView {
    pub item_id: String,
    /// The name on its most recent order.
    pub name: String,
    pub category: String,
    /// Units sold in completed orders.
    pub quantity: i64,
    /// Its line totals in completed orders (before order discounts, tax and delivery fee).
    pub revenue_minor: i64,
    pub currency: String,
}

/// The best-selling items.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopItemsView {
    /// `quantity` or `revenue`.
    pub by: String,
    /// Best first; ties by the other figure, then item id.
    pub items: Vec<TopItemView>,
}

/// The best-selling items of the completed orders placed in the range, by units or revenue.
#[utoipa::path(
    get, path = "/analytics/top-items", tag = "analytics",
    params(TopItemsQuery),
    responses(
        (status = 200, description = "Best first", body = TopItemsView),
        (status = 400, description = "A parameter is not valid (the detail names it and what is allowed)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The view has not reached `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn top_items(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<TopItemsQuery>,
) -> Result<axum::Json<TopItemsView>, ApiError> {
    principal.authorize_any(Action::ViewAnalytics)?;
    let by = match query.by.as_deref().unwrap_or("quantity") {
        "quantity" => TopBy::Quantity,
        "revenue" => TopBy::Revenue,
        other => {
            return Err(bad(format!(
                "by `{other}` is not known; use quantity or revenue"
            )))
        }
    };
    let filter = parse_filter(
        query.from.as_deref(),
        query.to.as_deref(),
        query.region.as_deref(),
        query.store_id.as_deref(),
        query.currency.as_deref(),
    )?;
    let limit = parse_limit(query.limit.as_deref())?;
    wait_for_position(&state, &principal, READ_MODEL, query.position.as_deref()).await?;
    let items = timed(
        "top_items",
        analytics::top_items(&state.pool, &filter, by, limit),
    )
    .await?;
    Ok(axum::Json(TopItemsView {
        by: match by {
            TopBy::Quantity => "quantity",
            TopBy::Revenue => "revenue",
        }
        .to_owned(),
        items: items
            .into_iter()
            .map(|i| TopItemView {
                item_id: i.item_id,
                name: i.name,
                category: i.category,
                quantity: i.quantity,
                revenue_minor: i.revenue_minor,
                currency: i.currency,
            })
            .collect(),
    }))
}
