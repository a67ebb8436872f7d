//! Pieces the benchmarks share: concurrent writers, the raw-consumer baselines, timing, and a
//! generated day of orders.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use commands::{CommandBus, CommandContext, EventStoreDb};
use domain::delivery::{Delivery, DeliveryCommand, DeliveryServices, FailureReason, GeoPoint};
use domain::order::{CancelledBy, Order, OrderCommand, RejectionReason};
use domain::payment::{Payment, PaymentCommand, PaymentServices};
use domain::rewards::{RewardsCommand, RewardsLedger, RewardsServices};
use domain::services::OrderServices;
use domain::Money;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use uuid::Uuid;

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
    while let Some(writer) = tasks.join_next().await {
        writer.expect("every order placed");
    }
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

/// The machine's load average (1, 5 and 15 minutes, from `/proc/loadavg`), printed beside the
/// figures: the benchmarks share their machine, and other work shows in them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|line| {
            line.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Starts the relay, waits until the outbox has nothing unpublished, stops it; returns the time
/// from its start to the last row marked published.
pub async fn relay_backlog(env: &TestEnv) -> Duration {
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
    let elapsed = started.elapsed();
    relay.stop().await.expect("relay stops");
    elapsed
}

/// The topics of `aggregate_types` (a read model's subscription) in this environment.
pub fn topics_of(env: &TestEnv, aggregate_types: &[&str]) -> Vec<String> {
    aggregate_types
        .iter()
        .map(|t| env.kafka.topics().for_aggregate(t).expect("a topic"))
        .collect()
}

/// Events of `aggregate_types` in the event store (what their topics hold once relayed).
pub async fn events_of(pool: &sqlx::PgPool, aggregate_types: &[&str]) -> usize {
    let types: Vec<String> = aggregate_types.iter().map(|t| (*t).to_owned()).collect();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = ANY($1)")
        .bind(&types)
        .fetch_one(pool)
        .await
        .expect("events counted");
    usize::try_from(n).unwrap_or(0)
}

/// Events a read model (`schema`) has applied: the runtime's dedup keeps the last sequence of
/// each aggregate, and an aggregate's sequences start at 1 without gaps, so their sum is the
/// number of its events applied (or dead-lettered, which the benchmarks check is none).
pub async fn applied_events(pool: &sqlx::PgPool, schema: &str) -> usize {
    let n: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT sum(last_sequence)::bigint FROM {schema}.applied"
    ))
    .fetch_one(pool)
    .await
    .unwrap_or(None);
    usize::try_from(n.unwrap_or(0)).unwrap_or(0)
}

/// How long a raw consumer took: to its first record, and to its last.
#[derive(Debug, Clone, Copy)]
pub struct RawRead {
    pub until_first: Duration,
    pub total: Duration,
}

impl RawRead {
    /// Records per second between the first record and the last (`count` read in all): the
    /// steady rate, without the assignment and the first fetch.
    pub fn steady_rate(&self, count: usize) -> f64 {
        rate(
            count.saturating_sub(1),
            self.total.saturating_sub(self.until_first),
        )
    }
}

/// A raw consumer (own group, no decoding, no database) reading `count` records of `topics`,
/// every partition assigned from the beginning, with `config`'s fetch settings.
pub async fn raw_consumer_of(
    env: &TestEnv,
    config: rdkafka::ClientConfig,
    topics: &[String],
    count: usize,
) -> RawRead {
    let consumer: StreamConsumer = config.create().expect("consumer");
    let mut assignment = rdkafka::TopicPartitionList::new();
    for topic in topics {
        for partition in 0..env.kafka.kafka_partitions {
            assignment
                .add_partition_offset(topic, partition, rdkafka::Offset::Beginning)
                .expect("partition");
        }
    }
    consumer.assign(&assignment).expect("assign");
    let started = Instant::now();
    let (mut seen, mut bytes) = (0, 0usize);
    let mut until_first = Duration::ZERO;
    while seen < count {
        let message = consumer.recv().await.expect("record");
        if seen == 0 {
            until_first = started.elapsed();
        }
        bytes += message.payload().map_or(0, <[u8]>::len);
        seen += 1;
    }
    assert!(count == 0 || bytes > 0);
    RawRead {
        until_first,
        total: started.elapsed(),
    }
}

/// The catalogue of a generated day: the demo menu in six regions (the demo's three and three
/// more priced like their neighbours), ten stores in each.
pub fn day_catalogue() -> domain::services::Catalogue {
    use domain::services::StoreSettings;
    use domain::RegionCode;
    let mut catalogue = TestEnv::catalogue();
    let code = |c: &str| RegionCode::parse(c).expect("a region code");
    for (new, like) in [
        ("fr-paris", "de-berlin"),
        ("es-madrid", "de-berlin"),
        ("us-sf", "us-nyc"),
    ] {
        let settings = catalogue.regions[&code(like)].clone();
        catalogue.regions.insert(code(new), settings);
        for item in catalogue.items.values_mut() {
            if let Some(price) = item.prices.get(&code(like)).copied() {
                item.prices.insert(code(new), price);
            }
        }
    }
    catalogue.stores.clear();
    for (r, (region, latitude, longitude)) in DAY_REGIONS.iter().enumerate() {
        for s in 0..STORES_PER_REGION {
            let id = domain::StoreId::from_uuid(Uuid::from_u128(
                0x5703_0000_0000_4000_8000_0000_0000_0000 | ((r as u128) << 8) | s as u128,
            ));
            let offset = 0.01 * s as f64;
            catalogue.stores.insert(
                id,
                StoreSettings {
                    name: format!("Store {s} {region}"),
                    region: code(region),
                    latitude: latitude + offset,
                    longitude: longitude - offset,
                },
            );
        }
    }
    catalogue
}

/// The regions of a generated day and a point in each city.
const DAY_REGIONS: [(&str, f64, f64); 6] = [
    ("uk", 51.53, -0.10),
    ("de-berlin", 52.50, 13.41),
    ("us-nyc", 40.74, -73.99),
    ("fr-paris", 48.86, 2.35),
    ("es-madrid", 40.42, -3.70),
    ("us-sf", 37.77, -122.42),
];
const STORES_PER_REGION: usize = 10;

/// The clock of one writer of a generated day: it says the instant the writer set last, so each
/// command runs at its moment of the day.
#[derive(Debug, Default)]
struct DayClock(std::sync::atomic::AtomicI64);

impl DayClock {
    fn set(&self, at: DateTime<Utc>) {
        self.0.store(at.timestamp_micros(), Ordering::Relaxed);
    }
}

impl domain::services::Clock for DayClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0.load(Ordering::Relaxed)).unwrap_or_default()
    }
}

/// What a generated day holds.
#[derive(Debug, Clone, Default)]
pub struct Day {
    pub orders: usize,
    /// Commands executed through the command bus.
    pub commands: usize,
    /// Events in the store per aggregate type and event type.
    pub events_by_type: BTreeMap<(String, String), usize>,
    pub events: usize,
    pub stores: usize,
    pub regions: usize,
    pub customers: usize,
    /// How the orders ended.
    pub outcomes: BTreeMap<&'static str, usize>,
    pub elapsed: Duration,
}

impl Day {
    /// One line per aggregate type: its events and the count of each type.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "a day of {} orders ({} stores in {} regions, {} customers, placed from 00:00 to \
             23:59 UTC with lunch and dinner peaks): {} events from {} commands in {:.0} s \
             ({:.0} commands/s)\n  outcomes: {}\n",
            self.orders,
            self.stores,
            self.regions,
            self.customers,
            self.events,
            self.commands,
            self.elapsed.as_secs_f64(),
            rate(self.commands, self.elapsed),
            self.outcomes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut by_aggregate: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for ((aggregate, event), n) in &self.events_by_type {
            by_aggregate
                .entry(aggregate)
                .or_default()
                .push(format!("{event} {n}"));
        }
        for (aggregate, types) in by_aggregate {
            out.push_str(&format!("  {aggregate}: {}\n", types.join(", ")));
        }
        out
    }
}

/// The command buses of one writer, all on its own [`DayClock`].
struct DayWriter {
    clock: Arc<DayClock>,
    orders: CommandBus<Order>,
    payments: CommandBus<Payment>,
    deliveries: CommandBus<Delivery>,
    rewards: CommandBus<RewardsLedger>,
    catalogue: Arc<domain::services::Catalogue>,
}

/// The hour an order is placed in: a quiet night, a lunch peak and a larger dinner peak.
fn hour_of_day(rng: &mut StdRng) -> u32 {
    const WEIGHTS: [u32; 24] = [
        2, 1, 1, 1, 1, 1, 2, 3, 4, 4, 5, 9, 14, 12, 6, 4, 4, 7, 13, 16, 14, 9, 5, 3,
    ];
    let total: u32 = WEIGHTS.iter().sum();
    let mut pick = rng.random_range(0..total);
    for (hour, weight) in WEIGHTS.iter().enumerate() {
        if pick < *weight {
            return hour as u32;
        }
        pick -= weight;
    }
    23
}

impl DayWriter {
    fn new(store: &EventStoreDb, catalogue: Arc<domain::services::Catalogue>) -> Self {
        let clock = Arc::new(DayClock::default());
        let time: Arc<dyn domain::services::Clock> = clock.clone();
        let store = store.clone();
        Self {
            orders: CommandBus::new(
                store.clone(),
                OrderServices::new(catalogue.clone(), time.clone()),
            ),
            payments: CommandBus::new(store.clone(), PaymentServices::new(time.clone())),
            deliveries: CommandBus::new(store.clone(), DeliveryServices::new(time.clone())),
            rewards: CommandBus::new(store, RewardsServices::new(time)),
            clock,
            catalogue,
        }
    }

    /// One order of the day, from placement to its end, as the order flow and the store,
    /// courier and customer apps would command it; returns its outcome and the commands run.
    async fn order(
        &self,
        day: DateTime<Utc>,
        index: usize,
        customers: usize,
    ) -> (&'static str, usize) {
        let mut rng = StdRng::seed_from_u64(index as u64);
        let context = CommandContext::new("bench");
        let mut at = day
            + chrono::Duration::hours(i64::from(hour_of_day(&mut rng)))
            + chrono::Duration::seconds(rng.random_range(0..3600));
        let mut commands = 0;
        macro_rules! run {
            ($bus:expr, $id:expr, $command:expr) => {{
                self.clock.set(at);
                commands += 1;
                $bus.execute($id, $command, &context)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e:?}", stringify!($command)));
            }};
        }
        let pass = |rng: &mut StdRng, at: &mut DateTime<Utc>, from: i64, to: i64| {
            *at += chrono::Duration::seconds(rng.random_range(from..to));
        };

        let stores: Vec<_> = self.catalogue.stores.iter().collect();
        let (store_id, store) = stores[rng.random_range(0..stores.len())];
        let region = &self.catalogue.regions[&store.region];
        let sold: Vec<_> = self
            .catalogue
            .items
            .iter()
            .filter(|(_, item)| item.prices.contains_key(&store.region))
            .collect();
        let lines: Vec<serde_json::Value> = (0..rng.random_range(1..=4))
            .map(|_| {
                let (item_id, item) = sold[rng.random_range(0..sold.len())];
                let options: Vec<&String> = item
                    .options
                    .keys()
                    .filter(|_| rng.random_bool(0.3))
                    .collect();
                serde_json::json!({
                    "item_id": item_id, "quantity": rng.random_range(1..=3), "options": options
                })
            })
            .collect();
        // One line per item, as an app sends it.
        let mut seen = std::collections::HashSet::new();
        let lines: Vec<_> = lines
            .into_iter()
            .filter(|l| seen.insert(l["item_id"].to_string()))
            .collect();
        let customer = Uuid::from_u128(
            0xC057_0000_0000_4000_8000_0000_0000_0000 | rng.random_range(0..customers) as u128,
        );
        let (latitude, longitude) = (
            store.latitude + rng.random_range(-0.03..0.03),
            store.longitude + rng.random_range(-0.03..0.03),
        );
        let request = serde_json::json!({
            "customer_id": customer,
            "store_id": store_id.as_uuid(),
            "region": store.region.as_str(),
            "items": lines,
            "delivery_address": {
                "line1": format!("{} Main Street", index % 200 + 1), "city": "City",
                "postcode": "00000", "latitude": latitude, "longitude": longitude
            }
        });
        let request: api::orders::PlaceOrderRequest =
            serde_json::from_value(request).expect("a valid request");
        let place = OrderCommand::try_from(request).expect("a valid command");
        let id = domain::OrderId::new();
        let order = id.to_string();
        run!(self.orders, &order, place);
        let (customer_id, total) = self
            .orders
            .state(&order, |o| (o.customer_id, o.total))
            .await
            .expect("the order");
        let (customer_id, total) = (customer_id.expect("placed"), total.expect("priced"));
        let customer = customer_id.to_string();

        pass(&mut rng, &mut at, 2, 10);
        run!(
            self.payments,
            &order,
            PaymentCommand::AuthorizePayment {
                order_id: id,
                customer_id,
                amount: total,
                provider: "demo".to_owned(),
                provider_reference: format!("demo-{order}"),
            }
        );
        run!(
            self.orders,
            &order,
            OrderCommand::ConfirmPayment {
                payment_reference: format!("demo-{order}"),
            }
        );
        let void = PaymentCommand::VoidPayment {
            reason: "order cancelled".to_owned(),
        };
        let fate = rng.random_range(0..100);
        pass(&mut rng, &mut at, 30, 300);
        if fate < 3 {
            run!(
                self.orders,
                &order,
                OrderCommand::CancelOrder {
                    by: CancelledBy::Customer,
                    reason: "changed my mind".to_owned(),
                }
            );
            run!(self.payments, &order, void);
            return ("cancelled by the customer", commands);
        }
        if fate < 6 {
            run!(
                self.orders,
                &order,
                OrderCommand::RejectOrder {
                    reason: RejectionReason::Busy,
                }
            );
            run!(self.payments, &order, void);
            return ("rejected by the store", commands);
        }
        let preparation: u32 = rng.random_range(10..30);
        run!(
            self.orders,
            &order,
            OrderCommand::AcceptOrder {
                estimated_preparation_minutes: preparation,
            }
        );
        let pickup = GeoPoint::new(store.latitude, store.longitude).expect("a point");
        let dropoff = GeoPoint::new(latitude, longitude).expect("a point");
        run!(
            self.deliveries,
            &order,
            DeliveryCommand::RequestDelivery {
                order_id: id,
                store_id: *store_id,
                region: store.region.clone(),
                pickup,
                dropoff,
                preparation_ready_at: at + chrono::Duration::minutes(i64::from(preparation)),
                average_speed_kmh: region.courier_speed_kmh,
            }
        );
        pass(&mut rng, &mut at, 30, 120);
        run!(self.orders, &order, OrderCommand::StartPreparation);
        run!(
            self.deliveries,
            &order,
            DeliveryCommand::AssignCourier {
                courier_id: domain::CourierId::from_uuid(Uuid::from_u128(
                    0xC0C0_0000_0000_4000_8000_0000_0000_0000 | rng.random_range(0..500u128),
                )),
            }
        );
        // The courier rides to the store, reporting its position every half minute or so.
        let steps = rng.random_range(2..6);
        for step in 0..steps {
            pass(&mut rng, &mut at, 20, 40);
            let done = f64::from(step + 1) / f64::from(steps);
            let position = GeoPoint::new(
                store.latitude + 0.02 * (1.0 - done),
                store.longitude + 0.02 * (1.0 - done),
            )
            .expect("a point");
            run!(
                self.deliveries,
                &order,
                DeliveryCommand::UpdateCourierLocation {
                    position,
                    device_time: at,
                }
            );
        }
        pass(&mut rng, &mut at, 60, 600);
        run!(self.orders, &order, OrderCommand::MarkReady);
        run!(
            self.deliveries,
            &order,
            DeliveryCommand::MarkFoodReady { ready_at: at }
        );
        run!(self.deliveries, &order, DeliveryCommand::ArriveAtPickup);
        pass(&mut rng, &mut at, 30, 180);
        run!(self.deliveries, &order, DeliveryCommand::PickUp);
        run!(self.orders, &order, OrderCommand::HandToCourier);
        let steps = rng.random_range(3..10);
        for step in 0..steps {
            pass(&mut rng, &mut at, 20, 40);
            let done = f64::from(step + 1) / f64::from(steps);
            let position = GeoPoint::new(
                store.latitude + (latitude - store.latitude) * done,
                store.longitude + (longitude - store.longitude) * done,
            )
            .expect("a point");
            run!(
                self.deliveries,
                &order,
                DeliveryCommand::UpdateCourierLocation {
                    position,
                    device_time: at,
                }
            );
        }
        if fate < 8 {
            run!(
                self.deliveries,
                &order,
                DeliveryCommand::FailDelivery {
                    reason: FailureReason::CustomerUnreachable,
                }
            );
            run!(
                self.orders,
                &order,
                OrderCommand::CancelOrder {
                    by: CancelledBy::System,
                    reason: "the delivery failed".to_owned(),
                }
            );
            run!(self.payments, &order, void);
            pass(&mut rng, &mut at, 300, 900);
            run!(self.deliveries, &order, DeliveryCommand::ReturnToStore);
            return ("delivery failed", commands);
        }
        run!(self.deliveries, &order, DeliveryCommand::ArriveAtDropoff);
        pass(&mut rng, &mut at, 30, 120);
        run!(self.deliveries, &order, DeliveryCommand::Deliver);
        run!(self.orders, &order, OrderCommand::MarkDelivered);
        run!(
            self.payments,
            &order,
            PaymentCommand::CapturePayment { amount: None }
        );
        run!(self.orders, &order, OrderCommand::CompleteOrder);
        run!(
            self.rewards,
            &customer,
            RewardsCommand::EarnPoints {
                order_id: id,
                order_total: total,
                points_per_100_minor: region.points_per_100_minor,
                expires_in_days: region.points_expire_in_days,
                idempotency_key: format!("earn-{order}"),
            }
        );
        let mut outcome = "completed";
        pass(&mut rng, &mut at, 600, 7200);
        if rng.random_bool(0.35) {
            run!(
                self.orders,
                &order,
                OrderCommand::RateOrder {
                    stars: rng.random_range(1..=5),
                    comment: rng
                        .random_bool(0.3)
                        .then(|| "on time, still warm".to_owned()),
                }
            );
            outcome = "completed and rated";
        }
        if rng.random_bool(0.15) {
            run!(
                self.deliveries,
                &order,
                DeliveryCommand::RateCourier {
                    stars: rng.random_range(3..=5),
                    comment: None,
                }
            );
        }
        if fate >= 96 {
            let refund = Money::new((total.minor() / 4).max(1), total.currency()).expect("money");
            run!(
                self.payments,
                &order,
                PaymentCommand::RefundPayment {
                    amount: refund,
                    reason: "an item was missing".to_owned(),
                    refund_id: format!("refund-{order}"),
                }
            );
            run!(
                self.rewards,
                &customer,
                RewardsCommand::ReverseEarnedPoints {
                    order_id: id,
                    refunded_total: refund,
                    idempotency_key: format!("reverse-{order}"),
                }
            );
            outcome = "completed, then partly refunded";
        }
        (outcome, commands)
    }
}

/// Generates a day of `orders` orders through the command bus, [`WRITERS`] writers side by
/// side, every command at its moment of the day (yesterday, UTC) on each aggregate's own clock:
/// placed in one of 60 stores of six regions, paid, then (by a seeded draw per order) cancelled
/// by the customer (3%), rejected by the store (3%), or accepted, prepared and delivered with
/// the courier's positions on the way to the store and to the customer, the delivery failing
/// for 2%; a delivered order is captured, completed and earns its customer points, 35% are
/// rated, 15% rate the courier, 4% are partly refunded (and the points reversed). Every event
/// is what the domain decided, so it passes every check the live flow would meet.
pub async fn day_of_orders(store: &EventStoreDb, orders: usize) -> Day {
    let catalogue = Arc::new(day_catalogue());
    let customers = (orders / 3).max(1);
    let day = (Utc::now() - chrono::Duration::days(1))
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let writer = DayWriter::new(store, catalogue.clone());
        let next = next.clone();
        tasks.spawn(async move {
            let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
            let mut commands = 0;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= orders {
                    break;
                }
                let (outcome, n) = writer.order(day, index, customers).await;
                *outcomes.entry(outcome).or_default() += 1;
                commands += n;
            }
            (outcomes, commands)
        });
    }
    let mut result = Day {
        orders,
        stores: catalogue.stores.len(),
        regions: catalogue.regions.len(),
        customers,
        ..Day::default()
    };
    while let Some(done) = tasks.join_next().await {
        let (outcomes, commands) = done.expect("a writer");
        for (k, v) in outcomes {
            *result.outcomes.entry(k).or_default() += v;
        }
        result.commands += commands;
    }
    result.elapsed = started.elapsed();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT aggregate_type, event_type, count(*) FROM events GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(store.pool())
    .await
    .expect("events counted");
    for (aggregate, event, n) in rows {
        let n = usize::try_from(n).unwrap_or(0);
        result.events += n;
        result.events_by_type.insert((aggregate, event), n);
    }
    result
}
