//! The flow's reactions to payment events.

use super::*;

impl OrderFlow {
    pub(super) async fn on_payment(
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
            // Listed, not `_`: a new payment event (a tip captured later, a chargeback) must
            // be decided here. A void follows the order's end. An authorization the provider
            // later reports failed is left to operators: the capture it blocks becomes a stuck
            // flow, resolved by cancelling the order.
            PaymentEvent::PaymentVoided { .. }
            | PaymentEvent::PaymentFailed { .. }
            | PaymentEvent::ProviderWebhookRecorded { .. } => return Ok(()),
        };
        self.step(tx, &self.orders, cause, step, order_id, command, |e| {
            order_in(e, moot)
        })
        .await?;
        Ok(())
    }
}
