//! Broker, registry and topic settings, read from the environment. Nothing here is specific to
//! the development broker: any Kafka-protocol broker and Confluent-compatible registry work.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use serde::Deserialize;

/// Aggregate types and their topics. The names are contracts: never renamed.
pub const AGGREGATE_TOPICS: [(&str, &str); 5] = [
    ("order", "orders"),
    ("delivery", "deliveries"),
    ("payment", "payments"),
    ("rewards", "rewards"),
    ("ads", "ads"),
];

/// Connection to the Kafka cluster.
#[derive(Clone, Deserialize)]
pub struct KafkaConfig {
    /// `KAFKA_BOOTSTRAP_SERVERS`: comma-separated `host:port` list (default `127.0.0.1:9092`).
    #[serde(default = "default_bootstrap")]
    pub kafka_bootstrap_servers: String,
    /// `KAFKA_TOPIC_PREFIX`: prepended to every topic name (default empty), e.g. `prod.`.
    #[serde(default)]
    pub kafka_topic_prefix: String,
    /// `KAFKA_PARTITIONS`: partitions of each topic the project creates (default 6).
    #[serde(default = "default_partitions")]
    pub kafka_partitions: i32,
    /// `KAFKA_REPLICATION_FACTOR`: replication of each topic the project creates (default 1).
    #[serde(default = "default_replication")]
    pub kafka_replication_factor: i32,
    /// `KAFKA_PROPERTIES`: extra librdkafka properties as `key=value` pairs separated by `;`,
    /// e.g. `security.protocol=SASL_SSL;sasl.mechanisms=PLAIN;sasl.username=...` for a managed
    /// cluster. Values are never logged.
    #[serde(default)]
    pub kafka_properties: String,
    /// `KAFKA_FETCH_WAIT_MAX_MS`: how long a fetch waits when there is no data (default 500,
    /// Kafka's own). A fetch returns as soon as data arrives, so this bounds the cost of an
    /// idle consumer, not the latency of a busy one.
    #[serde(default = "default_fetch_wait")]
    pub kafka_fetch_wait_max_ms: u32,
}

fn default_bootstrap() -> String {
    "127.0.0.1:9092".to_owned()
}
const fn default_partitions() -> i32 {
    6
}
const fn default_replication() -> i32 {
    1
}
const fn default_fetch_wait() -> u32 {
    500
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("kafka_bootstrap_servers", &self.kafka_bootstrap_servers)
            .field("kafka_topic_prefix", &self.kafka_topic_prefix)
            .field("kafka_partitions", &self.kafka_partitions)
            .field("kafka_properties", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl KafkaConfig {
    /// Reads the `KAFKA_*` variables.
    pub fn from_env() -> Result<Self, envy::Error> {
        envy::from_env()
    }

    /// Settings for tests and local runs: one broker on 127.0.0.1, topics under `prefix`.
    pub fn local(bootstrap: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            kafka_bootstrap_servers: bootstrap.into(),
            kafka_topic_prefix: prefix.into(),
            kafka_partitions: default_partitions(),
            kafka_replication_factor: default_replication(),
            kafka_properties: String::new(),
            kafka_fetch_wait_max_ms: 100,
        }
    }

    /// The base client configuration shared by producers, consumers and admin clients.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.kafka_bootstrap_servers);
        for (key, value) in self.extra_properties() {
            config.set(key, value);
        }
        config
    }

    fn extra_properties(&self) -> BTreeMap<&str, &str> {
        self.kafka_properties
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, _)| !k.is_empty())
            .collect()
    }

    pub fn topics(&self) -> Topics {
        Topics {
            prefix: self.kafka_topic_prefix.clone(),
        }
    }
}

/// Topic names, with the configured prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The topic of an aggregate type, or `None` for a type the backbone does not publish.
    pub fn for_aggregate(&self, aggregate_type: &str) -> Option<String> {
        AGGREGATE_TOPICS
            .iter()
            .find(|(a, _)| *a == aggregate_type)
            .map(|(_, t)| format!("{}{t}", self.prefix))
    }

    /// Every event topic.
    pub fn all(&self) -> Vec<String> {
        AGGREGATE_TOPICS
            .iter()
            .map(|(_, t)| format!("{}{t}", self.prefix))
            .collect()
    }

    /// A topic that is not an aggregate's (dead letters, ...), with the prefix.
    pub fn named(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// Connection to the schema registry.
#[derive(Clone, Deserialize)]
pub struct RegistryConfig {
    /// `SCHEMA_REGISTRY_URL`: base URL of a Confluent-compatible registry
    /// (default `http://127.0.0.1:8081`).
    #[serde(default = "default_registry")]
    pub schema_registry_url: String,
    /// `SCHEMA_REGISTRY_BASIC_AUTH`: `user:password` for a managed registry (optional, never
    /// logged).
    #[serde(default)]
    pub schema_registry_basic_auth: Option<String>,
}

fn default_registry() -> String {
    "http://127.0.0.1:8081".to_owned()
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("schema_registry_url", &self.schema_registry_url)
            .field(
                "schema_registry_basic_auth",
                &self
                    .schema_registry_basic_auth
                    .as_ref()
                    .map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl RegistryConfig {
    pub fn from_env() -> Result<Self, envy::Error> {
        envy::from_env()
    }

    pub fn local(url: impl Into<String>) -> Self {
        Self {
            schema_registry_url: url.into(),
            schema_registry_basic_auth: None,
        }
    }

    /// Client settings for `schema_registry_converter`.
    pub fn settings(&self) -> Result<SrSettings, SRCError> {
        let mut builder = SrSettings::new_builder(self.schema_registry_url.clone());
        builder.set_timeout(Duration::from_secs(10));
        if let Some((user, password)) = self
            .schema_registry_basic_auth
            .as_deref()
            .and_then(|auth| auth.split_once(':'))
        {
            builder.set_basic_authorization(user, Some(password));
        }
        builder.build()
    }
}
