//! Submitted schemas: parsing at the boundary, and the normalised form that decides identity.
//!
//! Two submissions are the same schema (same global id, no new version) when their normalised
//! forms are equal. The form starts from the parsed schema, so whitespace, the order of JSON
//! attributes and the way a name is spelled (`"name": "a.B"` or `"namespace": "a", "name": "B"`)
//! do not count, and it drops `doc`, which no reader uses. Unlike Avro's Parsing Canonical Form
//! (`Schema::canonical_form()`) it keeps field defaults, aliases, logical types and custom
//! attributes: the Parsing Canonical Form makes `{"type":"long","logicalType":"timestamp-millis"}`
//! and `"long"`, or a field with and without a default, one schema, and a registry that gave them
//! one id would hand readers a schema other than the one the writer used. References are part of
//! the identity, as in the Confluent registry.

use apache_avro::Schema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The only schema type this registry accepts.
pub(crate) const AVRO: &str = "AVRO";

/// A Confluent schema reference: the named type `name` is the schema registered as `version`
/// of `subject`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SchemaReference {
    /// The name the referencing schema uses (the full name of the Avro type).
    pub name: String,
    /// Subject of the referenced schema.
    pub subject: String,
    /// Version of the referenced schema in that subject.
    pub version: i32,
}

/// A submitted schema that parsed, with what the registry needs to store and compare it.
#[derive(Debug)]
pub(crate) struct ParsedSchema {
    /// The text as submitted, stored and returned to clients.
    pub text: String,
    /// Its references, as submitted.
    pub references: Vec<SchemaReference>,
    /// The normalised form that decides identity.
    pub identity: String,
    /// The schema with its references inlined, for compatibility checks.
    pub resolved: Schema,
}

/// Parses an Avro schema `text` whose references resolve to the schema texts `referenced`
/// (every schema reachable through them, each once). The error says why it is not a valid schema.
pub(crate) fn parse_avro(
    text: &str,
    references: Vec<SchemaReference>,
    referenced: &[String],
) -> Result<ParsedSchema, String> {
    let (schema, resolved) = if referenced.is_empty() {
        let schema = Schema::parse_str(text).map_err(|e| e.to_string())?;
        (schema.clone(), schema)
    } else {
        let (schema, schemata) = Schema::parse_str_with_list(text, referenced.iter())
            .map_err(|e| format!("{e} (with its references)"))?;
        let mut resolved = schema.clone();
        resolved
            .denormalize(&schemata)
            .map_err(|e| format!("{e} (with its references)"))?;
        (schema, resolved)
    };
    let mut identity = normalised_form(&schema)?;
    if !references.is_empty() {
        identity.push_str("\nreferences:");
        identity.push_str(&serde_json::to_string(&references).map_err(|e| e.to_string())?);
    }
    Ok(ParsedSchema {
        text: text.to_owned(),
        references,
        identity,
        resolved,
    })
}

/// The normalised JSON of a parsed schema: attributes sorted, no whitespace, no `doc`.
fn normalised_form(schema: &Schema) -> Result<String, String> {
    let json = serde_json::to_value(schema).map_err(|e| e.to_string())?;
    let mut out = String::new();
    write_schema(&json, &mut out);
    Ok(out)
}

/// Writes a schema node: a type name, a union (array of schemas) or a complex type (object).
fn write_schema(node: &Value, out: &mut String) {
    match node {
        Value::Array(branches) => {
            out.push('[');
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_schema(branch, out);
            }
            out.push(']');
        }
        Value::Object(attributes) => write_object(attributes, out, |key, value, out| match key {
            "doc" => false,
            "items" | "values" => {
                write_schema(value, out);
                true
            }
            "type" if value.is_object() || value.is_array() => {
                write_schema(value, out);
                true
            }
            "fields" => {
                write_fields(value, out);
                true
            }
            _ => {
                write_plain(value, out);
                true
            }
        }),
        other => write_plain(other, out),
    }
}

/// Writes the `fields` of a record: each field's `type` is a schema node, its `default` is data.
fn write_fields(fields: &Value, out: &mut String) {
    let Value::Array(fields) = fields else {
        write_plain(fields, out);
        return;
    };
    out.push('[');
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match field {
            Value::Object(attributes) => {
                write_object(attributes, out, |key, value, out| match key {
                    "doc" => false,
                    "type" => {
                        write_schema(value, out);
                        true
                    }
                    _ => {
                        write_plain(value, out);
                        true
                    }
                })
            }
            other => write_plain(other, out),
        }
    }
    out.push(']');
}

/// Writes an object with its keys sorted; `write_value` writes the value of a key and returns
/// false to leave the key out.
fn write_object(
    attributes: &Map<String, Value>,
    out: &mut String,
    mut write_value: impl FnMut(&str, &Value, &mut String) -> bool,
) {
    let mut keys: Vec<&String> = attributes.keys().collect();
    keys.sort();
    out.push('{');
    let mut first = true;
    for key in keys {
        let Some(value) = attributes.get(key) else {
            continue;
        };
        let mark = out.len();
        if !first {
            out.push(',');
        }
        write_plain(&Value::String(key.clone()), out);
        out.push(':');
        if write_value(key, value, out) {
            first = false;
        } else {
            out.truncate(mark);
        }
    }
    out.push('}');
}

/// Writes data (a default value, a custom attribute) as compact JSON with sorted keys.
fn write_plain(value: &Value, out: &mut String) {
    match value {
        Value::Object(attributes) => write_object(attributes, out, |_, value, out| {
            write_plain(value, out);
            true
        }),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_plain(item, out);
            }
            out.push(']');
        }
        // Scalars print the same whatever serde_json's map order feature says.
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn identity(text: &str) -> String {
        parse_avro(text, Vec::new(), &[])
            .expect("test schema parses")
            .identity
    }

    #[test]
    fn whitespace_attribute_order_doc_and_name_spelling_do_not_change_the_identity() {
        let a = identity(
            r#"{"type":"record","name":"Order","namespace":"shop","doc":"An order",
                "fields":[{"name":"id","type":"string","doc":"the id"},
                          {"name":"lines","type":{"type":"array","items":"int"}}]}"#,
        );
        let b = identity(
            r#"{ "fields": [ {"type": "string", "name": "id"},
                             {"type": {"items": "int", "type": "array"}, "name": "lines"} ],
                 "name": "shop.Order", "type": "record" }"#,
        );
        assert_eq!(a, b);
        assert!(!a.contains("doc"), "{a}");
    }

    #[test]
    fn defaults_logical_types_and_aliases_change_the_identity() {
        let plain =
            identity(r#"{"type":"record","name":"R","fields":[{"name":"t","type":"long"}]}"#);
        let with_default = identity(
            r#"{"type":"record","name":"R","fields":[{"name":"t","type":"long","default":0}]}"#,
        );
        let with_logical_type = identity(
            r#"{"type":"record","name":"R","fields":[{"name":"t","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#,
        );
        let with_alias = identity(
            r#"{"type":"record","name":"R","fields":[{"name":"t","type":"long","aliases":["u"]}]}"#,
        );
        assert_ne!(plain, with_default);
        assert_ne!(plain, with_logical_type);
        assert_ne!(plain, with_alias);
    }

    #[test]
    fn a_default_that_is_a_record_keeps_its_doc_key() {
        let text = r#"{"type":"record","name":"R","fields":[{"name":"n","default":{"doc":"x"},
            "type":{"type":"record","name":"N","fields":[{"name":"doc","type":"string"}]}}]}"#;
        assert!(identity(text).contains(r#""default":{"doc":"x"}"#));
    }

    #[test]
    fn invalid_schemas_are_refused_with_a_reason() {
        assert!(parse_avro(r#"{"type":"record","name":"R"}"#, Vec::new(), &[]).is_err());
        assert!(parse_avro("not json", Vec::new(), &[]).is_err());
        assert!(parse_avro(r#""nosuchtype""#, Vec::new(), &[]).is_err());
    }

    #[test]
    fn a_schema_parses_with_its_references_inlined_for_checks() {
        let referenced = vec![
            r#"{"type":"record","name":"Money","namespace":"shop","fields":[{"name":"minor","type":"long"}]}"#
                .to_owned(),
        ];
        let references = vec![SchemaReference {
            name: "shop.Money".into(),
            subject: "money".into(),
            version: 1,
        }];
        let parsed = parse_avro(
            r#"{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"total","type":"Money"}]}"#,
            references,
            &referenced,
        )
        .expect("parses with references");
        assert!(parsed.identity.contains("references:"));
        let inlined = serde_json::to_string(&parsed.resolved).expect("serializes");
        assert!(inlined.contains("minor"), "{inlined}");
    }
}
