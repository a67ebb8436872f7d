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

mod doc;

pub use doc::*;

mod middleware;

pub use middleware::*;

mod store;

pub use store::*;

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
