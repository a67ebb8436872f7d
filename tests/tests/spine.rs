//! The spine, end to end: HTTP command → event store → outbox → relay → Kafka (Avro) →
//! projector → tracking view, against the real PostgreSQL, broker and registry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{eventually, order_request, place_order, TestEnv};
use commands::CommandContext;
use domain::order::{OrderCommand, OrderEvent};
use domain::OrderId;
use projections::TrackingProjection;
use rand::seq::SliceRandom;
use serde_json::Value;
use sqlx::Row;
use streams::RelayConfig;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_placed_over_http_appears_in_the_tracking_view() {
    let env = TestEnv::start("http").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    let customer = Uuid::new_v4();
    let response = client
        .post(format!("{api}/orders"))
        .json(&order_request(customer))
        .send()
        .await
        .expect("place order");
    assert_eq!(response.status().as_u16(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let placed: Value = response.json().await.expect("json");
    let order_id = placed["order_id"].as_str().expect("order id").to_owned();
    assert_eq!(placed["position"]["sequence"], 1);
    assert_eq!(location, format!("/orders/{order_id}/tracking"));

    let view = eventually(WAIT, "the order in the tracking view", || {
        let (client, url) = (client.clone(), format!("{api}{location}"));
        async move {
            let (status, body) = get_json(&client, &url).await;
            (status == 200).then_some(body)
        }
    })
    .await;
    assert_eq!(view["status"], "Placed");
    assert_eq!(view["customer_id"], customer.to_string());
    // 2 × (999 + 150) + 199 = 2497; tax 20 % = 499.4 → 499; fee 299.
    assert_eq!(view["total"]["minor"], 2497 + 499 + 299);
    assert_eq!(view["total"]["currency"], "GBP");

    // The store and courier move it on; read-your-writes with the returned position.
    let mut last = Value::Null;
    for action in [
        serde_json::json!({"action": "confirm_payment", "payment_reference": "pay-1"}),
        serde_json::json!({"action": "accept", "estimated_preparation_minutes": 12}),
        serde_json::json!({"action": "start_preparation"}),
    ] {
        let response = client
            .post(format!("{api}/orders/{order_id}/actions"))
            .json(&action)
            .send()
            .await
            .expect("action");
        assert_eq!(response.status().as_u16(), 200, "{action}");
        last = response.json().await.expect("json");
    }
    let sequence = last["position"]["sequence"].as_u64().expect("sequence");
    assert_eq!(sequence, 4);
    let (status, view) = get_json(
        &client,
        &format!("{api}/orders/{order_id}/tracking?min_sequence={sequence}"),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "Preparing");
    let timeline: Vec<&str> = view["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .map(|e| e["status"].as_str().expect("status"))
        .collect();
    assert_eq!(timeline, ["Placed", "Confirmed", "Accepted", "Preparing"]);

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_record_on_the_orders_topic_decodes_to_the_same_event_with_its_metadata() {
    let env = TestEnv::start("decode").await;
    let orders = env.orders();
    let order_id = OrderId::new();
    let request: api::orders::PlaceOrderRequest =
        serde_json::from_value(order_request(Uuid::new_v4())).expect("request");
    let command = OrderCommand::try_from(request).expect("valid");
    let correlation = Uuid::new_v4();
    let context = CommandContext::new("customer:test").with_correlation(correlation);
    let sent_at = chrono::Utc::now();
    orders
        .execute(&order_id.to_string(), command, &context)
        .await
        .expect("placed");
    let answered_at = chrono::Utc::now();
    let relay = env.start_relay().await;

    let records = env.read_topic("order", WAIT, |r| !r.is_empty()).await;
    relay.stop().await.expect("relay stops");
    let record = &records[0];

    let row = sqlx::query(
        "SELECT payload, event_id, event_type, metadata::text AS metadata, \
                metadata->>'occurred_at' AS occurred_at, recorded_at FROM events \
         WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(order_id.to_string())
    .fetch_one(env.pool())
    .await
    .expect("stored event");
    let stored: OrderEvent = serde_json::from_value(row.get("payload")).expect("stored payload");
    let published: OrderEvent = record.event().expect("record maps to the domain event");
    assert_eq!(published, stored);

    let meta = &record.meta;
    assert_eq!(meta.event_id, row.get::<Uuid, _>("event_id"));
    assert_eq!(meta.aggregate_type, "order");
    assert_eq!(meta.aggregate_id, order_id.to_string());
    assert_eq!(meta.sequence, 1);
    assert_eq!(meta.event_type, "OrderPlaced");
    assert_eq!(meta.event_version, "1.0");
    assert_eq!(meta.correlation_id, correlation.to_string());
    assert_eq!(meta.causation_id, context.causation_id.to_string());
    assert_eq!(meta.command_id, context.command_id.to_string());
    assert_eq!(meta.actor, "customer:test");
    // The instants: when the command ran (stored in the metadata, within the test's call) and
    // when the store recorded it (its column), to the microsecond.
    assert_eq!(meta.occurred_at, row.get::<String, _>("occurred_at"));
    let occurred = chrono::DateTime::parse_from_rfc3339(&meta.occurred_at).expect("RFC 3339");
    assert!(
        sent_at <= occurred && occurred <= answered_at,
        "{occurred} within the command's call ({sent_at} .. {answered_at})"
    );
    let recorded = chrono::DateTime::parse_from_rfc3339(&meta.recorded_at).expect("RFC 3339");
    assert_eq!(
        recorded,
        row.get::<chrono::DateTime<chrono::Utc>, _>("recorded_at"),
        "the store's recorded_at"
    );
    assert_eq!(
        record.topic,
        format!("{}orders", env.kafka.kafka_topic_prefix)
    );

    // The subject follows TopicRecordNameStrategy and is registered in the registry.
    let subjects: Vec<String> =
        reqwest::get(format!("{}/subjects", env.registry.schema_registry_url))
            .await
            .expect("registry")
            .json()
            .await
            .expect("json");
    assert!(
        subjects.contains(&format!("{}-backbone.order.OrderPlaced", record.topic)),
        "{subjects:?}"
    );
    env.stop().await;
}

/// Chooses the next lifecycle command from the last stored event type.
fn next_command(last_event: &str) -> Option<OrderCommand> {
    Some(match last_event {
        "OrderPlaced" => OrderCommand::ConfirmPayment {
            payment_reference: "p".to_owned(),
        },
        "OrderConfirmed" => OrderCommand::AcceptOrder {
            estimated_preparation_minutes: 10,
        },
        "OrderAccepted" => OrderCommand::StartPreparation,
        "PreparationStarted" => OrderCommand::MarkReady,
        "OrderReady" => OrderCommand::HandToCourier,
        "OrderOutForDelivery" => OrderCommand::MarkDelivered,
        "OrderDelivered" => OrderCommand::CompleteOrder,
        _ => return None,
    })
}

/// Every committed event, per aggregate, in sequence order: (sequence, event id).
async fn store_contents(env: &TestEnv) -> BTreeMap<String, Vec<(u64, Uuid)>> {
    let rows: Vec<(String, i64, Uuid)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_id FROM events WHERE aggregate_type = 'order' \
         ORDER BY aggregate_id, sequence",
    )
    .fetch_all(env.pool())
    .await
    .expect("events");
    let mut map: BTreeMap<String, Vec<(u64, Uuid)>> = BTreeMap::new();
    for (id, sequence, event_id) in rows {
        map.entry(id)
            .or_default()
            .push((u64::try_from(sequence).expect("positive"), event_id));
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_reach_the_topic_in_order_without_gaps() {
    let env = TestEnv::start("concurrent").await;
    let orders = env.orders();
    let relay = env.start_relay().await;

    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(place_order(&orders).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (orders, pool) = (orders.clone(), env.pool().clone());
        let mut mine = ids.clone();
        mine.shuffle(&mut rand::rng());
        tasks.spawn(async move {
            let mut committed = 0u32;
            for id in mine {
                let last: String = sqlx::query_scalar(
                    "SELECT event_type FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1 \
                     ORDER BY sequence DESC LIMIT 1",
                )
                .bind(&id)
                .fetch_one(&pool)
                .await
                .expect("last event");
                if let Some(command) = next_command(&last) {
                    // Racing tasks may find the step already taken: that is a refusal, not a loss.
                    if orders.execute(&id, command, &CommandContext::new("test")).await.is_ok() {
                        committed += 1;
                    }
                }
            }
            committed
        });
    }
    let mut commands = 0;
    while let Some(result) = tasks.join_next().await {
        commands += result.expect("task");
    }
    assert!(
        commands > 200,
        "the tasks moved orders on ({commands} commands)"
    );

    let expected = store_contents(&env).await;
    let total: usize = expected.values().map(Vec::len).sum();
    let records = env
        .read_topic("order", WAIT, |records| {
            records
                .iter()
                .map(|r| r.meta.event_id)
                .collect::<HashSet<_>>()
                .len()
                >= total
        })
        .await;
    relay.stop().await.expect("relay stops");

    let mut seen: HashMap<String, Vec<(u64, Uuid)>> = HashMap::new();
    for record in &records {
        let per = seen.entry(record.meta.aggregate_id.clone()).or_default();
        match per.last() {
            Some((last, _)) if record.meta.sequence <= *last => {
                // Only a redelivery of the very same event may repeat a sequence.
                let original = per
                    .iter()
                    .find(|(s, _)| *s == record.meta.sequence)
                    .expect("a repeated sequence was seen before");
                assert_eq!(
                    original.1, record.meta.event_id,
                    "duplicate with another event id"
                );
            }
            last => {
                let expected_next = last.map_or(1, |(s, _)| s + 1);
                assert_eq!(
                    record.meta.sequence, expected_next,
                    "aggregate {} out of order or with a gap",
                    record.meta.aggregate_id
                );
                per.push((record.meta.sequence, record.meta.event_id));
            }
        }
    }
    let seen: BTreeMap<_, _> = seen.into_iter().collect();
    assert_eq!(
        seen, expected,
        "the topic holds exactly the committed events"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_whose_transaction_commits_late_is_still_published() {
    let env = TestEnv::start("late").await;
    let orders = env.orders();
    let relay = env.start_relay().await;

    // A writer takes an outbox id, then stalls before committing.
    let late_id = OrderId::new().to_string();
    let payload = serde_json::json!({"OrderCompleted": {"completed_at": "2026-11-21T18:00:00Z"}});
    let mut slow = env.pool().begin().await.expect("transaction");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('order', $1, 1, 'OrderCompleted', '1.0', $2, '{}')",
    )
    .bind(&late_id)
    .bind(&payload)
    .execute(&mut *slow)
    .await
    .expect("insert");

    // Later writers commit and get published meanwhile.
    let mut later = Vec::new();
    for _ in 0..5 {
        later.push(place_order(&orders).await);
    }
    env.read_topic("order", WAIT, |records| {
        later
            .iter()
            .all(|id| records.iter().any(|r| &r.meta.aggregate_id == id))
    })
    .await;
    let late_outbox_id: i64 = sqlx::query_scalar("SELECT min(id) FROM outbox")
        .fetch_one(env.pool())
        .await
        .expect("outbox");
    let max_published: i64 =
        sqlx::query_scalar("SELECT max(id) FROM outbox WHERE published_at IS NOT NULL")
            .fetch_one(env.pool())
            .await
            .expect("outbox");
    assert!(
        max_published > late_outbox_id,
        "later rows were published before the stalled one"
    );

    slow.commit().await.expect("late commit");
    let records = env
        .read_topic("order", WAIT, |records| {
            records.iter().any(|r| r.meta.aggregate_id == late_id)
        })
        .await;
    let late = records
        .iter()
        .find(|r| r.meta.aggregate_id == late_id)
        .expect("late event published");
    assert_eq!(late.meta.event_type, "OrderCompleted");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

async fn relay_waits(env: &TestEnv) -> bool {
    sqlx::query_scalar("SELECT waiting FROM outbox_relay_state")
        .fetch_one(env.pool())
        .await
        .expect("relay state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_relay_sleeps_until_an_append_wakes_it() {
    let env = TestEnv::start("idle_relay").await;
    let orders = env.orders();
    // Asleep after 200 ms without events, and it would not look again for ten minutes on its
    // own: only the append's notification can wake it within the test's patience.
    let relay = env
        .start_relay_with(RelayConfig {
            relay_idle_after_ms: 200,
            relay_idle_wait_ms: 600_000,
            ..RelayConfig::default()
        })
        .await;
    eventually(
        Duration::from_secs(10),
        "the relay falls asleep",
        || async { relay_waits(&env).await.then_some(()) },
    )
    .await;

    for round in 0..3 {
        let id = place_order(&orders).await;
        eventually(
            Duration::from_secs(10),
            &format!("append {round} published by a sleeping relay"),
            || async {
                let published: Option<bool> = sqlx::query_scalar(
                    "SELECT published_at IS NOT NULL FROM outbox WHERE aggregate_id = $1",
                )
                .bind(&id)
                .fetch_optional(env.pool())
                .await
                .expect("outbox");
                (published == Some(true)).then_some(())
            },
        )
        .await;
        // Busy, it stops asking writers to notify; idle again, it asks once more.
        eventually(
            Duration::from_secs(10),
            "the relay falls asleep again",
            || async { relay_waits(&env).await.then_some(()) },
        )
        .await;
    }
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_to_start_with_a_contract_the_registry_finds_incompatible() {
    let env = TestEnv::start("incompatible").await;
    let topic = env.kafka.topics().for_aggregate("order").expect("topic");
    // What another producer registered earlier under the subject of OrderReady: our contract
    // cannot read it (`ready_at` has no default).
    let subject = format!("{topic}-backbone.order.OrderReady");
    let earlier = r#"{"type":"record","name":"OrderReady","namespace":"backbone.order","fields":[{"name":"shelf","type":"string"}]}"#;
    let response = backbone_tests::client()
        .post(format!(
            "{}/subjects/{subject}/versions",
            env.registry.schema_registry_url
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .basic_auth(
            "backbone-tests",
            backbone_tests::TEST_REGISTRY_BASIC_AUTH
                .split_once(':')
                .map(|(_, p)| p),
        )
        .json(&serde_json::json!({ "schema": earlier }))
        .send()
        .await
        .expect("registry");
    assert!(response.status().is_success(), "{}", response.status());

    let relay = env.start_relay().await;
    let outcome = tokio::time::timeout(WAIT, relay.handle)
        .await
        .expect("the relay stops by itself")
        .expect("task");
    let error = outcome.expect_err("the relay refuses to start").to_string();
    assert!(
        error.contains("not compatible") && error.contains(&subject),
        "{error}"
    );
    env.stop().await;
}
