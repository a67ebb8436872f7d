//! The estimated arrival a customer sees follows the store: once the store marks the food
//! ready, the estimate stops waiting for the preparation time it was accepted with. (Seen in
//! use: marked ready, courier 580 m from the store, and the estimate still said 9 minutes.)

use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{act, eventually, order_request, place_request, Running, TestEnv};
use chrono::{DateTime, Utc};
use commands::CatalogueStore;
use domain::services::Catalogue;
use flows::OrderFlow;
use projections::TrackingProjection;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn tracking(client: &reqwest::Client, api: &str, order_id: &str) -> Option<Value> {
    client
        .get(format!("{api}/orders/{order_id}/tracking"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

async fn deliver(client: &reqwest::Client, api: &str, order_id: &str, action: Value) {
    let response = client
        .post(format!("{api}/deliveries/{order_id}/actions"))
        .json(&action)
        .send()
        .await
        .expect("action sent");
    assert_eq!(response.status().as_u16(), 200, "{action}");
}

fn instant(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("an instant: {value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn once_the_store_marks_the_food_ready_the_estimate_is_the_couriers_ride_alone() {
    let env = TestEnv::start("eta").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let seed = Catalogue::demo().expect("demo catalogue");
    let catalogue = CatalogueStore::load(env.pool().clone(), &seed)
        .await
        .expect("catalogue");
    let flow: Running = env
        .start_projector(Arc::new(OrderFlow::new(
            env.store.clone(),
            Arc::new(catalogue),
        )))
        .await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    let request = order_request(Uuid::new_v4());
    let order_id = place_request(&client, &api, &request).await;
    eventually(WAIT, "confirmed", || async {
        let view = tracking(&client, &api, &order_id).await?;
        (view["status"] == "Confirmed").then_some(())
    })
    .await;
    act(
        &client,
        &api,
        &order_id,
        json!({"action": "accept", "estimated_preparation_minutes": 20}),
    )
    .await;
    eventually(WAIT, "a delivery requested", || async {
        let view = tracking(&client, &api, &order_id).await?;
        view["delivery"].is_object().then_some(())
    })
    .await;

    // A courier 580 m north of the store, while the kitchen is expected to need 20 minutes.
    let catalogue: Value = client
        .get(format!("{api}/catalogue"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let store = &catalogue["catalogue"]["stores"][request["store_id"].as_str().expect("store")];
    let (latitude, longitude) = (
        store["latitude"].as_f64().expect("latitude"),
        store["longitude"].as_f64().expect("longitude"),
    );
    deliver(
        &client,
        &api,
        &order_id,
        json!({"action": "assign_courier", "courier_id": Uuid::new_v4()}),
    )
    .await;
    deliver(
        &client,
        &api,
        &order_id,
        json!({"action": "update_location", "latitude": latitude + 0.58 / 111.195,
               "longitude": longitude, "device_time": Utc::now()}),
    )
    .await;
    let waiting = eventually(WAIT, "an estimate with the courier placed", || async {
        let view = tracking(&client, &api, &order_id).await?;
        let eta = &view["delivery"]["eta"];
        (eta["remaining_meters"].as_i64()? > 600).then(|| eta.clone())
    })
    .await;
    let minutes_left =
        |eta: &Value| (instant(&eta["expected_at"]) - Utc::now()).num_seconds() as f64 / 60.0;
    assert!(
        minutes_left(&waiting) > 15.0,
        "waiting for the kitchen: {waiting}"
    );

    // The store is done early: the estimate is the ride (580 m to the store, then on to the
    // customer), no longer the kitchen's 20 minutes.
    act(
        &client,
        &api,
        &order_id,
        json!({"action": "start_preparation"}),
    )
    .await;
    act(&client, &api, &order_id, json!({"action": "mark_ready"})).await;
    let ready = eventually(WAIT, "the estimate after ready", || async {
        let view = tracking(&client, &api, &order_id).await?;
        let eta = view["delivery"]["eta"].clone();
        (instant(&eta["expected_at"]) < instant(&waiting["expected_at"])).then_some(eta)
    })
    .await;
    let remaining = ready["remaining_meters"].as_f64().expect("metres");
    // At 15 km/h with the detour factor of 1.3: about 0.31 s per metre.
    let ride_minutes = remaining * 1.3 * 3.6 / 15.0 / 60.0;
    let left = minutes_left(&ready);
    assert!(
        (left - ride_minutes).abs() < 1.0,
        "{left:.1} minutes left, the ride takes {ride_minutes:.1}: {ready}"
    );
    assert!(
        instant(&ready["latest_at"]) - instant(&ready["earliest_at"])
            < instant(&waiting["latest_at"]) - instant(&waiting["earliest_at"]),
        "the window narrows once nothing waits for the kitchen: {waiting} then {ready}"
    );

    server.stop().await.expect("api stops");
    flow.stop().await.expect("process manager stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
