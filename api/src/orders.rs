//! Order commands (write side) and the tracking view (read side).

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use commands::promotions::ClaimError;
use commands::{CommandContext, Committed, TraceParent};
use domain::order::{CancelledBy, DeliveryAddress, OrderCommand, RejectionReason};
use domain::services::RequestedLine;
use domain::{CustomerId, MenuItemId, OrderId, RegionCode, StoreId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{authorize_order, Action, Owner, Principal};
use crate::error::{command_error, ApiError, Problem};
use crate::extract::{Body, PathParams};
use crate::idempotency::{command_context, IdempotencyKey};
pub use crate::positions::Position;
use crate::request_span;
use crate::AppState;

/// Header carrying the correlation id of a business transaction.
pub use crate::correlation::CORRELATION_HEADER;

/// A line of a new order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    /// Menu item code, e.g. `margherita`.
    #[schema(example = "margherita", max_length = 64)]
    pub item_id: String,
    /// 1 to 99.
    #[schema(minimum = 1, maximum = 99)]
    pub quantity: u32,
    /// Option codes of the item, e.g. `extra-cheese`; each at most once (422 otherwise).
    #[serde(default)]
    #[schema(max_items = 10)]
    pub options: Vec<String>,
}

/// Where to deliver.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressRequest {
    #[schema(max_length = 200)]
    pub line1: String,
    #[serde(default)]
    #[schema(max_length = 200)]
    pub line2: Option<String>,
    #[schema(max_length = 100)]
    pub city: String,
    #[schema(max_length = 20)]
    pub postcode: String,
    #[schema(minimum = -90, maximum = 90)]
    pub latitude: f64,
    #[schema(minimum = -180, maximum = 180)]
    pub longitude: f64,
}

/// A new order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    pub customer_id: Uuid,
    pub store_id: Uuid,
    /// Region code, e.g. `uk`: optional, and if given it must be the store's region. The
    /// store's region decides the prices, currency, tax, fees, points and promotions; a request
    /// naming another region is refused (422), as is an unknown store.
    #[serde(default)]
    #[schema(example = "uk")]
    pub region: Option<String>,
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<LineRequest>,
    pub delivery_address: AddressRequest,
    /// Rewards points to redeem as a discount (default 0). They are debited from the
    /// customer's balance right after placement; if the balance does not cover them the order
    /// is cancelled.
    #[serde(default)]
    #[schema(maximum = 1_000_000_000)]
    pub redeem_points: u64,
    /// A promotion code, e.g. `WELCOME10`.
    #[serde(default)]
    #[schema(max_length = 32)]
    pub promotion_code: Option<String>,
    /// Whom to contact about the order (personal data, sealed before it is recorded).
    #[serde(default)]
    pub contact: Option<crate::privacy::ContactRequest>,
}

fn bounded(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max {
        return Err(ApiError::Unprocessable(format!(
            "{field} is too long: at most {max} characters"
        )));
    }
    Ok(())
}

/// Order lines as the domain takes them; checks counts and codes.
fn requested_lines(items: Vec<LineRequest>) -> Result<Vec<RequestedLine>, ApiError> {
    if items.is_empty() || items.len() > domain::order::MAX_LINES {
        return Err(ApiError::Unprocessable(format!(
            "items must hold between 1 and {} lines",
            domain::order::MAX_LINES
        )));
    }
    items
        .into_iter()
        .map(|item| {
            if item.options.len() > 10 {
                return Err(ApiError::Unprocessable(
                    "at most 10 options per line".to_owned(),
                ));
            }
            Ok(RequestedLine {
                item_id: MenuItemId::parse(item.item_id)
                    .map_err(|e| ApiError::Unprocessable(e.to_string()))?,
                quantity: item.quantity,
                options: item.options,
            })
        })
        .collect()
}

impl TryFrom<PlaceOrderRequest> for OrderCommand {
    type Error = ApiError;

    fn try_from(r: PlaceOrderRequest) -> Result<Self, ApiError> {
        let invalid = |e: domain::ids::IdError| ApiError::Unprocessable(e.to_string());
        let lines = requested_lines(r.items)?;
        let a = r.delivery_address;
        bounded("delivery_address.line1", &a.line1, 200)?;
        bounded(
            "delivery_address.line2",
            a.line2.as_deref().unwrap_or(""),
            200,
        )?;
        bounded("delivery_address.city", &a.city, 100)?;
        bounded("delivery_address.postcode", &a.postcode, 20)?;
        if a.line1.trim().is_empty() || a.city.trim().is_empty() || a.postcode.trim().is_empty() {
            return Err(ApiError::Unprocessable(
                "delivery_address needs line1, city and postcode".to_owned(),
            ));
        }
        if !(-90.0..=90.0).contains(&a.latitude) || !(-180.0..=180.0).contains(&a.longitude) {
            return Err(ApiError::Unprocessable(
                "delivery_address coordinates are out of range".to_owned(),
            ));
        }
        if r.redeem_points > 1_000_000_000 {
            return Err(ApiError::Unprocessable(
                "redeem_points is at most 1000000000".to_owned(),
            ));
        }
        Ok(Self::PlaceOrder {
            redeem_points: r.redeem_points,
            promotion_code: r.promotion_code,
            free_delivery: false,
            contact: r
                .contact
                .map(domain::order::Contact::try_from)
                .transpose()?,
            customer_id: CustomerId::from_uuid(r.customer_id),
            store_id: StoreId::from_uuid(r.store_id),
            region: r
                .region
                .map(RegionCode::parse)
                .transpose()
                .map_err(invalid)?,
            lines,
            delivery_address: DeliveryAddress {
                line1: a.line1,
                line2: a.line2,
                city: a.city,
                postcode: a.postcode,
                latitude: a.latitude,
                longitude: a.longitude,
            },
        })
    }
}

/// The result of an order command.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderCommandResult {
    pub order_id: Uuid,
    pub position: Position,
    /// Events the command appended.
    pub events: Vec<String>,
}

pub(crate) fn context(
    headers: &HeaderMap,
    key: Option<IdempotencyKey>,
    actor: String,
) -> CommandContext {
    let context = command_context(key, actor).continuing(request_span::of_request(headers));
    // The header was checked by [`crate::correlation::layer`]: a value here is a valid id.
    match headers
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::correlation::is_valid(v))
    {
        Some(correlation) => context.with_correlation(correlation),
        None => context,
    }
}

pub(crate) fn accepted(
    order_id: OrderId,
    aggregate_type: &str,
    committed: Committed,
) -> OrderCommandResult {
    OrderCommandResult {
        order_id: order_id.as_uuid(),
        position: Position::new(
            aggregate_type,
            &committed.aggregate_id,
            committed.last_sequence,
        ),
        events: committed.event_types,
    }
}

/// Place an order.
#[utoipa::path(
    post, path = "/orders", tag = "orders",
    request_body = PlaceOrderRequest,
    responses(
        (status = 201, description = "The order was placed", body = OrderCommandResult),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The customer's personal data was erased", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid order", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn place_order(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    key: Option<IdempotencyKey>,
    Body(request): Body<PlaceOrderRequest>,
) -> Result<impl IntoResponse, ApiError> {
    principal.authorize(Action::PlaceOrder, &Owner::customer(request.customer_id))?;
    let actor = principal.actor();
    let customer = request.customer_id.to_string();
    let mut command = OrderCommand::try_from(request)?;
    // A running subscription with free delivery waives the fee (read from the ledger now).
    let subscriber = state
        .rewards
        .state(&customer, |ledger| {
            ledger.free_delivery_at(chrono::Utc::now())
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if let OrderCommand::PlaceOrder { free_delivery, .. } = &mut command {
        *free_delivery = subscriber;
    }
    crate::privacy::seal_placement(&state.pii, &mut command).await?;
    // A retry with the same Idempotency-Key names the same order (even after a crash between
    // the commit and the response).
    let order_id = key.map_or_else(OrderId::new, |IdempotencyKey(id)| OrderId::from_uuid(id));
    // A once-per-customer promotion is claimed for this order before it is appended: of
    // concurrent placements of one customer, one gets it and the others are refused (422), so
    // nobody is charged a price other than the one they asked for.
    let limited = match &command {
        OrderCommand::PlaceOrder {
            promotion_code: Some(code),
            ..
        } if state
            .catalogue
            .current()
            .promotions
            .get(code)
            .is_some_and(|p| p.once_per_customer) =>
        {
            Some(code.clone())
        }
        _ => None,
    };
    if let Some(code) = &limited {
        state
            .promotion_claims
            .claim(code, &customer, &order_id.to_string())
            .await
            .map_err(|e| match e {
                ClaimError::Used { .. } => ApiError::Unprocessable(format!(
                    "promotion_code: {e}; place the order without it"
                )),
                ClaimError::Database(e) => ApiError::internal(e),
            })?;
    }
    let committed = state
        .orders
        .execute(
            &order_id.to_string(),
            command,
            &context(&headers, key, actor),
        )
        .await;
    if let (Err(_), Some(code)) = (&committed, &limited) {
        // Refused (or failed): the use goes back unless the order exists after all.
        if let Err(e) = state
            .promotion_claims
            .release(code, &customer, &order_id.to_string())
            .await
        {
            tracing::warn!(error = %e, "promotion claim not released; it frees after its grace period");
        }
    }
    let committed = committed.map_err(command_error)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/orders/{order_id}/tracking"))],
        axum::Json(accepted(order_id, "order", committed)),
    ))
}

pub(crate) fn parse_order_id(raw: &str) -> Result<OrderId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::BadRequest(format!("`{raw}` is not an order id (a UUID)")))
}

/// A step in an order's life, issued by the party that performs it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum OrderAction {
    /// The customer changes the lines before the store accepts (the order is priced again).
    Modify {
        #[schema(min_items = 1, max_items = 50)]
        items: Vec<LineRequest>,
    },
    /// The payment provider authorized the payment.
    ConfirmPayment {
        #[schema(max_length = 128)]
        payment_reference: String,
    },
    /// The store accepts the order.
    Accept {
        #[schema(minimum = 1, maximum = 240)]
        estimated_preparation_minutes: u32,
    },
    /// The store turns the order down.
    Reject {
        reason: RejectionReasonDto,
    },
    StartPreparation,
    MarkReady,
    HandToCourier,
    MarkDelivered,
    Complete,
    /// Cancel the order.
    Cancel {
        by: CancelledByDto,
        #[schema(max_length = 500)]
        reason: String,
    },
    /// Rate a delivered order, once.
    Rate {
        #[schema(minimum = 1, maximum = 5)]
        stars: u8,
        #[serde(default)]
        #[schema(max_length = 2000)]
        comment: Option<String>,
    },
}

/// Why the store turns an order down, in snake_case like every value of the API (the
/// PascalCase spellings of earlier versions, `ItemUnavailable`, are still accepted).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReasonDto {
    #[serde(alias = "Busy")]
    Busy,
    #[serde(alias = "ClosingEarly")]
    ClosingEarly,
    #[serde(alias = "ItemUnavailable")]
    ItemUnavailable,
    #[serde(alias = "Other")]
    Other,
}

/// Who cancels, in snake_case like every value of the API (the PascalCase spellings of earlier
/// versions, `Customer`, are still accepted).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelledByDto {
    #[serde(alias = "Customer")]
    Customer,
    #[serde(alias = "Store")]
    Store,
    #[serde(alias = "System")]
    System,
}

impl OrderAction {
    /// The command, and the policy's name for who takes that step.
    fn into_command(self) -> Result<(OrderCommand, Action), ApiError> {
        Ok(match self {
            Self::Modify { items } => (
                OrderCommand::ModifyOrder {
                    lines: requested_lines(items)?,
                },
                Action::CustomerOrderStep,
            ),
            Self::ConfirmPayment { payment_reference } => (
                OrderCommand::ConfirmPayment { payment_reference },
                Action::SystemOrderStep,
            ),
            Self::Accept {
                estimated_preparation_minutes,
            } => (
                OrderCommand::AcceptOrder {
                    estimated_preparation_minutes,
                },
                Action::StoreOrderStep,
            ),
            Self::Reject { reason } => (
                OrderCommand::RejectOrder {
                    reason: match reason {
                        RejectionReasonDto::Busy => RejectionReason::Busy,
                        RejectionReasonDto::ClosingEarly => RejectionReason::ClosingEarly,
                        RejectionReasonDto::ItemUnavailable => RejectionReason::ItemUnavailable,
                        RejectionReasonDto::Other => RejectionReason::Other,
                    },
                },
                Action::StoreOrderStep,
            ),
            Self::StartPreparation => (OrderCommand::StartPreparation, Action::StoreOrderStep),
            Self::MarkReady => (OrderCommand::MarkReady, Action::StoreOrderStep),
            Self::HandToCourier => (OrderCommand::HandToCourier, Action::CourierOrderStep),
            Self::MarkDelivered => (OrderCommand::MarkDelivered, Action::CourierOrderStep),
            Self::Complete => (OrderCommand::CompleteOrder, Action::SystemOrderStep),
            Self::Cancel { by, reason } => {
                let (by, action) = match by {
                    CancelledByDto::Customer => (CancelledBy::Customer, Action::CustomerOrderStep),
                    CancelledByDto::Store => (CancelledBy::Store, Action::StoreOrderStep),
                    CancelledByDto::System => (CancelledBy::System, Action::SystemOrderStep),
                };
                (OrderCommand::CancelOrder { by, reason }, action)
            }
            Self::Rate { stars, comment } => (
                OrderCommand::RateOrder { stars, comment },
                Action::CustomerOrderStep,
            ),
        })
    }
}

/// Move an order one step through its life.
#[utoipa::path(
    post, path = "/orders/{order_id}/actions", tag = "orders",
    params(("order_id" = Uuid, Path, description = "The order")),
    request_body = OrderAction,
    responses(
        (status = 200, description = "The step was recorded", body = OrderCommandResult),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not possible in the order's current state", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn act_on_order(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    key: Option<IdempotencyKey>,
    PathParams(raw_id): PathParams<String>,
    Body(action): Body<OrderAction>,
) -> Result<axum::Json<OrderCommandResult>, ApiError> {
    let order_id = parse_order_id(&raw_id)?;
    let (command, action) = action.into_command()?;
    authorize_order(&state, &principal, action, &order_id.to_string()).await?;
    let context = step_context(&state, &headers, key, &principal.actor(), order_id).await?;
    let committed = state
        .orders
        .execute(&order_id.to_string(), command, &context)
        .await
        .map_err(command_error)?;
    Ok(axum::Json(accepted(order_id, "order", committed)))
}

/// The context of a step on an existing order (or its delivery): without an
/// `x-correlation-id` header it continues the order's business transaction, i.e. the
/// correlation id the order was placed with, and without a `traceparent` header the order's
/// trace, so that the store's, the couriers' and the process manager's steps all show in the
/// trace of the order.
pub(crate) async fn step_context(
    state: &AppState,
    headers: &HeaderMap,
    key: Option<IdempotencyKey>,
    actor: &str,
    order_id: OrderId,
) -> Result<CommandContext, ApiError> {
    let context = context(headers, key, actor.to_owned());
    let own_correlation = headers.get(CORRELATION_HEADER).is_some();
    let own_trace = request_span::sent(headers).is_some();
    if own_correlation && own_trace {
        return Ok(context);
    }
    let placed = order_placed_with(state, order_id).await?;
    let context = match placed.correlation_id {
        Some(correlation) if !own_correlation => context.with_correlation(correlation),
        _ => context,
    };
    Ok(match placed.traceparent {
        Some(trace) if !own_trace => context.continuing(Some(trace)),
        _ => context,
    })
}

/// The business transaction and the trace an order was placed in.
struct PlacedWith {
    correlation_id: Option<String>,
    traceparent: Option<TraceParent>,
}

async fn order_placed_with(state: &AppState, order_id: OrderId) -> Result<PlacedWith, ApiError> {
    let metadata = commands::log::first_metadata(&state.pool, "order", &order_id.to_string())
        .await
        .map_err(ApiError::internal)?
        .unwrap_or_default();
    let text = |key| commands::log::metadata_text(&metadata, key);
    Ok(PlacedWith {
        correlation_id: text("correlation_id").map(str::to_owned),
        traceparent: text("traceparent").and_then(TraceParent::parse),
    })
}
