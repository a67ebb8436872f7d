//! The HTTP API: the Confluent Schema Registry routes, their request and response bodies, and
//! the rules of each endpoint (what a soft delete hides, when a registration is refused, ...).
//!
//! Every reply is JSON with the content type `application/vnd.schemaregistry.v1+json`, errors
//! included (`{"error_code", "message"}`, see [`ApiError`]). Request bodies are read whatever
//! their content type says (Confluent's media types, `application/json` or none) and parsed here,
//! so a malformed body is a Confluent `400`/`422` error and never axum's plain-text rejection.
//! Boolean query flags are read like Java does (`true` in any case is true, anything else false),
//! since clients send `deleted=False` as readily as `deleted=false`.

use std::collections::{HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;
use tower_http::trace::TraceLayer;

use super::compat::{incompatibilities, CompatibilityLevel, ExistingVersion};
use super::error::{ApiError, RegistryError};
use super::schema::{parse_avro, ParsedSchema, SchemaReference, AVRO};
use super::store::{self, Store, StoredSchema, SubjectVersion, VersionState};

mod compatibility;
mod config;
mod rules;
mod schemas;
mod service;
mod subjects;
pub(crate) mod wire;

use compatibility::*;
use config::*;
use rules::*;
use schemas::*;
use service::*;
use subjects::*;
use wire::*;

/// The media type of every reply.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// How deep references may nest before a schema is refused (guards against cycles).
const MAX_REFERENCES: usize = 1000;

/// What the handlers share: the storage.
#[derive(Debug, Clone)]
pub struct AppState {
    store: Store,
}

impl AppState {
    /// Connects to the database of `config` and applies the registry's migrations: what
    /// [`router`] needs, for embedding the registry in another process.
    pub async fn connect(config: &super::RegistryConfig) -> Result<Self, RegistryError> {
        config.validate()?;
        let store = Store::connect(&config.database_url, &config.db_schema).await?;
        store.migrate().await?;
        Ok(Self { store })
    }

    pub(crate) async fn close(&self) {
        self.store.close().await;
    }
}

/// The registry's routes, with JSON replies for unknown routes (404) and methods (405).
fn routes(state: AppState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/schemas/types", get(schema_types))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(schema_text_by_id))
        .route("/schemas/ids/{id}/subjects", get(subjects_of_schema))
        .route("/schemas/ids/{id}/versions", get(versions_of_schema))
        .route("/subjects", get(list_subjects))
        .route(
            "/subjects/{subject}",
            post(lookup_schema).delete(delete_subject),
        )
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register_schema),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema_text),
        )
        .route(
            "/subjects/{subject}/versions/{version}/referencedby",
            get(get_referenced_by),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_compatibility_with_subject),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_compatibility_with_version),
        )
        .route(
            "/config",
            get(get_global_config)
                .put(put_global_config)
                .delete(delete_global_config),
        )
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .route("/mode", get(get_mode))
        .route("/mode/{subject}", get(get_mode))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The registry's routes behind its access policy: writes (and, if so configured, reads) need
/// the credentials (see [`super::access`]).
pub fn router(state: AppState, access: super::access::AccessPolicy) -> Router {
    routes(state).layer(axum::middleware::from_fn_with_state(
        std::sync::Arc::new(access),
        super::access::require_credentials,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_latest_or_a_positive_32_bit_number() {
        assert_eq!(VersionSpec::parse("latest"), Ok(VersionSpec::Latest));
        assert_eq!(VersionSpec::parse("7"), Ok(VersionSpec::Number(7)));
        for bad in ["0", "-1", "abc", "", "2147483648", "1.5", "LATEST"] {
            assert_eq!(
                VersionSpec::parse(bad).map_err(|e| e.error_code),
                Err(42202),
                "{bad}"
            );
        }
    }

    #[test]
    fn boolean_flags_read_like_java() {
        let flags = Flags(HashMap::from([
            ("a".to_owned(), "True".to_owned()),
            ("b".to_owned(), "False".to_owned()),
            ("c".to_owned(), "yes".to_owned()),
        ]));
        assert!(flags.flag("a"));
        assert!(!flags.flag("b"));
        assert!(!flags.flag("c"));
        assert!(!flags.flag("missing"));
    }
}
