//! The payment provider's webhooks. Providers repeat webhooks (one large platform retries up
//! to seven times): each carries the provider's event id, and the payment aggregate records
//! every id it has seen, so a repeat changes nothing.
//!
//! **Authentication** is the signature, not a token: the provider signs each request with the
//! shared secret (`PAYMENTS_WEBHOOK_SECRET`) as
//! `Backbone-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`, the
//! scheme the backbone's own notification webhooks use ([`projections::notifier`]). A missing,
//! malformed or wrong signature, or a timestamp further than `PAYMENTS_WEBHOOK_TOLERANCE_SECONDS`
//! from now (a replay), is a 401 and nothing is recorded. The body is verified byte for byte
//! before it is parsed.
//!
//! **A signature is bound to its order**: the signed body names the order (`order_id`), and a
//! body posted to another order's path is refused (401) like a wrong signature, so a captured
//! webhook cannot void or refund any other order.
//!
//! [`authenticate_webhooks`] does all of this in front of the idempotency layer and before the
//! size check: a request that fails to authenticate is answered 401 and stores nothing under its
//! `Idempotency-Key`; an authenticated one uses the provider's own key space
//! ([`PROVIDER_SCOPE`]), never the anonymous one.

use axum::extract::State;
use axum::http::HeaderMap;
use domain::payment::{PaymentCommand, WebhookKind};
use domain::{Currency, Money};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Secret;
use crate::error::{command_error, ApiError, Problem};
use crate::extract::{parse_json, PathParams, RawBody};
use crate::idempotency::IdempotencyKey;
use crate::orders::{context, parse_order_id};
use crate::AppState;

pub use projections::notifier::SIGNATURE_HEADER;

/// Checks providers' webhook signatures.
#[derive(Debug)]
pub struct WebhookVerifier {
    secret: Secret,
    tolerance: std::time::Duration,
}

impl WebhookVerifier {
    pub fn new(secret: Secret, tolerance_seconds: i64) -> Self {
        Self {
            secret,
            tolerance: std::time::Duration::from_secs(tolerance_seconds.unsigned_abs()),
        }
    }

    /// The signature header of a request whose raw body is `body`, checked now.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
        use projections::notifier::{verify_signature, SignatureError};
        let header = headers
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Unauthorized(format!(
                    "sign the webhook: `{SIGNATURE_HEADER}: t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">`"
                ))
            })?;
        let now = chrono::Utc::now().timestamp();
        verify_signature(self.secret.expose(), header, body, now, self.tolerance).map_err(|e| {
            ApiError::Unauthorized(match e {
                SignatureError::Malformed => format!("the {SIGNATURE_HEADER} header is malformed"),
                SignatureError::Stale => format!(
                    "the signature's timestamp is more than {} s away from now (replayed or clock skew)",
                    self.tolerance.as_secs()
                ),
                SignatureError::Mismatch => "the signature does not match the body".to_owned(),
            })
        })
    }
}

/// The idempotency scope of authenticated provider webhooks.
pub const PROVIDER_SCOPE: &str = "payment-provider";

/// The order of a webhook path (`/payments/{order_id}/webhooks`), as written.
fn webhook_order(path: &str) -> Option<&str> {
    path.strip_prefix("/payments/")?.strip_suffix("/webhooks")
}

/// Authenticates payment webhooks before anything else looks at them (idempotency, size limit,
/// the handler): the signature over the raw body, then the order it names against the path's.
/// Other requests pass untouched.
pub async fn authenticate_webhooks(
    State(verifier): State<Option<std::sync::Arc<WebhookVerifier>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(path_order) = webhook_order(request.uri().path()).map(str::to_owned) else {
        return next.run(request).await;
    };
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let Some(verifier) = verifier else {
        return no_webhooks().into_response();
    };
    let limit = request
        .extensions()
        .get::<crate::extract::BodyLimit>()
        .map_or(crate::extract::BodyLimit::DEFAULT, |l| l.0);
    let (mut parts, body) = request.into_parts();
    // Read (to a bound) whatever came, so the signature is checked before the size: an unsigned
    // oversized body is a 401, a signed one gets its 413 from the handler.
    let bytes = match axum::body::to_bytes(body, limit.saturating_mul(16)).await {
        Ok(bytes) => bytes,
        Err(error) if error.to_string().contains("length limit exceeded") => {
            return ApiError::PayloadTooLarge(format!(
                "the body exceeds the size limit of this endpoint ({limit} bytes)"
            ))
            .into_response()
        }
        Err(error) => {
            return ApiError::BadRequest(format!("the body could not be read: {error}"))
                .into_response()
        }
    };
    if let Err(refused) = verifier.verify(&parts.headers, &bytes) {
        return refused.into_response();
    }
    if let Err(refused) = bound_to(&path_order, &bytes) {
        return refused.into_response();
    }
    parts
        .extensions
        .insert(crate::idempotency::CallerScope(PROVIDER_SCOPE.to_owned()));
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Whether the signed body is about the path's order. A body without an `order_id` (or that is
/// not JSON) passes here and is refused by the strict parse of the handler (422).
fn bound_to(path_order: &str, body: &[u8]) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    struct Named {
        order_id: Option<serde_json::Value>,
    }
    let Ok(Named {
        order_id: Some(named),
    }) = serde_json::from_slice::<Named>(body)
    else {
        return Ok(());
    };
    let same = named
        .as_str()
        .and_then(|named| Uuid::parse_str(named).ok())
        .zip(Uuid::parse_str(path_order).ok())
        .is_some_and(|(named, path)| named == path);
    if same {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(format!(
            "the signed webhook is about order {named}, not the order of this path \
             ({path_order}): post it to /payments/{{its order_id}}/webhooks"
        )))
    }
}

fn no_webhooks() -> ApiError {
    ApiError::Unauthorized(
        "this API accepts no payment webhooks: PAYMENTS_WEBHOOK_SECRET is not configured"
            .to_owned(),
    )
}

/// What the provider reports.
/// snake_case like every value of the API; the PascalCase spellings of earlier versions are
/// still accepted.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookKindDto {
    #[serde(alias = "Authorized")]
    Authorized,
    #[serde(alias = "Captured")]
    Captured,
    #[serde(alias = "Failed")]
    Failed,
    #[serde(alias = "Voided")]
    Voided,
    #[serde(alias = "Refunded")]
    Refunded,
    #[serde(alias = "Other")]
    Other,
}

/// Money in minor units.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoneyDto {
    #[schema(minimum = 0)]
    pub minor: i64,
    #[schema(example = "GBP")]
    pub currency: String,
}

/// One provider webhook about the payment of an order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderWebhook {
    /// The order the payment is for: the same as the path's (the signature covers it, so a
    /// webhook cannot be replayed on another order).
    pub order_id: Uuid,
    /// The provider's id of this notification: repeats carry the same id.
    #[schema(max_length = 128)]
    pub provider_event_id: String,
    pub kind: WebhookKindDto,
    #[serde(default)]
    pub amount: Option<MoneyDto>,
    #[serde(default)]
    #[schema(max_length = 128)]
    pub refund_id: Option<String>,
    #[serde(default)]
    #[schema(max_length = 500)]
    pub detail: Option<String>,
}

/// The webhook's effect.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAccepted {
    pub order_id: Uuid,
    /// Events appended: empty for a repeat.
    pub events: Vec<String>,
}

/// Receive a payment provider webhook.
#[utoipa::path(
    post, path = "/payments/{order_id}/webhooks", tag = "payments",
    params(("order_id" = Uuid, Path, description = "The order the payment is for")),
    request_body = ProviderWebhook,
    responses(
        (status = 200, description = "Recorded, or a repeat of one already recorded", body = WebhookAccepted),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, wrong or stale signature", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No payment for this order (retry later)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn receive_webhook(
    State(state): State<AppState>,
    key: Option<IdempotencyKey>,
    PathParams(raw_id): PathParams<String>,
    RawBody(parts, bytes): RawBody,
) -> Result<axum::Json<WebhookAccepted>, ApiError> {
    // Checked again here ([`authenticate_webhooks`] did it first) so that the handler is safe
    // whatever the router puts in front of it.
    let verifier = state.webhooks.as_ref().ok_or_else(no_webhooks)?;
    verifier.verify(&parts.headers, &bytes)?;
    let headers = parts.headers.clone();
    let webhook: ProviderWebhook = parse_json(parts, bytes, &state).await?;
    let order_id = parse_order_id(&raw_id)?;
    if webhook.order_id != order_id.as_uuid() {
        return Err(ApiError::Unauthorized(format!(
            "the signed webhook is about order {}, not order {order_id} of this path",
            webhook.order_id
        )));
    }
    let amount = match webhook.amount {
        Some(m) => Some(
            Currency::parse(&m.currency)
                .and_then(|c| Money::new(m.minor, c))
                .map_err(|e| ApiError::Unprocessable(e.to_string()))?,
        ),
        None => None,
    };
    let command = PaymentCommand::RecordProviderWebhook {
        provider_event_id: webhook.provider_event_id,
        kind: match webhook.kind {
            WebhookKindDto::Authorized => WebhookKind::Authorized,
            WebhookKindDto::Captured => WebhookKind::Captured,
            WebhookKindDto::Failed => WebhookKind::Failed,
            WebhookKindDto::Voided => WebhookKind::Voided,
            WebhookKindDto::Refunded => WebhookKind::Refunded,
            WebhookKindDto::Other => WebhookKind::Other,
        },
        amount,
        refund_id: webhook.refund_id,
        detail: webhook.detail,
    };
    let committed = state
        .payments
        .execute(
            &order_id.to_string(),
            command,
            &context(&headers, key, "payment-provider".to_owned()),
        )
        .await
        .map_err(command_error)?;
    Ok(axum::Json(WebhookAccepted {
        order_id: order_id.as_uuid(),
        events: committed.event_types,
    }))
}
