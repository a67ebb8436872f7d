//! The points commands (earn, redeem, restore, reverse, donate, expire, adjust): the rule each
//! one enforces, and what its event does to the ledger. Which lots a debit takes from is
//! [`super::ledger`]'s business.

use chrono::{DateTime, Duration, Utc};

use super::{
    LotPoints, OrderEarning, PointsLot, Redemption, RewardsError, RewardsEvent, RewardsLedger,
    MAX_DONATION_RATE, MAX_EARN_RATE, MAX_EXPIRY_DAYS, MAX_POINTS_PER_WRITE, MAX_REASON_CHARS,
    NO_MULTIPLIER_BP,
};
use crate::{CharityCode, Currency, Money, OrderId};

/// What a points command decides: one event, or nothing to record.
type Decision = Result<Option<RewardsEvent>, RewardsError>;

impl RewardsLedger {
    /// Earning on a completed order: once per order, at a valid rate and expiry, times the
    /// multiplier of a running subscription, rounded down. An order too small to earn a point
    /// records nothing; more than [`MAX_POINTS_PER_WRITE`] points is refused.
    pub(super) fn earn_points(
        &self,
        now: DateTime<Utc>,
        order_id: OrderId,
        order_total: Money,
        points_per_100_minor: u32,
        expires_in_days: u32,
        idempotency_key: String,
    ) -> Decision {
        if !(1..=MAX_EARN_RATE).contains(&points_per_100_minor) {
            return Err(RewardsError::InvalidEarnRate);
        }
        let expires_at = expiry(now, expires_in_days)?;
        if self.earnings.contains_key(&order_id) {
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
            return Ok(None);
        }
        if points > MAX_POINTS_PER_WRITE {
            return Err(RewardsError::PointsOutOfRange);
        }
        Ok(Some(RewardsEvent::PointsEarned {
            order_id,
            order_total,
            points_per_100_minor,
            multiplier_bp,
            points,
            lot: self.next_lot(),
            expires_at,
            idempotency_key,
            earned_at: now,
        }))
    }

    /// Redeeming on an order: once per order, never more than the spendable balance, taken from
    /// the lots that expire first.
    pub(super) fn redeem_points(
        &self,
        now: DateTime<Utc>,
        order_id: OrderId,
        points: u64,
        idempotency_key: String,
    ) -> Decision {
        check_points(points)?;
        if self.redemptions.contains_key(&order_id) {
            return Err(RewardsError::AlreadyRedeemedForOrder(order_id));
        }
        let lots = self.plan_debit(points, now, "redeem")?;
        Ok(Some(RewardsEvent::PointsRedeemed {
            order_id,
            points,
            lots,
            idempotency_key,
            redeemed_at: now,
        }))
    }

    /// Restoring a cancelled order's redemption: exactly what it redeemed, to the lots it came
    /// from, once.
    pub(super) fn restore_redemption(
        &self,
        now: DateTime<Utc>,
        order_id: OrderId,
        idempotency_key: String,
    ) -> Decision {
        let redemption = self
            .redemptions
            .get(&order_id)
            .ok_or(RewardsError::NoRedemptionForOrder(order_id))?;
        if redemption.restored {
            return Err(RewardsError::RedemptionAlreadyRestored(order_id));
        }
        Ok(Some(RewardsEvent::RedemptionRestored {
            order_id,
            points: redemption.points,
            lots: redemption.lots.clone(),
            idempotency_key,
            restored_at: now,
        }))
    }

    /// Reversing a refunded order's points: the refunded share of what it earned, less what
    /// earlier refunds took, in the currency it earned in. What the spendable lots cannot cover
    /// is written off as `unrecovered`, never overdrawn. Nothing earned, or nothing more due,
    /// records nothing.
    pub(super) fn reverse_earned_points(
        &self,
        now: DateTime<Utc>,
        order_id: OrderId,
        refunded_total: Money,
        idempotency_key: String,
    ) -> Decision {
        // Nothing earned (yet): the order flow reverses right after earning when the refund
        // came first.
        let Some(earning) = self.earnings.get(&order_id) else {
            return Ok(None);
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
            return Ok(None);
        }
        let lots = self.plan_reversal(earning.lot, due, now);
        let points: u64 = lots.iter().map(|l| l.points).sum();
        Ok(Some(RewardsEvent::PointsReversed {
            order_id,
            refunded_total,
            points,
            unrecovered: due - points,
            lots,
            idempotency_key,
            reversed_at: now,
        }))
    }

    /// Donating to a charity: at a valid rate, worth at least one minor unit, never more than
    /// the spendable balance.
    pub(super) fn donate_points(
        &self,
        now: DateTime<Utc>,
        charity: CharityCode,
        points: u64,
        minor_per_100_points: u32,
        currency: Currency,
        idempotency_key: String,
    ) -> Decision {
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
        Ok(Some(RewardsEvent::PointsDonated {
            charity,
            points,
            minor_per_100_points,
            amount,
            lots,
            idempotency_key,
            donated_at: now,
        }))
    }

    /// Expiring points: the unspent rest of every lot whose expiry is at or before `as_of`, which
    /// may not be in the future. No such lot records nothing.
    pub(super) fn expire_points(
        &self,
        now: DateTime<Utc>,
        as_of: DateTime<Utc>,
        idempotency_key: String,
    ) -> Decision {
        if as_of > now {
            return Err(RewardsError::ExpiryInTheFuture(as_of));
        }
        let mut due: Vec<&PointsLot> = self
            .lots
            .values()
            .filter(|l| l.remaining > 0 && l.expires_at <= as_of)
            .collect();
        if due.is_empty() {
            return Ok(None);
        }
        due.sort_by_key(|l| (l.expires_at, l.lot));
        let lots: Vec<LotPoints> = due
            .iter()
            .map(|l| LotPoints {
                lot: l.lot,
                points: l.remaining,
            })
            .collect();
        Ok(Some(RewardsEvent::PointsExpired {
            points: lots.iter().map(|l| l.points).sum(),
            lots,
            as_of,
            idempotency_key,
            expired_at: now,
        }))
    }

    /// An administrator's adjustment: a non-zero amount within bounds and a reason; a credit
    /// opens a lot with a valid expiry, a deduction is taken like a spend (never overdrawn).
    pub(super) fn adjust_points(
        &self,
        now: DateTime<Utc>,
        points: i64,
        reason: String,
        expires_in_days: u32,
        idempotency_key: String,
    ) -> Decision {
        let magnitude = points.unsigned_abs();
        if magnitude == 0 || magnitude > MAX_POINTS_PER_WRITE {
            return Err(RewardsError::InvalidAdjustment);
        }
        if reason.trim().is_empty() || reason.chars().count() > MAX_REASON_CHARS {
            return Err(RewardsError::InvalidReason);
        }
        let event = if points > 0 {
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
        };
        Ok(Some(event))
    }

    /// `PointsEarned`: a new lot, counted in `lifetime_earned`, and the order's earning kept
    /// for a later reversal.
    pub(super) fn apply_points_earned(
        &mut self,
        order_id: OrderId,
        order_total: Money,
        points: u64,
        (lot, expires_at): (u32, DateTime<Utc>),
        at: DateTime<Utc>,
    ) {
        self.open_lot(lot, points, expires_at);
        self.lifetime_earned = self.lifetime_earned.saturating_add(points);
        self.earnings.insert(
            order_id,
            OrderEarning {
                points,
                lot,
                order_total,
                reversed: 0,
                at,
            },
        );
    }

    /// `PointsRedeemed`: the points leave their lots; the redemption is kept for a restore.
    pub(super) fn apply_points_redeemed(
        &mut self,
        order_id: OrderId,
        points: u64,
        lots: Vec<LotPoints>,
        at: DateTime<Utc>,
    ) {
        self.take(&lots);
        self.redemptions.insert(
            order_id,
            Redemption {
                points,
                lots,
                restored: false,
                at,
            },
        );
    }

    /// `RedemptionRestored`: the points go back to their lots, once.
    pub(super) fn apply_redemption_restored(&mut self, order_id: OrderId, lots: &[LotPoints]) {
        self.give_back(lots);
        if let Some(redemption) = self.redemptions.get_mut(&order_id) {
            redemption.restored = true;
        }
    }

    /// `PointsReversed`: the recovered points leave their lots; recovered and unrecovered
    /// points both leave `lifetime_earned` and count as reversed on the order.
    pub(super) fn apply_points_reversed(
        &mut self,
        order_id: OrderId,
        points: u64,
        unrecovered: u64,
        lots: &[LotPoints],
    ) {
        self.take(lots);
        let gone = points.saturating_add(unrecovered);
        self.lifetime_earned = self.lifetime_earned.saturating_sub(gone);
        if let Some(earning) = self.earnings.get_mut(&order_id) {
            earning.reversed = earning.reversed.saturating_add(gone);
        }
    }

    /// `PointsAdjusted`: a credit opens its lot, a deduction leaves the lots it was planned from.
    pub(super) fn apply_points_adjusted(
        &mut self,
        points: i64,
        lot: Option<u32>,
        expires_at: Option<DateTime<Utc>>,
        lots: &[LotPoints],
    ) {
        match (lot, expires_at) {
            (Some(lot), Some(expires_at)) if points > 0 => {
                self.open_lot(lot, points.unsigned_abs(), expires_at);
            }
            _ => self.take(lots),
        }
    }
}

/// `now + days`, for days in `1..=MAX_EXPIRY_DAYS`.
fn expiry(now: DateTime<Utc>, days: u32) -> Result<DateTime<Utc>, RewardsError> {
    if !(1..=MAX_EXPIRY_DAYS).contains(&days) {
        return Err(RewardsError::InvalidExpiry);
    }
    Ok(now + Duration::days(i64::from(days)))
}

/// A write moves 1 to [`MAX_POINTS_PER_WRITE`] points.
fn check_points(points: u64) -> Result<(), RewardsError> {
    if (1..=MAX_POINTS_PER_WRITE).contains(&points) {
        Ok(())
    } else {
        Err(RewardsError::PointsOutOfRange)
    }
}
