//! A declined payment end to end, over HTTP with the real process manager: the demo provider
//! declines every authorization for its test customers (ids starting `dec1ded0-`,
//! `flows::order_flow::DEMO_DECLINED_CUSTOMER_PREFIX`). Such an order, placed with points
//! redeemed, is cancelled by the system with the decline as its reason, no payment is recorded
//! and the points come back, while an order of another customer placed beside it is paid and
//! confirmed.

use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{
    eventually, json_of, order_request, place_request, sigkill, KillOnDrop, TestEnv,
};
use projections::TrackingProjection;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn wait_for_status(client: &reqwest::Client, api: &str, order_id: &str, wanted: &str) {
    eventually(
        WAIT,
        &format!("order {order_id} to be {wanted}"),
        || async {
            let tracking = json_of(client, format!("{api}/orders/{order_id}/tracking")).await?;
            (tracking["status"] == wanted).then_some(())
        },
    )
    .await;
}

/// Event types of an aggregate, in order.
async fn event_types(env: &TestEnv, aggregate_type: &str, id: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
         ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(id)
    .fetch_all(env.pool())
    .await
    .expect("events")
}

async fn rewards_action(client: &reqwest::Client, api: &str, customer: Uuid, action: Value) {
    let response = client
        .post(format!("{api}/customers/{customer}/rewards/actions"))
        .json(&action)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200, "{action}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declined_payment_cancels_the_order_as_the_system_and_gives_the_points_back() {
    let env = TestEnv::start("declined").await;
    let relay = env.start_relay().await;
    let tracking = env.start_projector(Arc::new(TrackingProjection)).await;
    let mut manager = KillOnDrop(env.spawn_process("process-manager", &[]));
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    // The provider's test customer, with points to redeem.
    let declined_customer =
        Uuid::parse_str("dec1ded0-0000-4000-8000-000000000001").expect("a test customer");
    let grant = json!({"action": "adjust", "points": 500, "reason": "welcome",
                       "idempotency_key": "grant-1"});
    rewards_action(&client, &api, declined_customer, grant).await;
    let mut declined_request = order_request(declined_customer);
    declined_request["redeem_points"] = json!(300);
    let declined = place_request(&client, &api, &declined_request).await;
    let paid = place_request(&client, &api, &order_request(Uuid::new_v4())).await;

    wait_for_status(&client, &api, &paid, "Confirmed").await;
    wait_for_status(&client, &api, &declined, "Cancelled").await;

    // Cancelled by the system, saying why; nothing authorized, so no payment at all.
    let (by, reason): (String, String) = sqlx::query_as(
        "SELECT payload->'OrderCancelled'->>'cancelled_by', payload->'OrderCancelled'->>'reason' \
         FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1 \
         AND event_type = 'OrderCancelled'",
    )
    .bind(&declined)
    .fetch_one(env.pool())
    .await
    .expect("the cancellation");
    assert_eq!(by, "System");
    assert!(reason.starts_with("the payment was declined"), "{reason}");
    assert_eq!(
        event_types(&env, "order", &declined).await,
        ["OrderPlaced", "OrderCancelled"]
    );
    assert!(event_types(&env, "payment", &declined).await.is_empty());
    assert_eq!(
        event_types(&env, "payment", &paid).await,
        ["PaymentAuthorized"]
    );

    // The redeemed points are given back: the balance is whole again.
    eventually(WAIT, "the redeemed points to come back", || async {
        let types = event_types(&env, "rewards", &declined_customer.to_string()).await;
        (types == ["PointsAdjusted", "PointsRedeemed", "RedemptionRestored"]).then_some(())
    })
    .await;
    let rewards = eventually(WAIT, "the customer's balance", || async {
        json_of(
            &client,
            format!("{api}/customers/{declined_customer}/rewards"),
        )
        .await
    })
    .await;
    assert_eq!(rewards["balance"], 500, "{rewards}");

    sigkill(&mut manager);
    server.stop().await.expect("api stops");
    tracking.stop().await.expect("tracking stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
