//! The whole-order load generator shared by the lifecycle benchmark (`benches/lifecycle.rs`),
//! the chaos run (`benches/chaos.rs`) and its short version in the suite (`tests/chaos.rs`):
//! complete lifecycles over HTTP as the apps drive them, each caller with its own token:
//!
//! 1. the customer places the order and waits for `Confirmed` (the process manager authorizes
//!    the payment and confirms it);
//! 2. the store accepts, starts preparing, marks the food ready;
//! 3. dispatch assigns a courier once the delivery exists (the process manager requests it when
//!    the store accepts);
//! 4. the courier picks up, sends a location, delivers;
//! 5. the customer waits for `Completed` (payment captured, order completed: the process manager).
//!
//! Every request is retried as an app retries it (the same `Idempotency-Key`), and what the
//! clients met on the way (refusals, retries, server errors) is counted in [`Ctx`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::load::Samples;
use crate::{address_in, token, Role};

/// How long a client keeps retrying one request (or reconnecting one live stream) before it
/// gives up: longer than any outage the chaos run injects (a broker or PostgreSQL restart),
/// as an app on a phone keeps trying.
const GIVE_UP_AFTER: Duration = Duration::from_secs(180);

/// How long a customer waits for a status before the lifecycle counts as failed.
const STATUS_WAIT: Duration = Duration::from_secs(300);

/// The commands a lifecycle sends, by the names their latencies are recorded under.
pub const COMMANDS: [&str; 8] = [
    "place",
    "accept",
    "start_preparation",
    "mark_ready",
    "assign_courier",
    "pick_up",
    "update_location",
    "deliver",
];

/// The generator's shared state: who acts, what happened.
#[derive(Debug)]
pub struct Ctx {
    pub http: reqwest::Client,
    pub api: String,
    pub stores: Vec<(Uuid, String)>,
    pub dispatchers: Vec<String>,
    pub poll: Duration,
    /// Waits on the live stream (the default) rather than polling.
    pub stream: bool,
    pub samples: Mutex<Samples>,
    /// Every order the API accepted (its id, from the placement's answer).
    pub placed: Mutex<Vec<String>>,
    pub next: AtomicU64,
    /// Lifecycles that did not reach `Completed`, with why.
    pub failures: Mutex<Vec<String>>,
    /// Answers 429 (the rate limit).
    pub rate_limited: AtomicU64,
    /// Answers 429 or 503: the backbone refused, the client waited `Retry-After` and retried.
    pub refused: AtomicU64,
    /// Requests sent again (after a refusal, a server error or a transport error).
    pub retries: AtomicU64,
    /// Answers 409 "a request with this key is still in progress" (retried).
    pub in_progress: AtomicU64,
    /// Answers 408: the API's request timeout struck, the effect unknown (retried).
    pub timed_out: AtomicU64,
    /// Requests that got no answer: refused connections, resets, the client's own timeout
    /// (retried).
    pub transport_errors: AtomicU64,
    /// Every 5xx but 503 a client saw, with its body: a retriable request must never meet one.
    pub server_errors: Mutex<Vec<String>>,
    pub stop: AtomicBool,
}

impl Ctx {
    /// A generator against the API at `api`, spreading orders over `stores` (each acting with
    /// its own token) and `dispatchers` admin tokens.
    pub fn new(
        api: String,
        stores: &[Uuid],
        dispatchers: usize,
        poll: Duration,
        stream: bool,
    ) -> Self {
        Self {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(4096)
                .build()
                .expect("client"),
            api,
            stores: stores
                .iter()
                .map(|s| (*s, token(Role::Store, *s)))
                .collect(),
            dispatchers: (0..dispatchers)
                .map(|i| token(Role::Admin, Uuid::from_u128(0xd15_0000 + i as u128)))
                .collect(),
            poll,
            stream,
            samples: Mutex::new(Samples::default()),
            placed: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
            rate_limited: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            transport_errors: AtomicU64::new(0),
            server_errors: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }
    }
}

/// One request, retried as an app would (same idempotency key) on 429/503 (after
/// `Retry-After`), on a transport error, a 5xx, a 408 (the API's own timeout) or a 409 saying
/// the key is still in progress, for up to [`GIVE_UP_AFTER`]. Returns the first other answer.
pub async fn send(
    ctx: &Ctx,
    bearer: &str,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), String> {
    let key = Uuid::new_v4().to_string();
    let give_up = Instant::now() + GIVE_UP_AFTER;
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut request = ctx
            .http
            .request(method.clone(), url)
            .bearer_auth(bearer)
            .timeout(Duration::from_secs(30));
        if let Some(body) = body {
            request = request.header("idempotency-key", &key).json(body);
        }
        let wait = match request.send().await {
            Ok(response) => {
                let status = response.status();
                if status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::SERVICE_UNAVAILABLE
                {
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        ctx.rate_limited.fetch_add(1, Ordering::Relaxed);
                    }
                    ctx.refused.fetch_add(1, Ordering::Relaxed);
                    let wait = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(1);
                    Duration::from_secs(wait)
                } else if status.is_server_error() {
                    let text = response.text().await.unwrap_or_default();
                    ctx.server_errors
                        .lock()
                        .expect("server errors")
                        .push(format!("{method} {url}: {status} {text}"));
                    Duration::from_millis(200)
                } else {
                    let value = response.json().await.unwrap_or(Value::Null);
                    // The first request with this key holds it (or held it, and could not
                    // release it: a crash, a database gone): the API says to retry, and the
                    // claim lapses after twice its request timeout.
                    let in_progress = status == StatusCode::CONFLICT
                        && value["detail"]
                            .as_str()
                            .is_some_and(|d| d.contains("still in progress"));
                    if in_progress {
                        ctx.in_progress.fetch_add(1, Ordering::Relaxed);
                    } else if status == StatusCode::REQUEST_TIMEOUT {
                        // The API ran out of time (a database restarting under it): the effect
                        // is unknown and it says to retry with the same key.
                        ctx.timed_out.fetch_add(1, Ordering::Relaxed);
                    } else {
                        return Ok((status, value));
                    }
                    Duration::from_secs(1)
                }
            }
            Err(e) => {
                ctx.transport_errors.fetch_add(1, Ordering::Relaxed);
                if Instant::now() > give_up {
                    return Err(format!("{method} {url}: {e}"));
                }
                // A process restarting: back off up to 2 s a try, as a mobile client does.
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                wait
            }
        };
        if Instant::now() > give_up {
            return Err(format!("{method} {url}: no answer in {GIVE_UP_AFTER:?}"));
        }
        ctx.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(wait).await;
    }
}

/// A command: `POST url body` expecting 200, its latency recorded under `name`.
pub async fn command(
    ctx: &Ctx,
    name: &'static str,
    bearer: &str,
    url: &str,
    body: Value,
) -> Result<Value, String> {
    let started = Instant::now();
    let (status, value) = send(ctx, bearer, reqwest::Method::POST, url, Some(&body)).await?;
    if status != StatusCode::OK && status != StatusCode::CREATED {
        return Err(format!("{name}: {status} {value}"));
    }
    let ended = Instant::now();
    ctx.samples
        .lock()
        .expect("samples")
        .record(name, ended, ended - started);
    Ok(value)
}

const ORDER_OF_STATUS: [&str; 8] = [
    "Placed",
    "Confirmed",
    "Accepted",
    "Preparing",
    "ReadyForPickup",
    "OutForDelivery",
    "Delivered",
    "Completed",
];

/// Waits (as the customer) until the order's status is `wanted` or later: on its live stream
/// (`GET /orders/{id}/tracking/stream`, Server-Sent Events, as the apps do) or, with
/// `ctx.stream` false, by polling the tracking view.
async fn wait_for(ctx: &Ctx, bearer: &str, order: &str, wanted: &str) -> Result<(), String> {
    if ctx.stream {
        return watch_for(ctx, bearer, order, wanted).await;
    }
    poll_for(ctx, bearer, order, wanted).await
}

fn rank(status: &str) -> Option<usize> {
    ORDER_OF_STATUS.iter().position(|x| *x == status)
}

/// The live stream from the order's first status change on, until one is `wanted` or later.
/// A refused, failed or broken stream is opened again (it replays from the start), as the apps
/// do when the API restarts under them.
async fn watch_for(ctx: &Ctx, bearer: &str, order: &str, wanted: &str) -> Result<(), String> {
    let want = rank(wanted).expect("a known status");
    let url = format!("{}/orders/{order}/tracking/stream", ctx.api);
    let deadline = Instant::now() + STATUS_WAIT;
    let timed_out = || format!("order {order} not {wanted} in {STATUS_WAIT:?}");
    'connect: loop {
        if Instant::now() > deadline {
            return Err(timed_out());
        }
        let response = match ctx.http.get(&url).bearer_auth(bearer).send().await {
            Ok(response) => response,
            Err(_) => {
                ctx.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        match response.status() {
            StatusCode::OK => {}
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                ctx.refused.fetch_add(1, Ordering::Relaxed);
                ctx.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            other if other.is_server_error() => {
                let text = response.text().await.unwrap_or_default();
                ctx.server_errors
                    .lock()
                    .expect("server errors")
                    .push(format!("GET {url}: {other} {text}"));
                ctx.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            other => return Err(format!("{url}: {other}")),
        }
        let mut response = response;
        let mut buffer = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            let chunk = match tokio::time::timeout(left, response.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                // The stream ended or broke: reconnect (it replays from the start).
                Ok(Ok(None) | Err(_)) => continue 'connect,
                Err(_) => return Err(timed_out()),
            };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                if !event.lines().any(|l| l.trim() == "event: status") {
                    continue;
                }
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                let entry: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                let now = entry["status"].as_str().unwrap_or("");
                if now == "Cancelled" || now == "Rejected" {
                    return Err(format!("order {order} ended {now}"));
                }
                if rank(now).is_some_and(|r| r >= want) {
                    return Ok(());
                }
            }
        }
    }
}

/// Polls the order's tracking view until its status is `wanted` or later.
async fn poll_for(ctx: &Ctx, bearer: &str, order: &str, wanted: &str) -> Result<(), String> {
    let want = rank(wanted).expect("a known status");
    let url = format!("{}/orders/{order}/tracking", ctx.api);
    let deadline = Instant::now() + STATUS_WAIT;
    loop {
        let (status, view) = send(ctx, bearer, reqwest::Method::GET, &url, None).await?;
        if status == StatusCode::OK {
            let now = view["status"].as_str().unwrap_or("");
            if now == "Cancelled" || now == "Rejected" {
                return Err(format!("order {order} ended {now}: {view}"));
            }
            if rank(now).is_some_and(|r| r >= want) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("order {order} not {wanted} in {STATUS_WAIT:?}"));
        }
        tokio::time::sleep(ctx.poll).await;
    }
}

/// A placement as the apps send it: `customer`'s order of two pizzas and a cola at `store`.
pub fn placement_request(customer: Uuid, store: Uuid) -> Value {
    json!({
        "customer_id": customer,
        "store_id": store,
        "region": "uk",
        "items": [
            {"item_id": "margherita", "quantity": 2, "options": ["extra-cheese"]},
            {"item_id": "cola", "quantity": 1}
        ],
        "delivery_address": address_in("uk"),
    })
}

/// One whole order, from placement to `Completed`.
pub async fn lifecycle(ctx: &Ctx) -> Result<(), String> {
    let n = ctx.next.fetch_add(1, Ordering::Relaxed) as usize;
    let api = &ctx.api;
    let customer = Uuid::new_v4();
    let customer_token = token(Role::Customer, customer);
    let (store, store_token) = &ctx.stores[n % ctx.stores.len()];
    let request = placement_request(customer, *store);
    let started = Instant::now();
    let placed = command(
        ctx,
        "place",
        &customer_token,
        &format!("{api}/orders"),
        request,
    )
    .await?;
    let placed_at = Instant::now();
    let order = placed["order_id"]
        .as_str()
        .ok_or_else(|| format!("no order id in {placed}"))?
        .to_owned();
    ctx.placed.lock().expect("placed").push(order.clone());
    wait_for(ctx, &customer_token, &order, "Confirmed").await?;
    let confirmed_at = Instant::now();
    ctx.samples.lock().expect("samples").record(
        "placed → Confirmed",
        confirmed_at,
        confirmed_at - placed_at,
    );
    let order_url = format!("{api}/orders/{order}/actions");
    for (name, action) in [
        (
            "accept",
            json!({"action": "accept", "estimated_preparation_minutes": 10}),
        ),
        ("start_preparation", json!({"action": "start_preparation"})),
        ("mark_ready", json!({"action": "mark_ready"})),
    ] {
        command(ctx, name, store_token, &order_url, action).await?;
    }
    // Dispatch assigns a courier once the delivery exists (404 until the process manager has
    // requested it).
    let dispatcher = &ctx.dispatchers[n % ctx.dispatchers.len()];
    let courier = Uuid::new_v4();
    let delivery_url = format!("{api}/deliveries/{order}/actions");
    let accepted_at = Instant::now();
    loop {
        let started = Instant::now();
        let body = json!({"action": "assign_courier", "courier_id": courier});
        let (status, value) = send(
            ctx,
            dispatcher,
            reqwest::Method::POST,
            &delivery_url,
            Some(&body),
        )
        .await?;
        let ended = Instant::now();
        match status {
            StatusCode::OK => {
                let mut samples = ctx.samples.lock().expect("samples");
                samples.record("assign_courier", ended, ended - started);
                samples.record("mark_ready → courier assigned", ended, ended - accepted_at);
                break;
            }
            StatusCode::NOT_FOUND | StatusCode::CONFLICT if ended - accepted_at < STATUS_WAIT => {
                tokio::time::sleep(ctx.poll).await;
            }
            other => return Err(format!("assign_courier: {other} {value}")),
        }
    }
    let courier_token = token(Role::Courier, courier);
    for (name, action) in [
        ("pick_up", json!({"action": "pick_up"})),
        (
            "update_location",
            json!({"action": "update_location", "latitude": 51.51, "longitude": -0.12,
                   "device_time": chrono::Utc::now()}),
        ),
        ("deliver", json!({"action": "deliver"})),
    ] {
        command(ctx, name, &courier_token, &delivery_url, action).await?;
    }
    wait_for(ctx, &customer_token, &order, "Completed").await?;
    let completed_at = Instant::now();
    let mut samples = ctx.samples.lock().expect("samples");
    samples.record("placed → Completed", completed_at, completed_at - placed_at);
    samples.record("whole order", completed_at, completed_at - started);
    Ok(())
}

/// One lifecycle; a failure is kept in `ctx.failures`.
pub async fn run_one(ctx: Arc<Ctx>) {
    if let Err(e) = lifecycle(&ctx).await {
        ctx.failures.lock().expect("failures").push(e);
    }
}

/// `in_flight` lifecycles at a time, each followed by the next, until `ctx.stop` (closed loop).
pub fn closed_loop(ctx: &Arc<Ctx>, in_flight: usize) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            while !ctx.stop.load(Ordering::Relaxed) {
                run_one(ctx.clone()).await;
            }
        });
    }
    tasks
}

/// A new lifecycle every 1/`rate` s whatever the backbone does, until `ctx.stop` (open loop).
pub fn open_loop(ctx: &Arc<Ctx>, rate: f64) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let ctx = ctx.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut orders = tokio::task::JoinSet::new();
        while !ctx.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            orders.spawn(run_one(ctx.clone()));
            while orders.try_join_next().is_some() {}
        }
        while orders.join_next().await.is_some() {}
    });
    tasks
}
