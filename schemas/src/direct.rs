//! A domain event read straight from its Avro value, without the JSON in between.
//!
//! [`AvroDeserializer`] shows an Avro value to `serde` exactly as the JSON that
//! [`crate::mapping::avro_to_json`] makes of it would show itself through `serde_json`: the same
//! conventions (instants as RFC 3339 strings, UUIDs as hyphenated strings, enums as their
//! symbol, `["null", T]` unions as `null` or the value, records as objects), the same visits.
//! Consumers read every event this way, so it must agree with the JSON path; the round-trip
//! tests of every event type check both.
//!
//! What it saves: building, reading and dropping a tree of JSON maps per event (the largest
//! share of a rebuild's decoding, measured with `perf`).

use std::fmt;

use apache_avro::types::Value as Avro;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::value::{MapAccessDeserializer, MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

use crate::SchemaError;

/// Why an Avro value did not fit the type read from it.
#[derive(Debug)]
pub struct DirectError(String);

impl fmt::Display for DirectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DirectError {}

impl de::Error for DirectError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// Reads `{event_type: value}`, serde's externally tagged form of a domain event, from the Avro
/// value of the event's body.
pub(crate) fn tagged_from_avro<E: DeserializeOwned>(
    event_type: &str,
    value: &Avro,
) -> Result<E, SchemaError> {
    let tagged = MapAccessDeserializer::new(MapDeserializer::<_, DirectError>::new(
        std::iter::once((event_type, AvroDeserializer(value))),
    ));
    E::deserialize(tagged).map_err(|e| {
        SchemaError::Mapping(format!("{event_type} does not fit the domain event: {e}"))
    })
}

/// A `serde` deserializer over one Avro value, in the domain's JSON conventions.
#[derive(Debug, Clone, Copy)]
pub struct AvroDeserializer<'a>(pub &'a Avro);

impl<'de> IntoDeserializer<'de, DirectError> for AvroDeserializer<'de> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

fn instant<'de, V: Visitor<'de>>(
    at: Option<DateTime<Utc>>,
    raw: i64,
    visitor: V,
) -> Result<V::Value, DirectError> {
    let at = at.ok_or_else(|| DirectError(format!("timestamp {raw} is out of range")))?;
    visitor.visit_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// An integer as `serde_json` reports a number: non-negative ones as `u64`.
fn integer<'de, V: Visitor<'de>>(value: i64, visitor: V) -> Result<V::Value, DirectError> {
    match u64::try_from(value) {
        Ok(unsigned) => visitor.visit_u64(unsigned),
        Err(_) => visitor.visit_i64(value),
    }
}

/// The entries of a record or map, keys as strings (a map's in key order, as in a JSON object).
fn entries<'de>(value: &'de Avro) -> Option<Vec<(&'de str, AvroDeserializer<'de>)>> {
    match value {
        Avro::Record(fields) => Some(
            fields
                .iter()
                .map(|(k, v)| (k.as_str(), AvroDeserializer(v)))
                .collect(),
        ),
        Avro::Map(map) => {
            let mut sorted: Vec<_> = map
                .iter()
                .map(|(k, v)| (k.as_str(), AvroDeserializer(v)))
                .collect();
            sorted.sort_unstable_by_key(|(k, _)| *k);
            Some(sorted)
        }
        _ => None,
    }
}

impl<'de> de::Deserializer<'de> for AvroDeserializer<'de> {
    type Error = DirectError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DirectError> {
        match self.0 {
            Avro::Null => visitor.visit_unit(),
            Avro::Boolean(b) => visitor.visit_bool(*b),
            Avro::Int(i) | Avro::Date(i) | Avro::TimeMillis(i) => integer(i64::from(*i), visitor),
            Avro::Long(l) | Avro::TimeMicros(l) => integer(*l, visitor),
            Avro::Float(f) if f.is_finite() => visitor.visit_f64(f64::from(*f)),
            Avro::Double(d) if d.is_finite() => visitor.visit_f64(*d),
            // JSON has no NaN or infinity: the JSON path makes them null.
            Avro::Float(_) | Avro::Double(_) => visitor.visit_unit(),
            Avro::String(s) | Avro::Enum(_, s) => visitor.visit_borrowed_str(s),
            Avro::Uuid(u) => {
                let mut buffer = uuid::Uuid::encode_buffer();
                visitor.visit_str(u.hyphenated().encode_lower(&mut buffer))
            }
            Avro::TimestampMicros(t) | Avro::LocalTimestampMicros(t) => {
                instant(DateTime::from_timestamp_micros(*t), *t, visitor)
            }
            Avro::TimestampMillis(t) | Avro::LocalTimestampMillis(t) => {
                instant(DateTime::from_timestamp_millis(*t), *t, visitor)
            }
            Avro::Union(_, inner) => Self(inner).deserialize_any(visitor),
            Avro::Array(items) => {
                let mut seq = SeqDeserializer::new(items.iter().map(AvroDeserializer));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Avro::Record(_) | Avro::Map(_) => {
                let mut map = MapDeserializer::new(entries(self.0).unwrap_or_default().into_iter());
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
            other => Err(DirectError(format!(
                "Avro value {other:?} has no JSON form in the contracts"
            ))),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DirectError> {
        match self.0 {
            Avro::Null => visitor.visit_none(),
            Avro::Union(_, inner) => Self(inner).deserialize_option(visitor),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DirectError> {
        match self.0 {
            Avro::String(s) | Avro::Enum(_, s) => visitor.visit_enum(
                IntoDeserializer::<DirectError>::into_deserializer(s.as_str()),
            ),
            Avro::Union(_, inner) => Self(inner).deserialize_enum(name, variants, visitor),
            value => match entries(value) {
                Some(entries) if entries.len() == 1 => visitor.visit_enum(
                    MapAccessDeserializer::new(MapDeserializer::new(entries.into_iter())),
                ),
                _ => Err(DirectError(format!(
                    "{name}: expected a string or an object with one key, got {value:?}"
                ))),
            },
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DirectError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DirectError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier
    }
}
