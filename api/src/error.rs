//! The API's one error type. Policy: every client mistake is a 4xx `application/problem+json`
//! (RFC 9457) whose `detail` says what was wrong and what to do; the database out of reach for a
//! moment (restarting, failing over, its pool exhausted) is a 503 with `Retry-After`, since the
//! same request will succeed shortly; anything else is an opaque 500 whose cause is logged, never
//! sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this request, and what to do about it.
    pub detail: String,
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// No valid bearer token (401 with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller's role may not do this, or not on this resource.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method (405 with `Allow`: the methods it has).
    #[error("{detail}")]
    MethodNotAllowed { detail: String, allow: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The request took longer than the API allows (`API_REQUEST_TIMEOUT_MS`).
    #[error("{0}")]
    RequestTimeout(String),
    /// The caller sent too many requests; retry after this many seconds.
    #[error("{detail}")]
    TooManyRequests {
        detail: String,
        retry_after_secs: u64,
    },
    /// The read model has not caught up with the requested position yet.
    #[error("{0}")]
    NotYet(String),
    /// The database could not be reached for a moment; the request had no effect.
    #[error("{0}")]
    Unavailable(String),
    /// The API is at capacity (see [`crate::admission`]); the request had no effect.
    #[error("{0}")]
    Busy(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn internal(error: impl std::fmt::Display) -> Self {
        Self::Internal(error.to_string())
    }

    /// A failure of the server's side: 503 when its cause is the database being out of reach
    /// (a retry will do), else 500.
    pub fn failed(error: &(dyn std::error::Error + 'static)) -> Self {
        if database_unreachable(error) {
            tracing::warn!(%error, "the database is out of reach; answered 503");
            Self::Unavailable(
                "the database is out of reach for a moment and the request had no effect; retry \
                 after Retry-After seconds (with the same Idempotency-Key)"
                    .to_owned(),
            )
        } else {
            Self::internal(error)
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            Self::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authentication required",
            ),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Not allowed"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            Self::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            Self::Conflict(_) => (
                StatusCode::CONFLICT,
                "conflict",
                "Conflicts with the current state",
            ),
            Self::Unprocessable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-request",
                "The request is not valid",
            ),
            Self::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Request body too large",
            ),
            Self::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            Self::RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "The request took too long",
            ),
            Self::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                "Too many requests",
            ),
            Self::NotYet(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not-yet-projected",
                "The read model has not caught up yet",
            ),
            Self::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Temporarily unavailable",
            ),
            Self::Busy(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "at-capacity",
                "At capacity",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title) = self.parts();
        let detail = match &self {
            Self::Internal(cause) => {
                tracing::error!(%cause, "request failed");
                "The server could not complete the request; it has been logged. Retry later."
                    .to_owned()
            }
            other => other.to_string(),
        };
        let problem = Problem {
            kind: format!("https://backbone.example/problems/{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
        };
        let mut response = (status, axum::Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        let headers = response.headers_mut();
        match self {
            Self::NotYet(_) | Self::Unavailable(_) | Self::Busy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::TooManyRequests {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            Self::MethodNotAllowed { allow, .. } => {
                if let Ok(allow) = HeaderValue::from_str(&allow) {
                    headers.insert(header::ALLOW, allow);
                }
            }
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"order-backbone\""),
                );
            }
            _ => {}
        }
        response
    }
}

impl ApiError {
    /// The answer to a request that ran out of time: nothing is known of its outcome.
    pub fn timed_out(after: std::time::Duration) -> Self {
        Self::RequestTimeout(format!(
            "the request did not finish within {} ms; its effect is unknown: retry with the same \
             Idempotency-Key to act at most once",
            after.as_millis()
        ))
    }
}

/// A business-rule error of an aggregate, as the API needs to classify it.
pub trait RuleViolation: std::error::Error {
    /// The aggregate does not exist (404).
    fn is_not_found(&self) -> bool;
    /// The command conflicts with the aggregate's current state (409); otherwise it is invalid
    /// in itself (422).
    fn is_state_conflict(&self) -> bool;
}

impl RuleViolation for domain::order::OrderError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound)
    }
    fn is_state_conflict(&self) -> bool {
        Self::is_state_conflict(self)
    }
}

impl RuleViolation for domain::delivery::DeliveryError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound)
    }
    fn is_state_conflict(&self) -> bool {
        Self::is_state_conflict(self)
    }
}

impl RuleViolation for domain::rewards::RewardsError {
    fn is_not_found(&self) -> bool {
        false
    }
    fn is_state_conflict(&self) -> bool {
        Self::is_state_conflict(self)
    }
}

impl RuleViolation for domain::payment::PaymentError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound)
    }
    fn is_state_conflict(&self) -> bool {
        Self::is_state_conflict(self)
    }
}

/// The problem for a command that was not committed.
pub fn command_error<E: RuleViolation>(error: commands::CommandError<E>) -> ApiError {
    use commands::CommandError;
    match error {
        CommandError::Rejected(e) if e.is_not_found() => ApiError::NotFound(e.to_string()),
        CommandError::Rejected(e) if e.is_state_conflict() => ApiError::Conflict(e.to_string()),
        CommandError::Rejected(e) => ApiError::Unprocessable(e.to_string()),
        e @ CommandError::Contended { .. } => ApiError::Conflict(e.to_string()),
        CommandError::Store(e) => ApiError::failed(e.as_ref()),
    }
}

/// Whether a failure comes from the database being out of reach rather than from the request or
/// a defect: no connection (refused, reset, TLS), the pool exhausted or closed, or the server
/// shutting down, starting up, or out of resources (SQLSTATE classes 08, 57P and 53).
fn database_unreachable(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        match e.downcast_ref::<sqlx::Error>() {
            Some(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ) => true,
            Some(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
            }),
            _ => e.downcast_ref::<std::io::Error>().is_some(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_database_is_a_503_and_a_defect_a_500() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let failed = ApiError::failed(&refused);
        assert!(matches!(failed, ApiError::Unavailable(_)), "{failed:?}");
        let response = failed.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert!(matches!(
            ApiError::failed(&sqlx::Error::PoolTimedOut),
            ApiError::Unavailable(_)
        ));
        // Through a command's store failure, as the bus wraps it.
        let wrapped: commands::CommandError<domain::order::OrderError> =
            commands::CommandError::Store(Box::new(sqlx::Error::PoolClosed));
        assert!(matches!(command_error(wrapped), ApiError::Unavailable(_)));
        let defect = sqlx::Error::ColumnNotFound("total".into());
        assert!(matches!(ApiError::failed(&defect), ApiError::Internal(_)));
    }
}
