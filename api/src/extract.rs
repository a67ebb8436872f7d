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
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    match axum::Json::<T>::from_request(req, state).await {
        Ok(axum::Json(value)) => Ok(value),
        Err(rejection) => Err(json_problem(rejection)),
    }
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
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|e: QueryRejection| ApiError::BadRequest(e.body_text()))
    }
}
