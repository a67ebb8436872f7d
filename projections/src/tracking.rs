//! The tracking read model: per order, its status and the timeline of status changes.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::order::OrderEvent;
use sqlx::{Postgres, Transaction};

use crate::runtime::{FirstDelivery, Projection, ProjectionError};

/// Order tracking, as a customer's app shows it.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrackingProjection;

#[async_trait]
impl Projection for TrackingProjection {
    fn name(&self) -> &'static str {
        "tracking"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order"]
    }

    fn schema_sql(&self) -> &'static str {
        include_str!("../sql/tracking.sql")
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        delivery: FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        let event: OrderEvent = delivery
            .event()
            .map_err(|e| ProjectionError::Event(e.to_string()))?;
        let order_id = delivery.meta.aggregate_id.as_str();
        let sequence = i64::try_from(delivery.meta.sequence).unwrap_or(i64::MAX);
        let at = event.occurred_at();
        if let OrderEvent::OrderPlaced {
            customer_id,
            store_id,
            region,
            lines,
            total,
            placed_at,
            ..
        } = &event
        {
            let items =
                serde_json::to_value(lines).map_err(|e| ProjectionError::Event(e.to_string()))?;
            sqlx::query(
                "INSERT INTO tracking.orders (order_id, customer_id, store_id, region, status, items, \
                   total_minor, currency, placed_at, updated_at, last_sequence) \
                 VALUES ($1, $2, $3, $4, 'Placed', $5, $6, $7, $8, $8, $9) \
                 ON CONFLICT (order_id) DO NOTHING",
            )
            .bind(order_id)
            .bind(customer_id.as_uuid())
            .bind(store_id.as_uuid())
            .bind(region.as_str())
            .bind(items)
            .bind(total.minor())
            .bind(total.currency().as_str())
            .bind(placed_at)
            .bind(sequence)
            .execute(&mut **tx)
            .await?;
        } else {
            let status = event.status_after().map(|s| s.as_str());
            sqlx::query(
                "UPDATE tracking.orders SET status = coalesce($2, status), updated_at = $3, \
                   last_sequence = $4 WHERE order_id = $1",
            )
            .bind(order_id)
            .bind(status)
            .bind(at)
            .bind(sequence)
            .execute(&mut **tx)
            .await?;
        }
        if let Some(status) = event.status_after() {
            insert_timeline(
                tx,
                order_id,
                sequence,
                &delivery.meta.event_type,
                status.as_str(),
                at,
            )
            .await?;
        }
        Ok(())
    }
}

async fn insert_timeline(
    tx: &mut Transaction<'static, Postgres>,
    order_id: &str,
    sequence: i64,
    event_type: &str,
    status: &str,
    at: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO tracking.timeline (order_id, sequence, event_type, status, at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(order_id)
    .bind(sequence)
    .bind(event_type)
    .bind(status)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
