//! Promotion limits over HTTP: `WELCOME10` is `once_per_customer`, so of 20 concurrent
//! placements by one customer exactly one is discounted and the others are refused (422 naming
//! `promotion_code`); other customers and unlimited codes are unaffected; a placement that was
//! refused, or a claim whose order never appeared (a crash between claim and append), does not
//! burn the customer's one use.

use backbone_tests::{client, client_as, order_request, TestEnv};
use futures::future::join_all;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

fn with_code(customer: Uuid, code: &str) -> Value {
    let mut request = order_request(customer);
    request["promotion_code"] = json!(code);
    request
}

async fn place(client: &reqwest::Client, api: &str, request: &Value) -> (u16, Value) {
    let response = client
        .post(format!("{api}/orders"))
        .json(request)
        .send()
        .await
        .expect("sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Orders of `customer` placed with `code` in the event store.
async fn placed_with(pool: &PgPool, customer: Uuid, code: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'order' AND event_type = 'OrderPlaced' \
         AND payload::jsonb -> 'OrderPlaced' ->> 'customer_id' = $1 \
         AND payload::jsonb -> 'OrderPlaced' ->> 'promotion_code' = $2",
    )
    .bind(customer.to_string())
    .bind(code)
    .fetch_one(pool)
    .await
    .expect("counted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_welcome10_placements_of_one_customer_give_exactly_one_discounted_order()
{
    let env = TestEnv::start("promo_once").await;
    let (api, server) = env.start_api().await;
    let customer = Uuid::new_v4();
    let as_customer = client_as(backbone_tests::Role::Customer, customer);
    let request = with_code(customer, "WELCOME10");
    let answers = join_all((0..20).map(|_| place(&as_customer, &api, &request))).await;
    let placed: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(placed.len(), 1, "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(*status, 422, "{body}");
        let detail = body["detail"].as_str().expect("a problem document");
        assert!(detail.contains("promotion_code"), "{detail}");
        assert!(detail.contains("one order per customer"), "{detail}");
    }
    assert_eq!(placed_with(env.pool(), customer, "WELCOME10").await, 1);

    // Without the code the customer orders as usual; another customer still gets it once.
    let (status, _) = place(&as_customer, &api, &order_request(customer)).await;
    assert_eq!(status, 201);
    let other = Uuid::new_v4();
    let (status, _) = place(&client(), &api, &with_code(other, "WELCOME10")).await;
    assert_eq!(status, 201);
    let (status, _) = place(&client(), &api, &with_code(other, "WELCOME10")).await;
    assert_eq!(status, 422);

    // A code without the limit applies to every order of a customer.
    let status = client()
        .put(format!("{api}/admin/promotions/ALWAYS5"))
        .json(&json!({"percent_off_bp": 500, "active": true, "once_per_customer": false}))
        .send()
        .await
        .expect("sent")
        .status();
    assert_eq!(status.as_u16(), 204);
    let regular = Uuid::new_v4();
    for _ in 0..2 {
        let (status, body) = place(&client(), &api, &with_code(regular, "ALWAYS5")).await;
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(placed_with(env.pool(), regular, "ALWAYS5").await, 2);
    server.stop().await.expect("api stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_placement_or_a_crashed_claim_does_not_burn_the_customers_one_use() {
    let env = TestEnv::start("promo_claims").await;
    let (api, server) = env.start_api().await;

    // Refused for another reason (below the code's minimum subtotal): the claim goes back.
    let customer = Uuid::new_v4();
    let mut small = with_code(customer, "WELCOME10");
    small["items"] = json!([{"item_id": "cola", "quantity": 1}]);
    let (status, body) = place(&client(), &api, &small).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = place(&client(), &api, &with_code(customer, "WELCOME10")).await;
    assert_eq!(status, 201, "{body}");

    // A crash between the claim and the append left a claim naming an order that never
    // appeared: reserved while a placement could still be running, free after that.
    let crashed = Uuid::new_v4();
    let claim = |age_seconds: f64| {
        sqlx::query(
            "INSERT INTO promotion_claims (code, customer_id, order_id, claimed_at) \
             VALUES ('WELCOME10', $1, $2, now() - make_interval(secs => $3)) \
             ON CONFLICT (code, customer_id) DO UPDATE \
             SET order_id = excluded.order_id, claimed_at = excluded.claimed_at",
        )
        .bind(crashed.to_string())
        .bind(Uuid::new_v4().to_string())
        .bind(age_seconds)
        .execute(env.pool())
    };
    claim(1.0).await.expect("fresh claim");
    let (status, body) = place(&client(), &api, &with_code(crashed, "WELCOME10")).await;
    assert_eq!(status, 422, "a claim in flight is reserved: {body}");
    claim(600.0).await.expect("stale claim");
    let (status, body) = place(&client(), &api, &with_code(crashed, "WELCOME10")).await;
    assert_eq!(
        status, 201,
        "a stale claim without its order is free: {body}"
    );
    assert_eq!(placed_with(env.pool(), crashed, "WELCOME10").await, 1);
    // Once its order exists the claim stands, however old.
    sqlx::query("UPDATE promotion_claims SET claimed_at = now() - interval '1 day'")
        .execute(env.pool())
        .await
        .expect("aged");
    let (status, _) = place(&client(), &api, &with_code(crashed, "WELCOME10")).await;
    assert_eq!(status, 422);
    server.stop().await.expect("api stops");
}
