//! The API contract as generated clients and integrators meet it: the OpenAPI document
//! validates with a validator nobody here wrote (openapi-spec-validator, PyPI, installed into
//! `.venv` by the test command) and says what the API does; `x-correlation-id` is any printable
//! id, echoed and carried into the events; values are snake_case (old spellings still work);
//! a method a route does not have is 405 with `Allow`, and HEAD works where GET does.

use std::process::Command;

use backbone_tests::{order_request, TestEnv};
use serde_json::{json, Value};
use uuid::Uuid;

fn python() -> String {
    std::env::var("BACKBONE_PYTHON").expect(
        "BACKBONE_PYTHON names the .venv python with openapi-spec-validator (scripts/test sets it)",
    )
}

async fn document(client: &reqwest::Client, api: &str) -> Value {
    client
        .get(format!("{api}/openapi.json"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json")
}

/// The named parameter of an operation.
fn parameter<'d>(doc: &'d Value, path: &str, method: &str, name: &str) -> &'d Value {
    doc["paths"][path][method]["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("{method} {path} documents `{name}`"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_validates_with_openapi_spec_validator_and_describes_the_api() {
    let env = TestEnv::start("contract").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let doc = document(&client, &api).await;

    let file = std::env::temp_dir().join(format!("openapi-{}.json", Uuid::new_v4()));
    std::fs::write(&file, doc.to_string()).expect("document written");
    let output = Command::new(python())
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("openapi-spec-validator runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        output.status.success(),
        "openapi-spec-validator refuses the document:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // Query parameters are query parameters.
    for (path, name) in [
        ("/orders", "limit"),
        ("/orders", "cursor"),
        ("/orders", "status"),
        ("/orders/{order_id}/tracking", "position"),
        ("/projections/{name}/dead-letters", "limit"),
        ("/ratings/{kind}", "limit"),
        ("/customers/{customer_id}/notifications", "kind"),
        ("/audit/{aggregate_type}/{aggregate_id}/events", "cursor"),
    ] {
        assert_eq!(
            parameter(&doc, path, "get", name)["in"],
            "query",
            "{path} {name}"
        );
    }
    // The tracking view's items are an array of priced lines.
    let items = &doc["components"]["schemas"]["TrackingView"]["properties"]["items"];
    assert_eq!(items["type"], "array", "{items}");
    // The administrators' bodies are typed.
    for path in [
        "/admin/regions/{code}",
        "/admin/menu/items/{item_id}",
        "/admin/stores/{store_id}",
        "/admin/promotions/{code}",
        "/admin/experiments/{experiment_id}",
    ] {
        let schema =
            &doc["paths"][path]["put"]["requestBody"]["content"]["application/json"]["schema"];
        assert!(
            schema["$ref"]
                .as_str()
                .is_some_and(|r| r.starts_with("#/components/schemas/")),
            "{path}: {schema}"
        );
    }
    let region = &doc["components"]["schemas"]["RegionSettings"];
    assert!(
        region["required"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("currency"))),
        "{region}"
    );
    // Headers: the webhook signature, the correlation id on every operation and every answer.
    let signature = parameter(
        &doc,
        "/payments/{order_id}/webhooks",
        "post",
        "Backbone-Signature",
    );
    assert_eq!(signature["in"], "header");
    assert_eq!(signature["required"], true);
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let correlation = parameter(&doc, path, method, "x-correlation-id");
            assert_eq!(correlation["in"], "header");
            for (status, response) in operation["responses"].as_object().expect("responses") {
                assert!(
                    response["headers"]["x-correlation-id"].is_object(),
                    "{method} {path} {status} documents the echoed x-correlation-id"
                );
            }
            operations += 1;
        }
    }
    assert!(operations > 30, "{operations}");
    // /metrics is documented, as text.
    assert!(
        doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]["text/plain"].is_object()
    );

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_printable_correlation_id_is_echoed_and_carried_into_the_events_of_the_order() {
    let env = TestEnv::start("correlation").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let id = "checkout-42/web:7";

    let placed = client
        .post(format!("{api}/orders"))
        .header("x-correlation-id", id)
        .json(&order_request(Uuid::new_v4()))
        .send()
        .await
        .expect("sent");
    assert_eq!(placed.status().as_u16(), 201);
    assert_eq!(placed.headers()["x-correlation-id"], id);
    let placed: Value = placed.json().await.expect("json");
    let order_id = placed["order_id"].as_str().expect("order id").to_owned();

    // A later step without the header continues the order's transaction.
    let accepted = client
        .post(format!("{api}/orders/{order_id}/actions"))
        .json(&json!({"action": "confirm_payment", "payment_reference": "psp-1"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(accepted.status().as_u16(), 200);
    assert!(accepted.headers().get("x-correlation-id").is_none());
    let correlations: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT metadata->>'correlation_id' FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(&order_id)
    .fetch_all(env.pool())
    .await
    .expect("events");
    assert!(correlations.len() >= 2, "{correlations:?}");
    assert!(
        correlations.iter().all(|c| c.as_deref() == Some(id)),
        "{correlations:?}"
    );

    // Every answer echoes it: a refusal, a missing route, a probe.
    for (request, status) in [
        (
            reqwest::Client::new().get(format!("{api}/orders/{order_id}/tracking")),
            401,
        ),
        (client.get(format!("{api}/no-such-endpoint")), 404),
        (client.get(format!("{api}/health/live")), 200),
    ] {
        let response = request
            .header("x-correlation-id", id)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(response.headers()["x-correlation-id"], id);
    }

    // Not an id (spaces, too long): refused, not silently replaced.
    for bad in ["two words".to_owned(), "x".repeat(129)] {
        let response = client
            .post(format!("{api}/orders"))
            .header("x-correlation-id", bad.as_str())
            .json(&order_request(Uuid::new_v4()))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), 400, "{bad}");
        let body: Value = response.json().await.expect("json");
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("x-correlation-id")),
            "{body}"
        );
    }

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_takes_snake_case_and_the_old_spelling_still_works() {
    let env = TestEnv::start("snakecase").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    for by in ["customer", "Customer"] {
        let placed: Value = client
            .post(format!("{api}/orders"))
            .json(&order_request(Uuid::new_v4()))
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        let order_id = placed["order_id"].as_str().expect("order id");
        let response = client
            .post(format!("{api}/orders/{order_id}/actions"))
            .json(&json!({"action": "cancel", "by": by, "reason": "changed my mind"}))
            .send()
            .await
            .expect("sent");
        let status = response.status().as_u16();
        assert_eq!(
            status,
            200,
            "by {by}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    // The document offers the snake_case values.
    let doc = document(&client, &api).await;
    assert_eq!(
        doc["components"]["schemas"]["CancelledByDto"]["enum"],
        json!(["customer", "store", "system"])
    );

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_a_route_lacks_is_405_with_allow_and_head_works_where_get_does() {
    let env = TestEnv::start("methods").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/orders", "GET, HEAD, POST"),
        (reqwest::Method::PUT, "/orders", "GET, HEAD, POST"),
        (reqwest::Method::GET, "/admin/regions/uk", "PUT"),
        (reqwest::Method::POST, "/health/live", "GET, HEAD"),
        (reqwest::Method::PATCH, "/catalogue", "GET, HEAD"),
    ] {
        let response = client
            .request(method.clone(), format!("{api}{path}"))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }

    for path in ["/catalogue", "/health/live", "/openapi.json", "/orders"] {
        let get = client
            .get(format!("{api}{path}"))
            .send()
            .await
            .expect("sent");
        let head = client
            .head(format!("{api}{path}"))
            .send()
            .await
            .expect("sent");
        assert_eq!(head.status(), get.status(), "HEAD {path}");
        assert_eq!(head.status().as_u16(), 200, "HEAD {path}");
        assert_eq!(
            head.headers().get("content-type"),
            get.headers().get("content-type"),
            "HEAD {path}"
        );
        assert!(head.bytes().await.expect("body").is_empty());
    }

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_no_command_ever_returned_is_refused_at_once_rather_than_awaited() {
    let env = TestEnv::start("positions").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let placed: Value = client
        .post(format!("{api}/orders"))
        .json(&order_request(Uuid::new_v4()))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let order_id = placed["order_id"].as_str().expect("order id");
    for query in [
        "min_sequence=9223372036854775808".to_owned(),
        "min_sequence=999".to_owned(),
        format!("position=order:{order_id}:999"),
        format!("position=order:{}:1", Uuid::new_v4()),
    ] {
        let started = std::time::Instant::now();
        let response = client
            .get(format!("{api}/orders/{order_id}/tracking?{query}"))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), 400, "{query}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{query}: refused without waiting"
        );
    }
    server.stop().await.expect("api stops");
    env.stop().await;
}
