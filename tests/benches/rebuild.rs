//! Rebuild throughput: a read model rebuilt by `replay-tools rebuild` (the library the CLI runs)
//! from its topics and then from the event store, over a generated day of orders, next to a raw
//! consumer of the same topics with the rebuild's consumer settings in the same run (no
//! decoding, no database; run before and after the rebuilds, the faster is the baseline).
//!
//! The day: `BENCH_DAY_ORDERS` orders (default 6,000) generated through the command bus by
//! `backbone_tests::bench::day_of_orders`: 60 stores in six regions, placed over the 24 hours
//! of yesterday with lunch and dinner peaks, paid, accepted, prepared, delivered with the
//! courier's positions, completed and rewarded, some cancelled, rejected, failed, refunded and
//! rated: every event the domain decided, published by the relay. From the rate, the time to
//! replay a day of a million such orders.
//!
//! `scripts/bench --bench rebuild`; `BENCH_REBUILD_MODEL` picks the read models, comma-separated
//! (default `analytics,tracking`: analytics is the model analysts replay most, per order event
//! its fact row, its lines and the hourly rollup, over the order and rewards topics; tracking
//! reads the order and delivery topics, the courier positions among them);
//! `BENCH_REBUILD_BATCH` sets the events per rebuild transaction (default: the CLI's),
//! `BENCH_REBUILD_APPLIERS` the transactions side by side (default: the CLI's).

use std::time::{Duration, Instant};

use backbone_tests::bench::{
    applied_events, day_of_orders, events_of, load_average, rate, raw_consumer_of, relay_backlog,
    topics_of,
};
use backbone_tests::TestEnv;
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

/// A raw consumer of `topics` (no decoding, no database) with the rebuild's consumer settings,
/// every partition assigned from the beginning, reading `count` records.
async fn raw_consumer(env: &TestEnv, topics: &[String], count: usize) -> Duration {
    let config = bulk_consumer_config(
        &env.kafka,
        &format!("{}raw-{}", env.group_prefix, uuid::Uuid::new_v4()),
    );
    raw_consumer_of(env, config, topics, count).await.total
}

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let day_orders = env_number("BENCH_DAY_ORDERS", 6_000);
    let models =
        std::env::var("BENCH_REBUILD_MODEL").unwrap_or_else(|_| "analytics,tracking".to_owned());
    let batch_size = env_number("BENCH_REBUILD_BATCH", DEFAULT_BATCH_SIZE as usize);
    let appliers = env_number("BENCH_REBUILD_APPLIERS", DEFAULT_APPLIERS as usize);
    let load_at_start = load_average();
    let env = TestEnv::start("rbbench").await;

    let day = day_of_orders(&env.store, day_orders).await;
    let relayed = relay_backlog(&env).await;
    print!("\n{}", day.describe());
    println!(
        "relayed at {:.0} events/s; load average {load_at_start} at the start",
        rate(day.events, relayed)
    );
    let connections = Connections {
        kafka: env.kafka.clone(),
        registry: env.registry.clone(),
        group_prefix: env.group_prefix.clone(),
        max_attempts: 3,
    };
    for model in models.split(',').map(str::trim) {
        let types = projections::read_models::by_name(model)
            .expect("a read model")
            .aggregate_types();
        let topics = topics_of(&env, types);
        let events = events_of(env.pool(), types).await;
        let load_before = load_average();
        // The raw consumer runs before the rebuilds and again after them; the faster of the
        // two is the baseline (on a shared machine the rate drifts within a run).
        let raw_before = raw_consumer(&env, &topics, events).await;
        let mut timings = Vec::new();
        for source in [Source::Topics, Source::Store] {
            let args = RebuildArgs {
                read_model: model.to_owned(),
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
            let applied = applied_events(env.pool(), &format!("{model}__rebuild")).await;
            assert_eq!(applied, events, "{}", String::from_utf8_lossy(&report));
            timings.push((
                source,
                elapsed,
                String::from_utf8_lossy(&report).into_owned(),
            ));
        }
        let raw_after = raw_consumer(&env, &topics, events).await;
        let raw = raw_before.min(raw_after);

        println!(
            "\nrebuild of {model} over the day's {events} events on its topics ({}); load \
             average {load_before} before, {} after",
            types.join(", "),
            load_average()
        );
        println!("{:<34} {:>10} {:>16}", "", "events/s", "of raw consumer");
        println!(
            "{:<34} {:>10.0} {:>15.0}%   (before the rebuilds {:.0}/s, after {:.0}/s)",
            "raw consumer of the same topics",
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
                "{what:<34} {:>10.0} {:>15.1}%   ({:.1} s)",
                rate(events, *elapsed),
                100.0 * raw.as_secs_f64() / elapsed.as_secs_f64(),
                elapsed.as_secs_f64()
            );
        }
        if let Some((_, topics, _)) = timings.first() {
            let per_order = events as f64 / day.orders as f64;
            println!(
                "a day of 1,000,000 such orders ({per_order:.1} events each on these topics) \
                 from the topics at this rate: {:.1} min",
                1e6 * per_order / rate(events, *topics) / 60.0
            );
        }
        // Where each rebuild's time went (the rebuild's own report).
        for (_, _, report) in &timings {
            print!("{report}");
        }
    }
    env.stop().await;
}
