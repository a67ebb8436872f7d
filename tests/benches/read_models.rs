//! Throughput and lag of every read model, next to a raw consumer of the same topic measured in
//! the same run:
//!
//! 1. **Under load**: the relay and all five projectors run while 16 writers place orders as
//!    fast as the command side takes them. Per read model: events/s applied over the run, and
//!    the end-to-end delay of each event (recorded in the store → applied to the read model),
//!    p50/p99 (and the bucket bound of the slowest), from the runtime's
//!    `projector_event_delay_seconds` histogram.
//! 2. **Catch-up**: a backlog of `BENCH_BACKLOG` events (default 100 000) on the orders topic;
//!    a raw consumer reads it (no decoding, no database), then each read model rebuilds from
//!    it alone, with its own consumer group.
//!
//! `scripts/bench` runs it with the test command's services (`--bench read_models`).
//! `BENCH_LOAD_ORDERS` sets the orders of part 1 (default 20 000).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use backbone_tests::bench::{appends, rate, raw_consumer, wait_until, WRITERS};
use backbone_tests::TestEnv;
use projections::{
    AdsProjection, AnalyticsProjection, NotificationsProjection, RatingsProjection,
    TrackingProjection,
};
use streams::consumer::{Projection, ProjectorConfig};

fn read_models() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(TrackingProjection),
        Arc::new(RatingsProjection),
        Arc::new(AnalyticsProjection),
        Arc::new(AdsProjection),
        Arc::new(NotificationsProjection),
    ]
}

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
    let backlog = env_number("BENCH_BACKLOG", 100_000);
    let metrics = api::prometheus();

    // 1. Under load, with the production consumer settings (`KAFKA_FETCH_WAIT_MAX_MS`'s
    // default; a fetch returns as soon as a record is there).
    let mut env = TestEnv::start("rmload").await;
    env.kafka.kafka_fetch_wait_max_ms = PRODUCTION_FETCH_WAIT_MS;
    let relay = env.start_relay().await;
    let mut running = Vec::new();
    for projection in read_models() {
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
         (relay and the five projectors running in the same process)",
        rate(load, writing)
    );
    println!(
        "{:<14} {:>10} {:>14} {:>10} {:>10} {:>10}",
        "read model", "events/s", "done after s", "delay p50", "p99", "max ≤"
    );
    for (name, elapsed) in &caught_up {
        let q = quantiles.get(*name).cloned().unwrap_or_default();
        let at = |k: &str| q.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "{name:<14} {:>10.0} {:>14.1} {:>9.3}s {:>9.3}s {:>9.3}s",
            rate(load, *elapsed),
            elapsed.as_secs_f64(),
            at("0.5"),
            at("0.99"),
            at("1"),
        );
    }
    env.stop().await;

    // 2. Catch-up on a backlog.
    let mut env = TestEnv::start("rmbacklog").await;
    env.kafka.kafka_fetch_wait_max_ms = PRODUCTION_FETCH_WAIT_MS;
    let writing = appends(&env, backlog).await;
    let relay = env.start_relay().await;
    wait_until("the relay", async || {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(env.pool())
                .await
                .expect("outbox");
        left == 0
    })
    .await;
    relay.stop().await.expect("relay stops");
    let raw = raw_consumer(&env, backlog).await;
    println!(
        "\ncatch-up on a backlog of {backlog} order events (written at {:.0}/s); raw consumer \
         {:.0} events/s",
        rate(backlog, writing),
        rate(backlog, raw)
    );
    println!(
        "{:<14} {:>10} {:>14}",
        "read model", "events/s", "of raw consumer"
    );
    for projection in read_models() {
        let name = projection.name();
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
        wait_until(name, async || applied(&env, name).await >= backlog).await;
        let elapsed = started.elapsed();
        token.cancel();
        handle.await.expect("joined").expect("projector ran");
        println!(
            "{name:<14} {:>10.0} {:>13.0}%",
            rate(backlog, elapsed),
            100.0 * raw.as_secs_f64() / elapsed.as_secs_f64()
        );
    }
    env.stop().await;
}
