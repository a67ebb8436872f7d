//! The ratings read model fed by real orders through the pipeline: the figures equal what the
//! test computes from the ratings it gave.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{act, eventually, order_request, place_request, TestEnv};
use projections::RatingsProjection;
use serde_json::{json, Value};
use uuid::Uuid;

/// Places an order with `items` at `store`, takes it to delivered and rates it.
async fn rated_order(client: &reqwest::Client, api: &str, store: Uuid, items: &[&str], stars: u8) {
    let mut request = order_request(Uuid::new_v4());
    request["store_id"] = json!(store);
    request["items"] = json!(items
        .iter()
        .map(|i| json!({"item_id": i, "quantity": 1}))
        .collect::<Vec<_>>());
    let order_id = place_request(client, api, &request).await;
    for action in [
        json!({"action": "confirm_payment", "payment_reference": "p"}),
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
        json!({"action": "start_preparation"}),
        json!({"action": "mark_ready"}),
        json!({"action": "hand_to_courier"}),
        json!({"action": "mark_delivered"}),
        json!({"action": "rate", "stars": stars}),
    ] {
        act(client, api, &order_id, action).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ratings_per_item_and_store_match_the_ratings_given() {
    let env = TestEnv::start("ratings").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(RatingsProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    // Two stores of the demo catalogue (Angel and Islington).
    let (store_a, store_b) = (
        Uuid::from_u128(42),
        Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0100),
    );
    let given: [(Uuid, &[&str], u8); 3] = [
        (store_a, &["margherita", "cola"], 5),
        (store_a, &["margherita"], 3),
        (store_b, &["pepperoni"], 4),
    ];
    for (store, items, stars) in given {
        rated_order(&client, &api, store, items, stars).await;
    }

    // Expected figures, computed from the ratings given.
    let mut items: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut stores: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (store, rated_items, stars) in given {
        stores.entry(store.to_string()).or_default().push(stars);
        for item in rated_items {
            items.entry((*item).to_owned()).or_default().push(stars);
        }
    }
    for (kind, expected) in [("item", &items), ("store", &stores)] {
        let total: u32 = expected.values().flatten().map(|s| u32::from(*s)).sum();
        let count = expected.values().map(Vec::len).sum::<usize>();
        let prior = f64::from(total) / count as f64;
        let ranking: Vec<Value> = eventually(Duration::from_secs(60), "the ratings", || async {
            let ranking: Vec<Value> = client
                .get(format!("{api}/ratings/{kind}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let counted: i64 = ranking.iter().filter_map(|r| r["count"].as_i64()).sum();
            (counted == count as i64).then_some(ranking)
        })
        .await;
        assert_eq!(ranking.len(), expected.len(), "{kind}: {ranking:?}");
        let mut previous = f64::INFINITY;
        for row in &ranking {
            let id = row["id"].as_str().expect("id");
            let stars = &expected[id];
            let sum: u32 = stars.iter().map(|s| u32::from(*s)).sum();
            let mut distribution = vec![0i64; 5];
            for s in stars {
                distribution[usize::from(*s) - 1] += 1;
            }
            let bayesian = (10.0 * prior + f64::from(sum)) / (10.0 + stars.len() as f64);
            assert_eq!(row["count"], stars.len(), "{kind} {id}");
            assert!(
                (row["mean"].as_f64().expect("mean") - f64::from(sum) / stars.len() as f64).abs()
                    < 1e-9
            );
            assert_eq!(row["distribution"], json!(distribution), "{kind} {id}");
            let got = row["bayesian_average"].as_f64().expect("bayesian");
            assert!(
                (got - bayesian).abs() < 1e-9,
                "{kind} {id}: {got} vs {bayesian}"
            );
            assert!(got <= previous, "best first");
            previous = got;
        }
    }

    let response = client
        .get(format!("{api}/ratings/planets"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 400);

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
