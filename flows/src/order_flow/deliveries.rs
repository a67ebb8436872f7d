//! Requesting the delivery of an order, and the flow's reactions to delivery events.

use super::*;

impl OrderFlow {
    pub(super) async fn request_delivery(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        cause: &Cause,
        preparation_ready_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), ProjectionError> {
        let order_id = cause.aggregate_id.as_str();
        let step = "request-delivery";
        let facts = self.facts(tx, order_id).await?;
        let region = RegionCode::parse(facts.region).map_err(ProjectionError::event)?;
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

    pub(super) async fn on_delivery(
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
}
