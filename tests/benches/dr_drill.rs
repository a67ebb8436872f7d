//! The disaster drill: the primary environment's PostgreSQL (event store and read models) is
//! lost while it takes orders; a second environment is brought up from the Kafka topics alone
//! with `replay-tools restore`, and takes orders again. Prints the recovery point (events
//! committed in the primary that the restored store lacks, against its bound: the relay's
//! backlog at the loss) and the recovery time (from the loss to the first order the restored
//! environment accepts), with its breakdown.
//!
//! 1. The backbone as in production (release binaries, each its own process) on a database of
//!    its own; a history of `DR_ORDERS` generated orders (default 27,000: about a million
//!    events) appended through the command bus and published by the backbone's relay.
//! 2. Orders placed over HTTP by `DR_CLIENTS` customers side by side (default 8) for
//!    `DR_LOAD_SECONDS` (default 20); then the loss: the relay's backlog is read and every
//!    process is killed (SIGKILL). The schema registry keeps running on its own store (Confluent's
//!    keeps it in Kafka; the records' schema ids stay valid).
//! 3. An empty database; `replay-tools restore` (timed); the relay, projector, API and process
//!    manager started on it; the first order placed (the recovery time ends), then confirmed by
//!    the restored process manager.
//! 4. The restored store compared with the lost one (kept aside for the comparison only):
//!    every restored event is the primary's, byte for byte with its hash; the events missing are
//!    counted (the recovery point) and must all have been in the backlog at the loss, else the
//!    drill fails.
//!
//! `scripts/dr-drill` (or `scripts/bench --bench dr_drill`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone_tests::bench::day_of_orders;
use backbone_tests::load::{catalogue_with_stores, env_or, machine, Backbone};
use backbone_tests::{client, client_as, order_request, Role};
use commands::{EventStoreConfig, EventStoreDb};
use replay_tools::rebuild::Connections;
use replay_tools::restore::position_flow;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use streams::RegistryConfig;
use uuid::Uuid;

/// Every event of a store: (event id, chain hash).
async fn events_of(pool: &PgPool) -> Vec<(Uuid, Vec<u8>)> {
    sqlx::query_as("SELECT event_id, chain_hash FROM events")
        .fetch_all(pool)
        .await
        .expect("events")
}

/// Places orders until `stop`; returns how many were accepted.
async fn place_until(api: String, stop: Arc<AtomicBool>, placed: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let customer = Uuid::new_v4();
        let response = client_as(Role::Customer, customer)
            .post(format!("{api}/orders"))
            .timeout(Duration::from_secs(10))
            .json(&order_request(customer))
            .send()
            .await;
        if matches!(response, Ok(r) if r.status().as_u16() == 201) {
            placed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Polls `probe` every 20 ms until it holds, for at most `limit`.
async fn until(limit: Duration, what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !probe().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let orders: usize = env_or("DR_ORDERS", 27_000);
    let clients: usize = env_or("DR_CLIENTS", 8);
    let load_seconds: u64 = env_or("DR_LOAD_SECONDS", 20);
    let catalogue = std::env::temp_dir().join(format!("dr-catalogue-{}.json", Uuid::new_v4()));
    catalogue_with_stores(&catalogue, 0);
    let mut backbone =
        Backbone::start(&catalogue, &[("API_RATE_LIMIT_PER_SECOND", "0".to_owned())]).await;
    let api = backbone.api.clone();
    println!("disaster drill: {}", machine());

    // 1. The history.
    let store = EventStoreDb::connect(&EventStoreConfig {
        database_url: backbone.database_url.clone(),
        database_max_connections: 8,
    })
    .await
    .expect("event store");
    // The generated history already holds the flow's reactions: the process manager starts
    // after it, at its end, as one deployed on an imported history would.
    backbone.kill("process-manager");
    let day = day_of_orders(&store, orders).await;
    println!(
        "history: {} orders, {} events appended in {:.0} s",
        day.orders,
        day.events,
        day.elapsed.as_secs_f64()
    );
    let relayed = Instant::now();
    until(
        Duration::from_secs(3600),
        "the relay to publish the history",
        async || {
            let backlog: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                    .fetch_one(&backbone.pool)
                    .await
                    .unwrap_or(i64::MAX);
            backlog == 0
        },
    )
    .await;
    println!(
        "history published by the relay {:.0} s after the last append",
        relayed.elapsed().as_secs_f64()
    );
    let connections = Connections {
        kafka: backbone.kafka.clone(),
        registry: RegistryConfig::local(backbone.registry.clone()),
        group_prefix: backbone.group_prefix.clone(),
        max_attempts: 3,
    };
    position_flow(&backbone.pool, &connections, chrono::Utc::now())
        .await
        .expect("the process manager positioned at the end of the history");
    backbone.restart("process-manager");

    // 2. Orders arriving, then the loss.
    let stop = Arc::new(AtomicBool::new(false));
    let placed = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(place_until(api.clone(), stop.clone(), placed.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(load_seconds)).await;
    let lost_at = Instant::now();
    for component in ["api", "relay", "projector", "process-manager"] {
        backbone.kill(component);
    }
    // With the relay dead the outbox stands as it was at the loss: what it had not marked
    // published is the bound (it may have been sent without being marked; never the reverse).
    let backlog: HashSet<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM outbox WHERE published_at IS NULL")
            .fetch_all(&backbone.pool)
            .await
            .expect("backlog")
            .into_iter()
            .collect();
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let primary = events_of(&backbone.pool).await;
    println!(
        "loss: {} orders placed over HTTP in {load_seconds} s; the primary held {} events, {} of \
         them not yet published at the loss",
        placed.load(Ordering::Relaxed),
        primary.len(),
        backlog.len()
    );

    // 3. The second environment, from the topics.
    let restored = backbone.replace_database().await;
    let restore_started = Instant::now();
    let output = backbone.replay_tools(&["restore"]);
    let restore_took = restore_started.elapsed();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let summary: Vec<&str> = report
        .lines()
        .filter(|l| {
            l.starts_with("event store:")
                || l.starts_with("restore:")
                || l.starts_with("anchor")
                || l.starts_with("promotion")
                || l.starts_with("process manager")
                || l.contains("rebuilt into")
        })
        .collect();
    assert!(
        output.status.success(),
        "restore failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let started = Instant::now();
    for component in ["relay", "projector", "api"] {
        backbone.restart(component);
    }
    let http = client();
    until(Duration::from_secs(120), "the restored API to be ready", async || {
        matches!(http.get(format!("{api}/health/ready")).send().await, Ok(r) if r.status().is_success())
    })
    .await;
    backbone.restart("process-manager");
    let ready_took = started.elapsed();
    let customer = Uuid::new_v4();
    let mut first_order = None;
    until(
        Duration::from_secs(60),
        "the first order accepted",
        async || {
            let response = client_as(Role::Customer, customer)
                .post(format!("{api}/orders"))
                .header("idempotency-key", customer.to_string())
                .json(&order_request(customer))
                .send()
                .await;
            if let Ok(r) = response {
                if r.status().as_u16() == 201 {
                    first_order = r.json::<Value>().await.ok();
                    return true;
                }
            }
            false
        },
    )
    .await;
    let rto = lost_at.elapsed();
    for line in &summary {
        println!("  {line}");
    }
    println!(
        "RTO: {:.1} s from the loss to the first order accepted: restore {:.1} s (see its \
         breakdown above), the backbone started and ready {:.1} s, the first order {:.1} s",
        rto.as_secs_f64(),
        restore_took.as_secs_f64(),
        ready_took.as_secs_f64(),
        (rto - restore_took - ready_took).as_secs_f64()
    );
    let order_id = first_order
        .as_ref()
        .and_then(|o| o["order_id"].as_str())
        .expect("an order id")
        .to_owned();
    let accepted = Instant::now();
    // The process manager first passes the rewound window again (--flow-rewind).
    until(
        Duration::from_secs(1800),
        "the first order confirmed",
        async || {
            let view: Option<Value> = match http
                .get(format!("{api}/orders/{order_id}/tracking"))
                .send()
                .await
            {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            view.is_some_and(|v| v["status"] == "Confirmed")
        },
    )
    .await;
    println!(
        "the first order confirmed {:.1} s after it was accepted (the process manager took the \
         rewound window again first)",
        accepted.elapsed().as_secs_f64()
    );
    backbone.assert_running();

    // 4. The recovery point, measured.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&backbone.database_url)
        .await
        .expect("restored database");
    let after: HashSet<(Uuid, Vec<u8>)> = events_of(&pool).await.into_iter().collect();
    let primary_ids: HashSet<&Uuid> = primary.iter().map(|(id, _)| id).collect();
    let foreign = after
        .iter()
        .filter(|(id, _)| !primary_ids.contains(id))
        .count();
    let missing: Vec<Uuid> = primary
        .iter()
        .filter(|event| !after.contains(event))
        .map(|(id, _)| *id)
        .collect();
    let unexplained = missing.iter().filter(|id| !backlog.contains(id)).count();
    println!(
        "RPO: {} events committed in the primary are not in the restored store (bound: the \
         relay's backlog at the loss, {} events; {} missing events were not in it)",
        missing.len(),
        backlog.len(),
        unexplained
    );
    println!(
        "restored store: {} events ({} placed after the restore)",
        after.len(),
        foreign
    );
    pool.close().await;
    backbone.stop().await;
    Backbone::drop_database(&restored).await;
    let _ = std::fs::remove_file(&catalogue);
    // Restored events are the primary's byte for byte (same event ids, same chain hashes); the
    // only events missing are ones the relay had not published when the primary was lost.
    assert_eq!(unexplained, 0, "events lost beyond the relay's backlog");
}
