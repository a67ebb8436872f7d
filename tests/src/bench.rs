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

/// Figures printed by Kafka's own performance tools, the raw limit of the broker itself.
#[derive(Debug, Clone, Copy)]
pub struct KafkaToolRate {
    pub records_per_second: f64,
}

/// Runs one of Kafka's Java tools (`scripts/bench` exports `KAFKA_CLASSPATH`, the broker's
/// classpath resolved from `deploy/kafka/pom.xml`); `None` when the classpath is not given.
fn kafka_tool(class: &str, args: &[String]) -> Option<String> {
    let classpath = std::env::var("KAFKA_CLASSPATH").ok()?;
    let output = std::process::Command::new("java")
        .args(["-Xms256m", "-Xmx512m", "-cp", &classpath, class])
        .args(args)
        .output()
        .expect("java runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{class} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(stdout)
}

/// `org.apache.kafka.tools.ProducerPerformance`: `count` records of `size` bytes to `topic` as
/// fast as the broker takes them, with the relay's producer settings (idempotent, `acks=all`,
/// `linger.ms=5`, lz4). Its summary line reads `N records sent, R records/sec (...)`.
pub fn kafka_producer_performance(
    env: &TestEnv,
    topic: &str,
    count: usize,
    size: usize,
) -> Option<KafkaToolRate> {
    let args = [
        "--topic",
        topic,
        "--num-records",
        &count.to_string(),
        "--record-size",
        &size.to_string(),
        "--throughput",
        "-1",
        "--producer-props",
        &format!("bootstrap.servers={}", env.kafka.kafka_bootstrap_servers),
        "acks=all",
        "enable.idempotence=true",
        "linger.ms=5",
        "compression.type=lz4",
    ]
    .map(str::to_owned);
    let out = kafka_tool("org.apache.kafka.tools.ProducerPerformance", &args)?;
    let summary = out
        .lines()
        .rfind(|line| line.contains("records sent"))
        .expect("ProducerPerformance prints a summary");
    let rate = summary
        .split(", ")
        .nth(1)
        .and_then(|part| part.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("records/sec in the summary");
    Some(KafkaToolRate {
        records_per_second: rate,
    })
}

/// `org.apache.kafka.tools.ConsumerPerformance`: reads `count` records of `topic` from the
/// beginning in a group of its own. The rate taken is `fetch.nMsg.sec`, which leaves out the
/// group join (a one-off the projectors pay once, not per record).
pub fn kafka_consumer_performance(
    env: &TestEnv,
    topic: &str,
    count: usize,
) -> Option<KafkaToolRate> {
    let args = [
        "--bootstrap-server",
        &env.kafka.kafka_bootstrap_servers,
        "--topic",
        topic,
        "--messages",
        &count.to_string(),
        "--group",
        &format!(
            "{}consumer-performance-{}",
            env.group_prefix,
            uuid::Uuid::new_v4()
        ),
        "--timeout",
        "60000",
    ]
    .map(str::to_owned);
    let out = kafka_tool("org.apache.kafka.tools.ConsumerPerformance", &args)?;
    // A header line names the columns; the line after it holds the figures.
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .by_ref()
        .find(|l| l.contains("nMsg.sec"))
        .expect("ConsumerPerformance prints its header")
        .split(',')
        .map(str::trim)
        .collect();
    let values: Vec<&str> = lines
        .next()
        .expect("ConsumerPerformance prints its figures")
        .split(',')
        .map(str::trim)
        .collect();
    let column = header
        .iter()
        .position(|c| *c == "fetch.nMsg.sec")
        .expect("a fetch.nMsg.sec column");
    Some(KafkaToolRate {
        records_per_second: values[column].parse().expect("a rate"),
    })
}
