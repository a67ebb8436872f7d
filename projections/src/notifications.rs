//! The notifications read model: what a customer is told, one record per customer and causing
//! event — the order confirmed, out for delivery, delivered, rejected by the store, cancelled
//! (with who and why), its delivery failed, and rewards points earned.
//!
//! Records are the cursor-ordered feed behind the customer's notification list, its SSE stream
//! (woken by a `streams::consumer::live` signal on channel [`LIVE_CHANNEL`] keyed by customer) and the
//! webhook delivery worker ([`crate::notifier`]). The order's events do not name its customer, so
//! the projection remembers order → customer (and the current total) from `OrderPlaced` and
//! `OrderModified`; an order's events arrive in order, so the placement is always known first.
//! A delivery's failure comes from another topic: if it is applied before the order's placement
//! (a rebuild reads the topics side by side), it waits in `pending_delivery_failures` and is
//! told when the placement arrives.
//!
//! Replay-safe: every row is a pure function of the events (the record's `created_at` is the
//! event's `recorded_at`), records are unique per (customer, event) and inserted with
//! `ON CONFLICT DO NOTHING`, so re-reading the topics into the same schema adds nothing.
//! Applied set-wise: a batch costs at most three statements, whatever its size.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::delivery::DeliveryEvent;
use domain::order::OrderEvent;
use domain::rewards::RewardsEvent;
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use streams::consumer::{FirstDelivery, Projection, ProjectionError};

/// The read model's name: its schema and consumer-group suffix.
pub const NAME: &str = "notifications";
/// The live-update channel; keys are customer ids.
pub const LIVE_CHANNEL: &str = "notifications";

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// `OrderConfirmed`: the payment is authorized and the order goes to the store.
    OrderConfirmed,
    /// `OrderOutForDelivery`: the courier has it.
    OrderOutForDelivery,
    /// `OrderDelivered`.
    OrderDelivered,
    /// `PointsEarned` on the customer's rewards ledger.
    PointsEarned,
    /// `OrderRejected`: the store turned the order down (the payment is voided).
    OrderRejected,
    /// `OrderCancelled`, with who cancelled and why (the payment is voided, redeemed points
    /// given back).
    OrderCancelled,
    /// `DeliveryFailed`: the courier could not hand the food over.
    DeliveryFailed,
}

impl NotificationKind {
    /// Every kind, as stored and served.
    pub const ALL: [Self; 7] = [
        Self::OrderConfirmed,
        Self::OrderOutForDelivery,
        Self::OrderDelivered,
        Self::PointsEarned,
        Self::OrderRejected,
        Self::OrderCancelled,
        Self::DeliveryFailed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OrderConfirmed => "order_confirmed",
            Self::OrderOutForDelivery => "order_out_for_delivery",
            Self::OrderDelivered => "order_delivered",
            Self::PointsEarned => "points_earned",
            Self::OrderRejected => "order_rejected",
            Self::OrderCancelled => "order_cancelled",
            Self::DeliveryFailed => "delivery_failed",
        }
    }

    /// The kind named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Customer notifications.
#[derive(Debug, Default, Clone, Copy)]
pub struct NotificationsProjection;

/// What the projection knows of an order.
#[derive(Debug, Clone)]
struct OrderFacts {
    customer_id: Uuid,
    total_minor: i64,
    currency: String,
}

/// Records to insert, column-wise, in event order.
#[derive(Default)]
struct Records {
    customer_id: Vec<Uuid>,
    kind: Vec<&'static str>,
    order_id: Vec<Option<String>>,
    event_id: Vec<Uuid>,
    payload: Vec<serde_json::Value>,
    created_at: Vec<DateTime<Utc>>,
}

impl Records {
    fn push(
        &mut self,
        record: &FirstDelivery<'_>,
        customer_id: Uuid,
        kind: NotificationKind,
        order_id: Option<String>,
        payload: serde_json::Value,
        occurred_at: DateTime<Utc>,
    ) {
        self.push_raw(
            customer_id,
            kind.as_str(),
            order_id,
            record.meta.event_id,
            payload,
            recorded_at(record, occurred_at),
        );
    }

    fn push_raw(
        &mut self,
        customer_id: Uuid,
        kind: &'static str,
        order_id: Option<String>,
        event_id: Uuid,
        payload: serde_json::Value,
        created_at: DateTime<Utc>,
    ) {
        self.customer_id.push(customer_id);
        self.kind.push(kind);
        self.order_id.push(order_id);
        self.event_id.push(event_id);
        self.payload.push(payload);
        self.created_at.push(created_at);
    }
}

/// The event store's commit time; the business time if the header is unreadable.
fn recorded_at(record: &FirstDelivery<'_>, occurred_at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&record.meta.recorded_at)
        .map_or(occurred_at, |t| t.with_timezone(&Utc))
}

/// A delivery failure as told to the customer (its payload, without the order's total until
/// the order is known).
fn delivery_failed_payload(order_id: &str, reason: &str, at: DateTime<Utc>) -> serde_json::Value {
    json!({
        "order_id": order_id,
        "status": "DeliveryFailed",
        "reason": reason,
        "at": at,
    })
}

fn money(minor: i64, currency: &str) -> serde_json::Value {
    json!({ "minor": minor, "currency": currency })
}

/// The order events this read model uses (others are skipped without decoding).
const ORDER_EVENTS: [&str; 7] = [
    "OrderPlaced",
    "OrderModified",
    "OrderConfirmed",
    "OrderOutForDelivery",
    "OrderDelivered",
    "OrderRejected",
    "OrderCancelled",
];

/// The order events it decided to pass over: with [`ORDER_EVENTS`], every order event type (a
/// test holds it so), so a new one is a decision and not silently skipped.
#[cfg(test)]
const ORDER_EVENTS_PASSED_OVER: [&str; 5] = [
    "OrderAccepted",
    "PreparationStarted",
    "OrderReady",
    "OrderCompleted",
    "OrderRated",
];

impl NotificationsProjection {
    /// The orders of `deliveries` (other than those placed in the batch) as already known.
    async fn known_orders(
        tx: &mut Transaction<'static, Postgres>,
        deliveries: &[FirstDelivery<'_>],
    ) -> Result<HashMap<String, OrderFacts>, ProjectionError> {
        let ids: BTreeSet<&str> = deliveries
            .iter()
            .filter(|d| {
                (d.meta.aggregate_type == domain::order::AGGREGATE_TYPE
                    && ORDER_EVENTS.contains(&d.meta.event_type.as_str())
                    && d.meta.event_type != "OrderPlaced")
                    || (d.meta.aggregate_type == domain::delivery::AGGREGATE_TYPE
                        && d.meta.event_type == "DeliveryFailed")
            })
            .map(|d| d.meta.aggregate_id.as_str())
            .collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<&str> = ids.into_iter().collect();
        let rows: Vec<(String, Uuid, i64, String)> = sqlx::query_as(
            "SELECT order_id, customer_id, total_minor, currency FROM orders \
             WHERE order_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, customer_id, total_minor, currency)| {
                (
                    id,
                    OrderFacts {
                        customer_id,
                        total_minor,
                        currency,
                    },
                )
            })
            .collect())
    }
}

#[async_trait]
impl Projection for NotificationsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &[
            domain::order::AGGREGATE_TYPE,
            domain::rewards::AGGREGATE_TYPE,
            domain::delivery::AGGREGATE_TYPE,
        ]
    }

    fn schema_sql(&self) -> &'static str {
        include_str!("../sql/notifications.sql")
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
        let mut batch = Batch {
            orders: Self::known_orders(tx, events).await?,
            changed: BTreeSet::new(),
            records: Records::default(),
        };
        for record in events {
            match record.meta.aggregate_type.as_str() {
                domain::order::AGGREGATE_TYPE => batch.order_event(record)?,
                domain::delivery::AGGREGATE_TYPE => batch.delivery_event(tx, record).await?,
                domain::rewards::AGGREGATE_TYPE => batch.rewards_event(record)?,
                _ => {}
            }
        }
        batch.write_orders(tx).await?;
        insert_records(tx, &batch.records).await
    }
}

/// What one batch learns and tells.
struct Batch {
    orders: HashMap<String, OrderFacts>,
    /// Orders placed or repriced in this batch: written back once, as they end up.
    changed: BTreeSet<String>,
    records: Records,
}

impl Batch {
    /// An order's event: remembered (placed, repriced) or told to its customer.
    fn order_event(&mut self, record: &FirstDelivery<'_>) -> Result<(), ProjectionError> {
        if !ORDER_EVENTS.contains(&record.meta.event_type.as_str()) {
            return Ok(());
        }
        let id = record.meta.aggregate_id.as_str();
        let event: OrderEvent = record.event().map_err(ProjectionError::event)?;
        let at = event.occurred_at();
        let (kind, status) = match &event {
            OrderEvent::OrderPlaced {
                customer_id, total, ..
            } => {
                // A replay of the placement changes nothing that is known.
                self.orders
                    .entry(id.to_owned())
                    .or_insert_with(|| OrderFacts {
                        customer_id: customer_id.as_uuid(),
                        total_minor: total.minor(),
                        currency: total.currency().as_str().to_owned(),
                    });
                self.changed.insert(id.to_owned());
                return Ok(());
            }
            OrderEvent::OrderModified { total, .. } => {
                let facts = self.orders.get_mut(id).ok_or_else(|| unplaced(id))?;
                facts.total_minor = total.minor();
                facts.currency = total.currency().as_str().to_owned();
                self.changed.insert(id.to_owned());
                return Ok(());
            }
            OrderEvent::OrderConfirmed { .. } => (NotificationKind::OrderConfirmed, "Confirmed"),
            OrderEvent::OrderOutForDelivery { .. } => {
                (NotificationKind::OrderOutForDelivery, "OutForDelivery")
            }
            OrderEvent::OrderDelivered { .. } => (NotificationKind::OrderDelivered, "Delivered"),
            OrderEvent::OrderRejected { .. } => (NotificationKind::OrderRejected, "Rejected"),
            OrderEvent::OrderCancelled { .. } => (NotificationKind::OrderCancelled, "Cancelled"),
            // Listed, not `_`: whether a new order event is told to the customer is decided
            // here (and in ORDER_EVENTS).
            OrderEvent::OrderAccepted { .. }
            | OrderEvent::PreparationStarted { .. }
            | OrderEvent::OrderReady { .. }
            | OrderEvent::OrderCompleted { .. }
            | OrderEvent::OrderRated { .. } => return Ok(()),
        };
        let facts = self.orders.get(id).ok_or_else(|| unplaced(id))?;
        let mut payload = json!({
            "order_id": id,
            "status": status,
            "total": money(facts.total_minor, &facts.currency),
            "at": at,
        });
        match &event {
            OrderEvent::OrderRejected { reason, .. } => {
                payload["reason"] = json!(format!("{reason:?}"));
            }
            OrderEvent::OrderCancelled {
                cancelled_by,
                reason,
                ..
            } => {
                payload["cancelled_by"] = json!(format!("{cancelled_by:?}"));
                payload["reason"] = json!(reason);
            }
            _ => {}
        }
        let customer = facts.customer_id;
        self.records
            .push(record, customer, kind, Some(id.to_owned()), payload, at);
        Ok(())
    }

    /// A delivery that failed is told to the order's customer (once the order is known: a
    /// failure applied before the placement waits for it).
    async fn delivery_event(
        &mut self,
        tx: &mut Transaction<'static, Postgres>,
        record: &FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        if record.meta.event_type != "DeliveryFailed" {
            return Ok(());
        }
        let DeliveryEvent::DeliveryFailed { reason, failed_at } =
            record
                .event::<DeliveryEvent>()
                .map_err(ProjectionError::event)?
        else {
            return Ok(());
        };
        let id = record.meta.aggregate_id.as_str();
        let mut payload = delivery_failed_payload(id, &format!("{reason:?}"), failed_at);
        if let Some(facts) = self.orders.get(id) {
            payload["total"] = money(facts.total_minor, &facts.currency);
            self.records.push(
                record,
                facts.customer_id,
                NotificationKind::DeliveryFailed,
                Some(id.to_owned()),
                payload,
                failed_at,
            );
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO pending_delivery_failures \
               (order_id, event_id, payload, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (order_id, event_id) DO NOTHING",
        )
        .bind(id)
        .bind(record.meta.event_id)
        .bind(&payload)
        .bind(recorded_at(record, failed_at))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Points earned are told to the customer.
    fn rewards_event(&mut self, record: &FirstDelivery<'_>) -> Result<(), ProjectionError> {
        if record.meta.event_type != "PointsEarned" {
            return Ok(());
        }
        let id = record.meta.aggregate_id.as_str();
        let customer_id = Uuid::parse_str(id).map_err(|_| {
            ProjectionError::event(format!("rewards ledger id `{id}` is not a customer id"))
        })?;
        if let RewardsEvent::PointsEarned {
            order_id,
            order_total,
            multiplier_bp,
            points,
            expires_at,
            earned_at,
            ..
        } = record
            .event::<RewardsEvent>()
            .map_err(ProjectionError::event)?
        {
            let payload = json!({
                "order_id": order_id.to_string(),
                "points": points,
                "order_total": money(order_total.minor(), order_total.currency().as_str()),
                "multiplier_bp": multiplier_bp,
                "expires_at": expires_at,
                "at": earned_at,
            });
            self.records.push(
                record,
                customer_id,
                NotificationKind::PointsEarned,
                Some(order_id.to_string()),
                payload,
                earned_at,
            );
        }
        Ok(())
    }

    /// The orders placed or repriced, written back once; delivery failures that waited for
    /// their order's placement are told now.
    async fn write_orders(
        &mut self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), ProjectionError> {
        if self.changed.is_empty() {
            return Ok(());
        }
        let (mut ids, mut customers, mut totals, mut currencies) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for id in &self.changed {
            if let Some(facts) = self.orders.get(id) {
                ids.push(id.as_str());
                customers.push(facts.customer_id);
                totals.push(facts.total_minor);
                currencies.push(facts.currency.as_str());
            }
        }
        sqlx::query(
            "INSERT INTO orders (order_id, customer_id, total_minor, currency) \
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::text[]) \
             ON CONFLICT (order_id) DO UPDATE \
             SET total_minor = excluded.total_minor, currency = excluded.currency",
        )
        .bind(&ids)
        .bind(&customers)
        .bind(&totals)
        .bind(&currencies)
        .execute(&mut **tx)
        .await?;
        let waiting: Vec<(String, Uuid, serde_json::Value, DateTime<Utc>)> = sqlx::query_as(
            "DELETE FROM pending_delivery_failures WHERE order_id = ANY($1) \
             RETURNING order_id, event_id, payload, created_at",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for (order_id, event_id, mut payload, created_at) in waiting {
            if let Some(facts) = self.orders.get(&order_id) {
                payload["total"] = money(facts.total_minor, &facts.currency);
                self.records.push_raw(
                    facts.customer_id,
                    NotificationKind::DeliveryFailed.as_str(),
                    Some(order_id),
                    event_id,
                    payload,
                    created_at,
                );
            }
        }
        Ok(())
    }
}

/// Inserts the batch's records and wakes the customers' live streams.
async fn insert_records(
    tx: &mut Transaction<'static, Postgres>,
    records: &Records,
) -> Result<(), ProjectionError> {
    if records.event_id.is_empty() {
        return Ok(());
    }
    // Per customer, ids must become visible in id order, or a reader tailing by id (the
    // SSE stream, a client paging with `next_cursor`) could pass a lower id whose
    // transaction commits later. So ids of a customer's records are only drawn while holding
    // that customer's lock, until commit: two projector transactions touching the same
    // customer (two instances during a rebalance) commit one after the other. Locks are
    // taken in key order, so two batches cannot deadlock on them. (Two-key advisory locks
    // do not share a key space with the one-key locks used elsewhere.)
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext('notifications'), k) \
         FROM (SELECT DISTINCT hashtext(c::text) AS k FROM unnest($1::uuid[]) AS c) s \
         ORDER BY k",
    )
    .bind(&records.customer_id)
    .execute(&mut **tx)
    .await?;
    // Ids are drawn in event order (ORDER BY the position in the batch).
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO records \
           (customer_id, kind, order_id, event_id, payload, created_at) \
         SELECT c, k, o, e, p, t \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::jsonb[], \
                     $6::timestamptz[]) WITH ORDINALITY AS x(c, k, o, e, p, t, n) \
         ORDER BY n \
         ON CONFLICT (customer_id, event_id) DO NOTHING \
         RETURNING customer_id",
    )
    .bind(&records.customer_id)
    .bind(&records.kind)
    .bind(&records.order_id)
    .bind(&records.event_id)
    .bind(&records.payload)
    .bind(&records.created_at)
    .fetch_all(&mut **tx)
    .await?;
    let customers: Vec<String> = inserted
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    streams::consumer::live::notify(tx, LIVE_CHANNEL, &customers).await?;
    Ok(())
}

/// One notification, as the API serves it and the webhook posts it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Notification {
    /// The cursor: increases with every record (in event order within a customer's records).
    pub id: i64,
    pub customer_id: Uuid,
    /// `order_confirmed`, `order_out_for_delivery`, `order_delivered`, `order_rejected`,
    /// `order_cancelled`, `delivery_failed` or `points_earned`.
    pub kind: String,
    pub order_id: Option<String>,
    /// The event that caused it.
    pub event_id: Uuid,
    /// What the app shows: order id, status, totals, points...
    pub payload: serde_json::Value,
    /// When the causing event was recorded.
    pub created_at: DateTime<Utc>,
}

/// A customer's notifications after `after` (an id; 0 for all), oldest first, at most `limit`,
/// optionally of one kind.
pub async fn list(
    pool: &PgPool,
    customer_id: Uuid,
    after: i64,
    limit: i64,
    kind: Option<NotificationKind>,
) -> Result<Vec<Notification>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, customer_id, kind, order_id, event_id, payload, created_at \
         FROM notifications.records \
         WHERE customer_id = $1 AND id > $2 AND ($3::text IS NULL OR kind = $3) \
         ORDER BY id LIMIT $4",
    )
    .bind(customer_id)
    .bind(after)
    .bind(kind.map(NotificationKind::as_str))
    .bind(limit)
    .fetch_all(pool)
    .await
}

fn unplaced(order_id: &str) -> ProjectionError {
    ProjectionError::event(format!(
        "order {order_id} moved on but its placement was never seen"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_event_type_is_either_used_or_passed_over() {
        let contracts = schemas::Contracts::global().expect("contracts");
        let published: BTreeSet<&str> = contracts
            .iter()
            .filter(|c| c.aggregate_type == domain::order::AGGREGATE_TYPE)
            .map(|c| c.event_type)
            .collect();
        let decided: BTreeSet<&str> = ORDER_EVENTS
            .iter()
            .chain(&ORDER_EVENTS_PASSED_OVER)
            .copied()
            .collect();
        assert_eq!(
            published, decided,
            "an order event type needs a decision: ORDER_EVENTS or ORDER_EVENTS_PASSED_OVER"
        );
    }

    #[test]
    fn every_kind_parses_back_from_its_name() {
        for kind in NotificationKind::ALL {
            assert_eq!(NotificationKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).ok(),
                Some(serde_json::Value::from(kind.as_str()))
            );
        }
        assert_eq!(NotificationKind::parse("order_placed"), None);
    }
}
