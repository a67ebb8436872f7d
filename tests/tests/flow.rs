//! The order flow process manager over the real pipeline: an order placed over HTTP gets its
//! payment authorized and is confirmed, and once delivered its payment is captured with an
//! invoice, the order completes and the customer earns points, with no other calls than a store
//! and a courier make. Cancelled at any stage, or not accepted in time, its payment is voided
//! and no points move.

use std::sync::Arc;
use std::time::Duration;

use backbone_tests::Running;
use backbone_tests::{act, eventually, order_request, place_request, TestEnv};
use commands::CatalogueStore;
use domain::services::Catalogue;
use flows::OrderFlow;
use projections::TrackingProjection;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn flow(env: &TestEnv) -> Arc<OrderFlow> {
    let seed = Catalogue::demo().expect("demo catalogue");
    let catalogue = CatalogueStore::load(env.pool().clone(), &seed)
        .await
        .expect("catalogue");
    Arc::new(OrderFlow::new(env.store.clone(), Arc::new(catalogue)))
}

/// The process manager and its deadline scheduler, as the `process-manager` binary runs them.
async fn start_flow(env: &TestEnv) -> (Running, Running) {
    let flow = flow(env).await;
    let manager = env.start_projector(flow.clone()).await;
    let token = CancellationToken::new();
    let (pool, stop) = (env.pool().clone(), token.clone());
    let handle = tokio::spawn(async move {
        flow.run_deadlines_until_stopped(pool, Duration::from_millis(100), stop)
            .await;
        Ok(())
    });
    (manager, Running { token, handle })
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

async fn deliver(client: &reqwest::Client, api: &str, order_id: &str, action: Value) {
    let response = client
        .post(format!("{api}/deliveries/{order_id}/actions"))
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
    let (manager, deadlines) = start_flow(&env).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    let correlation = Uuid::new_v4();
    let customer = Uuid::new_v4();
    // A Plus subscriber earns 1.5x points and pays no delivery fee.
    rewards_action(
        &client,
        &api,
        &customer,
        json!({"action": "start_subscription", "tier": "Plus",
               "until": "2099-01-01T00:00:00Z", "idempotency_key": "sub-1"}),
    )
    .await;
    let placed: Value = client
        .post(format!("{api}/orders"))
        .header("x-correlation-id", correlation.to_string())
        .json(&order_request(customer))
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    let order_id = placed["order_id"].as_str().expect("id").to_owned();

    // The process manager authorizes the payment and confirms the order.
    wait_for_status(&client, &api, &order_id, "Confirmed").await;

    // The provider's webhook confirming the authorization arrives seven times: recorded once.
    for attempt in 0..7 {
        let response = backbone_tests::post_webhook(
            &api,
            &order_id,
            &json!({"order_id": order_id, "provider_event_id": "evt-auth-1", "kind": "Authorized"}),
        )
        .await;
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("json");
        let expected = if attempt == 0 {
            json!(["ProviderWebhookRecorded"])
        } else {
            json!([])
        };
        assert_eq!(body["events"], expected, "attempt {attempt}");
    }

    // Before the store accepts, the customer drops the cola: priced again, lower total.
    let before = placed_total(&env, &order_id).await;
    act(
        &client,
        &api,
        &order_id,
        json!({"action": "modify", "items": [{"item_id": "margherita", "quantity": 2, "options": ["extra-cheese"]}]}),
    )
    .await;
    let modified_total = eventually(WAIT, "the tracking view to show the new total", || async {
        let view: Value =
            backbone_tests::json_of(&client, format!("{api}/orders/{order_id}/tracking")).await?;
        let total = view["total"]["minor"].as_i64()?;
        (total != before).then_some(total)
    })
    .await;
    // 2 × 1149 = 2298; + 20 % tax (459.6 → 460); no delivery fee for a Plus subscriber.
    assert_eq!(modified_total, 2_298 + 460);

    // The store does its part; accepting makes the flow request a delivery.
    for action in [
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
        json!({"action": "start_preparation"}),
        json!({"action": "mark_ready"}),
    ] {
        act(&client, &api, &order_id, action).await;
    }
    // Dispatch assigns a courier as soon as the delivery exists; the courier picks up and
    // hands over. The flow moves the order along.
    let courier = Uuid::new_v4();
    eventually(WAIT, "the delivery to be requested", || async {
        let response = client
            .post(format!("{api}/deliveries/{order_id}/actions"))
            .json(&json!({"action": "assign_courier", "courier_id": courier}))
            .send()
            .await
            .ok()?;
        (response.status().as_u16() == 200).then_some(())
    })
    .await;
    let fix_time = chrono::Utc::now();
    for action in [
        json!({"action": "pick_up"}),
        json!({"action": "update_location", "latitude": 51.51, "longitude": -0.12,
               "device_time": fix_time}),
    ] {
        deliver(&client, &api, &order_id, action).await;
    }
    // The tracking view follows the delivery: courier, last position, ETA with its interval.
    let view: Value = eventually(WAIT, "the delivery in the tracking view", || async {
        let view: Value =
            backbone_tests::json_of(&client, format!("{api}/orders/{order_id}/tracking")).await?;
        (view["delivery"]["courier_position"]["latitude"] == json!(51.51)).then_some(view)
    })
    .await;
    let tracked = &view["delivery"];
    assert_eq!(tracked["courier_id"], json!(courier));
    assert_eq!(tracked["status"], "PickedUp");
    assert_eq!(tracked["courier_position"]["longitude"], json!(-0.12));
    let at = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(tracked["eta"][field].as_str().expect(field))
            .expect("a time")
    };
    assert!(at("earliest_at") <= at("expected_at") && at("expected_at") <= at("latest_at"));
    assert!(tracked["eta"]["remaining_meters"].as_i64().is_some());
    deliver(&client, &api, &order_id, json!({"action": "deliver"})).await;

    // Delivered → payment captured → order completed.
    wait_for_status(&client, &api, &order_id, "Completed").await;
    let delivery: Vec<String> = history(&env, "delivery", &order_id)
        .await
        .into_iter()
        .map(|(t, ..)| t)
        .collect();
    for expected in [
        "DeliveryRequested",
        "EtaUpdated",
        "CourierAssigned",
        "PickedUpAtStore",
        "DeliveredToCustomer",
    ] {
        assert!(
            delivery.iter().any(|t| t == expected),
            "{expected} in {delivery:?}"
        );
    }
    let timeline: Vec<String> = client
        .get(format!("{api}/orders/{order_id}/tracking"))
        .send()
        .await
        .expect("tracking")
        .json::<Value>()
        .await
        .expect("json")["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .map(|e| e["status"].as_str().expect("status").to_owned())
        .collect();
    assert_eq!(
        timeline,
        [
            "Placed",
            "Confirmed",
            "Accepted",
            "Preparing",
            "Ready",
            "OutForDelivery",
            "Delivered",
            "Completed"
        ]
    );

    let payment = history(&env, "payment", &order_id).await;
    let types: Vec<&str> = payment.iter().map(|(t, ..)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "PaymentAuthorized",
            "ProviderWebhookRecorded",
            "PaymentCaptured"
        ]
    );
    let invoice: String = sqlx::query_scalar(
        "SELECT payload->'PaymentCaptured'->>'invoice_number' FROM events \
         WHERE aggregate_type = 'payment' AND aggregate_id = $1 AND event_type = 'PaymentCaptured'",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("captured");
    assert!(invoice.starts_with("INV-"), "{invoice}");
    let captured: i64 = sqlx::query_scalar(
        "SELECT (payload->'PaymentCaptured'->'amount'->>'minor')::bigint FROM events \
         WHERE aggregate_type = 'payment' AND aggregate_id = $1 AND event_type = 'PaymentCaptured'",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("captured");
    assert_eq!(
        captured, modified_total,
        "the modified total is captured, not the authorization"
    );

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

    // The customer earned points at the region's rate (uk: 5 points per 100 minor units),
    // times the Plus multiplier (1.5x), rounded down once.
    let total = modified_total;
    let points = eventually(WAIT, "points to be earned", || async {
        points_of(&env, &customer).await.filter(|p| *p > 0)
    })
    .await;
    assert_eq!(points, total * 5 * 15_000 / 1_000_000);

    server.stop().await.expect("api stops");
    deadlines.stop().await.expect("scheduler stops");
    manager.stop().await.expect("process manager stops");
    tracking.stop().await.expect("tracking stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

/// Points earned in a customer's rewards ledger; `None` if the ledger has no events at all.
async fn points_of(env: &TestEnv, customer: &Uuid) -> Option<i64> {
    let (events, earned): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum((payload->'PointsEarned'->>'points')::bigint), 0)::bigint \
         FROM events WHERE aggregate_type = 'rewards' AND aggregate_id = $1",
    )
    .bind(customer.to_string())
    .fetch_one(env.pool())
    .await
    .expect("ledger");
    (events > 0).then_some(earned)
}

async fn placed_total(env: &TestEnv, order_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT (payload->'OrderPlaced'->'total'->>'minor')::bigint FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(order_id)
    .fetch_one(env.pool())
    .await
    .expect("placed")
}

async fn place(client: &reqwest::Client, api: &str, customer: Uuid) -> String {
    place_request(client, api, &order_request(customer)).await
}

async fn payment_ends_voided(env: &TestEnv, order_id: &str) {
    let types = eventually(
        WAIT,
        &format!("the payment of {order_id} to be voided"),
        || async {
            let types: Vec<String> = history(env, "payment", order_id)
                .await
                .into_iter()
                .map(|(t, ..)| t)
                .collect();
            (types.last().map(String::as_str) == Some("PaymentVoided")).then_some(types)
        },
    )
    .await;
    assert_eq!(types, ["PaymentAuthorized", "PaymentVoided"], "{order_id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_cancelled_at_any_stage_or_not_accepted_in_time_has_its_payment_voided() {
    let env = TestEnv::start("flowcancel").await;
    let relay = env.start_relay().await;
    let tracking = env.start_projector(Arc::new(TrackingProjection)).await;
    let (api, server) = env.start_api_with_test_catalogue().await;
    let client = backbone_tests::client();
    let cancel = json!({"action": "cancel", "by": "Customer", "reason": "changed my mind"});

    // Before payment: cancelled while the process manager is not even running.
    let customers: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let before_payment = place(&client, &api, customers[0]).await;
    act(&client, &api, &before_payment, cancel.clone()).await;
    let (manager, deadlines) = start_flow(&env).await;

    // After payment.
    let after_payment = place(&client, &api, customers[1]).await;
    wait_for_status(&client, &api, &after_payment, "Confirmed").await;
    act(&client, &api, &after_payment, cancel.clone()).await;

    // After the store accepted.
    let after_acceptance = place(&client, &api, customers[2]).await;
    wait_for_status(&client, &api, &after_acceptance, "Confirmed").await;
    act(
        &client,
        &api,
        &after_acceptance,
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
    )
    .await;
    act(&client, &api, &after_acceptance, cancel).await;

    // Not accepted in time (region `test-fast`: due at once), with the deadline armed while
    // no scheduler runs: it is durable and fires once a scheduler starts again.
    deadlines.stop().await.expect("scheduler stops");
    let mut request = order_request(customers[3]);
    request["region"] = json!("test-fast");
    request["store_id"] = json!(backbone_tests::store_in("test-fast"));
    let timed_out = place_request(&client, &api, &request).await;
    wait_for_status(&client, &api, &timed_out, "Confirmed").await;
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_flow.deadlines \
         WHERE order_id = $1 AND fired_at IS NULL AND due_at <= now()",
    )
    .bind(&timed_out)
    .fetch_one(env.pool())
    .await
    .expect("deadline");
    assert_eq!(pending, 1, "the accept-by deadline is armed and due");
    let (restarted, deadlines) = start_flow(&env).await;
    manager.stop().await.expect("first process manager stops");
    let manager = restarted;

    for order_id in [
        &before_payment,
        &after_payment,
        &after_acceptance,
        &timed_out,
    ] {
        wait_for_status(&client, &api, order_id, "Cancelled").await;
        payment_ends_voided(&env, order_id).await;
    }
    // The delivery requested when the store accepted is cancelled with the order.
    let delivery: Vec<String> = history(&env, "delivery", &after_acceptance)
        .await
        .into_iter()
        .map(|(t, ..)| t)
        .collect();
    assert_eq!(
        delivery.first().map(String::as_str),
        Some("DeliveryRequested")
    );
    assert_eq!(
        delivery.last().map(String::as_str),
        Some("DeliveryCancelled"),
        "{delivery:?}"
    );
    let cancelled_by: String = sqlx::query_scalar(
        "SELECT payload->'OrderCancelled'->>'cancelled_by' FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 AND event_type = 'OrderCancelled'",
    )
    .bind(&timed_out)
    .fetch_one(env.pool())
    .await
    .expect("cancelled");
    assert_eq!(cancelled_by, "System");
    // No money was captured and no points moved for any of them.
    for customer in &customers {
        assert_eq!(points_of(&env, customer).await, None);
    }

    server.stop().await.expect("api stops");
    deadlines.stop().await.expect("scheduler stops");
    manager.stop().await.expect("process manager stops");
    tracking.stop().await.expect("tracking stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

async fn ledger_events(env: &TestEnv, customer: &Uuid) -> Vec<String> {
    history(env, "rewards", &customer.to_string())
        .await
        .into_iter()
        .map(|(t, ..)| t)
        .collect()
}

async fn rewards_action(
    client: &reqwest::Client,
    api: &str,
    customer: &Uuid,
    action: Value,
) -> Value {
    let response = client
        .post(format!("{api}/customers/{customer}/rewards/actions"))
        .json(&action)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200, "{action}");
    response.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn points_redeemed_at_placement_are_debited_and_given_back_when_the_order_is_cancelled() {
    let env = TestEnv::start("redeemflow").await;
    let relay = env.start_relay().await;
    let tracking = env.start_projector(Arc::new(TrackingProjection)).await;
    let (manager, deadlines) = start_flow(&env).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let customer = Uuid::new_v4();

    // An administrator grants 500 points; the same request again changes nothing.
    let grant = json!({"action": "adjust", "points": 500, "reason": "welcome", "idempotency_key": "grant-1"});
    let first = rewards_action(&client, &api, &customer, grant.clone()).await;
    assert_eq!(first["events"], json!(["PointsAdjusted"]));
    let again = rewards_action(&client, &api, &customer, grant).await;
    assert_eq!(again["events"], json!([]));

    // 300 points off an order: debited, then the order proceeds.
    let mut request = order_request(customer);
    request["redeem_points"] = json!(300);
    let order_id = place_request(&client, &api, &request).await;
    wait_for_status(&client, &api, &order_id, "Confirmed").await;
    assert_eq!(
        ledger_events(&env, &customer).await,
        ["PointsAdjusted", "PointsRedeemed"]
    );

    // Cancelled: the payment is voided and the points come back.
    act(
        &client,
        &api,
        &order_id,
        json!({"action": "cancel", "by": "Customer", "reason": "changed my mind"}),
    )
    .await;
    payment_ends_voided(&env, &order_id).await;
    eventually(WAIT, "the points to be restored", || async {
        (ledger_events(&env, &customer)
            .await
            .last()
            .map(String::as_str)
            == Some("RedemptionRestored"))
        .then_some(())
    })
    .await;

    // More points than the balance holds: the order is cancelled by the system, no payment.
    let mut greedy = order_request(customer);
    greedy["redeem_points"] = json!(1_000);
    let greedy_id = place_request(&client, &api, &greedy).await;
    wait_for_status(&client, &api, &greedy_id, "Cancelled").await;
    assert!(history(&env, "payment", &greedy_id).await.is_empty());
    assert_eq!(
        ledger_events(&env, &customer).await,
        ["PointsAdjusted", "PointsRedeemed", "RedemptionRestored"]
    );

    // A donation at the region's rate (uk: 50 minor units per 100 points).
    let donated = rewards_action(
        &client,
        &api,
        &customer,
        json!({"action": "donate", "charity": "food-bank-uk", "points": 200, "region": "uk", "idempotency_key": "donate-1"}),
    )
    .await;
    assert_eq!(donated["events"], json!(["PointsDonated"]));
    let amount: i64 = sqlx::query_scalar(
        "SELECT (payload->'PointsDonated'->'amount'->>'minor')::bigint FROM events \
         WHERE aggregate_type = 'rewards' AND aggregate_id = $1 AND event_type = 'PointsDonated'",
    )
    .bind(customer.to_string())
    .fetch_one(env.pool())
    .await
    .expect("donation");
    assert_eq!(amount, 100);
    // A donation beyond the balance (500 - 200 left = 300) is a conflict that says what is left.
    let response = client
        .post(format!("{api}/customers/{customer}/rewards/actions"))
        .json(&json!({"action": "donate", "charity": "food-bank-uk", "points": 301, "region": "uk", "idempotency_key": "donate-2"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 409);
    let problem: Value = response.json().await.expect("problem");
    assert!(
        problem["detail"].as_str().expect("detail").contains("300"),
        "{problem}"
    );

    // The operator's expiry run finds nothing due yet (lots last a year): nothing recorded.
    let expired = rewards_action(
        &client,
        &api,
        &customer,
        json!({"action": "expire_points", "idempotency_key": "expire-1"}),
    )
    .await;
    assert_eq!(expired["events"], json!([]));
    // A lapse for a customer who never subscribed is refused with the reason.
    let response = client
        .post(format!("{api}/customers/{customer}/rewards/actions"))
        .json(&json!({"action": "lapse_subscription", "idempotency_key": "lapse-1"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 409);

    server.stop().await.expect("api stops");
    deadlines.stop().await.expect("scheduler stops");
    manager.stop().await.expect("process manager stops");
    tracking.stop().await.expect("tracking stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
