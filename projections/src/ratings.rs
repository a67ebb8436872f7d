//! The ratings read model: per menu item, store and courier, the number of ratings, their mean,
//! the distribution of stars, and a Bayesian average that does not let a single 5-star review
//! top the chart.
//!
//! An order's rating counts for its store and for every distinct menu item in it (as placed, or
//! as last modified); a courier's rating comes from the delivery.

use async_trait::async_trait;
use domain::delivery::DeliveryEvent;
use domain::order::OrderEvent;
use sqlx::{PgPool, Postgres, Transaction};

use streams::consumer::{FirstDelivery, Projection, ProjectionError};

/// How many "virtual" ratings at the kind's overall mean every subject starts with.
pub const PRIOR_WEIGHT: f64 = 10.0;

/// Ratings per menu item, store and courier.
#[derive(Debug, Default, Clone, Copy)]
pub struct RatingsProjection;

async fn rate(
    tx: &mut Transaction<'static, Postgres>,
    kind: &str,
    ids: &[String],
    stars: u8,
) -> Result<(), ProjectionError> {
    let stars = i64::from(stars.clamp(1, 5));
    sqlx::query(
        "INSERT INTO subjects (kind, id, count, sum, stars) \
         SELECT $1, id, 1, $3, array_fill(0::bigint, ARRAY[5]) FROM unnest($2::text[]) AS id \
         ON CONFLICT (kind, id) DO UPDATE \
         SET count = subjects.count + 1, sum = subjects.sum + $3",
    )
    .bind(kind)
    .bind(ids)
    .bind(stars)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE subjects SET stars[$3] = stars[$3] + 1 \
         WHERE kind = $1 AND id = ANY($2)",
    )
    .bind(kind)
    .bind(ids)
    .bind(i32::try_from(stars).unwrap_or(1))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Projection for RatingsProjection {
    fn name(&self) -> &'static str {
        "ratings"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order", "delivery"]
    }

    fn schema_sql(&self) -> &'static str {
        include_str!("../sql/ratings.sql")
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        let id = event.meta.aggregate_id.as_str();
        match event.meta.aggregate_type.as_str() {
            "order" => match event
                .event::<OrderEvent>()
                .map_err(ProjectionError::event)?
            {
                OrderEvent::OrderPlaced {
                    store_id, lines, ..
                } => {
                    let mut items: Vec<String> =
                        lines.iter().map(|l| l.item_id.to_string()).collect();
                    items.sort();
                    items.dedup();
                    sqlx::query(
                        "INSERT INTO orders (order_id, store_id, items) VALUES ($1, $2, $3) \
                         ON CONFLICT (order_id) DO NOTHING",
                    )
                    .bind(id)
                    .bind(store_id.as_uuid())
                    .bind(&items)
                    .execute(&mut **tx)
                    .await?;
                }
                OrderEvent::OrderModified { lines, .. } => {
                    let mut items: Vec<String> =
                        lines.iter().map(|l| l.item_id.to_string()).collect();
                    items.sort();
                    items.dedup();
                    sqlx::query("UPDATE orders SET items = $2 WHERE order_id = $1")
                        .bind(id)
                        .bind(&items)
                        .execute(&mut **tx)
                        .await?;
                }
                OrderEvent::OrderRated { stars, .. } => {
                    let order: Option<(uuid::Uuid, Vec<String>)> =
                        sqlx::query_as("SELECT store_id, items FROM orders WHERE order_id = $1")
                            .bind(id)
                            .fetch_optional(&mut **tx)
                            .await?;
                    let Some((store, items)) = order else {
                        return Err(ProjectionError::event(format!(
                            "order {id} was rated but its placement was never seen"
                        )));
                    };
                    rate(tx, "store", &[store.to_string()], stars).await?;
                    rate(tx, "item", &items, stars).await?;
                }
                _ => {}
            },
            "delivery" => {
                if let DeliveryEvent::CourierRated {
                    courier_id, stars, ..
                } = event
                    .event::<DeliveryEvent>()
                    .map_err(ProjectionError::event)?
                {
                    rate(tx, "courier", &[courier_id.to_string()], stars).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// One subject's ratings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RatingSummary {
    pub id: String,
    pub count: i64,
    pub mean: f64,
    /// Ratings with 1, 2, 3, 4 and 5 stars.
    pub distribution: Vec<i64>,
    /// `(PRIOR_WEIGHT × mean of all ratings of this kind + sum) / (PRIOR_WEIGHT + count)`.
    pub bayesian_average: f64,
}

/// The subjects of one kind (`item`, `store`, `courier`), best Bayesian average first.
pub async fn ranking(
    pool: &PgPool,
    kind: &str,
    limit: i64,
) -> Result<Vec<RatingSummary>, sqlx::Error> {
    let rows: Vec<(String, i64, i64, Vec<i64>, f64)> = sqlx::query_as(
        "WITH prior AS ( \
           SELECT coalesce(sum(sum)::float8 / nullif(sum(count), 0), 0) AS mean \
           FROM ratings.subjects WHERE kind = $1) \
         SELECT s.id, s.count, s.sum, s.stars, \
                ($3 * prior.mean + s.sum) / ($3 + s.count) AS bayesian \
         FROM ratings.subjects s, prior WHERE s.kind = $1 \
         ORDER BY bayesian DESC, s.count DESC, s.id LIMIT $2",
    )
    .bind(kind)
    .bind(limit)
    .bind(PRIOR_WEIGHT)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, count, sum, stars, bayesian)| RatingSummary {
            id,
            count,
            mean: if count == 0 {
                0.0
            } else {
                sum as f64 / count as f64
            },
            distribution: stars,
            bayesian_average: bayesian,
        })
        .collect())
}
