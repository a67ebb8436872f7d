//! The tracking read model: per order, its status, items and total, and the timeline of status
//! changes. Applied set-wise: a batch costs three statements whatever its size.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::order::OrderEvent;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::runtime::{FirstDelivery, Projection, ProjectionError};

/// Order tracking, as a customer's app shows it.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrackingProjection;

#[derive(Default)]
struct Placed {
    order_id: Vec<String>,
    customer_id: Vec<Uuid>,
    store_id: Vec<Uuid>,
    region: Vec<String>,
    items: Vec<serde_json::Value>,
    total_minor: Vec<i64>,
    currency: Vec<String>,
    placed_at: Vec<DateTime<Utc>>,
    sequence: Vec<i64>,
}

#[derive(Default)]
struct Timeline {
    order_id: Vec<String>,
    sequence: Vec<i64>,
    event_type: Vec<String>,
    status: Vec<&'static str>,
    at: Vec<DateTime<Utc>>,
}

/// New lines and total of an order modified within a batch (the latest wins).
struct Repriced {
    items: serde_json::Value,
    total_minor: i64,
}

/// The latest change of one order within a batch.
struct Latest {
    status: Option<&'static str>,
    at: DateTime<Utc>,
    sequence: i64,
}

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
        let mut timeline = Timeline::default();
        let mut latest: HashMap<&str, Latest> = HashMap::new();
        let mut repriced: HashMap<&str, Repriced> = HashMap::new();
        for delivery in events {
            let event: OrderEvent = delivery
                .event()
                .map_err(|e| ProjectionError::Event(e.to_string()))?;
            let order_id = delivery.meta.aggregate_id.as_str();
            let sequence = i64::try_from(delivery.meta.sequence).unwrap_or(i64::MAX);
            let at = event.occurred_at();
            let status = event.status_after().map(|s| s.as_str());
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
                placed.order_id.push(order_id.to_owned());
                placed.customer_id.push(customer_id.as_uuid());
                placed.store_id.push(store_id.as_uuid());
                placed.region.push(region.as_str().to_owned());
                placed.items.push(
                    serde_json::to_value(lines)
                        .map_err(|e| ProjectionError::Event(e.to_string()))?,
                );
                placed.total_minor.push(total.minor());
                placed.currency.push(total.currency().as_str().to_owned());
                placed.placed_at.push(*placed_at);
                placed.sequence.push(sequence);
            } else {
                if let OrderEvent::OrderModified { lines, total, .. } = &event {
                    repriced.insert(
                        order_id,
                        Repriced {
                            items: serde_json::to_value(lines)
                                .map_err(|e| ProjectionError::Event(e.to_string()))?,
                            total_minor: total.minor(),
                        },
                    );
                }
                let entry = latest.entry(order_id).or_insert(Latest {
                    status: None,
                    at,
                    sequence,
                });
                entry.status = status.or(entry.status);
                entry.at = at;
                entry.sequence = sequence;
            }
            if let Some(status) = status {
                timeline.order_id.push(order_id.to_owned());
                timeline.sequence.push(sequence);
                timeline.event_type.push(delivery.meta.event_type.clone());
                timeline.status.push(status);
                timeline.at.push(at);
            }
        }
        if !placed.order_id.is_empty() {
            sqlx::query(
                "INSERT INTO tracking.orders (order_id, customer_id, store_id, region, status, items, \
                   total_minor, currency, placed_at, updated_at, last_sequence) \
                 SELECT o, c, s, r, 'Placed', i, t, cur, p, p, q \
                 FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::jsonb[], \
                             $6::bigint[], $7::text[], $8::timestamptz[], $9::bigint[]) \
                   AS x(o, c, s, r, i, t, cur, p, q) \
                 ON CONFLICT (order_id) DO NOTHING",
            )
            .bind(&placed.order_id)
            .bind(&placed.customer_id)
            .bind(&placed.store_id)
            .bind(&placed.region)
            .bind(&placed.items)
            .bind(&placed.total_minor)
            .bind(&placed.currency)
            .bind(&placed.placed_at)
            .bind(&placed.sequence)
            .execute(&mut **tx)
            .await?;
        }
        if !latest.is_empty() {
            let mut ids = Vec::with_capacity(latest.len());
            let mut statuses = Vec::with_capacity(latest.len());
            let mut ats = Vec::with_capacity(latest.len());
            let mut sequences = Vec::with_capacity(latest.len());
            for (id, change) in &latest {
                ids.push(*id);
                statuses.push(change.status);
                ats.push(change.at);
                sequences.push(change.sequence);
            }
            sqlx::query(
                "UPDATE tracking.orders o \
                 SET status = coalesce(u.status, o.status), updated_at = u.at, last_sequence = u.seq \
                 FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) \
                   AS u(order_id, status, at, seq) \
                 WHERE o.order_id = u.order_id",
            )
            .bind(&ids)
            .bind(&statuses)
            .bind(&ats)
            .bind(&sequences)
            .execute(&mut **tx)
            .await?;
        }
        if !repriced.is_empty() {
            let (mut ids, mut items, mut totals) = (Vec::new(), Vec::new(), Vec::new());
            for (id, change) in repriced {
                ids.push(id);
                items.push(change.items);
                totals.push(change.total_minor);
            }
            sqlx::query(
                "UPDATE tracking.orders o SET items = u.items, total_minor = u.total \
                 FROM unnest($1::text[], $2::jsonb[], $3::bigint[]) AS u(order_id, items, total) \
                 WHERE o.order_id = u.order_id",
            )
            .bind(&ids)
            .bind(&items)
            .bind(&totals)
            .execute(&mut **tx)
            .await?;
        }
        if !timeline.order_id.is_empty() {
            sqlx::query(
                "INSERT INTO tracking.timeline (order_id, sequence, event_type, status, at) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::timestamptz[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&timeline.order_id)
            .bind(&timeline.sequence)
            .bind(&timeline.event_type)
            .bind(&timeline.status)
            .bind(&timeline.at)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}
