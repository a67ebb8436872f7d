//! The catalogue of event contracts: one Avro schema per event type, compiled into the binary.
//!
//! ## Subject strategy: TopicRecordNameStrategy
//!
//! Several event types share one topic per aggregate type (so that one aggregate's events stay
//! in order in one partition). Each event type is its own Avro record, registered under the
//! subject `<topic>-<record full name>` (Confluent's `TopicRecordNameStrategy`). Compared with
//! one union schema per topic under `TopicNameStrategy`, every event type evolves on its own:
//! adding an event type registers a new subject instead of a new version of a growing union,
//! and a compatibility check looks at one event type's history only. Every Confluent client
//! decodes by the schema id in the message, so consumers need no configuration for it.

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;

use crate::direct::tagged_from_avro;
use crate::mapping::{avro_to_json, json_to_avro, Names};
use crate::SchemaError;

/// One event type's contract.
#[derive(Debug)]
pub struct EventContract {
    /// Aggregate type as stored in the event store (`order`).
    pub aggregate_type: &'static str,
    /// Event type as stored in the event store and in the `event_type` header (`OrderPlaced`).
    pub event_type: &'static str,
    /// Version of the payload shape in the event store; older versions are upcast to it.
    pub event_version: &'static str,
    /// The `.avsc` text, as registered.
    pub schema_text: &'static str,
    /// The parsed schema (the reader schema of every consumer in this project).
    pub schema: Schema,
    /// Full name of the Avro record (`backbone.order.OrderPlaced`).
    pub record_name: String,
    names: Names,
}

impl EventContract {
    /// The Avro value of an event payload (the JSON object inside the externally tagged enum).
    pub fn to_avro(&self, payload: &Json) -> Result<Avro, SchemaError> {
        json_to_avro(payload, &self.schema, &self.names, self.event_type)
    }

    /// The payload JSON of an Avro value decoded with exactly this contract's schema (no
    /// resolution needed).
    pub fn from_avro_as_is(&self, value: &Avro) -> Result<Json, SchemaError> {
        avro_to_json(value)
    }

    /// Whether `writer` is this contract's schema itself (so its values need no resolution).
    pub fn is_schema(&self, writer: &Schema) -> bool {
        match (
            serde_json::to_value(writer),
            serde_json::to_value(&self.schema),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    /// The payload JSON of an Avro value written with any compatible version of this contract.
    pub fn from_avro(&self, value: Avro) -> Result<Json, SchemaError> {
        avro_to_json(&self.resolve(value)?)
    }

    /// An Avro value written with any compatible version of this contract, as a value of this
    /// version (defaults filled in, fields it no longer has dropped).
    pub fn resolve(&self, value: Avro) -> Result<Avro, SchemaError> {
        value
            .resolve(&self.schema)
            .map_err(|e| SchemaError::Mapping(format!("{}: {e}", self.event_type)))
    }

    /// The domain event of an Avro value of exactly this contract's schema, read straight from
    /// the value: the same result as [`Self::from_avro_as_is`] read by `serde_json`, without
    /// the JSON (see [`crate::direct`]).
    pub fn event_from_avro<E: DeserializeOwned>(&self, value: &Avro) -> Result<E, SchemaError> {
        tagged_from_avro(self.event_type, value)
    }

    /// The subject this contract is registered under for `topic` (TopicRecordNameStrategy).
    pub fn subject(&self, topic: &str) -> String {
        format!("{topic}-{}", self.record_name)
    }
}

/// One compiled-in `.avsc` and what it describes.
pub(crate) struct Source {
    pub(crate) aggregate_type: &'static str,
    pub(crate) event_type: &'static str,
    pub(crate) event_version: &'static str,
    pub(crate) text: &'static str,
}

/// `sources!("order": "OrderPlaced" @ "1.0", ...)`: the contracts of one aggregate type, read
/// from `avro/<aggregate>/<Event>.avsc`.
macro_rules! sources {
    ($aggregate:literal: $($event:literal @ $version:literal),* $(,)?) => {
        &[$($crate::contracts::Source {
            aggregate_type: $aggregate,
            event_type: $event,
            event_version: $version,
            text: include_str!(concat!("../../avro/", $aggregate, "/", $event, ".avsc")),
        }),*]
    };
}

mod ads;
mod delivery;
mod order;
mod payment;
mod rewards;

/// Every aggregate type's contracts.
const SOURCES: [&[Source]; 5] = [
    order::SOURCES,
    delivery::SOURCES,
    payment::SOURCES,
    rewards::SOURCES,
    ads::SOURCES,
];

/// Every contract of the backbone.
#[derive(Debug)]
pub struct Contracts {
    contracts: Vec<EventContract>,
    by_event: HashMap<(&'static str, &'static str), usize>,
    by_record: HashMap<String, usize>,
}

impl Contracts {
    /// Parses the compiled-in schemas.
    pub fn load() -> Result<Self, SchemaError> {
        let mut contracts = Vec::new();
        for source in SOURCES.iter().flat_map(|sources| sources.iter()) {
            let schema =
                Schema::parse_str(source.text).map_err(|e| SchemaError::InvalidSchema {
                    event_type: source.event_type.to_owned(),
                    reason: e.to_string(),
                })?;
            let record_name = match &schema {
                Schema::Record(r) => r.name.fullname(None),
                _ => {
                    return Err(SchemaError::InvalidSchema {
                        event_type: source.event_type.to_owned(),
                        reason: "an event contract must be a record".to_owned(),
                    })
                }
            };
            contracts.push(EventContract {
                names: Names::of(&schema),
                aggregate_type: source.aggregate_type,
                event_type: source.event_type,
                event_version: source.event_version,
                schema_text: source.text,
                schema,
                record_name,
            });
        }
        let by_event = contracts
            .iter()
            .enumerate()
            .map(|(i, c)| ((c.aggregate_type, c.event_type), i))
            .collect();
        let by_record = contracts
            .iter()
            .enumerate()
            .map(|(i, c)| (c.record_name.clone(), i))
            .collect();
        Ok(Self {
            contracts,
            by_event,
            by_record,
        })
    }

    /// The process-wide catalogue. The schemas are compiled in and checked by this crate's tests,
    /// so a failure here is a build defect, reported once at first use.
    pub fn global() -> Result<&'static Self, SchemaError> {
        static GLOBAL: OnceLock<Result<Contracts, SchemaError>> = OnceLock::new();
        GLOBAL
            .get_or_init(Self::load)
            .as_ref()
            .map_err(Clone::clone)
    }

    pub fn iter(&self) -> impl Iterator<Item = &EventContract> {
        self.contracts.iter()
    }

    /// The contract of one event type.
    pub fn get(
        &self,
        aggregate_type: &str,
        event_type: &str,
    ) -> Result<&EventContract, SchemaError> {
        self.by_event
            .iter()
            .find(|((a, e), _)| *a == aggregate_type && *e == event_type)
            .map(|(_, i)| &self.contracts[*i])
            .ok_or_else(|| SchemaError::UnknownEvent {
                aggregate_type: aggregate_type.to_owned(),
                event_type: event_type.to_owned(),
            })
    }

    /// The contract whose record has this full name (what a decoder reports).
    pub fn by_record_name(&self, record_name: &str) -> Result<&EventContract, SchemaError> {
        self.by_record
            .get(record_name)
            .map(|i| &self.contracts[*i])
            .ok_or_else(|| SchemaError::UnknownRecord(record_name.to_owned()))
    }

    /// Splits a stored payload (`{"OrderPlaced": {...}}`, serde's externally tagged enum) and
    /// maps its body to Avro.
    pub fn payload_to_avro(
        &self,
        aggregate_type: &str,
        payload: &Json,
    ) -> Result<(&EventContract, Avro), SchemaError> {
        let (event_type, body) = split_payload(payload)?;
        let contract = self.get(aggregate_type, event_type)?;
        Ok((contract, contract.to_avro(body)?))
    }

    /// A domain event to its contract and Avro value.
    pub fn event_to_avro<E: Serialize>(
        &self,
        aggregate_type: &str,
        event: &E,
    ) -> Result<(&EventContract, Avro), SchemaError> {
        let payload =
            serde_json::to_value(event).map_err(|e| SchemaError::Mapping(e.to_string()))?;
        self.payload_to_avro(aggregate_type, &payload)
    }

    /// An Avro value written with any version of `contract` back to the domain event.
    pub fn avro_to_event<E: DeserializeOwned>(
        &self,
        contract: &EventContract,
        value: Avro,
    ) -> Result<E, SchemaError> {
        contract.event_from_avro(&contract.resolve(value)?)
    }

    /// The same as [`Self::avro_to_event`], through the payload JSON: the path the direct one
    /// must agree with.
    pub fn avro_to_event_via_json<E: DeserializeOwned>(
        &self,
        contract: &EventContract,
        value: Avro,
    ) -> Result<E, SchemaError> {
        let body = contract.from_avro(value)?;
        let mut tagged = serde_json::Map::with_capacity(1);
        tagged.insert(contract.event_type.to_owned(), body);
        serde_json::from_value(Json::Object(tagged)).map_err(|e| {
            SchemaError::Mapping(format!(
                "{} does not fit the domain event: {e}",
                contract.event_type
            ))
        })
    }
}

/// `{"OrderPlaced": {...}}` → `("OrderPlaced", {...})`.
pub fn split_payload(payload: &Json) -> Result<(&str, &Json), SchemaError> {
    match payload {
        Json::Object(map) if map.len() == 1 => map
            .iter()
            .next()
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| SchemaError::Mapping("empty payload".to_owned())),
        _ => Err(SchemaError::Mapping(
            "a stored payload is an object with exactly one key, the event type".to_owned(),
        )),
    }
}
