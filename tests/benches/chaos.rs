//! Chaos: whole orders under load while processes, the broker and PostgreSQL die under them,
//! then proof that nothing was lost or doubled (issue #20).
//!
//! The backbone runs as in production (release binaries, each component its own process, on
//! the bench broker and the machine's PostgreSQL, as in `benches/lifecycle.rs`) and the
//! lifecycle generator (`backbone_tests::lifecycle`) drives whole orders, closed loop
//! (`CHAOS_IN_FLIGHT`, default 16), for `CHAOS_SECONDS` (default 600). Its clients retry as apps
//! do: 429/503 after `Retry-After`, transport errors and 5xx with backoff, always with the same
//! `Idempotency-Key`. Meanwhile a controller injects, at moments drawn from `CHAOS_SEED`
//! (random if unset; printed): SIGKILL and restart of the API, the relay, the projector, the
//! process manager and the schema registry (each at least once), SIGKILL and restart of the
//! Kafka broker (same data directory), and restarts of PostgreSQL, once `-m fast` and once
//! `-m immediate` (crash recovery); plus `CHAOS_SECONDS / 60` more kills of processes drawn from
//! the seed.
//!
//! After the window the load stops, the orders in flight finish and the backbone settles
//! (outbox published, every consumer at lag 0); then the run fails on any violation of:
//! every order in the store is Completed, Cancelled/Rejected or has a stuck flow with a reason;
//! every order the API accepted is in the store; `replay-tools reconcile` finds 0 differences;
//! every read model equals its fresh rebuild from the topics (`rebuild` then `check`); no
//! payment captured twice, no order's points earned twice, no notification told twice;
//! `replay-tools verify` passes; no client saw a 5xx other than 503.
//!
//! `scripts/bench --bench chaos` (it starts the broker, exports where it is so the run can kill
//! and restart it, and builds the release binaries). It restarts the machine's PostgreSQL twice.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone_tests::chaos::{self, Broker, Fault};
use backbone_tests::lifecycle::{closed_loop, Ctx, COMMANDS};
use backbone_tests::load::{catalogue_with_stores, env_or, machine, Backbone, COMPONENTS};
use uuid::Uuid;

/// Stores the orders spread over (each acts with its own token, within the rate limit).
const STORES: usize = 16;
/// Dispatchers (operators with the admin role) assigning couriers.
const DISPATCHERS: usize = 8;

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    backbone_tests::init_logs();
    let window = Duration::from_secs_f64(env_or("CHAOS_SECONDS", 600.0));
    let in_flight: usize = env_or("CHAOS_IN_FLIGHT", 16);
    let seed = chaos::seed();
    let broker = Broker::from_env().expect(
        "BENCH_BROKER_PORT and BENCH_BROKER_DATA: run it with `scripts/bench --bench chaos`",
    );
    let mut required: Vec<Fault> = COMPONENTS.into_iter().map(Fault::Kill).collect();
    required.extend([
        Fault::Broker,
        Fault::Postgres("fast"),
        Fault::Postgres("immediate"),
    ]);
    let extra = (window.as_secs_f64() / 60.0) as usize;
    let plan = chaos::plan(seed, window, &required, extra);

    let catalogue_file =
        std::env::temp_dir().join(format!("chaos-catalogue-{}.json", Uuid::new_v4()));
    let stores = catalogue_with_stores(&catalogue_file, STORES);
    let mut backbone = Backbone::start(&catalogue_file, &[]).await;
    println!(
        "\nchaos: seed {seed} (CHAOS_SEED={seed} repeats the plan); {:.0} s, closed loop, {in_flight} in flight; backbone logs in {}; {}",
        window.as_secs_f64(),
        backbone.logs.display(),
        machine()
    );
    println!("plan ({} faults):", plan.len());
    for p in &plan {
        println!(
            "  at {:>6.1} s  {:<34} down {}",
            p.after.as_secs_f64(),
            p.fault.to_string(),
            seconds(p.down)
        );
    }

    let ctx = Arc::new(Ctx::new(
        backbone.api.clone(),
        &stores,
        DISPATCHERS,
        Duration::from_millis(50),
        true,
    ));
    let started = Instant::now();
    let mut tasks = closed_loop(&ctx, in_flight);
    let run = chaos::inject(&mut backbone, &plan, Some(&broker), started, window).await;
    ctx.stop.store(true, Ordering::Relaxed);
    let drain_started = Instant::now();
    while tasks.join_next().await.is_some() {}
    let drained = drain_started.elapsed();
    let settled = chaos::settle(&backbone, Duration::from_secs(300)).await;
    let placed = ctx.placed.lock().expect("placed").clone();
    let findings = chaos::check(&backbone, &placed).await;

    println!(
        "\nfaults injected ({}), with the time to recover (from the fault to the first success of a command sent after it; of a whole order placed after it):",
        run.injected.len()
    );
    // Read from a copy: the samples' lock must not be held across the awaits below.
    let samples = std::mem::take(&mut *ctx.samples.lock().expect("samples"));
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut worst = Duration::ZERO;
    for fault in &run.injected {
        by_kind
            .entry(fault.fault.clone())
            .or_default()
            .push(fault.offset);
        let first_command = samples
            .first_started_after(&COMMANDS, fault.at)
            .map(|t| t - fault.at);
        let first_order = samples
            .first_started_after(&["whole order"], fault.at)
            .map(|t| t - fault.at);
        worst = worst.max(first_command.unwrap_or_default());
        println!(
            "  {:>6.1} s  {:<34} back after {:>7}  first command {:>9}  first whole order {:>9}",
            fault.offset,
            fault.fault,
            seconds(fault.back_after),
            first_command.map_or("none".to_owned(), seconds),
            first_order.map_or("none".to_owned(), seconds),
        );
    }
    println!("by kind:");
    for (kind, offsets) in &by_kind {
        let at: Vec<String> = offsets.iter().map(|o| format!("{o:.0} s")).collect();
        println!("  {kind:<34} {} × (at {})", offsets.len(), at.join(", "));
    }
    for (name, offset, status) in &run.exited_on_their_own {
        println!("  EXITED ON ITS OWN: {name} at {offset:.1} s ({status}); restarted");
    }
    let placed = placed.len();
    let completed = samples
        .summary(started, Instant::now())
        .iter()
        .find(|(n, _)| *n == "whole order")
        .map_or(0, |(_, s)| s.count);
    let failures = ctx.failures.lock().expect("failures").clone();
    let server_errors = ctx.server_errors.lock().expect("server errors").clone();
    println!(
        "\norders placed {placed}, completed by their clients {completed}, lifecycles not completed {} (in flight drained in {})",
        failures.len(),
        seconds(drained)
    );
    for f in failures.iter().take(10) {
        println!("  not completed: {f}");
    }
    println!(
        "requests refused (429/503) {}, retried {} (after a 408 {}, after a 409 key still in progress {}), server errors (5xx but 503) seen by clients {}",
        ctx.refused.load(Ordering::Relaxed),
        ctx.retries.load(Ordering::Relaxed),
        ctx.timed_out.load(Ordering::Relaxed),
        ctx.in_progress.load(Ordering::Relaxed),
        server_errors.len()
    );
    for e in server_errors.iter().take(20) {
        println!("  SERVER ERROR: {e}");
    }
    match &settled {
        Ok(took) => println!("settled in {} after the load stopped", seconds(*took)),
        Err(e) => println!("NOT SETTLED: {e}"),
    }
    println!("{findings}");

    let mut violations = findings.violations();
    if let Err(e) = settled {
        violations.push(e);
    }
    violations.extend(server_errors.iter().map(|e| format!("a client saw {e}")));
    for fault in &required {
        if !run.injected.iter().any(|i| i.fault == fault.to_string()) {
            violations.push(format!("fault never injected: {fault}"));
        }
    }
    if placed == 0 {
        violations.push("no order placed".to_owned());
    }
    backbone.stop().await;
    let _ = std::fs::remove_file(&catalogue_file);
    println!(
        "worst time to the first command after a fault: {}",
        seconds(worst)
    );
    assert!(
        violations.is_empty(),
        "chaos (seed {seed}): {} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}
