//! Process managers: react to events on the topics by issuing commands to other aggregates.
//!
//! A process manager runs on the projector runtime (its own consumer group, per-aggregate
//! dedup, checkpoints, dead letters), so it sees every event once per aggregate and in order.
//! Its reactions are *repeatable* commands: the command id is derived from the causing event id
//! and the step, so a redelivered event, or a crash between the command's commit and the
//! checkpoint, issues nothing new (see [`CommandContext::repeatable`]). The correlation id of
//! the causing event is carried into every command it causes.
//!
//! [`OrderPaymentFlow`] links orders and payments: an order placed is authorized with the
//! payment provider, an authorized payment confirms the order, a delivered order is captured,
//! a captured payment completes the order, and a rejected or cancelled order voids its payment.

use std::sync::Arc;

use async_trait::async_trait;
use domain::order::{Order, OrderCommand, OrderEvent};
use domain::payment::{Payment, PaymentCommand, PaymentEvent};
use projections::{FirstDelivery, Projection, ProjectionError};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::bus::{CommandBus, CommandContext, CommandError};

/// The payment provider the flow authorizes with. Development and tests use the built-in demo
/// provider, which approves every authorization; a real provider adapter goes here.
pub const DEMO_PROVIDER: &str = "demo";

/// Orders ⇄ payments.
pub struct OrderPaymentFlow {
    orders: Arc<CommandBus<Order>>,
    payments: Arc<CommandBus<Payment>>,
}

impl std::fmt::Debug for OrderPaymentFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderPaymentFlow").finish_non_exhaustive()
    }
}

/// One reaction: a command for one aggregate.
enum Reaction {
    Order(OrderCommand),
    Payment(PaymentCommand),
}

impl OrderPaymentFlow {
    pub fn new(orders: Arc<CommandBus<Order>>, payments: Arc<CommandBus<Payment>>) -> Self {
        Self { orders, payments }
    }

    /// What the flow does about one event (pure: easy to read, easy to test).
    fn react(
        event: &FirstDelivery<'_>,
    ) -> Result<Option<(&'static str, Reaction)>, ProjectionError> {
        let parse = |e: schemas::SchemaError| ProjectionError::Event(e.to_string());
        Ok(match event.meta.aggregate_type.as_str() {
            "order" => match event.event::<OrderEvent>().map_err(parse)? {
                OrderEvent::OrderPlaced {
                    customer_id, total, ..
                } => Some((
                    "authorize-payment",
                    Reaction::Payment(PaymentCommand::AuthorizePayment {
                        order_id: order_id(event)?,
                        customer_id,
                        amount: total,
                        provider: DEMO_PROVIDER.to_owned(),
                        provider_reference: format!("{DEMO_PROVIDER}-{}", event.meta.aggregate_id),
                    }),
                )),
                OrderEvent::OrderDelivered { .. } => Some((
                    "capture-payment",
                    Reaction::Payment(PaymentCommand::CapturePayment { amount: None }),
                )),
                OrderEvent::OrderRejected { .. } | OrderEvent::OrderCancelled { .. } => Some((
                    "void-payment",
                    Reaction::Payment(PaymentCommand::VoidPayment {
                        reason: format!("order {}", event.meta.event_type),
                    }),
                )),
                _ => None,
            },
            "payment" => match event.event::<PaymentEvent>().map_err(parse)? {
                PaymentEvent::PaymentAuthorized {
                    provider_reference, ..
                } => Some((
                    "confirm-order",
                    Reaction::Order(OrderCommand::ConfirmPayment {
                        payment_reference: provider_reference,
                    }),
                )),
                PaymentEvent::PaymentCaptured { .. } => Some((
                    "complete-order",
                    Reaction::Order(OrderCommand::CompleteOrder),
                )),
                _ => None,
            },
            _ => None,
        })
    }
}

fn order_id(event: &FirstDelivery<'_>) -> Result<domain::OrderId, ProjectionError> {
    event.meta.aggregate_id.parse().map_err(|_| {
        ProjectionError::Event(format!("`{}` is not an order id", event.meta.aggregate_id))
    })
}

/// A rule refused the command: a legitimate outcome (the order moved on meanwhile), not a fault.
fn settle<E: std::error::Error>(
    step: &str,
    result: Result<crate::Committed, CommandError<E>>,
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
impl Projection for OrderPaymentFlow {
    fn name(&self) -> &'static str {
        "order_payment_flow"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order", "payment"]
    }

    fn schema_sql(&self) -> &'static str {
        // Only the runtime's bookkeeping: the flow keeps no read model.
        "SELECT 1"
    }

    async fn apply(
        &self,
        _tx: &mut Transaction<'static, Postgres>,
        event: FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        let Some((step, reaction)) = Self::react(&event)? else {
            return Ok(());
        };
        let key = format!("{}/{step}", event.meta.event_id);
        let mut context = CommandContext::repeatable(format!("system:{}", self.name()), &key)
            .caused_by(event.meta.event_id);
        if let Ok(correlation) = Uuid::parse_str(&event.meta.correlation_id) {
            context = context.with_correlation(correlation);
        }
        // Both aggregates are keyed by the order id.
        let id = event.meta.aggregate_id.as_str();
        match reaction {
            Reaction::Order(command) => {
                settle(step, self.orders.execute(id, command, &context).await)
            }
            Reaction::Payment(command) => {
                settle(step, self.payments.execute(id, command, &context).await)
            }
        }
    }
}
