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
use domain::{Currency, CustomerId, Money, OrderId, RegionCode, StoreId};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};
use streams::consumer::{FirstDelivery, Projection, ProjectionError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use demo::demo_decline;
pub use demo::{DEMO_DECLINED_CUSTOMER_PREFIX, DEMO_PROVIDER};
use timers::disarm;

mod deliveries;
mod demo;
mod orders;
mod payments;
mod points;
mod timers;

use commands::stuck;
use commands::{
    CatalogueStore, CommandBus, CommandContext, CommandError, EventStoreDb, TraceParent,
};

/// The flow's name: its schema, and its consumer group after the projector prefix.
pub const NAME: &str = "order_flow";
/// The aggregates whose events the flow reads.
pub const AGGREGATE_TYPES: &[&str] = &["order", "payment", "delivery"];

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

/// Event types of the flow's topics it decided to pass over. Every event type of those topics
/// is in one list or the other (a test holds it so): a new event type is a decision, never
/// silently skipped before the flow's exhaustive matches could point at it.
#[cfg(test)]
const PASSES_OVER: [&str; 16] = [
    "OrderConfirmed",
    "PreparationStarted",
    "OrderOutForDelivery",
    "OrderRated",
    "PaymentFailed",
    "PaymentVoided",
    "ProviderWebhookRecorded",
    "DeliveryRequested",
    "CourierAssigned",
    "CourierLocationUpdated",
    "EtaUpdated",
    "CourierArrivedAtPickup",
    "CourierArrivedAtDropoff",
    "DeliveryCancelled",
    "CourierRated",
    "FoodMarkedReady",
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
            Err(e) => Err(ProjectionError::event(format!("{step}: {e}"))),
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
                cause: serde_json::to_value(cause).map_err(ProjectionError::event)?,
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

    /// What the flow remembers of order `order_id` (from its placement on).
    async fn facts(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        order_id: &str,
    ) -> Result<OrderFacts, ProjectionError> {
        let query = "SELECT customer_id, region, total_minor, currency, store_id, \
                            dropoff_latitude, dropoff_longitude, points_redeemed, refunded_minor \
                     FROM order_flow.orders WHERE order_id = $1";
        let facts: Option<OrderFacts> = sqlx::query_as(query)
            .bind(order_id)
            .fetch_optional(&mut **tx)
            .await?;
        if let Some(facts) = facts {
            return Ok(facts);
        }
        // The flow's state was lost (a disaster recovery, a reset consumer group) while the
        // order moved on: its placement is read again from the event log.
        self.recall_placement(tx, order_id).await?;
        let facts: Option<OrderFacts> = sqlx::query_as(query)
            .bind(order_id)
            .fetch_optional(&mut **tx)
            .await?;
        facts.ok_or_else(|| {
            ProjectionError::event(format!(
                "order {order_id} moved on but its placement was never seen"
            ))
        })
    }
}

fn parse_order_id(raw: &str) -> Result<OrderId, ProjectionError> {
    raw.parse()
        .map_err(|_| ProjectionError::event(format!("`{raw}` is not an order id")))
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
        "order" => FlowEvent::Order(event.event().map_err(ProjectionError::event)?),
        "payment" => FlowEvent::Payment(event.event().map_err(ProjectionError::event)?),
        "delivery" => FlowEvent::Delivery(event.event().map_err(ProjectionError::event)?),
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
        NAME
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        AGGREGATE_TYPES
    }

    fn schema_sql(&self) -> &'static str {
        include_str!("../../sql/order_flow.sql")
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_event_type_of_the_flows_topics_is_either_reacted_to_or_passed_over() {
        let contracts = schemas::Contracts::global().expect("contracts");
        let published: BTreeSet<&str> = contracts
            .iter()
            .filter(|c| AGGREGATE_TYPES.contains(&c.aggregate_type))
            .map(|c| c.event_type)
            .collect();
        let decided: BTreeSet<&str> = REACTS_TO.iter().chain(&PASSES_OVER).copied().collect();
        assert_eq!(
            REACTS_TO.len() + PASSES_OVER.len(),
            decided.len(),
            "an event type is in both lists"
        );
        assert_eq!(
            published, decided,
            "an event type of the flow's topics needs a decision: REACTS_TO or PASSES_OVER"
        );
    }
}
