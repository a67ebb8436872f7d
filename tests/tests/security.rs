//! Who may do what, against the real API: the authorization matrix (every endpoint × every role
//! × own and someone else's resource), refused tokens, signed payment webhooks and the rate
//! limit.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{
    assigned_variant, client, client_as, eventually, order_request, place_request, post_webhook,
    token, Role, TestEnv,
};
use commands::{CommandBus, CommandContext};
use domain::delivery::{Delivery, DeliveryCommand, DeliveryServices, GeoPoint};
use domain::payment::{Payment, PaymentCommand, PaymentServices};
use domain::services::SystemClock;
use domain::{CourierId, Currency, CustomerId, Money, OrderId, RegionCode, StoreId};
use projections::{AdsProjection, TrackingProjection};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

/// The people and things of the matrix: one side owns the resources used as "own", the other
/// those used as "someone else's".
#[derive(Debug, Clone, Copy)]
struct Side {
    customer: Uuid,
    store: Uuid,
    courier: Uuid,
    order: Uuid,
}

async fn side(env: &TestEnv, api: &str, store: Uuid, catalogue: &Value) -> Side {
    // A customer the welcome offer takes (so an exposure is recorded rather than refused).
    let customer = std::iter::repeat_with(Uuid::new_v4)
        .find(|c| {
            assigned_variant(
                &catalogue["catalogue"]["experiments"],
                "welcome-offer",
                *c,
                "uk",
            )
            .is_some()
        })
        .expect("a member");
    let courier = Uuid::new_v4();
    let mut request = order_request(customer);
    request["store_id"] = json!(store);
    let order: Uuid = place_request(&client(), api, &request)
        .await
        .parse()
        .expect("an order id");
    // Its delivery, given to the side's courier (as the process manager and dispatch would).
    let deliveries: CommandBus<Delivery> = CommandBus::new(
        env.store.clone(),
        DeliveryServices::new(Arc::new(SystemClock)),
    );
    let context = CommandContext::new("test");
    for command in [
        DeliveryCommand::RequestDelivery {
            order_id: OrderId::from_uuid(order),
            store_id: StoreId::from_uuid(store),
            region: RegionCode::parse("uk").expect("region"),
            pickup: GeoPoint::new(51.52, -0.08).expect("pickup"),
            dropoff: GeoPoint::new(51.5, -0.1).expect("dropoff"),
            preparation_ready_at: chrono::Utc::now(),
            average_speed_kmh: 18,
        },
        DeliveryCommand::AssignCourier {
            courier_id: CourierId::from_uuid(courier),
        },
    ] {
        deliveries
            .execute(&order.to_string(), command, &context)
            .await
            .expect("delivery step");
    }
    Side {
        customer,
        store,
        courier,
        order,
    }
}

/// One row of the expected matrix: an endpoint and, per role (customer, store, courier, admin,
/// analyst, auditor), `A` allowed on anyone's, `O` only on its own, `-` never. Written from the
/// issue's rules, not from the policy table in the code. A refused cell answers 403; an allowed
/// one answers `answer`, what the endpoint does with that request in the matrix's state (the
/// order is placed, unpaid, its delivery has a courier; the customers hold no points).
struct Row {
    method: Method,
    /// With `{customer}`, `{order}` and `{store}` standing for the side's ids.
    path: &'static str,
    body: Option<fn(&Side, &Value) -> Value>,
    expected: &'static str,
    answer: u16,
}

const fn row(
    method: Method,
    path: &'static str,
    body: Option<fn(&Side, &Value) -> Value>,
    expected: &'static str,
    answer: u16,
) -> Row {
    Row {
        method,
        path,
        body,
        expected,
        answer,
    }
}

fn rows() -> Vec<Row> {
    use Method as M;
    vec![
        row(
            M::POST,
            "/orders",
            Some(|s, _| order_request(s.customer)),
            "O--A--",
            201,
        ),
        row(
            M::GET,
            "/orders?customer_id={customer}&store_id={store}",
            None,
            "OO-AAA",
            200,
        ),
        row(M::GET, "/orders/{order}/tracking", None, "OOOAAA", 200),
        row(
            M::GET,
            "/orders/{order}/tracking/stream",
            None,
            "OOOAAA",
            200,
        ),
        row(
            M::POST,
            "/orders/{order}/actions",
            Some(|_, _| json!({"action": "modify", "items": [{"item_id": "cola", "quantity": 2}]})),
            "O--A--",
            200,
        ),
        row(
            M::POST,
            "/orders/{order}/actions",
            Some(|_, _| json!({"action": "rate", "stars": 5})),
            "O--A--",
            409,
        ),
        row(
            M::POST,
            "/orders/{order}/actions",
            Some(|_, _| json!({"action": "accept", "estimated_preparation_minutes": 10})),
            "-O-A--",
            409,
        ),
        row(
            M::POST,
            "/orders/{order}/actions",
            Some(|_, _| json!({"action": "hand_to_courier"})),
            "--OA--",
            409,
        ),
        row(
            M::POST,
            "/orders/{order}/actions",
            Some(|_, _| json!({"action": "confirm_payment", "payment_reference": "p-1"})),
            "---A--",
            200,
        ),
        row(
            M::POST,
            "/deliveries/{order}/actions",
            Some(|_, _| {
                json!({"action": "update_location", "latitude": 51.51, "longitude": -0.09,
                       "device_time": chrono::Utc::now()})
            }),
            "--OA--",
            200,
        ),
        row(
            M::POST,
            "/deliveries/{order}/actions",
            Some(|_, _| json!({"action": "assign_courier", "courier_id": Uuid::new_v4()})),
            "---A--",
            200,
        ),
        row(
            M::POST,
            "/deliveries/{order}/actions",
            Some(|_, _| json!({"action": "rate_courier", "stars": 4})),
            "O--A--",
            409,
        ),
        row(
            M::POST,
            "/customers/{customer}/rewards/actions",
            Some(|_, _| {
                json!({"action": "donate", "charity": "food-bank-uk", "points": 10, "region": "uk",
                       "idempotency_key": Uuid::new_v4().to_string()})
            }),
            "O--A--",
            409,
        ),
        row(
            M::POST,
            "/customers/{customer}/rewards/actions",
            Some(|_, _| {
                json!({"action": "adjust", "points": 10, "reason": "goodwill",
                       "idempotency_key": Uuid::new_v4().to_string()})
            }),
            "---A--",
            200,
        ),
        row(
            M::POST,
            "/customers/{customer}/ads/exposures",
            Some(
                |_, _| json!({"experiment_id": "welcome-offer", "placement": "home", "region": "uk"}),
            ),
            "O--A--",
            200,
        ),
        row(
            M::GET,
            "/customers/{customer}/ads/profile",
            None,
            "O--AAA",
            200,
        ),
        row(
            M::GET,
            "/customers/{customer}/ads/promotion?region=uk",
            None,
            "O--AAA",
            200,
        ),
        row(
            M::GET,
            "/ads/experiments/welcome-offer/results",
            None,
            "---AAA",
            200,
        ),
        row(M::GET, "/catalogue", None, "AAAAAA", 200),
        row(M::GET, "/ratings/item", None, "AAAAAA", 200),
        row(M::GET, "/analytics/summary", None, "---AAA", 200),
        row(M::GET, "/analytics/cancellations", None, "---AAA", 200),
        row(M::GET, "/analytics/top-items", None, "---AAA", 200),
        row(M::GET, "/analytics/rewards", None, "---AAA", 200),
        row(
            M::GET,
            "/customers/{customer}/notifications",
            None,
            "O--A-A",
            200,
        ),
        row(
            M::GET,
            "/customers/{customer}/notifications/stream",
            None,
            "O--A-A",
            200,
        ),
        row(
            M::GET,
            "/admin/notifications/webhook-failures",
            None,
            "---AAA",
            200,
        ),
        row(M::GET, "/projections", None, "---AAA", 200),
        row(M::GET, "/projections/tracking", None, "---AAA", 200),
        row(
            M::GET,
            "/projections/tracking/dead-letters",
            None,
            "---AAA",
            200,
        ),
        row(
            M::POST,
            "/projections/tracking/dead-letters/redrive",
            None,
            "---A--",
            202,
        ),
        row(
            M::POST,
            "/projections/tracking/dead-letters/1/redrive",
            None,
            "---A--",
            404,
        ),
        row(M::GET, "/audit/order/{order}/events", None, "---A-A", 200),
        row(
            M::PUT,
            "/admin/regions/uk",
            Some(|_, c| entry(c, "regions", "uk")),
            "---A--",
            204,
        ),
        row(
            M::PUT,
            "/admin/menu/items/cola",
            Some(|_, c| entry(c, "items", "cola")),
            "---A--",
            204,
        ),
        row(
            M::PUT,
            "/admin/stores/{store}",
            Some(|s, c| entry(c, "stores", &s.store.to_string())),
            "---A--",
            204,
        ),
        row(
            M::PUT,
            "/admin/promotions/WELCOME10",
            Some(|_, c| entry(c, "promotions", "WELCOME10")),
            "---A--",
            204,
        ),
        row(
            M::PUT,
            "/admin/experiments/welcome-offer",
            Some(|_, c| entry(c, "experiments", "welcome-offer")),
            "---A--",
            204,
        ),
        row(M::GET, "/customers/{customer}/rewards", None, "O--A-A", 200),
        row(M::GET, "/admin/stuck-flows?status=all", None, "---A--", 200),
        // No stuck flow 1 (nor dead letter 1) exists: whoever may act is told so (404), the
        // others are refused before the lookup (403).
        row(M::POST, "/admin/stuck-flows/1/retry", None, "---A--", 404),
        row(
            M::POST,
            "/admin/stuck-flows/1/resolve",
            Some(|_, _| json!({"reason": "the store cannot deliver this far"})),
            "---A--",
            404,
        ),
        // Last: it erases the sides' customers.
        row(
            M::POST,
            "/admin/customers/{customer}/erasure",
            Some(|_, _| json!({"reason": "the customer asked"})),
            "---A--",
            200,
        ),
    ]
}

/// An entry of the catalogue as it is (putting it back changes nothing); for a store the
/// catalogue does not know, the settings of one it does.
fn entry(catalogue: &Value, kind: &str, key: &str) -> Value {
    let found = &catalogue["catalogue"][kind][key];
    if found.is_null() {
        catalogue["catalogue"][kind]
            .as_object()
            .and_then(|m| m.values().next().cloned())
            .unwrap_or_else(|| panic!("the catalogue has {kind}"))
    } else {
        found.clone()
    }
}

fn fill(path: &str, side: &Side) -> String {
    path.replace("{customer}", &side.customer.to_string())
        .replace("{order}", &side.order.to_string())
        .replace("{store}", &side.store.to_string())
}

fn subject(role: Role, side: &Side) -> Uuid {
    match role {
        Role::Customer => side.customer,
        Role::Store => side.store,
        Role::Courier => side.courier,
        Role::Admin | Role::Analyst | Role::Auditor => Uuid::from_u128(0x5eed),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_allows_exactly_the_roles_and_owners_the_policy_names() {
    let env = TestEnv::start("authz").await;
    let (api, server) = env.start_api().await;
    let relay = env.start_relay().await;
    let tracking = env.start_projector(Arc::new(TrackingProjection)).await;
    let ads = env.start_projector(Arc::new(AdsProjection)).await;
    let catalogue: Value = client()
        .get(format!("{api}/catalogue"))
        .send()
        .await
        .expect("catalogue")
        .json()
        .await
        .expect("json");
    // Two stores of the catalogue (both in `uk`, the region of the order request).
    let stores: Vec<Uuid> = catalogue["catalogue"]["stores"]
        .as_object()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.parse::<Uuid>().ok())
                .take(2)
                .collect()
        })
        .unwrap_or_default();
    let [store, other_store] = stores[..] else {
        panic!("two stores in the catalogue: {catalogue}");
    };
    let mine = side(&env, &api, store, &catalogue).await;
    let theirs = side(&env, &api, other_store, &catalogue).await;
    // The orders are tracked and their customers profiled before anyone reads them.
    for side in [&mine, &theirs] {
        eventually(
            Duration::from_secs(60),
            "the orders in the read models",
            || async {
                let tracked = client()
                    .get(format!("{api}/orders/{}/tracking", side.order))
                    .send()
                    .await
                    .ok()?
                    .status();
                let profiled = client()
                    .get(format!("{api}/customers/{}/ads/profile", side.customer))
                    .send()
                    .await
                    .ok()?
                    .status();
                (tracked == 200 && profiled == 200).then_some(())
            },
        )
        .await;
    }
    let matrix = rows();

    // Every documented operation is in the matrix (health and webhooks are tested apart).
    let openapi: Value = client()
        .get(format!("{api}/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let template = |path: &str| {
        let mut out = String::new();
        let mut in_brace = false;
        for c in path.split('?').next().unwrap_or_default().chars() {
            match c {
                '{' => in_brace = true,
                '}' => {
                    in_brace = false;
                    out.push('*');
                }
                _ if !in_brace => out.push(c),
                _ => {}
            }
        }
        out
    };
    let covered: BTreeSet<(String, String)> = matrix
        .iter()
        .map(|r| (r.method.as_str().to_lowercase(), template(r.path)))
        .collect();
    let mut missing = Vec::new();
    for (path, item) in openapi["paths"].as_object().expect("paths") {
        // Public like health: the metrics and the document itself.
        if path.starts_with("/health/")
            || path.starts_with("/payments/")
            || path == "/metrics"
            || path == "/openapi.json"
        {
            continue;
        }
        for method in item.as_object().expect("operations").keys() {
            // Concrete values in the matrix stand for any value of a parameter.
            let wanted = template(path);
            let found = covered.iter().any(|(m, p)| {
                m == method
                    && p.len() <= wanted.len() + 64
                    && wanted.split('/').count() == p.split('/').count()
                    && wanted
                        .split('/')
                        .zip(p.split('/'))
                        .all(|(w, c)| w == c || w == "*")
            });
            if !found {
                missing.push(format!("{method} {path}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in the matrix: {missing:?}");

    let mut wrong = Vec::new();
    let mut checked = 0;
    for row in &matrix {
        for (column, role) in Role::ALL.into_iter().enumerate() {
            let rule = row.expected.as_bytes()[column];
            for (owned, side) in [(true, &mine), (false, &theirs)] {
                let allowed = rule == b'A' || (rule == b'O' && owned);
                let caller = client_as(role, subject(role, &mine));
                let mut request =
                    caller.request(row.method.clone(), format!("{api}{}", fill(row.path, side)));
                if let Some(body) = row.body {
                    request = request.json(&body(side, &catalogue));
                }
                let response = request.send().await.expect("sent");
                let status = response.status().as_u16();
                let wanted = if allowed { row.answer } else { 403 };
                let ok = status == wanted;
                checked += 1;
                if !ok {
                    // Bounded: an event stream answered by mistake never ends.
                    let body = tokio::time::timeout(Duration::from_secs(2), response.text())
                        .await
                        .map_or_else(|_| "(a stream)".to_owned(), Result::unwrap_or_default);
                    wrong.push(format!(
                        "{} {} as {role} ({}): {status}, not {wanted}: {}",
                        row.method,
                        row.path,
                        if owned { "own" } else { "other's" },
                        body.chars().take(160).collect::<String>()
                    ));
                }
            }
        }
    }
    // Every cell, each role on its own and on someone else's resource (the README's count).
    assert_eq!(checked, matrix.len() * Role::ALL.len() * 2);
    assert_eq!(checked, 516, "{checked} requests");
    assert!(
        wrong.is_empty(),
        "{} unexpected answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    server.stop().await.expect("api stops");
    tracking.stop().await.expect("projector stops");
    ads.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

fn jwt_part(value: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_expired_malformed_wrongly_signed_and_unsigned_tokens_are_refused_with_401() {
    let env = TestEnv::start("tokens").await;
    let (api, server) = env.start_api().await;
    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64| {
        json!({"sub": Uuid::new_v4(), "role": "admin", "exp": exp, "iat": now,
               "iss": "order-backbone", "aud": "order-backbone-api"})
    };
    let sign = |secret: &str, claims: &Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("signed")
    };
    let unsigned = format!(
        "{}.{}.",
        jwt_part(&json!({"alg": "none", "typ": "JWT"})),
        jwt_part(&claims(now + 600))
    );
    let mut other_issuer = claims(now + 600);
    other_issuer["iss"] = json!("someone-else");
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "expired an hour ago",
            Some(sign(backbone_tests::TEST_JWT_SECRET, &claims(now - 3600))),
        ),
        ("malformed", Some("not-a-jwt".to_owned())),
        (
            "signed with another key",
            Some(sign(
                "another-secret-that-is-long-enough!!",
                &claims(now + 600),
            )),
        ),
        ("alg none", Some(unsigned)),
        (
            "another issuer",
            Some(sign(backbone_tests::TEST_JWT_SECRET, &other_issuer)),
        ),
        ("not a bearer token", Some(String::new())),
    ];
    for (case, token) in cases {
        let mut request = reqwest::Client::new().get(format!("{api}/orders"));
        if let Some(token) = token {
            request = if token.is_empty() {
                request.header("authorization", "Basic YWxpY2U6c2VjcmV0")
            } else {
                request.bearer_auth(token)
            };
        }
        let response = request.send().await.expect("sent");
        assert_eq!(response.status().as_u16(), 401, "{case}");
        assert!(
            response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("Bearer")),
            "{case}"
        );
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{case}"
        );
        let problem: Value = response.json().await.expect("problem");
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{case}"
        );
    }
    // A valid token within the clock skew is taken; health needs none.
    let fresh = token(Role::Analyst, Uuid::new_v4());
    let response = reqwest::Client::new()
        .get(format!("{api}/analytics/summary"))
        .bearer_auth(fresh)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200);
    let health = reqwest::Client::new()
        .get(format!("{api}/health/live"))
        .send()
        .await
        .expect("sent");
    assert_eq!(health.status().as_u16(), 200);

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_need_a_fresh_valid_signature_and_a_repeat_acts_once() {
    let env = TestEnv::start("webhooks").await;
    let (api, server) = env.start_api().await;
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
    let webhook = json!({"order_id": order, "provider_event_id": "evt-1", "kind": "Authorized"});
    let bytes = serde_json::to_vec(&webhook).expect("json");
    let now = chrono::Utc::now().timestamp();
    let url = format!("{api}/payments/{order}/webhooks");
    let send = |signature: Option<String>, body: Vec<u8>| {
        let mut request = reqwest::Client::new()
            .post(url.clone())
            .header("content-type", "application/json")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("Backbone-Signature", signature);
        }
        request.send()
    };
    let sign = projections::notifier::signature;
    let secret = backbone_tests::TEST_WEBHOOK_SECRET;
    let mut tampered = bytes.clone();
    tampered.extend_from_slice(b" ");
    for (case, signature, body) in [
        ("unsigned", None, bytes.clone()),
        (
            "signed with another secret",
            Some(sign("not-the-secret", now, &bytes)),
            bytes.clone(),
        ),
        (
            "signed an hour ago",
            Some(sign(secret, now - 3600, &bytes)),
            bytes.clone(),
        ),
        (
            "body changed after signing",
            Some(sign(secret, now, &bytes)),
            tampered,
        ),
        ("malformed header", Some("v1=zz".to_owned()), bytes.clone()),
    ] {
        let response = send(signature, body).await.expect("sent");
        assert_eq!(response.status().as_u16(), 401, "{case}");
    }
    let recorded = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE aggregate_type = 'payment' AND aggregate_id = $1 \
             AND event_type = 'ProviderWebhookRecorded'",
        )
        .bind(order.to_string())
        .fetch_one(env.pool())
        .await
        .expect("count")
    };
    assert_eq!(recorded().await, 0, "refused webhooks record nothing");
    for attempt in 0..3 {
        let response = post_webhook(&api, &order.to_string(), &webhook).await;
        assert_eq!(response.status().as_u16(), 200, "attempt {attempt}");
    }
    assert_eq!(recorded().await, 1, "a repeated webhook acts once");

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_with_retry_after_while_others_go_on() {
    let env = TestEnv::start("ratelimit").await;
    let (api, server) = env
        .start_api_with(api::ApiConfig {
            api_rate_limit_per_second: 1,
            api_rate_limit_burst: 5,
            ..TestEnv::api_config()
        })
        .await;
    let busy = client_as(Role::Analyst, Uuid::new_v4());
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let response = busy
            .get(format!("{api}/catalogue"))
            .send()
            .await
            .expect("sent");
        if response.status().as_u16() == 429 {
            retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            assert_eq!(
                response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                Some("application/problem+json")
            );
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(&statuses[..5], &[200; 5], "{statuses:?}");
    assert!(statuses[5..].contains(&429), "{statuses:?}");
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    // Another client has its own budget; health is never limited.
    let other = client_as(Role::Analyst, Uuid::new_v4());
    let response = other
        .get(format!("{api}/catalogue"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200);
    for _ in 0..10 {
        let health = busy
            .get(format!("{api}/health/live"))
            .send()
            .await
            .expect("sent");
        assert_eq!(health.status().as_u16(), 200);
    }

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_role_is_told_403_before_its_request_is_read_and_claims_no_idempotency_key() {
    let env = TestEnv::start("gate").await;
    let (api, server) = env.start_api().await;
    let auditor = client_as(Role::Auditor, Uuid::new_v4());
    let customer = client_as(Role::Customer, Uuid::new_v4());
    for (caller, method, path) in [
        (&auditor, Method::POST, "/orders".to_owned()),
        (&customer, Method::PUT, "/admin/regions/uk".to_owned()),
        (
            &customer,
            Method::GET,
            "/analytics/summary?group_by=nonsense".to_owned(),
        ),
        (
            &auditor,
            Method::POST,
            format!("/orders/{}/actions", Uuid::new_v4()),
        ),
    ] {
        let response = caller
            .request(method.clone(), format!("{api}{path}"))
            .header("content-type", "application/json")
            .header("Idempotency-Key", "gate-test")
            .body("{ this is not json")
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), 403, "{method} {path}");
        let problem: Value = response.json().await.expect("problem");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("may not")),
            "{problem}"
        );
    }
    let response = reqwest::Client::new()
        .post(format!("{api}/orders"))
        .header("content-type", "application/json")
        .body("{ this is not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 401);
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(env.pool())
        .await
        .expect("count");
    assert_eq!(keys, 0, "refused requests claim no key");

    server.stop().await.expect("api stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_time_limit_is_answered_408_with_a_problem() {
    let env = TestEnv::start("timeout").await;
    let (api, server) = env
        .start_api_with(api::ApiConfig {
            api_request_timeout_ms: 300,
            ..TestEnv::api_config()
        })
        .await;
    // A read-your-writes wait for a committed position no projector will reach (none runs)
    // outlasts the limit.
    let order_id = backbone_tests::place_order(&env.orders()).await;
    let response = client()
        .get(format!(
            "{api}/orders/{order_id}/tracking?position=order:{order_id}:1"
        ))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 408);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let problem: Value = response.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("300 ms")),
        "{problem}"
    );

    server.stop().await.expect("api stops");
    env.stop().await;
}
