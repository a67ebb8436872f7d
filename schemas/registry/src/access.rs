//! Who may change the contracts: HTTP Basic credentials for every write.
//!
//! A registry anyone can write to lets anyone break the event pipeline: register a schema the
//! relay then refuses, set compatibility `NONE`, or permanently delete a subject so consumers
//! cannot decode. So every request that changes something (registering a version, changing a
//! config, deleting) needs `Authorization: Basic <base64(user:password)>` with the credentials
//! of `REGISTRY_BASIC_AUTH`, as Confluent clients send them (`basic.auth.user.info`,
//! `SCHEMA_REGISTRY_BASIC_AUTH` of our own clients). Reads (look-ups, listings, compatibility
//! checks, which change nothing) are open while `REGISTRY_ANONYMOUS_READS` is true (the
//! default: contracts are not secret, and any Confluent-format tool must be able to decode the
//! topics); otherwise they need the same credentials. `/health` is always open.
//!
//! Refusals are Confluent errors: `401` (`{"error_code": 401, ...}`) with
//! `WWW-Authenticate: Basic realm="schema-registry"`.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::error::ApiError;

/// The credentials writers (and, with closed reads, readers) must present. `Debug` hides them.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Parses `user:password` (the password may contain `:`; neither part may be empty).
    pub fn parse(user_info: &str) -> Option<Self> {
        let (user, password) = user_info.split_once(':')?;
        if user.is_empty() || password.is_empty() {
            return None;
        }
        Some(Self {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// Whether an `Authorization` header value carries these credentials (constant time in the
    /// contents, so a guess learns nothing from the timing).
    fn accepts(&self, authorization: &HeaderValue) -> bool {
        let Some(encoded) = authorization.to_str().ok().and_then(|value| {
            value
                .strip_prefix("Basic ")
                .or(value.strip_prefix("basic "))
        }) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let expected = format!("{}:{}", self.user, self.password);
        constant_time_eq(&decoded, expected.as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The access rules of one registry.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    pub credentials: Credentials,
    /// Reads need no credentials.
    pub anonymous_reads: bool,
}

/// Whether a request changes nothing: every `GET`/`HEAD`, and the two `POST`s that only ask
/// (look up a schema under a subject, test compatibility).
fn is_read(method: &Method, path: &str) -> bool {
    if method == Method::GET || method == Method::HEAD {
        return true;
    }
    if method != Method::POST {
        return false;
    }
    if path.starts_with("/compatibility/") {
        return true;
    }
    // `POST /subjects/{subject}` looks up; `POST /subjects/{subject}/versions` registers.
    path.strip_prefix("/subjects/")
        .is_some_and(|rest| !rest.trim_end_matches('/').contains('/'))
}

/// Refuses a write (or, with closed reads, any request but `/health`) without the credentials.
pub(crate) async fn require_credentials(
    State(policy): State<std::sync::Arc<AccessPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let open = path == "/health" || (policy.anonymous_reads && is_read(request.method(), path));
    if open {
        return next.run(request).await;
    }
    match request.headers().get(header::AUTHORIZATION) {
        Some(value) if policy.credentials.accepts(value) => next.run(request).await,
        presented => {
            let message = if presented.is_some() {
                "Unauthorized: the credentials are wrong; send the registry's user and password \
                 with HTTP Basic authentication"
            } else if is_read(request.method(), path) {
                "Unauthorized: this registry needs credentials for every request; send its user \
                 and password with HTTP Basic authentication (basic.auth.user.info)"
            } else {
                "Unauthorized: changing schemas, configs or subjects needs credentials; send the \
                 registry's user and password with HTTP Basic authentication \
                 (basic.auth.user.info)"
            };
            let mut response = ApiError::new(401, message).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"schema-registry\""),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_asking_posts_are_reads() {
        assert!(is_read(&Method::GET, "/subjects/a/versions"));
        assert!(is_read(&Method::POST, "/subjects/orders-value"));
        assert!(is_read(&Method::POST, "/compatibility/subjects/a/versions"));
        assert!(!is_read(&Method::POST, "/subjects/orders-value/versions"));
        assert!(!is_read(&Method::PUT, "/config/orders-value"));
        assert!(!is_read(&Method::DELETE, "/subjects/orders-value"));
    }

    #[test]
    fn credentials_parse_with_colons_in_the_password_and_hide_it() {
        let credentials = Credentials::parse("relay:s3:cret").expect("parses");
        let header = HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("relay:s3:cret")
        ))
        .expect("header");
        assert!(credentials.accepts(&header));
        assert!(!format!("{credentials:?}").contains("s3:cret"));
        assert!(Credentials::parse("nopassword").is_none());
        assert!(Credentials::parse(":x").is_none());
    }
}
