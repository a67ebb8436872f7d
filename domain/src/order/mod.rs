//! The Order aggregate: from placement to completion, with the side exits a delivery platform
//! needs (rejection by the store, cancellation, the accept-by deadline) and a rating once
//! delivered. The lifecycle only moves forward: [`OrderStatus::rank`] never decreases.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::services::{OrderServices, PricedLine, PricingError, RequestedLine};
use crate::{CustomerId, Money, RegionCode, StoreId};

mod lifecycle;
mod placement;

/// Aggregate type name in the event store and on the topics. Never renamed.
pub const AGGREGATE_TYPE: &str = "order";

/// The most lines one order may carry.
pub const MAX_LINES: usize = 50;
/// The most of one item in one line.
pub const MAX_QUANTITY: u32 = 99;

/// Where the order goes.
///
/// The text fields are personal data: the API seals them (`pii:v1:...` envelopes, see
/// `commands::pii`) before the command runs, so the aggregate carries opaque strings and never
/// looks into them. The coordinates stay plain on purpose: the delivery flow (courier routing,
/// great-circle ETA) computes with them, and without the text they do not name a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryAddress {
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postcode: String,
    pub latitude: f64,
    pub longitude: f64,
}

/// Whom the store and the courier contact about an order (personal data, sealed by the API like
/// the address text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub name: String,
    pub phone: Option<String>,
    pub email: Option<String>,
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum OrderStatus {
    #[default]
    New,
    Placed,
    Confirmed,
    Accepted,
    Preparing,
    Ready,
    OutForDelivery,
    Delivered,
    Completed,
    Rejected,
    Cancelled,
}

impl OrderStatus {
    /// Position in the lifecycle; side exits rank above every state they can leave from.
    pub const fn rank(self) -> u8 {
        match self {
            Self::New => 0,
            Self::Placed => 1,
            Self::Confirmed => 2,
            Self::Accepted => 3,
            Self::Preparing => 4,
            Self::Ready => 5,
            Self::OutForDelivery => 6,
            Self::Delivered => 7,
            Self::Completed | Self::Rejected | Self::Cancelled => 8,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::New => "New",
            Self::Placed => "Placed",
            Self::Confirmed => "Confirmed",
            Self::Accepted => "Accepted",
            Self::Preparing => "Preparing",
            Self::Ready => "Ready",
            Self::OutForDelivery => "OutForDelivery",
            Self::Delivered => "Delivered",
            Self::Completed => "Completed",
            Self::Rejected => "Rejected",
            Self::Cancelled => "Cancelled",
        }
    }
}

/// Why a store turned an order down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectionReason {
    Busy,
    ClosingEarly,
    ItemUnavailable,
    Other,
}

/// Who cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CancelledBy {
    Customer,
    Store,
    System,
}

/// What a client may ask of an order.
// `PlaceOrder` is large, but a command is handled one at a time, never held in bulk.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderCommand {
    PlaceOrder {
        customer_id: CustomerId,
        store_id: StoreId,
        /// The region the client expects, if it named one. The store's region decides the
        /// order's prices, currency, tax, fees, points and promotions; a different one here is
        /// refused rather than priced.
        region: Option<RegionCode>,
        lines: Vec<RequestedLine>,
        delivery_address: DeliveryAddress,
        /// Whom to contact about the order, if the customer gave it.
        contact: Option<Contact>,
        /// Rewards points to redeem as a discount (0 for none); debited by the order flow.
        redeem_points: u64,
        /// A promotion code from the catalogue, if any.
        promotion_code: Option<String>,
        /// The customer's subscription waives the delivery fee (decided by the caller from the
        /// rewards ledger at placement).
        free_delivery: bool,
    },
    /// Change the lines before the store accepts; the order is priced again (with the points
    /// it already redeems). Once the payment is confirmed the new total may not exceed the
    /// confirmed one.
    ModifyOrder {
        lines: Vec<RequestedLine>,
    },
    ConfirmPayment {
        payment_reference: String,
    },
    AcceptOrder {
        estimated_preparation_minutes: u32,
    },
    RejectOrder {
        reason: RejectionReason,
    },
    StartPreparation,
    MarkReady,
    HandToCourier,
    MarkDelivered,
    CompleteOrder,
    CancelOrder {
        by: CancelledBy,
        reason: String,
    },
    /// The accept-by deadline passed; cancels only if the store has not accepted yet.
    ExpireAcceptance,
    RateOrder {
        stars: u8,
        comment: Option<String>,
    },
}

/// What happened to an order. Names are past tense and never renamed: they are the event types
/// in the store and the Avro record names on the topics.
// `OrderPlaced` is large, but events are serialized one at a time, never held in bulk.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    OrderPlaced {
        customer_id: CustomerId,
        store_id: StoreId,
        region: RegionCode,
        lines: Vec<PricedLine>,
        subtotal: Money,
        discount: Money,
        tax: Money,
        delivery_fee: Money,
        total: Money,
        delivery_address: DeliveryAddress,
        accept_by: DateTime<Utc>,
        rating_window_days: u32,
        /// Rewards points redeemed as (part of) the discount; absent (0) in events stored
        /// before redemption existed.
        #[serde(default)]
        points_redeemed: u64,
        /// The promotion code applied, if any (absent in events stored before promotions).
        #[serde(default)]
        promotion_code: Option<String>,
        /// The delivery fee was waived for a subscriber.
        #[serde(default)]
        free_delivery: bool,
        /// Whom to contact (absent in events stored before contacts existed).
        #[serde(default)]
        contact: Option<Contact>,
        placed_at: DateTime<Utc>,
    },
    OrderConfirmed {
        payment_reference: String,
        confirmed_at: DateTime<Utc>,
    },
    OrderAccepted {
        estimated_preparation_minutes: u32,
        accepted_at: DateTime<Utc>,
    },
    OrderRejected {
        reason: RejectionReason,
        rejected_at: DateTime<Utc>,
    },
    PreparationStarted {
        started_at: DateTime<Utc>,
    },
    OrderReady {
        ready_at: DateTime<Utc>,
    },
    OrderOutForDelivery {
        departed_at: DateTime<Utc>,
    },
    OrderDelivered {
        delivered_at: DateTime<Utc>,
    },
    OrderCompleted {
        completed_at: DateTime<Utc>,
    },
    OrderCancelled {
        cancelled_by: CancelledBy,
        reason: String,
        cancelled_at: DateTime<Utc>,
    },
    OrderRated {
        stars: u8,
        comment: Option<String>,
        rated_at: DateTime<Utc>,
    },
    OrderModified {
        lines: Vec<PricedLine>,
        subtotal: Money,
        discount: Money,
        tax: Money,
        delivery_fee: Money,
        total: Money,
        modified_at: DateTime<Utc>,
    },
}

impl OrderEvent {
    /// Every event type, for catalogues and tests. Never reorder or rename.
    pub const TYPES: [&'static str; 12] = [
        "OrderPlaced",
        "OrderConfirmed",
        "OrderAccepted",
        "OrderRejected",
        "PreparationStarted",
        "OrderReady",
        "OrderOutForDelivery",
        "OrderDelivered",
        "OrderCompleted",
        "OrderCancelled",
        "OrderRated",
        "OrderModified",
    ];

    /// The status an order is in after this event, if the event moves it.
    pub const fn status_after(&self) -> Option<OrderStatus> {
        Some(match self {
            Self::OrderPlaced { .. } => OrderStatus::Placed,
            Self::OrderConfirmed { .. } => OrderStatus::Confirmed,
            Self::OrderAccepted { .. } => OrderStatus::Accepted,
            Self::OrderRejected { .. } => OrderStatus::Rejected,
            Self::PreparationStarted { .. } => OrderStatus::Preparing,
            Self::OrderReady { .. } => OrderStatus::Ready,
            Self::OrderOutForDelivery { .. } => OrderStatus::OutForDelivery,
            Self::OrderDelivered { .. } => OrderStatus::Delivered,
            Self::OrderCompleted { .. } => OrderStatus::Completed,
            Self::OrderCancelled { .. } => OrderStatus::Cancelled,
            Self::OrderRated { .. } | Self::OrderModified { .. } => return None,
        })
    }

    /// When it happened in the business's time.
    pub const fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::OrderPlaced { placed_at: t, .. }
            | Self::OrderConfirmed {
                confirmed_at: t, ..
            }
            | Self::OrderAccepted { accepted_at: t, .. }
            | Self::OrderRejected { rejected_at: t, .. }
            | Self::PreparationStarted { started_at: t }
            | Self::OrderReady { ready_at: t }
            | Self::OrderOutForDelivery { departed_at: t }
            | Self::OrderDelivered { delivered_at: t }
            | Self::OrderCompleted { completed_at: t }
            | Self::OrderCancelled {
                cancelled_at: t, ..
            }
            | Self::OrderRated { rated_at: t, .. }
            | Self::OrderModified { modified_at: t, .. } => *t,
        }
    }
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::OrderPlaced { .. } => "OrderPlaced",
            Self::OrderConfirmed { .. } => "OrderConfirmed",
            Self::OrderAccepted { .. } => "OrderAccepted",
            Self::OrderRejected { .. } => "OrderRejected",
            Self::PreparationStarted { .. } => "PreparationStarted",
            Self::OrderReady { .. } => "OrderReady",
            Self::OrderOutForDelivery { .. } => "OrderOutForDelivery",
            Self::OrderDelivered { .. } => "OrderDelivered",
            Self::OrderCompleted { .. } => "OrderCompleted",
            Self::OrderCancelled { .. } => "OrderCancelled",
            Self::OrderRated { .. } => "OrderRated",
            Self::OrderModified { .. } => "OrderModified",
        };
        name.to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            // 2.0 added `cancelled_by`; 1.0 events are upcast by `schemas::upcasters`.
            Self::OrderCancelled { .. } => "2.0".to_owned(),
            _ => "1.0".to_owned(),
        }
    }
}

/// A rule an order command broke. Each says what the client can do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrderError {
    #[error("the order already exists; place a new order with a new id")]
    AlreadyPlaced,
    #[error("the order does not exist; place it first")]
    NotFound,
    #[error("an order needs between 1 and {MAX_LINES} lines")]
    InvalidLineCount,
    #[error("quantities must be between 1 and {MAX_QUANTITY}")]
    InvalidQuantity,
    #[error("cannot price the order: {0}")]
    Pricing(#[from] PricingError),
    #[error("cannot {action} an order that is {status}")]
    InvalidTransition {
        action: &'static str,
        status: &'static str,
    },
    #[error("a customer can cancel only before preparation starts; the order is {0}")]
    TooLateToCancel(&'static str),
    #[error("stars must be between 1 and 5")]
    InvalidStars,
    #[error("the order was already rated")]
    AlreadyRated,
    #[error("the rating window of {0} days after delivery has closed")]
    RatingWindowClosed(u32),
    #[error("{field} is too long (at most {max} characters)")]
    TooLong { field: &'static str, max: usize },
    #[error("the estimated preparation time must be between 1 and 240 minutes")]
    InvalidPreparationTime,
    #[error("a contact needs a name")]
    ContactWithoutName,
    #[error("items: option `{option}` of `{item}` is repeated; each option applies once per line (order more of the item instead)")]
    RepeatedOption {
        item: crate::MenuItemId,
        option: String,
    },
    #[error(
        "the delivery address is {km} km from the store, more than the {max_km} km a store \
         delivers; check the coordinates or order from a nearer store"
    )]
    TooFarForDelivery { km: u32, max_km: u32 },
    #[error(
        "the modified order costs {requested} but {confirmed} was confirmed; \
         remove items, or cancel and place a new order"
    )]
    ExceedsConfirmedTotal { requested: Money, confirmed: Money },
}

impl OrderError {
    /// True when the command conflicts with the order's current state (HTTP 409), false when
    /// the command itself is invalid (HTTP 422).
    pub const fn is_state_conflict(&self) -> bool {
        matches!(
            self,
            Self::AlreadyPlaced
                | Self::InvalidTransition { .. }
                | Self::TooLateToCancel(_)
                | Self::AlreadyRated
                | Self::RatingWindowClosed(_)
                | Self::ExceedsConfirmedTotal { .. }
        )
    }
}

/// The state an order's events add up to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub status: OrderStatus,
    pub region: Option<RegionCode>,
    pub points_redeemed: u64,
    pub promotion_code: Option<String>,
    pub free_delivery: bool,
    pub customer_id: Option<CustomerId>,
    pub store_id: Option<StoreId>,
    pub total: Option<Money>,
    pub accept_by: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub rating_window_days: u32,
    pub rated: bool,
    /// Where it goes (text fields as sealed by the API).
    #[serde(default)]
    pub delivery_address: Option<DeliveryAddress>,
    /// Whom to contact (sealed by the API).
    #[serde(default)]
    pub contact: Option<Contact>,
}

impl Order {
    fn require(&self, allowed: &[OrderStatus], action: &'static str) -> Result<(), OrderError> {
        if self.status == OrderStatus::New {
            return Err(OrderError::NotFound);
        }
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(OrderError::InvalidTransition {
                action,
                status: self.status.as_str(),
            })
        }
    }

    /// What a command records. Each command's rule is in the function named after it:
    /// placing and modifying (priced by the catalogue) in [`placement`], every later move in
    /// [`lifecycle`].
    fn decide(
        &self,
        command: OrderCommand,
        services: &OrderServices,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderCommand as C;
        let now = services.clock.now();
        Ok(match command {
            C::PlaceOrder {
                customer_id,
                store_id,
                region,
                lines,
                delivery_address,
                contact,
                redeem_points,
                promotion_code,
                free_delivery,
            } => vec![self.place_order(
                now,
                services,
                customer_id,
                store_id,
                region,
                lines,
                delivery_address,
                contact,
                redeem_points,
                promotion_code,
                free_delivery,
            )?],
            C::ModifyOrder { lines } => vec![self.modify_order(now, services, lines)?],
            C::ConfirmPayment { payment_reference } => {
                vec![self.confirm_payment(now, payment_reference)?]
            }
            C::AcceptOrder {
                estimated_preparation_minutes,
            } => vec![self.accept_order(now, estimated_preparation_minutes)?],
            C::RejectOrder { reason } => vec![self.reject_order(now, reason)?],
            C::StartPreparation => vec![self.start_preparation(now)?],
            C::MarkReady => vec![self.mark_ready(now)?],
            C::HandToCourier => vec![self.hand_to_courier(now)?],
            C::MarkDelivered => vec![self.mark_delivered(now)?],
            C::CompleteOrder => vec![self.complete_order(now)?],
            C::CancelOrder { by, reason } => vec![self.cancel_order(now, by, reason)?],
            C::ExpireAcceptance => Vec::from_iter(self.expire_acceptance(now)?),
            C::RateOrder { stars, comment } => vec![self.rate_order(now, stars, comment)?],
        })
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type Services = OrderServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command, services)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        if let Some(status) = event.status_after() {
            self.status = status;
        }
        match event {
            OrderEvent::OrderPlaced {
                customer_id,
                store_id,
                region,
                total,
                accept_by,
                rating_window_days,
                points_redeemed,
                promotion_code,
                free_delivery,
                delivery_address,
                contact,
                ..
            } => {
                self.delivery_address = Some(delivery_address);
                self.contact = contact;
                self.free_delivery = free_delivery;
                self.region = Some(region);
                self.points_redeemed = points_redeemed;
                self.promotion_code = promotion_code;
                self.customer_id = Some(customer_id);
                self.store_id = Some(store_id);
                self.total = Some(total);
                self.accept_by = Some(accept_by);
                self.rating_window_days = rating_window_days;
            }
            OrderEvent::OrderDelivered { delivered_at } => self.delivered_at = Some(delivered_at),
            OrderEvent::OrderRated { .. } => self.rated = true,
            OrderEvent::OrderModified { total, .. } => self.total = Some(total),
            // Their status is all they change.
            OrderEvent::OrderConfirmed { .. }
            | OrderEvent::OrderAccepted { .. }
            | OrderEvent::OrderRejected { .. }
            | OrderEvent::PreparationStarted { .. }
            | OrderEvent::OrderReady { .. }
            | OrderEvent::OrderOutForDelivery { .. }
            | OrderEvent::OrderCompleted { .. }
            | OrderEvent::OrderCancelled { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests;
