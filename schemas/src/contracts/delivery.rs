//! Contracts of the delivery aggregate (topic `deliveries`).

use super::Source;

pub(super) const SOURCES: &[Source] = sources!("delivery":
    "DeliveryRequested" @ "1.0",
    "CourierAssigned" @ "1.0",
    "CourierLocationUpdated" @ "1.0",
    "EtaUpdated" @ "1.0",
    "CourierArrivedAtPickup" @ "1.0",
    "PickedUpAtStore" @ "1.0",
    "CourierArrivedAtDropoff" @ "1.0",
    "DeliveredToCustomer" @ "1.0",
    "DeliveryFailed" @ "1.0",
    "ReturnedToStore" @ "1.0",
    "DeliveryCancelled" @ "1.0",
    "CourierRated" @ "1.0",
    "FoodMarkedReady" @ "1.0",
);
