//! Throughput of the spine, each stage next to its raw baseline measured in the same run:
//!
//! | stage     | baseline                                                         |
//! |-----------|------------------------------------------------------------------|
//! | append    | raw PostgreSQL inserts of event-sized rows, one transaction each |
//! | relay     | raw idempotent producer of the same bytes, same settings, and    |
//! |           | Kafka's own `ProducerPerformance` with the same settings         |
//! | projector | raw consumer of the same topic, no decoding, no database, and    |
//! |           | Kafka's own `ConsumerPerformance` on the same topic              |
//!
//! `cargo bench -p backbone-tests --bench spine` (the test command's services must be running;
//! `scripts/bench` starts them). `BENCH_ORDERS` sets the number of orders (default 10 000).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone_tests::bench::{
    appends, kafka_consumer_performance, kafka_producer_performance, rate, raw_consumer,
    wait_until, WRITERS,
};
use backbone_tests::{order_request, TestEnv};
use projections::TrackingProjection;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

async fn raw_inserts(env: &TestEnv, count: usize, payload: &serde_json::Value) -> Duration {
    sqlx::query(
        "CREATE TABLE raw_events (aggregate_type text, aggregate_id text, sequence bigint, \
         event_type text, event_version text, payload json, metadata json, \
         PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    )
    .execute(env.pool())
    .await
    .expect("table");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (pool, next, payload) = (env.pool().clone(), next.clone(), payload.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                sqlx::query(
                    "INSERT INTO raw_events VALUES ('order', $1, 1, 'OrderPlaced', '1.0', $2, '{}')",
                )
                .bind(Uuid::new_v4().to_string())
                .bind(&payload)
                .execute(&pool)
                .await
                .expect("insert");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}

async fn raw_producer(
    env: &TestEnv,
    count: usize,
    bytes: &[u8],
    headers: &rdkafka::message::OwnedHeaders,
) -> Duration {
    let topic = env.kafka.topics().named("raw-producer");
    streams::admin::ensure_topics(&env.kafka, std::slice::from_ref(&topic))
        .await
        .expect("topic");
    let producer: FutureProducer = streams::relay::producer_config(&env.kafka)
        .create()
        .expect("producer");
    let keys: Vec<String> = (0..count).map(|_| Uuid::new_v4().to_string()).collect();
    let started = Instant::now();
    // Same shape as the relay: batches of 1000, each awaited before the next.
    for chunk in keys.chunks(1000) {
        let futures: Vec<_> = chunk
            .iter()
            .map(|key| {
                producer
                    .send_result(
                        FutureRecord::to(&topic)
                            .key(key.as_bytes())
                            .payload(bytes)
                            .headers(headers.clone()),
                    )
                    .map_err(|(e, _)| e)
                    .expect("enqueued")
            })
            .collect();
        for future in futures {
            future.await.expect("not cancelled").expect("acknowledged");
        }
    }
    started.elapsed()
}

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let count: usize = std::env::var("BENCH_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let env = TestEnv::start("bench").await;
    let sample_payload = serde_json::json!({"OrderPlaced": order_request(Uuid::new_v4())});

    let raw_insert = raw_inserts(&env, count, &sample_payload).await;
    let append = appends(&env, count).await;

    let relay = env.start_relay().await;
    let started = Instant::now();
    wait_until("relay", async || {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(env.pool())
                .await
                .expect("outbox");
        left == 0
    })
    .await;
    let relay_time = started.elapsed();
    relay.stop().await.expect("relay stops");

    let sample = env
        .read_topic("order", Duration::from_secs(30), |r| !r.is_empty())
        .await;
    let wire_bytes = {
        let encoder = streams::EventEncoder::new(&env.registry).expect("encoder");
        let stored: serde_json::Value =
            sqlx::query_scalar("SELECT payload::jsonb FROM events LIMIT 1")
                .fetch_one(env.pool())
                .await
                .expect("event");
        encoder
            .encode_payload(&sample[0].topic, "order", &stored)
            .await
            .expect("encoded")
            .1
    };
    let raw_produce = raw_producer(&env, count, &wire_bytes, &sample[0].meta.to_headers()).await;

    let tool_topic = env.kafka.topics().named("kafka-producer-performance");
    streams::admin::ensure_topics(&env.kafka, std::slice::from_ref(&tool_topic))
        .await
        .expect("topic");
    let kafka_produce = kafka_producer_performance(&env, &tool_topic, count, wire_bytes.len());
    let kafka_consume = kafka_consumer_performance(&env, &sample[0].topic, count);

    let raw_consume = raw_consumer(&env, count).await;
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let started = Instant::now();
    wait_until("projector", async || {
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM tracking.orders")
            .fetch_one(env.pool())
            .await
            .unwrap_or(0);
        applied as usize >= count
    })
    .await;
    let project = started.elapsed();
    projector.stop().await.expect("projector stops");

    let rows = [
        (
            "append (CommandBus)",
            rate(count, append),
            "raw INSERT, 1 tx each",
            rate(count, raw_insert),
        ),
        (
            "relay (outbox → Kafka)",
            rate(count, relay_time),
            "raw producer, same records",
            rate(count, raw_produce),
        ),
        (
            "projector (tracking)",
            rate(count, project),
            "raw consumer",
            rate(count, raw_consume),
        ),
    ];
    let unmeasured = "(KAFKA_CLASSPATH not set: run through scripts/bench)";
    let tool_rows = [
        (
            "Kafka ProducerPerformance, same size and settings",
            kafka_produce,
        ),
        ("Kafka ConsumerPerformance, the orders topic", kafka_consume),
    ];
    println!(
        "\nspine throughput, {count} orders ({} bytes per record on the wire), {WRITERS} writers",
        wire_bytes.len()
    );
    println!(
        "{:<24} {:>12}   {:<26} {:>12}   {:>6}",
        "stage", "events/s", "baseline", "events/s", "ratio"
    );
    for (stage, ours, baseline, raw) in rows {
        println!(
            "{stage:<24} {ours:>12.0}   {baseline:<26} {raw:>12.0}   {:>5.0}%",
            100.0 * ours / raw
        );
    }
    println!("raw limits of the broker itself, same run:");
    for (tool, figure) in tool_rows {
        match figure {
            Some(f) => println!("  {tool:<52} {:>12.0} records/s", f.records_per_second),
            None => println!("  {tool:<52} {unmeasured}"),
        }
    }
    env.stop().await;
}
