//! Every client mistake gets a problem document with a status that says whose fault it is, and
//! the operational endpoints answer.

use backbone_tests::{order_request, TestEnv};
use serde_json::{json, Value};
use uuid::Uuid;

async fn problem(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json", "status {status}");
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status);
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_are_answered_with_problem_documents_never_500() {
    let env = TestEnv::start("errors").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let post = |body: String| {
        client
            .post(format!("{api}/orders"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let (status, body) = problem(post("{not json".to_owned()).await.expect("sent")).await;
    assert_eq!(status, 400, "{body}");

    let mut unknown_field = order_request(Uuid::new_v4());
    unknown_field["tip"] = json!(100);
    let (status, body) = problem(post(unknown_field.to_string()).await.expect("sent")).await;
    assert_eq!(status, 422);
    assert!(
        body["detail"].as_str().expect("detail").contains("tip"),
        "{body}"
    );

    let mut bad_quantity = order_request(Uuid::new_v4());
    bad_quantity["items"][0]["quantity"] = json!(0);
    let (status, body) = problem(post(bad_quantity.to_string()).await.expect("sent")).await;
    assert_eq!(status, 422);
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("quantities"),
        "{body}"
    );

    let mut unknown_item = order_request(Uuid::new_v4());
    unknown_item["items"][0]["item_id"] = json!("calzone");
    let (status, body) = problem(post(unknown_item.to_string()).await.expect("sent")).await;
    assert_eq!(status, 422);
    assert!(
        body["detail"].as_str().expect("detail").contains("calzone"),
        "{body}"
    );

    let mut unknown_code = order_request(Uuid::new_v4());
    unknown_code["promotion_code"] = json!("FREEPIZZA");
    let (status, body) = problem(post(unknown_code.to_string()).await.expect("sent")).await;
    assert_eq!(status, 422);
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("FREEPIZZA"),
        "{body}"
    );

    let mut bad_region = order_request(Uuid::new_v4());
    bad_region["region"] = json!("mars base");
    let (status, _) = problem(post(bad_region.to_string()).await.expect("sent")).await;
    assert_eq!(status, 422);

    let mut negative = order_request(Uuid::new_v4());
    negative["items"][0]["quantity"] = json!(-1);
    let (status, _) = problem(post(negative.to_string()).await.expect("sent")).await;
    assert_eq!(status, 422);

    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(200_000));
    let (status, _) = problem(post(huge).await.expect("sent")).await;
    assert_eq!(status, 413);

    let response = client
        .post(format!("{api}/orders"))
        .body(order_request(Uuid::new_v4()).to_string())
        .send()
        .await
        .expect("sent");
    let (status, _) = problem(response).await;
    assert_eq!(status, 415);

    let response = client
        .get(format!("{api}/orders/not-a-uuid/tracking"))
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 400);

    let response = client
        .get(format!("{api}/orders/{}/tracking", Uuid::new_v4()))
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 404);

    let response = client
        .get(format!(
            "{api}/orders/{}/tracking?min_sequence=abc",
            Uuid::new_v4()
        ))
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 400);

    let response = client
        .post(format!("{api}/orders/{}/actions", Uuid::new_v4()))
        .json(&json!({"action": "accept", "estimated_preparation_minutes": 10}))
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 404);

    // An illegal transition on a real order is a conflict with the current state.
    let placed: Value = client
        .post(format!("{api}/orders"))
        .json(&order_request(Uuid::new_v4()))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let order_id = placed["order_id"].as_str().expect("id");
    let response = client
        .post(format!("{api}/orders/{order_id}/actions"))
        .json(&json!({"action": "mark_delivered"}))
        .send()
        .await
        .expect("sent");
    let (status, body) = problem(response).await;
    assert_eq!(status, 409);
    assert!(
        body["detail"].as_str().expect("detail").contains("Placed"),
        "{body}"
    );

    let response = client
        .post(format!("{api}/orders/{order_id}/actions"))
        .json(&json!({"action": "teleport"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 422);

    // Deliveries: none exists for an order until the store accepts it; bad coordinates are
    // invalid values.
    let response = client
        .post(format!("{api}/deliveries/{order_id}/actions"))
        .json(&json!({"action": "pick_up"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 404);
    let response = client
        .post(format!("{api}/deliveries/{order_id}/actions"))
        .json(
            &json!({"action": "update_location", "latitude": 91.0, "longitude": 0.0,
                      "device_time": "2026-11-21T18:00:00Z"}),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 422);

    // Nothing above appended an event except the one placement.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(env.pool())
        .await
        .expect("count");
    assert_eq!(events, 1);

    let response = client
        .get(format!("{api}/no/such/route"))
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 404);

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_its_openapi_document_metrics_and_health() {
    let env = TestEnv::start("ops").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    let doc: Value = client
        .get(format!("{api}/openapi.json"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    for path in [
        "/orders",
        "/orders/{order_id}/actions",
        "/orders/{order_id}/tracking",
        "/deliveries/{order_id}/actions",
        "/customers/{customer_id}/rewards/actions",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }

    client
        .post(format!("{api}/orders"))
        .json(&order_request(Uuid::new_v4()))
        .send()
        .await
        .expect("sent");
    let metrics = backbone_tests::metrics_text(&client, &api).await;
    assert!(metrics.contains("commands_total"), "{metrics}");

    let live = client
        .get(format!("{api}/health/live"))
        .send()
        .await
        .expect("sent");
    assert_eq!(live.status().as_u16(), 200);
    // Readiness is checked in the background and served from memory: the first check shortly
    // after start.
    let ready_now = |want: u16| {
        let client = client.clone();
        let api = api.clone();
        async move {
            backbone_tests::eventually(
                std::time::Duration::from_secs(20),
                "a readiness check",
                || async {
                    let ready = client
                        .get(format!("{api}/health/ready"))
                        .send()
                        .await
                        .ok()?;
                    if ready.status().as_u16() != want {
                        return None;
                    }
                    ready.json::<Value>().await.ok()
                },
            )
            .await
        }
    };
    let body = ready_now(200).await;
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["broker"]["ok"], true);
    assert_eq!(body["registry"]["ok"], true);

    // With the registry gone, the API says it is not ready (at the next check), and why.
    env.stop().await;
    let body = ready_now(503).await;
    assert_eq!(body["registry"]["ok"], false, "{body}");
    server.stop().await.expect("api stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_changes_the_menu_and_new_orders_are_priced_with_it() {
    let env = TestEnv::start("admin").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    let item = json!({
        "name": "Margherita", "category": "pizza", "available": true,
        "prices": {"uk": 1299}, "options": {}
    });
    let alice = Uuid::new_v4();
    let response = backbone_tests::client_as(backbone_tests::Role::Admin, alice)
        .put(format!("{api}/admin/menu/items/margherita"))
        .json(&item)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 204);
    let catalogue: Value = client
        .get(format!("{api}/catalogue"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        catalogue["catalogue"]["items"]["margherita"]["prices"]["uk"],
        1299
    );

    let mut request = order_request(Uuid::new_v4());
    request["items"] = json!([{"item_id": "margherita", "quantity": 1}]);
    let placed = client
        .post(format!("{api}/orders"))
        .json(&request)
        .send()
        .await
        .expect("sent");
    assert_eq!(placed.status().as_u16(), 201);
    let order_id = placed.json::<Value>().await.expect("json")["order_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let subtotal: i64 = sqlx::query_scalar(
        "SELECT (payload->'OrderPlaced'->'subtotal'->>'minor')::bigint FROM events \
         WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("placed");
    assert_eq!(subtotal, 1299);
    let who: String = sqlx::query_scalar(
        "SELECT updated_by FROM catalogue_entries WHERE kind = 'item' AND key = 'margherita'",
    )
    .fetch_one(env.pool())
    .await
    .expect("entry");
    assert_eq!(who, format!("admin:{alice}"));

    // Making it unavailable refuses new orders with the reason.
    let mut off = item.clone();
    off["available"] = json!(false);
    let response = client
        .put(format!("{api}/admin/menu/items/margherita"))
        .json(&off)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 204);
    let response = client
        .post(format!("{api}/orders"))
        .json(&request)
        .send()
        .await
        .expect("sent");
    let (status, body) = problem(response).await;
    assert_eq!(status, 422);
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("unavailable"),
        "{body}"
    );

    // Bad input: a negative price, an unknown field, a bad region code.
    let mut negative = item.clone();
    negative["prices"]["uk"] = json!(-1);
    let response = client
        .put(format!("{api}/admin/menu/items/margherita"))
        .json(&negative)
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 422);
    let mut unknown = item.clone();
    unknown["colour"] = json!("red");
    let response = client
        .put(format!("{api}/admin/menu/items/margherita"))
        .json(&unknown)
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 422);
    let response = client
        .put(format!("{api}/admin/regions/not%20a%20code"))
        .json(
            &json!({"currency": "GBP", "tax_basis_points": 2000, "delivery_fee_minor": 0,
                      "accept_within_minutes": 10, "rating_window_days": 7}),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(problem(response).await.0, 422);

    server.stop().await.expect("api stops");
    env.stop().await;
}
