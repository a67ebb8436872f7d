//! The relay against Debezium: the same committed events, published to the same broker in the
//! same run by the outbox relay and by Debezium's PostgreSQL connector with its outbox event
//! router (3.6.1.Final, in Kafka Connect standalone 4.1.1 — the broker's version).
//!
//! - **relay**: reads the unpublished `outbox` rows with SQL; publishes Avro in the Confluent wire
//!   format, with the metadata and the hash chain as headers.
//! - **Debezium**: reads the `events` rows from the WAL (pgoutput, a replication slot per run);
//!   publishes the JSON payload as a string, with `id`, `sequence` and `event_type` headers (and
//!   Debezium's own `__debezium.context.*`).
//!
//! What each guarantees:
//! - **Order per aggregate**: both. The key is the aggregate id, as the same bytes, so both
//!   producers' murmur2 partitioners put an aggregate on one partition; the relay sends batches
//!   strictly in order with an idempotent producer, Connect's producer has one request in flight.
//! - **Duplicates after a crash**: both publish at least once. The relay publishes again the rows
//!   the broker acknowledged but it had not yet marked published (at most one batch). Debezium
//!   resumes from the last offset Connect flushed, so it publishes again up to
//!   `offset.flush.interval.ms` (60 s by default) of events. Consumers deduplicate by event id
//!   or (aggregate, sequence) either way.
//!
//! Procedure: (a) Debezium starts first, so that its slot exists before any event, publishes one
//! warm-up event (with which Connect creates its topic) and stops; the slot keeps the WAL.
//! (b) `BENCH_ORDERS` orders (default 10 000) are appended with neither publisher running.
//! (c) The relay drains that backlog; (d) Debezium, started again, streams the same events from
//! its slot. Each is measured by a consumer of its topic: events/s between the
//! first and the last arrival, and the time from the start of the publisher to the last arrival
//! (for Debezium that includes the JVM and Connect starting). (e) Writers append at a fixed rate
//! (`BENCH_LATENCY_RATE` orders/s, default 200, for `BENCH_LATENCY_SECONDS`, default 20) with
//! only Debezium running, then with only the relay running; latency is each record's arrival at
//! the consumer minus its outbox row's `created_at` (the clock at insert, inside the committing
//! transaction).
//!
//! `cargo bench -p backbone-tests --bench relay_peer` with the test command's PostgreSQL
//! (`wal_level=logical`) and broker (`KAFKA_BOOTSTRAP_SERVERS`); needs Java 17+, Maven, curl, jq
//! and psql, which `scripts/debezium.sh` uses. Connect's logs are in `.run/logs/debezium-*`.
//! Debezium is stopped and its replication slot dropped at the end, also on a panic or Ctrl-C.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone_tests::bench::{appends, load_average, wait_until};
use backbone_tests::{place_order, TestEnv};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The header each publisher puts the event id in: the relay's own (`streams::headers`), and the
/// one Debezium's event router names after `table.field.event.id`'s role.
const RELAY_ID_HEADER: &str = streams::headers::EVENT_ID;
const DEBEZIUM_ID_HEADER: &str = "id";

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Debezium's Connect worker for one replication slot, through `scripts/debezium.sh` (the same
/// functions an operator would use). Dropping it stops the worker and drops the slot: a slot left
/// behind would retain WAL forever.
#[derive(Debug)]
struct Debezium {
    root: PathBuf,
    database: String,
    prefix: String,
    bootstrap: String,
    slot: String,
}

impl Debezium {
    /// `bash -c` with the project's script functions loaded, from the workspace root; `args` are
    /// `$1`, `$2`, ... so nothing is quoted into the script.
    fn script(&self, body: &str, args: &[&str]) -> Command {
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(format!(
                "source scripts/lib.sh && source scripts/debezium.sh && {body}"
            ))
            .arg("relay_peer")
            .args(args)
            .current_dir(&self.root);
        command
    }

    /// Starts the worker and returns once the connector and its task run (a blocking call: the
    /// JVM takes seconds to start, so it runs off the runtime's threads).
    async fn start(&self) {
        let mut command = self.script(
            r#"start_debezium "$1" "$2" "$3" "$4""#,
            &[&self.database, &self.prefix, &self.bootstrap, &self.slot],
        );
        let status = tokio::task::spawn_blocking(move || command.status())
            .await
            .expect("not cancelled")
            .expect("bash runs");
        assert!(
            status.success(),
            "Debezium did not start (see .run/logs/debezium-{}.log)",
            self.slot
        );
    }

    async fn stop(&self) {
        let mut command = self.script(r#"stop_debezium "$1""#, &[&self.slot]);
        let status = tokio::task::spawn_blocking(move || command.status())
            .await
            .expect("not cancelled")
            .expect("bash runs");
        assert!(status.success(), "Debezium did not stop");
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        // Synchronous on purpose: this also runs while a panic unwinds, when nothing async can
        // be awaited any more.
        let result = self
            .script(
                r#"stop_debezium "$1" && drop_debezium_slot "$1" "$2""#,
                &[&self.slot, &self.database],
            )
            .status();
        if !matches!(result, Ok(status) if status.success()) {
            eprintln!(
                "could not stop Debezium or drop replication slot {} ({result:?}): drop it with \
                 SELECT pg_drop_replication_slot('{}')",
                self.slot, self.slot
            );
        }
    }
}

/// What a consumer of one publisher's topic saw: when each event id first arrived.
#[derive(Debug, Default)]
struct Seen {
    arrivals: HashMap<Uuid, DateTime<Utc>>,
    /// The ids being waited for, and how many of them have arrived (kept as records arrive, so
    /// that waiting costs nothing while the publishers are measured).
    wanted: HashSet<Uuid>,
    wanted_seen: usize,
    records: usize,
    value_bytes: usize,
    headers: usize,
}

/// A consumer of every partition of a topic from its beginning, recording arrivals.
#[derive(Debug)]
struct Collector {
    seen: Arc<Mutex<Seen>>,
    token: CancellationToken,
    handle: JoinHandle<()>,
}

impl Collector {
    /// Starts once `topic` exists (Debezium's appears with its first record).
    async fn start(env: &TestEnv, topic: &str, id_header: &'static str) -> Self {
        let consumer: StreamConsumer = env
            .kafka
            .client_config()
            .set(
                "group.id",
                format!("{}relay-peer-{}", env.group_prefix, Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            // Latency is measured at the consumer: it must not sit on an empty fetch.
            .set("fetch.wait.max.ms", "5")
            .create()
            .expect("consumer");
        let partitions = {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let metadata = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .expect("metadata");
                let count = metadata
                    .topics()
                    .first()
                    .map_or(0, |t| t.partitions().len());
                if count > 0 {
                    break count;
                }
                assert!(Instant::now() < deadline, "topic {topic} did not appear");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment
                .add_partition_offset(
                    topic,
                    i32::try_from(partition).expect("partitions"),
                    Offset::Beginning,
                )
                .expect("partition");
        }
        consumer.assign(&assignment).expect("assign");

        let seen = Arc::new(Mutex::new(Seen::default()));
        let token = CancellationToken::new();
        let (task_seen, stop) = (seen.clone(), token.clone());
        let topic = topic.to_owned();
        let handle = tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = consumer.recv() => message,
                };
                // The clock first: the time of arrival is the measurement.
                let now = Utc::now();
                let message = message.unwrap_or_else(|e| panic!("reading {topic}: {e}"));
                let id = message
                    .headers()
                    .and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == id_header)
                            .and_then(|h| h.value)
                    })
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| Uuid::parse_str(v).ok())
                    .unwrap_or_else(|| panic!("a record of {topic} has no `{id_header}` header"));
                let mut guard = task_seen.lock().expect("not poisoned");
                let seen = &mut *guard;
                seen.records += 1;
                seen.value_bytes += message.payload().map_or(0, <[u8]>::len);
                seen.headers += message.headers().map_or(0, |h| h.count());
                // The first arrival counts: a publisher may send an event again (Debezium the
                // warm-up event it resumes after).
                if let Entry::Vacant(slot) = seen.arrivals.entry(id) {
                    slot.insert(now);
                    if seen.wanted.contains(&id) {
                        seen.wanted_seen += 1;
                    }
                }
            }
        });
        Self {
            seen,
            token,
            handle,
        }
    }

    /// Waits until every one of `ids` has arrived; returns their arrival times, in `ids`' order.
    async fn wait_for(&self, what: &str, ids: &[Uuid]) -> Vec<DateTime<Utc>> {
        {
            let mut seen = self.seen.lock().expect("not poisoned");
            seen.wanted = ids.iter().copied().collect();
            let already = seen
                .wanted
                .iter()
                .filter(|id| seen.arrivals.contains_key(id))
                .count();
            seen.wanted_seen = already;
        }
        wait_until(what, async || {
            assert!(!self.handle.is_finished(), "the consumer of {what} stopped");
            let seen = self.seen.lock().expect("not poisoned");
            seen.wanted_seen == seen.wanted.len()
        })
        .await;
        let seen = self.seen.lock().expect("not poisoned");
        ids.iter().map(|id| seen.arrivals[id]).collect()
    }

    /// Average value size and header count of the records seen.
    fn format(&self) -> (usize, usize) {
        let seen = self.seen.lock().expect("not poisoned");
        let records = seen.records.max(1);
        (seen.value_bytes / records, seen.headers / records)
    }

    async fn stop(self) {
        self.token.cancel();
        let _ = self.handle.await;
    }
}

/// The outbox rows after id `after`, in id order: (id, event id, created_at).
async fn outbox_after(env: &TestEnv, after: i64) -> Vec<(i64, Uuid, DateTime<Utc>)> {
    sqlx::query_as("SELECT id, event_id, created_at FROM outbox WHERE id > $1 ORDER BY id")
        .bind(after)
        .fetch_all(env.pool())
        .await
        .expect("outbox")
}

async fn last_outbox_id(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM outbox")
        .fetch_one(env.pool())
        .await
        .expect("outbox")
}

/// Drain figures from the arrivals of a backlog: events/s between the first and the last
/// arrival, and seconds from `started` to the last.
fn drain(arrivals: &[DateTime<Utc>], started: DateTime<Utc>) -> (f64, f64) {
    let first = arrivals.iter().min().expect("a backlog");
    let last = arrivals.iter().max().expect("a backlog");
    let span = (*last - *first).as_seconds_f64();
    let rate = (arrivals.len() - 1) as f64 / span;
    (rate, (*last - started).as_seconds_f64())
}

/// Orders at a fixed rate for a fixed time, each from its own task so that a slow append does not
/// hold back the next; returns the rate achieved.
async fn paced_appends(env: &TestEnv, per_second: u32, seconds: u32) -> f64 {
    let orders = env.orders();
    let total = per_second * seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_second)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..total {
        ticker.tick().await;
        let orders = orders.clone();
        tasks.spawn(async move {
            place_order(&orders).await;
        });
        while let Some(done) = tasks.try_join_next() {
            done.expect("writer");
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("writer");
    }
    f64::from(total) / started.elapsed().as_secs_f64()
}

/// Latency in milliseconds of each record: arrival minus the outbox row's `created_at`.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
    rate: f64,
}

async fn latency_phase(
    env: &TestEnv,
    collector: &Collector,
    what: &str,
    per_second: u32,
    seconds: u32,
) -> Latency {
    let mark = last_outbox_id(env).await;
    let rate = paced_appends(env, per_second, seconds).await;
    let rows = outbox_after(env, mark).await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
    let arrivals = collector.wait_for(what, &ids).await;
    let mut millis: Vec<f64> = rows
        .iter()
        .zip(&arrivals)
        .map(|((_, _, created), arrived)| (*arrived - *created).as_seconds_f64() * 1000.0)
        .collect();
    millis.sort_by(f64::total_cmp);
    // Nearest rank.
    let at =
        |q: f64| millis[((q * millis.len() as f64).ceil() as usize).clamp(1, millis.len()) - 1];
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
        rate,
    }
}

async fn slot_active(env: &TestEnv, slot: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
        .bind(slot)
        .fetch_optional(env.pool())
        .await
        .expect("slots")
        .unwrap_or(false)
}

// A benchmark reports on stdout.
#[allow(clippy::print_stdout)]
async fn run(env: &TestEnv) {
    let load_at_start = load_average();
    let count: usize = env_number("BENCH_ORDERS", 10_000);
    let latency_rate: u32 = env_number("BENCH_LATENCY_RATE", 200);
    let latency_seconds: u32 = env_number("BENCH_LATENCY_SECONDS", 20);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned();
    let database = backbone_tests::database_of(&env.database_url);
    let debezium = Debezium {
        root,
        slot: format!("dbz_{database}"),
        database,
        prefix: env.kafka.kafka_topic_prefix.clone(),
        bootstrap: env.kafka.kafka_bootstrap_servers.clone(),
    };
    let relay_topic = env.kafka.topics().for_aggregate("order").expect("topic");
    let debezium_topic = format!("{}debezium.order", env.kafka.kafka_topic_prefix);

    // (a) The slot first, then one event through Debezium: Connect creates the topic with it,
    // so that the consumer is on every partition before the backlog's first record (as it is on
    // the relay's topic, which the project creates), and the whole path has run once. Stopped,
    // the connector resumes from that event's offset (with none, from the slot's confirmed
    // position: the slot's WAL is what (d) reads either way).
    debezium.start().await;
    wait_until("the slot streams", async || {
        slot_active(env, &debezium.slot).await
    })
    .await;
    let mark = last_outbox_id(env).await;
    place_order(&env.orders()).await;
    let warm_up: Vec<Uuid> = outbox_after(env, mark).await.iter().map(|r| r.1).collect();
    let debezium_seen = Collector::start(env, &debezium_topic, DEBEZIUM_ID_HEADER).await;
    debezium_seen.wait_for("Debezium's warm-up", &warm_up).await;
    debezium.stop().await;

    // (b) The backlog, with neither publisher running.
    let mark = last_outbox_id(env).await;
    let append = appends(env, count).await;
    let backlog: Vec<Uuid> = outbox_after(env, mark).await.iter().map(|r| r.1).collect();
    let events = backlog.len();

    // (c) The relay drains it.
    let relay_seen = Collector::start(env, &relay_topic, RELAY_ID_HEADER).await;
    let started = Utc::now();
    let relay = env.start_relay().await;
    let arrivals = relay_seen.wait_for("the relay's backlog", &backlog).await;
    let relay_drain = drain(&arrivals, started);
    relay.stop().await.expect("relay stops");

    // (d) Debezium streams the same events from its slot.
    let started = Utc::now();
    debezium.start().await;
    let debezium_running = (Utc::now() - started).as_seconds_f64();
    let arrivals = debezium_seen.wait_for("Debezium's backlog", &backlog).await;
    let debezium_drain = drain(&arrivals, started);

    // (e) Latency at a steady rate, each publisher alone: Debezium (already running and caught
    // up), then the relay, which first publishes what Debezium's phase appended.
    let debezium_latency = latency_phase(
        env,
        &debezium_seen,
        "Debezium's latency phase",
        latency_rate,
        latency_seconds,
    )
    .await;
    debezium.stop().await;
    let relay = env.start_relay().await;
    wait_until("the relay catches up", async || {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(env.pool())
                .await
                .expect("outbox");
        left == 0
    })
    .await;
    let relay_latency = latency_phase(
        env,
        &relay_seen,
        "the relay's latency phase",
        latency_rate,
        latency_seconds,
    )
    .await;
    relay.stop().await.expect("relay stops");

    let (relay_bytes, relay_headers) = relay_seen.format();
    let (debezium_bytes, debezium_headers) = debezium_seen.format();
    relay_seen.stop().await;
    debezium_seen.stop().await;

    println!(
        "\nrelay vs Debezium: backlog of {events} events ({count} orders appended in {:.1} s), \
         then {latency_rate} orders/s for {latency_seconds} s each; load average \
         {load_at_start} at the start, {} at the end",
        append.as_secs_f64(),
        load_average()
    );
    println!(
        "{:<10} {:>10} {:>12} {:>9} {:>9} {:>9} {:>10}   record",
        "publisher", "events/s", "start→drain", "p50 ms", "p99 ms", "max ms", "writers/s"
    );
    let rows = [
        (
            "relay",
            relay_drain,
            relay_latency,
            format!(
                "Avro (Confluent wire format), {relay_bytes} B; {relay_headers} headers: \
                 metadata + hash chain"
            ),
        ),
        (
            "Debezium",
            debezium_drain,
            debezium_latency,
            format!(
                "JSON payload as a string (EventRouter), {debezium_bytes} B; \
                 {debezium_headers} headers: id, sequence, event_type + Debezium's context"
            ),
        ),
    ];
    for (name, (rate, drained), latency, record) in rows {
        println!(
            "{name:<10} {rate:>10.0} {:>11.2}s {:>9.1} {:>9.1} {:>9.1} {:>10.0}   {record}",
            drained, latency.p50, latency.p99, latency.max, latency.rate
        );
    }
    println!(
        "events/s: (events − 1) / (last arrival − first arrival); start→drain: from starting the \
         publisher to the last arrival (Debezium's includes {debezium_running:.1} s until Connect \
         reported the connector running). Latency: arrival at a consumer (fetch.wait.max.ms=5) \
         minus the outbox row's created_at."
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let env = TestEnv::start("bench").await;
    // On Ctrl-C the run is dropped, and with it Debezium's guard: the worker stops and the slot
    // is dropped.
    tokio::select! {
        () = run(&env) => {}
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted"),
    }
    env.stop().await;
}
