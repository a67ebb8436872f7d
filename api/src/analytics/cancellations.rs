//! `GET /analytics/cancellations`: cancellations by party and reason, and the stores' rejections.

use super::*;

/// Filters shared by cancellations and top items.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CancellationsQuery {
    /// Orders placed at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Orders placed before this time (RFC 3339), after `from`.
    pub to: Option<String>,
    /// Only this region, e.g. `uk`.
    pub region: Option<String>,
    /// Only this store.
    #[param(value_type = Option<Uuid>)]
    pub store_id: Option<String>,
    /// Only orders in this currency, e.g. `GBP`.
    pub currency: Option<String>,
    /// How many of the most frequent reasons to list, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// Read-your-writes: a command's `position.token`; waits (bounded) until the view has it.
    pub position: Option<String>,
}

/// Cancellations by one party.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartyCount {
    /// `Customer`, `Store` or `System`.
    pub cancelled_by: String,
    pub count: i64,
}

/// Cancellations by one party with one reason.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReasonCount {
    pub cancelled_by: String,
    /// The reason as given, e.g. `not accepted by the store in time`.
    pub reason: String,
    pub count: i64,
}

/// Rejections with one reason.
#[derive(Debug, Serialize, ToSchema)]
pub struct RejectionCount {
    /// `Busy`, `ClosingEarly`, `ItemUnavailable` or `Other`.
    pub reason: String,
    pub count: i64,
}

/// Why orders did not go through.
#[derive(Debug, Serialize, ToSchema)]
pub struct CancellationsView {
    /// Orders cancelled plus orders rejected (as `cancelled` in the summary).
    pub cancelled: i64,
    /// Of those, the store rejections.
    pub rejected: i64,
    /// Cancellations (without rejections) per party.
    pub by_party: Vec<PartyCount>,
    /// The most frequent cancellation reasons, most frequent first (at most `limit`).
    pub reasons: Vec<ReasonCount>,
    /// Store rejections per reason.
    pub rejections: Vec<RejectionCount>,
}

/// Cancellations per party and reason, and store rejections per reason, of the orders placed
/// in the range.
#[utoipa::path(
    get, path = "/analytics/cancellations", tag = "analytics",
    params(CancellationsQuery),
    responses(
        (status = 200, description = "Counts", body = CancellationsView),
        (status = 400, description = "A parameter is not valid (the detail names it and what is allowed)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The view has not reached `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancellations(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<CancellationsQuery>,
) -> Result<axum::Json<CancellationsView>, ApiError> {
    principal.authorize_any(Action::ViewAnalytics)?;
    let filter = parse_filter(
        query.from.as_deref(),
        query.to.as_deref(),
        query.region.as_deref(),
        query.store_id.as_deref(),
        query.currency.as_deref(),
    )?;
    let limit = parse_limit(query.limit.as_deref())?;
    wait_for_position(&state, &principal, READ_MODEL, query.position.as_deref()).await?;
    let found = timed(
        "cancellations",
        analytics::cancellations(&state.pool, &filter, limit),
    )
    .await?;
    let by_cancellation: i64 = found.by_party.iter().map(|(_, n)| n).sum();
    let rejected: i64 = found.rejections.iter().map(|(_, n)| n).sum();
    Ok(axum::Json(CancellationsView {
        cancelled: by_cancellation + rejected,
        rejected,
        by_party: found
            .by_party
            .into_iter()
            .map(|(cancelled_by, count)| PartyCount {
                cancelled_by,
                count,
            })
            .collect(),
        reasons: found
            .reasons
            .into_iter()
            .map(|(cancelled_by, reason, count)| ReasonCount {
                cancelled_by,
                reason,
                count,
            })
            .collect(),
        rejections: found
            .rejections
            .into_iter()
            .map(|(reason, count)| RejectionCount { reason, count })
            .collect(),
    }))
}
