//! The ads read model over the real pipeline: exposures recorded over HTTP (command side
//! assignment), orders placed over HTTP, relay, the ads projector and the API. The figures
//! asserted are computed by the test from what it did and from the catalogue's prices.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{act, assigned_variant, eventually, order_request, TestEnv};
use chrono::{DateTime, TimeZone, Utc};
use commands::{CommandBus, CommandContext};
use domain::ads::{AdAudience, AdsCommand, AdsServices, ExperimentId};
use domain::order::{Order, OrderCommand};
use domain::services::{Catalogue, FixedClock, OrderServices};
use domain::{CustomerId, OrderId, RegionCode};
use projections::AdsProjection;
use serde_json::{json, Value};
use uuid::Uuid;

const WELCOME: &str = "welcome-offer";
const BERLIN: &str = "berlin-discount";

async fn problem(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json", "status {status}");
    let body: Value = response.json().await.expect("a problem document");
    assert_eq!(body["status"], status);
    (status, body)
}

async fn expose(
    client: &reqwest::Client,
    api: &str,
    customer: Uuid,
    experiment: &str,
    region: &str,
) -> reqwest::Response {
    client
        .post(format!("{api}/customers/{customer}/ads/exposures"))
        .json(
            &json!({"experiment_id": experiment, "placement": "checkout-banner", "region": region}),
        )
        .send()
        .await
        .expect("exposure sent")
}

/// Places an order of `lines` (item, quantity) in `region` over HTTP; returns its id and
/// position token.
async fn place(
    client: &reqwest::Client,
    api: &str,
    customer: Uuid,
    region: &str,
    lines: &[(&str, u32)],
) -> (String, String) {
    let mut request = order_request(customer);
    request["region"] = json!(region);
    request["store_id"] = json!(backbone_tests::store_in(region));
    request["delivery_address"] = backbone_tests::address_in(region);
    request["items"] = json!(lines
        .iter()
        .map(|(item, quantity)| json!({"item_id": item, "quantity": quantity}))
        .collect::<Vec<_>>());
    let response = client
        .post(format!("{api}/orders"))
        .json(&request)
        .send()
        .await
        .expect("order sent");
    assert_eq!(response.status().as_u16(), 201);
    let placed: Value = response.json().await.expect("json");
    (
        placed["order_id"].as_str().expect("order id").to_owned(),
        placed["position"]["token"]
            .as_str()
            .expect("position token")
            .to_owned(),
    )
}

/// The total of an order as the catalogue prices it: subtotal, tax rounded half up, delivery
/// fee; and its currency.
fn priced(catalogue: &Value, region: &str, lines: &[(&str, u32)]) -> (i64, String) {
    let settings = &catalogue["regions"][region];
    let subtotal: i64 = lines
        .iter()
        .map(|(item, quantity)| {
            catalogue["items"][item]["prices"][region]
                .as_i64()
                .expect("a price")
                * i64::from(*quantity)
        })
        .sum();
    let tax = (subtotal * settings["tax_basis_points"].as_i64().expect("tax") + 5_000) / 10_000;
    let fee = settings["delivery_fee_minor"].as_i64().expect("fee");
    (
        subtotal + tax + fee,
        settings["currency"].as_str().expect("currency").to_owned(),
    )
}

/// Wilson score interval, written out here independently of the projection.
fn wilson(x: f64, n: f64) -> (f64, f64) {
    let z = 1.959_964;
    let p = x / n;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z / (1.0 + z * z / n) * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    (centre - half, centre + half)
}

fn uk() -> RegionCode {
    RegionCode::parse("uk").expect("uk")
}

/// What the test expects of one variant.
#[derive(Debug, Default)]
struct Expected {
    exposed: BTreeSet<Uuid>,
    exposures: i64,
    converted: BTreeSet<Uuid>,
    conversions: i64,
    revenue: BTreeMap<String, i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exposures_conversions_profiles_and_targeting_match_what_customers_did() {
    let env = TestEnv::start("ads").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(AdsProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let catalogue: Value = client
        .get(format!("{api}/catalogue"))
        .send()
        .await
        .expect("catalogue")
        .json::<Value>()
        .await
        .expect("json")["catalogue"]
        .clone();
    let config: Catalogue = serde_json::from_value(catalogue.clone()).expect("a catalogue");

    // Customers the assignment puts in the welcome offer (both variants), and some it leaves out.
    // Some outsiders fall in the Berlin experiment of the same layer.
    let experiments = &catalogue["experiments"];
    let berlin_member =
        |customer: Uuid| assigned_variant(experiments, BERLIN, customer, "de-berlin").is_some();
    let mut members: Vec<(Uuid, String)> = Vec::new();
    let mut outsiders: Vec<Uuid> = Vec::new();
    while members.len() < 16 || outsiders.len() < 4 || {
        let treated = members.iter().filter(|(_, v)| v == "welcome10").count();
        let in_berlin = outsiders.iter().filter(|c| berlin_member(**c)).count();
        treated < 3 || members.len() - treated < 3 || in_berlin < 2
    } {
        let customer = Uuid::new_v4();
        match assigned_variant(experiments, WELCOME, customer, "uk") {
            Some(variant) => members.push((customer, variant)),
            None => outsiders.push(customer),
        }
    }

    // Two members order before they are exposed: not a conversion.
    let early = [(members[0].0, 1u32), (members[1].0, 2u32)];
    for (customer, quantity) in early {
        place(&client, &api, customer, "uk", &[("margherita", quantity)]).await;
    }

    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    for (customer, variant) in &members {
        let response = expose(&client, &api, *customer, WELCOME, "uk").await;
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["variant"], json!(variant), "{customer}");
        let configured = config.experiments[WELCOME]
            .variants
            .iter()
            .find(|v| &v.name == variant)
            .expect("configured variant");
        assert_eq!(body["promotion_code"], json!(configured.promotion_code));
        assert_eq!(body["layer"], "checkout-banner");
        assert_eq!(body["exposures"], 1);
        let token = body["position"]["token"].as_str().expect("token");
        assert_eq!(token, format!("ads:{customer}:1"));
        let entry = expected.entry(variant.clone()).or_default();
        entry.exposed.insert(*customer);
        entry.exposures += 1;
    }
    for customer in &outsiders {
        let (status, body) = problem(expose(&client, &api, *customer, WELCOME, "uk").await).await;
        assert_eq!(status, 409);
        assert!(
            body["detail"]
                .as_str()
                .expect("detail")
                .contains("not in this experiment"),
            "{body}"
        );
    }

    // The same customer keeps their variant on every exposure.
    for (customer, variant) in &members[..4] {
        for round in 2..=3 {
            let body: Value = expose(&client, &api, *customer, WELCOME, "uk")
                .await
                .json()
                .await
                .expect("json");
            assert_eq!(body["variant"], json!(variant));
            assert_eq!(body["exposures"], round);
            expected.get_mut(variant).expect("variant").exposures += 1;
        }
    }

    // Every other member orders after the exposure (a quarter of them twice); one of those
    // orders is cancelled and does not count.
    let mut last_token = String::new();
    for (index, (customer, variant)) in members.iter().enumerate() {
        if index % 2 != 0 {
            continue;
        }
        let orders = if index % 4 == 0 { 2 } else { 1 };
        for n in 0..orders {
            let lines = [("margherita", 1 + (index as u32 + n) % 3), ("cola", 1)];
            let (order_id, token) = place(&client, &api, *customer, "uk", &lines).await;
            last_token = token;
            let entry = expected.get_mut(variant).expect("variant");
            if index == 2 {
                act(
                    &client,
                    &api,
                    &order_id,
                    json!({"action": "cancel", "by": "Customer", "reason": "changed my mind"}),
                )
                .await;
                continue;
            }
            let (total, currency) = priced(&catalogue, "uk", &lines);
            entry.converted.insert(*customer);
            entry.conversions += 1;
            *entry.revenue.entry(currency).or_default() += total;
        }
    }
    assert!(!last_token.is_empty());

    // Results per variant, once the view has everything.
    let want_exposures: i64 = expected.values().map(|e| e.exposures).sum();
    let want_conversions: i64 = expected.values().map(|e| e.conversions).sum();
    let results: Value = eventually(
        Duration::from_secs(60),
        "the experiment results",
        || async {
            let results: Value = backbone_tests::json_of(
                &client,
                format!("{api}/ads/experiments/{WELCOME}/results"),
            )
            .await?;
            let variants = results["variants"].as_array()?;
            let exposures: i64 = variants
                .iter()
                .filter_map(|v| v["exposures"].as_i64())
                .sum();
            let conversions: i64 = variants
                .iter()
                .filter_map(|v| v["conversions"].as_i64())
                .sum();
            (exposures == want_exposures && conversions == want_conversions).then_some(results)
        },
    )
    .await;
    assert_eq!(results["confidence"], 0.95);
    assert_eq!(results["attribution_window_hours"], 72);
    let variants = results["variants"].as_array().expect("variants");
    assert_eq!(variants.len(), 2, "{results}");
    for row in variants {
        let name = row["variant"].as_str().expect("variant");
        let want = &expected[name];
        let exposed = want.exposed.len() as f64;
        let converted = want.converted.len() as f64;
        assert_eq!(row["exposed_customers"], want.exposed.len(), "{name}");
        assert_eq!(row["exposures"], want.exposures, "{name}");
        assert_eq!(row["converted_customers"], want.converted.len(), "{name}");
        assert_eq!(row["conversions"], want.conversions, "{name}");
        let rate = row["conversion_rate"].as_f64().expect("rate");
        assert!((rate - converted / exposed).abs() < 1e-12, "{name}: {rate}");
        let (low, high) = (
            row["conversion_rate_interval"]["low"]
                .as_f64()
                .expect("low"),
            row["conversion_rate_interval"]["high"]
                .as_f64()
                .expect("high"),
        );
        let (want_low, want_high) = wilson(converted, exposed);
        assert!(low <= rate && rate <= high, "{name}: {low} {rate} {high}");
        assert!((low - want_low).abs() < 1e-6 && (high - want_high).abs() < 1e-6);
        let revenue: BTreeMap<String, i64> = row["revenue"]
            .as_array()
            .expect("revenue")
            .iter()
            .map(|m| {
                (
                    m["currency"].as_str().expect("currency").to_owned(),
                    m["minor"].as_i64().expect("minor"),
                )
            })
            .collect();
        assert_eq!(revenue, want.revenue, "{name}");
    }

    // The profile of a member who ordered before and after the exposure, read with the
    // position of their latest order; then a multi-region customer with a subscription.
    let (member, variant) = &members[0];
    let (_, token) = place(&client, &api, *member, "uk", &[("tiramisu", 1)]).await;
    let profile: Value = client
        .get(format!(
            "{api}/customers/{member}/ads/profile?position={token}"
        ))
        .send()
        .await
        .expect("profile")
        .json()
        .await
        .expect("json");
    // Orders of member 0: 1 margherita early, then (1, cola) and (2, cola), then a tiramisu.
    let member_orders: [&[(&str, u32)]; 4] = [
        &[("margherita", 1)],
        &[("margherita", 1), ("cola", 1)],
        &[("margherita", 2), ("cola", 1)],
        &[("tiramisu", 1)],
    ];
    let spent: i64 = member_orders
        .iter()
        .map(|lines| priced(&catalogue, "uk", lines).0)
        .sum();
    assert_eq!(profile["orders_count"], 4, "{profile}");
    assert_eq!(profile["region"], "uk");
    assert_eq!(profile["recency_segment"], "active");
    assert_eq!(profile["recency_days"], 0);
    assert_eq!(
        profile["total_spent"],
        json!([{"minor": spent, "currency": "GBP"}])
    );
    assert_eq!(
        profile["favourite_categories"],
        json!([
            {"category": "pizza", "units": 4},
            {"category": "drinks", "units": 2},
            {"category": "dessert", "units": 1}
        ])
    );
    assert_eq!(profile["experiments"][0]["experiment_id"], WELCOME);
    assert_eq!(profile["experiments"][0]["variant"], json!(variant));
    assert_eq!(profile["experiments"][0]["exposures"], 3);

    let traveller = outsiders[0];
    place(
        &client,
        &api,
        traveller,
        "uk",
        &[("margherita", 2), ("cola", 1)],
    )
    .await;
    place(&client, &api, traveller, "de-berlin", &[("tiramisu", 1)]).await;
    let subscribed: Value = client
        .post(format!("{api}/customers/{traveller}/rewards/actions"))
        .json(&json!({
            "action": "start_subscription", "tier": "Plus",
            "until": (Utc::now() + chrono::Duration::days(30)).to_rfc3339(),
            "idempotency_key": "sub-1"
        }))
        .send()
        .await
        .expect("subscribed")
        .json()
        .await
        .expect("json");
    let token = subscribed["position"]["token"].as_str().expect("token");
    let profile: Value = eventually(
        Duration::from_secs(30),
        "the traveller's profile",
        || async {
            let profile: Value = backbone_tests::json_of(
                &client,
                format!("{api}/customers/{traveller}/ads/profile?position={token}"),
            )
            .await?;
            (profile["orders_count"] == 2).then_some(profile)
        },
    )
    .await;
    let gbp = priced(&catalogue, "uk", &[("margherita", 2), ("cola", 1)]);
    let eur = priced(&catalogue, "de-berlin", &[("tiramisu", 1)]);
    assert_eq!(profile["region"], "de-berlin", "{profile}");
    assert_eq!(
        profile["total_spent"],
        json!([{"minor": eur.0, "currency": eur.1}, {"minor": gbp.0, "currency": gbp.1}])
    );
    assert_eq!(profile["subscription"]["status"], "active");
    assert_eq!(profile["subscription"]["tier"], "Plus");
    assert_eq!(profile["experiments"], json!([]));

    // Targeting: the assigned variant's promotion; nothing for the control group or outsiders.
    for (customer, variant) in &members {
        let decision: Value = client
            .get(format!(
                "{api}/customers/{customer}/ads/promotion?region=uk"
            ))
            .send()
            .await
            .expect("targeting")
            .json()
            .await
            .expect("json");
        let configured = config.experiments[WELCOME]
            .variants
            .iter()
            .find(|v| &v.name == variant)
            .expect("variant");
        assert_eq!(decision["source"], "experiment", "{decision}");
        assert_eq!(decision["variant"], json!(variant));
        assert_eq!(decision["promotion_code"], json!(configured.promotion_code));
    }
    let decision: Value = client
        .get(format!("{api}/customers/{}/ads/promotion", outsiders[1]))
        .send()
        .await
        .expect("targeting")
        .json()
        .await
        .expect("json");
    assert_eq!(decision["source"], "none");
    assert_eq!(decision["promotion_code"], Value::Null);

    // Layers: the two experiments of `checkout-banner` never share a customer.
    let mut in_berlin = BTreeSet::new();
    for customer in members.iter().map(|(c, _)| *c).chain(outsiders.clone()) {
        let response = expose(&client, &api, customer, BERLIN, "de-berlin").await;
        match response.status().as_u16() {
            200 => {
                in_berlin.insert(customer);
            }
            409 => {}
            other => panic!("unexpected {other}"),
        }
    }
    let in_welcome: BTreeSet<Uuid> = members.iter().map(|(c, _)| *c).collect();
    assert!(in_berlin.is_disjoint(&in_welcome));
    let predicted: BTreeSet<Uuid> = outsiders
        .iter()
        .copied()
        .filter(|c| berlin_member(*c))
        .collect();
    assert_eq!(in_berlin, predicted);
    // The Berlin experiment's audience is Berlin only.
    let customer = in_berlin.iter().next().expect("a Berlin member");
    let (status, body) = problem(expose(&client, &api, *customer, BERLIN, "uk").await).await;
    assert_eq!(status, 409);
    assert!(body["detail"]
        .as_str()
        .expect("detail")
        .contains("audience"));

    // Administrators cannot overbook a layer; after shrinking the welcome offer and widening
    // the Berlin one over its old buckets, exposed members keep their experiment and variant.
    let mut berlin = serde_json::to_value(&config.experiments[BERLIN]).expect("json");
    berlin["traffic_bp"] = json!(8_000);
    let (status, body) = problem(
        client
            .put(format!("{api}/admin/experiments/{BERLIN}"))
            .json(&berlin)
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(status, 422);
    assert!(body["detail"].as_str().expect("detail").contains("10000"));
    let mut welcome = serde_json::to_value(&config.experiments[WELCOME]).expect("json");
    welcome["traffic_bp"] = json!(2_000);
    for (id, experiment) in [(WELCOME, &welcome), (BERLIN, &berlin)] {
        let response = client
            .put(format!("{api}/admin/experiments/{id}"))
            .json(experiment)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), 204, "{id}");
    }
    for (customer, variant) in &members[..6] {
        let response = expose(&client, &api, *customer, BERLIN, "de-berlin").await;
        let (status, body) = problem(response).await;
        assert_eq!(status, 409, "{body}");
        let body: Value = expose(&client, &api, *customer, WELCOME, "uk")
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(
            body["variant"],
            json!(variant),
            "sticky after reconfiguration"
        );
    }

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 18, 0, 0)
        .single()
        .expect("valid instant")
}

/// Places an order for `customer` with the order clock at `at`; returns its id.
async fn order_at(
    env: &TestEnv,
    catalogue: &Catalogue,
    customer: Uuid,
    at: DateTime<Utc>,
) -> String {
    let bus: CommandBus<Order> = CommandBus::new(
        env.store.clone(),
        OrderServices::new(Arc::new(catalogue.clone()), Arc::new(FixedClock(at))),
    );
    let request: api::orders::PlaceOrderRequest =
        serde_json::from_value(order_request(customer)).expect("a valid request");
    let id = OrderId::new().to_string();
    bus.execute(
        &id,
        OrderCommand::try_from(request).expect("a valid command"),
        &CommandContext::new("test"),
    )
    .await
    .expect("placed");
    id
}

/// Records an exposure of `customer` to the welcome offer with the clock at `at`.
async fn exposure_at(env: &TestEnv, catalogue: &Catalogue, customer: Uuid, at: DateTime<Utc>) {
    let bus: CommandBus<AdAudience> = CommandBus::new(
        env.store.clone(),
        AdsServices::new(Arc::new(catalogue.clone()), Arc::new(FixedClock(at))),
    );
    bus.execute(
        &customer.to_string(),
        AdsCommand::RecordExposure {
            customer_id: CustomerId::from_uuid(customer),
            experiment_id: ExperimentId::parse(WELCOME).expect("id"),
            placement: "home".to_owned(),
            region: uk(),
        },
        &CommandContext::new("test"),
    )
    .await
    .expect("exposed");
}

async fn welcome_results(client: &reqwest::Client, api: &str) -> Value {
    client
        .get(format!("{api}/ads/experiments/{WELCOME}/results"))
        .send()
        .await
        .expect("results")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_orders_within_the_window_after_the_first_exposure_convert_whichever_topic_arrives_first(
) {
    let env = TestEnv::start("ads_window").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(AdsProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let catalogue = TestEnv::catalogue();
    let window = chrono::Duration::hours(i64::from(
        catalogue.experiments[WELCOME].attribution_window_hours,
    ));
    let experiments = serde_json::to_value(&catalogue.experiments).expect("json");
    let mut members = std::iter::repeat_with(Uuid::new_v4)
        .filter(|c| assigned_variant(&experiments, WELCOME, *c, "uk").is_some());
    let (orders_first, exposure_first) = (
        members.next().expect("a member"),
        members.next().expect("a member"),
    );
    let second = chrono::Duration::seconds(1);

    // Orders first: applied by the view before the exposure exists; attributed when it comes.
    let inside = order_at(&env, &catalogue, orders_first, t0() + window - second).await;
    order_at(&env, &catalogue, orders_first, t0() - second).await;
    order_at(&env, &catalogue, orders_first, t0() + window).await;
    eventually(
        Duration::from_secs(60),
        "three orders in the view",
        || async {
            let profile: Value = backbone_tests::json_of(
                &client,
                format!("{api}/customers/{orders_first}/ads/profile"),
            )
            .await?;
            (profile["orders_count"] == 3).then_some(())
        },
    )
    .await;
    exposure_at(&env, &catalogue, orders_first, t0()).await;

    // Exposure first, then orders: at the exposure, at the window's end, and one after a later
    // exposure (the window runs from the first exposure).
    exposure_at(&env, &catalogue, exposure_first, t0()).await;
    eventually(
        Duration::from_secs(60),
        "the exposure in the view",
        || async {
            let profile: Value = backbone_tests::json_of(
                &client,
                format!("{api}/customers/{exposure_first}/ads/profile"),
            )
            .await?;
            (profile["experiments"].as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    let at_exposure = order_at(&env, &catalogue, exposure_first, t0()).await;
    exposure_at(&env, &catalogue, exposure_first, t0() + window).await;
    order_at(&env, &catalogue, exposure_first, t0() + window + second).await;

    let results = eventually(
        Duration::from_secs(60),
        "both customers' figures",
        || async {
            let results = welcome_results(&client, &api).await;
            let variants = results["variants"].as_array()?;
            let exposures: i64 = variants
                .iter()
                .filter_map(|v| v["exposures"].as_i64())
                .sum();
            let customers: i64 = variants
                .iter()
                .filter_map(|v| v["converted_customers"].as_i64())
                .sum();
            (exposures == 3 && customers == 2).then_some(results)
        },
    )
    .await;
    let conversions: i64 = results["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .filter_map(|v| v["conversions"].as_i64())
        .sum();
    assert_eq!(conversions, 2, "{results}");
    let attributed: Vec<String> = sqlx::query_scalar(
        "SELECT order_id FROM ads.conversions WHERE experiment_id = $1 ORDER BY placed_at",
    )
    .bind(WELCOME)
    .fetch_all(env.pool())
    .await
    .expect("conversions");
    assert_eq!(attributed, vec![at_exposure, inside]);

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_ads_requests_are_answered_with_problem_documents() {
    let env = TestEnv::start("ads_errors").await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let customer = Uuid::new_v4();
    let post = |path: String, body: Value| {
        let request = client.post(format!("{api}{path}")).json(&body);
        async move { problem(request.send().await.expect("sent")).await }
    };
    let exposures = format!("/customers/{customer}/ads/exposures");
    let valid = json!({"experiment_id": WELCOME, "placement": "home", "region": "uk"});
    let cases = [
        (
            "/customers/not-a-uuid/ads/exposures".to_owned(),
            valid.clone(),
            400,
            "customer id",
        ),
        (
            exposures.clone(),
            json!({"experiment_id": "no-such", "placement": "home", "region": "uk"}),
            404,
            "does not exist",
        ),
        (
            exposures.clone(),
            json!({"experiment_id": WELCOME, "placement": "home page", "region": "uk"}),
            422,
            "placement",
        ),
        (
            exposures.clone(),
            json!({"experiment_id": WELCOME, "placement": "home", "region": "mars"}),
            422,
            "region",
        ),
        (
            exposures.clone(),
            json!({"experiment_id": "a:b", "placement": "home", "region": "uk"}),
            422,
            "experiment_id",
        ),
        (
            exposures.clone(),
            json!({"experiment_id": WELCOME, "placement": "home", "region": "uk", "extra": 1}),
            422,
            "extra",
        ),
    ];
    for (path, body, status, mentions) in cases {
        let (got, problem) = post(path.clone(), body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {problem}");
        assert!(
            problem["detail"]
                .as_str()
                .expect("detail")
                .contains(mentions),
            "{problem} should mention {mentions}"
        );
    }

    let get = |path: String| {
        let request = client.get(format!("{api}{path}"));
        async move { problem(request.send().await.expect("sent")).await }
    };
    for (path, status, mentions) in [
        (
            format!("/customers/{customer}/ads/profile"),
            404,
            "knows no",
        ),
        (
            format!("/customers/{customer}/ads/profile?limit=3"),
            400,
            "limit",
        ),
        (
            format!("/customers/{customer}/ads/profile?position=nonsense"),
            400,
            "position",
        ),
        (
            format!("/customers/{customer}/ads/profile?position=delivery:x:1"),
            400,
            "delivery",
        ),
        (
            format!("/customers/{customer}/ads/promotion?region=mars"),
            400,
            "region",
        ),
        ("/customers/42/ads/promotion".to_owned(), 400, "customer id"),
        ("/ads/experiments/nope/results".to_owned(), 404, "nope"),
        (
            "/ads/experiments/a%20b/results".to_owned(),
            400,
            "experiment id",
        ),
    ] {
        let (got, problem) = get(path.clone()).await;
        assert_eq!(got, status, "{path}: {problem}");
        assert!(
            problem["detail"]
                .as_str()
                .expect("detail")
                .contains(mentions),
            "{path}: {problem} should mention {mentions}"
        );
    }

    // Admin: an unknown promotion, an overbooked layer, a bad window.
    let experiment = json!({
        "layer": "checkout-banner", "traffic_bp": 1_000, "attribution_window_hours": 24,
        "active": true, "regions": [],
        "variants": [{"name": "a", "weight": 1, "promotion_code": null},
                     {"name": "b", "weight": 1, "promotion_code": "NOPE"}]
    });
    let put = |id: &str, body: Value| {
        let request = client
            .put(format!("{api}/admin/experiments/{id}"))
            .json(&body);
        async move { problem(request.send().await.expect("sent")).await }
    };
    let (status, body) = put("new-test", experiment.clone()).await;
    assert_eq!(
        (status, body["detail"].as_str().map(|d| d.contains("NOPE"))),
        (422, Some(true))
    );
    let mut overbooked = experiment.clone();
    overbooked["variants"][1]["promotion_code"] = Value::Null;
    overbooked["traffic_bp"] = json!(2_001);
    let (status, body) = put("new-test", overbooked.clone()).await;
    assert_eq!(status, 422, "{body}");
    overbooked["traffic_bp"] = json!(2_000);
    overbooked["attribution_window_hours"] = json!(0);
    let (status, body) = put("new-test", overbooked).await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = put("bad id", experiment).await;
    assert_eq!(status, 422);

    // Every endpoint is documented, with its parameters.
    let openapi: Value = client
        .get(format!("{api}/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    for (path, method, parameters) in [
        (
            "/customers/{customer_id}/ads/exposures",
            "post",
            &["customer_id", "Idempotency-Key"][..],
        ),
        (
            "/customers/{customer_id}/ads/profile",
            "get",
            &["customer_id", "position"][..],
        ),
        (
            "/customers/{customer_id}/ads/promotion",
            "get",
            &["customer_id", "region", "position"][..],
        ),
        (
            "/ads/experiments/{experiment_id}/results",
            "get",
            &["experiment_id", "position"][..],
        ),
        (
            "/admin/experiments/{experiment_id}",
            "put",
            &["experiment_id", "Idempotency-Key"][..],
        ),
    ] {
        let operation = &openapi["paths"][path][method];
        let documented: Vec<&str> = operation["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{method} {path} is documented"))
            .iter()
            .filter_map(|p| p["name"].as_str())
            // Every operation takes it (tests/tests/contract.rs).
            .filter(|name| *name != "x-correlation-id")
            .collect();
        assert_eq!(documented, parameters, "{method} {path}");
        assert!(operation["responses"]["400"].is_object(), "{method} {path}");
    }

    server.stop().await.expect("api stops");
    env.stop().await;
}
