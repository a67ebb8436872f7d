//! The ad read model's queries: experiment results with their Wilson intervals, a customer's profile and exposures.

use super::*;

/// The 95 % (or any `z`) Wilson score interval of `successes` out of `trials`; `None` without
/// trials.
pub fn wilson_interval(successes: u64, trials: u64, z: f64) -> Option<(f64, f64)> {
    if trials == 0 {
        return None;
    }
    let n = trials as f64;
    let p = (successes.min(trials)) as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = z / denominator * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// An amount per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Amount {
    pub currency: String,
    pub minor: i64,
}

/// One variant's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantResult {
    pub variant: String,
    pub exposed_customers: i64,
    pub exposures: i64,
    pub converted_customers: i64,
    /// Counted conversions (orders).
    pub conversions: i64,
    /// converted / exposed customers; `None` without exposed customers.
    pub conversion_rate: Option<f64>,
    /// 95 % Wilson score interval of the conversion rate.
    pub interval: Option<(f64, f64)>,
    /// Revenue of the counted conversions, per currency.
    pub revenue: Vec<Amount>,
}

/// The results of one experiment, per variant (variants without exposures are absent).
pub async fn results(
    pool: &PgPool,
    experiment_id: &str,
) -> Result<Vec<VariantResult>, sqlx::Error> {
    let exposed: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT variant, count(*), sum(exposures)::bigint FROM ads.exposures \
         WHERE experiment_id = $1 GROUP BY variant ORDER BY variant",
    )
    .bind(experiment_id)
    .fetch_all(pool)
    .await?;
    let converted: HashMap<String, (i64, i64)> = sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT c.variant, count(DISTINCT c.customer_id), count(*) \
         FROM ads.conversions c JOIN ads.orders o USING (order_id) \
         WHERE c.experiment_id = $1 AND o.status = 'placed' GROUP BY c.variant",
    )
    .bind(experiment_id)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(variant, customers, orders)| (variant, (customers, orders)))
    .collect();
    let mut revenue: HashMap<String, Vec<Amount>> = HashMap::new();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT c.variant, o.currency, sum(o.total_minor)::bigint \
         FROM ads.conversions c JOIN ads.orders o USING (order_id) \
         WHERE c.experiment_id = $1 AND o.status = 'placed' \
         GROUP BY c.variant, o.currency ORDER BY o.currency",
    )
    .bind(experiment_id)
    .fetch_all(pool)
    .await?;
    for (variant, currency, minor) in rows {
        revenue
            .entry(variant)
            .or_default()
            .push(Amount { currency, minor });
    }
    Ok(exposed
        .into_iter()
        .map(|(variant, exposed_customers, exposures)| {
            let (converted_customers, conversions) =
                converted.get(&variant).copied().unwrap_or((0, 0));
            let trials = u64::try_from(exposed_customers).unwrap_or(0);
            let successes = u64::try_from(converted_customers).unwrap_or(0);
            VariantResult {
                revenue: revenue.remove(&variant).unwrap_or_default(),
                conversion_rate: (trials > 0).then(|| successes as f64 / trials as f64),
                interval: wilson_interval(successes, trials, Z_95),
                variant,
                exposed_customers,
                exposures,
                converted_customers,
                conversions,
            }
        })
        .collect())
}

/// A customer's profile row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ProfileRow {
    pub orders_count: i64,
    pub cancelled_orders: i64,
    pub first_order_at: Option<DateTime<Utc>>,
    pub last_order_at: Option<DateTime<Utc>>,
    pub region: Option<String>,
    pub subscription_status: String,
    pub subscription_tier: Option<String>,
    pub subscription_until: Option<DateTime<Utc>>,
}

/// A customer's assignment in one experiment.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ExposureRow {
    pub experiment_id: String,
    pub layer: String,
    pub variant: String,
    pub promotion_code: Option<String>,
    pub first_exposed_at: DateTime<Utc>,
    pub last_exposed_at: DateTime<Utc>,
    pub exposures: i64,
}

/// Everything the read model knows of one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// `None` when the customer has neither orders nor a subscription.
    pub row: Option<ProfileRow>,
    pub spend: Vec<Amount>,
    /// Units per category, most ordered first.
    pub categories: Vec<(String, i64)>,
    /// Assignments, most recent first.
    pub exposures: Vec<ExposureRow>,
}

/// One customer's profile; `None` when the read model knows nothing of them.
pub async fn profile(pool: &PgPool, customer: Uuid) -> Result<Option<Profile>, sqlx::Error> {
    let row: Option<ProfileRow> = sqlx::query_as(
        "SELECT orders_count, cancelled_orders, first_order_at, last_order_at, region, \
                subscription_status, subscription_tier, subscription_until \
         FROM ads.profiles WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_optional(pool)
    .await?;
    let exposures = exposures(pool, customer).await?;
    if row.is_none() && exposures.is_empty() {
        return Ok(None);
    }
    let spend = sqlx::query_as::<_, (String, i64)>(
        "SELECT currency, total_minor FROM ads.profile_spend WHERE customer_id = $1 ORDER BY currency",
    )
    .bind(customer)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(currency, minor)| Amount { currency, minor })
    .collect();
    let categories = sqlx::query_as(
        "SELECT category, units FROM ads.profile_categories WHERE customer_id = $1 \
         ORDER BY units DESC, category",
    )
    .bind(customer)
    .fetch_all(pool)
    .await?;
    Ok(Some(Profile {
        row,
        spend,
        categories,
        exposures,
    }))
}

/// A customer's assignments, most recent first.
pub async fn exposures(pool: &PgPool, customer: Uuid) -> Result<Vec<ExposureRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT experiment_id, layer, variant, promotion_code, first_exposed_at, last_exposed_at, \
                exposures \
         FROM ads.exposures WHERE customer_id = $1 \
         ORDER BY first_exposed_at DESC, experiment_id",
    )
    .bind(customer)
    .fetch_all(pool)
    .await
}
