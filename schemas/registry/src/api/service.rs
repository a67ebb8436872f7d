//! The service's own endpoints: the root, health, the mode, schema types, and the JSON answers to
//! unknown routes and methods.

use super::*;

pub(super) async fn root() -> SrJson<serde_json::Value> {
    ok(json!({}))
}

pub(super) async fn health(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => ok(json!({"status": "UP"})).into_response(),
        Err(error) => {
            tracing::warn!(error = %crate::error::error_chain(&error), "health check failed");
            SrJson(
                StatusCode::SERVICE_UNAVAILABLE,
                ApiError::new(503, "The database does not answer"),
            )
            .into_response()
        }
    }
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(404, "HTTP 404 Not Found")
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(405, "HTTP 405 Method Not Allowed")
}

pub(super) async fn get_mode() -> SrJson<serde_json::Value> {
    ok(json!({"mode": "READWRITE"}))
}
