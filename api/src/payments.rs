//! The payment provider's webhooks. Providers repeat webhooks (one large platform retries up
//! to seven times): each carries the provider's event id, and the payment aggregate records
//! every id it has seen, so a repeat changes nothing. (Signature checks arrive with the
//! security work; until then deploy this route behind the provider's allow-list.)

use axum::extract::State;
use axum::http::HeaderMap;
use domain::payment::{PaymentCommand, WebhookKind};
use domain::{Currency, Money};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{command_error, ApiError, Problem};
use crate::extract::{Body, PathParams};
use crate::idempotency::IdempotencyKey;
use crate::orders::{context, parse_order_id};
use crate::AppState;

/// What the provider reports.
#[derive(Debug, Deserialize, ToSchema)]
pub enum WebhookKindDto {
    Authorized,
    Captured,
    Failed,
    Voided,
    Refunded,
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
        (status = 404, description = "No payment for this order (retry later)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn receive_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    key: Option<IdempotencyKey>,
    PathParams(raw_id): PathParams<String>,
    Body(webhook): Body<ProviderWebhook>,
) -> Result<axum::Json<WebhookAccepted>, ApiError> {
    let order_id = parse_order_id(&raw_id)?;
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
