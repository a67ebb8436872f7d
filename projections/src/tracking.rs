//! The tracking read model: per order, its status, items and total, the timeline of status
//! changes, and its delivery: courier, last position and ETA with its uncertainty. Applied
//! set-wise: a batch costs a handful of statements whatever its size. Every changed order is
//! signalled on the live channel `tracking` for the API's event streams.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::delivery::DeliveryEvent;
use domain::order::OrderEvent;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use streams::consumer::{FirstDelivery, Projection, ProjectionError};

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
        &["order", "delivery"]
    }

    fn schema_sql(&self) -> &'static str {
        include_str!("../sql/tracking.sql")
    }

    fn query_only_indexes(&self) -> &'static [&'static str] {
        &[
            "tracking_orders_customer",
            "tracking_orders_store",
            "tracking_orders_placed",
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
        let mut changes = Changes::default();
        for record in events {
            if record.meta.aggregate_type == "delivery" {
                let event: DeliveryEvent = record.event().map_err(ProjectionError::event)?;
                let sequence = i64::try_from(record.meta.sequence).unwrap_or(i64::MAX);
                changes
                    .deliveries
                    .entry(record.meta.aggregate_id.as_str())
                    .or_default()
                    .absorb(&event, sequence);
            } else {
                changes.absorb_order(record)?;
            }
        }
        changes.write(tx).await?;
        let changed: std::collections::BTreeSet<String> =
            events.iter().map(|e| e.meta.aggregate_id.clone()).collect();
        streams::consumer::live::notify(tx, "tracking", &changed.into_iter().collect::<Vec<_>>())
            .await?;
        Ok(())
    }
}

/// What a batch changes, gathered first and written set-wise.
#[derive(Default)]
struct Changes<'e> {
    placed: Placed,
    timeline: Timeline,
    latest: HashMap<&'e str, Latest>,
    repriced: HashMap<&'e str, Repriced>,
    deliveries: HashMap<&'e str, DeliveryChange>,
}

impl<'e> Changes<'e> {
    /// One order event: a new row (placed), a new status and time, new lines (modified), and
    /// a timeline entry for each status change.
    fn absorb_order(&mut self, record: &'e FirstDelivery<'_>) -> Result<(), ProjectionError> {
        let event: OrderEvent = record.event().map_err(ProjectionError::event)?;
        let order_id = record.meta.aggregate_id.as_str();
        let sequence = i64::try_from(record.meta.sequence).unwrap_or(i64::MAX);
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
            let placed = &mut self.placed;
            placed.order_id.push(order_id.to_owned());
            placed.customer_id.push(customer_id.as_uuid());
            placed.store_id.push(store_id.as_uuid());
            placed.region.push(region.as_str().to_owned());
            placed
                .items
                .push(serde_json::to_value(lines).map_err(ProjectionError::event)?);
            placed.total_minor.push(total.minor());
            placed.currency.push(total.currency().as_str().to_owned());
            placed.placed_at.push(*placed_at);
            placed.sequence.push(sequence);
        } else {
            if let OrderEvent::OrderModified { lines, total, .. } = &event {
                self.repriced.insert(
                    order_id,
                    Repriced {
                        items: serde_json::to_value(lines).map_err(ProjectionError::event)?,
                        total_minor: total.minor(),
                    },
                );
            }
            let entry = self.latest.entry(order_id).or_insert(Latest {
                status: None,
                at,
                sequence,
            });
            entry.status = status.or(entry.status);
            entry.at = at;
            entry.sequence = sequence;
        }
        if let Some(status) = status {
            let timeline = &mut self.timeline;
            timeline.order_id.push(order_id.to_owned());
            timeline.sequence.push(sequence);
            timeline.event_type.push(record.meta.event_type.clone());
            timeline.status.push(status);
            timeline.at.push(at);
        }
        Ok(())
    }

    async fn write(self, tx: &mut Transaction<'static, Postgres>) -> Result<(), ProjectionError> {
        insert_placed(tx, &self.placed).await?;
        update_latest(tx, &self.latest).await?;
        update_repriced(tx, self.repriced).await?;
        upsert_deliveries(tx, &self.deliveries).await?;
        insert_timeline(tx, &self.timeline).await
    }
}

async fn insert_placed(
    tx: &mut Transaction<'static, Postgres>,
    placed: &Placed,
) -> Result<(), ProjectionError> {
    if placed.order_id.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO orders (order_id, customer_id, store_id, region, status, items, \
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
    Ok(())
}

async fn update_latest(
    tx: &mut Transaction<'static, Postgres>,
    latest: &HashMap<&str, Latest>,
) -> Result<(), ProjectionError> {
    if latest.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(latest.len());
    let mut statuses = Vec::with_capacity(latest.len());
    let mut ats = Vec::with_capacity(latest.len());
    let mut sequences = Vec::with_capacity(latest.len());
    for (id, change) in latest {
        ids.push(*id);
        statuses.push(change.status);
        ats.push(change.at);
        sequences.push(change.sequence);
    }
    sqlx::query(
        "UPDATE orders o \
             SET status = coalesce(u.status, o.status), updated_at = u.at, last_sequence = u.seq \
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) \
               AS u(order_id, status, at, seq) \
             WHERE o.order_id = u.order_id AND o.order_id = ANY($1)",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&ats)
    .bind(&sequences)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn update_repriced(
    tx: &mut Transaction<'static, Postgres>,
    repriced: HashMap<&str, Repriced>,
) -> Result<(), ProjectionError> {
    if repriced.is_empty() {
        return Ok(());
    }
    let (mut ids, mut items, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for (id, change) in repriced {
        ids.push(id);
        items.push(change.items);
        totals.push(change.total_minor);
    }
    sqlx::query(
        "UPDATE orders o SET items = u.items, total_minor = u.total \
             FROM unnest($1::text[], $2::jsonb[], $3::bigint[]) AS u(order_id, items, total) \
             WHERE o.order_id = u.order_id AND o.order_id = ANY($1)",
    )
    .bind(&ids)
    .bind(&items)
    .bind(&totals)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_timeline(
    tx: &mut Transaction<'static, Postgres>,
    timeline: &Timeline,
) -> Result<(), ProjectionError> {
    if timeline.order_id.is_empty() {
        return Ok(());
    }
    sqlx::query(
            "INSERT INTO timeline (order_id, sequence, event_type, status, at) \
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
    Ok(())
}

/// What a batch changed in one delivery; `None` keeps the stored value.
#[derive(Default)]
struct DeliveryChange {
    status: Option<&'static str>,
    courier_id: Option<Uuid>,
    position: Option<(f64, f64, DateTime<Utc>)>,
    eta: Option<Eta>,
    updated_at: Option<DateTime<Utc>>,
    sequence: i64,
}

#[derive(Clone, Copy)]
struct Eta {
    expected_at: DateTime<Utc>,
    earliest_at: DateTime<Utc>,
    latest_at: DateTime<Utc>,
    remaining_meters: i32,
    estimated_at: DateTime<Utc>,
}

impl DeliveryChange {
    fn absorb(&mut self, event: &DeliveryEvent, sequence: i64) {
        match event {
            DeliveryEvent::CourierAssigned { courier_id, .. } => {
                self.courier_id = Some(courier_id.as_uuid());
            }
            DeliveryEvent::CourierLocationUpdated {
                position,
                device_time,
                ..
            } => self.position = Some((position.latitude, position.longitude, *device_time)),
            DeliveryEvent::EtaUpdated {
                expected_at,
                earliest_at,
                latest_at,
                remaining_meters,
                estimated_at,
            } => {
                self.eta = Some(Eta {
                    expected_at: *expected_at,
                    earliest_at: *earliest_at,
                    latest_at: *latest_at,
                    remaining_meters: i32::try_from(*remaining_meters).unwrap_or(i32::MAX),
                    estimated_at: *estimated_at,
                });
            }
            _ => {}
        }
        if let Some(status) = event.status_after() {
            self.status = Some(status.as_str());
        }
        self.updated_at = Some(event.occurred_at());
        self.sequence = sequence;
    }
}

async fn upsert_deliveries(
    tx: &mut Transaction<'static, Postgres>,
    changes: &HashMap<&str, DeliveryChange>,
) -> Result<(), ProjectionError> {
    if changes.is_empty() {
        return Ok(());
    }
    let n = changes.len();
    let (mut ids, mut statuses, mut couriers) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut lats, mut lons, mut position_ats) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut expected, mut earliest, mut latest, mut remaining, mut estimated) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut updated, mut sequences) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (id, change) in changes {
        ids.push(*id);
        statuses.push(change.status);
        couriers.push(change.courier_id);
        lats.push(change.position.map(|p| p.0));
        lons.push(change.position.map(|p| p.1));
        position_ats.push(change.position.map(|p| p.2));
        expected.push(change.eta.map(|e| e.expected_at));
        earliest.push(change.eta.map(|e| e.earliest_at));
        latest.push(change.eta.map(|e| e.latest_at));
        remaining.push(change.eta.map(|e| e.remaining_meters));
        estimated.push(change.eta.map(|e| e.estimated_at));
        updated.push(change.updated_at);
        sequences.push(change.sequence);
    }
    // A new row's status is `Requested` at the least (its first event is DeliveryRequested).
    sqlx::query(
        "INSERT INTO deliveries AS d (order_id, status, courier_id, latitude, longitude, \
           position_at, eta_expected_at, eta_earliest_at, eta_latest_at, remaining_meters, \
           eta_estimated_at, updated_at, last_sequence) \
         SELECT o, coalesce(s, 'Requested'), c, la, lo, pa, ex, ea, lt, rm, es, coalesce(u, now()), q \
         FROM unnest($1::text[], $2::text[], $3::uuid[], $4::float8[], $5::float8[], \
                     $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], \
                     $10::int[], $11::timestamptz[], $12::timestamptz[], $13::bigint[]) \
           AS x(o, s, c, la, lo, pa, ex, ea, lt, rm, es, u, q) \
         ON CONFLICT (order_id) DO UPDATE SET \
           status = coalesce($2[array_position($1, d.order_id)], d.status), \
           courier_id = coalesce(excluded.courier_id, d.courier_id), \
           latitude = coalesce(excluded.latitude, d.latitude), \
           longitude = coalesce(excluded.longitude, d.longitude), \
           position_at = coalesce(excluded.position_at, d.position_at), \
           eta_expected_at = coalesce(excluded.eta_expected_at, d.eta_expected_at), \
           eta_earliest_at = coalesce(excluded.eta_earliest_at, d.eta_earliest_at), \
           eta_latest_at = coalesce(excluded.eta_latest_at, d.eta_latest_at), \
           remaining_meters = coalesce(excluded.remaining_meters, d.remaining_meters), \
           eta_estimated_at = coalesce(excluded.eta_estimated_at, d.eta_estimated_at), \
           updated_at = excluded.updated_at, \
           last_sequence = excluded.last_sequence",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&couriers)
    .bind(&lats)
    .bind(&lons)
    .bind(&position_ats)
    .bind(&expected)
    .bind(&earliest)
    .bind(&latest)
    .bind(&remaining)
    .bind(&estimated)
    .bind(&updated)
    .bind(&sequences)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
