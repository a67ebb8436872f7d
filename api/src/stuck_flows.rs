//! Stuck flows for operators: the order-flow steps that could not proceed (see
//! `commands::stuck`), listed, retried once the cause is fixed, or resolved by cancelling the
//! order with compensation. The API only records the request; the process manager carries it
//! out within about a second, and the record then reads `retried`, `resolved`, or `open` again
//! with the new reason.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use commands::stuck::{self, Request, RequestError, StuckFlow};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{Body, PathParams, QueryParams};
use crate::paging;
use crate::AppState;

/// One step of the order flow that could not proceed.
#[derive(Debug, Serialize, ToSchema)]
pub struct StuckFlowView {
    pub id: i64,
    /// The order (also its payment's and delivery's id).
    pub order_id: String,
    /// The flow step, e.g. `request-delivery`, `earn-points`, `capture-payment`.
    #[schema(example = "request-delivery")]
    pub step: String,
    /// The event the step reacted to.
    pub event_id: Uuid,
    #[schema(example = "OrderAccepted")]
    pub event_type: String,
    /// The command that was refused, e.g. `RequestDelivery`.
    #[schema(example = "RequestDelivery")]
    pub command_type: String,
    /// The refused command as the flow built it (null when it could not be built).
    #[schema(value_type = Option<Object>)]
    pub command: Option<serde_json::Value>,
    /// Why it could not proceed.
    pub reason: String,
    /// `open`, `retry_requested`, `resolve_requested`, `retried` or `resolved`.
    #[schema(example = "open")]
    pub status: String,
    /// How many times the step was refused.
    pub attempts: i32,
    /// Stuck since.
    pub since: DateTime<Utc>,
    pub last_refused_at: DateTime<Utc>,
    /// Who asked for the last retry or resolution, when, and why.
    pub requested_by: Option<String>,
    pub requested_at: Option<DateTime<Utc>>,
    pub note: Option<String>,
    /// How it ended.
    pub resolution: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
}

impl From<StuckFlow> for StuckFlowView {
    fn from(s: StuckFlow) -> Self {
        Self {
            id: s.id,
            order_id: s.order_id,
            step: s.step,
            event_id: s.event_id,
            event_type: s.event_type,
            command_type: s.command_type,
            command: s.command,
            reason: s.reason,
            status: s.status,
            attempts: s.attempts,
            since: s.since,
            last_refused_at: s.last_refused_at,
            requested_by: s.requested_by,
            requested_at: s.requested_at,
            note: s.note,
            resolution: s.resolution,
            resolved_at: s.resolved_at,
        }
    }
}

/// A page of stuck flows, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct StuckFlowPage {
    pub items: Vec<StuckFlowView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Filters and paging.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StuckFlowQuery {
    /// `open`, `retry_requested`, `resolve_requested`, `retried`, `resolved` or `all`
    /// (default: the unresolved ones, open or with a request pending).
    pub status: Option<String>,
    /// Only this order's.
    pub order_id: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// Why an operator resolves a stuck flow (it becomes the cancellation's reason).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    #[schema(
        example = "the store cannot deliver this far; customer informed",
        min_length = 1,
        max_length = 400
    )]
    pub reason: String,
}

/// The order-flow steps that could not proceed.
#[utoipa::path(
    get, path = "/admin/stuck-flows", tag = "operations",
    params(StuckFlowQuery),
    responses(
        (status = 200, description = "A page of stuck flows", body = StuckFlowPage),
        (status = 400, description = "Bad status, cursor or limit", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<StuckFlowQuery>,
) -> Result<axum::Json<StuckFlowPage>, ApiError> {
    principal.authorize_any(Action::ViewStuckFlows)?;
    if let Some(status) = &query.status {
        if status != "all" && !stuck::STATUSES.contains(&status.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "status `{status}` is not one of all, {}",
                stuck::STATUSES.join(", ")
            )));
        }
    }
    let limit = paging::limit(query.limit)?;
    let after = paging::id_cursor(query.cursor.as_deref())?;
    let rows = stuck::list(
        &state.pool,
        &stuck::Filter {
            status: query.status,
            order_id: query.order_id,
            after,
            limit: limit + 1,
        },
    )
    .await
    .map_err(ApiError::internal)?;
    let (items, next_cursor) = paging::page(rows, limit, |s| s.id.to_string());
    Ok(axum::Json(StuckFlowPage {
        items: items.into_iter().map(StuckFlowView::from).collect(),
        next_cursor,
    }))
}

fn requested(
    result: Result<StuckFlow, RequestError>,
) -> Result<(StatusCode, axum::Json<StuckFlowView>), ApiError> {
    match result {
        Ok(record) => Ok((StatusCode::ACCEPTED, axum::Json(record.into()))),
        Err(e @ RequestError::NotFound(_)) => Err(ApiError::NotFound(format!(
            "{e}; GET /admin/stuck-flows lists them"
        ))),
        Err(e @ RequestError::AlreadyDone { .. }) => Err(ApiError::Conflict(e.to_string())),
        Err(RequestError::Database(e)) => Err(ApiError::internal(e)),
    }
}

/// Asks the process manager to apply the flow's reaction to the causing event again, once the
/// cause is fixed. Answers 202; within about a second the record reads `retried`, or `open`
/// again with the new reason.
#[utoipa::path(
    post, path = "/admin/stuck-flows/{id}/retry", tag = "operations",
    params(("id" = i64, Path, description = "The stuck flow")),
    responses(
        (status = 202, description = "Retry requested", body = StuckFlowView),
        (status = 404, description = "No such stuck flow", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already retried or resolved", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(id): PathParams<i64>,
) -> Result<(StatusCode, axum::Json<StuckFlowView>), ApiError> {
    principal.authorize_any(Action::ManageStuckFlows)?;
    requested(stuck::request(&state.pool, id, Request::Retry, &principal.actor(), None).await)
}

/// Asks the process manager to cancel the order as the system with this reason; the flow then
/// voids the payment, gives back redeemed points, cancels a requested delivery and the customer
/// is told. Every open record of the order is resolved. Answers 202; a refused cancellation
/// (the order was delivered meanwhile) re-opens the record with why.
#[utoipa::path(
    post, path = "/admin/stuck-flows/{id}/resolve", tag = "operations",
    params(("id" = i64, Path, description = "The stuck flow")),
    request_body = ResolveRequest,
    responses(
        (status = 202, description = "Resolution requested", body = StuckFlowView),
        (status = 404, description = "No such stuck flow", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already retried or resolved", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No reason, or one too long", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn resolve(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(id): PathParams<i64>,
    Body(request): Body<ResolveRequest>,
) -> Result<(StatusCode, axum::Json<StuckFlowView>), ApiError> {
    principal.authorize_any(Action::ManageStuckFlows)?;
    let reason = request.reason.trim();
    if reason.is_empty() || reason.chars().count() > 400 {
        return Err(ApiError::Unprocessable(
            "reason: give 1 to 400 characters; it becomes the order's cancellation reason"
                .to_owned(),
        ));
    }
    requested(
        stuck::request(
            &state.pool,
            id,
            Request::Resolve,
            &principal.actor(),
            Some(reason),
        )
        .await,
    )
}
