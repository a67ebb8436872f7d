//! The analysts' export and the auditors' history, used as their users use them: the
//! `replay-tools` binary as a child process against an event store and topics fed by real
//! orders (HTTP, the command bus, the relay), and the audit API over HTTP. Expected rows come
//! from what each test did (who acted, in which business transaction, which events the commands
//! answered with) checked against a plain SQL read of the store.
//!
//! Needs `cargo build -p replay-tools --bins` first, and for the Parquet readers in Python
//! `BACKBONE_PYTHON` (default `python3`) with `pyarrow` and `duckdb`
//! (`schemas/tests/python/requirements.txt`): a missing package fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_schema::{DataType, TimeUnit};
use backbone_tests::tools::{cli_command, micros, read_jsonl, read_parquet, replay_tools};
use backbone_tests::{client, client_as, eventually, order_request, place_order, Role, TestEnv};
use chrono::{DateTime, Utc};
use commands::{CommandBus, CommandContext};
use domain::delivery::{Delivery, DeliveryCommand, DeliveryServices, GeoPoint};
use domain::services::SystemClock;
use domain::{OrderId, RegionCode, StoreId};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use uuid::Uuid;

/// The columns of every export, in order.
const COLUMNS: [&str; 13] = [
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "event_type",
    "event_version",
    "occurred_at",
    "recorded_at",
    "correlation_id",
    "causation_id",
    "actor",
    "command_id",
    "payload",
];

/// Columns that may be absent (null in JSON and Parquet, empty in CSV).
const NULLABLE: [&str; 5] = [
    "occurred_at",
    "correlation_id",
    "causation_id",
    "actor",
    "command_id",
];

// -------------------------------------------------------------------------------------------
// Running the CLI

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the CLI and expects success; returns stdout.
async fn succeeds(env: &TestEnv, args: &[&str]) -> String {
    let output = replay_tools(env, args, &[]).await;
    assert!(
        output.status.success(),
        "replay-tools {args:?} failed ({}): {}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Runs the CLI and expects a clear refusal: non-zero exit, `message` on stderr, no panic.
async fn refused(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)], message: &str) {
    let output = replay_tools(env, args, extra_env).await;
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "replay-tools {args:?} should fail; it printed {}",
        text(&output.stdout)
    );
    assert!(
        output.status.code().is_some(),
        "replay-tools {args:?} died of a signal: {stderr}"
    );
    assert!(
        stderr.contains(message),
        "replay-tools {args:?}: expected `{message}` in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

// -------------------------------------------------------------------------------------------
// What the test did

/// One event a test's command appended, as the command's answer and the test's own choices
/// describe it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Done {
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    actor: String,
    correlation_id: String,
}

/// The events a command answered with (`events` and the last `sequence`).
fn appended(
    aggregate_type: &str,
    aggregate_id: &str,
    events: &[String],
    last_sequence: i64,
    actor: &str,
    correlation: Uuid,
) -> Vec<Done> {
    let first = last_sequence - i64::try_from(events.len()).expect("a few events") + 1;
    events
        .iter()
        .enumerate()
        .map(|(i, event_type)| Done {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence: first + i64::try_from(i).expect("small"),
            event_type: event_type.clone(),
            actor: actor.to_owned(),
            correlation_id: correlation.to_string(),
        })
        .collect()
}

/// POSTs `body` in business transaction `correlation`; expects success and returns the answer.
/// The administrator the tests act as, and how events record them.
fn admin() -> (reqwest::Client, String) {
    (client(), format!("admin:{}", backbone_tests::ADMIN_ID))
}

/// The demo store (of `order_request`), and how events record it.
fn demo_store() -> (reqwest::Client, String) {
    let store = Uuid::from_u128(42);
    (client_as(Role::Store, store), format!("store:{store}"))
}

async fn post(client: &reqwest::Client, url: &str, body: &Value, correlation: Uuid) -> Value {
    let response = client
        .post(url)
        .header("x-correlation-id", correlation.to_string())
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "POST {url} {body}: {status} {answer}");
    answer
}

fn events_of(answer: &Value) -> Vec<String> {
    answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e.as_str().expect("an event type").to_owned())
        .collect()
}

/// The store's events in recorded order, read with plain SQL, as rows of an export: the
/// payload is the stored body (the event-type tag taken off, personal data revealed as every
/// export shows it), timestamps RFC 3339 with microseconds.
async fn stored_rows(env: &TestEnv) -> Vec<Value> {
    #[derive(sqlx::FromRow)]
    struct Stored {
        event_id: Uuid,
        aggregate_type: String,
        aggregate_id: String,
        sequence: i64,
        event_type: String,
        event_version: String,
        payload: Value,
        metadata: Value,
        recorded_at: DateTime<Utc>,
    }
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, \
                payload, metadata, recorded_at \
         FROM events ORDER BY recorded_at, aggregate_type, aggregate_id, sequence",
    )
    .fetch_all(env.pool())
    .await
    .expect("events");
    let mut rows: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let meta = |key: &str| row.metadata.get(key).cloned().unwrap_or(Value::Null);
            let occurred_at = meta("occurred_at")
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| json!(micros(t.with_timezone(&Utc))))
                .unwrap_or(Value::Null);
            json!({
                "event_id": row.event_id.to_string(),
                "aggregate_type": row.aggregate_type,
                "aggregate_id": row.aggregate_id,
                "sequence": row.sequence,
                "event_type": row.event_type,
                "event_version": row.event_version,
                "occurred_at": occurred_at,
                "recorded_at": micros(row.recorded_at),
                "correlation_id": meta("correlation_id"),
                "causation_id": meta("causation_id"),
                "actor": meta("actor"),
                "command_id": meta("command_id"),
                "payload": row.payload[row.event_type.as_str()].clone(),
            })
        })
        .collect();
    for row in &mut rows {
        sent_in_clear(&mut row["payload"]);
    }
    rows
}

/// Puts back, in place of each envelope the store holds, the plaintext the test sent there
/// (every order of these tests is `order_request`'s, whose address text is sealed), instead
/// of opening the envelopes with the vault under test. An envelope anywhere else fails.
fn sent_in_clear(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                match field.as_str() {
                    Some(text) if text.starts_with("pii:v1:") => {
                        let sent = &order_request(Uuid::nil())["delivery_address"][name.as_str()];
                        assert!(
                            sent.is_string(),
                            "an envelope the test did not send: {name}"
                        );
                        *field = sent.clone();
                    }
                    _ => sent_in_clear(field),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(sent_in_clear),
        _ => {}
    }
}

/// The store holds exactly what the test did: per event its aggregate, sequence, type, actor
/// and business transaction.
fn assert_store_is_what_was_done(stored: &[Value], done: &[Done]) {
    let mut from_store: Vec<Done> = stored
        .iter()
        .map(|row| Done {
            aggregate_type: row["aggregate_type"].as_str().expect("type").to_owned(),
            aggregate_id: row["aggregate_id"].as_str().expect("id").to_owned(),
            sequence: row["sequence"].as_i64().expect("sequence"),
            event_type: row["event_type"].as_str().expect("event type").to_owned(),
            actor: row["actor"].as_str().unwrap_or_default().to_owned(),
            correlation_id: row["correlation_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
        .collect();
    let mut done = done.to_vec();
    from_store.sort();
    done.sort();
    assert_eq!(from_store, done, "the store holds what the test did");
}

// -------------------------------------------------------------------------------------------
// Reading the exports

fn read_csv(path: &Path) -> Vec<Value> {
    let mut reader = csv::Reader::from_path(path).expect("CSV file");
    let headers = reader.headers().expect("a header row").clone();
    assert_eq!(headers.iter().collect::<Vec<_>>(), COLUMNS, "CSV header");
    reader
        .records()
        .map(|record| {
            let record = record.expect("a CSV record");
            let mut row = serde_json::Map::new();
            for (column, value) in headers.iter().zip(record.iter()) {
                let value = match column {
                    "sequence" => json!(value.parse::<i64>().expect("sequence is an integer")),
                    "payload" => serde_json::from_str(value).expect("payload is JSON text"),
                    c if NULLABLE.contains(&c) && value.is_empty() => Value::Null,
                    _ => json!(value),
                };
                row.insert(column.to_owned(), value);
            }
            Value::Object(row)
        })
        .collect()
}

/// Only the 13 columns every export has.
fn base(row: &Value) -> Value {
    Value::Object(
        COLUMNS
            .iter()
            .map(|c| ((*c).to_owned(), row[*c].clone()))
            .collect(),
    )
}

fn sorted_by_id(rows: &[Value]) -> Vec<Value> {
    let mut rows: Vec<Value> = rows.iter().map(base).collect();
    rows.sort_by(|a, b| {
        let key = |r: &Value| {
            (
                r["aggregate_type"].as_str().unwrap_or_default().to_owned(),
                r["aggregate_id"].as_str().unwrap_or_default().to_owned(),
                r["sequence"].as_i64().unwrap_or_default(),
            )
        };
        key(a).cmp(&key(b))
    });
    rows
}

/// The rows are exactly `expected`, in the same order.
fn assert_rows(what: &str, actual: &[Value], expected: &[Value]) {
    let actual: Vec<Value> = actual.iter().map(base).collect();
    if actual != expected {
        let first_difference = actual
            .iter()
            .zip(expected)
            .position(|(a, e)| a != e)
            .map(|i| {
                format!(
                    "first difference at row {i}:\n  got      {}\n  expected {}",
                    actual[i], expected[i]
                )
            })
            .unwrap_or_default();
        panic!(
            "{what}: {} rows, expected {}; {first_difference}",
            actual.len(),
            expected.len()
        );
    }
}

/// The same rows as `expected`, in any order (a topic export comes out per partition).
fn assert_same_rows(what: &str, actual: &[Value], expected: &[Value]) {
    assert_rows(what, &sorted_by_id(actual), &sorted_by_id(expected));
}

fn where_rows(rows: &[Value], keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    rows.iter().filter(|r| keep(r)).cloned().collect()
}

fn recorded_at(row: &Value) -> DateTime<Utc> {
    row["recorded_at"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .expect("recorded_at")
        .with_timezone(&Utc)
}

// -------------------------------------------------------------------------------------------
// The export

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_in_every_format_and_from_both_sources_hold_exactly_the_events_asked_for() {
    let env = TestEnv::start("export").await;
    let relay = env.start_relay().await;
    let (api, server) = env.start_api().await;
    let client = client();
    let dir = tempdir("export");
    let mut done = Vec::new();

    // Before `between`: three orders placed, one customer's points adjusted.
    let customers = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    let mut orders = Vec::new();
    for customer in customers {
        let correlation = Uuid::new_v4();
        let answer = post(
            &client_as(Role::Customer, customer),
            &format!("{api}/orders"),
            &order_request(customer),
            correlation,
        )
        .await;
        let order_id = answer["order_id"].as_str().expect("order id").to_owned();
        done.extend(appended(
            "order",
            &order_id,
            &events_of(&answer),
            answer["position"]["sequence"].as_i64().expect("sequence"),
            &format!("customer:{customer}"),
            correlation,
        ));
        orders.push((order_id, customer, correlation));
    }
    let adjusted = Uuid::new_v4();
    let answer = post(
        &client,
        &format!("{api}/customers/{}/rewards/actions", customers[0]),
        &json!({"action": "adjust", "points": 250, "reason": "goodwill", "idempotency_key": "k1"}),
        adjusted,
    )
    .await;
    done.extend(appended(
        "rewards",
        &customers[0].to_string(),
        &events_of(&answer),
        answer["sequence"].as_i64().expect("sequence"),
        &admin().1,
        adjusted,
    ));

    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;

    // After `between`: the first order paid and accepted, its delivery requested (as the
    // process manager does) and given to a courier; the second cancelled by its customer.
    let (first, _, first_correlation) = orders[0].clone();
    for (action, (caller, actor)) in [
        (
            json!({"action": "confirm_payment", "payment_reference": "pay-1"}),
            admin(),
        ),
        (
            json!({"action": "accept", "estimated_preparation_minutes": 15}),
            demo_store(),
        ),
    ] {
        let answer = post(
            &caller,
            &format!("{api}/orders/{first}/actions"),
            &action,
            first_correlation,
        )
        .await;
        done.extend(appended(
            "order",
            &first,
            &events_of(&answer),
            answer["position"]["sequence"].as_i64().expect("sequence"),
            &actor,
            first_correlation,
        ));
    }
    let deliveries: CommandBus<Delivery> = CommandBus::new(
        env.store.clone(),
        DeliveryServices::new(Arc::new(SystemClock)),
    );
    let order_id: OrderId = first.parse().expect("an order id");
    let committed = deliveries
        .execute(
            &first,
            DeliveryCommand::RequestDelivery {
                order_id,
                store_id: StoreId::from_uuid(Uuid::from_u128(42)),
                region: RegionCode::parse("uk").expect("region"),
                pickup: GeoPoint::new(51.52, -0.08).expect("pickup"),
                dropoff: GeoPoint::new(51.5, -0.1).expect("dropoff"),
                preparation_ready_at: Utc::now() + chrono::Duration::minutes(15),
                average_speed_kmh: 18,
            },
            &CommandContext::new("system:order-flow").with_correlation(first_correlation),
        )
        .await
        .expect("delivery requested");
    done.extend(appended(
        "delivery",
        &first,
        &committed.event_types,
        i64::try_from(committed.last_sequence).expect("small"),
        "system:order-flow",
        first_correlation,
    ));
    let answer = post(
        &client,
        &format!("{api}/deliveries/{first}/actions"),
        &json!({"action": "assign_courier", "courier_id": Uuid::new_v4()}),
        first_correlation,
    )
    .await;
    done.extend(appended(
        "delivery",
        &first,
        &events_of(&answer),
        answer["position"]["sequence"].as_i64().expect("sequence"),
        &admin().1,
        first_correlation,
    ));
    let (second, second_customer, second_correlation) = orders[1].clone();
    let answer = post(
        &client_as(Role::Customer, second_customer),
        &format!("{api}/orders/{second}/actions"),
        &json!({"action": "cancel", "by": "Customer", "reason": "changed my mind"}),
        second_correlation,
    )
    .await;
    done.extend(appended(
        "order",
        &second,
        &events_of(&answer),
        answer["position"]["sequence"].as_i64().expect("sequence"),
        &format!("customer:{second_customer}"),
        second_correlation,
    ));

    // Everything reached the topics.
    eventually(
        Duration::from_secs(30),
        "the relay published every event",
        || async {
            let waiting: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                    .fetch_one(env.pool())
                    .await
                    .ok()?;
            (waiting == 0).then_some(())
        },
    )
    .await;

    let all = stored_rows(&env).await;
    assert_store_is_what_was_done(&all, &done);
    assert!(all.len() >= 10, "{} events", all.len());
    let placed_count = done
        .iter()
        .filter(|d| d.event_type == "OrderPlaced")
        .count();
    assert_eq!(placed_count, 3);

    // Everything, from the store, in each format: the same rows, in recorded order.
    let out = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();
    for (format, file) in [
        ("jsonl", "all.jsonl"),
        ("csv", "all.csv"),
        ("parquet", "all.parquet"),
    ] {
        let stdout = succeeds(&env, &["export", "--format", format, "--out", &out(file)]).await;
        assert!(
            stdout.contains(&format!("exported {} events", all.len())),
            "{stdout}"
        );
    }
    assert_rows("store JSONL", &read_jsonl(&dir.join("all.jsonl")), &all);
    assert_rows("store CSV", &read_csv(&dir.join("all.csv")), &all);
    let (schema, parquet_rows, metadata) = read_parquet(&dir.join("all.parquet"));
    assert_rows("store Parquet", &parquet_rows, &all);
    let timestamp = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    for (column, data_type, nullable) in [
        ("event_id", DataType::Utf8, false),
        ("sequence", DataType::Int64, false),
        ("occurred_at", timestamp.clone(), true),
        ("recorded_at", timestamp.clone(), false),
        ("actor", DataType::Utf8, true),
        ("payload", DataType::Utf8, false),
    ] {
        let field = schema.field_with_name(column).expect("column present");
        assert_eq!(field.data_type(), &data_type, "type of {column}");
        assert_eq!(field.is_nullable(), nullable, "nullability of {column}");
    }
    assert_eq!(
        schema.fields().len(),
        COLUMNS.len(),
        "no typed columns for several types"
    );
    assert_eq!(
        metadata.get("backbone.export.complete").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        metadata.get("backbone.export.source").map(String::as_str),
        Some("store")
    );

    // The same from the topics (decoded through the registry): the same rows.
    succeeds(
        &env,
        &[
            "export",
            "--source",
            "topics",
            "--format",
            "jsonl",
            "--out",
            &out("topics.jsonl"),
        ],
    )
    .await;
    assert_same_rows("topics JSONL", &read_jsonl(&dir.join("topics.jsonl")), &all);
    succeeds(
        &env,
        &[
            "export",
            "--source",
            "topics",
            "--format",
            "parquet",
            "--out",
            &out("topics.parquet"),
        ],
    )
    .await;
    let (_, topic_rows, topic_metadata) = read_parquet(&dir.join("topics.parquet"));
    assert_same_rows("topics Parquet", &topic_rows, &all);
    assert_eq!(
        topic_metadata
            .get("backbone.export.source")
            .map(String::as_str),
        Some("topics")
    );

    // One event type to Parquet: typed payload columns, from both sources.
    let placed = where_rows(&all, |r| r["event_type"] == "OrderPlaced");
    assert_eq!(placed.len(), 3);
    for (source, file) in [
        ("store", "placed.parquet"),
        ("topics", "placed-topics.parquet"),
    ] {
        succeeds(
            &env,
            &[
                "export",
                "--source",
                source,
                "--format",
                "parquet",
                "--event-type",
                "OrderPlaced",
                "--out",
                &out(file),
            ],
        )
        .await;
    }
    let (typed_schema, typed_rows, typed_metadata) = read_parquet(&dir.join("placed.parquet"));
    assert_rows("OrderPlaced Parquet", &typed_rows, &placed);
    for (column, data_type) in [
        ("payload_customer_id", DataType::Utf8),
        ("payload_region", DataType::Utf8),
        ("payload_total_minor", DataType::Int64),
        ("payload_total_currency", DataType::Utf8),
        ("payload_rating_window_days", DataType::Int32),
        ("payload_free_delivery", DataType::Boolean),
        ("payload_placed_at", timestamp.clone()),
        ("payload_lines", DataType::Utf8),
    ] {
        let field = typed_schema
            .field_with_name(column)
            .unwrap_or_else(|_| panic!("typed column {column} in {typed_schema:?}"));
        assert_eq!(field.data_type(), &data_type, "type of {column}");
    }
    assert!(typed_metadata
        .get("backbone.export.payload_contract")
        .is_some_and(|c| c.contains("OrderPlaced")));
    for row in &typed_rows {
        let payload = &row["payload"];
        let (_, customer, _) = orders
            .iter()
            .find(|(id, _, _)| row["aggregate_id"] == json!(id))
            .expect("one of the test's orders");
        assert_eq!(row["payload_customer_id"], json!(customer.to_string()));
        assert_eq!(row["payload_region"], json!("uk"));
        assert_eq!(row["payload_total_minor"], payload["total"]["minor"]);
        assert_eq!(row["payload_total_currency"], payload["total"]["currency"]);
        assert_eq!(row["payload_free_delivery"], payload["free_delivery"]);
        assert_eq!(row["payload_lines"], json!(payload["lines"].to_string()));
        let placed_at =
            DateTime::parse_from_rfc3339(payload["placed_at"].as_str().expect("placed_at"))
                .expect("RFC 3339")
                .with_timezone(&Utc);
        assert_eq!(row["payload_placed_at"], json!(micros(placed_at)));
    }
    let (_, typed_topic_rows, _) = read_parquet(&dir.join("placed-topics.parquet"));
    let mut typed_from_topics = typed_topic_rows.clone();
    let mut typed_from_store = typed_rows.clone();
    let by_id = |a: &Value, b: &Value| a["event_id"].as_str().cmp(&b["event_id"].as_str());
    typed_from_topics.sort_by(by_id);
    typed_from_store.sort_by(by_id);
    assert_eq!(
        typed_from_topics, typed_from_store,
        "typed columns from the topics"
    );

    // Filters: one aggregate id (its order and delivery events), several event types, one
    // aggregate type before `between`, everything from `between` on, from both sources.
    succeeds(
        &env,
        &[
            "export",
            "--format",
            "jsonl",
            "--aggregate-id",
            &first,
            "--out",
            &out("first.jsonl"),
        ],
    )
    .await;
    assert_rows(
        "one aggregate id",
        &read_jsonl(&dir.join("first.jsonl")),
        &where_rows(&all, |r| r["aggregate_id"] == json!(first)),
    );
    let mut first_types: Vec<&str> = done
        .iter()
        .filter(|d| d.aggregate_id == first)
        .map(|d| d.aggregate_type.as_str())
        .collect();
    first_types.dedup();
    assert_eq!(
        first_types.len(),
        2,
        "order and delivery events of the first order"
    );

    succeeds(
        &env,
        &[
            "export",
            "--format",
            "csv",
            "--event-type",
            "OrderAccepted",
            "--event-type",
            "OrderCancelled",
            "--out",
            &out("two-types.csv"),
        ],
    )
    .await;
    let two_types = read_csv(&dir.join("two-types.csv"));
    assert_rows(
        "two event types",
        &two_types,
        &where_rows(&all, |r| {
            r["event_type"] == "OrderAccepted" || r["event_type"] == "OrderCancelled"
        }),
    );
    assert_eq!(two_types.len(), 2);

    let between_text = micros(between);
    succeeds(
        &env,
        &[
            "export",
            "--format",
            "csv",
            "--aggregate-type",
            "order",
            "--to",
            &between_text,
            "--out",
            &out("before.csv"),
        ],
    )
    .await;
    let before = read_csv(&dir.join("before.csv"));
    assert_rows(
        "orders before `between`",
        &before,
        &where_rows(&all, |r| {
            r["aggregate_type"] == "order" && recorded_at(r) < between
        }),
    );
    assert_eq!(
        before
            .iter()
            .map(|r| r["event_type"].clone())
            .collect::<Vec<_>>(),
        vec![json!("OrderPlaced"); 3],
        "only the placements happened before `between`"
    );
    let after_between = where_rows(&all, |r| recorded_at(r) >= between);
    let done_after: usize = done
        .iter()
        .filter(|d| d.event_type != "OrderPlaced" && d.aggregate_type != "rewards")
        .count();
    assert_eq!(
        after_between.len(),
        done_after,
        "what was done after `between`"
    );
    for source in ["store", "topics"] {
        let file = format!("after-{source}.jsonl");
        succeeds(
            &env,
            &[
                "export",
                "--source",
                source,
                "--format",
                "jsonl",
                "--from",
                &between_text,
                "--out",
                &out(&file),
            ],
        )
        .await;
        assert_same_rows(
            &format!("from `between` on ({source})"),
            &read_jsonl(&dir.join(&file)),
            &after_between,
        );
    }

    // A record on the topics that does not decode (another producer's bytes under an event's
    // headers): the export from the topics stops at it and names it, leaving a valid file, or
    // skips and lists it when asked to.
    let producer: FutureProducer = env.kafka.client_config().create().expect("producer");
    let topic = env
        .kafka
        .topics()
        .for_aggregate("order")
        .expect("orders topic");
    let stranger = Uuid::new_v4().to_string();
    let headers = streams::EventMeta {
        event_id: Uuid::new_v4(),
        aggregate_type: "order".to_owned(),
        aggregate_id: stranger.clone(),
        sequence: 1,
        event_type: "OrderPlaced".to_owned(),
        event_version: "1.0".to_owned(),
        recorded_at: micros(Utc::now()),
        ..streams::EventMeta::default()
    }
    .to_headers();
    producer
        .send(
            FutureRecord::to(&topic)
                .key(stranger.as_str())
                .payload("not avro")
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("foreign record produced");
    refused(
        &env,
        &[
            "export",
            "--source",
            "topics",
            "--format",
            "jsonl",
            "--out",
            &out("stopped.jsonl"),
        ],
        &[],
        "cannot be decoded (--skip-undecodable skips such records)",
    )
    .await;
    // Whatever was read before it is in the file, nothing else.
    let stopped = read_jsonl(&dir.join("stopped.jsonl"));
    let known = sorted_by_id(&all);
    assert!(
        sorted_by_id(&stopped).iter().all(|row| known.contains(row)),
        "rows before the stop are events of the store"
    );
    let skipped = succeeds(
        &env,
        &[
            "export",
            "--source",
            "topics",
            "--format",
            "jsonl",
            "--skip-undecodable",
            "--out",
            &out("skipped.jsonl"),
        ],
    )
    .await;
    assert!(
        skipped.contains("skipped 1 undecodable records"),
        "{skipped}"
    );
    assert!(skipped.contains(&topic), "{skipped}");
    assert_same_rows(
        "topics past a foreign record",
        &read_jsonl(&dir.join("skipped.jsonl")),
        &all,
    );

    // The Parquet files open in pyarrow and DuckDB as they are, with the same rows.
    let expected_all = dir.join("expected-all.jsonl");
    let expected_placed = dir.join("expected-placed.jsonl");
    write_jsonl(&expected_all, &all);
    write_jsonl(&expected_placed, &placed);
    run_pytest(&[
        ("EXPORT_ALL_PARQUET", dir.join("all.parquet")),
        ("EXPORT_ALL_EXPECTED", expected_all),
        ("EXPORT_TYPED_PARQUET", dir.join("placed.parquet")),
        ("EXPORT_TYPED_EXPECTED", expected_placed),
    ])
    .await;

    let _ = std::fs::remove_dir_all(&dir);
    server.stop().await.expect("api stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).expect("expected rows written");
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("backbone-{name}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

/// Runs `tests/python/test_parquet.py` with pytest; a missing package fails, never skips.
async fn run_pytest(files: &[(&str, PathBuf)]) {
    let python = std::env::var("BACKBONE_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let test = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_parquet.py");
    let mut command = Command::new(&python);
    command
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&test)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (key, path) in files {
        command.env(key, path);
    }
    let shown = format!("{python} -m pytest -q {}", test.display());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the runner does not panic")
        .unwrap_or_else(|e| {
            panic!("cannot run `{shown}` (set BACKBONE_PYTHON to a Python with pyarrow and duckdb): {e}")
        });
    eprintln!(
        "--- {shown}\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the Python Parquet readers failed ({}): see the output above; a missing package fails too",
        output.status
    );
}

/// What process `pid` has read from its PostgreSQL connections, from the kernel's TCP
/// statistics (`ss`): bytes received minus the receive queue.
fn bytes_read_from_postgres(pid: u32) -> Option<u64> {
    let output = Command::new("ss")
        .args(["-tinpH", "state", "established", "dport", "=", ":5432"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut lines = text.lines();
    let mut read = 0;
    while let Some(line) = lines.next() {
        if !line.contains(&format!("pid={pid},")) {
            continue;
        }
        let queued: u64 = line.split_whitespace().next()?.parse().ok()?;
        let received: u64 = lines
            .next()?
            .split_whitespace()
            .find_map(|field| field.strip_prefix("bytes_received:"))?
            .parse()
            .ok()?;
        read += received.saturating_sub(queued);
    }
    Some(read)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_export_stops_cleanly_and_leaves_a_valid_parquet_file() {
    let env = TestEnv::start("export_stop").await;
    place_order(&env.orders()).await;
    // Many events without going through the commands: copies of that placement.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata) \
         SELECT 'order', gen_random_uuid()::text, 1, e.event_type, e.event_version, e.payload, \
                e.metadata \
         FROM events e, generate_series(1, 15000) \
         WHERE e.aggregate_type = 'order'",
    )
    .execute(env.pool())
    .await
    .expect("events copied");
    let total = 15_001;
    let dir = tempdir("export-stop");
    let file = dir.join("partial.parquet");
    let path = file.to_str().expect("utf-8 path").to_owned();

    let child = cli_command(
        &env,
        &[
            "export",
            "--format",
            "parquet",
            "--batch-size",
            "1",
            "--out",
            &path,
        ],
        &[],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("replay-tools starts (run `cargo build -p replay-tools --bins` first)");
    let started = Instant::now();
    while !file.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the export never created its file"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let it take a few hundred events (one per batch: the export takes seconds) before the
    // Ctrl-C: it has read a megabyte from its database connection, as the kernel counts it
    // (bytes received minus those still queued unread). It reads no faster than it hands rows
    // on (its queue holds two batches), so by then it has written hundreds.
    let pid = child.id();
    eventually(Duration::from_secs(60), "the export under way", || async {
        (bytes_read_from_postgres(pid)? > 1024 * 1024).then_some(())
    })
    .await;
    let interrupt = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(interrupt.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("waits")
        .expect("exit status");
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a clean non-zero exit: {stderr}"
    );
    assert!(stderr.contains("interrupted after"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The file is a valid Parquet file holding the first events in recorded order, and says it
    // is incomplete.
    let (_, rows, metadata) = read_parquet(&file);
    assert!(
        !rows.is_empty() && rows.len() < total,
        "the export was interrupted after some rows ({} rows)",
        rows.len()
    );
    assert_eq!(
        metadata.get("backbone.export.complete").map(String::as_str),
        Some("false")
    );
    assert_eq!(
        metadata.get("backbone.export.rows"),
        Some(&rows.len().to_string())
    );
    assert!(
        stderr.contains(&format!("interrupted after {} events", rows.len())),
        "{stderr}"
    );
    let first: Vec<String> = sqlx::query_scalar(
        "SELECT event_id::text FROM events \
         ORDER BY recorded_at, aggregate_type, aggregate_id, sequence LIMIT $1",
    )
    .bind(i64::try_from(rows.len()).expect("fits"))
    .fetch_all(env.pool())
    .await
    .expect("first events");
    let exported: Vec<String> = rows
        .iter()
        .map(|r| r["event_id"].as_str().expect("event id").to_owned())
        .collect();
    assert_eq!(exported, first, "a prefix of the export, in order");
    let _ = std::fs::remove_dir_all(&dir);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_export_flags_are_refused_with_a_clear_message() {
    let env = TestEnv::start("export_flags").await;
    let dir = tempdir("export-flags");
    let file = dir.join("never.csv");
    let out = file.to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 10] = [
        (
            &["export", "--format", "xml", "--out", out],
            "invalid value 'xml'",
        ),
        (&["export", "--format", "csv"], "--out"),
        (
            &[
                "export",
                "--format",
                "csv",
                "--out",
                out,
                "--from",
                "yesterday",
            ],
            "not an RFC 3339 instant",
        ),
        (
            &[
                "export",
                "--format",
                "csv",
                "--out",
                out,
                "--from",
                "2026-01-02T00:00:00Z",
                "--to",
                "2026-01-01T00:00:00Z",
            ],
            "must be before --to",
        ),
        (
            &[
                "export",
                "--format",
                "csv",
                "--out",
                out,
                "--aggregate-type",
                "spaceship",
            ],
            "not an aggregate type",
        ),
        (
            &[
                "export",
                "--format",
                "csv",
                "--out",
                out,
                "--aggregate-type",
                "order",
                "--event-type",
                "CourierAssigned",
            ],
            "is not an event type of aggregate type `order`",
        ),
        (
            &[
                "export",
                "--format",
                "csv",
                "--out",
                out,
                "--event-type",
                "OrderTeleported",
            ],
            "OrderPlaced",
        ),
        (
            &[
                "export",
                "--format",
                "csv",
                "--out",
                out,
                "--skip-undecodable",
            ],
            "applies to --source topics",
        ),
        (
            &[
                "export",
                "--format",
                "csv",
                "--out",
                out,
                "--batch-size",
                "0",
            ],
            "--batch-size",
        ),
        (
            &[
                "export", "--format", "csv", "--out", out, "--source", "tape",
            ],
            "invalid value 'tape'",
        ),
    ];
    for (args, message) in cases {
        refused(&env, args, &[], message).await;
        assert!(!file.exists(), "{args:?} left a file behind");
    }
    refused(
        &env,
        &[
            "export",
            "--format",
            "csv",
            "--out",
            "/nonexistent-directory/x.csv",
        ],
        &[],
        "cannot create /nonexistent-directory/x.csv",
    )
    .await;
    refused(
        &env,
        &[
            "export", "--source", "topics", "--format", "csv", "--out", out,
        ],
        &[("KAFKA_TOPIC_PREFIX", "missing-prefix.")],
        "does not exist",
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    env.stop().await;
}

// -------------------------------------------------------------------------------------------
// The auditors' history

async fn get(client: &reqwest::Client, url: &str) -> (u16, String, Value) {
    let response = client.get(url).send().await.expect("sent");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (
        status,
        content_type,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_history_of_an_aggregate_shows_its_events_with_all_metadata_in_order() {
    let env = TestEnv::start("history").await;
    let (api, server) = env.start_api().await;
    let client = client();

    // An order placed by a customer, paid, accepted by the store; another one alongside.
    let customer = Uuid::new_v4();
    let correlation = Uuid::new_v4();
    let answer = post(
        &client_as(Role::Customer, customer),
        &format!("{api}/orders"),
        &order_request(customer),
        correlation,
    )
    .await;
    let order_id = answer["order_id"].as_str().expect("order id").to_owned();
    let mut done = appended(
        "order",
        &order_id,
        &events_of(&answer),
        answer["position"]["sequence"].as_i64().expect("sequence"),
        &format!("customer:{customer}"),
        correlation,
    );
    for (action, (caller, actor)) in [
        (
            json!({"action": "confirm_payment", "payment_reference": "pay-9"}),
            admin(),
        ),
        (
            json!({"action": "accept", "estimated_preparation_minutes": 10}),
            demo_store(),
        ),
    ] {
        let answer = post(
            &caller,
            &format!("{api}/orders/{order_id}/actions"),
            &action,
            correlation,
        )
        .await;
        done.extend(appended(
            "order",
            &order_id,
            &events_of(&answer),
            answer["position"]["sequence"].as_i64().expect("sequence"),
            &actor,
            correlation,
        ));
    }
    post(
        &client,
        &format!("{api}/orders"),
        &order_request(Uuid::new_v4()),
        Uuid::new_v4(),
    )
    .await;
    assert_eq!(done.len(), 3);

    // What the store holds for that order, read with SQL.
    let stored: Vec<(i64, Uuid, String, Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT sequence, event_id, event_version, metadata, recorded_at FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(&order_id)
    .fetch_all(env.pool())
    .await
    .expect("events");
    assert_eq!(stored.len(), done.len());

    // The CLI, as JSON lines (the id in capitals works too).
    let stdout = succeeds(&env, &["history", "order", &order_id.to_uppercase()]).await;
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(lines.len(), done.len());
    for ((line, expected), (sequence, event_id, version, metadata, recorded_at)) in
        lines.iter().zip(&done).zip(&stored)
    {
        assert_eq!(line["aggregate_type"], "order");
        assert_eq!(line["aggregate_id"], json!(order_id));
        assert_eq!(line["sequence"], json!(expected.sequence));
        assert_eq!(line["sequence"], json!(sequence));
        assert_eq!(line["event_type"], json!(expected.event_type));
        assert_eq!(line["actor"], json!(expected.actor));
        assert_eq!(line["correlation_id"], json!(expected.correlation_id));
        assert_eq!(line["event_id"], json!(event_id.to_string()));
        assert_eq!(line["event_version"], json!(version));
        assert_eq!(line["causation_id"], metadata["causation_id"]);
        assert_eq!(line["command_id"], metadata["command_id"]);
        assert_eq!(line["occurred_at"], metadata["occurred_at"]);
        assert_eq!(line["recorded_at"], json!(micros(*recorded_at)));
    }
    assert_eq!(
        lines[0]["payload"]["customer_id"],
        json!(customer.to_string())
    );
    assert_eq!(
        lines[2]["payload"]["estimated_preparation_minutes"],
        json!(10)
    );

    // As a table: a header, one row per event and its payload.
    let table = succeeds(&env, &["history", "order", &order_id, "--format", "table"]).await;
    assert!(
        table.contains("EVENT TYPE") && table.contains("CORRELATION ID"),
        "{table}"
    );
    assert_eq!(
        table.matches("    payload: {").count(),
        done.len(),
        "{table}"
    );
    for expected in &done {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(expected.event_type.as_str()))
            .unwrap_or_else(|| panic!("a row for {} in {table}", expected.event_type));
        assert!(row.starts_with(&expected.sequence.to_string()), "{row}");
        assert!(
            row.contains(&expected.actor) && row.contains(&expected.correlation_id),
            "{row}"
        );
    }

    // Mistakes.
    refused(
        &env,
        &["history", "spaceship", &order_id],
        &[],
        "not an aggregate type",
    )
    .await;
    refused(
        &env,
        &["history", "order", "not-an-id"],
        &[],
        "not a valid order id",
    )
    .await;
    let stranger = Uuid::new_v4().to_string();
    refused(
        &env,
        &["history", "order", &stranger],
        &[],
        "no events for order",
    )
    .await;
    refused(
        &env,
        &["history", "order", &order_id, "--format", "xml"],
        &[],
        "invalid value 'xml'",
    )
    .await;

    // The API: the same events, two per page.
    let base_url = format!("{api}/audit/order/{order_id}/events");
    let (status, _, first_page) = get(&client, &format!("{base_url}?limit=2")).await;
    assert_eq!(status, 200, "{first_page}");
    assert_eq!(first_page["aggregate_type"], "order");
    assert_eq!(first_page["aggregate_id"], json!(order_id));
    assert_eq!(first_page["events"].as_array().map(Vec::len), Some(2));
    assert_eq!(first_page["next_cursor"], json!("2"));
    let (status, _, second_page) = get(&client, &format!("{base_url}?limit=2&cursor=2")).await;
    assert_eq!(status, 200, "{second_page}");
    assert_eq!(second_page["events"].as_array().map(Vec::len), Some(1));
    assert_eq!(second_page["next_cursor"], Value::Null);
    let events: Vec<Value> = first_page["events"]
        .as_array()
        .into_iter()
        .chain(second_page["events"].as_array())
        .flatten()
        .cloned()
        .collect();
    for (event, line) in events.iter().zip(&lines) {
        let mut line = line.clone();
        let line = line.as_object_mut().expect("object");
        line.remove("aggregate_type");
        line.remove("aggregate_id");
        assert_eq!(event, &Value::Object(line.clone()), "API and CLI agree");
    }
    let (status, _, whole) = get(&client, &base_url).await;
    assert_eq!(status, 200);
    assert_eq!(whole["events"].as_array().map(Vec::len), Some(3));

    for (url, expected_status, message) in [
        (
            format!("{api}/audit/spaceship/{order_id}/events"),
            400,
            "not an aggregate type",
        ),
        (
            format!("{api}/audit/order/not-an-id/events"),
            400,
            "not a valid order id",
        ),
        (format!("{base_url}?limit=0"), 400, "limit"),
        (format!("{base_url}?cursor=abc"), 400, "cursor"),
        (format!("{base_url}?page=2"), 400, "page"),
        (
            format!("{api}/audit/order/{stranger}/events"),
            404,
            "no events for order",
        ),
        (
            format!("{api}/audit/delivery/{order_id}/events"),
            404,
            "no events for delivery",
        ),
    ] {
        let (status, content_type, problem) = get(&client, &url).await;
        assert_eq!(status, expected_status, "{url}: {problem}");
        assert_eq!(content_type, "application/problem+json", "{url}");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains(message)),
            "{url}: {problem}"
        );
    }

    // In the OpenAPI document, under the `audit` tag.
    let (_, _, openapi) = get(&client, &format!("{api}/openapi.json")).await;
    let operation = &openapi["paths"]["/audit/{aggregate_type}/{aggregate_id}/events"]["get"];
    assert_eq!(operation["tags"], json!(["audit"]), "{operation}");

    server.stop().await.expect("api stops");
    env.stop().await;
}
