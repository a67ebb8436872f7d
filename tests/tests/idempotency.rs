//! Idempotent retries: a mutating request with an `Idempotency-Key` takes effect once, however
//! often and however concurrently it is sent; a different request with the same key is
//! refused; an expired key acts again.

use std::time::Duration;

use api::ApiConfig;
use backbone_tests::{
    eventually, order_request, place_request, KillOnDrop, TestEnv, TEST_JWT_SECRET,
};
use serde_json::{json, Value};
use sqlx::Connection;
use uuid::Uuid;

const KEY: &str = "idempotency-key";
const REPLAYED: &str = "idempotent-replayed";

/// Status, replay marker and JSON body (or `Null` when empty) of a response.
async fn answer(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get(REPLAYED)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = response.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("a JSON body")
    };
    (status, replayed, body)
}

async fn post_order(api: &str, key: &str, body: &Value) -> reqwest::Response {
    backbone_tests::client()
        .post(format!("{api}/orders"))
        .header(KEY, key)
        .json(body)
        .send()
        .await
        .expect("sent")
}

async fn events(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(env.pool())
        .await
        .expect("events counted")
}

async fn orders_placed_for(env: &TestEnv, customer: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'OrderPlaced' \
         AND payload->'OrderPlaced'->>'customer_id' = $1",
    )
    .bind(customer.to_string())
    .fetch_one(env.pool())
    .await
    .expect("orders counted")
}

/// Waits until every stored key has expired by the database's clock (the one the API compares
/// `expires_at` with), instead of sleeping for a TTL.
async fn keys_expired(env: &TestEnv) {
    eventually(Duration::from_secs(30), "the keys to expire", || async {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM idempotency_keys WHERE expires_at > clock_timestamp()",
        )
        .fetch_one(env.pool())
        .await
        .ok()?;
        (live == 0 && stored_keys(env).await > 0).then_some(())
    })
    .await;
}

/// A key's TTL in the expiry tests: long enough for a loaded machine to send the replay that
/// must come while it is fresh; the tests then wait for the expiry itself.
const SHORT_TTL_SECONDS: u64 = 3;

async fn stored_keys(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(env.pool())
        .await
        .expect("keys counted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_requests_with_one_key_create_one_order() {
    let env = TestEnv::start("idem_concurrent").await;
    let (api, server) = env.start_api().await;
    let customer = Uuid::new_v4();
    let body = order_request(customer);
    let key = Uuid::new_v4().to_string();

    let answers = futures::future::join_all(
        (0..20).map(|_| async { answer(post_order(&api, &key, &body).await).await }),
    )
    .await;

    let first_id = answers[0].2["order_id"].clone();
    assert!(first_id.is_string(), "{:?}", answers[0]);
    for (status, _, body) in &answers {
        assert_eq!(*status, 201, "{body}");
        assert_eq!(body["order_id"], first_id, "{body}");
    }
    assert_eq!(
        answers
            .iter()
            .filter(|(_, replayed, _)| replayed.is_none())
            .count(),
        1,
        "one request acted, the others were answered with its response"
    );
    assert_eq!(orders_placed_for(&env, customer).await, 1);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_returns_the_first_response_and_appends_nothing() {
    let env = TestEnv::start("idem_repeat").await;
    let (api, server) = env.start_api().await;
    let customer = Uuid::new_v4();
    let body = order_request(customer);
    let key = Uuid::new_v4().to_string();

    let first = post_order(&api, &key, &body).await;
    let location = first.headers().get("location").cloned();
    let (status, replayed, placed) = answer(first).await;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(replayed, None);
    let appended = events(&env).await;

    // The same request, its JSON keys in another order: the same request.
    let reordered: Value = serde_json::from_str(&{
        let mut fields: Vec<(String, Value)> = body
            .as_object()
            .expect("an object")
            .clone()
            .into_iter()
            .collect();
        fields.reverse();
        let inner: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("{}:{v}", Value::String(k)))
            .collect();
        format!("{{{}}}", inner.join(","))
    })
    .expect("JSON");
    let again = post_order(&api, &key, &reordered).await;
    assert_eq!(again.headers().get("location"), location.as_ref());
    assert_eq!(
        again
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let (status, replayed, repeated) = answer(again).await;
    assert_eq!(status, 201);
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(repeated, placed, "the first response, byte for byte");
    assert_eq!(events(&env).await, appended, "nothing appended");
    assert_eq!(orders_placed_for(&env, customer).await, 1);

    // Without a key, the same body is a new order.
    let other = place_request(&backbone_tests::client(), &api, &body).await;
    assert_ne!(Value::String(other), placed["order_id"]);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_a_different_body_is_refused_with_422() {
    let env = TestEnv::start("idem_mismatch").await;
    let (api, server) = env.start_api().await;
    let key = Uuid::new_v4().to_string();
    let first_customer = Uuid::new_v4();
    let (status, _, _) = answer(post_order(&api, &key, &order_request(first_customer)).await).await;
    assert_eq!(status, 201);

    let second_customer = Uuid::new_v4();
    let response = post_order(&api, &key, &order_request(second_customer)).await;
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let (status, replayed, problem) = answer(response).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(replayed, None);
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("different request") && d.contains("new key")),
        "{problem}"
    );
    assert_eq!(orders_placed_for(&env, second_customer).await, 0);

    // Another endpoint with the same key is another request too.
    let response = backbone_tests::client()
        .post(format!("{api}/customers/{first_customer}/rewards/actions"))
        .header(KEY, &key)
        .json(
            &json!({"action": "adjust", "points": 10, "reason": "goodwill",
                      "idempotency_key": "adjust-1"}),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 422);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_acts_again() {
    let env = TestEnv::start("idem_expiry").await;
    let (api, server) = env
        .start_api_with(ApiConfig {
            api_idempotency_ttl_seconds: SHORT_TTL_SECONDS,
            ..TestEnv::api_config()
        })
        .await;
    let key = Uuid::new_v4().to_string();
    let first_customer = Uuid::new_v4();
    let (status, _, first) =
        answer(post_order(&api, &key, &order_request(first_customer)).await).await;
    assert_eq!(status, 201, "{first}");
    let (_, replayed, _) =
        answer(post_order(&api, &key, &order_request(first_customer)).await).await;
    assert_eq!(replayed.as_deref(), Some("true"), "replayed while fresh");

    keys_expired(&env).await;

    // Forgotten: a different request with the key is a new request, not a 422.
    let second_customer = Uuid::new_v4();
    let (status, replayed, second) =
        answer(post_order(&api, &key, &order_request(second_customer)).await).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(replayed, None);
    assert_ne!(second["order_id"], first["order_id"]);
    assert_eq!(orders_placed_for(&env, second_customer).await, 1);

    // Expired keys are purged (the API does so every minute; here at once).
    keys_expired(&env).await;
    let purged = ApiConfig {
        api_idempotency_ttl_seconds: SHORT_TTL_SECONDS,
        ..TestEnv::api_config()
    }
    .idempotency(env.pool().clone())
    .purge_expired()
    .await
    .expect("purged");
    assert_eq!(purged, 1);
    assert_eq!(stored_keys(&env).await, 0);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_with_the_very_same_request_is_still_recognised_by_the_event_store() {
    let env = TestEnv::start("idem_expiry_same").await;
    let (api, server) = env
        .start_api_with(ApiConfig {
            api_idempotency_ttl_seconds: SHORT_TTL_SECONDS,
            ..TestEnv::api_config()
        })
        .await;
    let key = Uuid::new_v4().to_string();
    let customer = Uuid::new_v4();
    let (_, _, first) = answer(post_order(&api, &key, &order_request(customer)).await).await;
    let appended = events(&env).await;

    keys_expired(&env).await;

    // The table forgot the key, so the handler runs again; but the order id and the command id
    // derive from the caller, the key and the request, so the event store answers with the
    // first execution.
    let (status, replayed, second) =
        answer(post_order(&api, &key, &order_request(customer)).await).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(replayed, None, "not from the table");
    assert_eq!(second["order_id"], first["order_id"]);
    assert_eq!(events(&env).await, appended);

    server.stop().await.expect("API stops");
    env.stop().await;
}

/// The advisory lock the crash test holds to stop the API between its commit and its response.
const HOLD: i64 = 0x1de9_c4a5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_a_crash_between_commit_and_response_answers_the_same_order() {
    let env = TestEnv::start("idem_crash").await;
    // The API as a process, to be killed with SIGKILL where it stores the response: after the
    // command's transaction committed, before it answered. It gets there and stops because
    // the test holds an advisory lock that a trigger on storing a response waits for.
    let mut hold = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connects");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(HOLD)
        .execute(&mut hold)
        .await
        .expect("lock held");
    sqlx::query(&format!(
        "CREATE FUNCTION hold_the_response() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_advisory_xact_lock({HOLD}); RETURN NEW; END $$"
    ))
    .execute(env.pool())
    .await
    .expect("function");
    sqlx::query(
        "CREATE TRIGGER hold_the_response BEFORE UPDATE ON idempotency_keys FOR EACH ROW \
         WHEN (NEW.state = 'done') EXECUTE FUNCTION hold_the_response()",
    )
    .execute(env.pool())
    .await
    .expect("trigger");
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut process = KillOnDrop(env.spawn_process(
        "api",
        &[
            ("API_LISTEN", &listen.to_string()),
            ("AUTH_JWT_SECRET", TEST_JWT_SECRET),
            ("API_RATE_LIMIT_PER_SECOND", "0"),
        ],
    ));
    let doomed = format!("http://{listen}");
    eventually(
        Duration::from_secs(60),
        "the API process to listen",
        || async {
            let live = reqwest::get(format!("{doomed}/health/live")).await.ok()?;
            live.status().is_success().then_some(())
        },
    )
    .await;
    let key = Uuid::new_v4().to_string();
    let customer = Uuid::new_v4();
    let request = {
        let (doomed, key) = (doomed.clone(), key.clone());
        tokio::spawn(async move {
            backbone_tests::client()
                .post(format!("{doomed}/orders"))
                .header(KEY, key)
                .json(&order_request(customer))
                .send()
                .await
        })
    };
    // Committed: the order is in the store; the response is being stored, held by the lock.
    eventually(Duration::from_secs(60), "the order committed", || async {
        (orders_placed_for(&env, customer).await == 1).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "the API storing its response",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
            )
            .fetch_one(env.pool())
            .await
            .ok()?;
            (waiting == 1).then_some(())
        },
    )
    .await;
    process.0.kill().expect("SIGKILL");
    process.0.wait().expect("reaped");
    assert!(
        request.await.expect("request task").is_err(),
        "the caller got no response"
    );
    // PostgreSQL ends the dead process's session (as it does once it sees the socket closed),
    // and the test lets go of the lock and the trigger.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
    )
    .execute(env.pool())
    .await
    .expect("session ended");
    hold.close().await.expect("lock released");
    sqlx::query("DROP TRIGGER hold_the_response ON idempotency_keys")
        .execute(env.pool())
        .await
        .expect("trigger dropped");
    let (state,): (String,) = sqlx::query_as("SELECT state FROM idempotency_keys")
        .fetch_one(env.pool())
        .await
        .expect("the dead process's claim");
    assert_eq!(state, "in_flight", "the claim the dead process left");
    let appended = events(&env).await;
    let placed: String =
        sqlx::query_scalar("SELECT aggregate_id FROM events WHERE event_type = 'OrderPlaced'")
            .fetch_one(env.pool())
            .await
            .expect("the committed order");

    // The caller retries on another instance (a short request timeout: a duplicate waits at
    // most 80 % of it; a claim is stale after 2×). While the dead process's claim is fresh the
    // retry is told the request is still in progress (409, not kept); once stale it is taken
    // over and the event store answers with the first execution.
    let (api, server) = env
        .start_api_with(ApiConfig {
            api_request_timeout_ms: 2_000,
            ..TestEnv::api_config()
        })
        .await;
    let (status, replayed, second) = eventually(
        Duration::from_secs(60),
        "the stale claim taken over",
        || async {
            let (status, replayed, body) =
                answer(post_order(&api, &key, &order_request(customer)).await).await;
            if status == 409 {
                assert!(
                    body["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("still in progress")),
                    "{body}"
                );
                return None;
            }
            Some((status, replayed, body))
        },
    )
    .await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(replayed, None, "the stale claim was taken over");
    assert_eq!(second["order_id"], json!(placed), "the same order");
    assert_eq!(events(&env).await, appended, "nothing appended");
    assert_eq!(orders_placed_for(&env, customer).await, 1);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_key_is_refused_with_400() {
    let env = TestEnv::start("idem_malformed").await;
    let (api, server) = env.start_api().await;
    let customer = Uuid::new_v4();
    let client = backbone_tests::client();
    for key in [
        reqwest::header::HeaderValue::from_static(""),
        reqwest::header::HeaderValue::from_str(&"k".repeat(256)).expect("header"),
        reqwest::header::HeaderValue::from_bytes("caf\u{e9}".as_bytes()).expect("header"),
        reqwest::header::HeaderValue::from_static("tab\tinside"),
    ] {
        let response = client
            .post(format!("{api}/orders"))
            .header(KEY, key.clone())
            .json(&order_request(customer))
            .send()
            .await
            .expect("sent");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
        let (status, _, problem) = answer(response).await;
        assert_eq!(status, 400, "{key:?}: {problem}");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("1 to 255 printable ASCII")),
            "{problem}"
        );
    }
    assert_eq!(orders_placed_for(&env, customer).await, 0);

    // A key of 255 characters is fine; a GET ignores the header altogether.
    let (status, _, _) =
        answer(post_order(&api, &"k".repeat(255), &order_request(customer)).await).await;
    assert_eq!(status, 201);
    let response = client
        .get(format!("{api}/health/live"))
        .header(KEY, "")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_action_is_applied_once_and_a_conflict_is_not_stored() {
    let env = TestEnv::start("idem_action").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let order_id = place_request(&client, &api, &order_request(Uuid::new_v4())).await;
    let act = |key: &'static str| {
        client
            .post(format!("{api}/orders/{order_id}/actions"))
            .header(KEY, key)
            .json(&json!({"action": "cancel", "by": "Customer", "reason": "changed my mind"}))
            .send()
    };

    let (status, replayed, cancelled) = answer(act("cancel-1").await.expect("sent")).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(replayed, None);
    assert_eq!(cancelled["events"], json!(["OrderCancelled"]));
    let appended = events(&env).await;

    let (status, replayed, again) = answer(act("cancel-1").await.expect("sent")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(again, cancelled);
    assert_eq!(events(&env).await, appended);

    // A new key acts: the order is already cancelled (409). A 409 depends on the moment, so
    // it is not stored: the retry acts again rather than being replayed.
    for _ in 0..2 {
        let (status, replayed, problem) = answer(act("cancel-2").await.expect("sent")).await;
        assert_eq!(status, 409, "{problem}");
        assert_eq!(replayed, None);
    }
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys ORDER BY key")
        .fetch_all(env.pool())
        .await
        .expect("keys");
    assert_eq!(keys, ["cancel-1"]);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_client_error_is_replayed() {
    let env = TestEnv::start("idem_final_4xx").await;
    let (api, server) = env.start_api().await;
    let mut invalid = order_request(Uuid::new_v4());
    invalid["items"][0]["item_id"] = json!("calzone");
    let key = Uuid::new_v4().to_string();

    let (status, replayed, problem) = answer(post_order(&api, &key, &invalid).await).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(replayed, None);
    let response = post_order(&api, &key, &invalid).await;
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let (status, replayed, again) = answer(response).await;
    assert_eq!(status, 422);
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(again, problem);
    assert_eq!(events(&env).await, 0);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_put_with_a_repeated_key_changes_the_catalogue_once() {
    let env = TestEnv::start("idem_admin").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let put = |key: &'static str, percent: u32| {
        client
            .put(format!("{api}/admin/promotions/SPRING5"))
            .header(KEY, key)
            .json(&json!({"percent_off_bp": percent, "active": true}))
            .send()
    };
    let updated_at = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT updated_at FROM catalogue_entries WHERE kind = 'promotion' AND key = 'SPRING5'",
        )
        .fetch_one(env.pool())
        .await
        .expect("promotion stored")
    };

    let (status, replayed, _) = answer(put("spring-1", 500).await.expect("sent")).await;
    assert_eq!(status, 204);
    assert_eq!(replayed, None);
    let first = updated_at().await;

    let (status, replayed, body) = answer(put("spring-1", 500).await.expect("sent")).await;
    assert_eq!(status, 204);
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(body, Value::Null);
    assert_eq!(updated_at().await, first, "not written again");

    let (status, _, problem) = answer(put("spring-1", 700).await.expect("sent")).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(updated_at().await, first);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_callers_with_the_same_key_do_not_share_it() {
    let env = TestEnv::start("idem_scope").await;
    let (api, server) = env.start_api().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let place = |customer: Uuid| {
        backbone_tests::client_as(backbone_tests::Role::Customer, customer)
            .post(format!("{api}/orders"))
            .header(KEY, "shared-key")
            .json(&order_request(customer))
            .send()
    };
    let (status, replayed, first) = answer(place(alice).await.expect("sent")).await;
    assert_eq!((status, replayed), (201, None), "{first}");
    let (status, replayed, other) = answer(place(bob).await.expect("sent")).await;
    assert_eq!(
        (status, replayed),
        (201, None),
        "another caller's key: {other}"
    );
    assert_ne!(first["order_id"], other["order_id"]);
    let (_, replayed, again) = answer(place(alice).await.expect("sent")).await;
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(again, first);
    assert_eq!(orders_placed_for(&env, alice).await, 1);
    assert_eq!(orders_placed_for(&env, bob).await, 1);
    let scopes: Vec<String> =
        sqlx::query_scalar("SELECT scope FROM idempotency_keys ORDER BY scope")
            .fetch_all(env.pool())
            .await
            .expect("scopes");
    let mut expected = vec![format!("customer:{alice}"), format!("customer:{bob}")];
    expected.sort();
    assert_eq!(scopes, expected);

    server.stop().await.expect("API stops");
    env.stop().await;
}
