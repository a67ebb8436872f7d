//! `GET /analytics/rewards`: points earned, redeemed and restored, and donations.

use super::*;

/// Rewards parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RewardsQuery {
    /// Movements at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Movements before this time (RFC 3339), after `from`.
    pub to: Option<String>,
    /// Only points earned, redeemed or restored on orders of this region (matched through the
    /// order), and donations by customers of this region (the region of the donor's latest
    /// order placed before the donation).
    pub region: Option<String>,
    /// Only points earned, redeemed or restored on orders of this store, and donations by
    /// customers of this store (the store of the donor's latest order placed before the
    /// donation).
    #[param(value_type = Option<Uuid>)]
    pub store_id: Option<String>,
    /// Only donations in this currency, and points moved on orders in this currency.
    pub currency: Option<String>,
    /// Charities per page, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page (of donations).
    pub cursor: Option<String>,
    /// Read-your-writes: a command's `position.token`; waits (bounded) until the view has it.
    pub position: Option<String>,
}

/// How many movements, and their points.
#[derive(Debug, Serialize, ToSchema)]
pub struct MovementView {
    pub count: i64,
    pub points: i64,
}

impl From<analytics::Movement> for MovementView {
    fn from(m: analytics::Movement) -> Self {
        Self {
            count: m.count,
            points: m.points,
        }
    }
}

/// Points moved on orders.
#[derive(Debug, Serialize, ToSchema)]
pub struct PointsView {
    /// Points earned on completed orders.
    pub earned: MovementView,
    /// Points redeemed as discounts.
    pub redeemed: MovementView,
    /// Redemptions given back because their order was cancelled or rejected.
    pub restored: MovementView,
    /// redeemed.count - restored.count.
    pub net_redemptions: i64,
    /// redeemed.points - restored.points.
    pub net_redeemed_points: i64,
}

/// Donations to one charity in one currency.
#[derive(Debug, Serialize, ToSchema)]
pub struct DonationView {
    pub charity: String,
    pub currency: String,
    pub count: i64,
    pub points: i64,
    /// What the charity receives, in minor units of `currency`.
    pub amount_minor: i64,
}

/// Donations in one currency, every charity.
#[derive(Debug, Serialize, ToSchema)]
pub struct DonationTotalView {
    pub currency: String,
    pub count: i64,
    pub points: i64,
    pub amount_minor: i64,
}

/// Rewards points over the range.
#[derive(Debug, Serialize, ToSchema)]
pub struct RewardsView {
    pub points: PointsView,
    /// Per charity and currency, ordered by charity then currency (a page of at most `limit`).
    pub donations: Vec<DonationView>,
    /// Per currency, over every charity.
    pub donation_totals: Vec<DonationTotalView>,
    /// Pass as `cursor` for the next page of donations; null on the last one.
    pub next_cursor: Option<String>,
}

/// Points earned, redeemed (net of restorations) and donated per charity, each at the time of
/// its own event.
#[utoipa::path(
    get, path = "/analytics/rewards", tag = "analytics",
    params(RewardsQuery),
    responses(
        (status = 200, description = "Points and donations", body = RewardsView),
        (status = 400, description = "A parameter is not valid (the detail names it and what is allowed)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The view has not reached `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn rewards(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<RewardsQuery>,
) -> Result<axum::Json<RewardsView>, ApiError> {
    principal.authorize_any(Action::ViewAnalytics)?;
    let filter = parse_filter(
        query.from.as_deref(),
        query.to.as_deref(),
        query.region.as_deref(),
        query.store_id.as_deref(),
        query.currency.as_deref(),
    )?;
    let limit = parse_limit(query.limit.as_deref())?;
    let after = decode_cursor("rewards:donations", query.cursor.as_deref())?;
    wait_for_position(&state, &principal, READ_MODEL, query.position.as_deref()).await?;
    let flow = timed("rewards", analytics::points_flow(&state.pool, &filter)).await?;
    let after_ref = after.as_ref().map(|(k, c)| (k.as_str(), c.as_str()));
    let mut donations = timed(
        "rewards",
        analytics::donations(&state.pool, &filter, after_ref, limit + 1),
    )
    .await?;
    let more = donations.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    donations.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = match donations.last() {
        Some(last) if more => Some(encode_cursor(
            "rewards:donations",
            &last.charity,
            &last.currency,
        )),
        _ => None,
    };
    let totals = timed("rewards", analytics::donation_totals(&state.pool, &filter)).await?;
    Ok(axum::Json(RewardsView {
        points: PointsView {
            net_redemptions: flow.redeemed.count - flow.restored.count,
            net_redeemed_points: flow.redeemed.points - flow.restored.points,
            earned: flow.earned.into(),
            redeemed: flow.redeemed.into(),
            restored: flow.restored.into(),
        },
        donations: donations
            .into_iter()
            .map(|d| DonationView {
                charity: d.charity,
                currency: d.currency,
                count: d.count,
                points: d.points,
                amount_minor: d.amount_minor,
            })
            .collect(),
        donation_totals: totals
            .into_iter()
            .map(
                |(currency, count, points, amount_minor)| DonationTotalView {
                    currency,
                    count,
                    points,
                    amount_minor,
                },
            )
            .collect(),
        next_cursor,
    }))
}
