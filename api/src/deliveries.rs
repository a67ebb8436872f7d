//! Delivery commands, issued by couriers (and dispatch): assignment, locations, pickup,
//! hand-over, failure, return, courier rating. A delivery is keyed by its order's id.

use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use domain::delivery::{DeliveryCommand, FailureReason, GeoPoint};
use domain::CourierId;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{authorize_order, Action, Principal};
use crate::error::{command_error, ApiError, Problem};
use crate::extract::{Body, PathParams};
use crate::idempotency::IdempotencyKey;
use crate::orders::{accepted, parse_order_id, step_context, OrderCommandResult};
use crate::AppState;

/// Why a courier could not hand the food over.
/// snake_case like every value of the API; the PascalCase spellings of earlier versions are
/// still accepted.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReasonDto {
    #[serde(alias = "CustomerUnreachable")]
    CustomerUnreachable,
    #[serde(alias = "AddressNotFound")]
    AddressNotFound,
    #[serde(alias = "CustomerRefused")]
    CustomerRefused,
    #[serde(alias = "OrderDamaged")]
    OrderDamaged,
    #[serde(alias = "CourierIncident")]
    CourierIncident,
    #[serde(alias = "Other")]
    Other,
}

/// A step of a delivery.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeliveryAction {
    /// Dispatch gives the delivery to a courier (possible until the courier reaches the store).
    AssignCourier {
        courier_id: Uuid,
    },
    /// The courier's device reports where it is; older fixes than the newest are ignored.
    UpdateLocation {
        #[schema(minimum = -90, maximum = 90)]
        latitude: f64,
        #[schema(minimum = -180, maximum = 180)]
        longitude: f64,
        /// When the device took the fix (its own clock).
        device_time: DateTime<Utc>,
    },
    ArriveAtPickup,
    PickUp,
    ArriveAtDropoff,
    Deliver,
    Fail {
        reason: FailureReasonDto,
    },
    ReturnToStore,
    Cancel {
        #[schema(max_length = 500)]
        reason: String,
    },
    RateCourier {
        #[schema(minimum = 1, maximum = 5)]
        stars: u8,
        #[serde(default)]
        #[schema(max_length = 2000)]
        comment: Option<String>,
    },
}

/// The command, and the policy's name for who takes that step.
impl TryFrom<DeliveryAction> for (DeliveryCommand, Action) {
    type Error = ApiError;

    fn try_from(action: DeliveryAction) -> Result<Self, ApiError> {
        Ok(match action {
            DeliveryAction::AssignCourier { courier_id } => (
                DeliveryCommand::AssignCourier {
                    courier_id: CourierId::from_uuid(courier_id),
                },
                Action::DispatchDeliveryStep,
            ),
            DeliveryAction::UpdateLocation {
                latitude,
                longitude,
                device_time,
            } => (
                DeliveryCommand::UpdateCourierLocation {
                    position: GeoPoint::new(latitude, longitude)
                        .map_err(|e| ApiError::Unprocessable(e.to_string()))?,
                    device_time,
                },
                Action::CourierDeliveryStep,
            ),
            DeliveryAction::ArriveAtPickup => {
                (DeliveryCommand::ArriveAtPickup, Action::CourierDeliveryStep)
            }
            DeliveryAction::PickUp => (DeliveryCommand::PickUp, Action::CourierDeliveryStep),
            DeliveryAction::ArriveAtDropoff => (
                DeliveryCommand::ArriveAtDropoff,
                Action::CourierDeliveryStep,
            ),
            DeliveryAction::Deliver => (DeliveryCommand::Deliver, Action::CourierDeliveryStep),
            DeliveryAction::Fail { reason } => (
                DeliveryCommand::FailDelivery {
                    reason: match reason {
                        FailureReasonDto::CustomerUnreachable => FailureReason::CustomerUnreachable,
                        FailureReasonDto::AddressNotFound => FailureReason::AddressNotFound,
                        FailureReasonDto::CustomerRefused => FailureReason::CustomerRefused,
                        FailureReasonDto::OrderDamaged => FailureReason::OrderDamaged,
                        FailureReasonDto::CourierIncident => FailureReason::CourierIncident,
                        FailureReasonDto::Other => FailureReason::Other,
                    },
                },
                Action::CourierDeliveryStep,
            ),
            DeliveryAction::ReturnToStore => {
                (DeliveryCommand::ReturnToStore, Action::CourierDeliveryStep)
            }
            DeliveryAction::Cancel { reason } => (
                DeliveryCommand::CancelDelivery { reason },
                Action::DispatchDeliveryStep,
            ),
            DeliveryAction::RateCourier { stars, comment } => (
                DeliveryCommand::RateCourier { stars, comment },
                Action::RateCourier,
            ),
        })
    }
}

/// Move an order's delivery one step.
#[utoipa::path(
    post, path = "/deliveries/{order_id}/actions", tag = "deliveries",
    params(("order_id" = Uuid, Path, description = "The order whose delivery it is")),
    request_body = DeliveryAction,
    responses(
        (status = 200, description = "The step was recorded", body = OrderCommandResult),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No delivery for this order (yet)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not possible in the delivery's current state", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn act_on_delivery(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    key: Option<IdempotencyKey>,
    PathParams(raw_id): PathParams<String>,
    Body(action): Body<DeliveryAction>,
) -> Result<axum::Json<OrderCommandResult>, ApiError> {
    let order_id = parse_order_id(&raw_id)?;
    let (command, action) = <(DeliveryCommand, Action)>::try_from(action)?;
    authorize_order(&state, &principal, action, &order_id.to_string()).await?;
    let context = step_context(&state, &headers, key, &principal.actor(), order_id).await?;
    let committed = state
        .deliveries
        .execute(&order_id.to_string(), command, &context)
        .await
        .map_err(command_error)?;
    Ok(axum::Json(accepted(order_id, "delivery", committed)))
}
