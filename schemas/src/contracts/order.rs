//! Contracts of the order aggregate (topic `orders`).

use super::Source;

pub(super) const SOURCES: &[Source] = sources!("order":
    "OrderPlaced" @ "1.0",
    "OrderConfirmed" @ "1.0",
    "OrderAccepted" @ "1.0",
    "OrderRejected" @ "1.0",
    "PreparationStarted" @ "1.0",
    "OrderReady" @ "1.0",
    "OrderOutForDelivery" @ "1.0",
    "OrderDelivered" @ "1.0",
    "OrderCompleted" @ "1.0",
    "OrderCancelled" @ "2.0",
    "OrderRated" @ "1.0",
    "OrderModified" @ "1.0",
);
