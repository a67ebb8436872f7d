//! Errors of the registry: [`RegistryError`] for the library (start-up, database, serving), and
//! [`ApiError`], the Confluent error reply (`{"error_code": N, "message": "..."}`) that clients
//! match on.
//!
//! Policy: a client mistake always gets its Confluent 4xx code with a message it can act on; an
//! [`ApiError`] made from a [`RegistryError`] is the only 5xx (`50001`), logged with its cause
//! chain and answered with an opaque message, so database details never reach a client.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::api::wire::SrJson;

/// Everything that can go wrong in the registry outside a client's mistake.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A `REGISTRY_*` environment variable is missing a valid value.
    #[error("invalid registry configuration: {0}")]
    Config(#[from] envy::Error),
    /// `REGISTRY_BASIC_AUTH` is missing or not `user:password`.
    #[error("REGISTRY_BASIC_AUTH must be `user:password` (both non-empty): the credentials every write to the registry needs")]
    MissingCredentials,
    /// `REGISTRY_DB_SCHEMA` is not a plain PostgreSQL identifier.
    #[error("invalid database schema name {0:?}: use lower-case letters, digits and '_', starting with a letter or '_', at most 63 characters")]
    InvalidDbSchema(String),
    /// PostgreSQL refused a connection or a statement.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A stored schema no longer parses (it did when it was registered): the data was changed
    /// behind the registry's back, or by an incompatible version of it.
    #[error("stored schema {id} is corrupt: {reason}")]
    CorruptSchema {
        /// Global id of the schema.
        id: i32,
        /// Why it does not parse.
        reason: String,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server stopped on an I/O error.
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// A Confluent error reply. The HTTP status is the first three digits of the code
/// (`40401` → 404), as the Confluent registry does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    /// Confluent error code, e.g. `40401` (subject not found).
    pub error_code: u32,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with the given code and message.
    pub fn new(error_code: u32, message: impl Into<String>) -> Self {
        Self {
            error_code,
            message: message.into(),
        }
    }

    /// The HTTP status of the reply: the code itself when it has three digits, otherwise its
    /// first three digits.
    pub fn status(&self) -> StatusCode {
        let mut code = self.error_code;
        while code >= 1000 {
            code /= 10;
        }
        u16::try_from(code)
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub(crate) fn malformed_json(detail: impl std::fmt::Display) -> Self {
        Self::new(400, format!("Malformed JSON request body: {detail}"))
    }

    pub(crate) fn unprocessable(detail: impl std::fmt::Display) -> Self {
        Self::new(422, format!("Unprocessable request body: {detail}"))
    }

    pub(crate) fn subject_not_found(subject: &str) -> Self {
        Self::new(40401, format!("Subject '{subject}' not found."))
    }

    pub(crate) fn version_not_found(subject: &str, version: impl std::fmt::Display) -> Self {
        Self::new(
            40402,
            format!("Version {version} not found for subject '{subject}'."),
        )
    }

    pub(crate) fn schema_not_found() -> Self {
        Self::new(40403, "Schema not found")
    }

    pub(crate) fn schema_id_not_found(id: impl std::fmt::Display) -> Self {
        Self::new(40403, format!("Schema {id} not found"))
    }

    pub(crate) fn subject_soft_deleted(subject: &str) -> Self {
        Self::new(
            40404,
            format!(
                "Subject '{subject}' was soft deleted. Set permanent=true to delete permanently"
            ),
        )
    }

    pub(crate) fn subject_not_soft_deleted(subject: &str) -> Self {
        Self::new(
            40405,
            format!("Subject '{subject}' was not deleted first before being permanently deleted"),
        )
    }

    pub(crate) fn version_soft_deleted(subject: &str, version: i32) -> Self {
        Self::new(
            40406,
            format!(
                "Subject '{subject}' Version {version} was soft deleted. Set permanent=true to delete permanently"
            ),
        )
    }

    pub(crate) fn version_not_soft_deleted(subject: &str, version: i32) -> Self {
        Self::new(
            40407,
            format!(
                "Subject '{subject}' Version {version} was not deleted first before being permanently deleted"
            ),
        )
    }

    pub(crate) fn subject_config_not_found(subject: &str) -> Self {
        Self::new(
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )
    }

    pub(crate) fn incompatible(subject: &str, messages: &[String]) -> Self {
        Self::new(
            409,
            format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]",
                messages.join("; ")
            ),
        )
    }

    pub(crate) fn invalid_schema(detail: impl std::fmt::Display) -> Self {
        Self::new(42201, format!("Invalid schema: {detail}"))
    }

    pub(crate) fn invalid_version(version: &str) -> Self {
        Self::new(
            42202,
            format!(
                "The specified version '{version}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
            ),
        )
    }

    pub(crate) fn invalid_compatibility_level(level: &str) -> Self {
        Self::new(
            42203,
            format!(
                "Invalid compatibility level '{level}'. Valid values are NONE, BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL and FULL_TRANSITIVE"
            ),
        )
    }

    pub(crate) fn referenced(subject: &str, version: i32, by: &[i32]) -> Self {
        Self::new(
            42206,
            format!(
                "One or more references exist to the schema {{subject={subject}, version={version}}}: schema ids {by:?}"
            ),
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        tracing::error!(error = %error_chain(&error), "request failed on a server error");
        Self::new(50001, "Error in the backend data store")
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        RegistryError::from(error).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        SrJson(status, self).into_response()
    }
}

/// `error: cause: cause ...`, for logs.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_status_is_the_first_three_digits_of_the_code() {
        assert_eq!(ApiError::new(40401, "").status(), StatusCode::NOT_FOUND);
        assert_eq!(ApiError::new(409, "").status(), StatusCode::CONFLICT);
        assert_eq!(
            ApiError::new(42201, "").status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            ApiError::new(50001, "").status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
