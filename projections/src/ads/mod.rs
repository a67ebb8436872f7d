//! The ads read model: per-customer profiles for targeting, exposures to experiments, and the
//! conversions attributed to them, with results per variant.
//!
//! Definitions:
//! - profile: `orders_count`, first/last order time, spend per currency (totals as placed or last
//!   modified, tax and delivery fee included) and units per menu category count the orders that
//!   were not cancelled or rejected; `region` is the region of the most recent order; the
//!   subscription follows the rewards ledger's subscription events; recency is computed when
//!   read, from the last order;
//! - exposure: the first exposure of a customer to an experiment is their assignment (variant,
//!   time, attribution window); every exposure is counted;
//! - conversion: an order placed at or after the customer's first exposure and before the end of
//!   the attribution window (first exposure + window hours); its revenue is the order's total.
//!   Cancelled and rejected orders stay recorded but do not count in the results;
//! - results per variant: exposed customers, exposures, converted customers (with at least one
//!   counted conversion), conversion rate (converted / exposed) with its 95 % Wilson score
//!   interval, and revenue per currency.
//!
//! The `order`, `rewards` and `ads` topics are consumed independently, so an order can be applied
//! before the exposure that preceded it: order facts are kept per customer and attribution runs
//! for every customer a batch touches, from either side, into a table keyed by (experiment,
//! customer, order). A batch costs a bounded number of set-based statements whatever its size.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::ads::AdsEvent;
use domain::order::OrderEvent;
use domain::rewards::{RewardsEvent, SubscriptionTier};
use domain::services::PricedLine;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use streams::consumer::{FirstDelivery, Projection, ProjectionError};

mod queries;

pub use queries::*;

/// The z value of a two-sided 95 % interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// Profiles, exposures and conversions for ad targeting and experiment results.
#[derive(Debug, Default, Clone, Copy)]
pub struct AdsProjection;

/// Units per category of some lines, as a JSON object.
fn categories(lines: &[PricedLine]) -> serde_json::Value {
    let mut units: BTreeMap<&str, u64> = BTreeMap::new();
    for line in lines {
        *units.entry(line.category.as_str()).or_default() += u64::from(line.quantity);
    }
    serde_json::json!(units)
}

/// The stored name of a subscription tier.
const fn tier_name(tier: SubscriptionTier) -> &'static str {
    match tier {
        SubscriptionTier::Standard => "Standard",
        SubscriptionTier::Plus => "Plus",
        SubscriptionTier::Premium => "Premium",
    }
}

#[derive(Default)]
struct Placed {
    order_id: Vec<String>,
    customer_id: Vec<Uuid>,
    region: Vec<String>,
    placed_at: Vec<DateTime<Utc>>,
    total_minor: Vec<i64>,
    currency: Vec<String>,
    categories: Vec<serde_json::Value>,
}

/// The exposures of one (experiment, customer) within a batch: the first one's facts, the
/// count and the last time.
struct Exposed {
    layer: String,
    variant: String,
    promotion_code: Option<String>,
    region: String,
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
    count: i64,
    window_hours: i32,
}

/// A customer's subscription changes within a batch, folded in order: each field is the last
/// value an event set (unset fields keep the stored value).
#[derive(Default)]
struct SubscriptionChange {
    status: Option<&'static str>,
    tier: Option<&'static str>,
    until: Option<DateTime<Utc>>,
}

/// Everything one batch changes, gathered before the statements run.
#[derive(Default)]
struct Batch {
    placed: Placed,
    /// Orders modified: new total and categories (the latest wins).
    modified: HashMap<String, (i64, serde_json::Value)>,
    /// Orders cancelled or rejected.
    ended: HashMap<String, &'static str>,
    exposed: BTreeMap<(String, Uuid), Exposed>,
    subscriptions: BTreeMap<Uuid, SubscriptionChange>,
}

impl Batch {
    fn add(&mut self, record: &FirstDelivery<'_>) -> Result<(), ProjectionError> {
        match record.meta.aggregate_type.as_str() {
            "order" => self.add_order_event(record),
            "rewards" => self.add_rewards_event(record),
            "ads" => self.add_exposure(record),
            _ => Ok(()),
        }
    }

    /// Spend, categories and ends of orders.
    fn add_order_event(&mut self, record: &FirstDelivery<'_>) -> Result<(), ProjectionError> {
        let id = record.meta.aggregate_id.as_str();
        match record
            .event::<OrderEvent>()
            .map_err(ProjectionError::event)?
        {
            OrderEvent::OrderPlaced {
                customer_id,
                region,
                lines,
                total,
                placed_at,
                ..
            } => {
                let placed = &mut self.placed;
                placed.order_id.push(id.to_owned());
                placed.customer_id.push(customer_id.as_uuid());
                placed.region.push(region.as_str().to_owned());
                placed.placed_at.push(placed_at);
                placed.total_minor.push(total.minor());
                placed.currency.push(total.currency().as_str().to_owned());
                placed.categories.push(categories(&lines));
            }
            OrderEvent::OrderModified { lines, total, .. } => {
                self.modified
                    .insert(id.to_owned(), (total.minor(), categories(&lines)));
            }
            OrderEvent::OrderCancelled { .. } => {
                self.ended.insert(id.to_owned(), "cancelled");
            }
            OrderEvent::OrderRejected { .. } => {
                self.ended.insert(id.to_owned(), "rejected");
            }
            // Listed, not `_`: a new order event that changes spend must be decided here.
            OrderEvent::OrderConfirmed { .. }
            | OrderEvent::OrderAccepted { .. }
            | OrderEvent::PreparationStarted { .. }
            | OrderEvent::OrderReady { .. }
            | OrderEvent::OrderOutForDelivery { .. }
            | OrderEvent::OrderDelivered { .. }
            | OrderEvent::OrderCompleted { .. }
            | OrderEvent::OrderRated { .. } => {}
        }
        Ok(())
    }

    /// The customers' subscriptions.
    fn add_rewards_event(&mut self, record: &FirstDelivery<'_>) -> Result<(), ProjectionError> {
        let id = record.meta.aggregate_id.as_str();
        let customer = customer_of(id)?;
        let change = |s: &mut SubscriptionChange, event: RewardsEvent| match event {
            RewardsEvent::SubscriptionStarted { tier, until, .. } => {
                s.status = Some("active");
                s.tier = Some(tier_name(tier));
                s.until = Some(until);
            }
            RewardsEvent::SubscriptionRenewed { until, .. } => {
                s.status = Some("active");
                s.until = Some(until);
            }
            RewardsEvent::SubscriptionCancelled { ends_at, .. } => {
                s.status = Some("cancelled");
                s.until = Some(ends_at);
            }
            RewardsEvent::SubscriptionLapsed { .. } => s.status = Some("lapsed"),
            // Points do not target ads; a new subscription event must be matched above.
            RewardsEvent::PointsEarned { .. }
            | RewardsEvent::PointsRedeemed { .. }
            | RewardsEvent::RedemptionRestored { .. }
            | RewardsEvent::PointsReversed { .. }
            | RewardsEvent::PointsDonated { .. }
            | RewardsEvent::PointsExpired { .. }
            | RewardsEvent::PointsAdjusted { .. } => {}
        };
        let event = record
            .event::<RewardsEvent>()
            .map_err(ProjectionError::event)?;
        if matches!(
            event,
            RewardsEvent::SubscriptionStarted { .. }
                | RewardsEvent::SubscriptionRenewed { .. }
                | RewardsEvent::SubscriptionCancelled { .. }
                | RewardsEvent::SubscriptionLapsed { .. }
        ) {
            change(self.subscriptions.entry(customer).or_default(), event);
        }
        Ok(())
    }

    /// Exposures to experiments, per experiment and customer.
    fn add_exposure(&mut self, record: &FirstDelivery<'_>) -> Result<(), ProjectionError> {
        let id = record.meta.aggregate_id.as_str();
        let customer = customer_of(id)?;
        let AdsEvent::ExposureRecorded {
            experiment_id,
            layer,
            variant,
            promotion_code,
            region,
            attribution_window_hours,
            exposed_at,
            ..
        } = record.event::<AdsEvent>().map_err(ProjectionError::event)?;
        self.exposed
            .entry((experiment_id.to_string(), customer))
            .and_modify(|e| {
                e.count += 1;
                e.last_at = exposed_at;
            })
            .or_insert(Exposed {
                layer,
                variant,
                promotion_code,
                region: region.as_str().to_owned(),
                first_at: exposed_at,
                last_at: exposed_at,
                count: 1,
                window_hours: i32::try_from(attribution_window_hours).unwrap_or(i32::MAX),
            });
        Ok(())
    }
}

fn customer_of(aggregate_id: &str) -> Result<Uuid, ProjectionError> {
    Uuid::parse_str(aggregate_id)
        .map_err(|_| ProjectionError::event(format!("`{aggregate_id}` is not a customer id")))
}

#[async_trait]
impl Projection for AdsProjection {
    fn name(&self) -> &'static str {
        "ads"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order", "rewards", "ads"]
    }

    fn schema_sql(&self) -> &'static str {
        include_str!("../../sql/ads.sql")
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
        let mut batch = Batch::default();
        for record in events {
            batch.add(record)?;
        }
        // Customers whose profile or attribution may have changed.
        let mut touched: Vec<Uuid> = batch.placed.customer_id.clone();
        insert_orders(tx, &batch.placed).await?;
        touched.extend(update_orders(tx, &batch.modified, &batch.ended).await?);
        touched.extend(upsert_exposures(tx, &batch.exposed).await?);
        touched.extend(update_subscriptions(tx, &batch.subscriptions).await?);
        touched.sort_unstable();
        touched.dedup();
        if touched.is_empty() {
            return Ok(());
        }
        refresh_profiles(tx, &touched).await?;
        attribute(tx, &touched).await?;
        let keys: Vec<String> = touched.iter().map(Uuid::to_string).collect();
        streams::consumer::live::notify(tx, "ads", &keys).await?;
        Ok(())
    }
}

async fn insert_orders(
    tx: &mut Transaction<'static, Postgres>,
    placed: &Placed,
) -> Result<(), ProjectionError> {
    if placed.order_id.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO orders (order_id, customer_id, region, placed_at, total_minor, currency, \
           categories, status) \
         SELECT o, c, r, p, t, cur, cat, 'placed' \
         FROM unnest($1::text[], $2::uuid[], $3::text[], $4::timestamptz[], $5::bigint[], \
                     $6::text[], $7::jsonb[]) AS x(o, c, r, p, t, cur, cat) \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(&placed.order_id)
    .bind(&placed.customer_id)
    .bind(&placed.region)
    .bind(&placed.placed_at)
    .bind(&placed.total_minor)
    .bind(&placed.currency)
    .bind(&placed.categories)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Applies modifications and ends; returns the customers of the orders changed.
async fn update_orders(
    tx: &mut Transaction<'static, Postgres>,
    modified: &HashMap<String, (i64, serde_json::Value)>,
    ended: &HashMap<String, &'static str>,
) -> Result<Vec<Uuid>, ProjectionError> {
    let mut customers = Vec::new();
    if !modified.is_empty() {
        let (mut ids, mut totals, mut cats) = (Vec::new(), Vec::new(), Vec::new());
        for (id, (total, categories)) in modified {
            ids.push(id.as_str());
            totals.push(*total);
            cats.push(categories.clone());
        }
        customers.extend(
            sqlx::query_scalar::<_, Uuid>(
                "UPDATE orders o SET total_minor = u.total, categories = u.categories \
                 FROM unnest($1::text[], $2::bigint[], $3::jsonb[]) AS u(order_id, total, categories) \
                 WHERE o.order_id = u.order_id AND o.order_id = ANY($1) RETURNING o.customer_id",
            )
            .bind(&ids)
            .bind(&totals)
            .bind(&cats)
            .fetch_all(&mut **tx)
            .await?,
        );
    }
    if !ended.is_empty() {
        let (ids, statuses): (Vec<&str>, Vec<&str>) =
            ended.iter().map(|(id, s)| (id.as_str(), *s)).unzip();
        customers.extend(
            sqlx::query_scalar::<_, Uuid>(
                "UPDATE orders o SET status = u.status \
                 FROM unnest($1::text[], $2::text[]) AS u(order_id, status) \
                 WHERE o.order_id = u.order_id AND o.order_id = ANY($1) RETURNING o.customer_id",
            )
            .bind(&ids)
            .bind(&statuses)
            .fetch_all(&mut **tx)
            .await?,
        );
    }
    Ok(customers)
}

/// Records exposures: the first one of a customer to an experiment creates the assignment,
/// later ones only count. Returns the customers exposed.
async fn upsert_exposures(
    tx: &mut Transaction<'static, Postgres>,
    exposed: &BTreeMap<(String, Uuid), Exposed>,
) -> Result<Vec<Uuid>, ProjectionError> {
    if exposed.is_empty() {
        return Ok(Vec::new());
    }
    let n = exposed.len();
    let (mut experiments, mut customers) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut layers, mut variants, mut promotions, mut regions) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut firsts, mut lasts, mut counts, mut windows) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((experiment, customer), e) in exposed {
        experiments.push(experiment.as_str());
        customers.push(*customer);
        layers.push(e.layer.as_str());
        variants.push(e.variant.as_str());
        promotions.push(e.promotion_code.as_deref());
        regions.push(e.region.as_str());
        firsts.push(e.first_at);
        lasts.push(e.last_at);
        counts.push(e.count);
        windows.push(e.window_hours);
    }
    sqlx::query(
        "INSERT INTO exposures (experiment_id, customer_id, layer, variant, promotion_code, \
           region, first_exposed_at, last_exposed_at, exposures, attribution_window_hours) \
         SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
                              $6::text[], $7::timestamptz[], $8::timestamptz[], $9::bigint[], \
                              $10::int[]) \
         ON CONFLICT (experiment_id, customer_id) DO UPDATE \
         SET exposures = exposures.exposures + excluded.exposures, \
             last_exposed_at = excluded.last_exposed_at",
    )
    .bind(&experiments)
    .bind(&customers)
    .bind(&layers)
    .bind(&variants)
    .bind(&promotions)
    .bind(&regions)
    .bind(&firsts)
    .bind(&lasts)
    .bind(&counts)
    .bind(&windows)
    .execute(&mut **tx)
    .await?;
    Ok(customers)
}

async fn update_subscriptions(
    tx: &mut Transaction<'static, Postgres>,
    changes: &BTreeMap<Uuid, SubscriptionChange>,
) -> Result<Vec<Uuid>, ProjectionError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let mut customers = Vec::with_capacity(changes.len());
    let (mut statuses, mut tiers, mut untils) = (Vec::new(), Vec::new(), Vec::new());
    for (customer, change) in changes {
        customers.push(*customer);
        // Every subscription event sets the status.
        statuses.push(change.status.unwrap_or("none"));
        tiers.push(change.tier);
        untils.push(change.until);
    }
    sqlx::query(
        "INSERT INTO profiles (customer_id, subscription_status, subscription_tier, \
           subscription_until) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) \
         ON CONFLICT (customer_id) DO UPDATE \
         SET subscription_status = excluded.subscription_status, \
             subscription_tier = coalesce(excluded.subscription_tier, profiles.subscription_tier), \
             subscription_until = coalesce(excluded.subscription_until, profiles.subscription_until)",
    )
    .bind(&customers)
    .bind(&statuses)
    .bind(&tiers)
    .bind(&untils)
    .execute(&mut **tx)
    .await?;
    Ok(customers)
}

/// Recomputes the order figures of `customers` from their orders.
async fn refresh_profiles(
    tx: &mut Transaction<'static, Postgres>,
    customers: &[Uuid],
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO profiles (customer_id, orders_count, cancelled_orders, first_order_at, \
           last_order_at, region) \
         SELECT customer_id, \
                count(*) FILTER (WHERE status = 'placed'), \
                count(*) FILTER (WHERE status <> 'placed'), \
                min(placed_at) FILTER (WHERE status = 'placed'), \
                max(placed_at) FILTER (WHERE status = 'placed'), \
                (array_agg(region ORDER BY placed_at DESC, order_id DESC))[1] \
         FROM orders WHERE customer_id = ANY($1) GROUP BY customer_id \
         ON CONFLICT (customer_id) DO UPDATE \
         SET orders_count = excluded.orders_count, cancelled_orders = excluded.cancelled_orders, \
             first_order_at = excluded.first_order_at, last_order_at = excluded.last_order_at, \
             region = excluded.region",
    )
    .bind(customers)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM profile_spend WHERE customer_id = ANY($1)")
        .bind(customers)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO profile_spend (customer_id, currency, total_minor) \
         SELECT customer_id, currency, sum(total_minor) FROM orders \
         WHERE customer_id = ANY($1) AND status = 'placed' GROUP BY customer_id, currency",
    )
    .bind(customers)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM profile_categories WHERE customer_id = ANY($1)")
        .bind(customers)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO profile_categories (customer_id, category, units) \
         SELECT o.customer_id, c.key, sum(c.value::bigint) \
         FROM orders o CROSS JOIN LATERAL jsonb_each_text(o.categories) AS c(key, value) \
         WHERE o.customer_id = ANY($1) AND o.status = 'placed' GROUP BY o.customer_id, c.key",
    )
    .bind(customers)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Attributes every order of `customers` placed within an experiment's window after their
/// first exposure to it (idempotent: already attributed pairs are kept as they are).
async fn attribute(
    tx: &mut Transaction<'static, Postgres>,
    customers: &[Uuid],
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO conversions (experiment_id, customer_id, order_id, variant, placed_at) \
         SELECT e.experiment_id, e.customer_id, o.order_id, e.variant, o.placed_at \
         FROM exposures e JOIN orders o ON o.customer_id = e.customer_id \
         WHERE e.customer_id = ANY($1) \
           AND o.placed_at >= e.first_exposed_at \
           AND o.placed_at < e.first_exposed_at + make_interval(hours => e.attribution_window_hours) \
         ON CONFLICT (experiment_id, customer_id, order_id) DO NOTHING",
    )
    .bind(customers)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wilson_interval_matches_published_values_and_contains_the_rate() {
        // 8 of 10: the textbook 95 % Wilson interval is about (0.4902, 0.9433).
        let (low, high) = wilson_interval(8, 10, Z_95).expect("trials");
        assert!((low - 0.4902).abs() < 1e-3, "{low}");
        assert!((high - 0.9433).abs() < 1e-3, "{high}");
        assert_eq!(wilson_interval(0, 0, Z_95), None);
        for (x, n) in [(0u64, 5u64), (5, 5), (1, 1000), (500, 1000)] {
            let (low, high) = wilson_interval(x, n, Z_95).expect("trials");
            let rate = x as f64 / n as f64;
            assert!(low <= rate && rate <= high && (0.0..=1.0).contains(&low) && high <= 1.0);
        }
    }

    #[test]
    fn categories_count_units() {
        let line = |category: &str, quantity: u32| PricedLine {
            item_id: domain::MenuItemId::parse("x").expect("valid"),
            name: "x".to_owned(),
            category: category.to_owned(),
            quantity,
            options: vec![],
            unit_price: domain::Money::zero(domain::Currency::parse("GBP").expect("GBP")),
            line_total: domain::Money::zero(domain::Currency::parse("GBP").expect("GBP")),
        };
        assert_eq!(
            categories(&[line("pizza", 2), line("drinks", 1), line("pizza", 1)]),
            serde_json::json!({"pizza": 3, "drinks": 1})
        );
    }
}
