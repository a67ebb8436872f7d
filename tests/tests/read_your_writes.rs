//! Read-your-writes waits (`?position=`) against the real API and projector: a waiting query
//! wakes on the projector's signal (it answers as soon as the projector applies, though its
//! deadline is far away), hundreds of waiting queries do not slow another client's reads (they
//! do not poll the database), and a client over its wait limit gets 429.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::ApiConfig;
use backbone_tests::{client, client_as, order_request, Role, TestEnv};
use futures::future::join_all;
use projections::NotificationsProjection;
use serde_json::Value;
use uuid::Uuid;

/// Places an order for `customer` over HTTP; returns its position token.
async fn placed_position(api: &str, customer: Uuid) -> String {
    let placed: Value = client()
        .post(format!("{api}/orders"))
        .json(&order_request(customer))
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    placed["position"]["token"]
        .as_str()
        .expect("a position token")
        .to_owned()
}

/// `GET /customers/{customer}/notifications` (with `position`, if any): status and elapsed.
async fn notifications(
    client: &reqwest::Client,
    api: &str,
    customer: Uuid,
    position: Option<&str>,
) -> (u16, Duration, reqwest::Response) {
    let started = Instant::now();
    let mut url = format!("{api}/customers/{customer}/notifications");
    if let Some(position) = position {
        url.push_str(&format!("?position={position}"));
    }
    let response = client.get(url).send().await.expect("sent");
    (response.status().as_u16(), started.elapsed(), response)
}

fn config(wait_ms: u64, max_waits: usize) -> ApiConfig {
    ApiConfig {
        api_read_your_writes_wait_ms: wait_ms,
        api_max_waits_per_client: max_waits,
        ..TestEnv::api_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_query_answers_once_the_projector_applies_not_at_its_deadline() {
    let env = TestEnv::start("ryw_wake").await;
    // A deadline far away: an answer well before it came from the projector's signal.
    let (api, server) = env.start_api_with(config(60_000, 8)).await;
    let relay = env.start_relay().await;
    let customer = Uuid::new_v4();
    let position = placed_position(&api, customer).await;
    let waiter = {
        let api = api.clone();
        tokio::spawn(async move {
            let (status, _, _) = notifications(
                &client_as(Role::Customer, customer),
                &api,
                customer,
                Some(&position),
            )
            .await;
            (status, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished(), "nothing applied yet: it waits");
    let started = Instant::now();
    let projector = env.start_projector(Arc::new(NotificationsProjection)).await;
    let (status, answered) = waiter.await.expect("waiter");
    assert_eq!(status, 200);
    let took = answered.duration_since(started);
    assert!(
        took < Duration::from_secs(15),
        "answered {took:?} after the projector started, not at its 60 s deadline"
    );
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    server.stop().await.expect("api stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_over_its_wait_limit_gets_429_with_retry_after_and_others_still_wait() {
    let env = TestEnv::start("ryw_limit").await;
    let (api, server) = env.start_api_with(config(2_000, 2)).await;
    // Committed, never applied (no projector runs): every wait lasts to its deadline.
    let position = placed_position(&api, Uuid::new_v4()).await;
    let (greedy, patient) = (Uuid::new_v4(), Uuid::new_v4());
    let greedy_client = client_as(Role::Customer, greedy);
    let patient_client = client_as(Role::Customer, patient);
    let waits: Vec<_> = [
        (&greedy_client, greedy),
        (&greedy_client, greedy),
        (&patient_client, patient),
    ]
    .into_iter()
    .map(|(c, customer)| {
        let (c, api, position) = (c.clone(), api.clone(), position.clone());
        tokio::spawn(async move { notifications(&c, &api, customer, Some(&position)).await.0 })
    })
    .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, took, response) =
        notifications(&greedy_client, &api, greedy, Some(&position)).await;
    assert_eq!(status, 429);
    assert!(took < Duration::from_secs(1), "refused at once: {took:?}");
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.expect("a problem document");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("waiting"),
        "{problem}"
    );
    // A query that needs no wait is not limited.
    let (status, _, _) = notifications(&greedy_client, &api, greedy, None).await;
    assert_eq!(status, 200);
    // The two waits of the greedy client and the other client's run to their deadline.
    for wait in waits {
        assert_eq!(wait.await.expect("waiter"), 503);
    }
    // Their slots are free again.
    let (status, _, _) = notifications(&greedy_client, &api, greedy, Some(&position)).await;
    assert_eq!(status, 503);
    server.stop().await.expect("api stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_waiting_queries_do_not_slow_another_clients_reads() {
    let env = TestEnv::start("ryw_load").await;
    let (api, server) = env.start_api_with(config(8_000, 8)).await;
    let position = placed_position(&api, Uuid::new_v4()).await;
    let reader = Uuid::new_v4();
    let reader_client = client_as(Role::Customer, reader);
    let median_read = || async {
        let mut took = Vec::new();
        for _ in 0..15 {
            let (status, elapsed, _) = notifications(&reader_client, &api, reader, None).await;
            assert_eq!(status, 200);
            took.push(elapsed);
        }
        took.sort();
        took[took.len() / 2]
    };
    let quiet = median_read().await;
    // 40 customers, 8 waits each, on a position no projector applies.
    let waits: Vec<_> = (0..40)
        .flat_map(|_| {
            let customer = Uuid::new_v4();
            let c = client_as(Role::Customer, customer);
            (0..8).map(move |_| (c.clone(), customer))
        })
        .map(|(c, customer)| {
            let (api, position) = (api.clone(), position.clone());
            tokio::spawn(async move { notifications(&c, &api, customer, Some(&position)).await.0 })
        })
        .collect();
    // The waits have started (and looked once) before the reads are measured.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = median_read().await;
    assert!(
        busy < Duration::from_millis(200),
        "a plain read took {busy:?} with 320 waits in flight (quiet: {quiet:?})"
    );
    let statuses = join_all(waits).await;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(503))),
        "every wait ran to its deadline: {statuses:?}"
    );
    server.stop().await.expect("api stops");
}
