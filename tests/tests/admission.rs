//! The API's admission limit against the real API and PostgreSQL: when every slot is taken, a
//! request is refused at once with `503`, `Retry-After` and a problem document, having done
//! nothing; placements give up before the steps of orders under way; probes and metrics still
//! answer; and the client's retry with the same `Idempotency-Key` goes through, once.

use std::time::{Duration, Instant};

use api::ApiConfig;
use backbone_tests::{client, eventually, order_request, TestEnv};
use reqwest::Response;
use serde_json::Value;
use uuid::Uuid;

/// `POST /orders` for a new customer under idempotency key `key`.
async fn place(api: &str, key: &str, customer: Uuid) -> Response {
    client()
        .post(format!("{api}/orders"))
        .header("idempotency-key", key)
        .json(&order_request(customer))
        .send()
        .await
        .expect("sent")
}

/// Checks that `response` is the at-capacity refusal; returns its problem document.
async fn at_capacity(response: Response) -> Value {
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.expect("a problem document");
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("/at-capacity")),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("did nothing") && d.contains("Idempotency-Key")),
        "{problem}"
    );
    problem
}

async fn orders_placed(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'OrderPlaced'")
        .fetch_one(env.pool())
        .await
        .expect("counted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_api_refuses_at_once_and_the_retry_with_the_same_key_places_the_order_once() {
    let env = TestEnv::start("admission").await;
    let (api, server) = env
        .start_api_with(ApiConfig {
            api_admission_limit: 1,
            api_admission_wait_ms: 800,
            ..TestEnv::api_config()
        })
        .await;
    // The event store's table locked by another transaction: the first placement blocks in its
    // append, holding the API's only slot.
    let mut lock = env.pool().begin().await.expect("begun");
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("locked");
    let first = {
        let api = api.clone();
        tokio::spawn(async move { place(&api, "first", Uuid::new_v4()).await.status() })
    };
    eventually(
        Duration::from_secs(30),
        "the first placement to block in its append",
        || async {
            let blocked: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query ILIKE '%INSERT INTO events%')",
            )
            .fetch_one(env.pool())
            .await
            .ok()?;
            blocked.then_some(())
        },
    )
    .await;

    // New work gives up after a quarter of the wait; the steps and queries wait all of it.
    let second_customer = Uuid::new_v4();
    let started = Instant::now();
    at_capacity(place(&api, "second", second_customer).await).await;
    let placement_refused_in = started.elapsed();
    assert!(
        placement_refused_in < Duration::from_millis(700),
        "a placement is refused after a quarter of the wait: {placement_refused_in:?}"
    );
    let started = Instant::now();
    at_capacity(
        client()
            .get(format!("{api}/orders"))
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "a query waits the whole wait for a slot: {:?}",
        started.elapsed()
    );
    // Probes and metrics are never held back; the refusals are counted.
    let live = client()
        .get(format!("{api}/health/live"))
        .send()
        .await
        .expect("sent");
    assert_eq!(live.status(), 200);
    let metrics = backbone_tests::metrics_text(&client(), &api).await;
    assert!(
        metrics.contains("api_shed_total{request=\"placement\"} 1"),
        "{metrics}"
    );

    // The lock goes: the first placement commits; the refused one had done nothing, and its
    // retry under the same key places it, once.
    lock.rollback().await.expect("released");
    assert_eq!(first.await.expect("first placement"), 201);
    assert_eq!(orders_placed(&env).await, 1);
    let retried = place(&api, "second", second_customer).await;
    assert_eq!(retried.status(), 201);
    let replayed = place(&api, "second", second_customer).await;
    assert_eq!(replayed.status(), 201);
    assert_eq!(orders_placed(&env).await, 2);
    server.stop().await.expect("api stops");
    env.stop().await;
}
