//! # schemas: the public contracts of the backbone
//!
//! Every event that leaves the event store is described here: one Avro schema (`.avsc`) per event
//! type, the mapping between domain events and their Avro form, the upcasters that read old JSON
//! shapes from the event store, and a Confluent-compatible schema registry for development.
//!
//! Place in the flow: `commands` stores domain events as JSON; `streams` encodes them with the
//! contracts of this crate into the Confluent wire format; projectors and analysts decode them
//! through the registry.

pub mod registry;
