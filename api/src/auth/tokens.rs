//! Bearer tokens: their settings (`AUTH_*`), the verification of a token into a [`Principal`], and the middleware that authenticates each request.

use super::*;

/// The token settings (`AUTH_*`), part of [`crate::ApiConfig`].
#[derive(Debug, Clone, Deserialize)]
pub struct AuthConfig {
    /// `AUTH_JWT_ALGORITHM`: `HS256` (default; shared secret), `RS256` or `ES256` (public key).
    #[serde(default = "default_algorithm")]
    pub auth_jwt_algorithm: String,
    /// `AUTH_JWT_SECRET`: the HS256 secret, at least 32 bytes. Never logged.
    #[serde(default)]
    pub auth_jwt_secret: Option<Secret>,
    /// `AUTH_JWT_PUBLIC_KEY_FILE`: PEM public key for RS256/ES256.
    #[serde(default)]
    pub auth_jwt_public_key_file: Option<PathBuf>,
    /// `AUTH_JWT_ISSUER`: the required `iss` (default `order-backbone`).
    #[serde(default = "default_issuer")]
    pub auth_jwt_issuer: String,
    /// `AUTH_JWT_AUDIENCE`: the required `aud` (default `order-backbone-api`).
    #[serde(default = "default_audience")]
    pub auth_jwt_audience: String,
    /// `AUTH_CLOCK_SKEW_SECONDS`: tolerated difference between clocks for `exp`/`nbf` (default 30).
    #[serde(default = "default_skew")]
    pub auth_clock_skew_seconds: u64,
    /// `AUTH_MAX_TOKEN_LIFETIME_SECONDS`: the longest a token may still be valid for, counted
    /// from now (and from its `iat`, if it has one); a token expiring later is refused, so a
    /// leaked token with `exp` far in the future is worthless (default 86400, a day).
    #[serde(default = "default_max_lifetime")]
    pub auth_max_token_lifetime_seconds: u64,
}

pub(super) const fn default_max_lifetime() -> u64 {
    86_400
}

pub(super) fn default_algorithm() -> String {
    "HS256".to_owned()
}
pub(super) fn default_issuer() -> String {
    "order-backbone".to_owned()
}
pub(super) fn default_audience() -> String {
    "order-backbone-api".to_owned()
}
pub(super) const fn default_skew() -> u64 {
    30
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            auth_jwt_algorithm: default_algorithm(),
            auth_jwt_secret: None,
            auth_jwt_public_key_file: None,
            auth_jwt_issuer: default_issuer(),
            auth_jwt_audience: default_audience(),
            auth_max_token_lifetime_seconds: default_max_lifetime(),
            auth_clock_skew_seconds: default_skew(),
        }
    }
}

/// A secret setting: its `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The smallest HS256 secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// Why the token settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("AUTH_JWT_ALGORITHM `{0}` is not supported: use HS256, RS256 or ES256")]
    Algorithm(String),
    #[error("AUTH_JWT_SECRET is required for HS256 and must be at least {MIN_SECRET_BYTES} bytes")]
    Secret,
    #[error("AUTH_JWT_PUBLIC_KEY_FILE is required for {0}")]
    MissingKey(&'static str),
    #[error("AUTH_JWT_PUBLIC_KEY_FILE {path}: {reason}")]
    Key { path: String, reason: String },
}

/// The claims of a backbone token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub role: Role,
    pub exp: i64,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub iss: String,
    pub aud: String,
}

impl Claims {
    /// Claims for `role`/`subject`, valid from now for `ttl_seconds`, for `config`'s issuer and
    /// audience.
    pub fn new(config: &AuthConfig, role: Role, subject: Uuid, ttl_seconds: i64) -> Self {
        let now = chrono::Utc::now().timestamp();
        Self {
            sub: subject,
            role,
            exp: now + ttl_seconds,
            iat: now,
            nbf: None,
            iss: config.auth_jwt_issuer.clone(),
            aud: config.auth_jwt_audience.clone(),
        }
    }
}

/// The claims read from a token being verified: `aud` and `iss` are checked by the validation
/// (an `aud` may be one string or an array, RFC 7519 4.1.3), so they are not read here.
#[derive(Debug, Deserialize)]
pub(super) struct VerifiedClaims {
    sub: Uuid,
    role: Role,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    max_lifetime: i64,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

pub(super) fn algorithm(name: &str) -> Result<Algorithm, AuthConfigError> {
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(AuthConfigError::Algorithm(other.to_owned())),
    }
}

pub(super) fn hs256_secret(config: &AuthConfig) -> Result<&[u8], AuthConfigError> {
    match &config.auth_jwt_secret {
        Some(secret) if secret.0.len() >= MIN_SECRET_BYTES => Ok(secret.0.as_bytes()),
        _ => Err(AuthConfigError::Secret),
    }
}

impl Authenticator {
    /// Fails fast on a missing or unusable key.
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let algorithm = algorithm(&config.auth_jwt_algorithm)?;
        let key = match algorithm {
            Algorithm::HS256 => DecodingKey::from_secret(hs256_secret(config)?),
            Algorithm::RS256 | Algorithm::ES256 => {
                let name = if algorithm == Algorithm::RS256 {
                    "RS256"
                } else {
                    "ES256"
                };
                let path = config
                    .auth_jwt_public_key_file
                    .as_ref()
                    .ok_or(AuthConfigError::MissingKey(name))?;
                let key_error = |reason: String| AuthConfigError::Key {
                    path: path.display().to_string(),
                    reason,
                };
                let pem = std::fs::read(path).map_err(|e| key_error(e.to_string()))?;
                if algorithm == Algorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ec_pem(&pem)
                }
                .map_err(|e| key_error(e.to_string()))?
            }
            _ => {
                return Err(AuthConfigError::Algorithm(
                    config.auth_jwt_algorithm.clone(),
                ))
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.auth_clock_skew_seconds;
        validation.validate_nbf = true;
        validation.set_issuer(&[config.auth_jwt_issuer.as_str()]);
        validation.set_audience(&[config.auth_jwt_audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Ok(Self {
            key,
            validation,
            max_lifetime: i64::try_from(config.auth_max_token_lifetime_seconds).unwrap_or(i64::MAX),
        })
    }

    /// The caller a token proves, or why it proves nothing (said to the client, with no secret).
    pub fn verify(&self, token: &str) -> Result<Principal, String> {
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<VerifiedClaims>(token, &self.key, &self.validation) {
            Ok(data) => {
                let claims = data.claims;
                let leeway = i64::try_from(self.validation.leeway).unwrap_or(0);
                let now = chrono::Utc::now().timestamp();
                let from = claims.iat.map_or(now, |iat| iat.min(now));
                if claims.exp.saturating_sub(from) > self.max_lifetime.saturating_add(leeway) {
                    return Err(format!(
                        "the token is valid for longer than this API accepts (at most {} s from \
                         its issue); get one with a shorter lifetime",
                        self.max_lifetime
                    ));
                }
                Ok(Principal {
                    role: claims.role,
                    subject: claims.sub,
                })
            }
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired; get a new one".to_owned(),
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
                ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
                ErrorKind::InvalidAlgorithm => {
                    "the token is not signed with the algorithm this API accepts".to_owned()
                }
                ErrorKind::InvalidIssuer => "the token was issued by someone else (iss)".to_owned(),
                ErrorKind::InvalidAudience => "the token is for another audience (aud)".to_owned(),
                ErrorKind::MissingRequiredClaim(claim) => {
                    format!("the token lacks the `{claim}` claim")
                }
                _ => "the token is malformed (expected a signed JWT with sub, role, exp, iss and aud)"
                    .to_owned(),
            }),
        }
    }
}

/// Signs development tokens with the HS256 secret (`mint-token`, the tests, `run-backbone`).
pub fn mint_hs256(config: &AuthConfig, claims: &Claims) -> Result<String, AuthConfigError> {
    let key = EncodingKey::from_secret(hs256_secret(config)?);
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .map_err(|_| AuthConfigError::Secret)
}

/// The layer on the whole router: a request with an `Authorization` header is authenticated
/// here (a bad token is a 401 whatever the route); the [`Principal`] it proves goes into the
/// request's extensions for the handlers and the layers inside (rate limit, idempotency).
pub async fn authenticate(
    State((authenticator, limiter)): State<(
        Arc<Authenticator>,
        Option<Arc<crate::limits::ClientLimiter>>,
    )>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return next.run(request).await;
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let principal = match token {
        Some(token) if !token.is_empty() => authenticator.verify(token),
        _ => Err("send the token as `Authorization: Bearer <token>`".to_owned()),
    };
    match principal {
        Ok(principal) => {
            // Idempotency keys are the caller's own: the same key from two callers is two keys.
            request
                .extensions_mut()
                .insert(crate::idempotency::CallerScope(principal.actor()));
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(reason) => {
            // A bad token counts against its peer's rate limit (the limiter inside only sees
            // requests that authenticated), so token guessing is throttled too.
            if let Some(limiter) = &limiter {
                if let Err(retry_after_secs) = limiter.check(&crate::limits::peer_key(&request)) {
                    return crate::limits::too_many(retry_after_secs);
                }
            }
            ApiError::Unauthorized(reason).into_response()
        }
    }
}
