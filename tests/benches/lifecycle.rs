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
//! The generator itself (callers, retries, the lifecycle) is `backbone_tests::lifecycle`, which
//! the chaos run (`benches/chaos.rs`) drives too.
//!
//! `scripts/bench --bench lifecycle` (it starts the broker and builds the release binaries).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone_tests::lifecycle::{closed_loop, open_loop, send, Ctx, COMMANDS};
use backbone_tests::load::{
    append_ceiling, catalogue_with_stores, cpu_shares, db_now, env_or, hops, machine,
    machine_ticks, process_groups, Backbone, CpuSnapshot, Summary,
};
use backbone_tests::{token, Role};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

/// Stores the orders spread over (each acts with its own token, within the rate limit).
const STORES: usize = 48;
/// Dispatchers (operators with the admin role) assigning couriers.
const DISPATCHERS: usize = 16;

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
    let ctx = Arc::new(Ctx::new(
        backbone.api.clone(),
        &stores,
        DISPATCHERS,
        poll,
        stream,
    ));

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
    let mut tasks = if rate > 0.0 {
        open_loop(&ctx, rate)
    } else {
        closed_loop(&ctx, in_flight)
    };
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
    let rate_limited = ctx.rate_limited.load(Ordering::Relaxed);
    println!(
        "HTTP commands/s               {:>8.1}   (drained in {:.1} s)",
        commands_done as f64 / window_s,
        drain.as_secs_f64()
    );
    println!(
        "  answered 429 (rate limit) {rate_limited}, 503 (at capacity, Retry-After) {}, 408 (API timeout) {}; \
         no answer (transport error, client timeout) {}; requests retried {}",
        ctx.refused.load(Ordering::Relaxed) - rate_limited,
        ctx.timed_out.load(Ordering::Relaxed),
        ctx.transport_errors.load(Ordering::Relaxed),
        ctx.retries.load(Ordering::Relaxed),
    );
    let line = |name: &str, s: Summary| {
        println!(
            "  {name:<30} n={:>6}  p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
            s.count, s.p50, s.p99, s.max
        );
    };
    println!("commands (HTTP, as the client sees them):");
    for name in COMMANDS {
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
