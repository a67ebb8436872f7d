//! The order ⇄ payment process manager over the real pipeline: an order placed over HTTP gets
//! its payment authorized and is confirmed, and once delivered its payment is captured with an
//! invoice and the order completes, with no other calls than a store and a courier make.

use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{eventually, order_request, TestEnv};
use commands::process::OrderPaymentFlow;
use commands::CommandBus;
use domain::payment::PaymentServices;
use domain::services::SystemClock;
use projections::TrackingProjection;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn flow(env: &TestEnv) -> Arc<OrderPaymentFlow> {
    let payments = CommandBus::new(
        env.store.clone(),
        PaymentServices::new(Arc::new(SystemClock)),
    );
    Arc::new(OrderPaymentFlow::new(env.orders(), Arc::new(payments)))
}

async fn status(client: &reqwest::Client, api: &str, order_id: &str) -> Option<String> {
    let response = client
        .get(format!("{api}/orders/{order_id}/tracking"))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    body["status"].as_str().map(str::to_owned)
}

async fn wait_for_status(client: &reqwest::Client, api: &str, order_id: &str, wanted: &str) {
    eventually(
        WAIT,
        &format!("order {order_id} to be {wanted}"),
        || async { (status(client, api, order_id).await.as_deref() == Some(wanted)).then_some(()) },
    )
    .await;
}

async fn act(client: &reqwest::Client, api: &str, order_id: &str, action: Value) {
    let response = client
        .post(format!("{api}/orders/{order_id}/actions"))
        .json(&action)
        .send()
        .await
        .expect("action sent");
    assert_eq!(response.status().as_u16(), 200, "{action}");
}

/// (event type, correlation id, causation id, event id) of an aggregate's events, in order.
async fn history(
    env: &TestEnv,
    aggregate_type: &str,
    id: &str,
) -> Vec<(String, String, String, Uuid)> {
    sqlx::query_as(
        "SELECT event_type, metadata->>'correlation_id', metadata->>'causation_id', event_id \
         FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(id)
    .fetch_all(env.pool())
    .await
    .expect("history")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_placed_order_is_paid_confirmed_captured_and_completed_on_its_own() {
    let env = TestEnv::start("flow").await;
    let relay = env.start_relay().await;
    let tracking = env.start_projector(Arc::new(TrackingProjection)).await;
    let manager = env.start_projector(flow(&env)).await;
    let (api, server) = env.start_api().await;
    let client = reqwest::Client::new();

    let correlation = Uuid::new_v4();
    let placed: Value = client
        .post(format!("{api}/orders"))
        .header("x-correlation-id", correlation.to_string())
        .json(&order_request(Uuid::new_v4()))
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    let order_id = placed["order_id"].as_str().expect("id").to_owned();

    // The process manager authorizes the payment and confirms the order.
    wait_for_status(&client, &api, &order_id, "Confirmed").await;

    // The store and the courier do their part.
    for action in [
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
        json!({"action": "start_preparation"}),
        json!({"action": "mark_ready"}),
        json!({"action": "hand_to_courier"}),
        json!({"action": "mark_delivered"}),
    ] {
        act(&client, &api, &order_id, action).await;
    }

    // Delivered → payment captured → order completed.
    wait_for_status(&client, &api, &order_id, "Completed").await;

    let payment = history(&env, "payment", &order_id).await;
    let types: Vec<&str> = payment.iter().map(|(t, ..)| t.as_str()).collect();
    assert_eq!(types, ["PaymentAuthorized", "PaymentCaptured"]);
    let invoice: String = sqlx::query_scalar(
        "SELECT payload->'PaymentCaptured'->>'invoice_number' FROM events \
         WHERE aggregate_type = 'payment' AND aggregate_id = $1 AND event_type = 'PaymentCaptured'",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("captured");
    assert!(invoice.starts_with("INV-"), "{invoice}");

    // One correlation id from the HTTP request through every event it caused, and each
    // reaction names the event that caused it.
    let order = history(&env, "order", &order_id).await;
    for (event_type, event_correlation, ..) in order.iter().chain(&payment) {
        if [
            "OrderPlaced",
            "OrderConfirmed",
            "PaymentAuthorized",
            "PaymentCaptured",
            "OrderCompleted",
        ]
        .contains(&event_type.as_str())
        {
            assert_eq!(event_correlation, &correlation.to_string(), "{event_type}");
        }
    }
    let authorized_id = payment[0].3;
    let confirmed = order
        .iter()
        .find(|(t, ..)| t == "OrderConfirmed")
        .expect("confirmed");
    assert_eq!(confirmed.2, authorized_id.to_string());

    server.stop().await.expect("api stops");
    manager.stop().await.expect("process manager stops");
    tracking.stop().await.expect("tracking stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_order_has_its_payment_voided() {
    let env = TestEnv::start("flowcancel").await;
    let relay = env.start_relay().await;
    let tracking = env.start_projector(Arc::new(TrackingProjection)).await;
    let manager = env.start_projector(flow(&env)).await;
    let (api, server) = env.start_api().await;
    let client = reqwest::Client::new();

    let placed: Value = client
        .post(format!("{api}/orders"))
        .json(&order_request(Uuid::new_v4()))
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    let order_id = placed["order_id"].as_str().expect("id").to_owned();
    wait_for_status(&client, &api, &order_id, "Confirmed").await;
    act(
        &client,
        &api,
        &order_id,
        json!({"action": "cancel", "by": "Customer", "reason": "changed my mind"}),
    )
    .await;

    let types = eventually(WAIT, "the payment to be voided", || async {
        let types: Vec<String> = history(&env, "payment", &order_id)
            .await
            .into_iter()
            .map(|(t, ..)| t)
            .collect();
        (types.last().map(String::as_str) == Some("PaymentVoided")).then_some(types)
    })
    .await;
    assert_eq!(types, ["PaymentAuthorized", "PaymentVoided"]);

    server.stop().await.expect("api stops");
    manager.stop().await.expect("process manager stops");
    tracking.stop().await.expect("tracking stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
