//! The output formats: JSON Lines, CSV and Parquet.

use super::*;

/// Where rows go.
pub(super) trait RowSink: Send {
    fn write(&mut self, rows: &[ExportRow]) -> anyhow::Result<()>;
    /// Closes the file so that it is valid, whether the export completed or not.
    fn finish(self: Box<Self>, complete: bool, rows: u64) -> anyhow::Result<()>;
}

pub(super) fn open_sink(
    format: Format,
    path: &Path,
    typed: Option<&'static EventContract>,
    filter: &Filter,
    source: Source,
) -> anyhow::Result<Box<dyn RowSink>> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(match format {
        Format::Jsonl => Box::new(JsonLines(BufWriter::new(file))),
        Format::Csv => {
            let mut writer = csv::Writer::from_writer(file);
            writer.write_record(COLUMNS)?;
            writer.flush()?;
            Box::new(Csv(writer))
        }
        Format::Parquet => Box::new(ParquetSink::create(file, typed, filter, source)?),
    })
}

pub(super) fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A row as one JSON line.
#[derive(Serialize)]
pub(super) struct JsonRow<'a> {
    pub(super) event_id: Uuid,
    pub(super) aggregate_type: &'a str,
    pub(super) aggregate_id: &'a str,
    pub(super) sequence: i64,
    pub(super) event_type: &'a str,
    pub(super) event_version: &'a str,
    pub(super) occurred_at: Option<String>,
    pub(super) recorded_at: String,
    pub(super) correlation_id: Option<&'a str>,
    pub(super) causation_id: Option<&'a str>,
    pub(super) actor: Option<&'a str>,
    pub(super) command_id: Option<&'a str>,
    pub(super) payload: &'a Json,
}

impl<'a> From<&'a ExportRow> for JsonRow<'a> {
    fn from(row: &'a ExportRow) -> Self {
        Self {
            event_id: row.event_id,
            aggregate_type: &row.aggregate_type,
            aggregate_id: &row.aggregate_id,
            sequence: row.sequence,
            event_type: &row.event_type,
            event_version: &row.event_version,
            occurred_at: row.occurred_at.map(instant),
            recorded_at: instant(row.recorded_at),
            correlation_id: row.correlation_id.as_deref(),
            causation_id: row.causation_id.as_deref(),
            actor: row.actor.as_deref(),
            command_id: row.command_id.as_deref(),
            payload: &row.payload,
        }
    }
}

pub(super) struct JsonLines(BufWriter<File>);

impl RowSink for JsonLines {
    fn write(&mut self, rows: &[ExportRow]) -> anyhow::Result<()> {
        for row in rows {
            serde_json::to_writer(&mut self.0, &JsonRow::from(row))?;
            self.0.write_all(b"\n")?;
        }
        self.0.flush()?;
        Ok(())
    }

    fn finish(mut self: Box<Self>, _complete: bool, _rows: u64) -> anyhow::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_all()?;
        Ok(())
    }
}

pub(super) struct Csv(csv::Writer<File>);

impl RowSink for Csv {
    fn write(&mut self, rows: &[ExportRow]) -> anyhow::Result<()> {
        for row in rows {
            let optional = |s: &Option<String>| s.clone().unwrap_or_default();
            self.0.write_record([
                row.event_id.to_string(),
                row.aggregate_type.clone(),
                row.aggregate_id.clone(),
                row.sequence.to_string(),
                row.event_type.clone(),
                row.event_version.clone(),
                row.occurred_at.map(instant).unwrap_or_default(),
                instant(row.recorded_at),
                optional(&row.correlation_id),
                optional(&row.causation_id),
                optional(&row.actor),
                optional(&row.command_id),
                row.payload.to_string(),
            ])?;
        }
        self.0.flush()?;
        Ok(())
    }

    fn finish(mut self: Box<Self>, _complete: bool, _rows: u64) -> anyhow::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_all()?;
        Ok(())
    }
}

/// Rows per Parquet row group.
pub(super) const ROW_GROUP_ROWS: usize = 64 * 1024;

pub(super) struct ParquetSink {
    pub(super) writer: ArrowWriter<File>,
    pub(super) schema: SchemaRef,
    pub(super) typed: Vec<TypedColumn>,
}

impl ParquetSink {
    pub(super) fn create(
        file: File,
        contract: Option<&'static EventContract>,
        filter: &Filter,
        source: Source,
    ) -> anyhow::Result<Self> {
        let typed = contract.map(typed_columns).unwrap_or_default();
        let timestamp = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let mut fields = vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("aggregate_type", DataType::Utf8, false),
            Field::new("aggregate_id", DataType::Utf8, false),
            Field::new("sequence", DataType::Int64, false),
            Field::new("event_type", DataType::Utf8, false),
            Field::new("event_version", DataType::Utf8, false),
            Field::new("occurred_at", timestamp.clone(), true),
            Field::new("recorded_at", timestamp, false),
            Field::new("correlation_id", DataType::Utf8, true),
            Field::new("causation_id", DataType::Utf8, true),
            Field::new("actor", DataType::Utf8, true),
            Field::new("command_id", DataType::Utf8, true),
            Field::new("payload", DataType::Utf8, false),
        ];
        fields.extend(
            typed
                .iter()
                .map(|c| Field::new(c.name.clone(), c.kind.data_type(), true)),
        );
        let schema = Arc::new(Schema::new(fields));
        let mut metadata = vec![
            KeyValue::new(
                "backbone.export.source".to_owned(),
                match source {
                    Source::Store => "store",
                    Source::Topics => "topics",
                }
                .to_owned(),
            ),
            KeyValue::new(
                "backbone.export.filter".to_owned(),
                filter.describe().to_string(),
            ),
        ];
        if let Some(contract) = contract.filter(|_| !typed.is_empty()) {
            metadata.push(KeyValue::new(
                "backbone.export.payload_contract".to_owned(),
                format!("{} {}", contract.record_name, contract.event_version),
            ));
        }
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_created_by(format!("replay-tools {}", env!("CARGO_PKG_VERSION")))
            .set_key_value_metadata(Some(metadata))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties))?;
        Ok(Self {
            writer,
            schema,
            typed,
        })
    }

    pub(super) fn batch(&self, rows: &[ExportRow]) -> anyhow::Result<RecordBatch> {
        let strings = |f: fn(&ExportRow) -> Option<&str>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<StringArray>())
        };
        let timestamps = |f: fn(&ExportRow) -> Option<DateTime<Utc>>| -> ArrayRef {
            Arc::new(
                rows.iter()
                    .map(|r| f(r).map(|t| t.timestamp_micros()))
                    .collect::<TimestampMicrosecondArray>()
                    .with_timezone("UTC"),
            )
        };
        let event_ids: Vec<String> = rows.iter().map(|r| r.event_id.to_string()).collect();
        let payloads: Vec<String> = rows.iter().map(|r| r.payload.to_string()).collect();
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(&event_ids)),
            strings(|r| Some(r.aggregate_type.as_str())),
            strings(|r| Some(r.aggregate_id.as_str())),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.sequence),
            )),
            strings(|r| Some(r.event_type.as_str())),
            strings(|r| Some(r.event_version.as_str())),
            timestamps(|r| r.occurred_at),
            timestamps(|r| Some(r.recorded_at)),
            strings(|r| r.correlation_id.as_deref()),
            strings(|r| r.causation_id.as_deref()),
            strings(|r| r.actor.as_deref()),
            strings(|r| r.command_id.as_deref()),
            Arc::new(StringArray::from_iter_values(&payloads)),
        ];
        for column in &self.typed {
            columns.push(column.array(rows)?);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

impl RowSink for ParquetSink {
    fn write(&mut self, rows: &[ExportRow]) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = self.batch(rows)?;
        self.writer.write(&batch)?;
        Ok(())
    }

    fn finish(self: Box<Self>, complete: bool, rows: u64) -> anyhow::Result<()> {
        let Self { mut writer, .. } = *self;
        writer.append_key_value_metadata(KeyValue::new(
            "backbone.export.complete".to_owned(),
            complete.to_string(),
        ));
        writer.append_key_value_metadata(KeyValue::new(
            "backbone.export.rows".to_owned(),
            rows.to_string(),
        ));
        let file = writer.into_inner()?;
        file.sync_all()?;
        Ok(())
    }
}
