//! # backbone-tests: the end-to-end suite
//!
//! Tests in `tests/` run the real thing: a fresh PostgreSQL database per test, the real broker
//! (`KAFKA_BOOTSTRAP_SERVERS`, started by the project's test command), the project's schema
//! registry on an ephemeral port, and the relay, projectors and API either in-process or as
//! child processes (for crash tests). This library holds the harness they share.

pub mod bench;
pub mod chaos;
pub mod deploy;
pub mod lifecycle;
pub mod load;
pub mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use api::auth::Role;
use api::auth::{mint_hs256, AuthConfig, Claims, Secret};
use api::{ApiConfig, ApiServer};
use commands::{CommandBus, EventStoreConfig, EventStoreDb};
use domain::order::Order;
use domain::services::{Catalogue, OrderServices, SystemClock};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use registry::{RegistryConfig as RegistryServerConfig, RegistryServer};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use streams::consumer::{Projection, Projector, ProjectorConfig};
use streams::{admin, DecodedEvent, EventDecoder, KafkaConfig, RegistryConfig, Relay, RelayConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// PostgreSQL server the tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` naming `database` instead of its own, its parameters (`?sslmode=disable`, say) kept.
pub fn with_database(url: &str, database: &str) -> String {
    let mut url = reqwest::Url::parse(url).expect("a PostgreSQL URL");
    url.set_path(database);
    url.into()
}

/// The database `url` names.
pub fn database_of(url: &str) -> String {
    let url = reqwest::Url::parse(url).expect("a PostgreSQL URL");
    url.path().trim_start_matches('/').to_owned()
}

/// The test run a database belongs to (`scripts/test` sets it to its process id), so a run drops
/// its own leftovers and never a concurrent run's.
pub fn test_run_id() -> String {
    std::env::var("TEST_RUN_ID").unwrap_or_else(|_| "0".to_owned())
}

/// The broker under test.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Logs for test debugging (`RUST_LOG=debug cargo test`).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `probe` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A task that stops when its token is cancelled.
#[derive(Debug)]
pub struct Running {
    pub token: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.handle.await?
    }
}

/// Partitions as (topic, partition).
pub type Partitions = Vec<(String, i32)>;

/// One isolated backbone: its own database, topic prefix, consumer groups and registry.
#[derive(Debug)]
pub struct TestEnv {
    pub name: String,
    pub database_url: String,
    pub store: EventStoreDb,
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    pub group_prefix: String,
    registry_server: Running,
}

impl TestEnv {
    /// Creates the database, applies the event store migrations, starts a registry on an
    /// ephemeral port and creates the topics.
    pub async fn start(name: &str) -> Self {
        init_logs();
        let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
        let database = format!("bt_{}_{name}_{tag}", test_run_id());
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("the test PostgreSQL server is reachable");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .expect("test database created");
        let database_url = with_database(&admin_url(), &database);
        let store = EventStoreDb::connect(&EventStoreConfig {
            database_url: database_url.clone(),
            database_max_connections: 24,
        })
        .await
        .expect("event store connects and migrates");

        let registry_server = RegistryServer::build(RegistryServerConfig {
            database_url: database_url.clone(),
            db_schema: "schema_registry".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            basic_auth: Some(TEST_REGISTRY_BASIC_AUTH.to_owned()),
            anonymous_reads: true,
        })
        .await
        .expect("registry starts");
        let registry = RegistryConfig {
            schema_registry_basic_auth: Some(TEST_REGISTRY_BASIC_AUTH.to_owned()),
            ..RegistryConfig::local(format!("http://{}", registry_server.local_addr()))
        };
        let token = CancellationToken::new();
        let stop = token.clone();
        let handle = tokio::spawn(async move {
            registry_server
                .run_until_stopped(async move { stop.cancelled().await })
                .await
                .map_err(anyhow::Error::from)
        });

        let kafka = KafkaConfig::local(bootstrap(), format!("t{tag}."));
        admin::ensure_topics(&kafka, &kafka.topics().all())
            .await
            .expect("topics created on the test broker");
        Self {
            name: name.to_owned(),
            database_url,
            store,
            kafka,
            registry,
            group_prefix: format!("t{tag}-"),
            registry_server: Running { token, handle },
        }
    }

    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// The demo catalogue the API uses.
    pub fn catalogue() -> Catalogue {
        ApiConfig::default()
            .catalogue()
            .expect("the built-in catalogue parses")
    }

    /// A command bus for orders on this environment's store.
    pub fn orders(&self) -> Arc<CommandBus<Order>> {
        let services = OrderServices::new(Arc::new(Self::catalogue()), Arc::new(SystemClock));
        Arc::new(CommandBus::new(self.store.clone(), services))
    }

    /// The API on an ephemeral port; returns its base URL.
    pub async fn start_api(&self) -> (String, Running) {
        self.start_api_with(Self::api_config()).await
    }

    /// The API settings of the tests: the defaults, with a rate limit no test reaches by
    /// accident (the rate-limit test sets its own).
    pub fn api_config() -> ApiConfig {
        ApiConfig {
            api_rate_limit_per_second: 100_000,
            api_rate_limit_burst: 100_000,
            ..ApiConfig::default()
        }
    }

    /// The API with the test catalogue (`tests/fixtures/catalogue.json`): the demo menu plus a
    /// region `test-fast` whose stores must accept at once (an accept-by deadline due now).
    pub async fn start_api_with_test_catalogue(&self) -> (String, Running) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/catalogue.json");
        self.start_api_with(ApiConfig {
            catalogue_path: Some(path.to_owned()),
            ..Self::api_config()
        })
        .await
    }

    /// The API with `config` (tokens signed with [`TEST_JWT_SECRET`], webhooks with
    /// [`TEST_WEBHOOK_SECRET`], on an ephemeral port).
    pub async fn start_api_with(&self, config: ApiConfig) -> (String, Running) {
        let config = ApiConfig {
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            auth: auth_config(),
            payments_webhook_secret: config
                .payments_webhook_secret
                .or_else(|| Some(Secret::new(TEST_WEBHOOK_SECRET))),
            ..config
        };
        let server = ApiServer::build(
            config,
            EventStoreConfig {
                database_url: self.database_url.clone(),
                database_max_connections: 8,
            },
            self.kafka.clone(),
            self.registry.clone(),
        )
        .await
        .expect("API starts");
        let url = format!("http://{}", server.local_addr().expect("bound"));
        let token = CancellationToken::new();
        let stop = token.clone();
        let handle = tokio::spawn(async move {
            server
                .run_until_stopped(async move { stop.cancelled().await })
                .await
                .map_err(anyhow::Error::from)
        });
        (url, Running { token, handle })
    }

    /// The relay, in this process.
    pub async fn start_relay(&self) -> Running {
        self.start_relay_with(RelayConfig::default()).await
    }

    /// The relay with `config`, in this process.
    pub async fn start_relay_with(&self, config: RelayConfig) -> Running {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.database_url)
            .await
            .expect("relay connects");
        let relay = Relay::new(pool, &self.kafka, &self.registry, config).expect("relay builds");
        let token = CancellationToken::new();
        let handle = tokio::spawn(relay.run_until_stopped(token.clone()));
        Running {
            token,
            handle: tokio::spawn(async move { Ok(handle.await??) }),
        }
    }

    /// A projector, in this process.
    pub async fn start_projector(&self, projection: Arc<dyn Projection>) -> Running {
        let projector = Projector::new(
            projection,
            self.pool().clone(),
            &self.kafka,
            &self.registry,
            ProjectorConfig {
                projector_group_prefix: self.group_prefix.clone(),
                ..ProjectorConfig::default()
            },
        )
        .await
        .expect("projector starts");
        let token = CancellationToken::new();
        let handle = tokio::spawn(projector.run_until_stopped(token.clone()));
        Running {
            token,
            handle: tokio::spawn(async move { Ok(handle.await??) }),
        }
    }

    /// One of the workspace's binaries, configured for this environment as an operator would
    /// (database, broker, topic prefix, registry, consumer groups; quiet logs, no stdin);
    /// `extra_env` adds or overrides settings.
    pub fn command(&self, binary: &str, extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(binary_path(binary));
        command
            .env("DATABASE_URL", &self.database_url)
            .env(
                "KAFKA_BOOTSTRAP_SERVERS",
                &self.kafka.kafka_bootstrap_servers,
            )
            .env("KAFKA_TOPIC_PREFIX", &self.kafka.kafka_topic_prefix)
            .env("KAFKA_FETCH_WAIT_MAX_MS", "20")
            .env("SCHEMA_REGISTRY_URL", &self.registry.schema_registry_url)
            .env("SCHEMA_REGISTRY_BASIC_AUTH", TEST_REGISTRY_BASIC_AUTH)
            .env("PROJECTOR_GROUP_PREFIX", &self.group_prefix)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command
    }

    /// One of the workspace's binaries as a child process, configured for this environment.
    pub fn spawn_process(&self, binary: &str, extra_env: &[(&str, &str)]) -> Child {
        self.command(binary, extra_env)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run `cargo build --bins` first",
                    binary_path(binary).display()
                )
            })
    }

    /// Every record of an aggregate type's topic, decoded, read from the beginning until
    /// `done` says enough arrived.
    pub async fn read_topic(
        &self,
        aggregate_type: &str,
        timeout: Duration,
        mut done: impl FnMut(&[DecodedEvent]) -> bool,
    ) -> Vec<DecodedEvent> {
        let topic = self
            .kafka
            .topics()
            .for_aggregate(aggregate_type)
            .expect("aggregate type has a topic");
        let consumer = self.consumer_from_beginning(&topic);
        let decoder = EventDecoder::new(&self.registry).expect("decoder");
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        while !done(&events) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out reading {topic}: {} records so far",
                events.len()
            );
            if let Ok(message) =
                tokio::time::timeout(left.min(Duration::from_millis(500)), consumer.recv()).await
            {
                let message = message.expect("record");
                events.push(decoder.decode(&message).await.expect("record decodes"));
            }
        }
        events
    }

    /// A consumer of every partition of `topic` from its beginning (its own group, nothing
    /// committed).
    pub fn consumer_from_beginning(&self, topic: &str) -> StreamConsumer {
        let consumer: StreamConsumer = self
            .kafka
            .client_config()
            .set(
                "group.id",
                format!("{}reader-{}", self.group_prefix, Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "20")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for partition in 0..self.kafka.kafka_partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&assignment).expect("assign");
        consumer
    }

    /// A consumer that only talks to the broker about `group` (it never joins it).
    fn group_client(&self, group: &str) -> BaseConsumer {
        self.kafka
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("a group client")
    }

    /// The consumer group of read model `read_model` (`<prefix><read model>`).
    pub fn group_of(&self, read_model: &str) -> String {
        format!("{}{read_model}", self.group_prefix)
    }

    /// The offsets `group` has committed on the broker for each partition of `topic` (-1: none).
    pub fn committed_offsets(&self, group: &str, topic: &str) -> Vec<i64> {
        let consumer = self.group_client(group);
        let mut wanted = TopicPartitionList::new();
        for partition in 0..self.kafka.kafka_partitions {
            wanted.add_partition(topic, partition);
        }
        let committed = consumer
            .committed_offsets(wanted, Duration::from_secs(10))
            .expect("the broker answers for the group");
        (0..self.kafka.kafka_partitions)
            .map(
                |partition| match committed.find_partition(topic, partition) {
                    Some(element) => match element.offset() {
                        Offset::Offset(offset) => offset,
                        _ => -1,
                    },
                    None => -1,
                },
            )
            .collect()
    }

    /// Each partition's high watermark (the offset the next record will take), from the broker.
    pub fn high_watermarks(&self, topic: &str) -> Vec<i64> {
        let consumer = self.group_client(&format!("{}watermarks", self.group_prefix));
        (0..self.kafka.kafka_partitions)
            .map(|partition| {
                consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .collect()
    }

    /// Commits offset 0 for every partition of `topics` on behalf of `group`, as an operator
    /// resetting a group does (`kafka-consumer-groups --reset-offsets --to-earliest`): the group
    /// must have no member. Retried until the broker shows the group back at 0.
    pub async fn rewind_group(&self, group: &str, topics: &[String]) {
        eventually(
            Duration::from_secs(60),
            &format!("group {group} rewound to offset 0"),
            || async {
                let consumer = self.group_client(group);
                let mut rewound = TopicPartitionList::new();
                for topic in topics {
                    for partition in 0..self.kafka.kafka_partitions {
                        rewound
                            .add_partition_offset(topic, partition, Offset::Offset(0))
                            .expect("partition");
                    }
                }
                // Refused while the group still has members (they leave on their way out).
                consumer.commit(&rewound, CommitMode::Sync).ok()?;
                topics
                    .iter()
                    .all(|topic| {
                        self.committed_offsets(group, topic)
                            .iter()
                            .all(|&offset| offset == 0)
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// The members of consumer group `group` as the broker's group coordinator describes them
    /// once the group is stable: each member's `client.id` and the partitions assigned to it.
    /// `None` while the group rebalances (or the broker does not answer).
    pub fn group_members(&self, group: &str) -> Option<Vec<(String, Partitions)>> {
        let consumer = self.group_client(&format!("{}describer", self.group_prefix));
        let groups = consumer
            .fetch_group_list(Some(group), Duration::from_secs(10))
            .ok()?;
        let info = groups.groups().iter().find(|g| g.name() == group)?;
        if info.state() != "Stable" {
            return None;
        }
        info.members()
            .iter()
            .map(|member| {
                Some((
                    member.client_id().to_owned(),
                    parse_assignment(member.assignment()?)?,
                ))
            })
            .collect()
    }

    /// Stops the registry.
    pub async fn stop(self) {
        let _ = self.registry_server.stop().await;
    }
}

/// The partitions of a member's assignment in the consumer protocol's encoding (version i16;
/// topics as an i32 count of (string with i16 length, i32 count of i32 partitions); user data).
fn parse_assignment(bytes: &[u8]) -> Option<Partitions> {
    struct Reader<'b>(&'b [u8]);
    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
            let (head, rest) = self.0.split_at_checked(N)?;
            self.0 = rest;
            head.try_into().ok()
        }
        fn i16(&mut self) -> Option<i16> {
            self.take::<2>().map(i16::from_be_bytes)
        }
        fn i32(&mut self) -> Option<i32> {
            self.take::<4>().map(i32::from_be_bytes)
        }
        fn string(&mut self) -> Option<String> {
            let length = usize::try_from(self.i16()?).ok()?;
            let (head, rest) = self.0.split_at_checked(length)?;
            self.0 = rest;
            String::from_utf8(head.to_vec()).ok()
        }
    }
    let mut reader = Reader(bytes);
    let mut assigned = Vec::new();
    if bytes.is_empty() {
        return Some(assigned);
    }
    reader.i16()?;
    for _ in 0..reader.i32()? {
        let topic = reader.string()?;
        for _ in 0..reader.i32()? {
            assigned.push((topic.clone(), reader.i32()?));
        }
    }
    Some(assigned)
}

/// Path of a workspace binary next to the running test executable.
pub fn binary_path(binary: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    dir.join(binary)
}

/// The HS256 secret of the APIs the tests start (test-only).
pub const TEST_JWT_SECRET: &str = "backbone-tests-only-hs256-secret-0123456789";
/// The `user:password` the tests' registries want for writes (test-only).
pub const TEST_REGISTRY_BASIC_AUTH: &str = "backbone-tests:registry-tests-only-password";
/// The payment provider's webhook secret of the APIs the tests start (test-only).
pub const TEST_WEBHOOK_SECRET: &str = "backbone-tests-only-webhook-secret";

/// The token settings of the APIs the tests start.
pub fn auth_config() -> AuthConfig {
    AuthConfig {
        auth_jwt_secret: Some(Secret::new(TEST_JWT_SECRET)),
        ..AuthConfig::default()
    }
}

/// A valid token for `role` and `subject`, for an hour.
pub fn token(role: Role, subject: Uuid) -> String {
    let config = auth_config();
    mint_hs256(&config, &Claims::new(&config, role, subject, 3600)).expect("a test token")
}

/// An HTTP client that sends a token for `role` and `subject` with every request.
pub fn client_as(role: Role, subject: Uuid) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = format!("Bearer {}", token(role, subject));
    headers.insert(
        reqwest::header::AUTHORIZATION,
        value.parse().expect("a header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// The HTTP client the tests talk to the API with: an administrator's token (for every request
/// that is not about who may do what; `client_as` for those).
pub fn client() -> reqwest::Client {
    client_as(Role::Admin, ADMIN_ID)
}

/// The administrator [`client`] acts as.
pub const ADMIN_ID: Uuid = Uuid::from_u128(0xad);

/// Posts a payment provider webhook for `order_id`, signed as the provider signs it.
pub async fn post_webhook(
    api: &str,
    order_id: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    let bytes = serde_json::to_vec(body).expect("json");
    let now = chrono::Utc::now().timestamp();
    reqwest::Client::new()
        .post(format!("{api}/payments/{order_id}/webhooks"))
        .header("content-type", "application/json")
        .header(
            projections::notifier::SIGNATURE_HEADER,
            projections::notifier::signature(TEST_WEBHOOK_SECRET, now, &bytes),
        )
        .body(bytes)
        .send()
        .await
        .expect("webhook sent")
}

/// The status an order has after an event of type `event_type`, or `None` for the events that
/// change no status; written from the README's lifecycle, not read from the domain's code, so
/// the tests that expect a status do not take it from the code under test.
pub fn status_after(event_type: &str) -> Option<&'static str> {
    Some(match event_type {
        "OrderPlaced" => "Placed",
        "OrderConfirmed" => "Confirmed",
        "OrderAccepted" => "Accepted",
        "OrderRejected" => "Rejected",
        "PreparationStarted" => "Preparing",
        "OrderReady" => "Ready",
        "OrderOutForDelivery" => "OutForDelivery",
        "OrderDelivered" => "Delivered",
        "OrderCompleted" => "Completed",
        "OrderCancelled" => "Cancelled",
        "OrderModified" | "OrderRated" => return None,
        other => panic!("{other} is no order event"),
    })
}

/// The variant `customer` (in `region`) gets in `experiment` of the catalogue's `experiments`
/// (JSON), or `None` if the experiment does not take them; written out from the README's
/// definition rather than read from the domain: the experiment must be active and target the
/// region; the customer's bucket is the first 8 bytes (big-endian) of
/// SHA-256(`layer:<layer>:<customer>`) mod 10,000, and the experiments of a layer own consecutive
/// ranges of `traffic_bp` buckets in id order; the variant is the first 8 bytes of
/// SHA-256(`variant:<experiment>:<customer>`) mod the total weight, walked over the weights.
pub fn assigned_variant(
    experiments: &serde_json::Value,
    experiment: &str,
    customer: Uuid,
    region: &str,
) -> Option<String> {
    use sha2::{Digest, Sha256};
    let hash = |text: String| {
        let digest = Sha256::digest(text.as_bytes());
        u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
    };
    let configured = &experiments[experiment];
    let regions = configured["regions"].as_array().expect("regions");
    if configured["active"] != serde_json::json!(true)
        || !(regions.is_empty() || regions.contains(&serde_json::json!(region)))
    {
        return None;
    }
    let layer = configured["layer"].as_str().expect("layer");
    let bucket = hash(format!("layer:{layer}:{customer}")) % 10_000;
    let mut ids: Vec<&String> = experiments
        .as_object()
        .expect("experiments")
        .iter()
        .filter(|(_, e)| e["layer"] == serde_json::json!(layer))
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    let mut start = 0;
    for id in ids {
        let end = (start + experiments[id]["traffic_bp"].as_u64().expect("traffic")).min(10_000);
        if id == experiment {
            if !(start..end).contains(&bucket) {
                return None;
            }
            break;
        }
        start = end;
    }
    let variants = configured["variants"].as_array().expect("variants");
    let total: u64 = variants
        .iter()
        .map(|v| v["weight"].as_u64().expect("weight"))
        .sum();
    let mut point = hash(format!("variant:{experiment}:{customer}")) % total;
    for variant in variants {
        let weight = variant["weight"].as_u64().expect("weight");
        if point < weight {
            return Some(variant["name"].as_str().expect("name").to_owned());
        }
        point -= weight;
    }
    None
}

/// Places a demo order through the command bus; returns its id.
pub async fn place_order(orders: &CommandBus<Order>) -> String {
    let id = domain::OrderId::new().to_string();
    let request: api::orders::PlaceOrderRequest =
        serde_json::from_value(order_request(Uuid::new_v4())).expect("a valid request");
    let command = domain::order::OrderCommand::try_from(request).expect("a valid command");
    orders
        .execute(&id, command, &commands::CommandContext::new("test"))
        .await
        .expect("order placed");
    id
}

/// Confirms the payment of order `id` through the command bus.
pub async fn confirm_payment(orders: &CommandBus<Order>, id: &str, reference: String) {
    let confirm = domain::order::OrderCommand::ConfirmPayment {
        payment_reference: reference,
    };
    orders
        .execute(id, confirm, &commands::CommandContext::new("test"))
        .await
        .expect("confirmed");
}

/// Places `request` over HTTP (`POST /orders`); returns the order id.
pub async fn place_request(
    client: &reqwest::Client,
    api: &str,
    request: &serde_json::Value,
) -> String {
    let placed: serde_json::Value = client
        .post(format!("{api}/orders"))
        .json(request)
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    placed["order_id"].as_str().expect("an order id").to_owned()
}

/// Earning on a completed order of `total_minor` pence at 10 points per pound, the points kept
/// 365 days: a rewards write as the process manager sends it.
pub fn earn_on(
    order_id: domain::OrderId,
    total_minor: i64,
    key: String,
) -> domain::rewards::RewardsCommand {
    domain::rewards::RewardsCommand::EarnPoints {
        order_id,
        order_total: domain::Money::new(total_minor, domain::Currency::parse("GBP").expect("GBP"))
            .expect("money"),
        points_per_100_minor: 10,
        expires_in_days: 365,
        idempotency_key: key,
    }
}

/// The API's Prometheus metrics (`GET /metrics`), as text.
pub async fn metrics_text(client: &reqwest::Client, api: &str) -> String {
    client
        .get(format!("{api}/metrics"))
        .send()
        .await
        .expect("metrics answered")
        .text()
        .await
        .expect("metrics text")
}

/// The JSON body of a GET, or `None` if the request or the body failed: for probes that
/// [`eventually`] retries.
pub async fn json_of(
    client: &reqwest::Client,
    url: impl reqwest::IntoUrl,
) -> Option<serde_json::Value> {
    client.get(url).send().await.ok()?.json().await.ok()
}

/// Takes one step on an order over HTTP (`POST /orders/{id}/actions`) and expects it to succeed.
pub async fn act(client: &reqwest::Client, api: &str, order_id: &str, action: serde_json::Value) {
    let response = client
        .post(format!("{api}/orders/{order_id}/actions"))
        .json(&action)
        .send()
        .await
        .expect("action sent");
    assert_eq!(response.status().as_u16(), 200, "{action}");
}

/// A store of the demo catalogue (and the test catalogue) in `region`: Angel in `uk`,
/// Kreuzberg in `de-berlin`, Chelsea in `us-nyc`, and (test catalogue only) one in `test-fast`.
/// An order's region is its store's.
pub fn store_in(region: &str) -> Uuid {
    match region {
        "uk" => Uuid::from_u128(42),
        "de-berlin" => Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0200),
        "us-nyc" => Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0300),
        "test-fast" => Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0400),
        other => panic!("no test store in region {other}"),
    }
}

/// A delivery address a few hundred metres from [`store_in`]`(region)`'s store (a store
/// delivers within 100 km).
pub fn address_in(region: &str) -> serde_json::Value {
    let (line1, city, postcode, latitude, longitude) = match region {
        "uk" | "test-fast" => ("1 High Street", "London", "N1 1AA", 51.5, -0.1),
        "de-berlin" => ("Oranienstraße 1", "Berlin", "10999", 52.5, 13.41),
        "us-nyc" => ("200 W 20th St", "New York", "10011", 40.743, -73.998),
        other => panic!("no test address in region {other}"),
    };
    serde_json::json!({
        "line1": line1, "city": city, "postcode": postcode,
        "latitude": latitude, "longitude": longitude
    })
}

/// A valid order request for the demo catalogue.
pub fn order_request(customer: Uuid) -> serde_json::Value {
    serde_json::json!({
        "customer_id": customer,
        "store_id": Uuid::from_u128(42),
        "region": "uk",
        "items": [
            {"item_id": "margherita", "quantity": 2, "options": ["extra-cheese"]},
            {"item_id": "cola", "quantity": 1}
        ],
        "delivery_address": {
            "line1": "1 High Street", "city": "London", "postcode": "N1 1AA",
            "latitude": 51.5, "longitude": -0.1
        }
    })
}

/// `database_url` with the PostgreSQL `application_name` set to `name`, so a test can find a
/// process's sessions (`pg_stat_activity`, `pg_locks`) and tell two processes apart.
pub fn with_application_name(database_url: &str, name: &str) -> String {
    let separator = if database_url.contains('?') { '&' } else { '?' };
    format!("{database_url}{separator}application_name={name}")
}

/// SIGKILL: no shutdown path of the process runs. Waits until it is reaped.
pub fn sigkill(child: &mut Child) {
    child.kill().expect("SIGKILL sent");
    child.wait().expect("reaped");
}

/// Ends the PostgreSQL sessions of a killed process (named by its `application_name`) and waits
/// until they are gone. A backend notices its client's death only when it next talks to it: a
/// statement of the dead process that waits on a lock would otherwise still run, and commit,
/// once the lock is released, as no real crash of that process could after its connections
/// dropped.
pub async fn end_sessions_of(pool: &PgPool, application_name: &str) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND datname = current_database() \
           AND pid <> pg_backend_pid()",
    )
    .bind(application_name)
    .execute(pool)
    .await
    .expect("sessions terminated");
    eventually(
        Duration::from_secs(30),
        &format!("the sessions of {application_name} to end"),
        || async {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND datname = current_database()",
            )
            .bind(application_name)
            .fetch_one(pool)
            .await
            .ok()?;
            (left == 0).then_some(())
        },
    )
    .await;
}

/// Waits until a session of `application_name` runs a statement starting with `statement` and
/// is blocked on a lock.
pub async fn blocked_on_a_lock(pool: &PgPool, application_name: &str, statement: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("{application_name} to block on a lock in `{statement}`"),
        || async {
            let blocked: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1 \
                 AND datname = current_database() AND wait_event_type = 'Lock' \
                 AND query LIKE $2 || '%')",
            )
            .bind(application_name)
            .bind(statement)
            .fetch_one(pool)
            .await
            .ok()?;
            blocked.then_some(())
        },
    )
    .await;
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves no process
/// behind; [`sigkill`] it to kill it at a chosen moment.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_names_another_database_with_its_parameters_kept() {
        let admin = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";
        let url = with_database(admin, "bt_1_x");
        assert_eq!(
            url,
            "postgres://postgres@127.0.0.1:5432/bt_1_x?sslmode=disable"
        );
        assert_eq!(database_of(&url), "bt_1_x");
        assert_eq!(
            with_database("postgres://u:p%40ss@db:5432/app", "other"),
            "postgres://u:p%40ss@db:5432/other"
        );
    }
}
