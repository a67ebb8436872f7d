//! Process managers: react to events on the topics by issuing commands to other aggregates.
//!
//! A process manager runs on the projector runtime (its own consumer group, per-aggregate
//! dedup, checkpoints, dead letters), so it sees every event once per aggregate and in order,
//! and keeps its own state in the same transaction as its checkpoint. Its reactions are
//! *repeatable* commands: the command id is derived from the causing event id and the step, so
//! a redelivered event, or a crash between the command's commit and the checkpoint, issues
//! nothing new (see [`CommandContext::repeatable`]). The correlation id of the causing event is
//! carried into every command it causes.
//!
//! [`OrderFlow`] links orders, payments and rewards:
//! - order placed → debit the points it redeems (if that fails, cancel the order), authorize
//!   the payment (built-in demo provider) and arm the accept-by deadline; payment authorized →
//!   confirm the order;
//! - accept-by deadline passed (durable, see [`OrderFlow::fire_due_deadlines`]) → expire the
//!   order, which cancels it if the store has not accepted;
//! - order rejected or cancelled → cancel its delivery if one was requested, void the payment
//!   and give back the points it redeemed;
//! - order accepted → request a delivery from the store to the customer, with the store's
//!   preparation estimate and the region's courier speed (the delivery publishes its ETA);
//! - delivery picked up → the order is out for delivery; delivered → the order is delivered;
//! - order delivered → capture the payment; payment captured → complete the order;
//! - order completed → earn points at the region's rate.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::delivery::{Delivery, DeliveryCommand, DeliveryEvent, DeliveryServices, GeoPoint};
use domain::order::{Order, OrderCommand, OrderEvent};
use domain::payment::{Payment, PaymentCommand, PaymentEvent, PaymentServices};
use domain::rewards::{RewardsCommand, RewardsLedger, RewardsServices};
use domain::services::{OrderServices, SystemClock};
use domain::{Currency, Money, OrderId, RegionCode, StoreId};
use projections::{FirstDelivery, Projection, ProjectionError};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{CommandBus, CommandContext, CommandError};
use crate::catalogue::CatalogueStore;
use crate::store::EventStoreDb;
use crate::Committed;

/// The payment provider the flow authorizes with. Development and tests use the built-in demo
/// provider, which approves every authorization; a real provider adapter goes here.
pub const DEMO_PROVIDER: &str = "demo";

/// Orders ⇄ payments ⇄ rewards.
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

    fn context(&self, event: &FirstDelivery<'_>, step: &str) -> CommandContext {
        let key = format!("{}/{step}", event.meta.event_id);
        let context = CommandContext::repeatable(format!("system:{}", self.name()), &key)
            .caused_by(event.meta.event_id);
        // The business transaction goes on under whatever id it has (a client's own id is any
        // printable text, not necessarily a UUID).
        if event.meta.correlation_id.is_empty() {
            context
        } else {
            context.with_correlation(&event.meta.correlation_id)
        }
    }

    async fn on_order(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: &FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        let order_id = event.meta.aggregate_id.as_str();
        match event.event::<OrderEvent>().map_err(event_error)? {
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
                .bind(&event.meta.correlation_id)
                .bind(store_id.as_uuid())
                .bind(delivery_address.latitude)
                .bind(delivery_address.longitude)
                .bind(i64::try_from(points_redeemed).unwrap_or(i64::MAX))
                .execute(&mut **tx)
                .await?;
                sqlx::query(
                    "INSERT INTO order_flow.deadlines (key, order_id, due_at, correlation_id) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
                )
                .bind(format!("{order_id}/accept-by"))
                .bind(order_id)
                .bind(accept_by)
                .bind(&event.meta.correlation_id)
                .execute(&mut **tx)
                .await?;
                if points_redeemed > 0 {
                    let step = "redeem-points";
                    let context = self.context(event, step);
                    let command = RewardsCommand::RedeemPoints {
                        order_id: parse_order_id(order_id)?,
                        points: points_redeemed,
                        idempotency_key: context.command_id.to_string(),
                    };
                    let customer = customer_id.to_string();
                    match self.rewards.execute(&customer, command, &context).await {
                        Ok(_) => {}
                        Err(CommandError::Rejected(refusal)) => {
                            // The discount cannot be paid for with points: the order cannot
                            // stand as priced.
                            let step = "cancel-unpaid-redemption";
                            let context = self.context(event, step);
                            let command = OrderCommand::CancelOrder {
                                by: domain::order::CancelledBy::System,
                                reason: format!("the points could not be redeemed: {refusal}"),
                            };
                            return settle(
                                step,
                                self.orders.execute(order_id, command, &context).await,
                            );
                        }
                        Err(e) => return Err(ProjectionError::Event(format!("{step}: {e}"))),
                    }
                }
                let command = PaymentCommand::AuthorizePayment {
                    order_id: parse_order_id(order_id)?,
                    customer_id,
                    amount: total,
                    provider: DEMO_PROVIDER.to_owned(),
                    provider_reference: format!("{DEMO_PROVIDER}-{order_id}"),
                };
                let step = "authorize-payment";
                let context = self.context(event, step);
                settle(
                    step,
                    self.payments.execute(order_id, command, &context).await,
                )
            }
            OrderEvent::OrderAccepted {
                estimated_preparation_minutes,
                accepted_at,
            } => {
                disarm(tx, order_id).await?;
                let ready_at = accepted_at
                    + chrono::Duration::minutes(i64::from(estimated_preparation_minutes));
                self.request_delivery(tx, event, ready_at).await
            }
            OrderEvent::OrderReady { ready_at } => {
                // The estimate stops waiting for the preparation the store first expected.
                let step = "food-ready";
                let context = self.context(event, step);
                settle(
                    step,
                    self.deliveries
                        .execute(
                            order_id,
                            DeliveryCommand::MarkFoodReady { ready_at },
                            &context,
                        )
                        .await,
                )
            }
            OrderEvent::OrderRejected { .. } | OrderEvent::OrderCancelled { .. } => {
                disarm(tx, order_id).await?;
                self.restore_points(tx, event).await?;
                // A delivery may have been requested (a store can cancel while preparing).
                let step = "cancel-delivery";
                let context = self.context(event, step);
                let command = DeliveryCommand::CancelDelivery {
                    reason: format!("order {}", event.meta.event_type),
                };
                settle(
                    step,
                    self.deliveries.execute(order_id, command, &context).await,
                )?;
                let command = PaymentCommand::VoidPayment {
                    reason: format!("order {}", event.meta.event_type),
                };
                let step = "void-payment";
                let context = self.context(event, step);
                settle(
                    step,
                    self.payments.execute(order_id, command, &context).await,
                )
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
                let step = "capture-payment";
                let command = PaymentCommand::CapturePayment {
                    amount: Some(amount),
                };
                let context = self.context(event, step);
                settle(
                    step,
                    self.payments.execute(order_id, command, &context).await,
                )
            }
            OrderEvent::OrderCompleted { .. } => self.earn_points(tx, event).await,
            _ => Ok(()),
        }
    }

    async fn facts(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        order_id: &str,
    ) -> Result<OrderFacts, ProjectionError> {
        let facts: Option<OrderFacts> = sqlx::query_as(
            "SELECT customer_id, region, total_minor, currency, store_id, dropoff_latitude, \
                    dropoff_longitude, points_redeemed \
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
        event: &FirstDelivery<'_>,
        preparation_ready_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), ProjectionError> {
        let order_id = event.meta.aggregate_id.as_str();
        let facts = self.facts(tx, order_id).await?;
        let region = RegionCode::parse(facts.region).map_err(event_error)?;
        let store = facts.store_id.map(StoreId::from_uuid);
        let catalogue = self.catalogue.current();
        let (Some(store_id), Some(store), Some(settings)) = (
            store,
            store.and_then(|s| catalogue.stores.get(&s)),
            catalogue.regions.get(&region),
        ) else {
            tracing::warn!(%order_id, "store or region not in the catalogue; no delivery requested");
            return Ok(());
        };
        let pickup = GeoPoint::new(store.latitude, store.longitude).map_err(event_error)?;
        let dropoff = GeoPoint::new(
            facts.dropoff_latitude.unwrap_or_default(),
            facts.dropoff_longitude.unwrap_or_default(),
        )
        .map_err(event_error)?;
        let command = DeliveryCommand::RequestDelivery {
            order_id: parse_order_id(order_id)?,
            store_id,
            region,
            pickup,
            dropoff,
            preparation_ready_at,
            average_speed_kmh: settings.courier_speed_kmh,
        };
        let step = "request-delivery";
        let context = self.context(event, step);
        settle(
            step,
            self.deliveries.execute(order_id, command, &context).await,
        )
    }

    /// Gives back the points a cancelled or rejected order redeemed (once: the ledger refuses a
    /// second restore, and refuses when the redemption never happened).
    async fn restore_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: &FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        let order_id = event.meta.aggregate_id.as_str();
        let facts = self.facts(tx, order_id).await?;
        if facts.points_redeemed == 0 {
            return Ok(());
        }
        let step = "restore-points";
        let context = self.context(event, step);
        let command = RewardsCommand::RestoreRedemption {
            order_id: parse_order_id(order_id)?,
            idempotency_key: context.command_id.to_string(),
        };
        let customer = facts.customer_id.to_string();
        settle(
            step,
            self.rewards.execute(&customer, command, &context).await,
        )
    }

    async fn on_delivery(&self, event: &FirstDelivery<'_>) -> Result<(), ProjectionError> {
        let order_id = event.meta.aggregate_id.as_str();
        let (step, command) = match event.event::<DeliveryEvent>().map_err(event_error)? {
            DeliveryEvent::PickedUpAtStore { .. } => {
                ("hand-to-courier", OrderCommand::HandToCourier)
            }
            DeliveryEvent::DeliveredToCustomer { .. } => {
                ("mark-delivered", OrderCommand::MarkDelivered)
            }
            _ => return Ok(()),
        };
        let context = self.context(event, step);
        settle(step, self.orders.execute(order_id, command, &context).await)
    }

    async fn earn_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: &FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        let order_id = event.meta.aggregate_id.as_str();
        let facts = self.facts(tx, order_id).await?;
        let region = RegionCode::parse(facts.region).map_err(|e| event_error(e.to_string()))?;
        let catalogue = self.catalogue.current();
        let Some(settings) = catalogue.regions.get(&region) else {
            tracing::warn!(%region, "no rewards rates for the region; no points earned");
            return Ok(());
        };
        let currency = Currency::parse(&facts.currency).map_err(|e| event_error(e.to_string()))?;
        let order_total =
            Money::new(facts.total_minor, currency).map_err(|e| event_error(e.to_string()))?;
        let step = "earn-points";
        let context = self.context(event, step);
        let command = RewardsCommand::EarnPoints {
            order_id: parse_order_id(order_id)?,
            order_total,
            points_per_100_minor: settings.points_per_100_minor,
            expires_in_days: settings.points_expire_in_days,
            idempotency_key: context.command_id.to_string(),
        };
        let customer = facts.customer_id.to_string();
        settle(
            step,
            self.rewards.execute(&customer, command, &context).await,
        )
    }

    async fn on_payment(&self, event: &FirstDelivery<'_>) -> Result<(), ProjectionError> {
        let order_id = event.meta.aggregate_id.as_str();
        let (step, command) = match event.event::<PaymentEvent>().map_err(event_error)? {
            PaymentEvent::PaymentAuthorized {
                provider_reference, ..
            } => (
                "confirm-order",
                OrderCommand::ConfirmPayment {
                    payment_reference: provider_reference,
                },
            ),
            PaymentEvent::PaymentCaptured { .. } => ("complete-order", OrderCommand::CompleteOrder),
            _ => return Ok(()),
        };
        let context = self.context(event, step);
        settle(step, self.orders.execute(order_id, command, &context).await)
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
            if let Err(e) = settle("expire-acceptance", outcome) {
                tracing::warn!(error = %e, %order_id, "deadline will be retried");
                continue;
            }
            sqlx::query("UPDATE order_flow.deadlines SET fired_at = now() WHERE key = $1")
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(due.len())
    }

    /// Fires due deadlines every `every` until `shutdown`.
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

/// A rule refused the command: a legitimate outcome (the order moved on meanwhile), not a fault.
fn settle<E: std::error::Error>(
    step: &str,
    result: Result<Committed, CommandError<E>>,
) -> Result<(), ProjectionError> {
    match result {
        Ok(_) => Ok(()),
        Err(CommandError::Rejected(e)) => {
            metrics::counter!("process_manager_refusals_total", "step" => step.to_owned())
                .increment(1);
            tracing::info!(step, reason = %e, "the target refused the reaction");
            Ok(())
        }
        Err(e) => Err(ProjectionError::Event(format!("{step}: {e}"))),
    }
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
        match event.meta.aggregate_type.as_str() {
            "order" => self.on_order(tx, &event).await,
            "payment" => self.on_payment(&event).await,
            "delivery" => self.on_delivery(&event).await,
            _ => Ok(()),
        }
    }
}
