//! Rebuild throughput: one read model rebuilt by `replay-tools rebuild` (the library the CLI
//! runs) from `BENCH_REBUILD_EVENTS` order events on its topics (default 1,000,000), next to a
//! raw consumer of the same topic with the same consumer settings in the same run (no decoding,
//! no database; run before and after the rebuilds, the faster is the baseline); then the same
//! rebuild from the event store. From the rate, the time to replay
//! a day of 1,000,000 orders.
//!
//! The events: `BENCH_REBUILD_SEED` orders (default 2,000) placed through the command bus, then
//! their `OrderPlaced` events copied in SQL under new order and customer ids up to the count
//! (the outbox trigger records each copy), published by the relay.
//!
//! `scripts/bench --bench rebuild`; `BENCH_REBUILD_BATCH` sets the events per rebuild
//! transaction (default: the CLI's), `BENCH_REBUILD_APPLIERS` the transactions side by side
//! (default: the CLI's); `BENCH_REBUILD_MODEL` picks the read model (default
//! `analytics`, the model analysts replay most: per order event its fact row, its lines and the
//! hourly rollup; at 20,000 events, `tracking`, `analytics` and `ads` rebuilt within 10% of
//! each other).

use std::time::{Duration, Instant};

use backbone_tests::bench::{appends, rate, wait_until};
use backbone_tests::TestEnv;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use replay_tools::rebuild::{
    bulk_consumer_config, rebuild, Connections, RebuildArgs, Source, DEFAULT_APPLIERS,
    DEFAULT_BATCH_SIZE,
};
use tokio_util::sync::CancellationToken;

// The allocator of the `replay-tools` binary, so that the rebuild runs as it does there.
#[global_allocator]
static ALLOCATOR: replay_tools::Allocator = replay_tools::Allocator;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A raw consumer of the orders topic (no decoding, no database) with the rebuild's consumer
/// settings, every partition assigned from the beginning, reading `count` records.
async fn raw_consumer(env: &TestEnv, count: usize) -> Duration {
    let topic = env.kafka.topics().for_aggregate("order").expect("topic");
    let consumer: StreamConsumer = bulk_consumer_config(
        &env.kafka,
        &format!("{}raw-{}", env.group_prefix, uuid::Uuid::new_v4()),
    )
    .create()
    .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..env.kafka.kafka_partitions {
        assignment
            .add_partition_offset(&topic, partition, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let started = Instant::now();
    let (mut seen, mut bytes) = (0, 0usize);
    while seen < count {
        let message = consumer.recv().await.expect("record");
        bytes += message.payload().map_or(0, <[u8]>::len);
        seen += 1;
    }
    assert!(bytes > 0);
    started.elapsed()
}

/// Order events of a completed order on the analytics topics (placed, confirmed, accepted,
/// preparation started, ready, out for delivery, delivered, completed) and its points earned.
const EVENTS_PER_COMPLETED_ORDER: f64 = 9.0;

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let events = env_number("BENCH_REBUILD_EVENTS", 1_000_000);
    let seed = env_number("BENCH_REBUILD_SEED", 2_000).min(events).max(1);
    let model = std::env::var("BENCH_REBUILD_MODEL").unwrap_or_else(|_| "analytics".to_owned());
    let batch_size = env_number("BENCH_REBUILD_BATCH", DEFAULT_BATCH_SIZE as usize);
    let appliers = env_number("BENCH_REBUILD_APPLIERS", DEFAULT_APPLIERS as usize);
    let env = TestEnv::start("rbbench").await;

    let started = Instant::now();
    appends(&env, seed).await;
    let mut copied = seed;
    while copied < events {
        let chunk = (events - copied).min(50_000).min(copied);
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
               event_version, payload, metadata) \
             SELECT 'order', gen_random_uuid()::text, 1, e.event_type, e.event_version, \
                    jsonb_set(e.payload::jsonb, '{OrderPlaced,customer_id}', \
                              to_jsonb(gen_random_uuid()::text))::json, \
                    e.metadata \
             FROM events e WHERE e.aggregate_type = 'order' AND e.sequence = 1 \
             LIMIT $1",
        )
        .bind(i64::try_from(chunk).unwrap_or(i64::MAX))
        .execute(env.pool())
        .await
        .expect("events copied");
        copied += chunk;
    }
    let written = started.elapsed();
    let relay = env.start_relay().await;
    let started = Instant::now();
    wait_until("the relay", async || {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(env.pool())
                .await
                .expect("outbox");
        left == 0
    })
    .await;
    let relayed = started.elapsed();
    relay.stop().await.expect("relay stops");

    // The raw consumer runs before the rebuilds and again after them; the faster of the two is
    // the baseline (on a shared machine the rate drifts within a run).
    let raw_before = raw_consumer(&env, events).await;
    let connections = Connections {
        kafka: env.kafka.clone(),
        registry: env.registry.clone(),
        group_prefix: env.group_prefix.clone(),
        max_attempts: 3,
    };
    let mut timings = Vec::new();
    for source in [Source::Topics, Source::Store] {
        let args = RebuildArgs {
            read_model: model.clone(),
            source: Some(source),
            as_of: None,
            resume: false,
            restart: true,
            swap: false,
            batch_size: u32::try_from(batch_size).unwrap_or(DEFAULT_BATCH_SIZE),
            appliers: u32::try_from(appliers).unwrap_or(DEFAULT_APPLIERS),
        };
        let mut report = Vec::new();
        let started = Instant::now();
        rebuild(
            env.pool(),
            &connections,
            args,
            CancellationToken::new(),
            &mut report,
        )
        .await
        .expect("rebuild");
        let elapsed = started.elapsed();
        let applied: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {model}__rebuild.applied WHERE aggregate_type = 'order'"
        ))
        .fetch_one(env.pool())
        .await
        .expect("applied");
        assert_eq!(
            usize::try_from(applied).unwrap_or(0),
            events,
            "{}",
            String::from_utf8_lossy(&report)
        );
        timings.push((
            source,
            elapsed,
            String::from_utf8_lossy(&report).into_owned(),
        ));
    }

    let raw_after = raw_consumer(&env, events).await;
    let raw = raw_before.min(raw_after);

    println!(
        "\nrebuild of {model} over {events} order events ({seed} orders placed, the rest copied \
         in SQL in {:.0} s; relayed at {:.0} events/s)",
        written.as_secs_f64(),
        rate(events, relayed)
    );
    println!("{:<34} {:>10} {:>16}", "", "events/s", "of raw consumer");
    println!(
        "{:<34} {:>10.0} {:>15.0}%   (before the rebuilds {:.0}/s, after {:.0}/s)",
        "raw consumer of the same topic",
        rate(events, raw),
        100.0,
        rate(events, raw_before),
        rate(events, raw_after)
    );
    for (source, elapsed, _) in &timings {
        let what = match source {
            Source::Topics => "rebuild from the topics",
            Source::Store => "rebuild from the event store",
        };
        println!(
            "{what:<34} {:>10.0} {:>15.1}%",
            rate(events, *elapsed),
            100.0 * raw.as_secs_f64() / elapsed.as_secs_f64()
        );
    }
    if let Some((_, topics, _)) = timings.first() {
        let per_second = rate(events, *topics);
        println!(
            "a day of 1,000,000 orders from the topics: {:.1} min at one event per order, {:.1} \
             min at {EVENTS_PER_COMPLETED_ORDER} events per completed order",
            1e6 / per_second / 60.0,
            1e6 * EVENTS_PER_COMPLETED_ORDER / per_second / 60.0
        );
    }
    // Where each rebuild's time went (the rebuild's own report).
    for (_, _, report) in &timings {
        print!("{report}");
    }
    env.stop().await;
}
