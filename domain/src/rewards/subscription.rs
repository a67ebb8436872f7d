//! The subscription commands (start, renew, cancel, lapse): the rule each one enforces, what
//! its event does to the ledger, and the benefits a running subscription gives.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{RewardsError, RewardsEvent, RewardsLedger, MAX_MULTIPLIER_BP, NO_MULTIPLIER_BP};

/// A subscription plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubscriptionTier {
    Standard,
    Plus,
    Premium,
}

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubscriptionStatus {
    /// Running, renews.
    Active,
    /// Running until `until`, will not renew.
    Cancelled,
    /// Over.
    Lapsed,
}

/// The customer's subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub tier: SubscriptionTier,
    pub multiplier_bp: u32,
    pub free_delivery: bool,
    pub until: DateTime<Utc>,
    pub status: SubscriptionStatus,
}

impl Subscription {
    /// Whether its benefits apply at `now`: not lapsed and before its end.
    pub fn is_running_at(&self, now: DateTime<Utc>) -> bool {
        self.status != SubscriptionStatus::Lapsed && now < self.until
    }
}

/// What a subscription command decides: one event, or nothing to record.
type Decision = Result<Option<RewardsEvent>, RewardsError>;

impl RewardsLedger {
    /// The earning multiplier at `now`: the subscription's while it runs, else 1x.
    pub fn multiplier_bp_at(&self, now: DateTime<Utc>) -> u32 {
        self.subscription
            .as_ref()
            .filter(|s| s.is_running_at(now))
            .map_or(NO_MULTIPLIER_BP, |s| s.multiplier_bp)
    }

    /// Whether deliveries are free at `now`.
    pub fn free_delivery_at(&self, now: DateTime<Utc>) -> bool {
        self.subscription
            .as_ref()
            .is_some_and(|s| s.free_delivery && s.is_running_at(now))
    }

    fn running_subscription(&self, now: DateTime<Utc>) -> Option<&Subscription> {
        self.subscription.as_ref().filter(|s| s.is_running_at(now))
    }

    /// Starting a subscription: a multiplier of 1x to 5x, an end after now, and none running.
    pub(super) fn start_subscription(
        &self,
        now: DateTime<Utc>,
        tier: SubscriptionTier,
        multiplier_bp: u32,
        free_delivery: bool,
        until: DateTime<Utc>,
        idempotency_key: String,
    ) -> Decision {
        if !(NO_MULTIPLIER_BP..=MAX_MULTIPLIER_BP).contains(&multiplier_bp) {
            return Err(RewardsError::InvalidMultiplier);
        }
        if until <= now {
            return Err(RewardsError::InvalidUntil);
        }
        if let Some(running) = self.running_subscription(now) {
            return Err(RewardsError::SubscriptionAlreadyActive(running.until));
        }
        Ok(Some(RewardsEvent::SubscriptionStarted {
            tier,
            multiplier_bp,
            free_delivery,
            until,
            idempotency_key,
            started_at: now,
        }))
    }

    /// Renewing: only a running subscription (cancelled or not), only to a later end.
    pub(super) fn renew_subscription(
        &self,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        idempotency_key: String,
    ) -> Decision {
        let running = self
            .running_subscription(now)
            .ok_or(RewardsError::NoActiveSubscription)?;
        if until <= running.until {
            return Err(RewardsError::RenewalMustExtend(running.until));
        }
        Ok(Some(RewardsEvent::SubscriptionRenewed {
            until,
            idempotency_key,
            renewed_at: now,
        }))
    }

    /// Cancelling: only a running subscription not already cancelled; it ends at its end date.
    pub(super) fn cancel_subscription(
        &self,
        now: DateTime<Utc>,
        idempotency_key: String,
    ) -> Decision {
        let running = self
            .running_subscription(now)
            .ok_or(RewardsError::NoActiveSubscription)?;
        if running.status == SubscriptionStatus::Cancelled {
            return Err(RewardsError::SubscriptionAlreadyCancelled(running.until));
        }
        Ok(Some(RewardsEvent::SubscriptionCancelled {
            ends_at: running.until,
            idempotency_key,
            cancelled_at: now,
        }))
    }

    /// Lapsing: recorded once the end date has passed; before it, or once lapsed, nothing.
    pub(super) fn lapse_subscription(
        &self,
        now: DateTime<Utc>,
        idempotency_key: String,
    ) -> Decision {
        // A timer that fires early (the customer renewed meanwhile), late or twice changes
        // nothing.
        match &self.subscription {
            None => Err(RewardsError::NoSubscription),
            Some(s) if s.status == SubscriptionStatus::Lapsed || now < s.until => Ok(None),
            Some(_) => Ok(Some(RewardsEvent::SubscriptionLapsed {
                idempotency_key,
                lapsed_at: now,
            })),
        }
    }

    /// `SubscriptionStarted`: the subscription, active.
    pub(super) fn apply_subscription_started(
        &mut self,
        tier: SubscriptionTier,
        multiplier_bp: u32,
        free_delivery: bool,
        until: DateTime<Utc>,
    ) {
        self.subscription = Some(Subscription {
            tier,
            multiplier_bp,
            free_delivery,
            until,
            status: SubscriptionStatus::Active,
        });
    }

    /// `SubscriptionRenewed`: the new end, and active again (a cancellation taken back).
    pub(super) fn apply_subscription_renewed(&mut self, until: DateTime<Utc>) {
        if let Some(s) = self.subscription.as_mut() {
            s.until = until;
            s.status = SubscriptionStatus::Active;
        }
    }

    /// `SubscriptionCancelled` and `SubscriptionLapsed`: the subscription's new status.
    pub(super) fn apply_subscription_status(&mut self, status: SubscriptionStatus) {
        if let Some(s) = self.subscription.as_mut() {
            s.status = status;
        }
    }
}
