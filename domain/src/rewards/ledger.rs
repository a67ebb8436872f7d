//! The lots of a ledger: which lot a debit takes its points from, and how taking, giving back
//! and opening lots keep the balance equal to the sum of the lots' remaining points; and the
//! closing of the books on what is past [`super::BOOKS_OPEN_DAYS`].

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::{RewardsError, RewardsLedger, BOOKS_OPEN_DAYS};
use crate::Money;

/// Points taken from (or given back to) one lot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LotPoints {
    /// The lot's number in this ledger (1, 2, ...).
    pub lot: u32,
    pub points: u64,
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
    /// When the points were earned.
    pub at: DateTime<Utc>,
}

/// A redemption on one order, remembered so that a cancellation can give it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redemption {
    pub points: u64,
    pub lots: Vec<LotPoints>,
    pub restored: bool,
    /// When the points were redeemed.
    pub at: DateTime<Utc>,
}

impl RewardsLedger {
    /// One lot by its number.
    pub fn lot(&self, lot: u32) -> Option<&PointsLot> {
        self.lots.get(&lot)
    }

    fn lot_mut(&mut self, lot: u32) -> Option<&mut PointsLot> {
        self.lots.get_mut(&lot)
    }

    /// Points that can be spent at `now`: the rest of every lot not yet past its expiry.
    pub fn available_at(&self, now: DateTime<Utc>) -> u64 {
        self.lots
            .values()
            .filter(|l| l.expires_at > now)
            .map(|l| l.remaining)
            .sum()
    }

    /// The number the next lot gets.
    pub(super) const fn next_lot(&self) -> u32 {
        self.lots_opened.saturating_add(1)
    }

    /// Which lots a debit of `points` at `now` takes from: the lots that expire first, skipping
    /// any already past expiry. Refuses to overdraw.
    pub(super) fn plan_debit(
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
            .values()
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
    pub(super) fn plan_reversal(
        &self,
        own_lot: u32,
        points: u64,
        now: DateTime<Utc>,
    ) -> Vec<LotPoints> {
        let mut live: Vec<&PointsLot> = self
            .lots
            .values()
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

    /// Takes points out of the lots they were planned from.
    pub(super) fn take(&mut self, lots: &[LotPoints]) {
        for taken in lots {
            if let Some(lot) = self.lot_mut(taken.lot) {
                lot.remaining = lot.remaining.saturating_sub(taken.points);
            }
            self.balance = self.balance.saturating_sub(taken.points);
        }
    }

    /// Puts points back into the lots they were taken from.
    pub(super) fn give_back(&mut self, lots: &[LotPoints]) {
        for given in lots {
            if let Some(lot) = self.lot_mut(given.lot) {
                lot.remaining = lot.remaining.saturating_add(given.points);
            }
            self.balance = self.balance.saturating_add(given.points);
        }
    }

    /// Adds a lot of fresh points.
    pub(super) fn open_lot(&mut self, lot: u32, points: u64, expires_at: DateTime<Utc>) {
        self.lots.insert(
            lot,
            PointsLot {
                lot,
                points,
                expires_at,
                remaining: points,
            },
        );
        self.lots_opened = self.lots_opened.max(lot);
        self.balance = self.balance.saturating_add(points);
    }

    /// Closes the books on what happened before `now` less [`BOOKS_OPEN_DAYS`], at most once
    /// a day of the ledger's own time: the earnings, redemptions and idempotency keys older
    /// than that, and the lots left with no points that no open redemption could give points
    /// back to. Nothing spendable goes: a lot keeps its points until they are spent, expired or
    /// reversed, whatever its age; the balance and the lifetime total are unchanged.
    pub(super) fn close_books(&mut self, now: DateTime<Utc>) {
        let horizon = now - Duration::days(BOOKS_OPEN_DAYS);
        if self
            .closed_before
            .is_some_and(|closed| horizon < closed + Duration::days(1))
        {
            return;
        }
        self.closed_before = Some(horizon);
        self.earnings.retain(|_, earning| earning.at >= horizon);
        self.redemptions
            .retain(|_, redemption| redemption.at >= horizon);
        self.processed_keys.retain(|_, at| *at >= horizon);
        let restorable: BTreeSet<u32> = self
            .redemptions
            .values()
            .filter(|redemption| !redemption.restored)
            .flat_map(|redemption| redemption.lots.iter().map(|taken| taken.lot))
            .collect();
        self.lots
            .retain(|number, lot| lot.remaining > 0 || restorable.contains(number));
    }
}

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
