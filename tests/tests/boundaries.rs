//! Settings at their boundary, over HTTP as their users meet them: the payment webhook's
//! timestamp tolerance (`PAYMENTS_WEBHOOK_TOLERANCE_SECONDS`, 300: 300 s old accepted, 301 s
//! refused; a timestamp from the future is held to the same bound, as the Standard Webhooks
//! scheme does, so a signature made with a clock far ahead cannot be kept for later), two `v1`
//! signatures while the provider rotates its secret, and an administrator's catalogue change
//! reaching another API instance within its refresh period (5 s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone_tests::{eventually, json_of, TestEnv, TEST_WEBHOOK_SECRET};
use commands::{CommandBus, CommandContext};
use domain::payment::{Payment, PaymentCommand, PaymentServices};
use domain::services::SystemClock;
use domain::{Currency, CustomerId, Money, OrderId};
use projections::notifier::signature;
use serde_json::{json, Value};
use uuid::Uuid;

/// An order with an authorized payment, for webhooks to be about.
async fn authorized_payment(env: &TestEnv) -> OrderId {
    let order = OrderId::new();
    let payments: CommandBus<Payment> = CommandBus::new(
        env.store.clone(),
        PaymentServices::new(Arc::new(SystemClock)),
    );
    payments
        .execute(
            &order.to_string(),
            PaymentCommand::AuthorizePayment {
                order_id: order,
                customer_id: CustomerId::from_uuid(Uuid::new_v4()),
                amount: Money::new(2_500, Currency::parse("GBP").expect("GBP")).expect("money"),
                provider: "demo".to_owned(),
                provider_reference: "ref-1".to_owned(),
            },
            &CommandContext::new("test"),
        )
        .await
        .expect("authorized");
    order
}

/// The `v1` part of a signature header.
fn v1(header: &str) -> &str {
    header
        .split_once(",v1=")
        .map(|(_, v1)| v1)
        .expect("a v1 signature")
}

/// Posts a webhook (a new provider event each time) whose header `sign` makes from the body and
/// a timestamp `offset` seconds from now; returns the status, and whether the second changed
/// between the timestamp and the answer (then a boundary case may have moved by a second).
async fn post_at(
    api: &str,
    order: OrderId,
    offset: i64,
    sign: impl Fn(i64, &[u8]) -> String,
) -> (u16, bool) {
    let body = json!({
        "order_id": order, "provider_event_id": format!("evt-{}", Uuid::new_v4()),
        "kind": "Other"
    });
    let bytes = serde_json::to_vec(&body).expect("json");
    let before = chrono::Utc::now().timestamp();
    let status = reqwest::Client::new()
        .post(format!("{api}/payments/{order}/webhooks"))
        .header("content-type", "application/json")
        .header(
            projections::notifier::SIGNATURE_HEADER,
            sign(before + offset, &bytes),
        )
        .body(bytes)
        .send()
        .await
        .expect("sent")
        .status()
        .as_u16();
    (status, chrono::Utc::now().timestamp() != before)
}

/// The status of a webhook signed `offset` seconds from now, retried while the clock's second
/// turned during the request (the server then read another second than the test signed at).
async fn status_at(api: &str, order: OrderId, offset: i64) -> u16 {
    for _ in 0..20 {
        let (status, turned) = post_at(api, order, offset, |t, body| {
            signature(TEST_WEBHOOK_SECRET, t, body)
        })
        .await;
        if !turned {
            return status;
        }
    }
    panic!("the second turned during every one of 20 requests");
}

async fn recorded(env: &TestEnv, order: OrderId) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'payment' AND aggregate_id = $1 \
         AND event_type = 'ProviderWebhookRecorded'",
    )
    .bind(order.to_string())
    .fetch_one(env.pool())
    .await
    .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_300_seconds_away_is_accepted_and_301_seconds_away_refused_both_ways() {
    let env = TestEnv::start("webhook_edge").await;
    let (api, server) = env.start_api().await;
    let order = authorized_payment(&env).await;

    assert_eq!(status_at(&api, order, -300).await, 200, "300 s old");
    assert_eq!(status_at(&api, order, -301).await, 401, "301 s old");
    assert_eq!(status_at(&api, order, 300).await, 200, "300 s ahead");
    assert_eq!(status_at(&api, order, 301).await, 401, "301 s ahead");
    assert_eq!(recorded(&env, order).await, 2, "only the accepted ones");

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_secret_rotation_a_webhook_with_two_signatures_is_accepted_if_either_matches() {
    let env = TestEnv::start("webhook_rotation").await;
    let (api, server) = env.start_api().await;
    let order = authorized_payment(&env).await;
    let retired = "the-provider's-previous-secret";
    let unknown = "a-secret-nobody-configured";

    // The provider signs with its new and its old secret while receivers switch over, the
    // signature the receiver knows first or second.
    for (case, first, second, expected) in [
        ("ours first", TEST_WEBHOOK_SECRET, retired, 200),
        ("ours second", retired, TEST_WEBHOOK_SECRET, 200),
        ("neither ours", retired, unknown, 401),
    ] {
        let (status, _) = post_at(&api, order, 0, |t, body| {
            format!(
                "t={t},v1={},v1={}",
                v1(&signature(first, t, body)),
                v1(&signature(second, t, body))
            )
        })
        .await;
        assert_eq!(status, expected, "{case}");
    }
    assert_eq!(recorded(&env, order).await, 2);

    server.stop().await.expect("api stops");
    env.stop().await;
}

/// The price of the margherita in `uk` as an API instance's catalogue shows it.
async fn price(client: &reqwest::Client, api: &str) -> Option<i64> {
    json_of(client, format!("{api}/catalogue")).await?["catalogue"]["items"]["margherita"]["prices"]
        ["uk"]
        .as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalogue_change_made_on_one_api_instance_reaches_another_within_its_refresh_period() {
    /// The API's catalogue refresh period (`api::ApiServer::build`).
    const PERIOD: Duration = Duration::from_secs(5);
    let env = TestEnv::start("catalogue_refresh").await;
    let (first, first_server) = env.start_api().await;
    let (second, second_server) = env.start_api().await;
    let client = backbone_tests::client();
    let before = price(&client, &second).await.expect("a price");
    let changed = before + 101;

    let item = json!({
        "name": "Margherita", "category": "pizza", "available": true,
        "prices": {"uk": changed}, "options": {}
    });
    let response = client
        .put(format!("{first}/admin/menu/items/margherita"))
        .json(&item)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 204);
    let changed_at = Instant::now();
    assert_eq!(price(&client, &first).await, Some(changed));

    // Within the period (and the time a loaded machine takes to answer), the other instance
    // shows it and prices a new order with it.
    eventually(
        PERIOD + Duration::from_secs(2),
        "the other instance to show the new price",
        || async { (price(&client, &second).await == Some(changed)).then_some(()) },
    )
    .await;
    eprintln!(
        "reached the other instance after {:?}",
        changed_at.elapsed()
    );
    let mut request = backbone_tests::order_request(Uuid::new_v4());
    request["items"] = json!([{"item_id": "margherita", "quantity": 1}]);
    let placed: Value = client
        .post(format!("{second}/orders"))
        .json(&request)
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    let order_id = placed["order_id"].as_str().expect("an order id");
    let subtotal: i64 = sqlx::query_scalar(
        "SELECT (payload->'OrderPlaced'->'subtotal'->>'minor')::bigint FROM events \
         WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(order_id)
    .fetch_one(env.pool())
    .await
    .expect("placed");
    assert_eq!(subtotal, changed);

    first_server.stop().await.expect("api stops");
    second_server.stop().await.expect("api stops");
    env.stop().await;
}
