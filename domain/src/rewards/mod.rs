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
//!
//! Where to read: `decide` below checks what every write shares (the idempotency key) and hands
//! each command to the function named after it, in `points` (earn, redeem, restore, reverse,
//! donate, expire, adjust) or `subscription` (start, renew, cancel, lapse), each of which also
//! holds what its events do to the ledger; `ledger` holds the lots and which lots a debit takes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::services::Clock;
use crate::{CharityCode, Currency, Money, OrderId};

mod ledger;
mod points;
mod subscription;

pub use ledger::{LotPoints, OrderEarning, PointsLot, Redemption};
pub use subscription::{Subscription, SubscriptionStatus, SubscriptionTier};

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
/// How long the books stay open on an order's earning and redemption and on a write's
/// idempotency key, in days: a refund takes an order's points back, a cancellation gives its
/// redemption back and a repeated key is recognised within this window; after it, the ledger
/// forgets them (and the lots they could no longer touch), so that its state is bounded by what
/// can still change rather than by its history. Refunds and cancellations come within days.
pub const BOOKS_OPEN_DAYS: i64 = 90;
/// A multiplier of 1x, in basis points: what earning uses without a running subscription.
pub const NO_MULTIPLIER_BP: u32 = 10_000;
/// The highest subscription multiplier, in basis points (5x).
pub const MAX_MULTIPLIER_BP: u32 = 50_000;

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

    /// When the event happened (its own timestamp).
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::PointsEarned { earned_at: at, .. }
            | Self::PointsRedeemed {
                redeemed_at: at, ..
            }
            | Self::RedemptionRestored {
                restored_at: at, ..
            }
            | Self::PointsReversed {
                reversed_at: at, ..
            }
            | Self::PointsDonated { donated_at: at, .. }
            | Self::PointsExpired { expired_at: at, .. }
            | Self::PointsAdjusted {
                adjusted_at: at, ..
            }
            | Self::SubscriptionStarted { started_at: at, .. }
            | Self::SubscriptionRenewed { renewed_at: at, .. }
            | Self::SubscriptionCancelled {
                cancelled_at: at, ..
            }
            | Self::SubscriptionLapsed { lapsed_at: at, .. } => *at,
        }
    }

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
    #[error("no points were redeemed on order {0} in the last {BOOKS_OPEN_DAYS} days (the books are closed on older orders); there is nothing to restore")]
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

/// The state a customer's rewards events add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardsLedger {
    /// What each order of the open books earned, and how much of it a refund took back.
    #[serde(default)]
    pub earnings: BTreeMap<OrderId, OrderEarning>,
    /// The lots that still hold points, or that a redemption of the open books could give
    /// points back to, by number.
    pub lots: BTreeMap<u32, PointsLot>,
    /// How many lots the ledger ever opened (the last lot's number).
    pub lots_opened: u32,
    /// Sum of the lots' remaining points.
    pub balance: u64,
    /// Every point earned on orders and not taken back by a refund.
    pub lifetime_earned: u64,
    /// The redemptions of the open books, by order.
    pub redemptions: BTreeMap<OrderId, Redemption>,
    /// The idempotency keys of the open books' writes, with when each was written.
    pub processed_keys: BTreeMap<String, DateTime<Utc>>,
    pub subscription: Option<Subscription>,
    /// The books are closed on what happened before this instant (see [`BOOKS_OPEN_DAYS`]).
    pub closed_before: Option<DateTime<Utc>>,
}

impl RewardsLedger {
    /// The rule every write shares: a valid idempotency key. A key seen before makes the write
    /// a no-op (false).
    fn is_new_key(&self, key: &str) -> Result<bool, RewardsError> {
        if key.trim().is_empty() || key.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS {
            return Err(RewardsError::InvalidIdempotencyKey);
        }
        Ok(!self.processed_keys.contains_key(key))
    }

    /// What a command records. The rule every write shares is checked here, once
    /// ([`Self::is_new_key`]); each command's own rule is in the function named after it
    /// ([`points`] and [`subscription`]).
    fn decide(
        &self,
        command: RewardsCommand,
        services: &RewardsServices,
    ) -> Result<Vec<RewardsEvent>, RewardsError> {
        use RewardsCommand as C;
        if !self.is_new_key(command.idempotency_key())? {
            return Ok(vec![]);
        }
        let now = services.clock.now();
        let event = match command {
            C::EarnPoints {
                order_id,
                order_total,
                points_per_100_minor,
                expires_in_days,
                idempotency_key: key,
            } => self.earn_points(
                now,
                order_id,
                order_total,
                points_per_100_minor,
                expires_in_days,
                key,
            ),
            C::RedeemPoints {
                order_id,
                points,
                idempotency_key: key,
            } => self.redeem_points(now, order_id, points, key),
            C::RestoreRedemption {
                order_id,
                idempotency_key: key,
            } => self.restore_redemption(now, order_id, key),
            C::ReverseEarnedPoints {
                order_id,
                refunded_total,
                idempotency_key: key,
            } => self.reverse_earned_points(now, order_id, refunded_total, key),
            C::DonatePoints {
                charity,
                points,
                minor_per_100_points,
                currency,
                idempotency_key: key,
            } => self.donate_points(now, charity, points, minor_per_100_points, currency, key),
            C::ExpirePoints {
                as_of,
                idempotency_key: key,
            } => self.expire_points(now, as_of, key),
            C::AdjustPoints {
                points,
                reason,
                expires_in_days,
                idempotency_key: key,
            } => self.adjust_points(now, points, reason, expires_in_days, key),
            C::StartSubscription {
                tier,
                multiplier_bp,
                free_delivery,
                until,
                idempotency_key: key,
            } => self.start_subscription(now, tier, multiplier_bp, free_delivery, until, key),
            C::RenewSubscription {
                until,
                idempotency_key: key,
            } => self.renew_subscription(now, until, key),
            C::CancelSubscription { idempotency_key } => {
                self.cancel_subscription(now, idempotency_key)
            }
            C::LapseSubscription { idempotency_key } => {
                self.lapse_subscription(now, idempotency_key)
            }
        }?;
        Ok(event.into_iter().collect())
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
        use RewardsEvent as E;
        let at = event.at();
        self.processed_keys
            .insert(event.idempotency_key().to_owned(), at);
        match event {
            E::PointsEarned {
                order_id,
                order_total,
                points,
                lot,
                expires_at,
                ..
            } => self.apply_points_earned(order_id, order_total, points, (lot, expires_at), at),
            E::PointsRedeemed {
                order_id,
                points,
                lots,
                ..
            } => self.apply_points_redeemed(order_id, points, lots, at),
            E::RedemptionRestored { order_id, lots, .. } => {
                self.apply_redemption_restored(order_id, &lots);
            }
            E::PointsReversed {
                order_id,
                points,
                unrecovered,
                lots,
                ..
            } => self.apply_points_reversed(order_id, points, unrecovered, &lots),
            E::PointsDonated { lots, .. } | E::PointsExpired { lots, .. } => self.take(&lots),
            E::PointsAdjusted {
                points,
                lot,
                expires_at,
                lots,
                ..
            } => self.apply_points_adjusted(points, lot, expires_at, &lots),
            E::SubscriptionStarted {
                tier,
                multiplier_bp,
                free_delivery,
                until,
                ..
            } => self.apply_subscription_started(tier, multiplier_bp, free_delivery, until),
            E::SubscriptionRenewed { until, .. } => self.apply_subscription_renewed(until),
            E::SubscriptionCancelled { .. } => {
                self.apply_subscription_status(SubscriptionStatus::Cancelled);
            }
            E::SubscriptionLapsed { .. } => {
                self.apply_subscription_status(SubscriptionStatus::Lapsed);
            }
        }
        // On the event's own time, so that a replay closes the same books.
        self.close_books(at);
    }
}

#[cfg(test)]
mod tests;
