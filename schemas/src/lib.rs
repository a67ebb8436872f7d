//! # schemas: the public contracts of the backbone
//!
//! Every event that leaves the event store is described here: one Avro schema (`.avsc`, under
//! `avro/<aggregate>/`) per event type, the mapping between domain events and their Avro form
//! ([`Contracts`]), the upcasters that read old JSON shapes from the event store
//! ([`upcasters`]), and a Confluent-compatible schema registry for development ([`registry`]).
//!
//! Place in the flow: `commands` stores domain events as JSON; the outbox relay in `streams`
//! upcasts them, maps them to Avro with these contracts and sends them in the Confluent wire
//! format; projectors and analysts decode them through the registry and read them back into
//! domain events with the same contracts. See [`contracts`] for the subject naming strategy.

pub mod contracts;
pub mod direct;
mod mapping;
pub mod upcasters;

pub use contracts::{split_payload, Contracts, EventContract};
pub use upcasters::{upcast, upcasters};

/// Why a contract could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("the contract of {event_type} is not a valid Avro schema: {reason}")]
    InvalidSchema { event_type: String, reason: String },
    #[error("no contract for event type {event_type} of aggregate type {aggregate_type}")]
    UnknownEvent {
        aggregate_type: String,
        event_type: String,
    },
    #[error("no contract for Avro record {0}")]
    UnknownRecord(String),
    #[error("event does not fit its contract: {0}")]
    Mapping(String),
}
