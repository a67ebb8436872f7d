//! The flow's reactions to order events.

use super::*;

impl OrderFlow {
    pub(super) async fn on_order(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        event: &OrderEvent,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        match event {
            OrderEvent::OrderPlaced { .. } => self.on_placed(tx, cause, event).await,
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
                self.on_ended(tx, cause).await
            }
            OrderEvent::OrderModified { total, .. } => remember_total(tx, order_id, *total).await,
            OrderEvent::OrderDelivered { .. } => self.capture_payment(tx, cause).await,
            OrderEvent::OrderCompleted { .. } => self.earn_points(tx, cause).await,
            // Listed, not `_`: a new order event (a tip, a surcharge) must be decided here.
            OrderEvent::OrderConfirmed { .. }
            | OrderEvent::PreparationStarted { .. }
            | OrderEvent::OrderOutForDelivery { .. }
            | OrderEvent::OrderRated { .. } => Ok(()),
        }
    }

    /// An order placed: remember it, arm its accept-by deadline, debit the points it redeems
    /// (cancelling it when they cannot be), then authorize its payment.
    async fn on_placed(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        event: &OrderEvent,
    ) -> Result<(), ProjectionError> {
        let OrderEvent::OrderPlaced {
            customer_id,
            total,
            points_redeemed,
            ..
        } = event
        else {
            return Ok(());
        };
        self.remember_placement(tx, cause, event).await?;
        if *points_redeemed > 0
            && !self
                .redeem_points(tx, cause, *customer_id, *points_redeemed)
                .await?
        {
            return Ok(());
        }
        self.authorize_payment(tx, cause, *customer_id, *total)
            .await
    }

    /// The flow's record of an order rebuilt from the order's events in the store (its
    /// placement, then any modification); nothing when the store has no placement.
    pub(super) async fn recall_placement(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        order_id: &str,
    ) -> Result<(), ProjectionError> {
        let stored: Vec<commands::log::StoredEvent> = sqlx::query_as(&format!(
            // Qualified: the flow's transaction searches its own schema only.
            "SELECT {} FROM public.events e \
             WHERE e.aggregate_type = 'order' AND e.aggregate_id = $1 \
               AND e.event_type IN ('OrderPlaced', 'OrderModified') \
             ORDER BY e.sequence",
            commands::log::STORED_COLUMNS
        ))
        .bind(order_id)
        .fetch_all(&mut **tx)
        .await?;
        for stored in stored {
            let (_, payload) = stored.upcast();
            let event: OrderEvent =
                serde_json::from_value(payload).map_err(ProjectionError::event)?;
            let cause = Cause {
                event_id: stored.event_id,
                aggregate_type: stored.aggregate_type.clone(),
                aggregate_id: stored.aggregate_id.clone(),
                event_type: stored.event_type.clone(),
                correlation_id: stored
                    .metadata_text("correlation_id")
                    .unwrap_or_default()
                    .to_owned(),
                traceparent: String::new(),
                event: FlowEvent::Order(event.clone()),
            };
            match &event {
                OrderEvent::OrderPlaced { .. } => {
                    self.remember_placement(tx, &cause, &event).await?;
                }
                OrderEvent::OrderModified { total, .. } => {
                    remember_total(tx, order_id, *total).await?;
                }
                // What the flow keeps of an order is its placement and its total; a new event
                // that changes either must be remembered here too.
                OrderEvent::OrderConfirmed { .. }
                | OrderEvent::OrderAccepted { .. }
                | OrderEvent::OrderRejected { .. }
                | OrderEvent::PreparationStarted { .. }
                | OrderEvent::OrderReady { .. }
                | OrderEvent::OrderOutForDelivery { .. }
                | OrderEvent::OrderDelivered { .. }
                | OrderEvent::OrderCompleted { .. }
                | OrderEvent::OrderCancelled { .. }
                | OrderEvent::OrderRated { .. } => {}
            }
        }
        tracing::info!(%order_id, "the flow's record of the order was read again from the event log");
        Ok(())
    }

    /// The flow's own record of a placed order, and its accept-by deadline.
    async fn remember_placement(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        event: &OrderEvent,
    ) -> Result<(), ProjectionError> {
        let OrderEvent::OrderPlaced {
            customer_id,
            store_id,
            region,
            total,
            accept_by,
            delivery_address,
            points_redeemed,
            ..
        } = event
        else {
            return Ok(());
        };
        let order_id = cause.aggregate_id.as_str();
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
        Ok(())
    }

    /// Debits the points the order redeems; `false` when the ledger refused and the order was
    /// cancelled instead (the discount cannot be paid for with points: the order cannot stand
    /// as priced).
    async fn redeem_points(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        customer_id: CustomerId,
        points: u64,
    ) -> Result<bool, ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let step = "redeem-points";
        let context = self.context(cause, step);
        let command = RewardsCommand::RedeemPoints {
            order_id: parse_order_id(order_id)?,
            points,
            idempotency_key: context.command_id.to_string(),
        };
        let customer = customer_id.to_string();
        match self.rewards.execute(&customer, command, &context).await {
            Ok(_) => Ok(true),
            Err(CommandError::Rejected(refusal)) => {
                let reason = format!("the points could not be redeemed: {refusal}");
                self.cancel_as_system(tx, cause, "cancel-unpaid-redemption", reason)
                    .await?;
                Ok(false)
            }
            Err(e) => Err(ProjectionError::event(format!("{step}: {e}"))),
        }
    }

    /// Authorizes the order's payment with the provider, or cancels the order when the
    /// provider declines (nothing was authorized, so nothing is recorded on the payment; the
    /// cancellation gives the redeemed points back).
    async fn authorize_payment(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        customer_id: CustomerId,
        total: Money,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        if let Some(decline) = demo_decline(&customer_id.to_string()) {
            let reason = format!("the payment was declined: {decline}");
            self.cancel_as_system(tx, cause, "cancel-declined-payment", reason)
                .await?;
            return Ok(());
        }
        let command = PaymentCommand::AuthorizePayment {
            order_id: parse_order_id(order_id)?,
            customer_id,
            amount: total,
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

    /// An order rejected or cancelled: drop its deadline, give back its points, cancel its
    /// delivery and void its payment.
    async fn on_ended(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        disarm(tx, order_id).await?;
        self.restore_points(tx, cause).await?;
        // A delivery may have been requested (a store can cancel while preparing); one never
        // requested, or already over (failed, returned), needs nothing.
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
        // A payment never authorized (the points could not be redeemed), or already voided or
        // failed, needs nothing.
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

    /// An order delivered: capture its current total, less than the authorization if it was
    /// modified down after confirmation (the rest of the authorization is released).
    async fn capture_payment(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let facts = self.facts(tx, order_id).await?;
        let currency = Currency::parse(&facts.currency).map_err(ProjectionError::event)?;
        let amount = Money::new(facts.total_minor, currency).map_err(ProjectionError::event)?;
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

    /// Cancels the order as the system, with `reason` (already over: nothing to do); its
    /// cancellation gives back what it redeemed.
    async fn cancel_as_system(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        step: &'static str,
        reason: String,
    ) -> Result<(), ProjectionError> {
        let command = OrderCommand::CancelOrder {
            by: CancelledBy::System,
            reason,
        };
        self.step(
            tx,
            &self.orders,
            cause,
            step,
            &cause.aggregate_id,
            command,
            |e| order_in(e, &["Cancelled", "Rejected"]),
        )
        .await?;
        Ok(())
    }
}

/// An order's total after a modification.
async fn remember_total(
    tx: &mut Transaction<'static, Postgres>,
    order_id: &str,
    total: Money,
) -> Result<(), ProjectionError> {
    sqlx::query("UPDATE order_flow.orders SET total_minor = $2 WHERE order_id = $1")
        .bind(order_id)
        .bind(total.minor())
        .execute(&mut **tx)
        .await?;
    Ok(())
}
