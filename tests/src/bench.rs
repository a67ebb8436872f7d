//! Pieces the benchmarks share: concurrent writers, the raw-consumer baseline, timing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;

use crate::{place_order, TestEnv};

/// Concurrent command writers.
pub const WRITERS: usize = 16;

/// Events per second.
pub fn rate(events: usize, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

/// Polls `done` every 10 ms; panics after 10 minutes.
pub async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done().await {
        assert!(Instant::now() < deadline, "{what} did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Places `count` orders through the command bus with [`WRITERS`] concurrent writers.
pub async fn appends(env: &TestEnv, count: usize) -> Duration {
    let orders = env.orders();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (orders, next) = (orders.clone(), next.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                place_order(&orders).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}

/// A raw consumer (own group, no decoding, no database) reading `count` records of the orders
/// topic from the beginning, with the projectors' fetch settings (at least 64 KiB per fetch).
pub async fn raw_consumer(env: &TestEnv, count: usize) -> Duration {
    let topic = env.kafka.topics().for_aggregate("order").expect("topic");
    let consumer: StreamConsumer = env
        .kafka
        .client_config()
        .set(
            "group.id",
            format!("{}raw-consumer-{}", env.group_prefix, uuid::Uuid::new_v4()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set(
            "fetch.wait.max.ms",
            env.kafka.kafka_fetch_wait_max_ms.to_string(),
        )
        .set("fetch.min.bytes", "65536")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let started = Instant::now();
    let mut seen = 0;
    let mut bytes = 0usize;
    while seen < count {
        let message = consumer.recv().await.expect("record");
        bytes += message.payload().map_or(0, <[u8]>::len);
        seen += 1;
    }
    assert!(bytes > 0);
    started.elapsed()
}
