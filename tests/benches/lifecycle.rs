//! Whole orders at load, end to end: the backbone as in production (release binaries, each
//! component its own process, on the machine's broker and PostgreSQL) and a load generator
//! driving complete lifecycles over HTTP as the apps do, each caller with its own token and
//! within the production rate limits:
//!
//! 1. the customer places the order and waits for `Confirmed` (the process manager authorizes
//!    the payment and confirms it);
//! 2. the store accepts, starts preparing, marks the food ready;
//! 3. dispatch assigns a courier once the delivery exists (the process manager requests it when
//!    the store accepts);
//! 4. the courier picks up, sends a location, delivers;
//! 5. the customer waits for `Completed` (payment captured, order completed: the process manager).
//!
//! Closed loop (`LIFECYCLE_IN_FLIGHT` orders in flight, default 64) or, with `LIFECYCLE_RATE`
//! (orders/s), open loop (a new order every 1/rate s whatever the backbone does). A warm-up
//! (`LIFECYCLE_WARMUP_SECONDS`, default 15), then the measured window (`LIFECYCLE_SECONDS`,
//! default 60). The customer waits for a status on the order's live stream (Server-Sent Events),
//! or with `LIFECYCLE_POLL_MS` by polling the tracking view that often; dispatch retries an
//! assignment every 50 ms until the delivery exists. Prints completed
//! orders/s, each command's p50/p99/max, placed → Confirmed and → Completed, each asynchronous
//! hop, each read model's lag p99, the CPU share of every process; then checks that every order
//! placed reached `Completed` and `replay-tools reconcile` finds 0 differences (fails otherwise);
//! then the append ceiling of the same PostgreSQL and the ratio.
//!
//! `scripts/bench --bench lifecycle` (it starts the broker and builds the release binaries).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone_tests::load::{
    append_ceiling, catalogue_with_stores, cpu_shares, db_now, env_or, hops, machine,
    machine_ticks, process_groups, Backbone, CpuSnapshot, Samples, Summary,
};
use backbone_tests::{address_in, token, Role};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// Stores the orders spread over (each acts with its own token, within the rate limit).
const STORES: usize = 48;
/// Dispatchers (operators with the admin role) assigning couriers.
const DISPATCHERS: usize = 16;

struct Ctx {
    http: reqwest::Client,
    api: String,
    stores: Vec<(Uuid, String)>,
    dispatchers: Vec<String>,
    poll: Duration,
    /// Waits on the live stream (the default) rather than polling.
    stream: bool,
    samples: Mutex<Samples>,
    placed: Mutex<Vec<String>>,
    next: AtomicU64,
    failures: Mutex<Vec<String>>,
    rate_limited: AtomicU64,
    retries: AtomicU64,
    stop: AtomicBool,
}

/// One request, retried as an app would (same idempotency key) on 429/503 (after
/// `Retry-After`), on a transport error or a 5xx; `accept` says which statuses end it.
async fn send(
    ctx: &Ctx,
    bearer: &str,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), String> {
    let key = Uuid::new_v4().to_string();
    for attempt in 0..20 {
        let mut request = ctx
            .http
            .request(method.clone(), url)
            .bearer_auth(bearer)
            .timeout(Duration::from_secs(30));
        if let Some(body) = body {
            request = request.header("idempotency-key", &key).json(body);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                if status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::SERVICE_UNAVAILABLE
                {
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        ctx.rate_limited.fetch_add(1, Ordering::Relaxed);
                    }
                    let wait = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(1);
                    ctx.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                    continue;
                }
                if status.is_server_error() {
                    ctx.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                let value = response.json().await.unwrap_or(Value::Null);
                return Ok((status, value));
            }
            Err(e) => {
                ctx.retries.fetch_add(1, Ordering::Relaxed);
                if attempt > 5 {
                    return Err(format!("{url}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Err(format!("{url}: no answer after 20 attempts"))
}

/// A command: `POST url body` expecting 200, its latency recorded under `name`.
async fn command(
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
/// `LIFECYCLE_POLL_MS` set, by polling the tracking view.
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
async fn watch_for(ctx: &Ctx, bearer: &str, order: &str, wanted: &str) -> Result<(), String> {
    let want = rank(wanted).expect("a known status");
    let url = format!("{}/orders/{order}/tracking/stream", ctx.api);
    let deadline = Instant::now() + Duration::from_secs(300);
    'connect: loop {
        let response = ctx
            .http
            .get(&url)
            .bearer_auth(bearer)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                ctx.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            other => return Err(format!("{url}: {other}")),
        }
        let mut response = response;
        let mut buffer = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("order {order} not {wanted} in 300 s"));
            }
            let chunk = match tokio::time::timeout(left, response.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                // The stream ended or broke: reconnect (it replays from the start).
                Ok(Ok(None) | Err(_)) => continue 'connect,
                Err(_) => return Err(format!("order {order} not {wanted} in 300 s")),
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
    let deadline = Instant::now() + Duration::from_secs(300);
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
            return Err(format!("order {order} not {wanted} in 300 s"));
        }
        tokio::time::sleep(ctx.poll).await;
    }
}

async fn lifecycle(ctx: &Ctx) -> Result<(), String> {
    let n = ctx.next.fetch_add(1, Ordering::Relaxed) as usize;
    let api = &ctx.api;
    let customer = Uuid::new_v4();
    let customer_token = token(Role::Customer, customer);
    let (store, store_token) = &ctx.stores[n % ctx.stores.len()];
    let request = json!({
        "customer_id": customer,
        "store_id": store,
        "region": "uk",
        "items": [
            {"item_id": "margherita", "quantity": 2, "options": ["extra-cheese"]},
            {"item_id": "cola", "quantity": 1}
        ],
        "delivery_address": address_in("uk"),
    });
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
            StatusCode::NOT_FOUND | StatusCode::CONFLICT
                if ended - accepted_at < Duration::from_secs(300) =>
            {
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

async fn run_one(ctx: Arc<Ctx>) {
    if let Err(e) = lifecycle(&ctx).await {
        ctx.failures.lock().expect("failures").push(e);
    }
}

/// Lag of each read model, sampled once a second from `GET /projections`.
async fn sample_lag(ctx: Arc<Ctx>, admin: String, out: Arc<Mutex<Vec<(String, f64)>>>) {
    let url = format!("{}/projections", ctx.api);
    while !ctx.stop.load(Ordering::Relaxed) {
        if let Ok((StatusCode::OK, Value::Array(models))) =
            send(&ctx, &admin, reqwest::Method::GET, &url, None).await
        {
            let mut out = out.lock().expect("lag");
            for m in models {
                if let (Some(name), Some(lag)) = (m["name"].as_str(), m["lag_seconds"].as_f64()) {
                    out.push((name.to_owned(), lag));
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    backbone_tests::init_logs();
    let in_flight: usize = env_or("LIFECYCLE_IN_FLIGHT", 64);
    let rate: f64 = env_or("LIFECYCLE_RATE", 0.0);
    let warmup = Duration::from_secs_f64(env_or("LIFECYCLE_WARMUP_SECONDS", 15.0));
    let window = Duration::from_secs_f64(env_or("LIFECYCLE_SECONDS", 60.0));
    let poll_ms: u64 = env_or("LIFECYCLE_POLL_MS", 0);
    let stream = poll_ms == 0;
    let poll = Duration::from_millis(if stream { 50 } else { poll_ms });
    let broker_port: u16 = backbone_tests::bootstrap()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9092);

    let catalogue_file = std::env::temp_dir().join(format!("lc-catalogue-{}.json", Uuid::new_v4()));
    let stores = catalogue_with_stores(&catalogue_file, STORES);
    let mut backbone = Backbone::start(&catalogue_file, &[]).await;
    println!(
        "\nwhole orders: backbone up (logs in {}); {}",
        backbone.logs.display(),
        machine()
    );
    let admin = token(Role::Admin, Uuid::from_u128(0xad));
    let ctx = Arc::new(Ctx {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(4096)
            .build()
            .expect("client"),
        api: backbone.api.clone(),
        stores: stores
            .iter()
            .map(|s| (*s, token(Role::Store, *s)))
            .collect(),
        dispatchers: (0..DISPATCHERS)
            .map(|i| token(Role::Admin, Uuid::from_u128(0xd15_0000 + i as u128)))
            .collect(),
        poll,
        stream,
        samples: Mutex::new(Samples::default()),
        placed: Mutex::new(Vec::new()),
        next: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        rate_limited: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    let waits = if stream {
        "on the live stream".to_owned()
    } else {
        format!("polling every {poll_ms} ms")
    };
    let mode = if rate > 0.0 {
        format!("open loop, {rate} orders/s arriving")
    } else {
        format!("closed loop, {in_flight} in flight")
    };
    println!(
        "{mode}; warm-up {:.0} s, measured {:.0} s, customers wait {}",
        warmup.as_secs_f64(),
        window.as_secs_f64(),
        waits
    );
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    if rate > 0.0 {
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
    } else {
        for _ in 0..in_flight {
            let ctx = ctx.clone();
            tasks.spawn(async move {
                while !ctx.stop.load(Ordering::Relaxed) {
                    run_one(ctx.clone()).await;
                }
            });
        }
    }
    let lags = Arc::new(Mutex::new(Vec::new()));
    tokio::time::sleep(warmup).await;
    backbone.assert_running();
    let from = Instant::now();
    let db_from = db_now(&backbone.pool).await;
    let groups = process_groups(&backbone, broker_port);
    let cpu_before = CpuSnapshot::take();
    let machine_before = machine_ticks();
    let lag_task = tokio::spawn(sample_lag(ctx.clone(), admin.clone(), lags.clone()));
    tokio::time::sleep(window).await;
    let to = Instant::now();
    let cpu_after = CpuSnapshot::take();
    let machine_after = machine_ticks();
    let db_to = db_now(&backbone.pool).await;
    let load_during = machine();
    // A second look for the backends PostgreSQL started during the window.
    let groups_after = process_groups(&backbone, broker_port);
    ctx.stop.store(true, Ordering::Relaxed);
    let _ = lag_task.await;
    let drain_started = Instant::now();
    while tasks.join_next().await.is_some() {}
    let drain = drain_started.elapsed();
    backbone.assert_running();
    let window_s = (to - from).as_secs_f64();

    let summary = ctx.samples.lock().expect("samples").summary(from, to);
    let get = |name: &str| {
        summary
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    };
    let completed = get("whole order").count;
    let commands_done: usize = summary
        .iter()
        .filter(|(n, _)| !n.contains('→') && *n != "whole order")
        .map(|(_, s)| s.count)
        .sum();
    println!("\n{mode}: {load_during}");
    println!(
        "completed orders/s            {:>8.1}   ({completed} in {window_s:.0} s; {:.1} s after the whole run {} orders)",
        completed as f64 / window_s,
        started.elapsed().as_secs_f64(),
        ctx.next.load(Ordering::Relaxed)
    );
    println!(
        "HTTP commands/s               {:>8.1}   (429s: {}, retried requests: {}; drained in {:.1} s)",
        commands_done as f64 / window_s,
        ctx.rate_limited.load(Ordering::Relaxed),
        ctx.retries.load(Ordering::Relaxed),
        drain.as_secs_f64()
    );
    let line = |name: &str, s: Summary| {
        println!(
            "  {name:<30} n={:>6}  p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
            s.count, s.p50, s.p99, s.max
        );
    };
    println!("commands (HTTP, as the client sees them):");
    for name in [
        "place",
        "accept",
        "start_preparation",
        "mark_ready",
        "assign_courier",
        "pick_up",
        "update_location",
        "deliver",
    ] {
        line(name, get(name));
    }
    println!("order timeline (as the client sees it, waiting {waits}):");
    for name in [
        "placed → Confirmed",
        "mark_ready → courier assigned",
        "placed → Completed",
        "whole order",
    ] {
        line(name, get(name));
    }

    println!("asynchronous hops (cause committed → the process manager's reaction committed):");
    for hop in hops(&backbone.pool, db_from, db_to).await {
        println!(
            "  {:<28} → {:<30} n={:>6}  p50 {:>8.1} ms  p99 {:>8.1} ms",
            hop.cause, hop.reaction, hop.count, hop.p50_ms, hop.p99_ms
        );
    }
    println!("read-model lag (GET /projections, once a second):");
    let lags = lags.lock().expect("lags").clone();
    let mut names: Vec<String> = lags.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let values: Vec<f64> = lags
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| *v * 1000.0)
            .collect();
        let s = Summary::of(values);
        println!(
            "  {name:<30} samples {:>4}  p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
            s.count, s.p50, s.p99, s.max
        );
    }
    println!(
        "CPU (cores used over the window; the machine has {} cores):",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut merged = groups.clone();
    for (name, pids) in &groups_after {
        if let Some((_, known)) = merged.iter_mut().find(|(n, _)| n == name) {
            for pid in pids {
                if !known.contains(pid) {
                    known.push(*pid);
                }
            }
        }
    }
    let shares = cpu_shares(&merged, &cpu_before, &cpu_after);
    let mut backbone_cores = 0.0;
    for (name, cores) in &shares {
        println!("  {name:<30} {cores:>6.2}");
        if name != "load generator" {
            backbone_cores += cores;
        }
    }
    let busy = (machine_after.0 - machine_before.0) as f64
        / (machine_after.1 - machine_before.1).max(1) as f64
        * std::thread::available_parallelism().map_or(1, usize::from) as f64;
    println!(
        "  {:<30} {busy:>6.2}   (everything on the machine, others' builds included)",
        "machine"
    );
    if completed > 0 {
        println!(
            "  backbone CPU per whole order   {:>6.1} ms (broker, PostgreSQL and the binaries)",
            1000.0 * backbone_cores * window_s / completed as f64
        );
    }

    // Every order placed reached Completed, once; the read models and topics agree with the
    // store.
    let failures = ctx.failures.lock().expect("failures").clone();
    let placed = ctx.placed.lock().expect("placed").clone();
    let completed_in_store: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events \
         WHERE aggregate_type = 'order' AND event_type = 'OrderCompleted'",
    )
    .fetch_one(&backbone.pool)
    .await
    .expect("count");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&backbone.pool)
        .await
        .expect("count");
    println!(
        "\norders placed {}, completed in the event store {completed_in_store}, lifecycles failed {}; {events} events ({:.1} per order)",
        placed.len(),
        failures.len(),
        events as f64 / placed.len().max(1) as f64
    );
    for f in failures.iter().take(10) {
        println!("  failed: {f}");
    }
    // The read models catch up, then reconcile compares them and the topics with the store.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let behind: i64 = match send(
            &ctx,
            &admin,
            reqwest::Method::GET,
            &format!("{}/projections", ctx.api),
            None,
        )
        .await
        {
            Ok((StatusCode::OK, Value::Array(models))) => models
                .iter()
                .map(|m| m["lag_events"].as_i64().unwrap_or(1))
                .sum(),
            _ => 1,
        };
        if behind == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reconcile = backbone.replay_tools(&["reconcile"]);
    let report = String::from_utf8_lossy(&reconcile.stdout).into_owned();
    let differences = report
        .lines()
        .filter(|l| l.starts_with("difference: "))
        .count();
    println!(
        "replay-tools reconcile: {differences} differences ({})",
        if reconcile.status.success() {
            "ok"
        } else {
            "FAILED"
        }
    );
    for l in report
        .lines()
        .filter(|l| !l.starts_with("difference: "))
        .take(12)
    {
        println!("  {l}");
    }

    // The append ceiling of the same PostgreSQL, the load stopped.
    let ceiling = append_ceiling(&backbone.database_url, 16, 5.0).await;
    let appended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT DISTINCT aggregate_type, aggregate_id, metadata->>'command_id' \
         FROM events WHERE recorded_at BETWEEN $1 AND $2) c",
    )
    .bind(db_from)
    .bind(db_to)
    .fetch_one(&backbone.pool)
    .await
    .expect("count");
    let appends_per_s = appended as f64 / window_s;
    println!(
        "append ceiling (raw single-row INSERT transactions/s, 16 writers): {ceiling:.0}; the backbone's commands/s (HTTP and process manager, appending transactions) {appends_per_s:.1}: {:.1}% of it",
        100.0 * appends_per_s / ceiling
    );

    backbone.stop().await;
    let _ = std::fs::remove_file(&catalogue_file);
    let all_completed =
        failures.is_empty() && completed_in_store as usize == placed.len() && !placed.is_empty();
    assert!(all_completed, "not every order placed reached Completed");
    assert!(
        reconcile.status.success() && differences == 0,
        "replay-tools reconcile found differences:\n{report}"
    );
}
