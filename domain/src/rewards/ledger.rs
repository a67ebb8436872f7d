//! The lots of a ledger: which lot a debit takes its points from, and how taking, giving back
//! and opening lots keep the balance equal to the sum of the lots' remaining points.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{RewardsError, RewardsLedger};
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
}

/// A redemption on one order, remembered so that a cancellation can give it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redemption {
    pub points: u64,
    pub lots: Vec<LotPoints>,
    pub restored: bool,
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

    /// The number the next lot gets.
    pub(super) fn next_lot(&self) -> u32 {
        u32::try_from(self.lots.len() + 1).unwrap_or(u32::MAX)
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
    pub(super) fn plan_reversal(
        &self,
        own_lot: u32,
        points: u64,
        now: DateTime<Utc>,
    ) -> Vec<LotPoints> {
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
        self.lots.push(PointsLot {
            lot,
            points,
            expires_at,
            remaining: points,
        });
        self.balance = self.balance.saturating_add(points);
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
