//! The disaster: the backbone's database is lost. `replay-tools restore` rebuilds the event store
//! from the topics alone into an empty database (every event byte for byte, its hash chain
//! verified), then the read models, and the backbone resumes on it: an order in flight at the
//! loss completes, a new order is taken, a once-per-customer promotion stays used, and what the
//! relay had not published at the loss (the recovery point) is exactly what is missing.
//!
//! The schema registry keeps its own store through the disaster (Confluent's keeps its schemas
//! in Kafka; ours in a database of its own in production): the records' schema ids stay valid.

use std::path::PathBuf;
use std::time::Duration;

use backbone_tests::load::Backbone;
use backbone_tests::{act, client, client_as, eventually, json_of, order_request, Role};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().await.expect("sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn status_is(api: &str, order_id: &str, wanted: &str) {
    let admin = client();
    let url = format!("{api}/orders/{order_id}/tracking");
    eventually(
        WAIT,
        &format!("order {order_id} to be {wanted}"),
        || async {
            let view = json_of(&admin, &url).await?;
            (view["status"] == wanted).then_some(())
        },
    )
    .await;
}

async fn place(api: &str, customer: Uuid, promotion: Option<&str>) -> (u16, Value) {
    let mut request = order_request(customer);
    if let Some(code) = promotion {
        request["promotion_code"] = json!(code);
    }
    post(
        &client_as(Role::Customer, customer),
        format!("{api}/orders"),
        request,
    )
    .await
}

/// Store and dispatch steps up to the courier's pick-up.
async fn prepare_and_assign(api: &str, order_id: &str) {
    let admin = client();
    for action in [
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
        json!({"action": "start_preparation"}),
        json!({"action": "mark_ready"}),
    ] {
        act(&admin, api, order_id, action).await;
    }
    eventually(WAIT, "the delivery to be requested", || async {
        let (code, _) = post(
            &admin,
            format!("{api}/deliveries/{order_id}/actions"),
            json!({"action": "assign_courier", "courier_id": Uuid::new_v4()}),
        )
        .await;
        (code == 200).then_some(())
    })
    .await;
}

/// The courier's steps, in order.
async fn courier(api: &str, order_id: &str, steps: &[&str]) {
    let admin = client();
    for step in steps {
        let action = json!({ "action": step });
        let (code, body) = post(
            &admin,
            format!("{api}/deliveries/{order_id}/actions"),
            action,
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
}

/// Every event of a store: (event id, sequence, chain hash), sorted.
async fn chain_of(pool: &PgPool) -> Vec<(Uuid, i64, Vec<u8>)> {
    sqlx::query_as("SELECT event_id, sequence, chain_hash FROM events ORDER BY event_id")
        .fetch_all(pool)
        .await
        .expect("events")
}

fn succeeded(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn a_lost_database_is_restored_from_the_topics_and_the_backbone_resumes() {
    let catalogue = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../domain/catalogue/demo.json"
    ));
    let mut backbone =
        Backbone::start(&catalogue, &[("API_RATE_LIMIT_PER_SECOND", "0".to_owned())]).await;
    let api = backbone.api.clone();

    // Before the loss: one order completed (with a once-per-customer promotion), one picked up
    // and not yet delivered.
    let loyal = Uuid::new_v4();
    let (code, placed) = place(&api, loyal, Some("WELCOME10")).await;
    assert_eq!(code, 201, "{placed}");
    let completed = placed["order_id"].as_str().expect("order id").to_owned();
    status_is(&api, &completed, "Confirmed").await;
    prepare_and_assign(&api, &completed).await;
    courier(&api, &completed, &["pick_up", "deliver"]).await;
    status_is(&api, &completed, "Completed").await;
    let (code, placed) = place(&api, Uuid::new_v4(), None).await;
    assert_eq!(code, 201, "{placed}");
    let in_flight = placed["order_id"].as_str().expect("order id").to_owned();
    status_is(&api, &in_flight, "Confirmed").await;
    prepare_and_assign(&api, &in_flight).await;
    courier(&api, &in_flight, &["pick_up"]).await;
    status_is(&api, &in_flight, "OutForDelivery").await;

    // The relay stops; one more order is placed: committed, never published (the recovery
    // point's backlog). Then the disaster: every process but the registry is gone.
    backbone.kill("relay");
    let (code, placed) = place(&api, Uuid::new_v4(), None).await;
    assert_eq!(code, 201, "{placed}");
    let unpublished: Vec<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM outbox WHERE published_at IS NULL")
            .fetch_all(&backbone.pool)
            .await
            .expect("backlog");
    assert!(!unpublished.is_empty());
    for component in ["api", "projector", "process-manager"] {
        backbone.kill(component);
    }
    let lost = chain_of(&backbone.pool).await;

    // An empty database; restore from the topics.
    let restored = backbone.replace_database().await;
    let report = succeeded(&backbone.replay_tools(&["restore", "--flow-rewind", "0"]));
    assert!(report.contains("0 findings"), "{report}");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&backbone.database_url)
        .await
        .expect("restored database");

    // Byte for byte: every published event, with its chain hash; none of the backlog.
    let expected: Vec<_> = lost
        .iter()
        .filter(|(id, ..)| !unpublished.contains(id))
        .cloned()
        .collect();
    assert_eq!(chain_of(&pool).await, expected);
    assert!(expected.len() < lost.len());
    succeeded(&backbone.replay_tools(&["verify"]));
    let unpublished_now: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .expect("outbox");
    assert_eq!(unpublished_now, 0, "the restored history is not sent again");

    // The backbone resumes on the restored database.
    for component in ["relay", "projector", "api"] {
        backbone.restart(component);
    }
    eventually(WAIT, "the restored API to be ready", || async {
        let ready = reqwest::get(format!("{api}/health/ready")).await.ok()?;
        ready.status().is_success().then_some(())
    })
    .await;
    // As at the first start: once the API has seeded the catalogue table.
    backbone.restart("process-manager");
    // The read models were rebuilt: the completed order is there as it was.
    status_is(&api, &completed, "Completed").await;
    // The order in flight completes (the process manager reads its placement again from the
    // restored log: its own state was lost with the database).
    courier(&api, &in_flight, &["deliver"]).await;
    status_is(&api, &in_flight, "Completed").await;
    // New orders are taken; the promotion the customer used stays used.
    let (code, placed) = place(&api, Uuid::new_v4(), None).await;
    assert_eq!(code, 201, "{placed}");
    status_is(&api, placed["order_id"].as_str().expect("id"), "Confirmed").await;
    let (code, refused) = place(&api, loyal, Some("WELCOME10")).await;
    assert_eq!(code, 422, "{refused}");
    assert!(refused.to_string().contains(&completed), "{refused}");
    backbone.assert_running();
    eventually(
        WAIT,
        "store, topics and read models to reconcile",
        || async {
            backbone
                .replay_tools(&["reconcile"])
                .status
                .success()
                .then_some(())
        },
    )
    .await;

    // The registry still uses the primary database: dropped last, by `stop`.
    pool.close().await;
    backbone.stop().await;
    Backbone::drop_database(&restored).await;
}
