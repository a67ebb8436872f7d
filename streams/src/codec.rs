//! Event records in the Confluent wire format: magic byte 0, the 4-byte schema id, the Avro body.
//! Schemas are registered (and checked for compatibility by the registry) under
//! TopicRecordNameStrategy subjects; see `schemas::contracts`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::types::Value as Avro;
use rdkafka::message::Message;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{is_compatible_schema, SrSettings};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    RawError, SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use schemas::{Contracts, EventContract, SchemaError};
use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use crate::config::RegistryConfig;
use crate::headers::{EventMeta, HeaderError};

/// Encodes event payloads for a topic, registering their contracts on first use.
pub struct EventEncoder {
    encoder: AvroEncoder,
    settings: SrSettings,
    contracts: &'static Contracts,
    /// Subject strategies per (topic, record), built once: they carry the schema text.
    strategies: RwLock<HashMap<(String, &'static str), Arc<SubjectNameStrategy>>>,
}

impl std::fmt::Debug for EventEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventEncoder").finish_non_exhaustive()
    }
}

/// Why an event could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Contract(#[from] SchemaError),
    #[error("schema registry: {0}")]
    Registry(#[from] SRCError),
    #[error(
        "the contract of {subject} is not compatible with the versions registered under it; \
         fix the .avsc (new fields need defaults) or evolve it as a new event type"
    )]
    Incompatible { subject: String },
}

impl EventEncoder {
    pub fn new(registry: &RegistryConfig) -> Result<Self, EncodeError> {
        let settings = registry.settings()?;
        Ok(Self {
            encoder: AvroEncoder::new(settings.clone()),
            settings,
            contracts: Contracts::global()?,
            strategies: RwLock::new(HashMap::new()),
        })
    }

    /// The contracts this encoder maps with.
    pub fn contracts(&self) -> &'static Contracts {
        self.contracts
    }

    /// Checks every contract against what the registry holds for its subject on `topic`, before
    /// anything is encoded with it: an incompatible change stops the relay at start-up instead
    /// of failing event by event. A subject the registry does not know yet is new, hence fine.
    pub async fn check_compatibility(
        &self,
        topic_of: impl Fn(&str) -> Option<String>,
    ) -> Result<(), EncodeError> {
        for contract in self.contracts.iter() {
            let Some(topic) = topic_of(contract.aggregate_type) else {
                continue;
            };
            let subject = contract.subject(&topic);
            let supplied = SuppliedSchema::new(
                Some(contract.record_name.clone()),
                SchemaType::Avro,
                contract.schema_text.to_owned(),
            );
            match is_compatible_schema(&self.settings, subject.clone(), supplied).await {
                Ok(true) => {}
                Ok(false) => return Err(EncodeError::Incompatible { subject }),
                Err(e) if subject_not_found(&e) => {}
                Err(e) => return Err(EncodeError::Registry(e)),
            }
        }
        Ok(())
    }

    /// Encodes a stored payload (already upcast to the current version) for `topic`.
    pub async fn encode_payload(
        &self,
        topic: &str,
        aggregate_type: &str,
        payload: &Json,
    ) -> Result<(&'static EventContract, Vec<u8>), EncodeError> {
        let (contract, value) = self.contracts.payload_to_avro(aggregate_type, payload)?;
        let bytes = self.encode_value(topic, contract, value).await?;
        Ok((contract, bytes))
    }

    /// Encodes an Avro value of `contract` for `topic`.
    pub async fn encode_value(
        &self,
        topic: &str,
        contract: &'static EventContract,
        value: Avro,
    ) -> Result<Vec<u8>, EncodeError> {
        let strategy = self.strategy(topic, contract);
        let result = self.encoder.encode_value(value, &strategy).await;
        result.map_err(|e| {
            // A registry that was down must not stay "down" in the encoder's cache.
            self.encoder.remove_errors_from_cache();
            EncodeError::Registry(e)
        })
    }
}

/// Whether the registry answered "subject not found" (its error code 40401): a subject it does
/// not know yet, which any schema is compatible with.
fn subject_not_found(error: &SRCError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<RawError>())
        .is_some_and(|raw| raw.error_code == 40401)
}

impl EventEncoder {
    fn strategy(&self, topic: &str, contract: &'static EventContract) -> Arc<SubjectNameStrategy> {
        let key = (topic.to_owned(), contract.record_name.as_str());
        if let Some(found) = self
            .strategies
            .read()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            return found;
        }
        let built = Arc::new(strategy(topic, contract));
        if let Ok(mut map) = self.strategies.write() {
            map.insert(key, built.clone());
        }
        built
    }
}

/// The subject strategy of an event contract on a topic.
pub fn strategy(topic: &str, contract: &EventContract) -> SubjectNameStrategy {
    SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
        topic.to_owned(),
        SuppliedSchema::new(
            Some(contract.record_name.clone()),
            SchemaType::Avro,
            contract.schema_text.to_owned(),
        ),
    )
}

/// An event read from a topic: its metadata (headers) and its payload, resolved to the current
/// contract.
#[derive(Debug, Clone)]
pub struct DecodedEvent {
    pub meta: EventMeta,
    pub contract: &'static EventContract,
    /// The payload as an Avro value of the current contract (resolved from the writer's
    /// version): the body of the domain's externally tagged enum.
    pub value: Avro,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Broker timestamp of the record in milliseconds since the epoch, if any.
    pub timestamp_ms: Option<i64>,
}

impl DecodedEvent {
    /// The domain event, read straight from the Avro value.
    pub fn event<E: DeserializeOwned>(&self) -> Result<E, SchemaError> {
        self.contract.event_from_avro(&self.value)
    }

    /// The payload in the domain's JSON form (the body of the externally tagged enum).
    pub fn payload(&self) -> Result<Json, SchemaError> {
        self.contract.from_avro_as_is(&self.value)
    }
}

/// Why a record could not be decoded. `Retryable` errors (registry unreachable) are worth
/// retrying; the others are poison: the same bytes will never decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value")]
    EmptyValue,
    #[error("record headers: {0}")]
    Headers(#[from] HeaderError),
    #[error("Avro body: {0}")]
    Avro(#[source] SRCError),
    #[error("schema registry unavailable: {0}")]
    Retryable(#[source] SRCError),
    #[error(transparent)]
    Contract(#[from] SchemaError),
}

impl DecodeError {
    pub const fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// Decodes event records through the registry.
pub struct EventDecoder {
    decoder: AvroDecoder,
    contracts: &'static Contracts,
    current: RwLock<HashMap<u32, bool>>,
}

impl std::fmt::Debug for EventDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventDecoder").finish_non_exhaustive()
    }
}

impl EventDecoder {
    pub fn new(registry: &RegistryConfig) -> Result<Self, DecodeError> {
        Ok(Self {
            decoder: AvroDecoder::new(registry.settings().map_err(DecodeError::Retryable)?),
            contracts: Contracts::global()?,
            current: RwLock::new(HashMap::new()),
        })
    }

    /// [`Self::decode`], waiting out an unreachable registry (the same bytes decode once it is
    /// back): a retryable failure is tried again after 100 ms, the pause doubling up to 5 s, at
    /// most `max_retries` times (`None`: until the registry answers). `on_retry` hears of each
    /// failure retried; any other failure is returned at once.
    pub async fn decode_waiting(
        &self,
        message: &impl Message,
        max_retries: Option<u32>,
        on_retry: impl Fn(&DecodeError),
    ) -> Result<DecodedEvent, DecodeError> {
        let mut pause = std::time::Duration::from_millis(100);
        let mut retries = 0;
        loop {
            match self.decode(message).await {
                Err(e) if e.is_retryable() && max_retries.is_none_or(|max| retries < max) => {
                    on_retry(&e);
                    retries += 1;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
                outcome => return outcome,
            }
        }
    }

    /// Decodes one record.
    pub async fn decode(&self, message: &impl Message) -> Result<DecodedEvent, DecodeError> {
        let meta = EventMeta::from_headers(message.headers())?;
        let payload = message.payload().ok_or(DecodeError::EmptyValue)?;
        let decoded = self
            .decoder
            .decode_with_schema(Some(payload))
            .await
            .map_err(|e| self.classify(e))?
            .ok_or(DecodeError::EmptyValue)?;
        let contract = match &decoded.name {
            Some(name) => self.contracts.by_record_name(&name.fullname(None))?,
            None => self.contracts.get(&meta.aggregate_type, &meta.event_type)?,
        };
        let value = if self.is_current(decoded.schema.id, &decoded.schema.parsed, contract) {
            decoded.value
        } else {
            contract.resolve(decoded.value)?
        };
        Ok(DecodedEvent {
            meta,
            contract,
            value,
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
        })
    }

    /// Whether the writer schema with this registry id is the current contract itself, so the
    /// value needs no schema resolution (remembered per id: ids are immutable).
    fn is_current(&self, id: u32, writer: &apache_avro::Schema, contract: &EventContract) -> bool {
        if let Some(known) = self.current.read().ok().and_then(|m| m.get(&id).copied()) {
            return known;
        }
        let same = contract.is_schema(writer);
        if let Ok(mut map) = self.current.write() {
            map.insert(id, same);
        }
        same
    }

    fn classify(&self, error: SRCError) -> DecodeError {
        if error.retriable {
            self.decoder.remove_errors_from_cache();
            DecodeError::Retryable(error)
        } else {
            DecodeError::Avro(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::types::Value as Avro;
    use domain::order::OrderEvent;
    use serde_json::json;

    use super::{Contracts, DecodedEvent, EventMeta};

    fn decoded(event_type: &str, value: Avro) -> DecodedEvent {
        DecodedEvent {
            meta: EventMeta::default(),
            contract: Contracts::global()
                .and_then(|c| c.get("order", event_type))
                .expect("contract"),
            value,
            topic: String::new(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
        }
    }

    #[test]
    fn the_domain_event_is_read_from_the_avro_value_under_its_event_type() {
        let micros = 1_796_387_400_000_000; // 2026-12-04T12:30:00Z
        let event = decoded(
            "OrderDelivered",
            Avro::Record(vec![(
                "delivered_at".to_owned(),
                Avro::TimestampMicros(micros),
            )]),
        );
        match event.event::<OrderEvent>() {
            Ok(OrderEvent::OrderDelivered { delivered_at }) => {
                assert_eq!(delivered_at.to_rfc3339(), "2026-12-04T12:30:00+00:00");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            event.payload().expect("JSON form"),
            json!({"delivered_at": "2026-12-04T12:30:00Z"})
        );
        let wrong = decoded(
            "OrderDelivered",
            Avro::Record(vec![("delivered_at".to_owned(), Avro::Long(12))]),
        );
        let error = wrong.event::<OrderEvent>().expect_err("not a time");
        assert!(error.to_string().contains("OrderDelivered"), "{error}");
    }
}
