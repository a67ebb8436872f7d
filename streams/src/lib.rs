//! # streams: the Kafka side of the backbone
//!
//! - [`relay`]: the outbox relay, which publishes committed events from PostgreSQL to one topic
//!   per aggregate type with an idempotent producer and marks them published once acknowledged;
//! - [`codec`]: the Confluent wire format (Avro through a schema registry) of event records, and
//!   [`headers`], the metadata every record carries;
//! - [`config`]: broker, registry and topic settings (any Apache-Kafka-compatible broker and any
//!   Confluent-compatible registry), and [`admin`] to create the topics.
//!
//! Place in the flow: `commands` commits events and outbox rows; the relay here turns them into
//! records; projectors in `projections` consume them with [`codec::EventDecoder`].

pub mod admin;
pub mod codec;
pub mod config;
pub mod consumer;
pub mod headers;
pub mod process;
pub mod published;
pub mod relay;
pub mod telemetry;

pub use codec::{DecodeError, DecodedEvent, EventDecoder, EventEncoder};
pub use config::{KafkaConfig, RegistryConfig, Topics};
pub use headers::EventMeta;
pub use published::Published;
pub use relay::{Relay, RelayConfig, RelayError};
