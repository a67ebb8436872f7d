//! Compatibility levels and the check that decides whether a new schema may join a subject.
//!
//! The decision uses Avro's schema-resolution rules (`apache_avro::schema_compatibility`), never a
//! comparison of texts: BACKWARD means the new schema can read data written with the previous
//! one, FORWARD that the previous can read data written with the new one, FULL both; the
//! `_TRANSITIVE` levels check against every live version instead of the latest only. A
//! resolution that works only for some data (`Compatibility::Partial`: a missing enum symbol or
//! union branch) counts as incompatible, as in the Java implementation the Confluent registry
//! uses.

use std::fmt;
use std::str::FromStr;

use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::Schema;
use serde::{Serialize, Serializer};

use super::error::error_chain;

/// How a new version of a subject must relate to the versions already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompatibilityLevel {
    /// No check.
    None,
    /// The new schema reads data written with the latest version.
    Backward,
    /// The new schema reads data written with every version.
    BackwardTransitive,
    /// The latest version reads data written with the new schema.
    Forward,
    /// Every version reads data written with the new schema.
    ForwardTransitive,
    /// Backward and forward against the latest version.
    Full,
    /// Backward and forward against every version.
    FullTransitive,
}

impl CompatibilityLevel {
    /// The level when neither the subject nor the registry configured one (Confluent's default).
    pub const DEFAULT: Self = Self::Backward;

    /// The Confluent name, e.g. `BACKWARD_TRANSITIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Whether the check runs against every live version rather than the latest.
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive
        )
    }

    fn checks_backward(self) -> bool {
        matches!(
            self,
            Self::Backward | Self::BackwardTransitive | Self::Full | Self::FullTransitive
        )
    }

    fn checks_forward(self) -> bool {
        matches!(
            self,
            Self::Forward | Self::ForwardTransitive | Self::Full | Self::FullTransitive
        )
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is not one of the seven Confluent level names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compatibility level {0:?}")]
pub struct UnknownCompatibilityLevel(pub String);

impl FromStr for CompatibilityLevel {
    type Err = UnknownCompatibilityLevel;

    /// Case-insensitive, as clients send `backward` as often as `BACKWARD`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let level = match text.trim().to_ascii_uppercase().as_str() {
            "NONE" => Self::None,
            "BACKWARD" => Self::Backward,
            "BACKWARD_TRANSITIVE" => Self::BackwardTransitive,
            "FORWARD" => Self::Forward,
            "FORWARD_TRANSITIVE" => Self::ForwardTransitive,
            "FULL" => Self::Full,
            "FULL_TRANSITIVE" => Self::FullTransitive,
            _ => return Err(UnknownCompatibilityLevel(text.to_owned())),
        };
        Ok(level)
    }
}

impl Serialize for CompatibilityLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A version already in the subject, parsed (references resolved) for the check.
#[derive(Debug)]
pub(crate) struct ExistingVersion {
    pub version: i32,
    pub schema: Schema,
}

/// Why `candidate` may not join a subject whose live versions are `existing` (oldest first)
/// under `level`; empty when it may. With a non-transitive level only the last version counts.
pub(crate) fn incompatibilities(
    level: CompatibilityLevel,
    candidate: &Schema,
    existing: &[ExistingVersion],
) -> Vec<String> {
    let against: &[ExistingVersion] = if level.is_transitive() {
        existing
    } else {
        existing
            .last()
            .map(std::slice::from_ref)
            .unwrap_or_default()
    };
    let mut reasons = Vec::new();
    for previous in against.iter().rev() {
        if level.checks_backward() {
            if let Some(reason) = cannot_read(&previous.schema, candidate) {
                reasons.push(format!(
                    "the new schema cannot read data written with version {} ({level}): {reason}",
                    previous.version
                ));
            }
        }
        if level.checks_forward() {
            if let Some(reason) = cannot_read(candidate, &previous.schema) {
                reasons.push(format!(
                    "version {} cannot read data written with the new schema ({level}): {reason}",
                    previous.version
                ));
            }
        }
    }
    reasons
}

/// Why a reader with `reader` cannot decode every datum written with `writer`, if it cannot.
fn cannot_read(writer: &Schema, reader: &Schema) -> Option<String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => None,
        Ok(Compatibility::Partial) => Some(
            "only part of the data can be read (an enum symbol or a union branch of the writer is missing in the reader)"
                .to_owned(),
        ),
        Err(error) => Some(error_chain(&error)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn schema(text: &str) -> Schema {
        Schema::parse_str(text).expect("test schema parses")
    }

    fn versions(texts: &[&str]) -> Vec<ExistingVersion> {
        texts
            .iter()
            .zip(1..)
            .map(|(text, version)| ExistingVersion {
                version,
                schema: schema(text),
            })
            .collect()
    }

    const V1: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#;
    const WITH_DEFAULT: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"b","type":"string","default":""}]}"#;
    const WITHOUT_DEFAULT: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"b","type":"string"}]}"#;

    #[test]
    fn a_new_field_with_a_default_is_backward_compatible() {
        let reasons = incompatibilities(
            CompatibilityLevel::Backward,
            &schema(WITH_DEFAULT),
            &versions(&[V1]),
        );
        assert!(reasons.is_empty(), "{reasons:?}");
    }

    #[test]
    fn a_new_required_field_is_not_backward_compatible_but_is_forward_compatible() {
        let existing = versions(&[V1]);
        let candidate = schema(WITHOUT_DEFAULT);
        assert_eq!(
            incompatibilities(CompatibilityLevel::Backward, &candidate, &existing).len(),
            1
        );
        assert!(incompatibilities(CompatibilityLevel::Forward, &candidate, &existing).is_empty());
        assert!(!incompatibilities(CompatibilityLevel::Full, &candidate, &existing).is_empty());
        assert!(incompatibilities(CompatibilityLevel::None, &candidate, &existing).is_empty());
    }

    #[test]
    fn transitive_levels_check_every_version_and_plain_ones_only_the_latest() {
        // v1 has a required field c that v2 dropped; the candidate has no c either.
        let v1 = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"c","type":"int"}]}"#;
        let v2 = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#;
        let candidate = schema(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"d","type":"int","default":0}]}"#,
        );
        let existing = versions(&[v1, v2]);
        assert!(incompatibilities(CompatibilityLevel::Forward, &candidate, &existing).is_empty());
        assert_eq!(
            incompatibilities(CompatibilityLevel::ForwardTransitive, &candidate, &existing).len(),
            1
        );
    }

    #[test]
    fn a_removed_enum_symbol_is_not_backward_compatible() {
        let v1 = r#"{"type":"enum","name":"E","symbols":["A","B"]}"#;
        let candidate = schema(r#"{"type":"enum","name":"E","symbols":["A"]}"#);
        assert_eq!(
            incompatibilities(CompatibilityLevel::Backward, &candidate, &versions(&[v1])).len(),
            1
        );
    }

    #[test]
    fn levels_parse_case_insensitively_and_print_in_upper_case() {
        assert_eq!(
            "full_transitive".parse::<CompatibilityLevel>(),
            Ok(CompatibilityLevel::FullTransitive)
        );
        assert_eq!(CompatibilityLevel::Backward.to_string(), "BACKWARD");
        assert!("SIDEWAYS".parse::<CompatibilityLevel>().is_err());
    }
}
