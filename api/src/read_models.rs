//! Operating the read models over HTTP: how far behind each projector is, and its dead letters
//! (list, re-drive). A re-drive request is recorded here and carried out by the projector that
//! owns the read model, once; the dead letter's status tells the outcome.

use axum::extract::State;
use axum::http::StatusCode;
use projections::operations::{self, DeadLetter, ReadModelStatus, RedriveRequest};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{PathParams, QueryParams};
use crate::paging;
use crate::AppState;

/// A page of dead letters.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetter>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// Filters of the dead-letter list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// `dead`, `redrive_requested` or `redriven` (default: all).
    pub status: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// What a re-drive request did.
#[derive(Debug, Serialize, ToSchema)]
pub struct RedriveAccepted {
    /// Dead letters now waiting for the projector.
    pub requested: Vec<i64>,
}

/// Checks that `name` is a read model of this backbone.
async fn known(state: &AppState, name: &str) -> Result<String, ApiError> {
    operations::find(&state.pool, name)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no read model `{name}`; GET /projections lists them"
            ))
        })
}

/// Every read model with its lag (events and seconds, per partition) and dead letters.
#[utoipa::path(
    get, operation_id = "list_projections", path = "/projections", tag = "operations",
    responses((status = 200, description = "The read models", body = [ReadModelStatus]))
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<axum::Json<Vec<ReadModelStatus>>, ApiError> {
    principal.authorize_any(Action::ViewOperations)?;
    let mut out = Vec::new();
    for name in operations::read_models(&state.pool)
        .await
        .map_err(ApiError::internal)?
    {
        out.push(
            operations::status(&state.pool, name)
                .await
                .map_err(ApiError::internal)?,
        );
    }
    Ok(axum::Json(out))
}

/// One read model's lag and dead letters.
#[utoipa::path(
    get, path = "/projections/{name}", tag = "operations",
    params(("name" = String, Path, description = "The read model, e.g. `tracking`")),
    responses(
        (status = 200, description = "The read model", body = ReadModelStatus),
        (status = 404, description = "No such read model", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(name): PathParams<String>,
) -> Result<axum::Json<ReadModelStatus>, ApiError> {
    principal.authorize_any(Action::ViewOperations)?;
    let name = known(&state, &name).await?;
    Ok(axum::Json(
        operations::status(&state.pool, name)
            .await
            .map_err(ApiError::internal)?,
    ))
}

/// A read model's dead letters, oldest first.
#[utoipa::path(
    get, path = "/projections/{name}/dead-letters", tag = "operations",
    params(("name" = String, Path, description = "The read model"), DeadLetterQuery),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterPage),
        (status = 400, description = "Bad status, cursor or limit", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such read model", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn dead_letters(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(name): PathParams<String>,
    QueryParams(query): QueryParams<DeadLetterQuery>,
) -> Result<axum::Json<DeadLetterPage>, ApiError> {
    principal.authorize_any(Action::ViewOperations)?;
    if let Some(status) = &query.status {
        if !operations::STATUSES.contains(&status.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "status `{status}` is not one of {}",
                operations::STATUSES.join(", ")
            )));
        }
    }
    let limit = paging::limit(query.limit)?;
    let after = paging::id_cursor(query.cursor.as_deref())?;
    let name = known(&state, &name).await?;
    let rows = operations::dead_letters(
        &state.pool,
        &name,
        query.status.as_deref(),
        after,
        limit + 1,
    )
    .await
    .map_err(ApiError::internal)?;
    let (items, next_cursor) = paging::page(rows, limit, |l| l.id.to_string());
    Ok(axum::Json(DeadLetterPage { items, next_cursor }))
}

/// Asks the projector to apply a dead letter again (after the cause was fixed). Answers 202:
/// the projector applies it within about a second, once; the dead letter then reads `redriven`,
/// or `dead` again with the new error.
#[utoipa::path(
    post, path = "/projections/{name}/dead-letters/{id}/redrive", tag = "operations",
    params(("name" = String, Path, description = "The read model"), ("id" = i64, Path, description = "The dead letter")),
    responses(
        (status = 202, description = "Re-drive requested", body = RedriveAccepted),
        (status = 404, description = "No such read model or dead letter", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already re-driven", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn redrive(
    State(state): State<AppState>,
    principal: Principal,
    PathParams((name, id)): PathParams<(String, i64)>,
) -> Result<(StatusCode, axum::Json<RedriveAccepted>), ApiError> {
    principal.authorize_any(Action::RedriveDeadLetters)?;
    let name = known(&state, &name).await?;
    match operations::request_redrive(&state.pool, &name, id)
        .await
        .map_err(ApiError::internal)?
    {
        RedriveRequest::NotFound => Err(ApiError::NotFound(format!(
            "no dead letter {id} in {name}; GET /projections/{name}/dead-letters lists them"
        ))),
        RedriveRequest::AlreadyRedriven => Err(ApiError::Conflict(format!(
            "dead letter {id} was already re-driven and applied; it is not applied twice"
        ))),
        RedriveRequest::Requested => Ok((
            StatusCode::ACCEPTED,
            axum::Json(RedriveAccepted {
                requested: vec![id],
            }),
        )),
    }
}

/// Asks the projector to apply every dead letter of a read model again.
#[utoipa::path(
    post, path = "/projections/{name}/dead-letters/redrive", tag = "operations",
    params(("name" = String, Path, description = "The read model")),
    responses(
        (status = 202, description = "Re-drive requested", body = RedriveAccepted),
        (status = 404, description = "No such read model", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn redrive_all(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(name): PathParams<String>,
) -> Result<(StatusCode, axum::Json<RedriveAccepted>), ApiError> {
    principal.authorize_any(Action::RedriveDeadLetters)?;
    let name = known(&state, &name).await?;
    let requested = operations::request_redrive_all(&state.pool, &name)
        .await
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(RedriveAccepted { requested }),
    ))
}
