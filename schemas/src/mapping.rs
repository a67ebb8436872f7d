//! The one mapping between the JSON form of a domain event (its `serde` shape, as stored in the
//! event store) and its Avro form (as sent on the topics), driven by the event's `.avsc`.
//!
//! One schema-driven mapping instead of a hand-written struct per event type: the `.avsc` file is
//! the single source of truth for field names and types, and the round-trip test of every event
//! type proves that the domain's serde shape and the contract agree. Conventions:
//! - `timestamp-micros` / `timestamp-millis` ⇄ RFC 3339 strings (chrono's serde form);
//! - `uuid` ⇄ hyphenated strings; enums ⇄ their symbol as a string;
//! - `["null", T]` unions ⇄ `null` or the value; records ⇄ objects (unknown JSON fields are an
//!   error, missing ones take the field's default if it has one).

use std::collections::HashMap;

use apache_avro::schema::{Name, RecordSchema, Schema, UnionSchema};
use apache_avro::types::Value as Avro;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Number, Value as Json};

use crate::SchemaError;

/// Named types of one schema, so that `Ref`s can be followed (built once per contract).
#[derive(Debug, Default)]
pub(crate) struct Names(HashMap<String, Schema>);

impl Names {
    pub(crate) fn of(schema: &Schema) -> Self {
        let mut names = Self::default();
        names.collect(schema);
        names
    }

    fn collect(&mut self, schema: &Schema) {
        match schema {
            Schema::Record(r) => {
                self.0.insert(fullname(&r.name), schema.clone());
                for field in &r.fields {
                    self.collect(&field.schema);
                }
            }
            Schema::Enum(e) => {
                self.0.insert(fullname(&e.name), schema.clone());
            }
            Schema::Fixed(f) => {
                self.0.insert(fullname(&f.name), schema.clone());
            }
            Schema::Array(a) => self.collect(&a.items),
            Schema::Map(m) => self.collect(&m.types),
            Schema::Union(u) => {
                for variant in u.variants() {
                    self.collect(variant);
                }
            }
            _ => {}
        }
    }

    fn resolve<'a>(&'a self, schema: &'a Schema) -> Result<&'a Schema, SchemaError> {
        match schema {
            Schema::Ref { name } => self
                .0
                .get(&fullname(name))
                .ok_or_else(|| SchemaError::Mapping(format!("unknown named type {name:?}"))),
            other => Ok(other),
        }
    }
}

fn fullname(name: &Name) -> String {
    name.fullname(None)
}

fn mismatch(path: &str, expected: &str, got: &Json) -> SchemaError {
    SchemaError::Mapping(format!("{path}: expected {expected}, got {got}"))
}

/// JSON (the domain's serde form) to an Avro value of `schema`.
pub(crate) fn json_to_avro(
    json: &Json,
    schema: &Schema,
    names: &Names,
    path: &str,
) -> Result<Avro, SchemaError> {
    let schema = names.resolve(schema)?;
    Ok(match (schema, json) {
        (Schema::Null, Json::Null) => Avro::Null,
        (Schema::Boolean, Json::Bool(b)) => Avro::Boolean(*b),
        (Schema::Int, Json::Number(n)) => Avro::Int(
            n.as_i64()
                .and_then(|v| i32::try_from(v).ok())
                .ok_or_else(|| mismatch(path, "a 32-bit integer", json))?,
        ),
        (Schema::Long, Json::Number(n)) => Avro::Long(
            n.as_i64()
                .ok_or_else(|| mismatch(path, "a 64-bit integer", json))?,
        ),
        (Schema::Float, Json::Number(n)) => {
            // Narrowing is what a `float` field means.
            #[allow(clippy::cast_possible_truncation)]
            let v = n.as_f64().ok_or_else(|| mismatch(path, "a number", json))? as f32;
            Avro::Float(v)
        }
        (Schema::Double, Json::Number(n)) => {
            Avro::Double(n.as_f64().ok_or_else(|| mismatch(path, "a number", json))?)
        }
        (Schema::String, Json::String(s)) => Avro::String(s.clone()),
        (Schema::Uuid(_), Json::String(s)) => {
            Avro::Uuid(uuid::Uuid::parse_str(s).map_err(|_| mismatch(path, "a UUID", json))?)
        }
        (Schema::TimestampMicros, Json::String(s)) => Avro::TimestampMicros(
            parse_instant(s)
                .ok_or_else(|| mismatch(path, "an RFC 3339 instant", json))?
                .timestamp_micros(),
        ),
        (Schema::TimestampMillis, Json::String(s)) => Avro::TimestampMillis(
            parse_instant(s)
                .ok_or_else(|| mismatch(path, "an RFC 3339 instant", json))?
                .timestamp_millis(),
        ),
        (Schema::Enum(e), Json::String(s)) => {
            let index = e
                .symbols
                .iter()
                .position(|sym| sym == s)
                .ok_or_else(|| mismatch(path, &format!("one of {:?}", e.symbols), json))?;
            Avro::Enum(u32::try_from(index).unwrap_or(u32::MAX), s.clone())
        }
        (Schema::Array(a), Json::Array(items)) => Avro::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| json_to_avro(item, &a.items, names, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (Schema::Map(m), Json::Object(entries)) => Avro::Map(
            entries
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        json_to_avro(v, &m.types, names, &format!("{path}.{k}"))?,
                    ))
                })
                .collect::<Result<_, SchemaError>>()?,
        ),
        (Schema::Union(u), _) => union_to_avro(json, u, names, path)?,
        (Schema::Record(r), Json::Object(object)) => record_to_avro(object, r, names, path)?,
        _ => return Err(mismatch(path, &format!("{schema:?}"), json)),
    })
}

/// The first member of the union the value maps to, or why the last one refused it.
fn union_to_avro(
    json: &Json,
    union: &UnionSchema,
    names: &Names,
    path: &str,
) -> Result<Avro, SchemaError> {
    let mut last_error = None;
    for (index, variant) in union.variants().iter().enumerate() {
        match json_to_avro(json, variant, names, path) {
            Ok(value) => {
                return Ok(Avro::Union(
                    u32::try_from(index).unwrap_or(u32::MAX),
                    Box::new(value),
                ))
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| mismatch(path, "a union member", json)))
}

fn record_to_avro(
    object: &Map<String, Json>,
    record: &RecordSchema,
    names: &Names,
    path: &str,
) -> Result<Avro, SchemaError> {
    if let Some(unknown) = object.keys().find(|k| !record.lookup.contains_key(*k)) {
        return Err(SchemaError::Mapping(format!(
            "{path}.{unknown}: field not in the contract {}; add it to the .avsc (with a default)",
            fullname(&record.name)
        )));
    }
    let mut fields = Vec::with_capacity(record.fields.len());
    for field in &record.fields {
        let field_path = format!("{path}.{}", field.name);
        let value = match (object.get(&field.name), &field.default) {
            (Some(value), _) => json_to_avro(value, &field.schema, names, &field_path)?,
            (None, Some(default)) => json_to_avro(default, &field.schema, names, &field_path)
                .or_else(|_| {
                    // A union's default belongs to its first member.
                    match names.resolve(&field.schema)? {
                        Schema::Union(u) => match u.variants().first() {
                            Some(first) => Ok(Avro::Union(
                                0,
                                Box::new(json_to_avro(default, first, names, &field_path)?),
                            )),
                            None => Err(mismatch(&field_path, "a union member", default)),
                        },
                        _ => Err(mismatch(&field_path, "a valid default", default)),
                    }
                })?,
            (None, None) if is_nullable(&field.schema, names) => {
                json_to_avro(&Json::Null, &field.schema, names, &field_path)?
            }
            (None, None) => {
                return Err(SchemaError::Mapping(format!(
                    "{field_path}: required by the contract but missing"
                )))
            }
        };
        fields.push((field.name.clone(), value));
    }
    Ok(Avro::Record(fields))
}

fn is_nullable(schema: &Schema, names: &Names) -> bool {
    match names.resolve(schema) {
        Ok(Schema::Null) => true,
        Ok(Schema::Union(u)) => u.variants().iter().any(|v| matches!(v, Schema::Null)),
        _ => false,
    }
}

fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn instant(t: Option<DateTime<Utc>>, raw: i64) -> Result<Json, SchemaError> {
    t.map(|t| Json::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
        .ok_or_else(|| SchemaError::Mapping(format!("timestamp {raw} is out of range")))
}

/// An Avro value (decoded with the writer's schema and resolved to ours) to JSON in the domain's
/// serde form.
pub(crate) fn avro_to_json(value: &Avro) -> Result<Json, SchemaError> {
    Ok(match value {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => Json::Bool(*b),
        Avro::Int(i) | Avro::Date(i) | Avro::TimeMillis(i) => Json::from(*i),
        Avro::Long(l) | Avro::TimeMicros(l) => Json::from(*l),
        Avro::Float(f) => Number::from_f64(f64::from(*f)).map_or(Json::Null, Json::Number),
        Avro::Double(d) => Number::from_f64(*d).map_or(Json::Null, Json::Number),
        Avro::String(s) | Avro::Enum(_, s) => Json::String(s.clone()),
        Avro::Uuid(u) => Json::String(u.to_string()),
        Avro::TimestampMicros(t) | Avro::LocalTimestampMicros(t) => {
            instant(DateTime::from_timestamp_micros(*t), *t)?
        }
        Avro::TimestampMillis(t) | Avro::LocalTimestampMillis(t) => {
            instant(DateTime::from_timestamp_millis(*t), *t)?
        }
        Avro::Union(_, inner) => avro_to_json(inner)?,
        Avro::Array(items) => {
            Json::Array(items.iter().map(avro_to_json).collect::<Result<_, _>>()?)
        }
        Avro::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), avro_to_json(v)?)))
                .collect::<Result<_, SchemaError>>()?,
        ),
        Avro::Record(fields) => Json::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), avro_to_json(v)?)))
                .collect::<Result<_, SchemaError>>()?,
        ),
        other => {
            return Err(SchemaError::Mapping(format!(
                "Avro value {other:?} has no JSON form in the contracts"
            )))
        }
    })
}
