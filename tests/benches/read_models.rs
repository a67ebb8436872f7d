//! Throughput and lag of every read model, next to a raw consumer of the same topic measured in
//! the same run:
//!
//! 1. **Under load**: the relay and all five projectors run while 16 writers place orders as
//!    fast as the command side takes them. This shows whether the read models keep pace with
//!    the writers, not what they could take: the rate is the writers'. Per read model: when it
//!    had applied every order, and the end-to-end delay of each event (recorded in the store →
//!    applied to the read model), p50/p99 (and the bucket bound of the slowest), from the
//!    runtime's `projector_event_delay_seconds` histogram.
//! 2. **Capacity on a backlog**: a generated day of `BENCH_DAY_ORDERS` orders (default 6,000;
//!    every event type of the lifecycle, see `backbone_tests::bench::day_of_orders`) is
//!    appended and relayed first; then, per read model, a raw consumer reads every record of
//!    that model's topics (no decoding, no database, the projector's fetch settings), and the
//!    model's projector, started after, applies the same records alone with its own consumer
//!    group. Its rate is taken from its first applied event to its last (the group join before
//!    is shown apart).
//!
//! `scripts/bench` runs it with the test command's services (`--bench read_models`).
//! `BENCH_LOAD_ORDERS` sets the orders of part 1 (default 20 000).

use std::collections::BTreeMap;
use std::time::Instant;

use backbone_tests::bench::{
    appends, applied_events, day_of_orders, events_of, load_average, rate, raw_consumer_of,
    relay_backlog, topics_of, wait_until, WRITERS,
};
use backbone_tests::TestEnv;
use streams::consumer::ProjectorConfig;

/// Order events a read model has applied (one event per order in this benchmark).
async fn applied(env: &TestEnv, schema: &str) -> usize {
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.applied WHERE aggregate_type = 'order'"
    ))
    .fetch_one(env.pool())
    .await
    .unwrap_or(0);
    usize::try_from(n).unwrap_or(0)
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Quantiles of the end-to-end delay per read model, read off the Prometheus histogram
/// (`projector_event_delay_seconds_bucket`) the way Prometheus's `histogram_quantile` does:
/// linear within the bucket that holds the quantile, so a figure is as fine as the buckets
/// (`streams::process::SECONDS_BUCKETS`). "max" is the upper bound of the last bucket that
/// received an event.
fn delay_quantiles(rendered: &str) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in rendered.lines() {
        let Some(rest) = line.strip_prefix("projector_event_delay_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|l| {
                l.strip_prefix(&format!("{name}=\""))
                    .and_then(|v| v.strip_suffix('"'))
            })
        };
        let bound = match label("le") {
            Some("+Inf") => f64::INFINITY,
            Some(le) => le.parse().unwrap_or(f64::NAN),
            None => continue,
        };
        if let (Some(projection), Ok(count)) = (label("projection"), value.trim().parse()) {
            buckets
                .entry(projection.to_owned())
                .or_default()
                .push((bound, count));
        }
    }
    let mut out = BTreeMap::new();
    for (projection, mut cumulative) in buckets {
        cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = cumulative.last().map_or(0.0, |b| b.1);
        let quantile = |q: f64| {
            let rank = q * total;
            let mut lower = (0.0, 0.0);
            for &(bound, count) in &cumulative {
                if count >= rank {
                    if bound.is_infinite() {
                        return lower.0;
                    }
                    let inside = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
                    return lower.0 + (bound - lower.0) * inside;
                }
                lower = (bound, count);
            }
            f64::NAN
        };
        let max = cumulative
            .iter()
            .find(|(_, count)| *count >= total)
            .map_or(f64::NAN, |b| b.0);
        let figures = BTreeMap::from([
            ("0.5".to_owned(), quantile(0.5)),
            ("0.99".to_owned(), quantile(0.99)),
            ("1".to_owned(), max),
        ]);
        out.insert(projection, figures);
    }
    out
}

/// `KAFKA_FETCH_WAIT_MAX_MS`'s default (the tests' `KafkaConfig::local` uses less).
const PRODUCTION_FETCH_WAIT_MS: u32 = 500;

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let load = env_number("BENCH_LOAD_ORDERS", 20_000);
    let day_orders = env_number("BENCH_DAY_ORDERS", 6_000);
    let metrics = api::prometheus();

    // 1. Under load, with the production consumer settings (`KAFKA_FETCH_WAIT_MAX_MS`'s
    // default; a fetch returns as soon as a record is there).
    let load_at_start = load_average();
    let mut env = TestEnv::start("rmload").await;
    env.kafka.kafka_fetch_wait_max_ms = PRODUCTION_FETCH_WAIT_MS;
    let relay = env.start_relay().await;
    let mut running = Vec::new();
    for projection in projections::read_models::all() {
        running.push((projection.name(), env.start_projector(projection).await));
    }
    let started = Instant::now();
    let writing = appends(&env, load).await;
    let mut caught_up = BTreeMap::new();
    wait_until("every read model", async || {
        for (name, _) in &running {
            if !caught_up.contains_key(name) && applied(&env, name).await >= load {
                caught_up.insert(*name, started.elapsed());
            }
        }
        caught_up.len() == running.len()
    })
    .await;
    let quantiles = delay_quantiles(&metrics.render());
    for (_, projector) in running {
        projector.stop().await.expect("projector stops");
    }
    relay.stop().await.expect("relay stops");
    println!(
        "\nread models under load: {load} orders placed by {WRITERS} writers at {:.0} orders/s \
         (relay and the five projectors running in the same process); load average \
         {load_at_start} at the start, {} at the end",
        rate(load, writing),
        load_average()
    );
    println!("(the writers set the pace here: a read model's capacity is part 2's figure)");
    println!(
        "{:<14} {:>17} {:>10} {:>10} {:>10}",
        "read model", "all applied after", "delay p50", "p99", "max ≤"
    );
    for (name, elapsed) in &caught_up {
        let q = quantiles.get(*name).cloned().unwrap_or_default();
        let at = |k: &str| q.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "{name:<14} {:>16.1}s {:>9.3}s {:>9.3}s {:>9.3}s",
            elapsed.as_secs_f64(),
            at("0.5"),
            at("0.99"),
            at("1"),
        );
    }
    env.stop().await;

    // 2. Capacity on a backlog: a day of orders on the topics before any projector starts.
    let load_at_start = load_average();
    let mut env = TestEnv::start("rmbacklog").await;
    env.kafka.kafka_fetch_wait_max_ms = PRODUCTION_FETCH_WAIT_MS;
    let day = day_of_orders(&env.store, day_orders).await;
    let relayed = relay_backlog(&env).await;
    let mut rows = Vec::new();
    for projection in projections::read_models::all() {
        let name = projection.name();
        let types = projection.aggregate_types();
        let topics = topics_of(&env, types);
        let count = events_of(env.pool(), types).await;
        let mut config = env.kafka.client_config();
        config
            .set(
                "group.id",
                format!("{}raw-{name}-{}", env.group_prefix, uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("fetch.min.bytes", "1")
            .set(
                "fetch.wait.max.ms",
                env.kafka.kafka_fetch_wait_max_ms.to_string(),
            );
        let raw = raw_consumer_of(&env, config, &topics, count).await;
        let projector = streams::consumer::Projector::new(
            projection,
            env.pool().clone(),
            &env.kafka,
            &env.registry,
            ProjectorConfig {
                projector_group_prefix: env.group_prefix.clone(),
                ..ProjectorConfig::default()
            },
        )
        .await
        .expect("projector");
        let token = tokio_util::sync::CancellationToken::new();
        let started = Instant::now();
        let handle = tokio::spawn(projector.run_until_stopped(token.clone()));
        let mut first: Option<(std::time::Duration, usize)> = None;
        wait_until(name, async || {
            let applied = applied_events(env.pool(), name).await;
            if first.is_none() && applied > 0 {
                first = Some((started.elapsed(), applied));
            }
            applied >= count
        })
        .await;
        let elapsed = started.elapsed();
        token.cancel();
        handle.await.expect("joined").expect("projector ran");
        let dead: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {name}.dead_letters"))
            .fetch_one(env.pool())
            .await
            .expect("dead letters");
        assert_eq!(dead, 0, "{name} dead-lettered events of a valid day");
        let (until_first, at_first) = first.unwrap_or_default();
        let capacity = rate(count - at_first, elapsed.saturating_sub(until_first));
        rows.push((
            name,
            types,
            count,
            raw.steady_rate(count),
            until_first,
            elapsed,
            capacity,
        ));
    }
    print!("\n{}", day.describe());
    println!(
        "capacity on a backlog: the day above relayed at {:.0} events/s, then per read model a \
         raw consumer of its topics and its projector started after, one at a time; load \
         average {load_at_start} at the start, {} at the end",
        rate(day.events, relayed),
        load_average()
    );
    println!(
        "{:<14} {:<24} {:>8} {:>14} {:>11} {:>7} {:>14} {:>12}",
        "read model",
        "topics",
        "events",
        "raw consumer/s",
        "projector/s",
        "of raw",
        "first applied",
        "all applied"
    );
    for (name, types, count, raw, until_first, elapsed, capacity) in rows {
        println!(
            "{name:<14} {:<24} {count:>8} {raw:>14.0} {capacity:>11.0} {:>6.1}% {:>13.1}s {:>11.1}s",
            types.join("+"),
            100.0 * capacity / raw,
            until_first.as_secs_f64(),
            elapsed.as_secs_f64(),
        );
    }
    println!(
        "both rates run from the first record (raw consumer) or the first applied event \
         (projector) to the last, leaving out the assignment or group join and the first fetch; \
         \"first applied\" and \"all applied\" count from the projector's start"
    );
    env.stop().await;
}
