//! The Delivery aggregate: one per order (its aggregate id is the order id as text), from the
//! request to a courier handing the food over, with the side branches a delivery platform needs
//! (cancelled before pickup, failed at the door, returned to the store) and a courier rating
//! once delivered.
//!
//! The lifecycle only moves forward ([`DeliveryStatus::rank`] never decreases):
//!
//! ```text
//! Requested → CourierAssigned → (ArrivedAtPickup) → PickedUp → (ArrivedAtDropoff) → Delivered
//! Requested | CourierAssigned | ArrivedAtPickup → Cancelled      (before pickup only)
//! PickedUp | ArrivedAtDropoff → Failed → Returned                (the food goes back)
//! ```
//!
//! The arrivals in brackets are optional. A courier can be replaced until they reach the store.
//!
//! Courier locations arrive often and out of order: the newest by device time is kept, older
//! ones are ignored without an event. After every accepted command the estimated arrival is
//! recomputed ([`eta`]) and published as an `EtaUpdated` event, with its uncertainty, when it
//! moved noticeably. The region's average courier speed and the store's preparation estimate
//! arrive in [`DeliveryCommand::RequestDelivery`] (the process manager reads them from the
//! region settings and the order), so the aggregate stays pure.

pub mod eta;
pub mod geo;
mod lifecycle;

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::services::Clock;
use crate::{CourierId, OrderId, RegionCode, StoreId};

pub use eta::{estimate_arrival, Eta, EtaInput, Leg};
pub use geo::{haversine_meters, GeoPoint, InvalidCoordinates};

/// Aggregate type name in the event store and on the topics. Never renamed.
pub const AGGREGATE_TYPE: &str = "delivery";

/// The fastest average courier speed a region may declare, in km/h.
pub const MAX_AVERAGE_SPEED_KMH: u32 = 120;
/// The farthest a store may deliver, great-circle. Farther means bad coordinates (swapped
/// latitude and longitude are the classic), not a real delivery.
pub const MAX_DELIVERY_DISTANCE_KM: u32 = 100;
/// How far ahead the preparation estimate may be.
pub const MAX_PREPARATION_AHEAD_HOURS: i64 = 24;
/// How far a device clock may run ahead of the server. A location stamped further ahead would
/// win over every later real one, so it is refused.
pub const MAX_DEVICE_CLOCK_AHEAD_MINUTES: i64 = 5;
/// The longest cancellation reason.
pub const MAX_REASON_CHARS: usize = 500;
/// The longest rating comment.
pub const MAX_COMMENT_CHARS: usize = 2000;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum DeliveryStatus {
    #[default]
    New,
    Requested,
    CourierAssigned,
    ArrivedAtPickup,
    PickedUp,
    ArrivedAtDropoff,
    Failed,
    Delivered,
    Returned,
    Cancelled,
}

impl DeliveryStatus {
    /// Position in the lifecycle; side branches rank above every state they can leave from.
    pub const fn rank(self) -> u8 {
        match self {
            Self::New => 0,
            Self::Requested => 1,
            Self::CourierAssigned => 2,
            Self::ArrivedAtPickup => 3,
            Self::PickedUp => 4,
            Self::ArrivedAtDropoff => 5,
            Self::Failed => 6,
            Self::Delivered | Self::Returned | Self::Cancelled => 7,
        }
    }

    /// Whether nothing can happen to the delivery any more (but a rating once delivered).
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Delivered | Self::Returned | Self::Cancelled)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::New => "New",
            Self::Requested => "Requested",
            Self::CourierAssigned => "CourierAssigned",
            Self::ArrivedAtPickup => "ArrivedAtPickup",
            Self::PickedUp => "PickedUp",
            Self::ArrivedAtDropoff => "ArrivedAtDropoff",
            Self::Failed => "Failed",
            Self::Delivered => "Delivered",
            Self::Returned => "Returned",
            Self::Cancelled => "Cancelled",
        }
    }
}

/// Why a courier could not hand the food over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureReason {
    /// Nobody answered the door or the phone.
    CustomerUnreachable,
    /// The address could not be found or reached.
    AddressNotFound,
    /// The customer refused the order.
    CustomerRefused,
    /// The food was damaged on the way.
    OrderDamaged,
    /// The courier had an accident or a breakdown.
    CourierIncident,
    Other,
}

/// The courier's newest known position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CourierPosition {
    pub position: GeoPoint,
    /// When the device took the fix (its own clock).
    pub device_time: DateTime<Utc>,
}

/// What a client (or the delivery process manager) may ask of a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeliveryCommand {
    /// Opens the delivery of an order: where from, where to, and the region's figures the
    /// estimate needs.
    RequestDelivery {
        order_id: OrderId,
        store_id: StoreId,
        region: RegionCode,
        /// The store.
        pickup: GeoPoint,
        /// The customer.
        dropoff: GeoPoint,
        /// When the store expects the food to be ready.
        preparation_ready_at: DateTime<Utc>,
        /// The region's average courier speed.
        average_speed_kmh: u32,
    },
    /// Gives the delivery to a courier; before arrival at the store it can be given to another
    /// one (the previous courier declined or went offline).
    AssignCourier {
        courier_id: CourierId,
    },
    /// A position from the assigned courier's device (the API authorizes the courier).
    UpdateCourierLocation {
        position: GeoPoint,
        device_time: DateTime<Utc>,
    },
    ArriveAtPickup,
    PickUp,
    ArriveAtDropoff,
    Deliver,
    FailDelivery {
        reason: FailureReason,
    },
    /// The courier brought the food of a failed delivery back to the store.
    ReturnToStore,
    /// The store says the food is ready (at `ready_at`, not after now): the estimate stops
    /// waiting for the preparation it expected. Before pickup only; later, or a second time, it
    /// changes nothing.
    MarkFoodReady {
        ready_at: DateTime<Utc>,
    },
    /// Before pickup only; afterwards the food is on its way and the delivery can only fail.
    CancelDelivery {
        reason: String,
    },
    RateCourier {
        stars: u8,
        comment: Option<String>,
    },
}

/// What happened to a delivery. Names are past tense and never renamed: they are the event
/// types in the store and the Avro record names on the topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeliveryEvent {
    DeliveryRequested {
        order_id: OrderId,
        store_id: StoreId,
        region: RegionCode,
        pickup: GeoPoint,
        dropoff: GeoPoint,
        preparation_ready_at: DateTime<Utc>,
        average_speed_kmh: u32,
        requested_at: DateTime<Utc>,
    },
    CourierAssigned {
        courier_id: CourierId,
        assigned_at: DateTime<Utc>,
    },
    CourierLocationUpdated {
        position: GeoPoint,
        device_time: DateTime<Utc>,
        received_at: DateTime<Utc>,
    },
    /// A new estimate of the arrival at the customer, with its uncertainty.
    EtaUpdated {
        expected_at: DateTime<Utc>,
        earliest_at: DateTime<Utc>,
        latest_at: DateTime<Utc>,
        remaining_meters: u32,
        estimated_at: DateTime<Utc>,
    },
    CourierArrivedAtPickup {
        arrived_at: DateTime<Utc>,
    },
    PickedUpAtStore {
        picked_up_at: DateTime<Utc>,
    },
    CourierArrivedAtDropoff {
        arrived_at: DateTime<Utc>,
    },
    DeliveredToCustomer {
        delivered_at: DateTime<Utc>,
    },
    DeliveryFailed {
        reason: FailureReason,
        failed_at: DateTime<Utc>,
    },
    ReturnedToStore {
        returned_at: DateTime<Utc>,
    },
    DeliveryCancelled {
        reason: String,
        cancelled_at: DateTime<Utc>,
    },
    CourierRated {
        courier_id: CourierId,
        stars: u8,
        comment: Option<String>,
        rated_at: DateTime<Utc>,
    },
    /// The store marked the food ready at `ready_at`; the delivery learned it at `marked_at`.
    FoodMarkedReady {
        ready_at: DateTime<Utc>,
        marked_at: DateTime<Utc>,
    },
}

impl DeliveryEvent {
    /// Every event type, for catalogues and tests. Never reorder or rename.
    pub const TYPES: [&'static str; 13] = [
        "DeliveryRequested",
        "CourierAssigned",
        "CourierLocationUpdated",
        "EtaUpdated",
        "CourierArrivedAtPickup",
        "PickedUpAtStore",
        "CourierArrivedAtDropoff",
        "DeliveredToCustomer",
        "DeliveryFailed",
        "ReturnedToStore",
        "DeliveryCancelled",
        "CourierRated",
        "FoodMarkedReady",
    ];

    /// The status a delivery is in after this event, if the event moves it.
    pub const fn status_after(&self) -> Option<DeliveryStatus> {
        use DeliveryStatus as S;
        Some(match self {
            Self::DeliveryRequested { .. } => S::Requested,
            Self::CourierAssigned { .. } => S::CourierAssigned,
            Self::CourierArrivedAtPickup { .. } => S::ArrivedAtPickup,
            Self::PickedUpAtStore { .. } => S::PickedUp,
            Self::CourierArrivedAtDropoff { .. } => S::ArrivedAtDropoff,
            Self::DeliveredToCustomer { .. } => S::Delivered,
            Self::DeliveryFailed { .. } => S::Failed,
            Self::ReturnedToStore { .. } => S::Returned,
            Self::DeliveryCancelled { .. } => S::Cancelled,
            Self::CourierLocationUpdated { .. }
            | Self::EtaUpdated { .. }
            | Self::CourierRated { .. }
            | Self::FoodMarkedReady { .. } => return None,
        })
    }

    /// When it happened in the business's time (for a location, when the server received it).
    pub const fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::DeliveryRequested {
                requested_at: t, ..
            }
            | Self::CourierAssigned { assigned_at: t, .. }
            | Self::CourierLocationUpdated { received_at: t, .. }
            | Self::EtaUpdated {
                estimated_at: t, ..
            }
            | Self::CourierArrivedAtPickup { arrived_at: t }
            | Self::PickedUpAtStore { picked_up_at: t }
            | Self::CourierArrivedAtDropoff { arrived_at: t }
            | Self::DeliveredToCustomer { delivered_at: t }
            | Self::DeliveryFailed { failed_at: t, .. }
            | Self::ReturnedToStore { returned_at: t }
            | Self::DeliveryCancelled {
                cancelled_at: t, ..
            }
            | Self::CourierRated { rated_at: t, .. }
            | Self::FoodMarkedReady { marked_at: t, .. } => *t,
        }
    }
}

impl DomainEvent for DeliveryEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::DeliveryRequested { .. } => "DeliveryRequested",
            Self::CourierAssigned { .. } => "CourierAssigned",
            Self::CourierLocationUpdated { .. } => "CourierLocationUpdated",
            Self::EtaUpdated { .. } => "EtaUpdated",
            Self::CourierArrivedAtPickup { .. } => "CourierArrivedAtPickup",
            Self::PickedUpAtStore { .. } => "PickedUpAtStore",
            Self::CourierArrivedAtDropoff { .. } => "CourierArrivedAtDropoff",
            Self::DeliveredToCustomer { .. } => "DeliveredToCustomer",
            Self::DeliveryFailed { .. } => "DeliveryFailed",
            Self::ReturnedToStore { .. } => "ReturnedToStore",
            Self::DeliveryCancelled { .. } => "DeliveryCancelled",
            Self::CourierRated { .. } => "CourierRated",
            Self::FoodMarkedReady { .. } => "FoodMarkedReady",
        };
        name.to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// A rule a delivery command broke. Each says what the client can do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    #[error("a delivery was already requested for this order; there is one delivery per order")]
    AlreadyRequested,
    #[error("no delivery was requested for this order; request it first")]
    NotFound,
    #[error(
        "the {field} coordinates are out of range: latitude must be within -90..=90 and \
         longitude within -180..=180 degrees"
    )]
    InvalidCoordinates { field: &'static str },
    #[error("the average courier speed must be between 1 and {MAX_AVERAGE_SPEED_KMH} km/h")]
    InvalidSpeed,
    #[error(
        "the drop-off is {km} km from the store, more than {MAX_DELIVERY_DISTANCE_KM} km; \
         check the coordinates (latitude and longitude swapped?)"
    )]
    TooFar { km: u32 },
    #[error(
        "the food cannot be expected ready more than {MAX_PREPARATION_AHEAD_HOURS} hours ahead; \
         request the delivery closer to the time"
    )]
    PreparationTooFarAhead,
    #[error("cannot {action} a delivery that is {status}")]
    InvalidTransition {
        action: &'static str,
        status: &'static str,
    },
    #[error("no courier is assigned yet; assign a courier before sending locations")]
    NoCourierAssigned,
    #[error("the delivery is {0}; locations are no longer tracked")]
    TrackingEnded(&'static str),
    #[error(
        "the device time is more than {MAX_DEVICE_CLOCK_AHEAD_MINUTES} minutes ahead of the \
         server; correct the device clock"
    )]
    DeviceTimeAhead,
    #[error("a cancellation needs a reason")]
    ReasonRequired,
    #[error("stars must be between 1 and 5")]
    InvalidStars,
    #[error("the courier was already rated for this delivery")]
    AlreadyRated,
    #[error("{field} is too long (at most {max} characters)")]
    TooLong { field: &'static str, max: usize },
}

impl DeliveryError {
    /// True when the command conflicts with the delivery's current state (HTTP 409), false
    /// when the command itself is invalid (HTTP 422).
    pub const fn is_state_conflict(&self) -> bool {
        matches!(
            self,
            Self::AlreadyRequested
                | Self::InvalidTransition { .. }
                | Self::NoCourierAssigned
                | Self::TrackingEnded(_)
                | Self::AlreadyRated
        )
    }
}

/// What the delivery aggregate needs from outside.
#[derive(Clone)]
pub struct DeliveryServices {
    pub clock: Arc<dyn Clock>,
}

impl DeliveryServices {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock }
    }
}

impl fmt::Debug for DeliveryServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryServices").finish_non_exhaustive()
    }
}

/// The state a delivery's events add up to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub status: DeliveryStatus,
    pub order_id: Option<OrderId>,
    pub store_id: Option<StoreId>,
    pub pickup: Option<GeoPoint>,
    pub dropoff: Option<GeoPoint>,
    pub preparation_ready_at: Option<DateTime<Utc>>,
    /// When the store marked the food ready, once it did.
    #[serde(default)]
    pub food_ready_at: Option<DateTime<Utc>>,
    pub average_speed_kmh: u32,
    pub courier_id: Option<CourierId>,
    /// The newest position of the current courier by device time.
    pub courier_position: Option<CourierPosition>,
    pub picked_up_at: Option<DateTime<Utc>>,
    /// The last published estimate.
    pub eta: Option<Eta>,
    pub rated: bool,
}

impl Delivery {
    fn require(
        &self,
        allowed: &[DeliveryStatus],
        action: &'static str,
    ) -> Result<(), DeliveryError> {
        if self.status == DeliveryStatus::New {
            return Err(DeliveryError::NotFound);
        }
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(DeliveryError::InvalidTransition {
                action,
                status: self.status.as_str(),
            })
        }
    }

    /// Where the courier is in the journey, while the estimate means something.
    fn leg(&self) -> Option<Leg> {
        use DeliveryStatus as S;
        let position = self.courier_position.map(|p| p.position);
        Some(match self.status {
            S::Requested | S::CourierAssigned => Leg::ToPickup { from: position },
            S::ArrivedAtPickup => Leg::AtPickup,
            S::PickedUp => {
                // The courier was at the store at pickup: a position fixed before that (by the
                // device's clock) says less than the store's own location.
                let since_pickup = self
                    .courier_position
                    .filter(|p| self.picked_up_at.is_some_and(|at| p.device_time >= at));
                Leg::ToDropoff {
                    from: since_pickup.map(|p| p.position).or(self.pickup)?,
                }
            }
            S::ArrivedAtDropoff => Leg::AtDropoff,
            S::New | S::Failed | S::Delivered | S::Returned | S::Cancelled => return None,
        })
    }

    /// The current estimate, if the delivery is under way.
    pub fn estimate(&self, now: DateTime<Utc>) -> Option<Eta> {
        Some(estimate_arrival(&EtaInput {
            now,
            leg: self.leg()?,
            pickup: self.pickup?,
            dropoff: self.dropoff?,
            preparation_ready_at: self.preparation_ready_at?,
            average_speed_kmh: self.average_speed_kmh,
        }))
    }

    /// An `EtaUpdated` when the estimate moved noticeably since the last published one (or
    /// none was published yet).
    fn eta_update(&self, now: DateTime<Utc>) -> Option<DeliveryEvent> {
        let eta = self.estimate(now)?;
        if self
            .eta
            .is_some_and(|previous| !eta.moved_noticeably_from(&previous))
        {
            return None;
        }
        Some(DeliveryEvent::EtaUpdated {
            expected_at: eta.expected_at,
            earliest_at: eta.earliest_at,
            latest_at: eta.latest_at,
            remaining_meters: eta.remaining_meters,
            estimated_at: now,
        })
    }

    fn decide(
        &self,
        command: DeliveryCommand,
        services: &DeliveryServices,
    ) -> Result<Vec<DeliveryEvent>, DeliveryError> {
        let now = services.clock.now();
        let Some(event) = self.decide_one(command, now)? else {
            return Ok(vec![]);
        };
        // The estimate of the state this event leads to.
        let mut next = self.clone();
        next.apply(event.clone());
        Ok(std::iter::once(event).chain(next.eta_update(now)).collect())
    }

    /// What one command records before the estimate is refreshed: each command's rule is in
    /// the function named after it ([`lifecycle`]).
    fn decide_one(
        &self,
        command: DeliveryCommand,
        now: DateTime<Utc>,
    ) -> Result<Option<DeliveryEvent>, DeliveryError> {
        use DeliveryCommand as C;
        match command {
            C::RequestDelivery {
                order_id,
                store_id,
                region,
                pickup,
                dropoff,
                preparation_ready_at,
                average_speed_kmh,
            } => self
                .request_delivery(
                    now,
                    order_id,
                    store_id,
                    region,
                    pickup,
                    dropoff,
                    preparation_ready_at,
                    average_speed_kmh,
                )
                .map(Some),
            C::AssignCourier { courier_id } => self.assign_courier(now, courier_id),
            C::UpdateCourierLocation {
                position,
                device_time,
            } => self.update_courier_location(now, position, device_time),
            C::MarkFoodReady { ready_at } => self.mark_food_ready(now, ready_at),
            C::ArriveAtPickup => self.arrive_at_pickup(now).map(Some),
            C::PickUp => self.pick_up(now).map(Some),
            C::ArriveAtDropoff => self.arrive_at_dropoff(now).map(Some),
            C::Deliver => self.deliver(now).map(Some),
            C::FailDelivery { reason } => self.fail_delivery(now, reason).map(Some),
            C::ReturnToStore => self.return_to_store(now).map(Some),
            C::CancelDelivery { reason } => self.cancel_delivery(now, reason).map(Some),
            C::RateCourier { stars, comment } => self.rate_courier(now, stars, comment).map(Some),
        }
    }
}

impl Aggregate for Delivery {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = DeliveryCommand;
    type Event = DeliveryEvent;
    type Error = DeliveryError;
    type Services = DeliveryServices;

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
            DeliveryEvent::DeliveryRequested {
                order_id,
                store_id,
                pickup,
                dropoff,
                preparation_ready_at,
                average_speed_kmh,
                ..
            } => {
                self.order_id = Some(order_id);
                self.store_id = Some(store_id);
                self.pickup = Some(pickup);
                self.dropoff = Some(dropoff);
                self.preparation_ready_at = Some(preparation_ready_at);
                self.average_speed_kmh = average_speed_kmh;
            }
            DeliveryEvent::CourierAssigned { courier_id, .. } => {
                self.courier_id = Some(courier_id);
                // Positions belong to the previous courier's device.
                self.courier_position = None;
            }
            DeliveryEvent::CourierLocationUpdated {
                position,
                device_time,
                ..
            } => {
                self.courier_position = Some(CourierPosition {
                    position,
                    device_time,
                });
            }
            DeliveryEvent::EtaUpdated {
                expected_at,
                earliest_at,
                latest_at,
                remaining_meters,
                ..
            } => {
                self.eta = Some(Eta {
                    expected_at,
                    earliest_at,
                    latest_at,
                    remaining_meters,
                });
            }
            DeliveryEvent::PickedUpAtStore { picked_up_at } => {
                self.picked_up_at = Some(picked_up_at);
            }
            DeliveryEvent::CourierRated { .. } => self.rated = true,
            DeliveryEvent::FoodMarkedReady { ready_at, .. } => {
                self.food_ready_at = Some(ready_at);
                self.preparation_ready_at = Some(ready_at);
            }
            DeliveryEvent::CourierArrivedAtPickup { .. }
            | DeliveryEvent::CourierArrivedAtDropoff { .. }
            | DeliveryEvent::DeliveredToCustomer { .. }
            | DeliveryEvent::DeliveryFailed { .. }
            | DeliveryEvent::ReturnedToStore { .. }
            | DeliveryEvent::DeliveryCancelled { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests;
