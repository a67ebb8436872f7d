//! Idempotent retries of mutating requests (`Idempotency-Key`).
//!
//! A client that may send a POST, PUT, PATCH or DELETE twice (a timeout, a dropped connection,
//! a retrying proxy) sends an `Idempotency-Key` header, a value of its own choosing that names
//! one logical operation. [`middleware`] then guarantees:
//!
//! - the same key with the same request gets the first response back (with
//!   `Idempotent-Replayed: true`) and appends nothing;
//! - the same key with a different request (method, path, query or body) is refused with 422;
//! - concurrent duplicates produce one effect: the first claims the key, the others wait for
//!   its response (or get 409 if it takes too long);
//! - a key is forgotten `API_IDEMPOTENCY_TTL_SECONDS` after its response was stored.
//!
//! The keys live in `idempotency_keys` (migration `20261202000002_idempotency.sql`), scoped by
//! the caller ([`CallerScope`]). Only final outcomes are stored: a 2xx, or a 4xx that the same
//! request would get again. A 5xx, a panic, a timeout, and the 4xx that depend on the moment
//! (401, 403, 404, 408, 409, 429) release the key, so a retry acts.
//!
//! The table alone cannot cover a crash between the commit of the events and the storing of
//! the response. So the owner of a key hands the handler an [`IdempotencyKey`], an id derived
//! from the caller, the key and the request: `POST /orders` makes it the new order's id, and
//! every command runs with a repeatable [`CommandContext`] ([`command_context`]), so the event
//! store itself answers a repeat with what the first execution committed.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{OptionalFromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use commands::CommandContext;
use futures::{FutureExt, StreamExt};
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tracing::Instrument;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, Required, ResponseBuilder};
use uuid::Uuid;

use crate::error::ApiError;
use crate::extract::BodyLimit;

/// The request header naming one logical operation.
pub const KEY_HEADER: &str = "idempotency-key";
/// The response header of a stored response sent again.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// The longest key accepted.
pub const MAX_KEY_LENGTH: usize = 255;
/// What a valid key is, as the OpenAPI document states it (printable ASCII, no space at
/// either end: HTTP strips those anyway).
pub const KEY_PATTERN: &str = "^[!-~]([ -~]{0,253}[!-~])?$";

/// The response headers stored with a response and sent again with it.
const STORED_HEADERS: [HeaderName; 3] =
    [header::CONTENT_TYPE, header::LOCATION, header::RETRY_AFTER];

/// Namespace of the ids derived from idempotency keys.
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x6261_636b_626f_6e65_2d69_6465_6d2d_6b79);

/// Who the caller is, as far as idempotency keys go: two callers never share a key. The
/// authentication layer inserts it (role and id) outside [`middleware`]; without it every
/// caller is `anonymous`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerScope(pub String);

impl CallerScope {
    pub const ANONYMOUS: &'static str = "anonymous";
}

/// The id a handler derives what it creates from when the request carries an
/// `Idempotency-Key`: the same for every retry of the same request by the same caller (a
/// request extension set by [`middleware`]; take it as `Option<IdempotencyKey>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyKey(pub Uuid);

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().copied())
    }
}

/// The context of a command issued by a request: repeatable (its command id derived from the
/// request's [`IdempotencyKey`]) when the request carries a key, so that the event store
/// answers a retry with the first execution; otherwise a fresh one.
pub fn command_context(key: Option<IdempotencyKey>, actor: String) -> CommandContext {
    match key {
        Some(IdempotencyKey(id)) => CommandContext::repeatable(actor, &format!("http:{id}")),
        None => CommandContext::new(actor),
    }
}

/// A key is 1 to 255 printable ASCII characters.
pub fn parse_key(value: &HeaderValue) -> Result<&str, ApiError> {
    let bytes = value.as_bytes();
    let valid = (1..=MAX_KEY_LENGTH).contains(&bytes.len())
        && bytes.iter().all(|b| (b' '..=b'~').contains(b))
        && bytes.first() != Some(&b' ')
        && bytes.last() != Some(&b' ');
    match value.to_str() {
        Ok(key) if valid => Ok(key),
        _ => Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters \
             (letters, digits, punctuation, inner spaces), e.g. a UUID; use a new one per \
             operation"
        ))),
    }
}

/// What makes two requests the same: SHA-256 over the method, path, query and body, the body
/// as canonical JSON (object keys sorted, no insignificant white space) when it parses as JSON,
/// else its bytes. Each part is length-prefixed, so no two requests share an encoding.
pub fn fingerprint(method: &Method, path: &str, query: &str, body: &[u8]) -> [u8; 32] {
    fn part(hash: &mut Sha256, bytes: &[u8]) {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    }
    let mut hash = Sha256::new();
    part(&mut hash, method.as_str().as_bytes());
    part(&mut hash, path.as_bytes());
    part(&mut hash, query.as_bytes());
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => {
            let mut canonical = Vec::with_capacity(body.len());
            canonical_json(&value, &mut canonical);
            part(&mut hash, b"json");
            part(&mut hash, &canonical);
        }
        Err(_) => {
            part(&mut hash, b"raw");
            part(&mut hash, body);
        }
    }
    hash.finalize().into()
}

/// Writes `value` with object keys sorted, whatever order `serde_json::Map` keeps.
fn canonical_json(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (name, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(name.clone()).to_string().as_bytes());
                out.push(b':');
                canonical_json(item, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// The id handed to the handler: the same for the same caller, key and request.
fn derived_id(scope: &str, key: &str, fingerprint: &[u8; 32]) -> Uuid {
    let mut name = Vec::with_capacity(16 + scope.len() + key.len() + 32);
    for part in [scope.as_bytes(), key.as_bytes()] {
        name.extend_from_slice(&(part.len() as u64).to_be_bytes());
        name.extend_from_slice(part);
    }
    name.extend_from_slice(fingerprint);
    Uuid::new_v5(&KEY_NAMESPACE, &name)
}

/// Whether a response is the answer the same request would get again (stored and replayed),
/// rather than one that depends on the moment (the key is released so a retry acts).
pub fn is_final(status: StatusCode) -> bool {
    status.is_success()
        || (status.is_client_error()
            && !matches!(status.as_u16(), 401 | 403 | 404 | 408 | 409 | 429))
}

/// The idempotency store and its settings (the state of [`middleware`]).
#[derive(Debug, Clone)]
pub struct Idempotency {
    pool: PgPool,
    ttl: Duration,
    request_timeout: Duration,
}

/// One request's claim on a key.
#[derive(Debug)]
struct Claim {
    scope: String,
    key: String,
    fingerprint: [u8; 32],
}

/// A row of another request with the same key.
#[derive(Debug, sqlx::FromRow)]
struct Existing {
    fingerprint: Vec<u8>,
    state: String,
    status: Option<i16>,
    headers: Option<serde_json::Value>,
    body: Option<Vec<u8>>,
    expired: bool,
}

impl Idempotency {
    /// Keys expire `ttl` after their response was stored; an `in_flight` claim older than twice
    /// `request_timeout` belongs to a process that died.
    pub fn new(pool: PgPool, ttl: Duration, request_timeout: Duration) -> Self {
        Self {
            pool,
            ttl,
            request_timeout,
        }
    }

    fn stale_after(&self) -> Duration {
        self.request_timeout.saturating_mul(2)
    }

    /// Takes the key, or takes over a row that expired or whose owner died (same request
    /// only). `Some(claimed_at)` when this request owns it now.
    async fn claim(&self, claim: &Claim) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO idempotency_keys AS k (scope, key, fingerprint, state, created_at, expires_at) \
             VALUES ($1, $2, $3, 'in_flight', clock_timestamp(), \
                     clock_timestamp() + make_interval(secs => $4)) \
             ON CONFLICT (scope, key) DO UPDATE \
             SET fingerprint = excluded.fingerprint, state = 'in_flight', status = NULL, \
                 headers = NULL, body = NULL, created_at = excluded.created_at, \
                 expires_at = excluded.expires_at \
             WHERE (k.expires_at <= clock_timestamp() \
                    AND (k.state = 'done' \
                         OR k.created_at < clock_timestamp() - make_interval(secs => $5))) \
                OR (k.state = 'in_flight' \
                    AND k.created_at < clock_timestamp() - make_interval(secs => $5) \
                    AND k.fingerprint = excluded.fingerprint) \
             RETURNING created_at",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(&claim.fingerprint[..])
        .bind(self.ttl.as_secs_f64())
        .bind(self.stale_after().as_secs_f64())
        .fetch_optional(&self.pool)
        .await
    }

    async fn existing(&self, claim: &Claim) -> Result<Option<Existing>, sqlx::Error> {
        sqlx::query_as(
            "SELECT fingerprint, state, status, headers, body, \
                    expires_at <= clock_timestamp() AS expired \
             FROM idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .fetch_optional(&self.pool)
        .await
    }

    async fn store(
        &self,
        claim: &Claim,
        claimed_at: DateTime<Utc>,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), sqlx::Error> {
        let stored: serde_json::Map<String, serde_json::Value> = STORED_HEADERS
            .iter()
            .filter_map(|name| {
                let value = headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_owned(), value.into()))
            })
            .collect();
        sqlx::query(
            "UPDATE idempotency_keys \
             SET state = 'done', status = $4, headers = $5, body = $6, \
                 expires_at = clock_timestamp() + make_interval(secs => $7) \
             WHERE scope = $1 AND key = $2 AND created_at = $3 AND state = 'in_flight'",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(claimed_at)
        .bind(i16::try_from(status.as_u16()).unwrap_or(i16::MAX))
        .bind(serde_json::Value::Object(stored))
        .bind(body)
        .bind(self.ttl.as_secs_f64())
        .execute(&self.pool)
        .await
        .map(drop)
    }

    async fn release(&self, claim: &Claim, claimed_at: DateTime<Utc>) {
        let released = sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE scope = $1 AND key = $2 AND created_at = $3 AND state = 'in_flight'",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(claimed_at)
        .execute(&self.pool)
        .await;
        if let Err(error) = released {
            // The claim stays until it is stale (twice the request timeout); then a retry acts.
            tracing::warn!(%error, "could not release an idempotency key");
        }
    }

    /// Deletes the keys that expired (never an `in_flight` claim that may still be running).
    pub async fn purge_expired(&self) -> Result<u64, sqlx::Error> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE expires_at <= clock_timestamp() \
             AND (state = 'done' OR created_at < clock_timestamp() - make_interval(secs => $1))",
        )
        .bind(self.stale_after().as_secs_f64())
        .execute(&self.pool)
        .await
        .map(|done| done.rows_affected())
    }

    /// Purges expired keys every `every`, for as long as the process runs.
    pub async fn purge_every(self, every: Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match self.purge_expired().await {
                Ok(purged) => tracing::debug!(purged, "expired idempotency keys purged"),
                Err(error) => tracing::warn!(%error, "could not purge expired idempotency keys"),
            }
        }
    }

    /// Runs the request as the owner of its key, in a task of its own: the outcome is stored
    /// (or the key released) even if the client goes away or the request times out meanwhile.
    async fn run_as_owner(
        self,
        claim: Claim,
        claimed_at: DateTime<Utc>,
        mut request: Request,
        next: Next,
    ) -> Response {
        request.extensions_mut().insert(IdempotencyKey(derived_id(
            &claim.scope,
            &claim.key,
            &claim.fingerprint,
        )));
        let owner = async move {
            let outcome = tokio::time::timeout(
                self.request_timeout,
                AssertUnwindSafe(next.run(request)).catch_unwind(),
            )
            .await;
            let response = match outcome {
                Ok(Ok(response)) => response,
                Ok(Err(_panic)) => {
                    self.release(&claim, claimed_at).await;
                    return ApiError::Internal("the handler panicked".to_owned()).into_response();
                }
                Err(_elapsed) => {
                    self.release(&claim, claimed_at).await;
                    return ApiError::timed_out(self.request_timeout).into_response();
                }
            };
            if !is_final(response.status()) {
                self.release(&claim, claimed_at).await;
                return response;
            }
            let (parts, body) = response.into_parts();
            let body = match axum::body::to_bytes(body, usize::MAX).await {
                Ok(body) => body,
                Err(error) => {
                    self.release(&claim, claimed_at).await;
                    return ApiError::internal(format!("response body: {error}")).into_response();
                }
            };
            if let Err(error) = self
                .store(&claim, claimed_at, parts.status, &parts.headers, &body)
                .await
            {
                // The response still goes out; a retry finds the claim stale later and is
                // answered by the event store (the derived ids) instead of the table.
                tracing::warn!(%error, "could not store an idempotent response");
            }
            Response::from_parts(parts, Body::from(body))
        };
        match tokio::spawn(owner.instrument(tracing::Span::current())).await {
            Ok(response) => response,
            Err(error) => {
                ApiError::internal(format!("idempotent request task: {error}")).into_response()
            }
        }
    }
}

/// Sends a stored response again.
fn replay(existing: Existing) -> Response {
    let status = existing
        .status
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = Response::new(Body::from(existing.body.unwrap_or_default()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(serde_json::Value::Object(stored)) = existing.headers {
        for (name, value) in stored {
            let (Ok(name), Some(Ok(value))) = (
                HeaderName::try_from(name.as_str()),
                value.as_str().map(HeaderValue::from_str),
            ) else {
                continue;
            };
            headers.insert(name, value);
        }
    }
    headers.insert(
        HeaderName::from_static(REPLAYED_HEADER),
        HeaderValue::from_static("true"),
    );
    response
}

/// A request body read into memory, unless it is larger than the bound.
enum Buffered {
    Complete(Bytes),
    /// Larger than the bound: the body as it came (what was read, then the rest).
    TooLarge(Body),
}

async fn buffer(body: Body, headers: &HeaderMap, bound: usize) -> Result<Buffered, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > bound as u64) {
        return Ok(Buffered::TooLarge(body));
    }
    let mut stream = body.into_data_stream();
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::BadRequest(format!("the body could not be read: {error}"))
        })?;
        read.extend_from_slice(&chunk);
        if read.len() > bound {
            let head = futures::stream::once(async move { Ok(Bytes::from(read)) });
            return Ok(Buffered::TooLarge(Body::from_stream(head.chain(stream))));
        }
    }
    Ok(Buffered::Complete(Bytes::from(read)))
}

fn is_mutating(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

fn counted(outcome: &'static str) {
    metrics::counter!("idempotent_requests_total", "outcome" => outcome).increment(1);
}

/// The middleware: acts on POST, PUT, PATCH and DELETE requests with an `Idempotency-Key`
/// (see the module documentation); every other request passes through untouched.
pub async fn middleware(
    State(store): State<Idempotency>,
    request: Request,
    next: Next,
) -> Response {
    if !is_mutating(request.method()) {
        return next.run(request).await;
    }
    let mut keys = request.headers().get_all(KEY_HEADER).iter();
    let key = match (keys.next(), keys.next()) {
        (None, _) => return next.run(request).await,
        (Some(value), None) => match parse_key(value) {
            Ok(key) => key.to_owned(),
            Err(problem) => return problem.into_response(),
        },
        (Some(_), Some(_)) => {
            return ApiError::BadRequest("send one Idempotency-Key header, not several".to_owned())
                .into_response()
        }
    };
    let scope = request
        .extensions()
        .get::<CallerScope>()
        .map_or(CallerScope::ANONYMOUS, |scope| scope.0.as_str())
        .to_owned();
    // Bounded like the `Body` extractor: a body it would refuse anyway passes on, without
    // idempotency, so that the handler answers 413.
    let limit = request
        .extensions()
        .get::<BodyLimit>()
        .map_or(BodyLimit::DEFAULT, |limit| limit.0);
    let (parts, body) = request.into_parts();
    let body = match buffer(body, &parts.headers, limit.saturating_mul(16)).await {
        Ok(Buffered::Complete(body)) => body,
        Ok(Buffered::TooLarge(body)) => return next.run(Request::from_parts(parts, body)).await,
        Err(problem) => return problem.into_response(),
    };
    let claim = Claim {
        fingerprint: fingerprint(
            &parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or_default(),
            &body,
        ),
        scope,
        key,
    };
    // A duplicate waits for the first request's response, but answers before the request
    // timeout would.
    let deadline = tokio::time::Instant::now() + store.request_timeout.mul_f64(0.8);
    loop {
        match store.claim(&claim).await {
            Ok(Some(claimed_at)) => {
                counted("executed");
                let request = Request::from_parts(parts, Body::from(body));
                return store.run_as_owner(claim, claimed_at, request, next).await;
            }
            Ok(None) => {}
            Err(error) => return ApiError::failed(&error).into_response(),
        }
        match store.existing(&claim).await {
            Err(error) => return ApiError::failed(&error).into_response(),
            // Released or expired since: claim it again at once.
            Ok(None) => continue,
            Ok(Some(existing)) if existing.expired && existing.state == "done" => continue,
            Ok(Some(existing)) if existing.fingerprint[..] != claim.fingerprint[..] => {
                counted("refused");
                return ApiError::Unprocessable(
                    "this Idempotency-Key was used with a different request; use a new key for \
                     a new request"
                        .to_owned(),
                )
                .into_response();
            }
            Ok(Some(existing)) if existing.state == "done" => {
                counted("replayed");
                return replay(existing);
            }
            Ok(Some(_in_flight)) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            counted("in_progress");
            return ApiError::Conflict(
                "a request with this key is still in progress; retry".to_owned(),
            )
            .into_response();
        }
        let pause = Duration::from_millis(rand::rng().random_range(25..=50));
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
    }
}

/// Documents the `Idempotency-Key` header on every POST, PUT, PATCH and DELETE operation, with
/// the answers it can bring (400, 409, 422) where the operation does not document them yet.
#[derive(Debug)]
pub struct IdempotencyDoc;

impl utoipa::Modify for IdempotencyDoc {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                document(operation);
            }
        }
    }
}

fn document(operation: &mut Operation) {
    let parameter = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "Names one logical operation, so that the request can be retried safely: the same \
             key with the same request returns the first response (header \
             `Idempotent-Replayed: true`) and changes nothing; with a different request it is \
             refused (422). 1 to 255 printable ASCII characters, e.g. a UUID.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_KEY_LENGTH))
                .pattern(Some(KEY_PATTERN)),
        ))
        .build();
    operation
        .parameters
        .get_or_insert_with(Vec::new)
        .push(parameter);
    for (status, description) in [
        (
            "400",
            "Malformed request (including an invalid Idempotency-Key)",
        ),
        (
            "409",
            "A request with the same Idempotency-Key is still in progress; retry",
        ),
        (
            "422",
            "The Idempotency-Key was used with a different request",
        ),
    ] {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| {
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/problem+json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("Problem")))
                            .build(),
                    )
                    .build()
                    .into()
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(raw: &[u8]) -> Result<String, ApiError> {
        let value = HeaderValue::from_bytes(raw).expect("a header value");
        parse_key(&value).map(str::to_owned)
    }

    #[test]
    fn a_key_of_printable_ascii_up_to_255_characters_is_accepted() {
        assert_eq!(key(b"a").expect("valid"), "a");
        assert!(key(b"0b6f0c3e-6d5f-4a47-9f0e-3c8d1d0f2a11").is_ok());
        assert!(key(b"order 42/retry#1 ~!").is_ok());
        assert!(key("k".repeat(255).as_bytes()).is_ok());
    }

    #[test]
    fn an_empty_long_or_non_printable_key_is_refused_with_what_a_valid_key_is() {
        for raw in [
            &b""[..],
            "k".repeat(256).as_bytes(),
            b"tab\there",
            "caf\u{e9}".as_bytes(),
            b" leading",
        ] {
            let error = key(raw).expect_err("invalid");
            assert!(matches!(error, ApiError::BadRequest(_)), "{raw:?}");
            assert!(
                error.to_string().contains("1 to 255 printable ASCII"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_documented_pattern_accepts_exactly_the_keys_the_check_accepts() {
        let pattern = regex_lite::Regex::new(KEY_PATTERN).expect("a valid pattern");
        let mut samples: Vec<Vec<u8>> = vec![
            b"a".to_vec(),
            b"~".to_vec(),
            b"a b".to_vec(),
            b"0b6f0c3e-6d5f-4a47-9f0e-3c8d1d0f2a11".to_vec(),
            b"".to_vec(),
            b" a".to_vec(),
            b"a ".to_vec(),
            b" ".to_vec(),
            b"a\tb".to_vec(),
            b"k".repeat(255),
            b"k".repeat(256),
            "caf\u{e9}".as_bytes().to_vec(),
        ];
        samples.extend((0x20..=0x7e_u8).map(|b| vec![b'x', b, b'x']));
        samples.extend((0x20..=0x7e_u8).map(|b| vec![b]));
        for sample in samples {
            let text = String::from_utf8_lossy(&sample);
            let checked = HeaderValue::from_bytes(&sample)
                .ok()
                .is_some_and(|value| parse_key(&value).is_ok());
            assert_eq!(pattern.is_match(&text), checked, "{text:?}");
        }
    }

    #[test]
    fn json_bodies_with_the_same_content_have_the_same_fingerprint() {
        let a = br#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#;
        let b = br#"{"a":{"x":"s","y":[1,2]},"b":1}"#;
        assert_eq!(
            fingerprint(&Method::POST, "/orders", "", a),
            fingerprint(&Method::POST, "/orders", "", b)
        );
    }

    #[test]
    fn a_different_body_method_path_or_query_changes_the_fingerprint() {
        let base = fingerprint(&Method::POST, "/orders", "", br#"{"a":1}"#);
        assert_ne!(
            base,
            fingerprint(&Method::POST, "/orders", "", br#"{"a":2}"#)
        );
        assert_ne!(
            base,
            fingerprint(&Method::PUT, "/orders", "", br#"{"a":1}"#)
        );
        assert_ne!(
            base,
            fingerprint(&Method::POST, "/orderz", "", br#"{"a":1}"#)
        );
        assert_ne!(
            base,
            fingerprint(&Method::POST, "/orders", "x=1", br#"{"a":1}"#)
        );
        // Array order is meaningful.
        assert_ne!(
            fingerprint(&Method::POST, "/o", "", b"[1,2]"),
            fingerprint(&Method::POST, "/o", "", b"[2,1]")
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_fingerprinted_by_its_bytes() {
        let a = fingerprint(&Method::POST, "/orders", "", b"{not json");
        assert_eq!(a, fingerprint(&Method::POST, "/orders", "", b"{not json"));
        assert_ne!(a, fingerprint(&Method::POST, "/orders", "", b"{not  json"));
        // The parts are length-prefixed: moving bytes between them changes the fingerprint.
        assert_ne!(
            fingerprint(&Method::POST, "/ab", "", b"c"),
            fingerprint(&Method::POST, "/a", "", b"bc")
        );
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_escapes_them() {
        let value: serde_json::Value =
            serde_json::from_str(r#"{"z": {"b": 1, "a": null}, "\"q": [true, 1.5]}"#)
                .expect("json");
        let mut out = Vec::new();
        canonical_json(&value, &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            r#"{"\"q":[true,1.5],"z":{"a":null,"b":1}}"#
        );
    }

    #[test]
    fn the_derived_id_depends_on_caller_key_and_request() {
        let f = fingerprint(&Method::POST, "/orders", "", b"{}");
        let g = fingerprint(&Method::POST, "/orders", "", b"[]");
        let id = derived_id("anonymous", "k1", &f);
        assert_eq!(id, derived_id("anonymous", "k1", &f));
        assert_ne!(id, derived_id("customer:1", "k1", &f));
        assert_ne!(id, derived_id("anonymous", "k2", &f));
        assert_ne!(id, derived_id("anonymous", "k1", &g));
    }

    #[test]
    fn only_answers_the_same_request_would_get_again_are_final() {
        for status in [200, 201, 202, 204, 400, 413, 415, 422] {
            assert!(
                is_final(StatusCode::from_u16(status).expect("status")),
                "{status}"
            );
        }
        for status in [401, 403, 404, 408, 409, 429, 500, 503, 302] {
            assert!(
                !is_final(StatusCode::from_u16(status).expect("status")),
                "{status}"
            );
        }
    }

    #[test]
    fn every_mutating_operation_documents_the_header_and_its_problems() {
        use utoipa::OpenApi;
        let doc = crate::ApiDoc::openapi();
        let mut mutating = 0;
        for (path, item) in &doc.paths.paths {
            for operation in [&item.post, &item.put, &item.patch, &item.delete]
                .into_iter()
                .flatten()
            {
                mutating += 1;
                let parameters = operation.parameters.as_deref().unwrap_or_default();
                assert_eq!(
                    parameters
                        .iter()
                        .filter(|p| p.name == "Idempotency-Key")
                        .count(),
                    1,
                    "{path}"
                );
                for status in ["400", "409", "422"] {
                    assert!(
                        operation.responses.responses.contains_key(status),
                        "{path} {status}"
                    );
                }
            }
            if let Some(get) = &item.get {
                assert!(
                    get.parameters
                        .as_deref()
                        .unwrap_or_default()
                        .iter()
                        .all(|p| p.name != "Idempotency-Key"),
                    "{path}"
                );
            }
        }
        assert!(mutating >= 10, "{mutating} mutating operations");
    }
}
