//! Cost against history: a loyal customer (`HISTORY_LEDGER_EVENTS` rewards events, default
//! 10,000) and a busy store (`HISTORY_STORE_ORDERS` orders, default 100,000) are served at the
//! same latency as a new customer and a new store.
//!
//! The backbone runs as in production (release binaries, each its own process). The history is
//! written through the command bus, as the backbone's own commands write it: the ledger as five
//! years of orders write it (an earn and a redemption per order, nine hours apart, the weekly
//! sweep of expired points), the store's orders by eight writers side by side.
//! The relay publishes it and the projectors apply it; the process manager is stopped meanwhile
//! and then joins at the end of its topics (the history is the past, not work to do: a store's
//! 100,000 old placements are not to be paid again). Then, one request at a time, alternating
//! the old subject and the new one (`HISTORY_SAMPLES` each, default 200), over HTTP as the apps
//! do:
//!
//! - the customer's rewards balance (the ledger loaded: its snapshot and the events after it);
//! - placing an order (the API reads the ledger for a running subscription's free delivery);
//! - the store's first page of orders, all of them and those still `Placed`;
//! - the store accepting an order (placed, then confirmed by the process manager, first).
//!
//! And in this process, the raw cost the snapshots take away: loading the loyal customer's
//! ledger from its snapshot against replaying every one of its events (what `cqrs-es` does
//! without snapshots).
//!
//! `scripts/bench --bench history`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::orders::PlaceOrderRequest;
use backbone_tests::lifecycle::placement_request;
use backbone_tests::load::{catalogue_with_stores, env_or, machine, Backbone, Summary};
use backbone_tests::{earn_on, token, Role};
use chrono::{DateTime, Utc};
use commands::{CommandBus, CommandContext, EventStoreConfig, EventStoreDb};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::EventStore;
use domain::order::{Order, OrderCommand};
use domain::rewards::{RewardsCommand, RewardsLedger, RewardsServices};
use domain::services::{Clock, OrderServices, SystemClock};
use domain::{CustomerId, OrderId};
use postgres_es::PostgresEventRepository;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

/// Writers placing the busy store's orders side by side.
const WRITERS: usize = 8;

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    backbone_tests::init_logs();
    let ledger_events: usize = env_or("HISTORY_LEDGER_EVENTS", 10_000);
    let store_orders: usize = env_or("HISTORY_STORE_ORDERS", 100_000);
    let samples: usize = env_or("HISTORY_SAMPLES", 200);
    let catalogue_file = std::env::temp_dir().join(format!("hi-catalogue-{}.json", Uuid::new_v4()));
    let stores = catalogue_with_stores(&catalogue_file, 2);
    let (busy, fresh) = (stores[0], stores[1]);
    // One client sends every request of a subject, faster than an app would: no rate limit.
    let mut backbone = Backbone::start(
        &catalogue_file,
        &[("API_RATE_LIMIT_PER_SECOND", "0".to_owned())],
    )
    .await;
    backbone.kill("process-manager");
    println!(
        "\ncost against history: backbone up (logs in {}); {}",
        backbone.logs.display(),
        machine()
    );
    let store = EventStoreDb::connect(&EventStoreConfig {
        database_url: backbone.database_url.clone(),
        database_max_connections: 16,
    })
    .await
    .expect("event store");
    let catalogue =
        commands::catalogue::seed_catalogue(Some(&catalogue_file.display().to_string()))
            .expect("catalogue");
    let orders = Arc::new(CommandBus::<Order>::new(
        store.clone(),
        OrderServices::new(Arc::new(catalogue), Arc::new(SystemClock)),
    ));

    let (loyal, newcomer) = (Uuid::new_v4(), Uuid::new_v4());
    let started = Instant::now();
    write_ledger(&store, loyal, ledger_events).await;
    write_ledger(&store, newcomer, 2).await;
    println!(
        "history: {ledger_events} rewards events of one customer in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    place_history(&orders, busy, store_orders).await;
    println!(
        "history: {store_orders} orders of one store in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    wait_until_applied(&backbone, busy, store_orders).await;
    println!(
        "history: published and applied by the read models in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    skip_flow_history(&backbone).await;
    backbone.restart("process-manager");

    let api = backbone.api.clone();
    let http = reqwest::Client::new();
    let as_customer = |c: Uuid| token(Role::Customer, c);
    let as_store = |s: Uuid| token(Role::Store, s);
    let mut rows: Vec<(String, Summary, Summary)> = Vec::new();

    let (new, old) = alternate(samples, |old| {
        let customer = if old { loyal } else { newcomer };
        let url = format!("{api}/customers/{customer}/rewards");
        let (http, bearer) = (http.clone(), as_customer(customer));
        async move { call(&http, &bearer, Method::GET, &url, None).await }
    })
    .await;
    rows.push((
        format!("rewards balance ({ledger_events} events / 2)"),
        new,
        old,
    ));

    let (new, old) = alternate(samples, |old| {
        let customer = if old { loyal } else { newcomer };
        let (http, bearer, url) = (http.clone(), as_customer(customer), format!("{api}/orders"));
        async move {
            let body = placement_request(customer, fresh);
            call(&http, &bearer, Method::POST, &url, Some(&body)).await
        }
    })
    .await;
    rows.push(("place an order (reads the ledger)".to_owned(), new, old));

    for (name, filter) in [
        ("store's orders, first page", ""),
        ("store's orders still Placed", "&status=Placed"),
    ] {
        let (new, old) = alternate(samples, |old| {
            let store = if old { busy } else { fresh };
            let url = format!("{api}/orders?store_id={store}&limit=20{filter}");
            let (http, bearer) = (http.clone(), as_store(store));
            async move { call(&http, &bearer, Method::GET, &url, None).await }
        })
        .await;
        rows.push((format!("{name} ({store_orders} orders / new)"), new, old));
    }

    let accepts = samples.min(100);
    let (new, old) = accept_orders(&http, &api, busy, fresh, accepts).await;
    rows.push(("store accepts an order".to_owned(), new, old));

    println!("\none request at a time, {samples} each (accepts: {accepts}), alternating:");
    println!(
        "  {:<48} {:>22} {:>26} {:>10}",
        "", "new: p50 / p99 ms", "long history: p50 / p99 ms", "p99 ratio"
    );
    for (name, new, old) in &rows {
        println!(
            "  {name:<48} {:>9.1} / {:>9.1} {:>12.1} / {:>11.1} {:>9.2}x",
            new.p50,
            new.p99,
            old.p50,
            old.p99,
            old.p99 / new.p99
        );
    }

    let (snapshot, replay) = ledger_loads(&store, loyal, samples.min(50)).await;
    println!(
        "\nloading the loyal customer's ledger in process ({ledger_events} events), p50 / p99:\n  \
         from its snapshot and the events after it  {:>8.2} / {:>8.2} ms\n  \
         replaying every event (cqrs-es without snapshots) {:>8.2} / {:>8.2} ms ({:.0}x the p50)",
        snapshot.p50,
        snapshot.p99,
        replay.p50,
        replay.p99,
        replay.p50 / snapshot.p50
    );
    backbone.assert_running();
    backbone.stop().await;
    let _ = std::fs::remove_file(&catalogue_file);
}

/// The ledgers' clock while the history is written: set to each write's moment.
#[derive(Debug)]
struct HistoryClock(std::sync::Mutex<DateTime<Utc>>);

impl Clock for HistoryClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock")
    }
}

/// How far apart a loyal customer's orders are: 10,000 ledger events, an earn and a
/// redemption per order, over about five years.
const ORDER_EVERY_HOURS: i64 = 9;

/// `events` rewards events on `customer`'s ledger, as years of orders write them: per order,
/// an earn (100 points, kept 365 days) and a redemption of 90 on the next order, one order
/// every [`ORDER_EVERY_HOURS`], the last just now; and every week the sweep of expired points
/// an operator runs (its events come on top).
async fn write_ledger(store: &EventStoreDb, customer: Uuid, events: usize) {
    let orders = i64::try_from(events.div_ceil(2)).expect("a count");
    let clock = Arc::new(HistoryClock(std::sync::Mutex::new(
        Utc::now() - chrono::Duration::hours(orders * ORDER_EVERY_HOURS),
    )));
    let rewards =
        CommandBus::<RewardsLedger>::new(store.clone(), RewardsServices::new(clock.clone()));
    let id = CustomerId::from_uuid(customer).to_string();
    let context = CommandContext::new("system:history");
    let mut last_sweep = clock.now();
    for i in 0..events {
        let order_id = OrderId::new();
        let command = if i % 2 == 0 {
            *clock.0.lock().expect("clock") += chrono::Duration::hours(ORDER_EVERY_HOURS);
            earn_on(order_id, 1_000, format!("earn-{i}"))
        } else {
            RewardsCommand::RedeemPoints {
                order_id,
                points: 90,
                idempotency_key: format!("redeem-{i}"),
            }
        };
        rewards
            .execute(&id, command, &context)
            .await
            .expect("a ledger write");
        let now = clock.now();
        if now - last_sweep >= chrono::Duration::days(7) {
            last_sweep = now;
            rewards
                .execute(
                    &id,
                    RewardsCommand::ExpirePoints {
                        as_of: now,
                        idempotency_key: format!("sweep-{i}"),
                    },
                    &context,
                )
                .await
                .expect("a sweep");
        }
    }
}

/// `orders` placements at `store`, each of a customer of its own, by [`WRITERS`] writers.
async fn place_history(bus: &Arc<CommandBus<Order>>, store: Uuid, orders: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (bus, next) = (bus.clone(), next.clone());
        writers.spawn(async move {
            let context = CommandContext::new("system:history");
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < orders {
                let request: PlaceOrderRequest =
                    serde_json::from_value(placement_request(Uuid::new_v4(), store))
                        .expect("a request");
                let command = OrderCommand::try_from(request).expect("a placement");
                bus.execute(&OrderId::new().to_string(), command, &context)
                    .await
                    .expect("placed");
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
}

/// Waits until the tracking view holds every one of `store`'s `orders` and the outbox is
/// published (every other read model is fed from the same topics, in the same batches).
async fn wait_until_applied(backbone: &Backbone, store: Uuid, orders: usize) {
    let deadline = Instant::now() + Duration::from_secs(1_800);
    loop {
        let (tracked, unpublished): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM tracking.orders WHERE store_id = $1), \
                    (SELECT count(*) FROM outbox WHERE published_at IS NULL)",
        )
        .bind(store)
        .fetch_one(&backbone.pool)
        .await
        .expect("progress");
        if tracked as usize >= orders && unpublished == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the history was not applied in 30 minutes ({tracked} of {orders} orders tracked)"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Commits the process manager's group at the end of its topics, so that it reacts to what
/// happens from now on, not to the history (the broker takes it once the stopped member's
/// session has lapsed).
async fn skip_flow_history(backbone: &Backbone) {
    let group = format!("{}{}", backbone.group_prefix, flows::order_flow::NAME);
    let kafka = backbone.kafka.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka
            .client_config()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("a consumer");
        let timeout = Duration::from_secs(15);
        let mut end = TopicPartitionList::new();
        for aggregate_type in flows::order_flow::AGGREGATE_TYPES {
            let topic = kafka
                .topics()
                .for_aggregate(aggregate_type)
                .expect("a topic");
            let metadata = consumer
                .fetch_metadata(Some(&topic), timeout)
                .expect("metadata");
            for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, partition.id(), timeout)
                    .expect("watermarks");
                end.add_partition_offset(&topic, partition.id(), Offset::Offset(high))
                    .expect("an offset");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Err(e) = consumer.commit(&end, CommitMode::Sync) {
            assert!(
                Instant::now() < deadline,
                "the group was not free in 2 minutes: {e}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    })
    .await
    .expect("the process manager's group moved");
}

/// One request; its latency in milliseconds. Fails the benchmark on an answer other than
/// success.
async fn call(
    http: &reqwest::Client,
    bearer: &str,
    method: Method,
    url: &str,
    body: Option<&Value>,
) -> f64 {
    let mut request = http.request(method.clone(), url).bearer_auth(bearer);
    if let Some(body) = body {
        request = request
            .header("idempotency-key", Uuid::new_v4().to_string())
            .json(body);
    }
    let started = Instant::now();
    let response = request.send().await.expect("an answer");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let took = started.elapsed().as_secs_f64() * 1_000.0;
    assert!(status.is_success(), "{method} {url}: {status} {text}");
    took
}

/// `n` samples of `request(false)` (the new subject) and `request(true)` (the one with the long
/// history), one at a time, alternating.
async fn alternate<F, Fut>(n: usize, request: F) -> (Summary, Summary)
where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let (mut new, mut old) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        new.push(request(false).await);
        old.push(request(true).await);
    }
    (Summary::of(new), Summary::of(old))
}

/// `n` accepts at the busy store and at the new one, alternating: each order placed and
/// confirmed by the process manager first; only the accept is timed.
async fn accept_orders(
    http: &reqwest::Client,
    api: &str,
    busy: Uuid,
    fresh: Uuid,
    n: usize,
) -> (Summary, Summary) {
    let (mut new, mut old) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        for (store, out) in [(fresh, &mut new), (busy, &mut old)] {
            let customer = Uuid::new_v4();
            let bearer = token(Role::Customer, customer);
            let placed = http
                .post(format!("{api}/orders"))
                .bearer_auth(&bearer)
                .header("idempotency-key", Uuid::new_v4().to_string())
                .json(&placement_request(customer, store))
                .send()
                .await
                .expect("placed");
            assert_eq!(placed.status(), StatusCode::CREATED);
            let placed: Value = placed.json().await.expect("json");
            let order = placed["order_id"].as_str().expect("an order id").to_owned();
            wait_for_status(http, api, &bearer, &order, "Confirmed").await;
            out.push(
                call(
                    http,
                    &token(Role::Store, store),
                    Method::POST,
                    &format!("{api}/orders/{order}/actions"),
                    Some(&json!({"action": "accept", "estimated_preparation_minutes": 10})),
                )
                .await,
            );
        }
    }
    (Summary::of(new), Summary::of(old))
}

async fn wait_for_status(
    http: &reqwest::Client,
    api: &str,
    bearer: &str,
    order: &str,
    status: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view: Value = http
            .get(format!("{api}/orders/{order}/tracking"))
            .bearer_auth(bearer)
            .send()
            .await
            .expect("tracking")
            .json()
            .await
            .unwrap_or(Value::Null);
        if view["status"] == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "order {order} not {status} in 60 s: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` loads of `customer`'s ledger from its snapshot (the command bus) and as many replaying
/// every event (`cqrs-es`'s event store without snapshots), alternating, in milliseconds.
async fn ledger_loads(store: &EventStoreDb, customer: Uuid, n: usize) -> (Summary, Summary) {
    let id = CustomerId::from_uuid(customer).to_string();
    let bus = CommandBus::<RewardsLedger>::new(
        store.clone(),
        RewardsServices::new(Arc::new(SystemClock)),
    );
    let replaying = PersistedEventStore::<_, RewardsLedger>::new_event_store(
        PostgresEventRepository::new(store.pool().clone()),
    )
    .with_upcasters(schemas::upcasters());
    let (mut snapshot, mut replay) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let started = Instant::now();
        let from_snapshot = bus
            .state(&id, |ledger| ledger.balance)
            .await
            .expect("loaded");
        snapshot.push(started.elapsed().as_secs_f64() * 1_000.0);
        let started = Instant::now();
        let context = replaying.load_aggregate(&id).await.expect("replayed");
        replay.push(started.elapsed().as_secs_f64() * 1_000.0);
        assert_eq!(context.aggregate.balance, from_snapshot, "both loads agree");
    }
    (Summary::of(snapshot), Summary::of(replay))
}
