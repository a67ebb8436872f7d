//! The Rewards aggregate: one customer's loyalty ledger (the aggregate id is the customer id).
//!
//! The ledger is append-only: points are earned on completed orders, redeemed as a discount on
//! an order (and restored if that order is cancelled), donated to a charity, expired and
//! adjusted by an administrator. Earned and credited points live in *lots*, each with its own
//! expiry. Every debit takes points from the lots that expire first, so expiry only ever takes
//! the unspent rest of a lot. A balance check and its debit are one decision of this aggregate;
//! concurrent writes are serialised by the event store's optimistic locking.
//!
//! Rules kept here:
//! - the spendable balance never goes below zero; points past their expiry are not spendable,
//!   even before [`RewardsCommand::ExpirePoints`] records their expiry;
//! - `lifetime_earned` (what tiers use) grows only by points earned on orders, and shrinks only
//!   when a refund takes an order's points back ([`RewardsCommand::ReverseEarnedPoints`]);
//! - every write carries a caller-supplied idempotency key: a key seen before makes the command
//!   a no-op that returns no events (the keys are rebuilt from the events by `apply`);
//! - a subscription multiplies the points earned while it runs (until its end date, even once
//!   cancelled) and gives free delivery for as long.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::services::Clock;
use crate::{CharityCode, Currency, Money, OrderId};

/// Aggregate type name in the event store and on the topics. Never renamed.
pub const AGGREGATE_TYPE: &str = "rewards";

/// The most points one write may move (earn, redeem, donate, adjust).
pub const MAX_POINTS_PER_WRITE: u64 = 1_000_000_000;
/// The longest idempotency key, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;
/// The longest adjustment reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// The longest life of a lot, in days.
pub const MAX_EXPIRY_DAYS: u32 = 3_650;
/// The highest earn rate, in points per 100 minor units of the order total.
pub const MAX_EARN_RATE: u32 = 10_000;
/// The highest donation rate, in minor units per 100 points.
pub const MAX_DONATION_RATE: u32 = 100_000;
/// A multiplier of 1x, in basis points: what earning uses without a running subscription.
pub const NO_MULTIPLIER_BP: u32 = 10_000;
/// The highest subscription multiplier, in basis points (5x).
pub const MAX_MULTIPLIER_BP: u32 = 50_000;

/// A subscription plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubscriptionTier {
    Standard,
    Plus,
    Premium,
}

/// Points taken from (or given back to) one lot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LotPoints {
    /// The lot's number in this ledger (1, 2, ...).
    pub lot: u32,
    pub points: u64,
}

/// What a client may ask of a customer's ledger. Every command carries the caller's
/// idempotency key: the same key again is a no-op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RewardsCommand {
    /// Earn on a completed order: `order_total` minor units at `points_per_100_minor` points per
    /// 100 minor units (the region's rate for the customer's tier), times the multiplier of a
    /// running subscription, rounded down; the points expire after `expires_in_days`.
    EarnPoints {
        order_id: OrderId,
        order_total: Money,
        points_per_100_minor: u32,
        expires_in_days: u32,
        idempotency_key: String,
    },
    /// Spend points as a discount on an order (once per order).
    RedeemPoints {
        order_id: OrderId,
        points: u64,
        idempotency_key: String,
    },
    /// The order was cancelled: give back exactly what it redeemed, to the lots it came from.
    RestoreRedemption {
        order_id: OrderId,
        idempotency_key: String,
    },
    /// The order's payment was refunded, `refunded_total` in all so far: take back the points
    /// the order earned in the same proportion (all of them once the whole total is refunded).
    /// Cumulative, so a repeat, or a partial refund seen after a larger one, takes nothing more.
    /// Points already spent or expired are not clawed into a negative balance: what the
    /// spendable balance cannot cover is written off and recorded as `unrecovered`.
    ReverseEarnedPoints {
        order_id: OrderId,
        refunded_total: Money,
        idempotency_key: String,
    },
    /// Give points to a charity at the region's rate (`minor_per_100_points` minor units of
    /// `currency` per 100 points, rounded down).
    DonatePoints {
        charity: CharityCode,
        points: u64,
        minor_per_100_points: u32,
        currency: Currency,
        idempotency_key: String,
    },
    /// Expire the unspent rest of every lot whose expiry is at or before `as_of` (not after now).
    ExpirePoints {
        as_of: DateTime<Utc>,
        idempotency_key: String,
    },
    /// An administrator's correction: positive points add a lot that expires after
    /// `expires_in_days`; negative points are deducted like a spend (`expires_in_days` unused).
    AdjustPoints {
        points: i64,
        reason: String,
        expires_in_days: u32,
        idempotency_key: String,
    },
    StartSubscription {
        tier: SubscriptionTier,
        /// Points multiplier in basis points, 10 000 (1x) to 50 000 (5x); 15 000 = 1.5x.
        multiplier_bp: u32,
        free_delivery: bool,
        until: DateTime<Utc>,
        idempotency_key: String,
    },
    /// Extend a running subscription (also takes back a cancellation).
    RenewSubscription {
        until: DateTime<Utc>,
        idempotency_key: String,
    },
    /// Stop a running subscription from renewing; its benefits last until its end date.
    CancelSubscription { idempotency_key: String },
    /// The end date passed; records the lapse (a no-op before the end date, or once lapsed).
    LapseSubscription { idempotency_key: String },
}

impl RewardsCommand {
    /// The caller's idempotency key.
    pub fn idempotency_key(&self) -> &str {
        match self {
            Self::EarnPoints {
                idempotency_key, ..
            }
            | Self::RedeemPoints {
                idempotency_key, ..
            }
            | Self::RestoreRedemption {
                idempotency_key, ..
            }
            | Self::ReverseEarnedPoints {
                idempotency_key, ..
            }
            | Self::DonatePoints {
                idempotency_key, ..
            }
            | Self::ExpirePoints {
                idempotency_key, ..
            }
            | Self::AdjustPoints {
                idempotency_key, ..
            }
            | Self::StartSubscription {
                idempotency_key, ..
            }
            | Self::RenewSubscription {
                idempotency_key, ..
            }
            | Self::CancelSubscription { idempotency_key }
            | Self::LapseSubscription { idempotency_key } => idempotency_key,
        }
    }
}

/// What happened to a customer's ledger. Names are past tense and never renamed: they are the
/// event types in the store and the Avro record names on the topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RewardsEvent {
    PointsEarned {
        order_id: OrderId,
        order_total: Money,
        points_per_100_minor: u32,
        /// 10 000 when no subscription was running.
        multiplier_bp: u32,
        points: u64,
        /// The new lot holding these points.
        lot: u32,
        expires_at: DateTime<Utc>,
        idempotency_key: String,
        earned_at: DateTime<Utc>,
    },
    PointsRedeemed {
        order_id: OrderId,
        points: u64,
        lots: Vec<LotPoints>,
        idempotency_key: String,
        redeemed_at: DateTime<Utc>,
    },
    RedemptionRestored {
        order_id: OrderId,
        points: u64,
        lots: Vec<LotPoints>,
        idempotency_key: String,
        restored_at: DateTime<Utc>,
    },
    /// Points earned on a refunded order taken back: `points` from `lots` (the order's own lot
    /// first, then the ones expiring first), and `unrecovered` points that were already spent
    /// or expired, written off. Both leave `lifetime_earned`.
    PointsReversed {
        order_id: OrderId,
        refunded_total: Money,
        points: u64,
        unrecovered: u64,
        lots: Vec<LotPoints>,
        idempotency_key: String,
        reversed_at: DateTime<Utc>,
    },
    PointsDonated {
        charity: CharityCode,
        points: u64,
        minor_per_100_points: u32,
        amount: Money,
        lots: Vec<LotPoints>,
        idempotency_key: String,
        donated_at: DateTime<Utc>,
    },
    PointsExpired {
        points: u64,
        lots: Vec<LotPoints>,
        as_of: DateTime<Utc>,
        idempotency_key: String,
        expired_at: DateTime<Utc>,
    },
    PointsAdjusted {
        /// Signed: a credit is positive, a deduction negative.
        points: i64,
        reason: String,
        /// The new lot of a credit.
        lot: Option<u32>,
        /// When a credit's lot expires.
        expires_at: Option<DateTime<Utc>>,
        /// Where a deduction took its points from (empty for a credit).
        lots: Vec<LotPoints>,
        idempotency_key: String,
        adjusted_at: DateTime<Utc>,
    },
    SubscriptionStarted {
        tier: SubscriptionTier,
        multiplier_bp: u32,
        free_delivery: bool,
        until: DateTime<Utc>,
        idempotency_key: String,
        started_at: DateTime<Utc>,
    },
    SubscriptionRenewed {
        until: DateTime<Utc>,
        idempotency_key: String,
        renewed_at: DateTime<Utc>,
    },
    SubscriptionCancelled {
        /// The benefits last until then.
        ends_at: DateTime<Utc>,
        idempotency_key: String,
        cancelled_at: DateTime<Utc>,
    },
    SubscriptionLapsed {
        idempotency_key: String,
        lapsed_at: DateTime<Utc>,
    },
}

impl RewardsEvent {
    /// Every event type, for catalogues and tests. Never reorder or rename.
    pub const TYPES: [&'static str; 11] = [
        "PointsEarned",
        "PointsRedeemed",
        "RedemptionRestored",
        "PointsDonated",
        "PointsExpired",
        "PointsAdjusted",
        "SubscriptionStarted",
        "SubscriptionRenewed",
        "SubscriptionCancelled",
        "SubscriptionLapsed",
        "PointsReversed",
    ];

    /// The idempotency key of the command that produced this event.
    pub fn idempotency_key(&self) -> &str {
        match self {
            Self::PointsEarned {
                idempotency_key, ..
            }
            | Self::PointsRedeemed {
                idempotency_key, ..
            }
            | Self::RedemptionRestored {
                idempotency_key, ..
            }
            | Self::PointsReversed {
                idempotency_key, ..
            }
            | Self::PointsDonated {
                idempotency_key, ..
            }
            | Self::PointsExpired {
                idempotency_key, ..
            }
            | Self::PointsAdjusted {
                idempotency_key, ..
            }
            | Self::SubscriptionStarted {
                idempotency_key, ..
            }
            | Self::SubscriptionRenewed {
                idempotency_key, ..
            }
            | Self::SubscriptionCancelled {
                idempotency_key, ..
            }
            | Self::SubscriptionLapsed {
                idempotency_key, ..
            } => idempotency_key,
        }
    }

    /// When it happened in the business's time.
    pub const fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::PointsEarned { earned_at: t, .. }
            | Self::PointsRedeemed { redeemed_at: t, .. }
            | Self::RedemptionRestored { restored_at: t, .. }
            | Self::PointsReversed { reversed_at: t, .. }
            | Self::PointsDonated { donated_at: t, .. }
            | Self::PointsExpired { expired_at: t, .. }
            | Self::PointsAdjusted { adjusted_at: t, .. }
            | Self::SubscriptionStarted { started_at: t, .. }
            | Self::SubscriptionRenewed { renewed_at: t, .. }
            | Self::SubscriptionCancelled {
                cancelled_at: t, ..
            }
            | Self::SubscriptionLapsed { lapsed_at: t, .. } => *t,
        }
    }

    /// How the spendable balance changes (signed points; zero for subscription events).
    pub fn balance_change(&self) -> i64 {
        let signed = |points: u64| i64::try_from(points).unwrap_or(i64::MAX);
        match self {
            Self::PointsEarned { points, .. } | Self::RedemptionRestored { points, .. } => {
                signed(*points)
            }
            Self::PointsRedeemed { points, .. }
            | Self::PointsReversed { points, .. }
            | Self::PointsDonated { points, .. }
            | Self::PointsExpired { points, .. } => -signed(*points),
            Self::PointsAdjusted { points, .. } => *points,
            Self::SubscriptionStarted { .. }
            | Self::SubscriptionRenewed { .. }
            | Self::SubscriptionCancelled { .. }
            | Self::SubscriptionLapsed { .. } => 0,
        }
    }
}

impl DomainEvent for RewardsEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::PointsEarned { .. } => "PointsEarned",
            Self::PointsRedeemed { .. } => "PointsRedeemed",
            Self::RedemptionRestored { .. } => "RedemptionRestored",
            Self::PointsReversed { .. } => "PointsReversed",
            Self::PointsDonated { .. } => "PointsDonated",
            Self::PointsExpired { .. } => "PointsExpired",
            Self::PointsAdjusted { .. } => "PointsAdjusted",
            Self::SubscriptionStarted { .. } => "SubscriptionStarted",
            Self::SubscriptionRenewed { .. } => "SubscriptionRenewed",
            Self::SubscriptionCancelled { .. } => "SubscriptionCancelled",
            Self::SubscriptionLapsed { .. } => "SubscriptionLapsed",
        };
        name.to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// A rule a rewards command broke. Each says what the client can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewardsError {
    #[error(
        "the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters, not blank; \
         send one unique key per write"
    )]
    InvalidIdempotencyKey,
    #[error("a write moves between 1 and {MAX_POINTS_PER_WRITE} points")]
    PointsOutOfRange,
    #[error("the earn rate must be between 1 and {MAX_EARN_RATE} points per 100 minor units")]
    InvalidEarnRate,
    #[error("points must expire after 1 to {MAX_EXPIRY_DAYS} days")]
    InvalidExpiry,
    #[error("points for order {0} were already earned; each order earns once")]
    AlreadyEarnedForOrder(OrderId),
    #[error("only {available} points are available; {action} at most {available}")]
    InsufficientPoints {
        action: &'static str,
        available: u64,
    },
    #[error("points were already redeemed on order {0}; each order takes one redemption")]
    AlreadyRedeemedForOrder(OrderId),
    #[error("no points were redeemed on order {0}; there is nothing to restore")]
    NoRedemptionForOrder(OrderId),
    #[error("the points redeemed on order {0} were already restored")]
    RedemptionAlreadyRestored(OrderId),
    #[error("order {order_id} earned its points in {expected}; send the refunded total in {expected}, not {got}")]
    RefundCurrencyMismatch {
        order_id: OrderId,
        expected: Currency,
        got: Currency,
    },
    #[error(
        "the donation rate must be between 1 and {MAX_DONATION_RATE} minor units per 100 points"
    )]
    InvalidDonationRate,
    #[error("at this rate the points are worth less than one minor unit; donate at least {min_points} points")]
    DonationTooSmall { min_points: u64 },
    #[error("points can be expired only up to now; as_of {0} is in the future")]
    ExpiryInTheFuture(DateTime<Utc>),
    #[error(
        "an adjustment moves between 1 and {MAX_POINTS_PER_WRITE} points, \
         positive to credit or negative to deduct"
    )]
    InvalidAdjustment,
    #[error("an adjustment needs a reason of 1 to {MAX_REASON_CHARS} characters")]
    InvalidReason,
    #[error("the multiplier must be between {NO_MULTIPLIER_BP} and {MAX_MULTIPLIER_BP} basis points (1x to 5x)")]
    InvalidMultiplier,
    #[error("a subscription must run until a time after now")]
    InvalidUntil,
    #[error("a subscription is already running until {0}; renew it instead")]
    SubscriptionAlreadyActive(DateTime<Utc>),
    #[error("there is no running subscription; start one first")]
    NoActiveSubscription,
    #[error("the customer never subscribed; start a subscription first")]
    NoSubscription,
    #[error("the subscription runs until {0}; renew it until a later time")]
    RenewalMustExtend(DateTime<Utc>),
    #[error("the subscription was already cancelled and ends at {0}; renew it to keep it")]
    SubscriptionAlreadyCancelled(DateTime<Utc>),
}

impl RewardsError {
    /// True when the command conflicts with the ledger's current state (HTTP 409), false when
    /// the command itself is invalid (HTTP 422).
    pub const fn is_state_conflict(&self) -> bool {
        matches!(
            self,
            Self::AlreadyEarnedForOrder(_)
                | Self::InsufficientPoints { .. }
                | Self::AlreadyRedeemedForOrder(_)
                | Self::NoRedemptionForOrder(_)
                | Self::RedemptionAlreadyRestored(_)
                | Self::SubscriptionAlreadyActive(_)
                | Self::NoActiveSubscription
                | Self::NoSubscription
                | Self::RenewalMustExtend(_)
                | Self::SubscriptionAlreadyCancelled(_)
        )
    }
}

/// Points earned or credited together, with one expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsLot {
    /// The lot's number in this ledger (1, 2, ...).
    pub lot: u32,
    /// Points the lot was created with.
    pub points: u64,
    pub expires_at: DateTime<Utc>,
    /// Points not yet spent or expired.
    pub remaining: u64,
}

/// The points one order earned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEarning {
    pub points: u64,
    pub lot: u32,
    pub order_total: Money,
    /// Taken back (or written off) because the order was refunded.
    pub reversed: u64,
}

/// A redemption on one order, remembered so that a cancellation can give it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redemption {
    pub points: u64,
    pub lots: Vec<LotPoints>,
    pub restored: bool,
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

/// The state a customer's rewards events add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardsLedger {
    /// What each order earned, and how much of it a refund took back.
    #[serde(default)]
    pub earnings: BTreeMap<OrderId, OrderEarning>,
    /// Every lot, in creation order (lot `n` at index `n - 1`).
    pub lots: Vec<PointsLot>,
    /// Sum of the lots' remaining points.
    pub balance: u64,
    /// Every point earned on orders and not taken back by a refund.
    pub lifetime_earned: u64,
    pub earned_orders: BTreeSet<OrderId>,
    pub redemptions: BTreeMap<OrderId, Redemption>,
    pub processed_keys: BTreeSet<String>,
    pub subscription: Option<Subscription>,
}

impl RewardsLedger {
    /// One lot by its number.
    pub fn lot(&self, lot: u32) -> Option<&PointsLot> {
        let index = usize::try_from(lot).ok()?.checked_sub(1)?;
        self.lots.get(index).filter(|l| l.lot == lot)
    }

    fn lot_mut(&mut self, lot: u32) -> Option<&mut PointsLot> {
        let index = usize::try_from(lot).ok()?.checked_sub(1)?;
        self.lots.get_mut(index).filter(|l| l.lot == lot)
    }

    /// Points that can be spent at `now`: the rest of every lot not yet past its expiry.
    pub fn available_at(&self, now: DateTime<Utc>) -> u64 {
        self.lots
            .iter()
            .filter(|l| l.expires_at > now)
            .map(|l| l.remaining)
            .sum()
    }

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

    fn next_lot(&self) -> u32 {
        u32::try_from(self.lots.len() + 1).unwrap_or(u32::MAX)
    }

    fn running_subscription(&self, now: DateTime<Utc>) -> Option<&Subscription> {
        self.subscription.as_ref().filter(|s| s.is_running_at(now))
    }

    /// Which lots a debit of `points` at `now` takes from: the lots that expire first, skipping
    /// any already past expiry. Refuses to overdraw.
    fn plan_debit(
        &self,
        points: u64,
        now: DateTime<Utc>,
        action: &'static str,
    ) -> Result<Vec<LotPoints>, RewardsError> {
        let available = self.available_at(now);
        if points > available {
            return Err(RewardsError::InsufficientPoints { action, available });
        }
        let mut live: Vec<&PointsLot> = self
            .lots
            .iter()
            .filter(|l| l.remaining > 0 && l.expires_at > now)
            .collect();
        live.sort_by_key(|l| (l.expires_at, l.lot));
        let mut left = points;
        let mut taken = Vec::new();
        for lot in live {
            if left == 0 {
                break;
            }
            let take = left.min(lot.remaining);
            taken.push(LotPoints {
                lot: lot.lot,
                points: take,
            });
            left -= take;
        }
        Ok(taken)
    }

    /// Up to `points` from the spendable lots: the order's own lot first (those are the
    /// points being taken back), then the ones expiring first. Never more than is spendable.
    fn plan_reversal(&self, own_lot: u32, points: u64, now: DateTime<Utc>) -> Vec<LotPoints> {
        let mut live: Vec<&PointsLot> = self
            .lots
            .iter()
            .filter(|l| l.remaining > 0 && l.expires_at > now)
            .collect();
        live.sort_by_key(|l| (l.lot != own_lot, l.expires_at, l.lot));
        let mut left = points;
        let mut taken = Vec::new();
        for lot in live {
            if left == 0 {
                break;
            }
            let take = left.min(lot.remaining);
            taken.push(LotPoints {
                lot: lot.lot,
                points: take,
            });
            left -= take;
        }
        taken
    }

    fn decide(
        &self,
        command: RewardsCommand,
        services: &RewardsServices,
    ) -> Result<Vec<RewardsEvent>, RewardsError> {
        let key = command.idempotency_key();
        if key.trim().is_empty() || key.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS {
            return Err(RewardsError::InvalidIdempotencyKey);
        }
        if self.processed_keys.contains(key) {
            return Ok(vec![]);
        }
        let now = services.clock.now();
        let event = match command {
            RewardsCommand::EarnPoints {
                order_id,
                order_total,
                points_per_100_minor,
                expires_in_days,
                idempotency_key,
            } => {
                if !(1..=MAX_EARN_RATE).contains(&points_per_100_minor) {
                    return Err(RewardsError::InvalidEarnRate);
                }
                let expires_at = expiry(now, expires_in_days)?;
                if self.earned_orders.contains(&order_id) {
                    return Err(RewardsError::AlreadyEarnedForOrder(order_id));
                }
                let multiplier_bp = self.multiplier_bp_at(now);
                let scaled = i128::from(order_total.minor())
                    * i128::from(points_per_100_minor)
                    * i128::from(multiplier_bp)
                    / (100 * i128::from(NO_MULTIPLIER_BP));
                let points = u64::try_from(scaled).unwrap_or(u64::MAX);
                if points == 0 {
                    // Too small an order to earn a point: nothing to record.
                    return Ok(vec![]);
                }
                if points > MAX_POINTS_PER_WRITE {
                    return Err(RewardsError::PointsOutOfRange);
                }
                RewardsEvent::PointsEarned {
                    order_id,
                    order_total,
                    points_per_100_minor,
                    multiplier_bp,
                    points,
                    lot: self.next_lot(),
                    expires_at,
                    idempotency_key,
                    earned_at: now,
                }
            }
            RewardsCommand::RedeemPoints {
                order_id,
                points,
                idempotency_key,
            } => {
                check_points(points)?;
                if self.redemptions.contains_key(&order_id) {
                    return Err(RewardsError::AlreadyRedeemedForOrder(order_id));
                }
                let lots = self.plan_debit(points, now, "redeem")?;
                RewardsEvent::PointsRedeemed {
                    order_id,
                    points,
                    lots,
                    idempotency_key,
                    redeemed_at: now,
                }
            }
            RewardsCommand::RestoreRedemption {
                order_id,
                idempotency_key,
            } => {
                let redemption = self
                    .redemptions
                    .get(&order_id)
                    .ok_or(RewardsError::NoRedemptionForOrder(order_id))?;
                if redemption.restored {
                    return Err(RewardsError::RedemptionAlreadyRestored(order_id));
                }
                RewardsEvent::RedemptionRestored {
                    order_id,
                    points: redemption.points,
                    lots: redemption.lots.clone(),
                    idempotency_key,
                    restored_at: now,
                }
            }
            RewardsCommand::ReverseEarnedPoints {
                order_id,
                refunded_total,
                idempotency_key,
            } => {
                // Nothing earned (yet): the order flow reverses right after earning when the
                // refund came first.
                let Some(earning) = self.earnings.get(&order_id) else {
                    return Ok(vec![]);
                };
                let expected = earning.order_total.currency();
                if refunded_total.currency() != expected {
                    return Err(RewardsError::RefundCurrencyMismatch {
                        order_id,
                        expected,
                        got: refunded_total.currency(),
                    });
                }
                let due = earning
                    .reversible(refunded_total)
                    .saturating_sub(earning.reversed);
                if due == 0 {
                    return Ok(vec![]);
                }
                let lots = self.plan_reversal(earning.lot, due, now);
                let points: u64 = lots.iter().map(|l| l.points).sum();
                RewardsEvent::PointsReversed {
                    order_id,
                    refunded_total,
                    points,
                    unrecovered: due - points,
                    lots,
                    idempotency_key,
                    reversed_at: now,
                }
            }
            RewardsCommand::DonatePoints {
                charity,
                points,
                minor_per_100_points,
                currency,
                idempotency_key,
            } => {
                check_points(points)?;
                if !(1..=MAX_DONATION_RATE).contains(&minor_per_100_points) {
                    return Err(RewardsError::InvalidDonationRate);
                }
                let rate = u64::from(minor_per_100_points);
                // Both factors are bounded, so the product fits comfortably.
                let minor = points * rate / 100;
                if minor == 0 {
                    return Err(RewardsError::DonationTooSmall {
                        min_points: 100u64.div_ceil(rate),
                    });
                }
                let amount = i64::try_from(minor)
                    .ok()
                    .and_then(|m| Money::new(m, currency).ok())
                    .ok_or(RewardsError::PointsOutOfRange)?;
                let lots = self.plan_debit(points, now, "donate")?;
                RewardsEvent::PointsDonated {
                    charity,
                    points,
                    minor_per_100_points,
                    amount,
                    lots,
                    idempotency_key,
                    donated_at: now,
                }
            }
            RewardsCommand::ExpirePoints {
                as_of,
                idempotency_key,
            } => {
                if as_of > now {
                    return Err(RewardsError::ExpiryInTheFuture(as_of));
                }
                let mut due: Vec<&PointsLot> = self
                    .lots
                    .iter()
                    .filter(|l| l.remaining > 0 && l.expires_at <= as_of)
                    .collect();
                if due.is_empty() {
                    return Ok(vec![]);
                }
                due.sort_by_key(|l| (l.expires_at, l.lot));
                let lots: Vec<LotPoints> = due
                    .iter()
                    .map(|l| LotPoints {
                        lot: l.lot,
                        points: l.remaining,
                    })
                    .collect();
                RewardsEvent::PointsExpired {
                    points: lots.iter().map(|l| l.points).sum(),
                    lots,
                    as_of,
                    idempotency_key,
                    expired_at: now,
                }
            }
            RewardsCommand::AdjustPoints {
                points,
                reason,
                expires_in_days,
                idempotency_key,
            } => {
                let magnitude = points.unsigned_abs();
                if magnitude == 0 || magnitude > MAX_POINTS_PER_WRITE {
                    return Err(RewardsError::InvalidAdjustment);
                }
                if reason.trim().is_empty() || reason.chars().count() > MAX_REASON_CHARS {
                    return Err(RewardsError::InvalidReason);
                }
                if points > 0 {
                    RewardsEvent::PointsAdjusted {
                        points,
                        reason,
                        lot: Some(self.next_lot()),
                        expires_at: Some(expiry(now, expires_in_days)?),
                        lots: vec![],
                        idempotency_key,
                        adjusted_at: now,
                    }
                } else {
                    RewardsEvent::PointsAdjusted {
                        points,
                        reason,
                        lot: None,
                        expires_at: None,
                        lots: self.plan_debit(magnitude, now, "deduct")?,
                        idempotency_key,
                        adjusted_at: now,
                    }
                }
            }
            RewardsCommand::StartSubscription {
                tier,
                multiplier_bp,
                free_delivery,
                until,
                idempotency_key,
            } => {
                if !(NO_MULTIPLIER_BP..=MAX_MULTIPLIER_BP).contains(&multiplier_bp) {
                    return Err(RewardsError::InvalidMultiplier);
                }
                if until <= now {
                    return Err(RewardsError::InvalidUntil);
                }
                if let Some(running) = self.running_subscription(now) {
                    return Err(RewardsError::SubscriptionAlreadyActive(running.until));
                }
                RewardsEvent::SubscriptionStarted {
                    tier,
                    multiplier_bp,
                    free_delivery,
                    until,
                    idempotency_key,
                    started_at: now,
                }
            }
            RewardsCommand::RenewSubscription {
                until,
                idempotency_key,
            } => {
                let running = self
                    .running_subscription(now)
                    .ok_or(RewardsError::NoActiveSubscription)?;
                if until <= running.until {
                    return Err(RewardsError::RenewalMustExtend(running.until));
                }
                RewardsEvent::SubscriptionRenewed {
                    until,
                    idempotency_key,
                    renewed_at: now,
                }
            }
            RewardsCommand::CancelSubscription { idempotency_key } => {
                let running = self
                    .running_subscription(now)
                    .ok_or(RewardsError::NoActiveSubscription)?;
                if running.status == SubscriptionStatus::Cancelled {
                    return Err(RewardsError::SubscriptionAlreadyCancelled(running.until));
                }
                RewardsEvent::SubscriptionCancelled {
                    ends_at: running.until,
                    idempotency_key,
                    cancelled_at: now,
                }
            }
            RewardsCommand::LapseSubscription { idempotency_key } => {
                // A timer that fires early (the customer renewed meanwhile), late or twice
                // changes nothing.
                match &self.subscription {
                    None => return Err(RewardsError::NoSubscription),
                    Some(s) if s.status == SubscriptionStatus::Lapsed || now < s.until => {
                        return Ok(vec![])
                    }
                    Some(_) => RewardsEvent::SubscriptionLapsed {
                        idempotency_key,
                        lapsed_at: now,
                    },
                }
            }
        };
        Ok(vec![event])
    }

    fn take(&mut self, lots: &[LotPoints]) {
        for taken in lots {
            if let Some(lot) = self.lot_mut(taken.lot) {
                lot.remaining = lot.remaining.saturating_sub(taken.points);
            }
            self.balance = self.balance.saturating_sub(taken.points);
        }
    }

    fn give_back(&mut self, lots: &[LotPoints]) {
        for given in lots {
            if let Some(lot) = self.lot_mut(given.lot) {
                lot.remaining = lot.remaining.saturating_add(given.points);
            }
            self.balance = self.balance.saturating_add(given.points);
        }
    }

    fn open_lot(&mut self, lot: u32, points: u64, expires_at: DateTime<Utc>) {
        self.lots.push(PointsLot {
            lot,
            points,
            expires_at,
            remaining: points,
        });
        self.balance = self.balance.saturating_add(points);
    }
}

/// `now + days`, for days in `1..=MAX_EXPIRY_DAYS`.
impl OrderEarning {
    /// The points a refund of `refunded_total` (in all) takes back: the refunded share of
    /// the order's total, rounded down, and every point once the whole total is refunded.
    pub fn reversible(&self, refunded_total: Money) -> u64 {
        let total = self.order_total.minor();
        let refunded = refunded_total.minor();
        if refunded <= 0 {
            return 0;
        }
        if total <= 0 || refunded >= total {
            return self.points;
        }
        let share = u128::from(self.points) * u128::try_from(refunded).unwrap_or(0)
            / u128::try_from(total).unwrap_or(1);
        u64::try_from(share).unwrap_or(self.points)
    }
}

fn expiry(now: DateTime<Utc>, days: u32) -> Result<DateTime<Utc>, RewardsError> {
    if !(1..=MAX_EXPIRY_DAYS).contains(&days) {
        return Err(RewardsError::InvalidExpiry);
    }
    Ok(now + Duration::days(i64::from(days)))
}

fn check_points(points: u64) -> Result<(), RewardsError> {
    if (1..=MAX_POINTS_PER_WRITE).contains(&points) {
        Ok(())
    } else {
        Err(RewardsError::PointsOutOfRange)
    }
}

/// What the rewards aggregate needs from outside.
#[derive(Clone)]
pub struct RewardsServices {
    pub clock: Arc<dyn Clock>,
}

impl RewardsServices {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock }
    }
}

impl fmt::Debug for RewardsServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RewardsServices").finish_non_exhaustive()
    }
}

impl Aggregate for RewardsLedger {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = RewardsCommand;
    type Event = RewardsEvent;
    type Error = RewardsError;
    type Services = RewardsServices;

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
        self.processed_keys
            .insert(event.idempotency_key().to_owned());
        match event {
            RewardsEvent::PointsEarned {
                order_id,
                order_total,
                points,
                lot,
                expires_at,
                ..
            } => {
                self.open_lot(lot, points, expires_at);
                self.lifetime_earned = self.lifetime_earned.saturating_add(points);
                self.earned_orders.insert(order_id);
                self.earnings.insert(
                    order_id,
                    OrderEarning {
                        points,
                        lot,
                        order_total,
                        reversed: 0,
                    },
                );
            }
            RewardsEvent::PointsRedeemed {
                order_id,
                points,
                lots,
                ..
            } => {
                self.take(&lots);
                self.redemptions.insert(
                    order_id,
                    Redemption {
                        points,
                        lots,
                        restored: false,
                    },
                );
            }
            RewardsEvent::RedemptionRestored { order_id, lots, .. } => {
                self.give_back(&lots);
                if let Some(redemption) = self.redemptions.get_mut(&order_id) {
                    redemption.restored = true;
                }
            }
            RewardsEvent::PointsReversed {
                order_id,
                points,
                unrecovered,
                lots,
                ..
            } => {
                self.take(&lots);
                let gone = points.saturating_add(unrecovered);
                self.lifetime_earned = self.lifetime_earned.saturating_sub(gone);
                if let Some(earning) = self.earnings.get_mut(&order_id) {
                    earning.reversed = earning.reversed.saturating_add(gone);
                }
            }
            RewardsEvent::PointsDonated { lots, .. } | RewardsEvent::PointsExpired { lots, .. } => {
                self.take(&lots);
            }
            RewardsEvent::PointsAdjusted {
                points,
                lot,
                expires_at,
                lots,
                ..
            } => match (lot, expires_at) {
                (Some(lot), Some(expires_at)) if points > 0 => {
                    self.open_lot(lot, points.unsigned_abs(), expires_at);
                }
                _ => self.take(&lots),
            },
            RewardsEvent::SubscriptionStarted {
                tier,
                multiplier_bp,
                free_delivery,
                until,
                ..
            } => {
                self.subscription = Some(Subscription {
                    tier,
                    multiplier_bp,
                    free_delivery,
                    until,
                    status: SubscriptionStatus::Active,
                });
            }
            RewardsEvent::SubscriptionRenewed { until, .. } => {
                if let Some(s) = self.subscription.as_mut() {
                    s.until = until;
                    s.status = SubscriptionStatus::Active;
                }
            }
            RewardsEvent::SubscriptionCancelled { .. } => {
                if let Some(s) = self.subscription.as_mut() {
                    s.status = SubscriptionStatus::Cancelled;
                }
            }
            RewardsEvent::SubscriptionLapsed { .. } => {
                if let Some(s) = self.subscription.as_mut() {
                    s.status = SubscriptionStatus::Lapsed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
