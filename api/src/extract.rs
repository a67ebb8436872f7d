//! Extractors that turn axum's rejections into problem documents.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The largest request body an endpoint accepts (an extension the router sets from the
/// configuration).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

impl BodyLimit {
    pub const DEFAULT: usize = 64 * 1024;
}

/// A JSON body, strictly parsed (the request types deny unknown fields).
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(parts, bytes) = RawBody::from_request(req, state).await?;
        parse_json(parts, bytes, state).await.map(Self)
    }
}

/// The request's head and its body bytes, read up to the endpoint's size limit (for endpoints
/// that must see the exact bytes, such as signed webhooks, before parsing them with
/// [`parse_json`]).
#[derive(Debug)]
pub struct RawBody(pub Parts, pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(BodyLimit::DEFAULT, |l| l.0);
        let (parts, body) = req.into_parts();
        // Read (up to a bound) past the limit before refusing: answering 413 and closing with
        // unread bytes makes the kernel reset the connection, and the client never sees why.
        let too_large = || {
            ApiError::PayloadTooLarge(format!(
                "the body exceeds the size limit of this endpoint ({limit} bytes)"
            ))
        };
        let bytes = axum::body::to_bytes(body, limit.saturating_mul(16))
            .await
            .map_err(|error| {
                if error.to_string().contains("length limit exceeded") {
                    too_large()
                } else {
                    ApiError::BadRequest(format!("the body could not be read: {error}"))
                }
            })?;
        if bytes.len() > limit {
            return Err(too_large());
        }
        Ok(Self(parts, bytes))
    }
}

/// Parses a body read by [`RawBody`] as strict JSON (content type checked, unknown fields
/// refused by the request types), with the same problems as [`Body`].
pub async fn parse_json<T, S>(
    parts: Parts,
    bytes: axum::body::Bytes,
    state: &S,
) -> Result<T, ApiError>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    let nul = nul_field_in_body(&bytes);
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    match axum::Json::<T>::from_request(req, state).await {
        Ok(_) if nul.is_some() => Err(nul_problem(nul.as_deref().unwrap_or_default())),
        Ok(axum::Json(value)) => Ok(value),
        // A field the shape refuses anyway is reported as such, unless the NUL is the problem.
        Err(JsonRejection::JsonDataError(_)) if nul.is_some() => {
            Err(nul_problem(nul.as_deref().unwrap_or_default()))
        }
        Err(rejection) => Err(json_problem(rejection)),
    }
}

/// The NUL character (`\u0000`) cannot be stored (PostgreSQL's text and jsonb refuse it) and
/// has no place in any field of this API: a client mistake, answered 422 with the field's name.
fn nul_problem(field: &str) -> ApiError {
    ApiError::Unprocessable(format!(
        "`{field}` contains a NUL character (\\u0000), which no field accepts; remove it"
    ))
}

/// The first field (`reason`, `items[0].options[1]`, ...) of a JSON body whose text (or key)
/// holds a NUL character, if the body is JSON at all.
fn nul_field_in_body(bytes: &[u8]) -> Option<String> {
    // Cheap test first: a NUL can only be written as the escape `\u0000` (a raw one is not JSON).
    if !bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    nul_field(&value, String::new())
}

fn nul_field(value: &serde_json::Value, path: String) -> Option<String> {
    use serde_json::Value;
    let named = |path: String| {
        if path.is_empty() {
            "body".to_owned()
        } else {
            path
        }
    };
    match value {
        Value::String(text) if text.contains('\0') => Some(named(path)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_field(item, format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            if key.contains('\0') {
                return Some(named(path.clone()));
            }
            nul_field(item, here)
        }),
        _ => None,
    }
}

/// Whether a percent-encoded path or query carries a NUL character (`%00`).
fn has_encoded_nul(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
}

fn json_problem(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::Unprocessable(format!(
            "the body does not match the expected shape: {}",
            e.body_text()
                .trim_start_matches("Failed to deserialize the JSON body into the target type: ")
        )),
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::BadRequest(format!("the body is not valid JSON: {}", e.body_text()))
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
            "send the body as JSON with `Content-Type: application/json`".to_owned(),
        ),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("the body exceeds the size limit of this endpoint".to_owned())
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// Path parameters.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if has_encoded_nul(parts.uri.path()) {
            return Err(ApiError::BadRequest(
                "the path contains a NUL character (%00), which no identifier accepts; remove it"
                    .to_owned(),
            ));
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Self(v))
            .map_err(|e: PathRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// Query parameters.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(query) = parts.uri.query() {
            if let Some(pair) = query.split('&').find(|pair| has_encoded_nul(pair)) {
                let name = pair.split_once('=').map_or(pair, |(name, _)| name);
                return Err(ApiError::BadRequest(format!(
                    "query parameter `{name}` contains a NUL character (%00), which no \
                     parameter accepts; remove it"
                )));
            }
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|e: QueryRejection| ApiError::BadRequest(e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_holding_a_nul_is_named() {
        let body = br#"{"action":"cancel","by":"Customer","reason":"late\u0000"}"#;
        assert_eq!(nul_field_in_body(body).as_deref(), Some("reason"));
        let body = br#"{"items":[{"item_id":"cola","options":["a","b\u0000"]}]}"#;
        assert_eq!(
            nul_field_in_body(body).as_deref(),
            Some("items[0].options[1]")
        );
        assert_eq!(nul_field_in_body(br#"{"reason":"fine"}"#), None);
        assert!(has_encoded_nul("/ratings/a%00b"));
        assert!(!has_encoded_nul("/ratings/a%20b"));
    }
}
