//! Running `replay-tools` as its users do, and reading what it writes (exports) and what the
//! relay published (raw topic records), for the tests that check the CLI end to end.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, SchemaRef, TimeUnit};
use chrono::{DateTime, SecondsFormat, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::message::OwnedMessage;
use serde_json::{json, Value};

use crate::TestEnv;

/// Runs `replay-tools` with `args` against `env`, as a user would; `extra_env` overrides.
pub async fn replay_tools(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut command = cli_command(env, args, extra_env);
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the runner does not panic")
        .unwrap_or_else(|e| {
            panic!("cannot run replay-tools ({e}); run `cargo build -p replay-tools --bins` first")
        })
}

/// The `replay-tools` command configured for `env` (to spawn and control it yourself).
pub fn cli_command(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)]) -> Command {
    let mut command = env.command("replay-tools", extra_env);
    command.args(args);
    command
}

/// An instant as the exports write it (RFC 3339, microseconds, UTC).
pub fn micros(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A JSON lines file, one value per line.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("JSONL file")
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

/// A Parquet export read back with the arrow/parquet crates: its schema, rows (timestamps as
/// RFC 3339, the payload parsed, typed payload columns included) and key-value metadata.
pub fn read_parquet(path: &Path) -> (SchemaRef, Vec<Value>, HashMap<String, String>) {
    let file = File::open(path).expect("Parquet file");
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("a valid Parquet file");
    let metadata = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let schema = builder.schema().clone();
    let mut rows = Vec::new();
    for batch in builder.build().expect("a reader") {
        let batch = batch.expect("a record batch");
        for i in 0..batch.num_rows() {
            rows.push(parquet_row(&batch, i));
        }
    }
    (schema, rows, metadata)
}

fn parquet_row(batch: &RecordBatch, i: usize) -> Value {
    let mut row = serde_json::Map::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let value = if column.is_null(i) {
            Value::Null
        } else {
            match column.data_type() {
                DataType::Utf8 => {
                    let s = column.as_string::<i32>().value(i);
                    if field.name() == "payload" {
                        serde_json::from_str(s).expect("payload is JSON text")
                    } else {
                        json!(s)
                    }
                }
                DataType::Int64 => json!(column.as_primitive::<Int64Type>().value(i)),
                DataType::Int32 => json!(column.as_primitive::<Int32Type>().value(i)),
                DataType::Float64 => json!(column.as_primitive::<Float64Type>().value(i)),
                DataType::Float32 => json!(column.as_primitive::<Float32Type>().value(i)),
                DataType::Boolean => json!(column.as_boolean().value(i)),
                DataType::Timestamp(TimeUnit::Microsecond, _) => {
                    let us = column.as_primitive::<TimestampMicrosecondType>().value(i);
                    json!(micros(
                        DateTime::from_timestamp_micros(us).expect("in range")
                    ))
                }
                other => panic!("unexpected column type {other} of {}", field.name()),
            }
        };
        row.insert(field.name().clone(), value);
    }
    Value::Object(row)
}

/// Every record of `topic`, raw, from the beginning until `count` arrived.
pub async fn raw_records(env: &TestEnv, topic: &str, count: usize) -> Vec<OwnedMessage> {
    let consumer = env.consumer_from_beginning(topic);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut records = Vec::new();
    while records.len() < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} records",
            records.len()
        );
        if let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        {
            records.push(message.detach());
        }
    }
    records
}

/// Waits until the outbox holds exactly `events` rows and the relay published all of them.
pub async fn everything_published(env: &TestEnv, events: i64) {
    crate::eventually(Duration::from_secs(30), "every event published", || async {
        let (all, waiting): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM outbox",
        )
        .fetch_one(env.pool())
        .await
        .ok()?;
        (all == events && waiting == 0).then_some(())
    })
    .await;
}
