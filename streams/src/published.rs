//! A stored event in its published form: the one mapping from an event-store row to what a
//! topic record carries (the payload upcast to its current version, the metadata headers). The
//! relay publishes this form; rebuilds, exports and the chain's topic check compare against it.

use commands::log::StoredEvent;
use serde_json::Value as Json;

use crate::EventMeta;

/// A stored event as the relay publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The record's headers.
    pub meta: EventMeta,
    /// The payload in its current version (`meta.event_version`), in its
    /// `{"<EventType>": ...}` envelope: what the contract maps to Avro.
    pub payload: Json,
}

impl Published {
    /// The published form of a stored event.
    pub fn of(stored: StoredEvent) -> Self {
        let StoredEvent {
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            event_version,
            payload,
            metadata,
            event_id,
            recorded_at,
        } = stored;
        let (version, payload) = schemas::upcast(&event_type, &event_version, payload);
        let meta = EventMeta {
            event_id,
            aggregate_type,
            aggregate_id,
            sequence: u64::try_from(sequence).unwrap_or_default(),
            event_type,
            event_version: version,
            ..EventMeta::default()
        }
        .with_stored(&metadata, recorded_at);
        Self { meta, payload }
    }

    /// The payload's body, out of its envelope.
    pub fn body(&self) -> Json {
        StoredEvent::body(self.payload.clone(), &self.meta.event_type)
    }
}
