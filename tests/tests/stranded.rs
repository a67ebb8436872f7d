//! Orders and money that must not get stranded, driven as users drive them: over HTTP against
//! the real API with the relay, the read models and the order-flow process manager running.
//!
//! - a delivery that fails at the door and goes back to the store ends the order, voids the
//!   payment, gives back the redeemed points and tells the customer; a rejection is told too;
//! - a flow step that cannot proceed is a stuck flow operators list (API, `replay-tools`, the
//!   metric) and clear: retried once the cause is fixed, or resolved by cancelling the order
//!   with compensation; catalogue values that would strand a step are refused when set;
//! - a refund takes back the points the order earned for what was refunded;
//! - a customer reads their own points balance and lots.

use std::sync::Arc;
use std::time::Duration;

use backbone_tests::tools::replay_tools;
use backbone_tests::{
    act, client_as, eventually, order_request, place_request, post_webhook, Role, Running, TestEnv,
};
use commands::CatalogueStore;
use domain::services::Catalogue;
use flows::OrderFlow;
use projections::{NotificationsProjection, TrackingProjection};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Everything a user's request goes through: relay, tracking and notifications, the process
/// manager with its scheduler and a catalogue refreshed as often as a test needs.
struct Backbone {
    env: TestEnv,
    api: String,
    running: Vec<Running>,
}

impl Backbone {
    async fn start(name: &str) -> Self {
        let env = TestEnv::start(name).await;
        let mut running = vec![
            env.start_relay().await,
            env.start_projector(Arc::new(TrackingProjection)).await,
            env.start_projector(Arc::new(NotificationsProjection)).await,
        ];
        let seed = Catalogue::demo().expect("demo catalogue");
        let catalogue = Arc::new(
            CatalogueStore::load(env.pool().clone(), &seed)
                .await
                .expect("catalogue"),
        );
        let flow = Arc::new(OrderFlow::new(env.store.clone(), catalogue.clone()));
        running.push(env.start_projector(flow.clone()).await);
        let token = CancellationToken::new();
        let (pool, stop) = (env.pool().clone(), token.clone());
        let handle = tokio::spawn(async move {
            let refresh = catalogue.refresh_every(Duration::from_millis(100), stop.clone());
            let work = flow.run_deadlines_until_stopped(pool, Duration::from_millis(100), stop);
            tokio::join!(refresh, work);
            Ok(())
        });
        running.push(Running { token, handle });
        let (api, server) = env.start_api().await;
        running.push(server);
        Self { env, api, running }
    }

    async fn stop(self) {
        for running in self.running.into_iter().rev() {
            running.stop().await.expect("stops cleanly");
        }
        self.env.stop().await;
    }

    fn admin(&self) -> reqwest::Client {
        backbone_tests::client()
    }

    async fn get(&self, client: &reqwest::Client, path: &str) -> (u16, Value) {
        let response = client
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .expect("sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, client: &reqwest::Client, path: &str, body: &Value) -> (u16, Value) {
        let response = client
            .post(format!("{}{path}", self.api))
            .json(body)
            .send()
            .await
            .expect("sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .admin()
            .put(format!("{}{path}", self.api))
            .json(body)
            .send()
            .await
            .expect("sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn status(&self, order_id: &str) -> Option<String> {
        let (_, view) = self
            .get(&self.admin(), &format!("/orders/{order_id}/tracking"))
            .await;
        view["status"].as_str().map(str::to_owned)
    }

    async fn wait_for_status(&self, order_id: &str, wanted: &str) {
        eventually(
            WAIT,
            &format!("order {order_id} to be {wanted}"),
            || async { (self.status(order_id).await.as_deref() == Some(wanted)).then_some(()) },
        )
        .await;
    }

    async fn deliver(&self, order_id: &str, action: Value) {
        let (status, body) = self
            .post(
                &self.admin(),
                &format!("/deliveries/{order_id}/actions"),
                &action,
            )
            .await;
        assert_eq!(status, 200, "{action}: {body}");
    }

    /// Accept, prepare and mark ready as the store would.
    async fn prepare(&self, order_id: &str) {
        for action in [
            json!({"action": "accept", "estimated_preparation_minutes": 10}),
            json!({"action": "start_preparation"}),
            json!({"action": "mark_ready"}),
        ] {
            act(&self.admin(), &self.api, order_id, action).await;
        }
    }

    /// Dispatch assigns a courier as soon as the flow has requested the delivery.
    async fn assign_courier(&self, order_id: &str) {
        let courier = Uuid::new_v4();
        eventually(WAIT, "the delivery to be requested", || async {
            let (status, _) = self
                .post(
                    &self.admin(),
                    &format!("/deliveries/{order_id}/actions"),
                    &json!({"action": "assign_courier", "courier_id": courier}),
                )
                .await;
            (status == 200).then_some(())
        })
        .await;
    }

    /// The event types of an aggregate, in order.
    async fn history(&self, aggregate_type: &str, id: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
             ORDER BY sequence",
        )
        .bind(aggregate_type)
        .bind(id)
        .fetch_all(self.env.pool())
        .await
        .expect("history")
    }

    /// The customer's own view of their points.
    async fn points(&self, customer: Uuid) -> Value {
        let (status, body) = self
            .get(
                &client_as(Role::Customer, customer),
                &format!("/customers/{customer}/rewards"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn notification_kinds(&self, customer: Uuid) -> Vec<(String, Value)> {
        let (status, body) = self
            .get(
                &client_as(Role::Customer, customer),
                &format!("/customers/{customer}/notifications"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|n| {
                (
                    n["kind"].as_str().unwrap_or_default().to_owned(),
                    n["payload"].clone(),
                )
            })
            .collect()
    }

    async fn wait_for_notification(&self, customer: Uuid, kind: &str) -> Value {
        eventually(WAIT, &format!("a `{kind}` notification"), || async {
            self.notification_kinds(customer)
                .await
                .into_iter()
                .find(|(k, _)| k == kind)
                .map(|(_, payload)| payload)
        })
        .await
    }

    async fn stuck_flows(&self, query: &str) -> Vec<Value> {
        let (status, body) = self
            .get(&self.admin(), &format!("/admin/stuck-flows{query}"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["items"].as_array().expect("items").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_and_returned_delivery_ends_the_order_voids_the_payment_gives_back_points_and_tells_the_customer(
) {
    let backbone = Backbone::start("faileddelivery").await;
    let admin = backbone.admin();
    let customer = Uuid::new_v4();
    let (status, _) = backbone
        .post(
            &admin,
            &format!("/customers/{customer}/rewards/actions"),
            &json!({"action": "adjust", "points": 500, "reason": "welcome",
                    "idempotency_key": "welcome"}),
        )
        .await;
    assert_eq!(status, 200);
    let mut request = order_request(customer);
    request["redeem_points"] = json!(200);
    let order_id = place_request(
        &client_as(Role::Customer, customer),
        &backbone.api,
        &request,
    )
    .await;
    backbone.wait_for_status(&order_id, "Confirmed").await;
    eventually(WAIT, "the redemption to be debited", || async {
        (backbone.points(customer).await["balance"] == json!(300)).then_some(())
    })
    .await;

    backbone.prepare(&order_id).await;
    backbone.assign_courier(&order_id).await;
    backbone
        .deliver(&order_id, json!({"action": "pick_up"}))
        .await;
    backbone.wait_for_status(&order_id, "OutForDelivery").await;
    backbone
        .deliver(&order_id, json!({"action": "arrive_at_dropoff"}))
        .await;
    backbone
        .deliver(
            &order_id,
            json!({"action": "fail", "reason": "CustomerUnreachable"}),
        )
        .await;
    backbone
        .deliver(&order_id, json!({"action": "return_to_store"}))
        .await;

    // The order ends, cancelled by the system with the failure as its reason.
    backbone.wait_for_status(&order_id, "Cancelled").await;
    // The payment is voided (never captured), the redeemed points are back.
    eventually(WAIT, "the payment to be voided", || async {
        let payment = backbone.history("payment", &order_id).await;
        payment.contains(&"PaymentVoided".to_owned()).then_some(())
    })
    .await;
    let payment = backbone.history("payment", &order_id).await;
    assert!(
        !payment.contains(&"PaymentCaptured".to_owned()),
        "{payment:?}"
    );
    eventually(WAIT, "the redeemed points to be given back", || async {
        (backbone.points(customer).await["balance"] == json!(500)).then_some(())
    })
    .await;
    // The customer is told: the delivery failed, and the order is cancelled with why.
    let failed = backbone
        .wait_for_notification(customer, "delivery_failed")
        .await;
    assert_eq!(failed["reason"], "CustomerUnreachable");
    assert_eq!(failed["order_id"], json!(order_id));
    let cancelled = backbone
        .wait_for_notification(customer, "order_cancelled")
        .await;
    assert_eq!(cancelled["cancelled_by"], "System");
    assert!(
        cancelled["reason"]
            .as_str()
            .is_some_and(|r| r.contains("CustomerUnreachable")),
        "{cancelled}"
    );
    // Nothing of it is stuck: the delivery's own cancellation was moot, not a refusal to show.
    assert!(backbone.stuck_flows("").await.is_empty());

    // A store's rejection is told as well, with its reason.
    let rejected = place_request(&admin, &backbone.api, &order_request(customer)).await;
    backbone.wait_for_status(&rejected, "Confirmed").await;
    act(
        &admin,
        &backbone.api,
        &rejected,
        json!({"action": "reject", "reason": "Busy"}),
    )
    .await;
    let told = backbone
        .wait_for_notification(customer, "order_rejected")
        .await;
    assert_eq!(told["reason"], "Busy");
    assert_eq!(told["order_id"], json!(rejected));

    backbone.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_cannot_proceed_is_a_stuck_flow_operators_list_retry_and_resolve() {
    let backbone = Backbone::start("stuckflows").await;
    let admin = backbone.admin();
    let (_, catalogue) = backbone.get(&admin, "/catalogue").await;
    let store_id = Uuid::from_u128(42).to_string();
    let store = catalogue["catalogue"]["stores"][&store_id].clone();
    assert!(store.is_object(), "store 42 in the demo catalogue");

    // Catalogue values that would strand a later step are refused when set, naming the field.
    let mut region = catalogue["catalogue"]["regions"]["uk"].clone();
    region["points_expire_in_days"] = json!(0);
    let (status, problem) = backbone.put("/admin/regions/uk", &region).await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"]
            .to_string()
            .contains("points_expire_in_days"),
        "{problem}"
    );
    let mut nowhere = store.clone();
    nowhere["region"] = json!("xx-none");
    let (status, problem) = backbone
        .put(&format!("/admin/stores/{}", Uuid::new_v4()), &nowhere)
        .await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"].to_string().contains("region"),
        "{problem}"
    );
    // So is an order whose drop-off no courier could reach from its store.
    let mut far = order_request(Uuid::new_v4());
    far["delivery_address"]["latitude"] = json!(57.48);
    far["delivery_address"]["longitude"] = json!(-4.22);
    let (status, problem) = backbone.post(&admin, "/orders", &far).await;
    assert_eq!(status, 422, "{problem}");

    // Two orders are paid for; then the store is moved 530 km away by mistake.
    let customer = Uuid::new_v4();
    let kept = place_request(&admin, &backbone.api, &order_request(customer)).await;
    let given_up = place_request(&admin, &backbone.api, &order_request(customer)).await;
    backbone.wait_for_status(&kept, "Confirmed").await;
    backbone.wait_for_status(&given_up, "Confirmed").await;
    let mut moved = store.clone();
    moved["latitude"] = json!(55.95);
    moved["longitude"] = json!(-3.19);
    let (status, body) = backbone
        .put(&format!("/admin/stores/{store_id}"), &moved)
        .await;
    assert_eq!(status, 204, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Accepted, neither can get a delivery: each is a visible stuck flow.
    for order in [&kept, &given_up] {
        act(
            &admin,
            &backbone.api,
            order,
            json!({"action": "accept", "estimated_preparation_minutes": 10}),
        )
        .await;
    }
    let stuck = eventually(WAIT, "two stuck flows", || async {
        let items = backbone.stuck_flows("").await;
        (items.len() == 2).then_some(items)
    })
    .await;
    for record in &stuck {
        assert_eq!(record["step"], "request-delivery", "{record}");
        assert_eq!(record["command_type"], "RequestDelivery");
        assert_eq!(record["event_type"], "OrderAccepted");
        assert_eq!(record["status"], "open");
        assert!(
            record["reason"].as_str().is_some_and(|r| r.contains("km")),
            "{record}"
        );
        assert!(record["since"].is_string());
    }
    let id_of = |order: &str| {
        stuck
            .iter()
            .find(|r| r["order_id"] == json!(order))
            .and_then(|r| r["id"].as_i64())
            .expect("a stuck flow per order")
    };
    let (kept_id, given_up_id) = (id_of(&kept), id_of(&given_up));
    // Operators also see them with replay-tools and in the metrics.
    let output = replay_tools(&backbone.env, &["stuck-flows", "list"], &[]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(
        listed.contains(&kept) && listed.contains("request-delivery"),
        "{listed}"
    );
    let metrics = reqwest::get(format!("{}/metrics", backbone.api))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("process_manager_stuck_flows_total"),
        "{metrics}"
    );
    // The order stays where it was.
    assert_eq!(backbone.status(&kept).await.as_deref(), Some("Accepted"));

    // One is given up: resolved with a reason (CLI), the order is cancelled with compensation.
    let output = replay_tools(
        &backbone.env,
        &[
            "stuck-flows",
            "resolve",
            &given_up_id.to_string(),
            "--reason",
            "the store cannot deliver there",
        ],
        &[],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    backbone.wait_for_status(&given_up, "Cancelled").await;
    eventually(
        WAIT,
        "the given-up order's payment to be voided",
        || async {
            let payment = backbone.history("payment", &given_up).await;
            payment.contains(&"PaymentVoided".to_owned()).then_some(())
        },
    )
    .await;
    let cancelled = backbone
        .wait_for_notification(customer, "order_cancelled")
        .await;
    assert!(
        cancelled["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the store cannot deliver there")),
        "{cancelled}"
    );
    let resolved = eventually(WAIT, "the record to be resolved", || async {
        let items = backbone
            .stuck_flows(&format!("?status=resolved&order_id={given_up}"))
            .await;
        items.into_iter().next()
    })
    .await;
    assert_eq!(resolved["id"], json!(given_up_id));
    assert!(resolved["resolution"].is_string());

    // The other is retried once the store is back where it belongs (API); it goes on.
    let (status, body) = backbone
        .put(&format!("/admin/stores/{store_id}"), &store)
        .await;
    assert_eq!(status, 204, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = backbone
        .post(
            &admin,
            &format!("/admin/stuck-flows/{kept_id}/retry"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "retry_requested");
    eventually(WAIT, "the retry to go through", || async {
        let items = backbone
            .stuck_flows(&format!("?status=retried&order_id={kept}"))
            .await;
        items.into_iter().next()
    })
    .await;
    let delivery = backbone.history("delivery", &kept).await;
    assert_eq!(
        delivery.first().map(String::as_str),
        Some("DeliveryRequested")
    );
    backbone.assign_courier(&kept).await;
    // Nothing is left waiting, and a finished record is not retried twice.
    assert!(backbone.stuck_flows("").await.is_empty());
    let (status, _) = backbone
        .post(
            &admin,
            &format!("/admin/stuck-flows/{kept_id}/retry"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 409);

    backbone.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_takes_back_the_points_earned_for_what_was_refunded_and_a_customer_reads_them() {
    let backbone = Backbone::start("refundpoints").await;
    let admin = backbone.admin();
    let customer = Uuid::new_v4();
    let order_id = place_request(&admin, &backbone.api, &order_request(customer)).await;
    backbone.wait_for_status(&order_id, "Confirmed").await;
    backbone.prepare(&order_id).await;
    backbone.assign_courier(&order_id).await;
    backbone
        .deliver(&order_id, json!({"action": "pick_up"}))
        .await;
    backbone.wait_for_status(&order_id, "OutForDelivery").await;
    backbone
        .deliver(&order_id, json!({"action": "deliver"}))
        .await;
    backbone.wait_for_status(&order_id, "Completed").await;

    // The customer reads their points: one lot, with its expiry, from the completed order.
    let earned = eventually(WAIT, "the points to be earned", || async {
        let points = backbone.points(customer).await;
        (points["balance"].as_u64()? > 0).then_some(points)
    })
    .await;
    let lots = earned["lots"].as_array().expect("lots");
    assert_eq!(lots.len(), 1, "{earned}");
    assert!(lots[0]["expires_at"].is_string());
    assert_eq!(lots[0]["remaining"], earned["balance"]);
    assert_eq!(earned["lifetime_earned"], earned["balance"]);
    let points = earned["balance"].as_u64().expect("points");
    // Someone else's points are not theirs to read.
    let (status, _) = backbone
        .get(
            &client_as(Role::Customer, Uuid::new_v4()),
            &format!("/customers/{customer}/rewards"),
        )
        .await;
    assert_eq!(status, 403);

    // A quarter of the order is refunded at the provider: a quarter of the points goes back.
    let total: i64 = sqlx::query_scalar(
        "SELECT (payload->'PaymentCaptured'->'amount'->>'minor')::bigint FROM events \
         WHERE aggregate_type = 'payment' AND aggregate_id = $1 AND event_type = 'PaymentCaptured'",
    )
    .bind(&order_id)
    .fetch_one(backbone.env.pool())
    .await
    .expect("captured");
    let quarter = total / 4;
    let refund = |id: &str, minor: i64| {
        json!({"provider_event_id": id, "kind": "Refunded", "refund_id": id,
               "order_id": order_id, "amount": {"minor": minor, "currency": "GBP"}})
    };
    let response = post_webhook(&backbone.api, &order_id, &refund("refund-1", quarter)).await;
    assert_eq!(response.status().as_u16(), 200);
    // The refunded share, rounded down (the ledger never takes more than was refunded).
    let share = u128::from(points) * u128::try_from(quarter).expect("positive")
        / u128::try_from(total).expect("positive");
    let expected_left = points - u64::try_from(share).expect("small");
    eventually(WAIT, "the refunded share to be taken back", || async {
        (backbone.points(customer).await["balance"] == json!(expected_left)).then_some(())
    })
    .await;

    // The rest is refunded: a fully refunded order keeps none, not even in lifetime earned.
    let response = post_webhook(
        &backbone.api,
        &order_id,
        &refund("refund-2", total - quarter),
    )
    .await;
    assert_eq!(response.status().as_u16(), 200);
    let after = eventually(WAIT, "every point to be taken back", || async {
        let points = backbone.points(customer).await;
        (points["balance"] == json!(0)).then_some(points)
    })
    .await;
    assert_eq!(after["lifetime_earned"], json!(0));
    assert_eq!(after["lots"], json!([]));
    let ledger = backbone.history("rewards", &customer.to_string()).await;
    assert_eq!(
        ledger,
        ["PointsEarned", "PointsReversed", "PointsReversed"],
        "{ledger:?}"
    );
    assert!(backbone.stuck_flows("").await.is_empty());

    backbone.stop().await;
}
