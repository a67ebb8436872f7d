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

// ---------------------------------------------------------------------------------------------
// Replies and extractors

/// A JSON reply with the schema registry media type.
#[derive(Debug)]
pub(crate) struct SrJson<T>(pub StatusCode, pub T);

impl<T: Serialize> IntoResponse for SrJson<T> {
    fn into_response(self) -> Response {
        let (status, body) = match serde_json::to_vec(&self.1) {
            Ok(body) => (self.0, body),
            Err(error) => {
                tracing::error!(%error, "cannot serialize a reply");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    br#"{"error_code":50001,"message":"Cannot serialize the reply"}"#.to_vec(),
                )
            }
        };
        (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
            body,
        )
            .into_response()
    }
}

fn ok<T: Serialize>(body: T) -> SrJson<T> {
    SrJson(StatusCode::OK, body)
}

/// A schema text as the body of the reply (the `/schema` endpoints).
fn raw_schema(text: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        text,
    )
        .into_response()
}

type ApiResult<T> = Result<T, ApiError>;

/// Path parameters; a parameter that cannot be decoded is a Confluent 404.
#[derive(Debug)]
struct Params<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(404, rejection.body_text())),
        }
    }
}

/// Query parameters, read leniently.
#[derive(Debug, Default)]
struct Flags(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Flags {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<HashMap<String, String>>::from_request_parts(parts, state).await {
            Ok(Query(map)) => Ok(Self(map)),
            Err(rejection) => Err(ApiError::new(400, rejection.body_text())),
        }
    }
}

impl Flags {
    /// `true` (any case) is true; absent or anything else is false, as in Java.
    fn flag(&self, name: &str) -> bool {
        self.0
            .get(name)
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A numeric parameter; absent or not a number gives the default.
    fn number(&self, name: &str, default: i64) -> i64 {
        self.text(name)
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(default)
    }
}

/// The largest request body the registry accepts (as Confluent's default).
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// How much of a too-large body is read anyway, so that the 413 reaches the client.
const DRAIN_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A JSON request body, whatever the content type.
#[derive(Debug)]
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        // Read (up to a bound) past the limit before refusing: a server that answers 413 and
        // closes with unread bytes makes the kernel reset the connection, and the client never
        // sees the answer.
        let too_large = || {
            ApiError::new(
                413,
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        };
        let bytes: Bytes = axum::body::to_bytes(request.into_body(), DRAIN_BODY_BYTES)
            .await
            .map_err(|error| {
                if error.to_string().contains("length limit exceeded") {
                    too_large()
                } else {
                    ApiError::new(400, format!("the request body could not be read: {error}"))
                }
            })?;
        if bytes.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        serde_json::from_slice(&bytes).map(Self).map_err(|error| {
            if error.is_data() {
                ApiError::unprocessable(error)
            } else {
                ApiError::malformed_json(error)
            }
        })
    }
}

/// `latest` or a version number in `[1, 2^31-1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VersionSpec {
    Latest,
    Number(i32),
}

impl VersionSpec {
    fn parse(text: &str) -> ApiResult<Self> {
        if text == "latest" {
            return Ok(Self::Latest);
        }
        match text.parse::<i32>() {
            Ok(number) if number >= 1 => Ok(Self::Number(number)),
            _ => Err(ApiError::invalid_version(text)),
        }
    }
}

/// A schema in a request: register, look up, check compatibility.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaRequest {
    schema: Option<String>,
    schema_type: Option<String>,
    references: Option<Vec<SchemaReference>>,
}

/// A subject version in a reply.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SubjectVersionReply {
    subject: String,
    version: i32,
    id: i32,
    #[serde(skip_serializing_if = "is_avro")]
    schema_type: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    references: Vec<SchemaReference>,
    schema: String,
}

impl From<SubjectVersion> for SubjectVersionReply {
    fn from(found: SubjectVersion) -> Self {
        Self {
            subject: found.subject,
            version: found.version,
            id: found.schema.id,
            schema_type: found.schema.schema_type,
            references: found.schema.references,
            schema: found.schema.text,
        }
    }
}

fn is_avro(schema_type: &str) -> bool {
    schema_type == AVRO
}

// ---------------------------------------------------------------------------------------------
// Shared rules

async fn conn(state: &AppState) -> ApiResult<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    Ok(state.store.conn().await?)
}

/// The texts of every schema reachable through `references`, each once.
async fn referenced_texts(
    conn: &mut PgConnection,
    references: &[SchemaReference],
) -> ApiResult<Vec<String>> {
    let mut seen = HashSet::new();
    let mut pending: Vec<SchemaReference> = references.to_vec();
    let mut texts = Vec::new();
    while let Some(reference) = pending.pop() {
        if !seen.insert((reference.subject.clone(), reference.version)) {
            continue;
        }
        if seen.len() > MAX_REFERENCES {
            return Err(ApiError::invalid_schema("too many nested references"));
        }
        let found = store::subject_version(conn, &reference.subject, reference.version)
            .await?
            .ok_or_else(|| {
                ApiError::invalid_schema(format!(
                    "reference '{}' to version {} of subject '{}' not found",
                    reference.name, reference.version, reference.subject
                ))
            })?;
        pending.extend(found.schema.references.iter().cloned());
        texts.push(found.schema.text);
    }
    Ok(texts)
}

/// Parses the schema of a request (42201 when it is not a valid Avro schema).
async fn parse_request(conn: &mut PgConnection, request: SchemaRequest) -> ApiResult<ParsedSchema> {
    let schema_type = request.schema_type.unwrap_or_else(|| AVRO.to_owned());
    if !schema_type.eq_ignore_ascii_case(AVRO) {
        return Err(ApiError::invalid_schema(format!(
            "schemaType '{schema_type}' is not supported: this registry accepts AVRO schemas only"
        )));
    }
    let text = match request.schema {
        Some(text) if !text.trim().is_empty() => text,
        _ => return Err(ApiError::invalid_schema("the request has no schema")),
    };
    let references = request.references.unwrap_or_default();
    let referenced = referenced_texts(conn, &references).await?;
    parse_avro(&text, references, &referenced).map_err(ApiError::invalid_schema)
}

/// Parses a schema the registry stored; failing is a server error.
async fn parse_stored(
    conn: &mut PgConnection,
    schema: &StoredSchema,
) -> ApiResult<ExistingVersion> {
    let referenced = referenced_texts(conn, &schema.references).await?;
    let parsed =
        parse_avro(&schema.text, schema.references.clone(), &referenced).map_err(|reason| {
            RegistryError::CorruptSchema {
                id: schema.id,
                reason,
            }
        })?;
    Ok(ExistingVersion {
        version: 0,
        schema: parsed.resolved,
    })
}

/// Parses the given versions for a compatibility check.
async fn parse_versions(
    conn: &mut PgConnection,
    versions: &[SubjectVersion],
) -> ApiResult<Vec<ExistingVersion>> {
    let mut parsed = Vec::with_capacity(versions.len());
    for version in versions {
        let mut existing = parse_stored(conn, &version.schema).await?;
        existing.version = version.version;
        parsed.push(existing);
    }
    Ok(parsed)
}

fn parse_level(stored: String) -> ApiResult<CompatibilityLevel> {
    stored.parse().map_err(|_| {
        ApiError::from(RegistryError::CorruptSchema {
            id: 0,
            reason: format!("stored compatibility level {stored:?} is unknown"),
        })
    })
}

async fn global_level(conn: &mut PgConnection) -> ApiResult<CompatibilityLevel> {
    match store::global_config(conn).await? {
        Some(stored) => parse_level(stored),
        None => Ok(CompatibilityLevel::DEFAULT),
    }
}

/// The subject's level, else the global one, else BACKWARD.
async fn effective_level(conn: &mut PgConnection, subject: &str) -> ApiResult<CompatibilityLevel> {
    match store::subject_config(conn, subject).await? {
        Some(stored) => parse_level(stored),
        None => global_level(conn).await,
    }
}

/// The version that `spec` names among `states` (live only unless `include_deleted`):
/// 40401 when none is visible, 40402 when that one is not.
fn pick_version(
    subject: &str,
    states: &[VersionState],
    spec: VersionSpec,
    include_deleted: bool,
) -> ApiResult<VersionState> {
    let visible: Vec<VersionState> = states
        .iter()
        .copied()
        .filter(|state| include_deleted || !state.deleted)
        .collect();
    let picked = match spec {
        _ if visible.is_empty() => return Err(ApiError::subject_not_found(subject)),
        VersionSpec::Latest => visible.last().copied(),
        VersionSpec::Number(number) => visible.iter().copied().find(|s| s.version == number),
    };
    picked.ok_or_else(|| match spec {
        VersionSpec::Number(number) => ApiError::version_not_found(subject, number),
        VersionSpec::Latest => ApiError::version_not_found(subject, "latest"),
    })
}

/// The version of a subject that a GET names, with its schema.
async fn find_version(
    conn: &mut PgConnection,
    subject: &str,
    version: &str,
    include_deleted: bool,
) -> ApiResult<SubjectVersion> {
    let spec = VersionSpec::parse(version)?;
    let states = store::version_states(conn, subject).await?;
    let picked = pick_version(subject, &states, spec, include_deleted)?;
    store::subject_version(conn, subject, picked.version)
        .await?
        .ok_or_else(|| ApiError::version_not_found(subject, picked.version))
}

fn parse_schema_id(text: &str) -> ApiResult<i32> {
    match text.parse::<i32>() {
        Ok(id) if id >= 1 => Ok(id),
        _ => Err(ApiError::schema_id_not_found(text)),
    }
}

async fn stored_schema(conn: &mut PgConnection, id: &str) -> ApiResult<StoredSchema> {
    let id = parse_schema_id(id)?;
    store::schema_by_id(conn, id)
        .await?
        .ok_or_else(|| ApiError::schema_id_not_found(id))
}

/// Applies Confluent's `offset` and `limit` (negative: no limit) to a list.
fn paginate<T>(items: Vec<T>, flags: &Flags) -> Vec<T> {
    let offset = usize::try_from(flags.number("offset", 0)).unwrap_or(0);
    let limit = usize::try_from(flags.number("limit", -1)).unwrap_or(usize::MAX);
    items.into_iter().skip(offset).take(limit).collect()
}

// ---------------------------------------------------------------------------------------------
// Handlers: service

async fn root() -> SrJson<serde_json::Value> {
    ok(json!({}))
}

async fn health(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => ok(json!({"status": "UP"})).into_response(),
        Err(error) => {
            tracing::warn!(error = %super::error::error_chain(&error), "health check failed");
            SrJson(
                StatusCode::SERVICE_UNAVAILABLE,
                ApiError::new(503, "The database does not answer"),
            )
            .into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(404, "HTTP 404 Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(405, "HTTP 405 Method Not Allowed")
}

async fn get_mode() -> SrJson<serde_json::Value> {
    ok(json!({"mode": "READWRITE"}))
}

// ---------------------------------------------------------------------------------------------
// Handlers: schemas by id

async fn schema_types() -> SrJson<[&'static str; 1]> {
    ok([AVRO])
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SchemaReply {
    #[serde(skip_serializing_if = "is_avro")]
    schema_type: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    references: Vec<SchemaReference>,
    schema: String,
}

async fn schema_by_id(
    State(state): State<AppState>,
    Params(id): Params<String>,
) -> ApiResult<SrJson<SchemaReply>> {
    let schema = stored_schema(&mut *conn(&state).await?, &id).await?;
    Ok(ok(SchemaReply {
        schema_type: schema.schema_type,
        references: schema.references,
        schema: schema.text,
    }))
}

async fn schema_text_by_id(
    State(state): State<AppState>,
    Params(id): Params<String>,
) -> ApiResult<Response> {
    let schema = stored_schema(&mut *conn(&state).await?, &id).await?;
    Ok(raw_schema(schema.text))
}

async fn subjects_of_schema(
    State(state): State<AppState>,
    Params(id): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<String>>> {
    let mut conn = conn(&state).await?;
    let schema = stored_schema(&mut conn, &id).await?;
    let mut subjects: Vec<String> =
        store::versions_of_schema(&mut conn, schema.id, flags.flag("deleted"))
            .await?
            .into_iter()
            .map(|(subject, _)| subject)
            .filter(|subject| flags.text("subject").is_none_or(|only| only == subject))
            .collect();
    subjects.dedup();
    Ok(ok(paginate(subjects, &flags)))
}

#[derive(Debug, Serialize)]
struct SubjectAndVersion {
    subject: String,
    version: i32,
}

async fn versions_of_schema(
    State(state): State<AppState>,
    Params(id): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<SubjectAndVersion>>> {
    let mut conn = conn(&state).await?;
    let schema = stored_schema(&mut conn, &id).await?;
    let versions = store::versions_of_schema(&mut conn, schema.id, flags.flag("deleted"))
        .await?
        .into_iter()
        .filter(|(subject, _)| flags.text("subject").is_none_or(|only| only == subject))
        .map(|(subject, version)| SubjectAndVersion { subject, version })
        .collect();
    Ok(ok(paginate(versions, &flags)))
}

// ---------------------------------------------------------------------------------------------
// Handlers: subjects and versions

async fn list_subjects(
    State(state): State<AppState>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<String>>> {
    let subjects = store::subjects(
        &mut *conn(&state).await?,
        flags.flag("deleted"),
        flags.flag("deleted_only") || flags.flag("deletedOnly"),
        flags.text("subjectPrefix").unwrap_or(""),
    )
    .await?;
    Ok(ok(paginate(subjects, &flags)))
}

async fn list_versions(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<i32>>> {
    let include_deleted = flags.flag("deleted");
    let deleted_only = flags.flag("deleted_only") || flags.flag("deletedOnly");
    let states = store::version_states(&mut *conn(&state).await?, &subject).await?;
    let versions: Vec<i32> = states
        .iter()
        .filter(|s| {
            if deleted_only {
                s.deleted
            } else {
                include_deleted || !s.deleted
            }
        })
        .map(|s| s.version)
        .collect();
    if versions.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    Ok(ok(paginate(versions, &flags)))
}

async fn get_version(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
    flags: Flags,
) -> ApiResult<SrJson<SubjectVersionReply>> {
    let found = find_version(
        &mut *conn(&state).await?,
        &subject,
        &version,
        flags.flag("deleted"),
    )
    .await?;
    Ok(ok(found.into()))
}

async fn get_version_schema_text(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
    flags: Flags,
) -> ApiResult<Response> {
    let found = find_version(
        &mut *conn(&state).await?,
        &subject,
        &version,
        flags.flag("deleted"),
    )
    .await?;
    Ok(raw_schema(found.schema.text))
}

async fn get_referenced_by(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
) -> ApiResult<SrJson<Vec<i32>>> {
    let mut conn = conn(&state).await?;
    let found = find_version(&mut conn, &subject, &version, false).await?;
    Ok(ok(
        store::referenced_by(&mut conn, &subject, found.version).await?
    ))
}

/// `POST /subjects/{subject}`: which version of the subject is this schema?
async fn lookup_schema(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
    Body(request): Body<SchemaRequest>,
) -> ApiResult<SrJson<SubjectVersionReply>> {
    let include_deleted = flags.flag("deleted");
    let mut conn = conn(&state).await?;
    let states = store::version_states(&mut conn, &subject).await?;
    if !states.iter().any(|s| include_deleted || !s.deleted) {
        return Err(ApiError::subject_not_found(&subject));
    }
    let parsed = parse_request(&mut conn, request).await?;
    let found =
        store::find_in_subject(&mut conn, &subject, AVRO, &parsed.identity, include_deleted)
            .await?
            .ok_or_else(ApiError::schema_not_found)?;
    Ok(ok(found.into()))
}

#[derive(Debug, Serialize)]
struct RegisteredReply {
    id: i32,
}

/// `POST /subjects/{subject}/versions`: registers a schema as the next version of a subject,
/// after the compatibility check; a schema the subject already has keeps its id and version.
async fn register_schema(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    Body(request): Body<SchemaRequest>,
) -> ApiResult<SrJson<RegisteredReply>> {
    let parsed = {
        let mut conn = conn(&state).await?;
        let parsed = parse_request(&mut conn, request).await?;
        // Fast path without the write lock: already a live version of the subject.
        if let Some(found) =
            store::find_in_subject(&mut conn, &subject, AVRO, &parsed.identity, false).await?
        {
            return Ok(ok(RegisteredReply {
                id: found.schema.id,
            }));
        }
        parsed
    };

    let mut tx = state.store.begin_exclusive().await?;
    if let Some(found) =
        store::find_in_subject(&mut tx, &subject, AVRO, &parsed.identity, false).await?
    {
        tx.commit().await?;
        return Ok(ok(RegisteredReply {
            id: found.schema.id,
        }));
    }
    let level = effective_level(&mut tx, &subject).await?;
    if level != CompatibilityLevel::None {
        let live = store::live_versions(&mut tx, &subject).await?;
        let against = if level.is_transitive() {
            &live[..]
        } else {
            live.last().map(std::slice::from_ref).unwrap_or_default()
        };
        let existing = parse_versions(&mut tx, against).await?;
        let reasons = incompatibilities(level, &parsed.resolved, &existing);
        if !reasons.is_empty() {
            return Err(ApiError::incompatible(&subject, &reasons));
        }
    }
    let id = store::schema_id_for(
        &mut tx,
        AVRO,
        &parsed.identity,
        &parsed.text,
        &parsed.references,
    )
    .await?;
    let version = store::add_version(&mut tx, &subject, id).await?;
    tx.commit().await?;
    tracing::info!(%subject, version, id, "registered schema");
    Ok(ok(RegisteredReply { id }))
}

/// `DELETE /subjects/{subject}`: soft-deletes every live version, or with `permanent=true`
/// removes a subject that was soft-deleted first. Replies with the versions deleted.
async fn delete_subject(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<i32>>> {
    let permanent = flags.flag("permanent");
    let mut tx = state.store.begin_exclusive().await?;
    let states = store::version_states(&mut tx, &subject).await?;
    if states.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    let live: Vec<i32> = states
        .iter()
        .filter(|s| !s.deleted)
        .map(|s| s.version)
        .collect();
    let deleted = if permanent {
        if !live.is_empty() {
            return Err(ApiError::subject_not_soft_deleted(&subject));
        }
        let all: Vec<i32> = states.iter().map(|s| s.version).collect();
        store::hard_delete(&mut tx, &subject, &all).await?;
        all
    } else {
        if live.is_empty() {
            return Err(ApiError::subject_soft_deleted(&subject));
        }
        for &version in &live {
            let referrers = store::referenced_by(&mut tx, &subject, version).await?;
            if !referrers.is_empty() {
                return Err(ApiError::referenced(&subject, version, &referrers));
            }
        }
        store::soft_delete(&mut tx, &subject, &live).await?;
        live
    };
    // A deleted subject forgets its own compatibility level, as in Confluent.
    store::delete_subject_config(&mut tx, &subject).await?;
    tx.commit().await?;
    tracing::info!(%subject, permanent, versions = ?deleted, "deleted subject");
    Ok(ok(deleted))
}

/// `DELETE /subjects/{subject}/versions/{version}`: soft delete, or with `permanent=true`
/// removal of a version that was soft-deleted first. Replies with the version number.
async fn delete_version(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
    flags: Flags,
) -> ApiResult<SrJson<i32>> {
    let permanent = flags.flag("permanent");
    let spec = VersionSpec::parse(&version)?;
    let mut tx = state.store.begin_exclusive().await?;
    let states = store::version_states(&mut tx, &subject).await?;
    if states.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    let target = match spec {
        VersionSpec::Number(number) => states
            .iter()
            .copied()
            .find(|s| s.version == number)
            .ok_or_else(|| ApiError::version_not_found(&subject, number))?,
        // The latest live version for a soft delete, the latest of all for a permanent one.
        VersionSpec::Latest => pick_version(&subject, &states, spec, permanent)?,
    };
    if permanent {
        if !target.deleted {
            return Err(ApiError::version_not_soft_deleted(&subject, target.version));
        }
        store::hard_delete(&mut tx, &subject, &[target.version]).await?;
    } else {
        if target.deleted {
            return Err(ApiError::version_soft_deleted(&subject, target.version));
        }
        let referrers = store::referenced_by(&mut tx, &subject, target.version).await?;
        if !referrers.is_empty() {
            return Err(ApiError::referenced(&subject, target.version, &referrers));
        }
        store::soft_delete(&mut tx, &subject, &[target.version]).await?;
    }
    tx.commit().await?;
    tracing::info!(%subject, version = target.version, permanent, "deleted version");
    Ok(ok(target.version))
}

// ---------------------------------------------------------------------------------------------
// Handlers: compatibility

#[derive(Debug, Serialize)]
struct CompatibilityReply {
    is_compatible: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<String>>,
}

/// `POST /compatibility/subjects/{subject}/versions/{version}`: would the schema be compatible
/// with that version under the subject's level?
async fn check_compatibility_with_version(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
    flags: Flags,
    Body(request): Body<SchemaRequest>,
) -> ApiResult<SrJson<CompatibilityReply>> {
    let spec = VersionSpec::parse(&version)?;
    check_compatibility(state, subject, Some(spec), flags, request).await
}

/// `POST /compatibility/subjects/{subject}/versions`: would the schema be accepted as the next
/// version (against the latest, or every version for a transitive level)?
async fn check_compatibility_with_subject(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
    Body(request): Body<SchemaRequest>,
) -> ApiResult<SrJson<CompatibilityReply>> {
    check_compatibility(state, subject, None, flags, request).await
}

async fn check_compatibility(
    state: AppState,
    subject: String,
    spec: Option<VersionSpec>,
    flags: Flags,
    request: SchemaRequest,
) -> ApiResult<SrJson<CompatibilityReply>> {
    let mut conn = conn(&state).await?;
    let parsed = parse_request(&mut conn, request).await?;
    let level = effective_level(&mut conn, &subject).await?;
    let live = store::live_versions(&mut conn, &subject).await?;
    let against: Vec<SubjectVersion> = match spec {
        // Nothing to be incompatible with: the first version of a subject is always accepted.
        None | Some(VersionSpec::Latest) if live.is_empty() => Vec::new(),
        None if level.is_transitive() => live,
        None | Some(VersionSpec::Latest) => live.last().cloned().into_iter().collect(),
        Some(VersionSpec::Number(number)) => {
            if live.is_empty() {
                return Err(ApiError::subject_not_found(&subject));
            }
            let found = live
                .into_iter()
                .find(|v| v.version == number)
                .ok_or_else(|| ApiError::version_not_found(&subject, number))?;
            vec![found]
        }
    };
    let existing = parse_versions(&mut conn, &against).await?;
    let reasons = incompatibilities(level, &parsed.resolved, &existing);
    Ok(ok(CompatibilityReply {
        is_compatible: reasons.is_empty(),
        messages: flags.flag("verbose").then_some(reasons),
    }))
}

// ---------------------------------------------------------------------------------------------
// Handlers: config

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigRequest {
    compatibility: Option<String>,
    compatibility_level: Option<String>,
}

impl ConfigRequest {
    fn level(self) -> ApiResult<CompatibilityLevel> {
        let text = self
            .compatibility
            .or(self.compatibility_level)
            .unwrap_or_default();
        text.parse()
            .map_err(|_| ApiError::invalid_compatibility_level(&text))
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigReply {
    compatibility_level: CompatibilityLevel,
}

#[derive(Debug, Serialize)]
struct ConfigUpdateReply {
    compatibility: CompatibilityLevel,
}

async fn get_global_config(State(state): State<AppState>) -> ApiResult<SrJson<ConfigReply>> {
    let level = global_level(&mut *conn(&state).await?).await?;
    Ok(ok(ConfigReply {
        compatibility_level: level,
    }))
}

async fn put_global_config(
    State(state): State<AppState>,
    Body(request): Body<ConfigRequest>,
) -> ApiResult<SrJson<ConfigUpdateReply>> {
    let level = request.level()?;
    store::set_global_config(&mut *conn(&state).await?, level.as_str()).await?;
    tracing::info!(%level, "set global compatibility level");
    Ok(ok(ConfigUpdateReply {
        compatibility: level,
    }))
}

/// Back to the default level; replies with the level it had.
async fn delete_global_config(State(state): State<AppState>) -> ApiResult<SrJson<ConfigReply>> {
    let old = store::delete_global_config(&mut *conn(&state).await?).await?;
    let level = match old {
        Some(stored) => parse_level(stored)?,
        None => CompatibilityLevel::DEFAULT,
    };
    Ok(ok(ConfigReply {
        compatibility_level: level,
    }))
}

async fn get_subject_config(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<ConfigReply>> {
    let mut conn = conn(&state).await?;
    let level = match store::subject_config(&mut conn, &subject).await? {
        Some(stored) => parse_level(stored)?,
        None if flags.flag("defaultToGlobal") => global_level(&mut conn).await?,
        None => return Err(ApiError::subject_config_not_found(&subject)),
    };
    Ok(ok(ConfigReply {
        compatibility_level: level,
    }))
}

async fn put_subject_config(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    Body(request): Body<ConfigRequest>,
) -> ApiResult<SrJson<ConfigUpdateReply>> {
    let level = request.level()?;
    store::set_subject_config(&mut *conn(&state).await?, &subject, level.as_str()).await?;
    tracing::info!(%subject, %level, "set subject compatibility level");
    Ok(ok(ConfigUpdateReply {
        compatibility: level,
    }))
}

/// Removes the subject's own level (it falls back to the global one); replies with the level it
/// had.
async fn delete_subject_config(
    State(state): State<AppState>,
    Params(subject): Params<String>,
) -> ApiResult<SrJson<ConfigReply>> {
    let mut conn = conn(&state).await?;
    match store::delete_subject_config(&mut conn, &subject).await? {
        Some(stored) => Ok(ok(ConfigReply {
            compatibility_level: parse_level(stored)?,
        })),
        None if store::version_states(&mut conn, &subject).await?.is_empty() => {
            Err(ApiError::subject_not_found(&subject))
        }
        None => Err(ApiError::subject_config_not_found(&subject)),
    }
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
