//! Contracts of the rewards aggregate (topic `rewards`).

use super::Source;

pub(super) const SOURCES: &[Source] = sources!("rewards":
    "PointsEarned" @ "1.0",
    "PointsRedeemed" @ "1.0",
    "RedemptionRestored" @ "1.0",
    "PointsDonated" @ "1.0",
    "PointsExpired" @ "1.0",
    "PointsAdjusted" @ "1.0",
    "SubscriptionStarted" @ "1.0",
    "SubscriptionRenewed" @ "1.0",
    "SubscriptionCancelled" @ "1.0",
    "SubscriptionLapsed" @ "1.0",
    "PointsReversed" @ "1.0",
);
