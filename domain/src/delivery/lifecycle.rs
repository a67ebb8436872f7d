//! What each delivery command decides: the request and its route checks, the courier and its
//! positions, the food being ready, the journey's moves (each only from the states it names,
//! through [`Delivery::require`], so the lifecycle only moves forward), and the rating.

use chrono::{DateTime, Duration, SubsecRound, Utc};

use super::{
    haversine_meters, Delivery, DeliveryError, DeliveryEvent, DeliveryStatus as S, FailureReason,
    GeoPoint, MAX_AVERAGE_SPEED_KMH, MAX_COMMENT_CHARS, MAX_DELIVERY_DISTANCE_KM,
    MAX_DEVICE_CLOCK_AHEAD_MINUTES, MAX_PREPARATION_AHEAD_HOURS, MAX_REASON_CHARS,
};
use crate::{CourierId, OrderId, RegionCode, StoreId};

/// What a command decides: one event, or nothing to record.
type Decision = Result<Option<DeliveryEvent>, DeliveryError>;

impl Delivery {
    /// Requesting: once per order; valid coordinates, a plausible courier speed, a drop-off
    /// within [`MAX_DELIVERY_DISTANCE_KM`] of the store, and food expected ready within
    /// [`MAX_PREPARATION_AHEAD_HOURS`].
    // One parameter per field of `RequestDelivery`, each bound by name at the one call.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn request_delivery(
        &self,
        now: DateTime<Utc>,
        order_id: OrderId,
        store_id: StoreId,
        region: RegionCode,
        pickup: GeoPoint,
        dropoff: GeoPoint,
        preparation_ready_at: DateTime<Utc>,
        average_speed_kmh: u32,
    ) -> Result<DeliveryEvent, DeliveryError> {
        if self.status != S::New {
            return Err(DeliveryError::AlreadyRequested);
        }
        if !pickup.is_valid() {
            return Err(DeliveryError::InvalidCoordinates { field: "pickup" });
        }
        if !dropoff.is_valid() {
            return Err(DeliveryError::InvalidCoordinates { field: "dropoff" });
        }
        if !(1..=MAX_AVERAGE_SPEED_KMH).contains(&average_speed_kmh) {
            return Err(DeliveryError::InvalidSpeed);
        }
        let meters = haversine_meters(pickup, dropoff);
        if meters > f64::from(MAX_DELIVERY_DISTANCE_KM) * 1_000.0 {
            // At most half the Earth's circumference: fits a u32 easily.
            let km = (meters / 1_000.0).round() as u32;
            return Err(DeliveryError::TooFar { km });
        }
        if preparation_ready_at > now + Duration::hours(MAX_PREPARATION_AHEAD_HOURS) {
            return Err(DeliveryError::PreparationTooFarAhead);
        }
        Ok(DeliveryEvent::DeliveryRequested {
            order_id,
            store_id,
            region,
            pickup,
            dropoff,
            // The contracts carry microseconds.
            preparation_ready_at: preparation_ready_at.trunc_subsecs(6),
            average_speed_kmh,
            requested_at: now,
        })
    }

    /// Assigning a courier: until the courier reaches the store; the same courier again (a
    /// retried dispatch) records nothing.
    pub(super) fn assign_courier(&self, now: DateTime<Utc>, courier_id: CourierId) -> Decision {
        self.require(&[S::Requested, S::CourierAssigned], "assign a courier to")?;
        if self.courier_id == Some(courier_id) {
            return Ok(None);
        }
        Ok(Some(DeliveryEvent::CourierAssigned {
            courier_id,
            assigned_at: now,
        }))
    }

    /// A courier's position: tracked from assignment until the delivery is over (a failed one
    /// still on its way back), with valid coordinates and a device clock not too far ahead. A
    /// position no newer than the kept one (by device time) records nothing.
    pub(super) fn update_courier_location(
        &self,
        now: DateTime<Utc>,
        position: GeoPoint,
        device_time: DateTime<Utc>,
    ) -> Decision {
        match self.status {
            S::New => return Err(DeliveryError::NotFound),
            S::Requested => return Err(DeliveryError::NoCourierAssigned),
            S::Delivered | S::Returned | S::Cancelled => {
                return Err(DeliveryError::TrackingEnded(self.status.as_str()))
            }
            // A failed delivery is still tracked on its way back to the store.
            S::CourierAssigned
            | S::ArrivedAtPickup
            | S::PickedUp
            | S::ArrivedAtDropoff
            | S::Failed => {}
        }
        if !position.is_valid() {
            return Err(DeliveryError::InvalidCoordinates { field: "position" });
        }
        if device_time > now + Duration::minutes(MAX_DEVICE_CLOCK_AHEAD_MINUTES) {
            return Err(DeliveryError::DeviceTimeAhead);
        }
        let device_time = device_time.trunc_subsecs(6);
        if self
            .courier_position
            .is_some_and(|kept| device_time <= kept.device_time)
        {
            // Older than (or as old as) the kept one: arrived out of order, or twice.
            return Ok(None);
        }
        Ok(Some(DeliveryEvent::CourierLocationUpdated {
            position,
            device_time,
            received_at: now,
        }))
    }

    /// The food is ready (at `ready_at`, not after now): recorded once, before pickup; later,
    /// or a second time, it records nothing.
    pub(super) fn mark_food_ready(&self, now: DateTime<Utc>, ready_at: DateTime<Utc>) -> Decision {
        match self.status {
            S::New => return Err(DeliveryError::NotFound),
            S::Requested | S::CourierAssigned | S::ArrivedAtPickup => {}
            // Picked up or over: the food's readiness no longer matters.
            S::PickedUp
            | S::ArrivedAtDropoff
            | S::Delivered
            | S::Failed
            | S::Returned
            | S::Cancelled => return Ok(None),
        }
        if self.food_ready_at.is_some() {
            return Ok(None);
        }
        Ok(Some(DeliveryEvent::FoodMarkedReady {
            ready_at: ready_at.min(now).trunc_subsecs(6),
            marked_at: now,
        }))
    }

    /// Arriving at the store: only with a courier assigned.
    pub(super) fn arrive_at_pickup(
        &self,
        now: DateTime<Utc>,
    ) -> Result<DeliveryEvent, DeliveryError> {
        self.require(&[S::CourierAssigned], "arrive at the store for")?;
        Ok(DeliveryEvent::CourierArrivedAtPickup { arrived_at: now })
    }

    /// Picking up: with a courier assigned, arrived at the store or not.
    pub(super) fn pick_up(&self, now: DateTime<Utc>) -> Result<DeliveryEvent, DeliveryError> {
        self.require(&[S::CourierAssigned, S::ArrivedAtPickup], "pick up")?;
        Ok(DeliveryEvent::PickedUpAtStore { picked_up_at: now })
    }

    /// Arriving at the customer: only once picked up.
    pub(super) fn arrive_at_dropoff(
        &self,
        now: DateTime<Utc>,
    ) -> Result<DeliveryEvent, DeliveryError> {
        self.require(&[S::PickedUp], "arrive at the customer for")?;
        Ok(DeliveryEvent::CourierArrivedAtDropoff { arrived_at: now })
    }

    /// Handing over: once picked up, arrived at the customer or not.
    pub(super) fn deliver(&self, now: DateTime<Utc>) -> Result<DeliveryEvent, DeliveryError> {
        self.require(&[S::PickedUp, S::ArrivedAtDropoff], "hand over")?;
        Ok(DeliveryEvent::DeliveredToCustomer { delivered_at: now })
    }

    /// Failing: only once picked up (before that, the delivery is cancelled instead).
    pub(super) fn fail_delivery(
        &self,
        now: DateTime<Utc>,
        reason: FailureReason,
    ) -> Result<DeliveryEvent, DeliveryError> {
        self.require(&[S::PickedUp, S::ArrivedAtDropoff], "fail")?;
        Ok(DeliveryEvent::DeliveryFailed {
            reason,
            failed_at: now,
        })
    }

    /// Returning to the store: only a failed delivery.
    pub(super) fn return_to_store(
        &self,
        now: DateTime<Utc>,
    ) -> Result<DeliveryEvent, DeliveryError> {
        self.require(&[S::Failed], "return to the store")?;
        Ok(DeliveryEvent::ReturnedToStore { returned_at: now })
    }

    /// Cancelling: only before pickup, with a reason of 1 to [`MAX_REASON_CHARS`] characters.
    pub(super) fn cancel_delivery(
        &self,
        now: DateTime<Utc>,
        reason: String,
    ) -> Result<DeliveryEvent, DeliveryError> {
        self.require(
            &[S::Requested, S::CourierAssigned, S::ArrivedAtPickup],
            "cancel",
        )?;
        if reason.trim().is_empty() {
            return Err(DeliveryError::ReasonRequired);
        }
        if reason.chars().count() > MAX_REASON_CHARS {
            return Err(DeliveryError::TooLong {
                field: "reason",
                max: MAX_REASON_CHARS,
            });
        }
        Ok(DeliveryEvent::DeliveryCancelled {
            reason,
            cancelled_at: now,
        })
    }

    /// Rating the courier: once, on a delivered delivery, 1 to 5 stars with a comment of at
    /// most [`MAX_COMMENT_CHARS`] characters.
    pub(super) fn rate_courier(
        &self,
        now: DateTime<Utc>,
        stars: u8,
        comment: Option<String>,
    ) -> Result<DeliveryEvent, DeliveryError> {
        self.require(&[S::Delivered], "rate the courier of")?;
        if !(1..=5).contains(&stars) {
            return Err(DeliveryError::InvalidStars);
        }
        if comment
            .as_ref()
            .is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS)
        {
            return Err(DeliveryError::TooLong {
                field: "comment",
                max: MAX_COMMENT_CHARS,
            });
        }
        if self.rated {
            return Err(DeliveryError::AlreadyRated);
        }
        let courier_id = self.courier_id.ok_or(DeliveryError::NoCourierAssigned)?;
        Ok(DeliveryEvent::CourierRated {
            courier_id,
            stars,
            comment,
            rated_at: now,
        })
    }
}
