//! Typed payload columns (Parquet, one event type): the Avro contract's leaves as Arrow columns.

use super::*;

/// The Arrow type of a payload leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeafKind {
    Boolean,
    Int32,
    Int64,
    Float32,
    Float64,
    Utf8,
    Timestamp,
    /// Arrays, maps and anything else: JSON text.
    Json,
}

impl LeafKind {
    pub(super) fn data_type(self) -> DataType {
        match self {
            Self::Boolean => DataType::Boolean,
            Self::Int32 => DataType::Int32,
            Self::Int64 => DataType::Int64,
            Self::Float32 => DataType::Float32,
            Self::Float64 => DataType::Float64,
            Self::Utf8 | Self::Json => DataType::Utf8,
            Self::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }
}

/// One typed column: a leaf of the payload, at `path`.
#[derive(Debug, Clone)]
pub(super) struct TypedColumn {
    pub(super) name: String,
    pub(super) path: Vec<String>,
    pub(super) kind: LeafKind,
}

/// The typed columns of a contract; none if two leaves would get the same column name.
pub(super) fn typed_columns(contract: &EventContract) -> Vec<TypedColumn> {
    let mut names = HashMap::new();
    collect_names(&contract.schema, &mut names);
    let mut columns = Vec::new();
    leaves(&contract.schema, &names, &mut Vec::new(), &mut columns, 0);
    let mut seen = std::collections::HashSet::new();
    if columns.iter().all(|c| seen.insert(c.name.clone())) {
        columns
    } else {
        Vec::new()
    }
}

pub(super) fn collect_names(schema: &AvroSchema, names: &mut HashMap<String, AvroSchema>) {
    match schema {
        AvroSchema::Record(r) => {
            names.insert(r.name.fullname(None), schema.clone());
            for field in &r.fields {
                collect_names(&field.schema, names);
            }
        }
        AvroSchema::Enum(e) => {
            names.insert(e.name.fullname(None), schema.clone());
        }
        AvroSchema::Array(a) => collect_names(&a.items, names),
        AvroSchema::Map(m) => collect_names(&m.types, names),
        AvroSchema::Union(u) => {
            for variant in u.variants() {
                collect_names(variant, names);
            }
        }
        _ => {}
    }
}

/// Nesting deeper than this is exported as JSON text.
pub(super) const MAX_DEPTH: usize = 6;

pub(super) fn leaves(
    schema: &AvroSchema,
    names: &HashMap<String, AvroSchema>,
    path: &mut Vec<String>,
    out: &mut Vec<TypedColumn>,
    depth: usize,
) {
    let schema = match schema {
        AvroSchema::Ref { name } => match names.get(&name.fullname(None)) {
            Some(found) => found,
            None => return push_leaf(path, LeafKind::Json, out),
        },
        other => other,
    };
    let kind = match schema {
        AvroSchema::Record(r) if depth < MAX_DEPTH => {
            for field in &r.fields {
                path.push(field.name.clone());
                leaves(&field.schema, names, path, out, depth + 1);
                path.pop();
            }
            return;
        }
        AvroSchema::Union(u) => {
            let mut values = u
                .variants()
                .iter()
                .filter(|v| !matches!(v, AvroSchema::Null));
            match (values.next(), values.next()) {
                (Some(only), None) => return leaves(only, names, path, out, depth),
                _ => LeafKind::Json,
            }
        }
        AvroSchema::Boolean => LeafKind::Boolean,
        AvroSchema::Int => LeafKind::Int32,
        AvroSchema::Long => LeafKind::Int64,
        AvroSchema::Float => LeafKind::Float32,
        AvroSchema::Double => LeafKind::Float64,
        AvroSchema::String | AvroSchema::Enum(_) | AvroSchema::Uuid(_) => LeafKind::Utf8,
        AvroSchema::TimestampMicros | AvroSchema::TimestampMillis => LeafKind::Timestamp,
        _ => LeafKind::Json,
    };
    push_leaf(path, kind, out);
}

pub(super) fn push_leaf(path: &[String], kind: LeafKind, out: &mut Vec<TypedColumn>) {
    if path.is_empty() {
        return;
    }
    out.push(TypedColumn {
        name: format!("payload_{}", path.join("_")),
        path: path.to_vec(),
        kind,
    });
}

impl TypedColumn {
    pub(super) fn value<'a>(&self, payload: &'a Json) -> Option<&'a Json> {
        let mut value = payload;
        for step in &self.path {
            value = value.get(step)?;
        }
        (!value.is_null()).then_some(value)
    }

    pub(super) fn mismatch(&self, row: &ExportRow, value: &Json) -> anyhow::Error {
        anyhow!(
            "event {} ({} #{} of {}): payload field {} is {value}, not {:?}",
            row.event_id,
            row.event_type,
            row.sequence,
            row.aggregate_id,
            self.path.join("."),
            self.kind
        )
    }

    pub(super) fn array(&self, rows: &[ExportRow]) -> anyhow::Result<ArrayRef> {
        let values = rows.iter().map(|row| (row, self.value(&row.payload)));
        Ok(match self.kind {
            LeafKind::Boolean => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| v.as_bool().ok_or_else(|| self.mismatch(row, v)))
                            .transpose()
                    })
                    .collect::<anyhow::Result<BooleanArray>>()?,
            ),
            LeafKind::Int32 => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| {
                            v.as_i64()
                                .and_then(|i| i32::try_from(i).ok())
                                .ok_or_else(|| self.mismatch(row, v))
                        })
                        .transpose()
                    })
                    .collect::<anyhow::Result<Int32Array>>()?,
            ),
            LeafKind::Int64 => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| v.as_i64().ok_or_else(|| self.mismatch(row, v)))
                            .transpose()
                    })
                    .collect::<anyhow::Result<Int64Array>>()?,
            ),
            LeafKind::Float32 => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| {
                            // A `float` field holds 32 bits; narrowing gives its value back.
                            #[allow(clippy::cast_possible_truncation)]
                            v.as_f64()
                                .map(|f| f as f32)
                                .ok_or_else(|| self.mismatch(row, v))
                        })
                        .transpose()
                    })
                    .collect::<anyhow::Result<Float32Array>>()?,
            ),
            LeafKind::Float64 => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| v.as_f64().ok_or_else(|| self.mismatch(row, v)))
                            .transpose()
                    })
                    .collect::<anyhow::Result<Float64Array>>()?,
            ),
            LeafKind::Utf8 | LeafKind::Json => Arc::new(
                values
                    .map(|(_, v)| {
                        v.map(|v| match v {
                            Json::String(s) if self.kind == LeafKind::Utf8 => s.clone(),
                            other => other.to_string(),
                        })
                    })
                    .collect::<StringArray>(),
            ),
            LeafKind::Timestamp => Arc::new(
                values
                    .map(|(row, v)| {
                        v.map(|v| {
                            v.as_str()
                                .and_then(|s| parse_instant(s).ok())
                                .map(|t| t.timestamp_micros())
                                .ok_or_else(|| self.mismatch(row, v))
                        })
                        .transpose()
                    })
                    .collect::<anyhow::Result<TimestampMicrosecondArray>>()?
                    .with_timezone("UTC"),
            ),
        })
    }
}
