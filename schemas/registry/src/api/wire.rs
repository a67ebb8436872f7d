//! Replies with the registry's media type, the extractors that turn any malformed request into a
//! Confluent error, and the request and reply bodies.

use super::*;

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

pub(super) fn ok<T: Serialize>(body: T) -> SrJson<T> {
    SrJson(StatusCode::OK, body)
}

/// A schema text as the body of the reply (the `/schema` endpoints).
pub(super) fn raw_schema(text: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        text,
    )
        .into_response()
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// Path parameters; a parameter that cannot be decoded is a Confluent 404.
#[derive(Debug)]
pub(super) struct Params<T>(pub(super) T);

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
pub(super) struct Flags(pub(super) HashMap<String, String>);

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
    pub(super) fn flag(&self, name: &str) -> bool {
        self.0
            .get(name)
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"))
    }

    pub(super) fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A numeric parameter; absent or not a number gives the default.
    pub(super) fn number(&self, name: &str, default: i64) -> i64 {
        self.text(name)
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(default)
    }
}

/// The largest request body the registry accepts (as Confluent's default).
pub(super) const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// How much of a too-large body is read anyway, so that the 413 reaches the client.
pub(super) const DRAIN_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A JSON request body, whatever the content type.
#[derive(Debug)]
pub(super) struct Body<T>(pub(super) T);

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
pub(super) enum VersionSpec {
    Latest,
    Number(i32),
}

impl VersionSpec {
    pub(super) fn parse(text: &str) -> ApiResult<Self> {
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
pub(super) struct SchemaRequest {
    pub(super) schema: Option<String>,
    pub(super) schema_type: Option<String>,
    pub(super) references: Option<Vec<SchemaReference>>,
}

/// A subject version in a reply.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SubjectVersionReply {
    pub(super) subject: String,
    pub(super) version: i32,
    pub(super) id: i32,
    #[serde(skip_serializing_if = "is_avro")]
    pub(super) schema_type: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) references: Vec<SchemaReference>,
    pub(super) schema: String,
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

pub(super) fn is_avro(schema_type: &str) -> bool {
    schema_type == AVRO
}
