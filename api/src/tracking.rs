//! The tracking read model served: an order's status, items, totals and timeline, its
//! delivery (courier, last position, ETA with its uncertainty), and a live stream of its
//! changes as Server-Sent Events.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{authorize_order, Action, Owner, Principal, Role};
use crate::error::{ApiError, Problem};
use crate::extract::{PathParams, QueryParams};
use crate::orders::parse_order_id;
use crate::positions::wait_for_position;
use crate::AppState;

/// Money in minor units.
#[derive(Debug, Serialize, ToSchema)]
pub struct MoneyView {
    pub minor: i64,
    pub currency: String,
}

/// One priced line of an order (the shape of the domain's priced line).
#[derive(Debug, Serialize, ToSchema)]
pub struct TrackedLine {
    /// Menu item code, e.g. `margherita`.
    pub item_id: String,
    pub name: String,
    pub category: String,
    pub quantity: u32,
    /// Option codes, e.g. `extra-cheese`.
    pub options: Vec<String>,
    /// One unit with its options.
    pub unit_price: MoneyView,
    /// `unit_price` times `quantity`.
    pub line_total: MoneyView,
}

/// One status change.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct TimelineEntry {
    pub sequence: i64,
    pub event_type: String,
    pub status: String,
    pub at: DateTime<Utc>,
}

/// Where the courier was last seen.
#[derive(Debug, Serialize, ToSchema)]
pub struct CourierPosition {
    pub latitude: f64,
    pub longitude: f64,
    /// Device time of the fix.
    pub at: DateTime<Utc>,
}

/// The expected arrival at the customer, with its uncertainty.
#[derive(Debug, Serialize, ToSchema)]
pub struct EtaView {
    pub expected_at: DateTime<Utc>,
    /// The interval the arrival falls in with high confidence; it narrows as the courier nears.
    pub earliest_at: DateTime<Utc>,
    pub latest_at: DateTime<Utc>,
    pub remaining_meters: i32,
    pub estimated_at: DateTime<Utc>,
}

/// The delivery of an order.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub status: String,
    pub courier_id: Option<Uuid>,
    pub courier_position: Option<CourierPosition>,
    pub eta: Option<EtaView>,
    pub updated_at: DateTime<Utc>,
    /// The last event of the delivery that this view includes.
    pub sequence: i64,
}

/// What a customer's app shows about an order.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrackingView {
    pub order_id: String,
    pub customer_id: Uuid,
    pub store_id: Uuid,
    pub region: String,
    pub status: String,
    /// The lines as placed, or as last modified, priced.
    #[schema(value_type = Vec<TrackedLine>)]
    pub items: serde_json::Value,
    pub total: MoneyView,
    pub placed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The last event of the order that this view includes.
    pub sequence: i64,
    pub timeline: Vec<TimelineEntry>,
    /// Present once a delivery was requested.
    pub delivery: Option<DeliveryView>,
}

#[derive(sqlx::FromRow)]
struct TrackingRow {
    order_id: String,
    customer_id: Uuid,
    store_id: Uuid,
    region: String,
    status: String,
    items: serde_json::Value,
    total_minor: i64,
    currency: String,
    placed_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_sequence: i64,
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    status: String,
    courier_id: Option<Uuid>,
    latitude: Option<f64>,
    longitude: Option<f64>,
    position_at: Option<DateTime<Utc>>,
    eta_expected_at: Option<DateTime<Utc>>,
    eta_earliest_at: Option<DateTime<Utc>>,
    eta_latest_at: Option<DateTime<Utc>>,
    remaining_meters: Option<i32>,
    eta_estimated_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    last_sequence: i64,
}

impl From<DeliveryRow> for DeliveryView {
    fn from(row: DeliveryRow) -> Self {
        let courier_position = match (row.latitude, row.longitude, row.position_at) {
            (Some(latitude), Some(longitude), Some(at)) => Some(CourierPosition {
                latitude,
                longitude,
                at,
            }),
            _ => None,
        };
        let eta = match (
            row.eta_expected_at,
            row.eta_earliest_at,
            row.eta_latest_at,
            row.remaining_meters,
            row.eta_estimated_at,
        ) {
            (Some(expected_at), Some(earliest_at), Some(latest_at), Some(remaining), Some(at)) => {
                Some(EtaView {
                    expected_at,
                    earliest_at,
                    latest_at,
                    remaining_meters: remaining,
                    estimated_at: at,
                })
            }
            _ => None,
        };
        Self {
            status: row.status,
            courier_id: row.courier_id,
            courier_position,
            eta,
            updated_at: row.updated_at,
            sequence: row.last_sequence,
        }
    }
}

/// Read-your-writes.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TrackingQuery {
    /// Wait (up to a few seconds) until the view includes this event: `position.token` of a
    /// command's response (an order or delivery command).
    pub position: Option<String>,
    /// Wait until the view includes this sequence of the order (`position.sequence` of an
    /// order command).
    #[param(minimum = 1, maximum = 9_223_372_036_854_775_807_i64)]
    pub min_sequence: Option<u64>,
}

async fn load(state: &AppState, order_id: &str) -> Result<Option<TrackingView>, ApiError> {
    let row: Option<TrackingRow> = sqlx::query_as(
        "SELECT order_id, customer_id, store_id, region, status, items, total_minor, currency, \
                placed_at, updated_at, last_sequence \
         FROM tracking.orders WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let timeline = timeline_after(state, order_id, 0).await?;
    let delivery: Option<DeliveryRow> = sqlx::query_as(
        "SELECT status, courier_id, latitude, longitude, position_at, eta_expected_at, \
                eta_earliest_at, eta_latest_at, remaining_meters, eta_estimated_at, updated_at, \
                last_sequence \
         FROM tracking.deliveries WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(Some(TrackingView {
        order_id: row.order_id,
        customer_id: row.customer_id,
        store_id: row.store_id,
        region: row.region,
        status: row.status,
        items: row.items,
        total: MoneyView {
            minor: row.total_minor,
            currency: row.currency,
        },
        placed_at: row.placed_at,
        updated_at: row.updated_at,
        sequence: row.last_sequence,
        timeline,
        delivery: delivery.map(DeliveryView::from),
    }))
}

async fn timeline_after(
    state: &AppState,
    order_id: &str,
    after: i64,
) -> Result<Vec<TimelineEntry>, ApiError> {
    sqlx::query_as(
        "SELECT sequence, event_type, status, at FROM tracking.timeline \
         WHERE order_id = $1 AND sequence > $2 ORDER BY sequence",
    )
    .bind(order_id)
    .bind(after)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)
}

/// The order's delivery as projected, if it moved past `seen` (its last sequence streamed).
async fn delivery_after(
    state: &AppState,
    order_id: &str,
    seen: i64,
) -> Result<Option<DeliveryRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, courier_id, latitude, longitude, position_at, eta_expected_at, \
                eta_earliest_at, eta_latest_at, remaining_meters, eta_estimated_at, \
                updated_at, last_sequence \
         FROM tracking.deliveries WHERE order_id = $1 AND last_sequence > $2",
    )
    .bind(order_id)
    .bind(seen)
    .fetch_optional(&state.pool)
    .await
}

/// An order's tracking view.
#[utoipa::path(
    get, path = "/orders/{order_id}/tracking", tag = "orders",
    params(("order_id" = Uuid, Path, description = "The order"), TrackingQuery),
    responses(
        (status = 200, description = "The order as projected", body = TrackingView),
        (status = 400, description = "Malformed id or query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order in the read model", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The read model has not reached the position yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn tracking(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
    QueryParams(query): QueryParams<TrackingQuery>,
) -> Result<axum::Json<TrackingView>, ApiError> {
    let order_id = parse_order_id(&raw_id)?.to_string();
    // A customer or a store asking after its order (the apps poll this): whom the order belongs
    // to is in the view itself (its customer and store never change), so the order's and its
    // delivery's events are replayed only when the view cannot say (not projected yet, or not
    // theirs by it) and for couriers (whose delivery may have been reassigned since).
    if query.position.is_none()
        && query.min_sequence.is_none()
        && matches!(principal.role, Role::Customer | Role::Store)
    {
        if let Some(view) = load(&state, &order_id).await? {
            let owner = Owner {
                customer: Some(view.customer_id),
                store: Some(view.store_id),
                courier: None,
            };
            if principal.authorize(Action::ViewOrder, &owner).is_ok() {
                return Ok(axum::Json(view));
            }
        }
    }
    authorize_order(&state, &principal, Action::ViewOrder, &order_id).await?;
    let by_sequence = query.min_sequence.map(|s| format!("order:{order_id}:{s}"));
    for position in [query.position.as_deref(), by_sequence.as_deref()] {
        wait_for_position(&state, &principal, "tracking", position).await?;
    }
    match load(&state, &order_id).await? {
        Some(view) => Ok(axum::Json(view)),
        None => Err(ApiError::NotFound(
            "no order with this id in the tracking view (an order just placed appears within \
             moments; pass the command's position to wait for it)"
                .to_owned(),
        )),
    }
}

/// Where a tracking stream starts.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Send status changes after this sequence (default: all); the `Last-Event-ID` header of a
    /// reconnecting client takes precedence.
    pub after: Option<i64>,
}

/// An order's status changes as Server-Sent Events, in order, live. Each `status` event carries
/// a timeline entry (`id:` = its sequence, so a reconnecting client resumes with
/// `Last-Event-ID`); a `delivery` event carries the delivery view (courier, position, ETA)
/// whenever it changes. The stream stays open; keep-alive comments every 15 s.
#[utoipa::path(
    get, operation_id = "stream_tracking", path = "/orders/{order_id}/tracking/stream", tag = "orders",
    params(("order_id" = Uuid, Path, description = "The order"), StreamQuery),
    responses(
        (status = 200, description = "An event stream (`text/event-stream`)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed id, parameter or Last-Event-ID", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(raw_id): PathParams<String>,
    QueryParams(query): QueryParams<StreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let order_id = parse_order_id(&raw_id)?.to_string();
    authorize_order(&state, &principal, Action::ViewOrder, &order_id).await?;
    let after = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "Last-Event-ID must be the id of an event this stream sent".to_owned(),
                )
            })?,
        None => query.after.unwrap_or(0),
    };
    let slot = state.streams.acquire(&principal.actor())?;
    let mut changes = state.live.subscribe();
    let stream = async_stream::stream! {
        // Held while the stream is open.
        let _slot = slot;
        let mut cursor = after;
        let mut delivery_seen = -1i64;
        loop {
            let read = {
                let (state, order_id) = (state.clone(), order_id.clone());
                crate::live::read_through(async move {
                    let timeline = timeline_after(&state, &order_id, cursor).await;
                    let delivery = delivery_after(&state, &order_id, delivery_seen).await;
                    (timeline, delivery)
                })
                .await
            };
            let Some((timeline, delivery)) = read else {
                return;
            };
            match timeline {
                Ok(entries) => {
                    for entry in entries {
                        cursor = entry.sequence;
                        if let Ok(event) = Event::default()
                            .id(entry.sequence.to_string())
                            .event("status")
                            .json_data(&entry)
                        {
                            yield Ok(event);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "tracking stream could not read"),
            }
            if let Ok(Some(row)) = delivery {
                delivery_seen = row.last_sequence;
                if let Ok(event) = Event::default()
                    .event("delivery")
                    .json_data(DeliveryView::from(row))
                {
                    yield Ok(event);
                }
            }
            // Wake on this order's change signal, or re-read every 2 s anyway.
            if !crate::live::changed(&mut changes, "tracking", &order_id, Duration::from_secs(2)).await {
                return;
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Filters of the order list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OrderListQuery {
    /// Only this customer's orders.
    pub customer_id: Option<Uuid>,
    /// Only this store's orders.
    pub store_id: Option<Uuid>,
    /// Only this region's orders.
    pub region: Option<String>,
    /// Only orders in this status (e.g. `Preparing`).
    pub status: Option<String>,
    /// Placed at or after (RFC 3339).
    pub from: Option<String>,
    /// Placed before (RFC 3339).
    pub to: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// Read-your-writes: a command's `position.token`.
    pub position: Option<String>,
}

/// One order in a list.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct OrderSummary {
    pub order_id: String,
    pub customer_id: Uuid,
    pub store_id: Uuid,
    pub region: String,
    pub status: String,
    pub total_minor: i64,
    pub currency: String,
    pub placed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A page of orders, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderPage {
    pub items: Vec<OrderSummary>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

const STATUSES: [&str; 10] = [
    "Placed",
    "Confirmed",
    "Accepted",
    "Preparing",
    "Ready",
    "OutForDelivery",
    "Delivered",
    "Completed",
    "Rejected",
    "Cancelled",
];

/// The cursor of a page: the last row's placement time and id.
fn order_cursor(row: &OrderSummary) -> String {
    format!("{}|{}", row.placed_at.timestamp_micros(), row.order_id)
}

fn parse_order_cursor(raw: Option<&str>) -> Result<Option<(DateTime<Utc>, String)>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    raw.split_once('|')
        .and_then(|(micros, id)| {
            let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
            Uuid::parse_str(id).ok()?;
            Some((at, id.to_owned()))
        })
        .map(Some)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "cursor `{raw}` is not one this API returned; pass `next_cursor` from the previous page"
            ))
        })
}

/// A customer's or store's list is their own: the filter is set to them (asking for another's
/// is a 403); roles that see every order list as asked.
fn own_orders(
    principal: &Principal,
    mut query: OrderListQuery,
) -> Result<OrderListQuery, ApiError> {
    let Some(owner) = principal.own_scope(Action::ListOrders)? else {
        return Ok(query);
    };
    for (filter, mine, name) in [
        (&mut query.customer_id, owner.customer, "customer_id"),
        (&mut query.store_id, owner.store, "store_id"),
    ] {
        let Some(mine) = mine else { continue };
        match filter {
            Some(asked) if *asked != mine => {
                return Err(ApiError::Forbidden(format!(
                    "a {} lists only their own orders: leave `{name}` out or set it to your own id",
                    principal.role
                )))
            }
            _ => *filter = Some(mine),
        }
    }
    Ok(query)
}

/// Orders as tracked, newest first, filtered by customer, store, region, status and time of
/// placement (a store's dashboard, a customer's order history).
#[utoipa::path(
    get, operation_id = "list_orders", path = "/orders", tag = "orders",
    params(OrderListQuery),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, description = "A parameter is not valid (the detail names it)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The view has not reached `position` yet; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<OrderListQuery>,
) -> Result<axum::Json<OrderPage>, ApiError> {
    let query = own_orders(&principal, query)?;
    let (from, to) = crate::paging::time_range(query.from.as_deref(), query.to.as_deref())?;
    let limit = crate::paging::limit(query.limit)?;
    let after = parse_order_cursor(query.cursor.as_deref())?;
    if let Some(status) = &query.status {
        if !STATUSES.contains(&status.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "status `{status}` is not an order status; use one of {}",
                STATUSES.join(", ")
            )));
        }
    }
    if let Some(region) = &query.region {
        domain::RegionCode::parse(region)
            .map_err(|e| ApiError::BadRequest(format!("region: {e}")))?;
    }
    wait_for_position(&state, &principal, "tracking", query.position.as_deref()).await?;
    let (after_at, after_id) = after.unzip();
    let rows: Vec<OrderSummary> = sqlx::query_as(
        "SELECT order_id, customer_id, store_id, region, status, total_minor, currency, \
                placed_at, updated_at \
         FROM tracking.orders \
         WHERE ($1::uuid IS NULL OR customer_id = $1) AND ($2::uuid IS NULL OR store_id = $2) \
           AND ($3::text IS NULL OR region = $3) AND ($4::text IS NULL OR status = $4) \
           AND ($5::timestamptz IS NULL OR placed_at >= $5) \
           AND ($6::timestamptz IS NULL OR placed_at < $6) \
           AND ($7::timestamptz IS NULL OR (placed_at, order_id) < ($7, $8)) \
         ORDER BY placed_at DESC, order_id DESC LIMIT $9",
    )
    .bind(query.customer_id)
    .bind(query.store_id)
    .bind(&query.region)
    .bind(&query.status)
    .bind(from)
    .bind(to)
    .bind(after_at)
    .bind(after_id)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    let (items, next_cursor) = crate::paging::page(rows, limit, order_cursor);
    Ok(axum::Json(OrderPage { items, next_cursor }))
}
