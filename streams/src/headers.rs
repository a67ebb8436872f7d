//! The metadata of an event record, carried as Kafka headers (UTF-8 strings). Header names are
//! contracts: consumers outside this project read them; never rename one.

use rdkafka::message::{Header, Headers, OwnedHeaders};
use uuid::Uuid;

pub const EVENT_ID: &str = "event_id";
pub const AGGREGATE_TYPE: &str = "aggregate_type";
pub const AGGREGATE_ID: &str = "aggregate_id";
pub const SEQUENCE: &str = "sequence";
pub const EVENT_TYPE: &str = "event_type";
pub const EVENT_VERSION: &str = "event_version";
pub const OCCURRED_AT: &str = "occurred_at";
pub const RECORDED_AT: &str = "recorded_at";
pub const CORRELATION_ID: &str = "correlation_id";
pub const CAUSATION_ID: &str = "causation_id";
pub const ACTOR: &str = "actor";
pub const COMMAND_ID: &str = "command_id";
/// W3C trace context of the command span that appended the event, as stored (consumers start
/// their spans under it; the header is the stored value so that the topics keep the event's
/// metadata whole); absent when the event has none.
pub const TRACEPARENT: &str = commands::trace::TRACEPARENT;
/// The event's place in its aggregate's hash chain (hex SHA-256, computed by the event store):
/// the chain hash of the event before it (zeros for the first), and its own.
pub const CHAIN_PREV: &str = "chain_prev";
pub const CHAIN_HASH: &str = "chain_hash";
/// The event exactly as the store holds it: its stored `event_version`, and the `payload` and
/// `metadata` columns' JSON text byte for byte. The record's value is the payload upcast and
/// mapped to Avro, which loses what the chain hash covers (the text's key order, timestamps'
/// nanoseconds, the stored shape of an upcast event); with these the topics are a verifiable copy
/// of the store, from which `replay-tools restore` rebuilds it after a disaster.
pub const STORED_VERSION: &str = "stored_version";
pub const STORED_PAYLOAD: &str = "stored_payload";
pub const STORED_METADATA: &str = "stored_metadata";

/// `headers` plus the chain headers (`chain_prev`, `chain_hash`) as lowercase hex.
pub fn with_chain(headers: OwnedHeaders, prev: &[u8], hash: &[u8]) -> OwnedHeaders {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    headers
        .insert(Header {
            key: CHAIN_PREV,
            value: Some(&hex(prev)),
        })
        .insert(Header {
            key: CHAIN_HASH,
            value: Some(&hex(hash)),
        })
}

/// An event's columns as stored, besides those its [`EventMeta`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredText {
    /// The `event_version` it was written in (before any upcast).
    pub version: String,
    /// The `payload` column's text.
    pub payload: String,
    /// The `metadata` column's text.
    pub metadata: String,
}

impl StoredText {
    /// `headers` plus `stored_version`, `stored_payload` and `stored_metadata`.
    pub fn add_to(&self, headers: OwnedHeaders) -> OwnedHeaders {
        [
            (STORED_VERSION, &self.version),
            (STORED_PAYLOAD, &self.payload),
            (STORED_METADATA, &self.metadata),
        ]
        .into_iter()
        .fold(headers, |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value.as_str()),
            })
        })
    }

    /// From a record's headers; `None` when the record carries none of them (published by a
    /// relay older than these headers).
    pub fn from_headers(headers: Option<&impl Headers>) -> Result<Option<Self>, HeaderError> {
        let (mut version, mut payload, mut metadata) = (None, None, None);
        for header in headers.into_iter().flat_map(|h| h.iter()) {
            let slot = match header.key {
                STORED_VERSION => &mut version,
                STORED_PAYLOAD => &mut payload,
                STORED_METADATA => &mut metadata,
                _ => continue,
            };
            let text = header
                .value
                .map(std::str::from_utf8)
                .transpose()
                .map_err(|e| HeaderError::Invalid(header_name(header.key), e.to_string()))?;
            *slot = Some(text.unwrap_or_default().to_owned());
        }
        match (version, payload, metadata) {
            (None, None, None) => Ok(None),
            (Some(version), Some(payload), Some(metadata)) => Ok(Some(Self {
                version,
                payload,
                metadata,
            })),
            (None, ..) => Err(HeaderError::Missing(STORED_VERSION)),
            (_, None, _) => Err(HeaderError::Missing(STORED_PAYLOAD)),
            (.., None) => Err(HeaderError::Missing(STORED_METADATA)),
        }
    }
}

/// The `'static` name of a stored-text header.
fn header_name(key: &str) -> &'static str {
    match key {
        STORED_VERSION => STORED_VERSION,
        STORED_PAYLOAD => STORED_PAYLOAD,
        _ => STORED_METADATA,
    }
}

/// The metadata of one event, as stored and as sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventMeta {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: u64,
    pub event_type: String,
    pub event_version: String,
    /// RFC 3339: when the command that caused it ran.
    pub occurred_at: String,
    /// RFC 3339: when the event store recorded it.
    pub recorded_at: String,
    pub correlation_id: String,
    pub causation_id: String,
    pub actor: String,
    pub command_id: String,
    /// W3C `traceparent`; empty when the event carries no trace.
    pub traceparent: String,
}

/// Why headers could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header `{0}` is missing")]
    Missing(&'static str),
    #[error("header `{0}` is not valid: {1}")]
    Invalid(&'static str, String),
}

impl EventMeta {
    /// Completes the metadata of a stored event from its `metadata` JSON (who and why) and its
    /// `recorded_at` (microseconds, as on the wire); absent values are empty.
    #[must_use]
    pub fn with_stored(
        self,
        metadata: &serde_json::Value,
        recorded_at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Self {
            occurred_at: text("occurred_at"),
            recorded_at: recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            correlation_id: text("correlation_id"),
            causation_id: text("causation_id"),
            actor: text("actor"),
            command_id: text("command_id"),
            traceparent: text(TRACEPARENT),
            ..self
        }
    }

    /// As Kafka headers.
    pub fn to_headers(&self) -> OwnedHeaders {
        let sequence = self.sequence.to_string();
        let event_id = self.event_id.to_string();
        let pairs: [(&str, &str); 12] = [
            (EVENT_ID, &event_id),
            (AGGREGATE_TYPE, &self.aggregate_type),
            (AGGREGATE_ID, &self.aggregate_id),
            (SEQUENCE, &sequence),
            (EVENT_TYPE, &self.event_type),
            (EVENT_VERSION, &self.event_version),
            (OCCURRED_AT, &self.occurred_at),
            (RECORDED_AT, &self.recorded_at),
            (CORRELATION_ID, &self.correlation_id),
            (CAUSATION_ID, &self.causation_id),
            (ACTOR, &self.actor),
            (COMMAND_ID, &self.command_id),
        ];
        let trace = (!self.traceparent.is_empty()).then_some((TRACEPARENT, &*self.traceparent));
        pairs.into_iter().chain(trace).fold(
            OwnedHeaders::new_with_capacity(13),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        )
    }

    /// From Kafka headers. Identity headers are required; descriptive ones default to empty.
    pub fn from_headers(headers: Option<&impl Headers>) -> Result<Self, HeaderError> {
        let mut meta = Self::default();
        let mut event_id = None;
        let mut sequence = None;
        if let Some(headers) = headers {
            for header in headers.iter() {
                let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) else {
                    continue;
                };
                let value = value.to_owned();
                match header.key {
                    EVENT_ID => event_id = Some(value),
                    AGGREGATE_TYPE => meta.aggregate_type = value,
                    AGGREGATE_ID => meta.aggregate_id = value,
                    SEQUENCE => sequence = Some(value),
                    EVENT_TYPE => meta.event_type = value,
                    EVENT_VERSION => meta.event_version = value,
                    OCCURRED_AT => meta.occurred_at = value,
                    RECORDED_AT => meta.recorded_at = value,
                    CORRELATION_ID => meta.correlation_id = value,
                    CAUSATION_ID => meta.causation_id = value,
                    ACTOR => meta.actor = value,
                    COMMAND_ID => meta.command_id = value,
                    TRACEPARENT => meta.traceparent = value,
                    _ => {}
                }
            }
        }
        let event_id = event_id.ok_or(HeaderError::Missing(EVENT_ID))?;
        meta.event_id = Uuid::parse_str(&event_id)
            .map_err(|e| HeaderError::Invalid(EVENT_ID, e.to_string()))?;
        let sequence = sequence.ok_or(HeaderError::Missing(SEQUENCE))?;
        meta.sequence = sequence
            .parse()
            .map_err(|_| HeaderError::Invalid(SEQUENCE, sequence.clone()))?;
        if meta.aggregate_type.is_empty() {
            return Err(HeaderError::Missing(AGGREGATE_TYPE));
        }
        if meta.aggregate_id.is_empty() {
            return Err(HeaderError::Missing(AGGREGATE_ID));
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_headers() {
        let meta = EventMeta {
            event_id: Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: "a1".into(),
            sequence: 7,
            event_type: "OrderPlaced".into(),
            event_version: "1.0".into(),
            occurred_at: "2026-11-21T18:00:00Z".into(),
            recorded_at: "2026-11-21T18:00:00.000001Z".into(),
            correlation_id: "c".into(),
            causation_id: "d".into(),
            actor: "customer:1".into(),
            command_id: "e".into(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        };
        let headers = meta.to_headers();
        assert_eq!(EventMeta::from_headers(Some(&headers)), Ok(meta.clone()));
        // No trace: no header at all (W3C: absent, never empty).
        let untraced = EventMeta {
            traceparent: String::new(),
            ..meta
        };
        let headers = untraced.to_headers();
        assert!(headers.iter().all(|h| h.key != TRACEPARENT));
        assert_eq!(EventMeta::from_headers(Some(&headers)), Ok(untraced));
    }

    #[test]
    fn records_without_identity_headers_are_refused() {
        let headers = OwnedHeaders::new();
        assert_eq!(
            EventMeta::from_headers(Some(&headers)),
            Err(HeaderError::Missing(EVENT_ID))
        );
        assert!(EventMeta::from_headers(None::<&OwnedHeaders>).is_err());
    }

    #[test]
    fn stored_text_round_trips_and_is_all_or_nothing() {
        let stored = StoredText {
            version: "1.0".into(),
            payload: r#"{"OrderPlaced":{"b":1,"a":"x"}}"#.into(),
            metadata: r#"{"z":"1","actor":"customer:1"}"#.into(),
        };
        let headers = stored.add_to(EventMeta::default().to_headers());
        assert_eq!(StoredText::from_headers(Some(&headers)), Ok(Some(stored)));
        assert_eq!(
            StoredText::from_headers(Some(&EventMeta::default().to_headers())),
            Ok(None)
        );
        let partial = OwnedHeaders::new().insert(Header {
            key: STORED_VERSION,
            value: Some("1.0"),
        });
        assert_eq!(
            StoredText::from_headers(Some(&partial)),
            Err(HeaderError::Missing(STORED_PAYLOAD))
        );
    }
}
