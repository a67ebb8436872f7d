//! Process managers: react to events on the topics by issuing commands to other aggregates.
//!
//! A process manager runs on the consumer runtime (its own consumer group, per-aggregate
//! dedup, checkpoints, dead letters), so it sees every event once per aggregate and in order,
//! and keeps its own state in the same transaction as its checkpoint. Its reactions are
//! *repeatable* commands: the command id is derived from the causing event id and the step, so
//! a redelivered event, or a crash between the command's commit and the checkpoint, issues
//! nothing new (see [`commands::CommandContext::repeatable`]). The correlation id of the causing event is
//! carried into every command it causes.
//!
//! [`OrderFlow`] links orders, payments, deliveries and rewards:
//! - order placed → debit the points it redeems (if that fails, cancel the order), authorize
//!   the payment (built-in demo provider) and arm the accept-by deadline; payment authorized →
//!   confirm the order; payment declined → cancel the order as the system with the decline as
//!   its reason (which gives the points back as below);
//! - accept-by deadline passed (durable, see [`OrderFlow::fire_due_deadlines`]) → expire the
//!   order, which cancels it if the store has not accepted;
//! - order rejected or cancelled → cancel its delivery if one was requested, void the payment
//!   and give back the points it redeemed;
//! - order accepted → request a delivery from the store to the customer, with the store's
//!   preparation estimate and the region's courier speed (the delivery publishes its ETA);
//! - delivery picked up → the order is out for delivery; delivered → the order is delivered;
//! - delivery failed (or returned to the store) → the order is cancelled by the system with the
//!   failure as its reason, which voids the payment and gives the points back as above;
//! - order delivered → capture the payment; payment captured → complete the order;
//! - order completed → earn points at the region's rate;
//! - payment refunded → take back the refunded share of the points the order earned.
//!
//! A step that cannot proceed (the target refuses for a reason other than "already done" or
//! "moot", or the catalogue lacks what the step needs) becomes a stuck-flow record
//! ([`commands::stuck`]) in the same transaction, for operators to retry or resolve.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cqrs_es::Aggregate;
use domain::delivery::{
    Delivery, DeliveryCommand, DeliveryError, DeliveryEvent, DeliveryServices, GeoPoint,
};
use domain::order::{CancelledBy, Order, OrderCommand, OrderError, OrderEvent};
use domain::payment::{Payment, PaymentCommand, PaymentError, PaymentEvent, PaymentServices};
use domain::rewards::{RewardsCommand, RewardsError, RewardsLedger, RewardsServices};
use domain::services::{OrderServices, SystemClock};
use domain::{Currency, Money, OrderId, RegionCode, StoreId};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};
use streams::consumer::{FirstDelivery, Projection, ProjectionError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use commands::stuck;
use commands::{
    CatalogueStore, CommandBus, CommandContext, CommandError, EventStoreDb, TraceParent,
};

/// The payment provider the flow authorizes with. Development and tests use the built-in demo
/// provider, which approves every authorization but those of its test customers
/// ([`DEMO_DECLINED_CUSTOMER_PREFIX`]); a real provider adapter goes here.
pub const DEMO_PROVIDER: &str = "demo";

/// The demo provider's test customers: it declines every authorization for a customer whose id
/// starts with this, as card networks' test cards decline, so the decline path can be driven in
/// development and tests (`dec1ded0-0000-4000-8000-000000000001`). Real ids are random v4 UUIDs:
/// about one in four billion starts so, which only a deployment on the demo provider can meet.
pub const DEMO_DECLINED_CUSTOMER_PREFIX: &str = "dec1ded0-";

/// Why the demo provider declines an authorization for `customer_id`, if it does.
fn demo_decline(customer_id: &str) -> Option<&'static str> {
    customer_id
        .starts_with(DEMO_DECLINED_CUSTOMER_PREFIX)
        .then_some("card_declined (the demo provider's test customer)")
}

/// Orders ⇄ payments ⇄ deliveries ⇄ rewards.
pub struct OrderFlow {
    orders: CommandBus<Order>,
    payments: CommandBus<Payment>,
    deliveries: CommandBus<Delivery>,
    rewards: CommandBus<RewardsLedger>,
    catalogue: Arc<CatalogueStore>,
}

impl std::fmt::Debug for OrderFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderFlow").finish_non_exhaustive()
    }
}

/// What the flow remembers of an order.
#[derive(sqlx::FromRow)]
struct OrderFacts {
    customer_id: Uuid,
    region: String,
    total_minor: i64,
    currency: String,
    store_id: Option<Uuid>,
    dropoff_latitude: Option<f64>,
    dropoff_longitude: Option<f64>,
    points_redeemed: i64,
    refunded_minor: i64,
}

/// The event a reaction answers: its identity and the domain event. Kept with a stuck flow, so
/// that a retry applies the same reaction to the same event again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cause {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub correlation_id: String,
    /// W3C trace context of the event (empty: none): the flow's commands continue its trace.
    /// Stuck flows recorded before it existed have none.
    #[serde(default)]
    pub traceparent: String,
    pub event: FlowEvent,
}

/// The events the flow reacts to.
// `OrderPlaced` is large, but a cause is handled one at a time, never held in bulk.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FlowEvent {
    Order(OrderEvent),
    Payment(PaymentEvent),
    Delivery(DeliveryEvent),
}

/// Event types the flow reacts to (others are skipped without decoding).
const REACTS_TO: [&str; 15] = [
    "OrderPlaced",
    "OrderAccepted",
    "OrderReady",
    "OrderRejected",
    "OrderCancelled",
    "OrderModified",
    "OrderDelivered",
    "OrderCompleted",
    "PaymentAuthorized",
    "PaymentCaptured",
    "PaymentRefunded",
    "PickedUpAtStore",
    "DeliveredToCustomer",
    "DeliveryFailed",
    "ReturnedToStore",
];

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The command went through (or had gone through before).
    Done,
    /// Refused because it is moot: already done, or the target moved on.
    Moot,
    /// Refused for another reason: recorded as a stuck flow.
    Stuck,
}

impl OrderFlow {
    /// The flow over one event store; `catalogue` gives the regions' rates and the stores.
    pub fn new(store: EventStoreDb, catalogue: Arc<CatalogueStore>) -> Self {
        let clock = Arc::new(SystemClock);
        Self {
            orders: CommandBus::new(
                store.clone(),
                OrderServices::new(catalogue.clone(), clock.clone()),
            ),
            payments: CommandBus::new(store.clone(), PaymentServices::new(clock.clone())),
            deliveries: CommandBus::new(store.clone(), DeliveryServices::new(clock.clone())),
            rewards: CommandBus::new(store, RewardsServices::new(clock)),
            catalogue,
        }
    }

    fn context(&self, cause: &Cause, step: &str) -> CommandContext {
        let key = format!("{}/{step}", cause.event_id);
        let context = CommandContext::repeatable(format!("system:{}", self.name()), &key)
            .caused_by(cause.event_id)
            .continuing(TraceParent::parse(&cause.traceparent));
        // The business transaction goes on under whatever id it has (a client's own id is any
        // printable text, not necessarily a UUID).
        if cause.correlation_id.is_empty() {
            context
        } else {
            context.with_correlation(&cause.correlation_id)
        }
    }

    /// Runs one step: the command on `aggregate_id`. A refusal `moot` says is fine is logged;
    /// any other refusal becomes a stuck flow in `tx`; other failures are errors (the runtime
    /// retries, then dead-letters).
    #[allow(clippy::too_many_arguments)]
    async fn step<A>(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        bus: &CommandBus<A>,
        cause: &Cause,
        step: &'static str,
        aggregate_id: &str,
        command: A::Command,
        moot: impl Fn(&A::Error) -> bool,
    ) -> Result<Outcome, ProjectionError>
    where
        A: Aggregate + 'static,
        A::Command: Clone + Serialize,
    {
        let described = serde_json::to_value(&command).ok();
        let context = self.context(cause, step);
        match bus.execute(aggregate_id, command, &context).await {
            Ok(_) => Ok(Outcome::Done),
            Err(CommandError::Rejected(e)) => {
                metrics::counter!("process_manager_refusals_total", "step" => step).increment(1);
                if moot(&e) {
                    tracing::debug!(step, reason = %e, "the target refused a moot reaction");
                    return Ok(Outcome::Moot);
                }
                let command_type = described
                    .as_ref()
                    .map_or_else(|| "unknown".to_owned(), command_type);
                self.stuck(tx, cause, step, described, &command_type, e.to_string())
                    .await?;
                Ok(Outcome::Stuck)
            }
            Err(e) => Err(ProjectionError::Event(format!("{step}: {e}"))),
        }
    }

    /// Records that `step` cannot proceed.
    async fn stuck(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        step: &'static str,
        command: Option<serde_json::Value>,
        command_type: &str,
        reason: String,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        tracing::warn!(%order_id, step, %reason, "a flow step is stuck; see /admin/stuck-flows");
        let new = stuck::record(
            tx,
            &stuck::NewStuckFlow {
                order_id,
                step,
                event_id: cause.event_id,
                event_type: &cause.event_type,
                cause: serde_json::to_value(cause).map_err(event_error)?,
                command,
                command_type,
                reason,
            },
        )
        .await?;
        if new {
            metrics::counter!("process_manager_stuck_flows_total", "step" => step).increment(1);
        }
        Ok(())
    }

    /// The flow's reaction to one event (also what a retry of a stuck flow runs again).
    pub async fn react(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
    ) -> Result<(), ProjectionError> {
        match &cause.event {
            FlowEvent::Order(event) => self.on_order(tx, cause, event).await,
            FlowEvent::Payment(event) => self.on_payment(tx, cause, event).await,
            FlowEvent::Delivery(event) => self.on_delivery(tx, cause, event).await,
        }
    }

    async fn on_order(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        event: &OrderEvent,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        match event {
            OrderEvent::OrderPlaced {
                customer_id,
                store_id,
                region,
                total,
                accept_by,
                delivery_address,
                points_redeemed,
                ..
            } => {
                sqlx::query(
                    "INSERT INTO order_flow.orders \
                       (order_id, customer_id, region, total_minor, currency, correlation_id, \
                        store_id, dropoff_latitude, dropoff_longitude, points_redeemed) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (order_id) DO NOTHING",
                )
                .bind(order_id)
                .bind(customer_id.as_uuid())
                .bind(region.as_str())
                .bind(total.minor())
                .bind(total.currency().as_str())
                .bind(&cause.correlation_id)
                .bind(store_id.as_uuid())
                .bind(delivery_address.latitude)
                .bind(delivery_address.longitude)
                .bind(i64::try_from(*points_redeemed).unwrap_or(i64::MAX))
                .execute(&mut **tx)
                .await?;
                sqlx::query(
                    "INSERT INTO order_flow.deadlines (key, order_id, due_at, correlation_id) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
                )
                .bind(format!("{order_id}/accept-by"))
                .bind(order_id)
                .bind(accept_by)
                .bind(&cause.correlation_id)
                .execute(&mut **tx)
                .await?;
                if *points_redeemed > 0 {
                    let step = "redeem-points";
                    let context = self.context(cause, step);
                    let command = RewardsCommand::RedeemPoints {
                        order_id: parse_order_id(order_id)?,
                        points: *points_redeemed,
                        idempotency_key: context.command_id.to_string(),
                    };
                    let customer = customer_id.to_string();
                    match self.rewards.execute(&customer, command, &context).await {
                        Ok(_) => {}
                        Err(CommandError::Rejected(refusal)) => {
                            // The discount cannot be paid for with points: the order cannot
                            // stand as priced.
                            let command = OrderCommand::CancelOrder {
                                by: CancelledBy::System,
                                reason: format!("the points could not be redeemed: {refusal}"),
                            };
                            self.step(
                                tx,
                                &self.orders,
                                cause,
                                "cancel-unpaid-redemption",
                                order_id,
                                command,
                                |e| order_in(e, &["Cancelled", "Rejected"]),
                            )
                            .await?;
                            return Ok(());
                        }
                        Err(e) => return Err(ProjectionError::Event(format!("{step}: {e}"))),
                    }
                }
                if let Some(decline) = demo_decline(&customer_id.to_string()) {
                    // Nothing was authorized, so nothing is recorded on the payment: the order
                    // cannot be paid for, and its cancellation gives the redeemed points back.
                    let command = OrderCommand::CancelOrder {
                        by: CancelledBy::System,
                        reason: format!("the payment was declined: {decline}"),
                    };
                    self.step(
                        tx,
                        &self.orders,
                        cause,
                        "cancel-declined-payment",
                        order_id,
                        command,
                        |e| order_in(e, &["Cancelled", "Rejected"]),
                    )
                    .await?;
                    return Ok(());
                }
                let command = PaymentCommand::AuthorizePayment {
                    order_id: parse_order_id(order_id)?,
                    customer_id: *customer_id,
                    amount: *total,
                    provider: DEMO_PROVIDER.to_owned(),
                    provider_reference: format!("{DEMO_PROVIDER}-{order_id}"),
                };
                self.step(
                    tx,
                    &self.payments,
                    cause,
                    "authorize-payment",
                    order_id,
                    command,
                    |e| matches!(e, PaymentError::AlreadyAuthorized),
                )
                .await?;
                Ok(())
            }
            OrderEvent::OrderAccepted {
                estimated_preparation_minutes,
                accepted_at,
            } => {
                disarm(tx, order_id).await?;
                let ready_at = *accepted_at
                    + chrono::Duration::minutes(i64::from(*estimated_preparation_minutes));
                self.request_delivery(tx, cause, ready_at).await
            }
            OrderEvent::OrderReady { ready_at } => {
                // The estimate stops waiting for the preparation the store first expected. A
                // delivery never requested (its request is a stuck flow of its own) needs
                // nothing; one already over ignores it.
                let command = DeliveryCommand::MarkFoodReady {
                    ready_at: *ready_at,
                };
                self.step(
                    tx,
                    &self.deliveries,
                    cause,
                    "food-ready",
                    order_id,
                    command,
                    |e| matches!(e, DeliveryError::NotFound),
                )
                .await?;
                Ok(())
            }
            OrderEvent::OrderRejected { .. } | OrderEvent::OrderCancelled { .. } => {
                disarm(tx, order_id).await?;
                self.restore_points(tx, cause).await?;
                // A delivery may have been requested (a store can cancel while preparing); one
                // never requested, or already over (failed, returned), needs nothing.
                let command = DeliveryCommand::CancelDelivery {
                    reason: format!("order {}", cause.event_type),
                };
                self.step(
                    tx,
                    &self.deliveries,
                    cause,
                    "cancel-delivery",
                    order_id,
                    command,
                    |e| {
                        matches!(
                            e,
                            DeliveryError::NotFound | DeliveryError::InvalidTransition { .. }
                        )
                    },
                )
                .await?;
                // A payment never authorized (the points could not be redeemed), or already
                // voided or failed, needs nothing.
                let command = PaymentCommand::VoidPayment {
                    reason: format!("order {}", cause.event_type),
                };
                self.step(
                    tx,
                    &self.payments,
                    cause,
                    "void-payment",
                    order_id,
                    command,
                    |e| matches!(e, PaymentError::NotFound) || payment_in(e, &["Voided", "Failed"]),
                )
                .await?;
                Ok(())
            }
            OrderEvent::OrderModified { total, .. } => {
                sqlx::query("UPDATE order_flow.orders SET total_minor = $2 WHERE order_id = $1")
                    .bind(order_id)
                    .bind(total.minor())
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
            OrderEvent::OrderDelivered { .. } => {
                // The order's current total: less than the authorization if it was modified
                // down after confirmation (the rest of the authorization is released).
                let facts = self.facts(tx, order_id).await?;
                let currency = Currency::parse(&facts.currency).map_err(event_error)?;
                let amount = Money::new(facts.total_minor, currency).map_err(event_error)?;
                let command = PaymentCommand::CapturePayment {
                    amount: Some(amount),
                };
                self.step(
                    tx,
                    &self.payments,
                    cause,
                    "capture-payment",
                    order_id,
                    command,
                    |e| payment_in(e, &["Captured", "PartiallyRefunded", "Refunded"]),
                )
                .await?;
                Ok(())
            }
            OrderEvent::OrderCompleted { .. } => self.earn_points(tx, cause).await,
            // Listed, not `_`: a new order event (a tip, a surcharge) must be decided here.
            OrderEvent::OrderConfirmed { .. }
            | OrderEvent::PreparationStarted { .. }
            | OrderEvent::OrderOutForDelivery { .. }
            | OrderEvent::OrderRated { .. } => Ok(()),
        }
    }

    async fn facts(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        order_id: &str,
    ) -> Result<OrderFacts, ProjectionError> {
        let facts: Option<OrderFacts> = sqlx::query_as(
            "SELECT customer_id, region, total_minor, currency, store_id, dropoff_latitude, \
                    dropoff_longitude, points_redeemed, refunded_minor \
             FROM order_flow.orders WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(&mut **tx)
        .await?;
        facts.ok_or_else(|| {
            ProjectionError::Event(format!(
                "order {order_id} moved on but its placement was never seen"
            ))
        })
    }

    async fn request_delivery(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        preparation_ready_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let step = "request-delivery";
        let facts = self.facts(tx, order_id).await?;
        let region = RegionCode::parse(facts.region).map_err(event_error)?;
        let store = facts.store_id.map(StoreId::from_uuid);
        let catalogue = self.catalogue.current();
        let Some(store_id) = store else {
            let reason = "the order names no store".to_owned();
            return self
                .stuck(tx, cause, step, None, "RequestDelivery", reason)
                .await;
        };
        let Some(store) = catalogue.stores.get(&store_id) else {
            let reason = format!("store {store_id} is not in the catalogue; add it, then retry");
            return self
                .stuck(tx, cause, step, None, "RequestDelivery", reason)
                .await;
        };
        let Some(settings) = catalogue.regions.get(&region) else {
            let reason = format!("region `{region}` is not in the catalogue; add it, then retry");
            return self
                .stuck(tx, cause, step, None, "RequestDelivery", reason)
                .await;
        };
        let (pickup, dropoff) = match (
            GeoPoint::new(store.latitude, store.longitude),
            GeoPoint::new(
                facts.dropoff_latitude.unwrap_or_default(),
                facts.dropoff_longitude.unwrap_or_default(),
            ),
        ) {
            (Ok(pickup), Ok(dropoff)) => (pickup, dropoff),
            (Err(e), _) | (_, Err(e)) => {
                return self
                    .stuck(tx, cause, step, None, "RequestDelivery", e.to_string())
                    .await;
            }
        };
        let command = DeliveryCommand::RequestDelivery {
            order_id: parse_order_id(order_id)?,
            store_id,
            region,
            pickup,
            dropoff,
            preparation_ready_at,
            average_speed_kmh: settings.courier_speed_kmh,
        };
        self.step(tx, &self.deliveries, cause, step, order_id, command, |e| {
            matches!(e, DeliveryError::AlreadyRequested)
        })
        .await?;
        Ok(())
    }

    /// Gives back the points a cancelled or rejected order redeemed (once: the ledger refuses a
    /// second restore, and refuses when the redemption never happened).
    async fn restore_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let facts = self.facts(tx, order_id).await?;
        if facts.points_redeemed == 0 {
            return Ok(());
        }
        let step = "restore-points";
        let command = RewardsCommand::RestoreRedemption {
            order_id: parse_order_id(order_id)?,
            idempotency_key: self.context(cause, step).command_id.to_string(),
        };
        let customer = facts.customer_id.to_string();
        self.step(tx, &self.rewards, cause, step, &customer, command, |e| {
            matches!(
                e,
                RewardsError::NoRedemptionForOrder(_) | RewardsError::RedemptionAlreadyRestored(_)
            )
        })
        .await?;
        Ok(())
    }

    async fn on_delivery(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        event: &DeliveryEvent,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        // The order statuses in which each reaction is moot (already there, or over).
        let (step, command, moot): (_, _, &[&str]) = match event {
            DeliveryEvent::PickedUpAtStore { .. } => (
                "hand-to-courier",
                OrderCommand::HandToCourier,
                &[
                    "OutForDelivery",
                    "Delivered",
                    "Completed",
                    "Cancelled",
                    "Rejected",
                ],
            ),
            DeliveryEvent::DeliveredToCustomer { .. } => (
                "mark-delivered",
                OrderCommand::MarkDelivered,
                &["Delivered", "Completed", "Cancelled", "Rejected"],
            ),
            // The food did not reach the customer: the order ends here, and its cancellation
            // voids the payment and gives the redeemed points back.
            DeliveryEvent::DeliveryFailed { reason, .. } => (
                "cancel-failed-delivery",
                OrderCommand::CancelOrder {
                    by: CancelledBy::System,
                    reason: format!("the delivery failed: {reason:?}"),
                },
                &["Cancelled", "Rejected", "Completed"],
            ),
            // Normally cancelled at the failure already; this covers a failure step that was
            // stuck or a return recorded without one.
            DeliveryEvent::ReturnedToStore { .. } => (
                "cancel-returned-order",
                OrderCommand::CancelOrder {
                    by: CancelledBy::System,
                    reason: "the delivery failed and the food went back to the store".to_owned(),
                },
                &["Cancelled", "Rejected", "Completed"],
            ),
            // Listed, not `_`: a new delivery event must be decided here.
            DeliveryEvent::DeliveryRequested { .. }
            | DeliveryEvent::CourierAssigned { .. }
            | DeliveryEvent::CourierLocationUpdated { .. }
            | DeliveryEvent::EtaUpdated { .. }
            | DeliveryEvent::CourierArrivedAtPickup { .. }
            | DeliveryEvent::CourierArrivedAtDropoff { .. }
            | DeliveryEvent::DeliveryCancelled { .. }
            | DeliveryEvent::CourierRated { .. }
            | DeliveryEvent::FoodMarkedReady { .. } => return Ok(()),
        };
        self.step(tx, &self.orders, cause, step, order_id, command, |e| {
            order_in(e, moot)
        })
        .await?;
        Ok(())
    }

    async fn earn_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let step = "earn-points";
        let facts = self.facts(tx, order_id).await?;
        let region =
            RegionCode::parse(facts.region.clone()).map_err(|e| event_error(e.to_string()))?;
        let catalogue = self.catalogue.current();
        let Some(settings) = catalogue.regions.get(&region) else {
            let reason = format!("region `{region}` has no rewards rates in the catalogue");
            return self
                .stuck(tx, cause, step, None, "EarnPoints", reason)
                .await;
        };
        let currency = Currency::parse(&facts.currency).map_err(|e| event_error(e.to_string()))?;
        let order_total =
            Money::new(facts.total_minor, currency).map_err(|e| event_error(e.to_string()))?;
        let command = RewardsCommand::EarnPoints {
            order_id: parse_order_id(order_id)?,
            order_total,
            points_per_100_minor: settings.points_per_100_minor,
            expires_in_days: settings.points_expire_in_days,
            idempotency_key: self.context(cause, step).command_id.to_string(),
        };
        let customer = facts.customer_id.to_string();
        let earned = self
            .step(tx, &self.rewards, cause, step, &customer, command, |e| {
                matches!(e, RewardsError::AlreadyEarnedForOrder(_))
            })
            .await?;
        if earned == Outcome::Done && facts.refunded_minor > 0 {
            // A refund arrived before the points were earned: take its share back at once.
            let refunded = Money::new(facts.refunded_minor, currency)
                .map_err(|e| event_error(e.to_string()))?;
            self.reverse_points(
                tx,
                cause,
                "reverse-points-refunded-earlier",
                &facts,
                refunded,
            )
            .await?;
        }
        Ok(())
    }

    async fn reverse_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        step: &'static str,
        facts: &OrderFacts,
        refunded_total: Money,
    ) -> Result<(), ProjectionError> {
        let command = RewardsCommand::ReverseEarnedPoints {
            order_id: parse_order_id(&cause.aggregate_id)?,
            refunded_total,
            idempotency_key: self.context(cause, step).command_id.to_string(),
        };
        let customer = facts.customer_id.to_string();
        self.step(tx, &self.rewards, cause, step, &customer, command, |_| {
            false
        })
        .await?;
        Ok(())
    }

    async fn on_payment(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        event: &PaymentEvent,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let (step, command, moot): (_, _, &[&str]) = match event {
            PaymentEvent::PaymentAuthorized {
                provider_reference, ..
            } => (
                "confirm-order",
                OrderCommand::ConfirmPayment {
                    payment_reference: provider_reference.clone(),
                },
                // Confirmed already, or cancelled meanwhile (its cancellation voids the
                // payment).
                &[
                    "Confirmed",
                    "Accepted",
                    "Preparing",
                    "Ready",
                    "OutForDelivery",
                    "Delivered",
                    "Completed",
                    "Cancelled",
                    "Rejected",
                ],
            ),
            PaymentEvent::PaymentCaptured { .. } => (
                "complete-order",
                OrderCommand::CompleteOrder,
                &["Completed", "Cancelled", "Rejected"],
            ),
            PaymentEvent::PaymentRefunded { total_refunded, .. } => {
                sqlx::query(
                    "UPDATE order_flow.orders SET refunded_minor = GREATEST(refunded_minor, $2) \
                     WHERE order_id = $1",
                )
                .bind(order_id)
                .bind(total_refunded.minor())
                .execute(&mut **tx)
                .await?;
                let facts = self.facts(tx, order_id).await?;
                return self
                    .reverse_points(tx, cause, "reverse-points", &facts, *total_refunded)
                    .await;
            }
            _ => return Ok(()),
        };
        self.step(tx, &self.orders, cause, step, order_id, command, |e| {
            order_in(e, moot)
        })
        .await?;
        Ok(())
    }

    /// Fires the accept-by deadlines that are due: each expires its order (a no-op if the store
    /// accepted meanwhile). Deadlines live in PostgreSQL, so they fire after a restart too; rows
    /// are claimed with `SKIP LOCKED`, so several instances share the work.
    pub async fn fire_due_deadlines(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let due: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT key, order_id, correlation_id FROM order_flow.deadlines \
             WHERE fired_at IS NULL AND due_at <= now() ORDER BY due_at LIMIT 100 \
             FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        for (key, order_id, correlation) in &due {
            let mut context = CommandContext::repeatable("system:deadlines", key);
            if !correlation.is_empty() {
                context = context.with_correlation(correlation);
            }
            let outcome = self
                .orders
                .execute(order_id, OrderCommand::ExpireAcceptance, &context)
                .await;
            match outcome {
                Ok(_) => {}
                Err(CommandError::Rejected(e)) => {
                    // Only an order that does not exist refuses an expiry.
                    tracing::warn!(error = %e, %order_id, "deadline of an unknown order dropped");
                }
                Err(e) => {
                    tracing::warn!(error = %e, %order_id, "deadline will be retried");
                    continue;
                }
            }
            sqlx::query("UPDATE order_flow.deadlines SET fired_at = now() WHERE key = $1")
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(due.len())
    }

    /// Carries out the operators' pending stuck-flow requests (see [`crate::stuck`]), one
    /// transaction each; returns how many were handled. A request that fails for a reason other
    /// than a refusal stays pending for the next round.
    pub async fn carry_out_requests(&self, pool: &PgPool) -> Result<usize, ProjectionError> {
        let mut handled = 0;
        loop {
            let mut tx = pool.begin().await?;
            let Some(claimed) = stuck::claim_request(&mut tx).await? else {
                return Ok(handled);
            };
            let cause: Cause = serde_json::from_value(claimed.cause.clone()).map_err(|e| {
                ProjectionError::Event(format!("stuck flow {}: cause unreadable: {e}", claimed.id))
            })?;
            let who = claimed
                .requested_by
                .clone()
                .unwrap_or_else(|| "system:operator".to_owned());
            if claimed.status == "retry_requested" {
                self.react(&mut tx, &cause).await?;
                // Refused again, the record was re-opened (with the new reason) by the step.
                if stuck::status(&mut tx, claimed.id).await?.as_deref() == Some("retry_requested") {
                    let resolution = format!("retried by {who}: the step went through");
                    stuck::close(&mut tx, claimed.id, "retried", &resolution).await?;
                }
            } else {
                self.resolve(&mut tx, &claimed, &cause, &who).await?;
            }
            tx.commit().await?;
            handled += 1;
        }
    }

    /// Ends a stuck order as the system, for an operator: the flow's reaction to the
    /// cancellation compensates (payment voided, points given back, delivery cancelled).
    async fn resolve(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        claimed: &stuck::Claimed,
        cause: &Cause,
        who: &str,
    ) -> Result<(), ProjectionError> {
        let note = claimed.note.as_deref().unwrap_or("no reason given");
        let mut reason = format!("resolved by an operator ({who}): {note}");
        if reason.chars().count() > 500 {
            reason = reason.chars().take(500).collect();
        }
        let mut context =
            CommandContext::repeatable(who, &format!("stuck-flow/{}/resolve", claimed.id))
                .caused_by(cause.event_id);
        if !cause.correlation_id.is_empty() {
            context = context.with_correlation(&cause.correlation_id);
        }
        let command = OrderCommand::CancelOrder {
            by: CancelledBy::System,
            reason: reason.clone(),
        };
        match self
            .orders
            .execute(&claimed.order_id, command, &context)
            .await
        {
            Ok(_) => {
                let resolution = format!(
                    "order cancelled ({reason}); the flow voids the payment, gives back \
                     redeemed points and cancels a requested delivery"
                );
                stuck::resolve_order(tx, &claimed.order_id, &resolution).await?;
            }
            Err(CommandError::Rejected(e)) if order_in(&e, &["Cancelled", "Rejected"]) => {
                let resolution = format!("the order was already over: {e}");
                stuck::resolve_order(tx, &claimed.order_id, &resolution).await?;
            }
            Err(CommandError::Rejected(e)) => {
                let reason = format!("the resolution (cancel the order) was refused: {e}");
                stuck::reopen(tx, claimed.id, &reason).await?;
            }
            Err(e) => return Err(ProjectionError::Event(format!("resolve: {e}"))),
        }
        Ok(())
    }

    /// Runs, every `every` until `shutdown`: due deadlines, operators' stuck-flow requests, and
    /// the `process_manager_stuck_flows_open` gauge.
    pub async fn run_deadlines_until_stopped(
        &self,
        pool: PgPool,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.fire_due_deadlines(&pool).await {
                Ok(0) => {}
                Ok(fired) => tracing::info!(fired, "deadlines fired"),
                Err(e) => tracing::warn!(error = %e, "deadline scheduler round failed"),
            }
            match self.carry_out_requests(&pool).await {
                Ok(0) => {}
                Ok(handled) => tracing::info!(handled, "stuck-flow requests carried out"),
                Err(e) => tracing::warn!(error = %e, "stuck-flow requests will be retried"),
            }
            match stuck::unresolved(&pool).await {
                #[allow(clippy::cast_precision_loss)]
                Ok(open) => metrics::gauge!("process_manager_stuck_flows_open").set(open as f64),
                Err(e) => tracing::warn!(error = %e, "cannot count stuck flows"),
            }
        }
    }
}

/// Drops an order's pending accept-by deadline (the store answered, or the order is over).
async fn disarm(
    tx: &mut Transaction<'static, Postgres>,
    order_id: &str,
) -> Result<(), ProjectionError> {
    sqlx::query("DELETE FROM order_flow.deadlines WHERE order_id = $1 AND fired_at IS NULL")
        .bind(order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn event_error(error: impl std::fmt::Display) -> ProjectionError {
    ProjectionError::Event(error.to_string())
}

fn parse_order_id(raw: &str) -> Result<OrderId, ProjectionError> {
    raw.parse()
        .map_err(|_| ProjectionError::Event(format!("`{raw}` is not an order id")))
}

/// The refusal names an order in one of `statuses`.
fn order_in(e: &OrderError, statuses: &[&str]) -> bool {
    matches!(e, OrderError::InvalidTransition { status, .. } if statuses.contains(status))
}

/// The refusal names a payment in one of `statuses`.
fn payment_in(e: &PaymentError, statuses: &[&str]) -> bool {
    matches!(e, PaymentError::InvalidTransition { status, .. } if statuses.contains(status))
}

/// The variant name of an externally tagged command (`{"RequestDelivery": {...}}` or
/// `"HandToCourier"`).
fn command_type(command: &serde_json::Value) -> String {
    match command {
        serde_json::Value::Object(map) => map.keys().next().cloned().unwrap_or_default(),
        serde_json::Value::String(name) => name.clone(),
        _ => "unknown".to_owned(),
    }
}

/// The cause of a delivered event, if the flow reacts to its type.
fn cause_of(event: &FirstDelivery<'_>) -> Result<Option<Cause>, ProjectionError> {
    if !REACTS_TO.contains(&event.meta.event_type.as_str()) {
        return Ok(None);
    }
    let flow_event = match event.meta.aggregate_type.as_str() {
        "order" => FlowEvent::Order(event.event().map_err(event_error)?),
        "payment" => FlowEvent::Payment(event.event().map_err(event_error)?),
        "delivery" => FlowEvent::Delivery(event.event().map_err(event_error)?),
        _ => return Ok(None),
    };
    Ok(Some(Cause {
        event_id: event.meta.event_id,
        aggregate_type: event.meta.aggregate_type.clone(),
        aggregate_id: event.meta.aggregate_id.clone(),
        event_type: event.meta.event_type.clone(),
        correlation_id: event.meta.correlation_id.clone(),
        traceparent: event.meta.traceparent.clone(),
        event: flow_event,
    }))
}

#[async_trait]
impl Projection for OrderFlow {
    fn name(&self) -> &'static str {
        "order_flow"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order", "payment", "delivery"]
    }

    fn schema_sql(&self) -> &'static str {
        include_str!("../sql/order_flow.sql")
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        match cause_of(&event)? {
            Some(cause) => self.react(tx, &cause).await,
            None => Ok(()),
        }
    }
}
