//! Throughput of the spine, each stage next to its raw baseline measured in the same run:
//!
//! | stage     | baseline                                                             |
//! |-----------|----------------------------------------------------------------------|
//! | append    | raw `INSERT`s of the rows the command bus stored (same payload and   |
//! |           | metadata text), one transaction each: into the event store's own     |
//! |           | `events` table with its outbox and hash-chain triggers (in a twin    |
//! |           | database with the same migrations, so nothing is relayed), and into  |
//! |           | a copy of its columns, defaults and indexes without triggers         |
//! | relay     | raw idempotent producer of the same bytes, same settings, and        |
//! |           | Kafka's own `ProducerPerformance` with the same settings             |
//! | projector | raw consumer of the same topic, no decoding, no database, and        |
//! |           | Kafka's own `ConsumerPerformance` on the same topic                  |
//!
//! `cargo bench -p backbone-tests --bench spine` (the test command's services must be running;
//! `scripts/bench` starts them). `BENCH_ORDERS` sets the number of orders (default 10 000).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone_tests::bench::{
    appends, kafka_consumer_performance, kafka_producer_performance, load_average, rate,
    raw_consumer, relay_backlog, wait_until, WRITERS,
};
use backbone_tests::{admin_url, TestEnv};
use commands::store::{EventStoreConfig, EventStoreDb};
use projections::TrackingProjection;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// `count` inserts of `row` (one transaction each, [`WRITERS`] side by side) into `table`, each
/// under a new aggregate id: the statement the event store runs for one new event.
async fn raw_inserts(pool: &PgPool, table: &str, count: usize, row: &StoredRow) -> Duration {
    let statement = format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, sequence, event_type, \
         event_version, payload, metadata) VALUES ('order', $1, 1, $2, $3, $4::json, $5::json)"
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (pool, next, row, statement) =
            (pool.clone(), next.clone(), row.clone(), statement.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                sqlx::query(&statement)
                    .bind(Uuid::new_v4().to_string())
                    .bind(&row.event_type)
                    .bind(&row.event_version)
                    .bind(&row.payload)
                    .bind(&row.metadata)
                    .execute(&pool)
                    .await
                    .expect("insert");
            }
        });
    }
    while let Some(writer) = tasks.join_next().await {
        writer.expect("every insert succeeded");
    }
    started.elapsed()
}

/// One event as the command bus stored it (payload and metadata as the text it wrote).
#[derive(Debug, Clone, sqlx::FromRow)]
struct StoredRow {
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
}

/// A second database with the event store's migrations (the same `events` table with its
/// outbox and hash-chain triggers), so that the raw inserts into it publish nothing here.
async fn twin_store(env: &TestEnv) -> (String, EventStoreDb) {
    let database = format!("{}_raw", backbone_tests::database_of(&env.database_url));
    let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&mut admin)
        .await
        .expect("twin database");
    let store = EventStoreDb::connect(&EventStoreConfig {
        database_url: backbone_tests::with_database(&env.database_url, &database),
        database_max_connections: 24,
    })
    .await
    .expect("twin store migrated");
    (database, store)
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
    let load_at_start = load_average();
    let env = TestEnv::start("bench").await;

    let append = appends(&env, count).await;
    // The raw baselines insert the rows the command bus just stored (the same payload and
    // metadata text), each under a new aggregate id: into a copy of the `events` table without
    // triggers, and into the event store's own table (outbox and hash-chain triggers) in a twin
    // database, so that nothing they insert is relayed here.
    let row: StoredRow = sqlx::query_as(
        "SELECT event_type, event_version, payload::text AS payload, metadata::text AS metadata \
         FROM events LIMIT 1",
    )
    .fetch_one(env.pool())
    .await
    .expect("a stored event");
    sqlx::query(
        "CREATE TABLE plain_events (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS \
         INCLUDING INDEXES)",
    )
    .execute(env.pool())
    .await
    .expect("plain table");
    // The hash-chain columns are the trigger's to fill; without it they get 32 constant bytes
    // each, so that the rows are as long as the store's.
    sqlx::query(
        "ALTER TABLE plain_events \
           ALTER chain_prev SET DEFAULT decode(repeat('00', 32), 'hex'), \
           ALTER chain_hash SET DEFAULT decode(repeat('ab', 32), 'hex')",
    )
    .execute(env.pool())
    .await
    .expect("chain columns");
    let raw_plain = raw_inserts(env.pool(), "plain_events", count, &row).await;
    let (twin_database, twin) = twin_store(&env).await;
    let raw_triggered = raw_inserts(twin.pool(), "events", count, &row).await;
    let twin_outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(twin.pool())
        .await
        .expect("twin outbox");
    assert_eq!(
        twin_outbox as usize, count,
        "the triggers recorded every insert"
    );
    twin.pool().close().await;
    let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {twin_database}"))
        .execute(&mut admin)
        .await
        .expect("twin dropped");

    let relay_time = relay_backlog(&env).await;

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
            "raw INSERT, store's table+triggers",
            rate(count, raw_triggered),
        ),
        (
            "",
            f64::NAN,
            "raw INSERT, same table, no triggers",
            rate(count, raw_plain),
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
        "\nspine throughput, {count} orders ({} bytes per record on the wire), {WRITERS} writers; \
         load average {load_at_start} at the start, {} at the end",
        wire_bytes.len(),
        load_average()
    );
    println!(
        "{:<24} {:>10}   {:<36} {:>10}   {:>6}",
        "stage", "events/s", "baseline (same run)", "events/s", "ratio"
    );
    for (stage, ours, baseline, raw) in rows {
        if ours.is_nan() {
            println!("{:<24} {:>10}   {baseline:<36} {raw:>10.0}", "", "");
            continue;
        }
        println!(
            "{stage:<24} {ours:>10.0}   {baseline:<36} {raw:>10.0}   {:>5.0}%",
            100.0 * ours / raw
        );
    }
    println!(
        "raw INSERTs: the row the command bus stored (same payload and metadata text), one \
         transaction each, {WRITERS} writers; \"store's table+triggers\" is the event store's \
         `events` (outbox and hash-chain triggers) in a twin database, \"no triggers\" a copy of \
         its columns, defaults and indexes (the chain columns given constant bytes)"
    );
    println!("raw limits of the broker itself, same run:");
    for (tool, figure) in tool_rows {
        match figure {
            Some(f) => println!("  {tool:<52} {:>12.0} records/s", f.records_per_second),
            None => println!("  {tool:<52} {unmeasured}"),
        }
    }
    env.stop().await;
    let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {twin_database}"))
        .execute(&mut admin)
        .await
        .expect("twin dropped");
}
