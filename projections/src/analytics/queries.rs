//! The dashboards' queries over the analytics read model.

use super::*;

/// Which orders (or points movements) a query covers. Times select by the placement of the
/// order (`from` inclusive, `to` exclusive), or by the movement's own time for points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub region: Option<String>,
    pub store_id: Option<Uuid>,
    pub currency: Option<String>,
}

impl Filter {
    /// Appends ` AND ...` conditions on `alias`'s `time`, `region`, `store_id` and `currency`
    /// columns (region and store only when `with_place`).
    fn push(&self, q: &mut QueryBuilder<'_, Postgres>, alias: &str, time: &str, with_place: bool) {
        if let Some(from) = self.from {
            q.push(format!(" AND {alias}.{time} >= ")).push_bind(from);
        }
        if let Some(to) = self.to {
            q.push(format!(" AND {alias}.{time} < ")).push_bind(to);
        }
        if with_place {
            if let Some(region) = &self.region {
                q.push(format!(" AND {alias}.region = "))
                    .push_bind(region.clone());
            }
            if let Some(store) = self.store_id {
                q.push(format!(" AND {alias}.store_id = ")).push_bind(store);
            }
        }
        if let Some(currency) = &self.currency {
            q.push(format!(" AND {alias}.currency = "))
                .push_bind(currency.clone());
        }
    }

    fn places(&self) -> bool {
        self.region.is_some() || self.store_id.is_some()
    }
}

/// How summary rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Region,
    Store,
    /// UTC hour of placement.
    Hour,
    None,
}

impl GroupBy {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Region => "region",
            Self::Store => "store",
            Self::Hour => "hour",
            Self::None => "none",
        }
    }

    /// The group key as text whose byte order is the key's order (`COLLATE "C"`).
    const fn key_sql(self) -> &'static str {
        match self {
            Self::Region => "region",
            Self::Store => "store_id::text",
            Self::Hour => "to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24\":00:00Z\"')",
            Self::None => "''",
        }
    }
}

/// p50, p90 and p99 in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

fn percentiles(values: Option<Vec<f64>>) -> Option<Percentiles> {
    match values.as_deref() {
        Some([p50, p90, p99]) => Some(Percentiles {
            p50: *p50,
            p90: *p90,
            p99: *p99,
        }),
        _ => None,
    }
}

/// One group of the summary, in one currency.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    /// The group key as text: a region code, a store id, an hour (`2024-05-01T13:00:00Z`) or
    /// empty (no grouping).
    pub key: String,
    pub currency: String,
    pub orders: i64,
    pub completed: i64,
    pub cancelled: i64,
    pub rejected: i64,
    pub revenue_minor: i64,
    pub acceptance_seconds: Option<Percentiles>,
    pub delivery_seconds: Option<Percentiles>,
}

impl SummaryRow {
    /// Revenue / completed, rounded half away from zero; `None` without completed orders.
    pub fn aov_minor(&self) -> Option<i64> {
        (self.completed > 0).then(|| {
            let (revenue, completed) = (i128::from(self.revenue_minor), i128::from(self.completed));
            let rounded = (2 * revenue + completed) / (2 * completed);
            i64::try_from(rounded).unwrap_or(i64::MAX)
        })
    }
}

type SummaryTuple = (
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<Vec<f64>>,
    Option<Vec<f64>>,
);

/// Groups after `after` (key, currency), in key order, at most `limit`. Counts and revenue come
/// from the hourly rollup, percentiles from the facts of the same orders; `from` and `to` must
/// therefore be whole hours (the API checks).
pub async fn summary(
    pool: &PgPool,
    group_by: GroupBy,
    filter: &Filter,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<SummaryRow>, sqlx::Error> {
    let key = group_by.key_sql();
    let mut q = QueryBuilder::new(format!(
        "WITH page AS ( \
           SELECT key, currency, sum(orders)::bigint AS orders, \
                  sum(completed)::bigint AS completed, sum(cancelled)::bigint AS cancelled, \
                  sum(rejected)::bigint AS rejected, sum(revenue_minor)::bigint AS revenue \
           FROM (SELECT ({key}) COLLATE \"C\" AS key, h.currency COLLATE \"C\" AS currency, \
                        h.orders, h.completed, h.cancelled, h.rejected, h.revenue_minor \
                 FROM analytics.hourly h WHERE true"
    ));
    filter.push(&mut q, "h", "hour", true);
    q.push(") r");
    if let Some((key, currency)) = after {
        q.push(" WHERE (key, currency) > (")
            .push_bind(key.to_owned())
            .push("::text COLLATE \"C\", ")
            .push_bind(currency.to_owned())
            .push("::text COLLATE \"C\")");
    }
    q.push(" GROUP BY key, currency ORDER BY key, currency LIMIT ")
        .push_bind(limit)
        .push(format!(
            "), timings AS ( \
               SELECT ({key}) COLLATE \"C\" AS key, o.currency COLLATE \"C\" AS currency, \
                 percentile_cont(ARRAY[0.5, 0.9, 0.99]::float8[]) WITHIN GROUP \
                   (ORDER BY extract(epoch FROM o.accepted_at - o.placed_at)::float8) \
                   FILTER (WHERE o.accepted_at IS NOT NULL) AS acceptance, \
                 percentile_cont(ARRAY[0.5, 0.9, 0.99]::float8[]) WITHIN GROUP \
                   (ORDER BY extract(epoch FROM o.delivered_at - o.placed_at)::float8) \
                   FILTER (WHERE o.delivered_at IS NOT NULL) AS delivery \
               FROM analytics.orders o WHERE true"
        ));
    filter.push(&mut q, "o", "placed_at", true);
    q.push(format!(
        " AND (({key}) COLLATE \"C\", o.currency COLLATE \"C\") IN (SELECT key, currency FROM page) \
           GROUP BY 1, 2) \
         SELECT p.key, p.currency, p.orders, p.completed, p.cancelled, p.rejected, p.revenue, \
                t.acceptance, t.delivery \
         FROM page p LEFT JOIN timings t ON t.key = p.key AND t.currency = p.currency \
         ORDER BY p.key, p.currency"
    ));
    let rows: Vec<SummaryTuple> = q.build_query_as().fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(
            |(key, currency, orders, completed, cancelled, rejected, revenue, acc, del)| {
                SummaryRow {
                    key,
                    currency,
                    orders,
                    completed,
                    cancelled,
                    rejected,
                    revenue_minor: revenue,
                    acceptance_seconds: percentiles(acc),
                    delivery_seconds: percentiles(del),
                }
            },
        )
        .collect())
}

/// Cancellations and rejections of the orders placed in the range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cancellations {
    /// Orders cancelled, per party (`Customer`, `Store`, `System`).
    pub by_party: Vec<(String, i64)>,
    /// The most frequent (party, reason text) pairs, most frequent first.
    pub reasons: Vec<(String, String, i64)>,
    /// Store rejections per reason (`Busy`, `ClosingEarly`, `ItemUnavailable`, `Other`).
    pub rejections: Vec<(String, i64)>,
}

/// Counts per party, the `limit` most frequent reasons, and rejections per reason.
pub async fn cancellations(
    pool: &PgPool,
    filter: &Filter,
    limit: i64,
) -> Result<Cancellations, sqlx::Error> {
    let mut q = QueryBuilder::new(
        "SELECT o.cancelled_by, count(*) FROM analytics.orders o \
         WHERE o.cancelled_at IS NOT NULL",
    );
    filter.push(&mut q, "o", "placed_at", true);
    q.push(" GROUP BY 1 ORDER BY 1");
    let by_party: Vec<(String, i64)> = q.build_query_as().fetch_all(pool).await?;

    let mut q = QueryBuilder::new(
        "SELECT o.cancelled_by, o.cancel_reason, count(*) FROM analytics.orders o \
         WHERE o.cancelled_at IS NOT NULL",
    );
    filter.push(&mut q, "o", "placed_at", true);
    q.push(" GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT ")
        .push_bind(limit);
    let reasons: Vec<(String, String, i64)> = q.build_query_as().fetch_all(pool).await?;

    let mut q = QueryBuilder::new(
        "SELECT o.rejection_reason, count(*) FROM analytics.orders o \
         WHERE o.rejected_at IS NOT NULL",
    );
    filter.push(&mut q, "o", "placed_at", true);
    q.push(" GROUP BY 1 ORDER BY 1");
    let rejections: Vec<(String, i64)> = q.build_query_as().fetch_all(pool).await?;
    Ok(Cancellations {
        by_party,
        reasons,
        rejections,
    })
}

/// How top items are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopBy {
    Quantity,
    Revenue,
}

/// One item's sales in one currency.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TopItem {
    pub item_id: String,
    /// The name on the most recently placed order.
    pub name: String,
    pub category: String,
    pub quantity: i64,
    pub revenue_minor: i64,
    pub currency: String,
}

/// The best-selling items of the completed orders placed in the range.
pub async fn top_items(
    pool: &PgPool,
    filter: &Filter,
    by: TopBy,
    limit: i64,
) -> Result<Vec<TopItem>, sqlx::Error> {
    let mut q = QueryBuilder::new(
        "SELECT l.item_id, (array_agg(l.name ORDER BY o.placed_at DESC))[1] AS name, \
                (array_agg(l.category ORDER BY o.placed_at DESC))[1] AS category, \
                sum(l.quantity)::bigint AS quantity, sum(l.revenue_minor)::bigint AS revenue_minor, \
                l.currency \
         FROM analytics.orders o JOIN analytics.order_lines l ON l.order_id = o.order_id \
         WHERE o.completed_at IS NOT NULL",
    );
    filter.push(&mut q, "o", "placed_at", true);
    q.push(" GROUP BY l.item_id, l.currency ORDER BY ");
    q.push(match by {
        TopBy::Quantity => "quantity DESC, revenue_minor DESC",
        TopBy::Revenue => "revenue_minor DESC, quantity DESC",
    });
    q.push(", l.item_id, l.currency LIMIT ").push_bind(limit);
    let rows = q.build_query_as().fetch_all(pool).await?;
    Ok(rows)
}

/// A count of points movements and their points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Movement {
    pub count: i64,
    pub points: i64,
}

/// Points moved in the range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PointsFlow {
    pub earned: Movement,
    pub redeemed: Movement,
    pub restored: Movement,
}

/// Donations to one charity in one currency.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Donation {
    pub charity: String,
    pub currency: String,
    pub count: i64,
    pub points: i64,
    pub amount_minor: i64,
}

/// Points earned, redeemed and restored in the range. With a region, store or currency, only
/// the movements whose order is known (projected) and matches count.
pub async fn points_flow(pool: &PgPool, filter: &Filter) -> Result<PointsFlow, sqlx::Error> {
    let matches_order = filter.places() || filter.currency.is_some();
    let mut q = QueryBuilder::new(
        "SELECT m.kind, count(*), coalesce(sum(m.points), 0)::bigint \
         FROM analytics.points_movements m",
    );
    if matches_order {
        q.push(" JOIN analytics.orders o ON o.order_id = m.order_id");
    }
    q.push(" WHERE m.kind IN ('earned', 'redeemed', 'restored')");
    let time_only = Filter {
        from: filter.from,
        to: filter.to,
        ..Filter::default()
    };
    time_only.push(&mut q, "m", "at", false);
    if matches_order {
        let place = Filter {
            from: None,
            to: None,
            ..filter.clone()
        };
        place.push(&mut q, "o", "placed_at", true);
    }
    q.push(" GROUP BY m.kind");
    let rows: Vec<(String, i64, i64)> = q.build_query_as().fetch_all(pool).await?;
    let mut flow = PointsFlow::default();
    for (kind, count, points) in rows {
        let movement = Movement { count, points };
        match kind.as_str() {
            "earned" => flow.earned = movement,
            "redeemed" => flow.redeemed = movement,
            "restored" => flow.restored = movement,
            _ => {}
        }
    }
    Ok(flow)
}

/// Selects donations (`m`) for `filter`. A donation belongs to no order; with a region or a
/// store it is attributed to the donor's home at the time: the region and store of the donor's
/// latest order placed at or before the donation (a donor without such an order belongs to no
/// region or store, and is left out). Each donation so counts in exactly one region and store,
/// and the per-region figures add up to the unfiltered ones (less donors who never ordered).
fn push_donation_filter(q: &mut QueryBuilder<'_, Postgres>, filter: &Filter) {
    if filter.places() {
        q.push(
            " JOIN LATERAL (SELECT o.region, o.store_id FROM analytics.orders o \
               WHERE o.customer_id::text = m.customer_id AND o.placed_at <= m.at \
               ORDER BY o.placed_at DESC LIMIT 1) home ON true",
        );
    }
    q.push(" WHERE m.kind = 'donated'");
    let time_and_currency = Filter {
        region: None,
        store_id: None,
        ..filter.clone()
    };
    time_and_currency.push(q, "m", "at", false);
    if filter.places() {
        let place = Filter {
            region: filter.region.clone(),
            store_id: filter.store_id,
            ..Filter::default()
        };
        place.push(q, "home", "at", true);
    }
}

/// Donations per (charity, currency) after `after`, in that order, at most `limit`. The time
/// range and currency select them by their own time and currency; a region or store by the
/// donor's home at the time (see [`push_donation_filter`]).
pub async fn donations(
    pool: &PgPool,
    filter: &Filter,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<Donation>, sqlx::Error> {
    let mut q = QueryBuilder::new(
        "SELECT m.charity COLLATE \"C\" AS charity, m.currency COLLATE \"C\" AS currency, \
                count(*) AS count, sum(m.points)::bigint AS points, \
                sum(m.amount_minor)::bigint AS amount_minor \
         FROM analytics.points_movements m",
    );
    push_donation_filter(&mut q, filter);
    if let Some((charity, currency)) = after {
        q.push(" AND (m.charity COLLATE \"C\", m.currency COLLATE \"C\") > (")
            .push_bind(charity.to_owned())
            .push("::text COLLATE \"C\", ")
            .push_bind(currency.to_owned())
            .push("::text COLLATE \"C\")");
    }
    q.push(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT ")
        .push_bind(limit);
    let rows = q.build_query_as().fetch_all(pool).await?;
    Ok(rows)
}

/// Donations per currency (every charity), selected as in [`donations`].
pub async fn donation_totals(
    pool: &PgPool,
    filter: &Filter,
) -> Result<Vec<(String, i64, i64, i64)>, sqlx::Error> {
    let mut q = QueryBuilder::new(
        "SELECT m.currency, count(*), sum(m.points)::bigint, sum(m.amount_minor)::bigint \
         FROM analytics.points_movements m",
    );
    push_donation_filter(&mut q, filter);
    q.push(" GROUP BY 1 ORDER BY 1");
    let rows = q.build_query_as().fetch_all(pool).await?;
    Ok(rows)
}
