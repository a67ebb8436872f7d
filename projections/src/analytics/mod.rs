//! The analytics read model, for dashboards: orders, revenue, average order value,
//! cancellations and rejections, acceptance and delivery times, top items, and the points
//! redeemed and donated.
//!
//! Definitions (every order figure belongs to the UTC hour in which the order was *placed*, so
//! a later step of an order never moves it to another bucket):
//! - `orders`: orders placed;
//! - `completed`: orders that reached Completed;
//! - `cancelled`: orders cancelled (by anyone) plus orders rejected by the store; `rejected`
//!   counts the rejections alone;
//! - `revenue`: the sum of the final totals (after modifications, with tax and delivery fee,
//!   less discounts) of completed orders, in integer minor units of one currency: figures are
//!   always grouped by currency, never summed across currencies;
//! - `aov` (average order value): revenue / completed, rounded to the nearest minor unit;
//! - acceptance time: placed → accepted, over the orders that were accepted (even if cancelled
//!   later); delivery time: placed → delivered, over the orders that were delivered; both in
//!   seconds, as the continuous percentiles p50, p90, p99 (`percentile_cont`) computed at query
//!   time from the facts;
//! - top items: the lines (as last modified) of completed orders; an item's revenue is its line
//!   totals, before order-level discounts, tax and delivery fee;
//! - points: earned, redeemed and restored points, and donations per charity and currency, each
//!   at the time of its own event. Rewards events carry no region; a redemption is matched to
//!   its order's region, store and currency at query time (the `order` and `rewards` topics are
//!   consumed independently, so the redemption may be applied before its order).
//!
//! Storage: a fact row per order and its lines, an additive hourly rollup (per hour, region,
//! store and currency) kept with `x = x + excluded.x`, and one row per points movement. A batch
//! costs at most six statements whatever its size.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::order::{CancelledBy, OrderEvent, RejectionReason};
use domain::rewards::RewardsEvent;
use domain::services::PricedLine;
use sqlx::{PgPool, Postgres, QueryBuilder, Transaction};
use uuid::Uuid;

use streams::consumer::{FirstDelivery, Projection, ProjectionError};

mod queries;
mod tables;

pub use queries::*;
use tables::*;

/// Order and rewards analytics for dashboards.
#[derive(Debug, Default, Clone, Copy)]
pub struct AnalyticsProjection;

/// The name a dashboard shows for who cancelled (stable: it is stored).
pub const fn cancelled_by_name(by: CancelledBy) -> &'static str {
    match by {
        CancelledBy::Customer => "Customer",
        CancelledBy::Store => "Store",
        CancelledBy::System => "System",
    }
}

/// The name of a rejection reason (stable: it is stored).
pub const fn rejection_reason_name(reason: RejectionReason) -> &'static str {
    match reason {
        RejectionReason::Busy => "Busy",
        RejectionReason::ClosingEarly => "ClosingEarly",
        RejectionReason::ItemUnavailable => "ItemUnavailable",
        RejectionReason::Other => "Other",
    }
}

/// Orders placed in a batch.
#[derive(Default)]
struct Placed {
    order_id: Vec<String>,
    customer_id: Vec<Uuid>,
    store_id: Vec<Uuid>,
    region: Vec<String>,
    currency: Vec<String>,
    placed_at: Vec<DateTime<Utc>>,
    total_minor: Vec<i64>,
    points_redeemed: Vec<i64>,
}

/// What a batch changed of one order (the latest event wins for every field).
#[derive(Default)]
struct Change {
    status: Option<&'static str>,
    total_minor: Option<i64>,
    accepted_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    cancelled: Option<(&'static str, String, DateTime<Utc>)>,
    rejected: Option<(&'static str, DateTime<Utc>)>,
    /// Lines of a modification (replacing the stored ones).
    modified_lines: Option<Vec<PricedLine>>,
    /// An event other than the placement: the fact row needs an update.
    updated: bool,
    /// Counter increments for the rollup.
    placed: i64,
    completed: i64,
    cancelled_count: i64,
    rejected_count: i64,
}

/// Order lines to insert.
#[derive(Default)]
struct Lines {
    order_id: Vec<String>,
    line_no: Vec<i32>,
    item_id: Vec<String>,
    name: Vec<String>,
    category: Vec<String>,
    quantity: Vec<i32>,
    unit_price_minor: Vec<i64>,
    revenue_minor: Vec<i64>,
    currency: Vec<String>,
}

impl Lines {
    fn push(&mut self, order_id: &str, lines: &[PricedLine]) {
        for (index, line) in lines.iter().enumerate() {
            self.order_id.push(order_id.to_owned());
            self.line_no
                .push(i32::try_from(index + 1).unwrap_or(i32::MAX));
            self.item_id.push(line.item_id.as_str().to_owned());
            self.name.push(line.name.clone());
            self.category.push(line.category.clone());
            self.quantity
                .push(i32::try_from(line.quantity).unwrap_or(i32::MAX));
            self.unit_price_minor.push(line.unit_price.minor());
            self.revenue_minor.push(line.line_total.minor());
            self.currency
                .push(line.line_total.currency().as_str().to_owned());
        }
    }
}

/// Points movements of a batch.
#[derive(Default)]
struct Movements {
    customer_id: Vec<String>,
    sequence: Vec<i64>,
    kind: Vec<&'static str>,
    points: Vec<i64>,
    order_id: Vec<Option<String>>,
    charity: Vec<Option<String>>,
    amount_minor: Vec<Option<i64>>,
    currency: Vec<Option<String>>,
    at: Vec<DateTime<Utc>>,
}

fn points(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Movements {
    fn push(&mut self, customer_id: &str, sequence: i64, event: RewardsEvent) {
        let (kind, moved, order_id, donation, at) = match event {
            RewardsEvent::PointsEarned {
                order_id,
                points: p,
                earned_at,
                ..
            } => ("earned", p, Some(order_id.to_string()), None, earned_at),
            RewardsEvent::PointsRedeemed {
                order_id,
                points: p,
                redeemed_at,
                ..
            } => ("redeemed", p, Some(order_id.to_string()), None, redeemed_at),
            RewardsEvent::RedemptionRestored {
                order_id,
                points: p,
                restored_at,
                ..
            } => ("restored", p, Some(order_id.to_string()), None, restored_at),
            RewardsEvent::PointsDonated {
                charity,
                points: p,
                amount,
                donated_at,
                ..
            } => (
                "donated",
                p,
                None,
                Some((charity.to_string(), amount)),
                donated_at,
            ),
            // Listed, not `_`: a new movement of points must be decided here.
            RewardsEvent::PointsReversed { .. }
            | RewardsEvent::PointsExpired { .. }
            | RewardsEvent::PointsAdjusted { .. }
            | RewardsEvent::SubscriptionStarted { .. }
            | RewardsEvent::SubscriptionRenewed { .. }
            | RewardsEvent::SubscriptionCancelled { .. }
            | RewardsEvent::SubscriptionLapsed { .. } => return,
        };
        self.customer_id.push(customer_id.to_owned());
        self.sequence.push(sequence);
        self.kind.push(kind);
        self.points.push(points(moved));
        self.order_id.push(order_id);
        self.charity.push(donation.as_ref().map(|(c, _)| c.clone()));
        self.amount_minor
            .push(donation.as_ref().map(|(_, amount)| amount.minor()));
        self.currency.push(
            donation
                .as_ref()
                .map(|(_, amount)| amount.currency().as_str().to_owned()),
        );
        self.at.push(at);
    }
}

#[async_trait]
impl Projection for AnalyticsProjection {
    fn name(&self) -> &'static str {
        "analytics"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order", "rewards"]
    }

    fn schema_sql(&self) -> &'static str {
        include_str!("../../sql/analytics.sql")
    }

    fn query_only_indexes(&self) -> &'static [&'static str] {
        &[
            "analytics_orders_placed",
            "analytics_orders_region",
            "analytics_orders_store",
            "analytics_points_kind",
        ]
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        self.apply_batch(tx, &[event]).await
    }

    async fn apply_batch(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        events: &[FirstDelivery<'_>],
    ) -> Result<(), ProjectionError> {
        let mut placed = Placed::default();
        let mut lines = Lines::default();
        // Orders in first-seen order, so the statements are deterministic.
        let mut order_ids: Vec<&str> = Vec::new();
        let mut changes: HashMap<&str, Change> = HashMap::new();
        let mut movements = Movements::default();
        for record in events {
            let id = record.meta.aggregate_id.as_str();
            let sequence = i64::try_from(record.meta.sequence).unwrap_or(i64::MAX);
            match record.meta.aggregate_type.as_str() {
                "order" => {
                    let event: OrderEvent = record.event().map_err(ProjectionError::event)?;
                    let change = changes.entry(id).or_insert_with(|| {
                        order_ids.push(id);
                        Change::default()
                    });
                    absorb_order_event(id, event, change, &mut placed, &mut lines);
                }
                "rewards" => {
                    let event: RewardsEvent = record.event().map_err(ProjectionError::event)?;
                    movements.push(id, sequence, event);
                }
                _ => {}
            }
        }

        insert_placed(tx, &placed).await?;
        update_orders(tx, &order_ids, &changes).await?;
        replace_lines(tx, &order_ids, &changes, lines).await?;
        add_to_rollup(tx, &order_ids, &changes).await?;
        insert_movements(tx, &movements).await?;
        Ok(())
    }
}

/// One order event into the batch: the facts of a placed order and its lines, or what the
/// event changes in the order's row and the rollup.
fn absorb_order_event(
    id: &str,
    event: OrderEvent,
    change: &mut Change,
    placed: &mut Placed,
    lines: &mut Lines,
) {
    if let Some(status) = event.status_after() {
        change.status = Some(status.as_str());
    }
    change.updated |= !matches!(event, OrderEvent::OrderPlaced { .. });
    match event {
        OrderEvent::OrderPlaced {
            customer_id,
            store_id,
            region,
            lines: placed_lines,
            total,
            points_redeemed,
            placed_at,
            ..
        } => {
            placed.order_id.push(id.to_owned());
            placed.customer_id.push(customer_id.as_uuid());
            placed.store_id.push(store_id.as_uuid());
            placed.region.push(region.as_str().to_owned());
            placed.currency.push(total.currency().as_str().to_owned());
            placed.placed_at.push(placed_at);
            placed.total_minor.push(total.minor());
            placed.points_redeemed.push(points(points_redeemed));
            lines.push(id, &placed_lines);
            change.placed += 1;
        }
        OrderEvent::OrderModified {
            lines: new_lines,
            total,
            ..
        } => {
            change.total_minor = Some(total.minor());
            change.modified_lines = Some(new_lines);
        }
        OrderEvent::OrderAccepted { accepted_at, .. } => {
            change.accepted_at = Some(accepted_at);
        }
        OrderEvent::OrderDelivered { delivered_at } => {
            change.delivered_at = Some(delivered_at);
        }
        OrderEvent::OrderCompleted { completed_at } => {
            change.completed_at = Some(completed_at);
            change.completed += 1;
        }
        OrderEvent::OrderCancelled {
            cancelled_by,
            reason,
            cancelled_at,
        } => {
            change.cancelled = Some((cancelled_by_name(cancelled_by), reason, cancelled_at));
            change.cancelled_count += 1;
        }
        OrderEvent::OrderRejected {
            reason,
            rejected_at,
        } => {
            change.rejected = Some((rejection_reason_name(reason), rejected_at));
            change.cancelled_count += 1;
            change.rejected_count += 1;
        }
        OrderEvent::OrderConfirmed { .. }
        | OrderEvent::PreparationStarted { .. }
        | OrderEvent::OrderReady { .. }
        | OrderEvent::OrderOutForDelivery { .. }
        | OrderEvent::OrderRated { .. } => {}
    }
}
