//! What a hostile client found (issue 16), each attack reproduced against the real API and shown
//! refused: the client choosing the price list, webhook signatures replayed on other orders, NUL
//! characters in free text, slow and idle connections, expensive open readiness checks, and the
//! smaller abuses (unauthenticated webhook keys, unthrottled bad tokens, read-your-writes waits,
//! SSE streams, promotion limits, token lifetimes, huge headers).

use std::sync::Arc;

use backbone_tests::{client, order_request, store_in, TestEnv, TEST_WEBHOOK_SECRET};
use commands::{CommandBus, CommandContext};
use domain::payment::{Payment, PaymentCommand, PaymentServices};
use domain::services::SystemClock;
use domain::{Currency, CustomerId, Money, OrderId};
use serde_json::{json, Value};
use uuid::Uuid;

/// An order whose payment the provider authorized (as the process manager would have it).
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
                provider_reference: format!("ref-{order}"),
            },
            &CommandContext::new("test"),
        )
        .await
        .expect("authorized");
    order
}

/// How many provider webhooks the payment of `order` recorded.
async fn webhooks_recorded(env: &TestEnv, order: OrderId) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'payment' AND aggregate_id = $1 \
         AND event_type = 'ProviderWebhookRecorded'",
    )
    .bind(order.to_string())
    .fetch_one(env.pool())
    .await
    .expect("count")
}

/// Posts `body` to `/payments/{order}/webhooks` with `signature` and `Idempotency-Key: key`.
async fn post_signed(
    api: &str,
    order: OrderId,
    body: &[u8],
    signature: Option<String>,
    key: Option<&str>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{api}/payments/{order}/webhooks"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header(projections::notifier::SIGNATURE_HEADER, signature);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.expect("webhook sent")
}

fn sign_now(body: &[u8]) -> String {
    projections::notifier::signature(TEST_WEBHOOK_SECRET, chrono::Utc::now().timestamp(), body)
}

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
    assert!(body["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("BERLIN5"));

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
    for (home, region, currency) in [
        ("uk", None, "GBP"),
        ("de-berlin", Some("de-berlin"), "EUR"),
        ("us-nyc", None, "USD"),
    ] {
        let mut request = order_request(Uuid::new_v4());
        request["store_id"] = json!(store_in(home));
        request["delivery_address"] = backbone_tests::address_in(home);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_signed_for_one_order_is_refused_on_another_and_records_nothing() {
    let env = TestEnv::start("webhook_bound").await;
    let (api, server) = env.start_api().await;
    let (signed_for, target) = (
        authorized_payment(&env).await,
        authorized_payment(&env).await,
    );
    let void = serde_json::to_vec(
        &json!({"order_id": signed_for, "provider_event_id": "evt-void", "kind": "Voided"}),
    )
    .expect("json");
    let signature = sign_now(&void);

    // The captured (body, signature) replayed on another order's path.
    let (status, body) =
        problem(post_signed(&api, target, &void, Some(signature.clone()), None).await).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("order"),
        "{body}"
    );
    // A signed body that names no order is not accepted either.
    let unbound =
        serde_json::to_vec(&json!({"provider_event_id": "evt-x", "kind": "Voided"})).expect("json");
    let (status, body) =
        problem(post_signed(&api, target, &unbound, Some(sign_now(&unbound)), None).await).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("order_id"),
        "{body}"
    );
    assert_eq!(
        webhooks_recorded(&env, target).await,
        0,
        "nothing recorded on the target"
    );

    // On its own order it acts.
    let response = post_signed(&api, signed_for, &void, Some(signature), None).await;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(webhooks_recorded(&env, signed_for).await, 1);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_webhook_stores_nothing_under_its_key_and_is_refused_before_its_size() {
    let env = TestEnv::start("webhook_key").await;
    let (api, server) = env.start_api().await;
    let order = authorized_payment(&env).await;
    let key = "provider-delivery-7";

    // An unsigned 70 KB POST with the provider's key: 401 (not 413), nothing stored.
    let big = vec![b' '; 70 * 1024];
    let (status, body) = problem(post_signed(&api, order, &big, None, Some(key)).await).await;
    assert_eq!(status, 401, "{body}");
    // Badly signed, with the key: the same.
    let webhook = serde_json::to_vec(
        &json!({"order_id": order, "provider_event_id": "evt-1", "kind": "Authorized"}),
    )
    .expect("json");
    let forged =
        projections::notifier::signature("guess", chrono::Utc::now().timestamp(), &webhook);
    let (status, _) =
        problem(post_signed(&api, order, &webhook, Some(forged), Some(key)).await).await;
    assert_eq!(status, 401);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(env.pool())
        .await
        .expect("count");
    assert_eq!(
        stored, 0,
        "a request that failed to authenticate stores nothing"
    );

    // The genuine webhook with the same key acts, and its repeat is replayed.
    for attempt in 0..2 {
        let response =
            post_signed(&api, order, &webhook, Some(sign_now(&webhook)), Some(key)).await;
        assert_eq!(response.status().as_u16(), 200, "attempt {attempt}");
    }
    assert_eq!(webhooks_recorded(&env, order).await, 1);
    // A signed body over the size limit still gets its 413.
    let mut oversized = webhook.clone();
    oversized.extend(std::iter::repeat_n(b' ', 70 * 1024));
    let (status, _) =
        problem(post_signed(&api, order, &oversized, Some(sign_now(&oversized)), None).await).await;
    assert_eq!(status, 413);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_in_any_free_text_field_is_a_422_naming_the_field() {
    let env = TestEnv::start("nul").await;
    let (api, server) = env.start_api().await;
    let client = client();
    let customer = Uuid::new_v4();
    let order = backbone_tests::place_request(&client, &api, &order_request(customer)).await;
    let paid = authorized_payment(&env).await;
    let nul = "late\u{0}";
    let cases: Vec<(&str, String, Value)> = vec![
        (
            "reason",
            format!("/orders/{order}/actions"),
            json!({"action": "cancel", "by": "Customer", "reason": nul}),
        ),
        (
            "reason",
            format!("/customers/{customer}/rewards/actions"),
            json!({"action": "adjust", "points": 10, "reason": nul, "idempotency_key": "k"}),
        ),
        (
            "reason",
            format!("/admin/customers/{customer}/erasure"),
            json!({"reason": nul}),
        ),
        ("delivery_address.line1", "/orders".to_owned(), {
            let mut request = order_request(customer);
            request["delivery_address"]["line1"] = json!(nul);
            request
        }),
        ("items[0].options[0]", "/orders".to_owned(), {
            let mut request = order_request(customer);
            request["items"][0]["options"] = json!([nul]);
            request
        }),
    ];
    for (field, path, body) in cases {
        let (status, problem_body) = problem(
            client
                .post(format!("{api}{path}"))
                .json(&body)
                .send()
                .await
                .expect("sent"),
        )
        .await;
        assert_eq!(status, 422, "{path}: {problem_body}");
        let detail = problem_body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(&format!("`{field}`")), "{path}: {detail}");
    }
    // The signed webhook's detail: 422 as well (after its signature was checked).
    let webhook = serde_json::to_vec(&json!({
        "order_id": paid, "provider_event_id": "evt-nul", "kind": "Failed", "detail": nul
    }))
    .expect("json");
    let (status, body) =
        problem(post_signed(&api, paid, &webhook, Some(sign_now(&webhook)), None).await).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("`detail`"));
    // In a path or a query parameter: a 400, never a 500.
    for path in ["/ratings/st%00re", "/orders?customer_id=a%00b"] {
        let (status, body) = problem(
            client
                .get(format!("{api}{path}"))
                .send()
                .await
                .expect("sent"),
        )
        .await;
        assert!(
            status == 400 || status == 422 || status == 404,
            "{path}: {status} {body}"
        );
    }
    let cancelled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type IN ('OrderCancelled', 'PointsAdjusted')",
    )
    .fetch_one(env.pool())
    .await
    .expect("count");
    assert_eq!(cancelled, 0);

    server.stop().await.expect("API stops");
    env.stop().await;
}

/// Reads from `stream` until the server closes it (EOF or reset) or `within` passes; returns
/// what arrived and whether it was closed.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (received, false),
            Ok(Ok(0) | Err(_)) => return (received, true),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_connections_are_closed_and_their_number_is_capped() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let env = TestEnv::start("slow").await;
    let (api, server) = env
        .start_api_with(api::ApiConfig {
            api_header_read_timeout_ms: 700,
            api_max_connections: 3,
            ..TestEnv::api_config()
        })
        .await;
    let address = api.trim_start_matches("http://").to_owned();

    // A connection that sends nothing is closed after the header-read timeout.
    let started = Instant::now();
    let mut silent = TcpStream::connect(&address).await.expect("connects");
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(closed, "a silent connection stays open");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Headers trickled a byte at a time (each byte well within any idle timeout) are cut off
    // once the whole head takes longer than the header-read timeout.
    let started = Instant::now();
    let mut slow = TcpStream::connect(&address).await.expect("connects");
    let head = b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut_off = false;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (answer, closed) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(cut_off || closed, "a trickled head is served");
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );

    // The cap: three idle connections hold every slot; a fourth client waits until one closes.
    let held: Vec<TcpStream> =
        futures::future::join_all((0..3).map(|_| TcpStream::connect(address.clone())))
            .await
            .into_iter()
            .map(|s| s.expect("connects"))
            .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    assert!(
        quick
            .get(format!("{api}/health/live"))
            .send()
            .await
            .is_err(),
        "a fourth connection was served while three were open"
    );
    drop(held);
    // Once the slots free up (or the held ones time out), clients are served again.
    let served = backbone_tests::eventually(Duration::from_secs(10), "a free slot", || async {
        reqwest::get(format!("{api}/health/live"))
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    assert_eq!(served.status().as_u16(), 200);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_larger_than_allowed_gets_431_as_a_problem_document() {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::start("big_header").await;
    let (api, server) = env.start_api().await;
    let address = api.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connects");
    let (mut reader, mut writer) = stream.split();
    let mut request = b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    request.extend_from_slice(b"\r\n\r\n");
    let write = async {
        let _ = writer.write_all(&request).await;
    };
    let read = async {
        use tokio::io::AsyncReadExt;
        let mut received = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            reader.read_to_end(&mut received),
        )
        .await;
        received
    };
    let ((), received) = tokio::join!(write, read);
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let problem: Value = serde_json::from_str(body).expect("a problem document");
    assert_eq!(problem["status"], 431);
    assert!(problem["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("headers"));
    // The server goes on serving.
    let live = reqwest::get(format!("{api}/health/live"))
        .await
        .expect("live");
    assert_eq!(live.status().as_u16(), 200);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_served_from_memory_and_only_operators_see_why_it_fails() {
    use std::net::SocketAddr;
    let env = TestEnv::start("ready").await;
    // A registry that does not answer: the API is not ready.
    let server = api::ApiServer::build(
        api::ApiConfig {
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_readiness_interval_ms: 60_000,
            auth: backbone_tests::auth_config(),
            ..TestEnv::api_config()
        },
        commands::EventStoreConfig {
            database_url: env.database_url.clone(),
            database_max_connections: 4,
        },
        env.kafka.clone(),
        streams::RegistryConfig::local("http://127.0.0.1:9"),
    )
    .await
    .expect("API starts");
    let api = format!("http://{}", server.local_addr().expect("bound"));
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        server.run_until_stopped(async move { stop.cancelled().await })
    });
    let anonymous = reqwest::Client::new();
    let first: Value = backbone_tests::eventually(
        std::time::Duration::from_secs(20),
        "the first readiness check",
        || async {
            let body: Value =
                backbone_tests::json_of(&anonymous, format!("{api}/health/ready")).await?;
            body.get("checked_at").is_some().then_some(body)
        },
    )
    .await;
    assert_eq!(first["ready"], false, "{first}");
    assert_eq!(
        first.as_object().map(|o| o.len()),
        Some(2),
        "anonymous callers see `ready` and `checked_at` only: {first}"
    );

    // 200 concurrent anonymous calls: all answered from the one stored check.
    let calls = futures::future::join_all((0..200).map(|_| {
        let anonymous = anonymous.clone();
        let api = api.clone();
        async move {
            let response = anonymous
                .get(format!("{api}/health/ready"))
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status().as_u16(), 503);
            response.json::<Value>().await.expect("json")
        }
    }))
    .await;
    assert!(calls
        .iter()
        .all(|body| body["checked_at"] == first["checked_at"]));

    // An operator sees which dependency failed and why; a customer does not.
    let detailed: Value = client()
        .get(format!("{api}/health/ready"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(detailed["registry"]["ok"], false, "{detailed}");
    assert!(detailed["registry"]["error"].is_string(), "{detailed}");
    assert_eq!(detailed["database"]["ok"], true, "{detailed}");
    let customer: Value = backbone_tests::client_as(backbone_tests::Role::Customer, Uuid::new_v4())
        .get(format!("{api}/health/ready"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert!(customer.get("registry").is_none(), "{customer}");

    stop.cancel();
    running.await.expect("task").expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_rate_limited_aud_arrays_accepted_and_long_lived_tokens_refused() {
    use api::auth::Claims;
    let env = TestEnv::start("tokens").await;
    let (api, server) = env
        .start_api_with(api::ApiConfig {
            api_rate_limit_per_second: 1,
            api_rate_limit_burst: 5,
            ..TestEnv::api_config()
        })
        .await;
    // Guessing tokens: after the burst, 429 instead of 401.
    let guesser = reqwest::Client::new();
    let mut statuses = Vec::new();
    for n in 0..12 {
        let response = guesser
            .get(format!("{api}/catalogue"))
            .bearer_auth(format!("guess-{n}"))
            .send()
            .await
            .expect("sent");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses[0], 401, "{statuses:?}");
    assert!(
        statuses.contains(&429),
        "bad tokens are never limited: {statuses:?}"
    );
    server.stop().await.expect("API stops");

    let (api, server) = env.start_api().await;
    let config = backbone_tests::auth_config();
    let get_with = |claims: Value| {
        let api = api.clone();
        let config = config.clone();
        async move {
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(
                    config
                        .auth_jwt_secret
                        .as_ref()
                        .expect("secret")
                        .expose()
                        .as_bytes(),
                ),
            )
            .expect("token");
            problem(
                reqwest::Client::new()
                    .get(format!("{api}/catalogue"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("sent"),
            )
            .await
        }
    };
    let now = chrono::Utc::now().timestamp();
    let base = serde_json::to_value(Claims::new(
        &config,
        backbone_tests::Role::Admin,
        Uuid::new_v4(),
        600,
    ))
    .expect("claims");
    // `aud` as an array naming this API (RFC 7519): accepted; an array without it: refused.
    let mut listed = base.clone();
    listed["aud"] = json!(["another-api", config.auth_jwt_audience]);
    assert_eq!(get_with(listed).await.0, 200);
    let mut elsewhere = base.clone();
    elsewhere["aud"] = json!(["another-api"]);
    assert_eq!(get_with(elsewhere).await.0, 401);
    // `exp` far in the future: refused, saying why.
    let mut forever = base.clone();
    forever["exp"] = json!(1_i64 << 62);
    let (status, body) = get_with(forever).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("longer"),
        "{body}"
    );
    let mut two_days = base;
    two_days["exp"] = json!(now + 2 * 86_400);
    assert_eq!(get_with(two_days).await.0, 401);

    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_may_hold_only_a_few_event_streams_open() {
    let env = TestEnv::start("streams").await;
    let (api, server) = env
        .start_api_with(api::ApiConfig {
            api_max_streams_per_client: 2,
            ..TestEnv::api_config()
        })
        .await;
    let customer = Uuid::new_v4();
    let client = backbone_tests::client_as(backbone_tests::Role::Customer, customer);
    let open = || {
        client
            .get(format!("{api}/customers/{customer}/notifications/stream"))
            .send()
    };
    let first = open().await.expect("sent");
    let second = open().await.expect("sent");
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let (status, body) = problem(open().await.expect("sent")).await;
    assert_eq!(status, 429, "{body}");
    // Another client is not affected; a closed stream frees its slot.
    let other = Uuid::new_v4();
    let response = backbone_tests::client_as(backbone_tests::Role::Customer, other)
        .get(format!("{api}/customers/{other}/notifications/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200);
    drop(first);
    let again = backbone_tests::eventually(
        std::time::Duration::from_secs(10),
        "a freed stream slot",
        || async { open().await.ok().filter(|r| r.status().as_u16() == 200) },
    )
    .await;
    assert_eq!(again.status().as_u16(), 200);

    drop((second, again, response));
    server.stop().await.expect("API stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_option_repeated_on_a_line_is_refused() {
    let env = TestEnv::start("options").await;
    let (api, server) = env.start_api().await;
    let mut request = order_request(Uuid::new_v4());
    request["items"] = json!([{"item_id": "margherita", "quantity": 1,
                               "options": vec!["large"; 10]}]);
    let (status, body) = problem(
        client()
            .post(format!("{api}/orders"))
            .json(&request)
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("`large`"),
        "{body}"
    );
    server.stop().await.expect("API stops");
    env.stop().await;
}
