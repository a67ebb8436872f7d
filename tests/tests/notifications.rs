//! Customer notifications over the real pipeline: an order driven over HTTP (and completed by
//! the order flow, which earns the customer points) produces exactly the expected notifications,
//! listed in order, streamed live as Server-Sent Events (resumable with Last-Event-ID), and
//! POSTed to a webhook once each with a valid signature; a replay of the topics adds nothing and
//! sends nothing. A webhook that fails is recorded, listed and not resent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use backbone_tests::{act, eventually, order_request, place_request, Running, TestEnv};
use commands::CatalogueStore;
use domain::services::Catalogue;
use flows::OrderFlow;
use hmac::{Hmac, Mac};
use projections::notifier::{Notifier, WebhookConfig};
use projections::NotificationsProjection;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use sha2::Sha256;
use streams::consumer::{Projector, ProjectorConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "whsec-test-secret";

/// What the webhook receiver got: (signature header, notification-id header, raw body).
type Inbox = Arc<Mutex<Vec<(String, String, Bytes)>>>;

/// A webhook receiver on an ephemeral port answering `status`; returns its URL and inbox.
async fn start_receiver(status: StatusCode) -> (String, Inbox, Running) {
    let inbox: Inbox = Arc::default();
    let sink = inbox.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                sink.lock().expect("inbox").push((
                    header("backbone-signature"),
                    header("backbone-notification-id"),
                    body,
                ));
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("receiver binds");
    let url = format!("http://{}/hook", listener.local_addr().expect("bound"));
    let token = CancellationToken::new();
    let stop = token.clone();
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await?;
        Ok(())
    });
    (url, inbox, Running { token, handle })
}

/// The webhook worker, in this process, polling fast.
async fn start_notifier(env: &TestEnv, url: &str) -> Running {
    let config = WebhookConfig {
        notifications_webhook_poll_ms: 100,
        notifications_webhook_timeout_ms: 2_000,
        ..WebhookConfig::new(url, SECRET)
    };
    let notifier = Notifier::new(env.pool().clone(), &config)
        .await
        .expect("notifier starts");
    let token = CancellationToken::new();
    let handle = tokio::spawn(notifier.run_until_stopped(token.clone()));
    Running {
        token,
        handle: tokio::spawn(async move { Ok(handle.await??) }),
    }
}

/// The notifications projector with its own consumer group prefix.
async fn start_projector(env: &TestEnv, group_prefix: String) -> Running {
    let projector = Projector::new(
        Arc::new(NotificationsProjection),
        env.pool().clone(),
        &env.kafka,
        &env.registry,
        ProjectorConfig {
            projector_group_prefix: group_prefix,
            ..ProjectorConfig::default()
        },
    )
    .await
    .expect("projector starts");
    let token = CancellationToken::new();
    let handle = tokio::spawn(projector.run_until_stopped(token.clone()));
    Running {
        token,
        handle: tokio::spawn(async move { Ok(handle.await??) }),
    }
}

/// The order flow process manager (captures, completes and earns points once delivered).
async fn start_flow(env: &TestEnv) -> Running {
    let seed = Catalogue::demo().expect("demo catalogue");
    let catalogue = CatalogueStore::load(env.pool().clone(), &seed)
        .await
        .expect("catalogue");
    let flow = Arc::new(OrderFlow::new(env.store.clone(), Arc::new(catalogue)));
    env.start_projector(flow).await
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: i64,
    event: String,
    data: Value,
}

/// Opens a customer's notification stream (optionally resuming after `last_event_id`) and
/// forwards its events, parsed from the raw `text/event-stream` body.
async fn open_stream(
    client: &reqwest::Client,
    api: &str,
    customer: Uuid,
    last_event_id: Option<i64>,
) -> (
    mpsc::UnboundedReceiver<SseEvent>,
    tokio::task::JoinHandle<()>,
) {
    let mut request = client.get(format!("{api}/customers/{customer}/notifications/stream"));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let mut response = request.send().await.expect("stream opens");
    assert_eq!(response.status().as_u16(), 200);
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    let (sender, receiver) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse::<i64>().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                    // `:` lines are keep-alive comments.
                }
                if let (Some(id), Some(event)) = (id, event) {
                    let data = serde_json::from_str(&data).expect("data is JSON");
                    if sender.send(SseEvent { id, event, data }).is_err() {
                        return;
                    }
                }
            }
        }
    });
    (receiver, reader)
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<SseEvent>) -> SseEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event within the wait")
        .expect("the stream is open")
}

/// Checks a `Backbone-Signature` header independently of the worker's code: HMAC-SHA256 keyed
/// with the secret over `<t>.<body>`, hex, with a recent timestamp.
fn signature_is_valid(header: &str, body: &[u8]) -> bool {
    let fields: BTreeMap<&str, &str> = header
        .split(',')
        .filter_map(|part| part.split_once('='))
        .collect();
    let (Some(t), Some(v1)) = (fields.get("t"), fields.get("v1")) else {
        return false;
    };
    let Ok(timestamp) = t.parse::<i64>() else {
        return false;
    };
    let Ok(expected) = hex::decode(v1) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    (chrono::Utc::now().timestamp() - timestamp).abs() < 300 && mac.verify_slice(&expected).is_ok()
}

/// A positive marker for the checks that nothing was sent again: an order placed for `customer`
/// (confirmed by the test, or by the order flow when `confirm` is false), whose
/// `order_confirmed` webhook the receiver then gets. The worker sends in notification order,
/// so once the marker is in, every round that could have sent an earlier one again has run.
async fn webhook_marker(
    client: &reqwest::Client,
    api: &str,
    customer: Uuid,
    inbox: &Inbox,
    confirm: bool,
) -> String {
    let order_id = place_request(client, api, &order_request(customer)).await;
    if confirm {
        act(
            client,
            api,
            &order_id,
            json!({"action": "confirm_payment", "payment_reference": "marker"}),
        )
        .await;
    }
    eventually(WAIT, "the marker's webhook", || async {
        inbox
            .lock()
            .expect("inbox")
            .iter()
            .any(|(_, _, body)| {
                serde_json::from_slice::<Value>(body)
                    .is_ok_and(|posted| posted["order_id"] == json!(order_id))
            })
            .then_some(())
    })
    .await;
    order_id
}

/// The notification ids the receiver got, in arrival order.
fn received_ids(inbox: &Inbox) -> Vec<String> {
    inbox
        .lock()
        .expect("inbox")
        .iter()
        .map(|(_, id, _)| id.clone())
        .collect()
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

/// (id of the event, its type) of the notifying events: the order's confirmation, departure
/// and delivery, and the points the customer earned, as the event store has them.
async fn notifying_events(env: &TestEnv, order_id: &str, customer: Uuid) -> Vec<(Uuid, String)> {
    sqlx::query_as(
        "SELECT event_id, event_type FROM events \
         WHERE (aggregate_type = 'order' AND aggregate_id = $1 \
                AND event_type IN ('OrderConfirmed', 'OrderOutForDelivery', 'OrderDelivered')) \
            OR (aggregate_type = 'rewards' AND aggregate_id = $2 AND event_type = 'PointsEarned') \
         ORDER BY aggregate_type, sequence",
    )
    .bind(order_id)
    .bind(customer.to_string())
    .fetch_all(env.pool())
    .await
    .expect("events")
}

/// Every partition of the order and rewards topics has been consumed to its end by `group`
/// (blocking: librdkafka's calls are synchronous).
fn group_consumed_everything(kafka: &streams::KafkaConfig, group: &str) -> bool {
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", group)
        .create()
        .expect("consumer");
    let topics = kafka.topics();
    let mut partitions = TopicPartitionList::new();
    for aggregate in ["order", "rewards"] {
        let topic = topics.for_aggregate(aggregate).expect("topic");
        for partition in 0..kafka.kafka_partitions {
            partitions.add_partition(&topic, partition);
        }
    }
    let Ok(committed) = consumer.committed_offsets(partitions, Duration::from_secs(5)) else {
        return false;
    };
    committed.elements().iter().all(|element| {
        let Ok((_, high)) =
            consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(5))
        else {
            return false;
        };
        match element.offset() {
            Offset::Offset(offset) => offset >= high,
            _ => high == 0,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_notifies_its_customer_in_order_once_by_list_stream_and_webhook() {
    let env = TestEnv::start("notify").await;
    let relay = env.start_relay().await;
    let projector = start_projector(&env, env.group_prefix.clone()).await;
    let (hook_url, inbox, receiver) = start_receiver(StatusCode::OK).await;
    let notifier = start_notifier(&env, &hook_url).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let customer = Uuid::new_v4();

    // Connected before anything happens: sees the notifications as they come.
    let (mut live, live_reader) = open_stream(&client, &api, customer, None).await;

    let order_id = place_request(&client, &api, &order_request(customer)).await;
    for action in [
        json!({"action": "confirm_payment", "payment_reference": "p-1"}),
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
        json!({"action": "start_preparation"}),
        json!({"action": "mark_ready"}),
        json!({"action": "hand_to_courier"}),
    ] {
        act(&client, &api, &order_id, action).await;
    }
    let delivered: Value = client
        .post(format!("{api}/orders/{order_id}/actions"))
        .json(&json!({"action": "mark_delivered"}))
        .send()
        .await
        .expect("delivered")
        .json()
        .await
        .expect("json");
    let position = delivered["position"]["token"]
        .as_str()
        .expect("a position token")
        .to_owned();

    // Read-your-writes: with the command's position, the delivery is already listed.
    let (status, page) = get_json(
        &client,
        &format!("{api}/customers/{customer}/notifications?position={position}"),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let kinds: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|n| n["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "order_confirmed",
            "order_out_for_delivery",
            "order_delivered"
        ]
    );

    // The order flow captures the payment, completes the order and earns the points.
    let flow = start_flow(&env).await;

    // Expected, from the event store and the catalogue: one notification per notifying event.
    let expected = eventually(WAIT, "the points to be earned", || async {
        let events = notifying_events(&env, &order_id, customer).await;
        (events.len() == 4).then_some(events)
    })
    .await;
    let expected_kinds = [
        ("OrderConfirmed", "order_confirmed"),
        ("OrderOutForDelivery", "order_out_for_delivery"),
        ("OrderDelivered", "order_delivered"),
        ("PointsEarned", "points_earned"),
    ];
    let expected: Vec<(Uuid, &str)> = expected
        .iter()
        .map(|(id, event_type)| {
            let kind = expected_kinds
                .iter()
                .find(|(t, _)| t == event_type)
                .map(|(_, k)| *k)
                .expect("a notifying event type");
            (*id, kind)
        })
        .collect();
    let total: i64 = sqlx::query_scalar(
        "SELECT (payload->'OrderPlaced'->'total'->>'minor')::bigint FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("placed total");
    let uk = domain::RegionCode::parse("uk").expect("region");
    let rate = i64::from(Catalogue::demo().expect("catalogue").regions[&uk].points_per_100_minor);
    let points = total * rate / 100;
    assert!(points > 0);

    // The list, oldest first, exactly the expected notifications.
    let list = eventually(WAIT, "four notifications", || async {
        let (_, page) = get_json(
            &client,
            &format!("{api}/customers/{customer}/notifications"),
        )
        .await;
        let items = page["items"].as_array()?.clone();
        (items.len() == 4).then_some((items, page["next_cursor"].clone()))
    })
    .await;
    let (items, next_cursor) = list;
    assert_eq!(next_cursor, Value::Null, "one page");
    let got: Vec<(Uuid, &str)> = items
        .iter()
        .map(|n| {
            (
                n["event_id"]
                    .as_str()
                    .and_then(|e| e.parse().ok())
                    .expect("event id"),
                n["kind"].as_str().expect("kind"),
            )
        })
        .collect();
    assert_eq!(got, expected);
    let ids: Vec<i64> = items
        .iter()
        .map(|n| n["id"].as_i64().expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    for item in &items {
        assert_eq!(item["customer_id"], json!(customer));
        assert_eq!(item["order_id"], json!(order_id));
    }
    for item in &items[..3] {
        assert_eq!(item["payload"]["order_id"], json!(order_id));
        assert_eq!(item["payload"]["total"]["minor"], json!(total));
    }
    assert_eq!(items[0]["payload"]["status"], "Confirmed");
    assert_eq!(items[1]["payload"]["status"], "OutForDelivery");
    assert_eq!(items[2]["payload"]["status"], "Delivered");
    assert_eq!(items[3]["payload"]["points"], json!(points));
    assert_eq!(items[3]["payload"]["order_total"]["minor"], json!(total));

    // Pages of two, by cursor, give the same; and a kind filter.
    let (_, first) = get_json(
        &client,
        &format!("{api}/customers/{customer}/notifications?limit=2"),
    )
    .await;
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, second) = get_json(
        &client,
        &format!("{api}/customers/{customer}/notifications?limit=2&cursor={cursor}"),
    )
    .await;
    assert_eq!(second["next_cursor"], Value::Null);
    let paged: Vec<Value> = [first, second]
        .iter()
        .flat_map(|p| p["items"].as_array().expect("items").clone())
        .collect();
    assert_eq!(paged, items);
    let (_, points_only) = get_json(
        &client,
        &format!("{api}/customers/{customer}/notifications?kind=points_earned"),
    )
    .await;
    assert_eq!(points_only["items"], json!([items[3]]));

    // The stream opened before the order saw each notification live, in order, as listed.
    let mut streamed = Vec::new();
    for _ in 0..4 {
        streamed.push(next_event(&mut live).await);
    }
    for (event, item) in streamed.iter().zip(&items) {
        assert_eq!(Some(event.id), item["id"].as_i64());
        assert_eq!(Some(event.event.as_str()), item["kind"].as_str());
        assert_eq!(&event.data, item);
    }
    live_reader.abort();

    // Reconnecting after the second resumes with the third: no repeats, nothing missing.
    let (mut resumed, resumed_reader) = open_stream(&client, &api, customer, Some(ids[1])).await;
    let third = next_event(&mut resumed).await;
    let fourth = next_event(&mut resumed).await;
    assert_eq!((third.id, fourth.id), (ids[2], ids[3]));
    // Past a fallback re-read (every 2 s), nothing more arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(2_500), resumed.recv())
            .await
            .is_err(),
        "no repeats after resuming"
    );
    resumed_reader.abort();

    // The webhook got each notification once, signed, with the listed body.
    let received = eventually(WAIT, "four webhooks", || async {
        let received = inbox.lock().expect("inbox").clone();
        (received.len() >= 4).then_some(received)
    })
    .await;
    assert_eq!(received.len(), 4);
    for ((signature, id_header, body), item) in received.iter().zip(&items) {
        assert!(signature_is_valid(signature, body), "signature {signature}");
        let posted: Value = serde_json::from_slice(body).expect("JSON body");
        assert_eq!(&posted, item);
        assert_eq!(id_header, &item["id"].to_string());
    }
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM notifications.webhook_deliveries \
         WHERE status = 'delivered' AND http_status = 200 AND delivered_at IS NOT NULL",
    )
    .fetch_one(env.pool())
    .await
    .expect("deliveries");
    assert_eq!(delivered, 4);

    // Replay: a projector with a fresh consumer group re-reads both topics from offset 0 into
    // the same schema. No new record, no new webhook.
    projector.stop().await.expect("projector stops");
    let replay_prefix = format!("{}replay-", env.group_prefix);
    let replay = start_projector(&env, replay_prefix.clone()).await;
    let group = format!("{replay_prefix}notifications");
    eventually(WAIT, "the replay to reach the end of the topics", || {
        let (kafka, group) = (env.kafka.clone(), group.clone());
        async move {
            tokio::task::spawn_blocking(move || group_consumed_everything(&kafka, &group))
                .await
                .ok()?
                .then_some(())
        }
    })
    .await;
    let records: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications.records")
        .fetch_one(env.pool())
        .await
        .expect("records");
    assert_eq!(records, 4);
    let (_, after_replay) = get_json(
        &client,
        &format!("{api}/customers/{customer}/notifications"),
    )
    .await;
    assert_eq!(after_replay["items"], json!(items));
    // Still one webhook per notification, once a notification made after the replay is in.
    let sent = received_ids(&inbox);
    webhook_marker(&client, &api, customer, &inbox, false).await;
    let mut expected_ids = sent.clone();
    expected_ids.push(received_ids(&inbox).last().expect("the marker").clone());
    assert_eq!(received_ids(&inbox), expected_ids, "nothing sent again");

    // A read model rebuilt from scratch has its records unclaimed again: the delivery log
    // (keyed by customer and event) still keeps them from being sent twice.
    sqlx::query("UPDATE notifications.records SET webhook_claimed = false")
        .execute(env.pool())
        .await
        .expect("unclaimed");
    eventually(WAIT, "the worker to claim the records again", || async {
        let unclaimed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notifications.records WHERE NOT webhook_claimed",
        )
        .fetch_one(env.pool())
        .await
        .ok()?;
        (unclaimed == 0).then_some(())
    })
    .await;
    // Once a later notification is in, the earlier ones were not sent again.
    webhook_marker(&client, &api, customer, &inbox, false).await;
    let mut again = expected_ids.clone();
    again.push(received_ids(&inbox).last().expect("the marker").clone());
    assert_eq!(received_ids(&inbox), again, "nothing sent again");

    server.stop().await.expect("api stops");
    replay.stop().await.expect("replay stops");
    flow.stop().await.expect("flow stops");
    notifier.stop().await.expect("notifier stops");
    receiver.stop().await.expect("receiver stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_webhook_is_recorded_listed_and_not_resent_and_bad_parameters_are_400() {
    let env = TestEnv::start("notifyfail").await;
    let relay = env.start_relay().await;
    let projector = start_projector(&env, env.group_prefix.clone()).await;
    let (hook_url, inbox, receiver) = start_receiver(StatusCode::SERVICE_UNAVAILABLE).await;
    let notifier = start_notifier(&env, &hook_url).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let customer = Uuid::new_v4();

    let order_id = place_request(&client, &api, &order_request(customer)).await;
    act(
        &client,
        &api,
        &order_id,
        json!({"action": "confirm_payment", "payment_reference": "p-2"}),
    )
    .await;

    let failures = eventually(WAIT, "the failed delivery to be listed", || async {
        let (status, page) = get_json(
            &client,
            &format!("{api}/admin/notifications/webhook-failures"),
        )
        .await;
        assert_eq!(status, 200);
        let items = page["items"].as_array()?.clone();
        (!items.is_empty()).then_some(items)
    })
    .await;
    assert_eq!(failures.len(), 1);
    let failure = &failures[0];
    assert_eq!(failure["http_status"], 503);
    assert_eq!(failure["customer_id"], json!(customer));
    assert_eq!(failure["order_id"], json!(order_id));
    assert_eq!(failure["kind"], "order_confirmed");
    // At most once: once a later notification has been sent (and failed too), the receiver
    // still got the first only once.
    let first = received_ids(&inbox);
    assert_eq!(first.len(), 1);
    webhook_marker(&client, &api, customer, &inbox, true).await;
    let received = inbox.lock().expect("inbox").clone();
    assert_eq!(received.len(), 2, "the failed one was not sent again");
    assert_eq!(received[0].1, first[0]);
    assert!(signature_is_valid(&received[0].0, &received[0].2));
    // The customer still sees it.
    let (_, page) = get_json(
        &client,
        &format!("{api}/customers/{customer}/notifications"),
    )
    .await;
    assert_eq!(page["items"][0]["id"], failure["notification_id"]);

    // Client mistakes: 400 problem documents naming the parameter.
    let base = format!("{api}/customers/{customer}/notifications");
    for (url, names) in [
        (format!("{base}?limit=0"), "limit"),
        (format!("{base}?limit=501"), "limit"),
        (format!("{base}?cursor=abc"), "cursor"),
        (format!("{base}?kind=order_placed"), "kind"),
        (format!("{base}?colour=red"), "colour"),
        (format!("{base}?position=nonsense"), "position"),
        (
            format!("{api}/customers/not-a-uuid/notifications"),
            "customer_id",
        ),
        (format!("{base}/stream?after=999999999"), "after"),
        (format!("{base}/stream?after=-3"), "after"),
        (
            format!("{api}/admin/notifications/webhook-failures?limit=900"),
            "limit",
        ),
    ] {
        let response = client.get(&url).send().await.expect("sent");
        assert_eq!(response.status().as_u16(), 400, "{url}");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{url}"
        );
        let problem: Value = response.json().await.expect("problem");
        let detail = problem["detail"].as_str().expect("detail");
        assert!(detail.contains(names), "{url}: {detail}");
    }
    let response = client
        .get(format!("{base}/stream"))
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 400);

    // Documented, with their parameters.
    let (_, document) = get_json(&client, &format!("{api}/openapi.json")).await;
    let paths = &document["paths"];
    let list = &paths["/customers/{customer_id}/notifications"]["get"];
    let names: Vec<&str> = list["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in ["customer_id", "cursor", "limit", "kind", "position"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    assert!(paths["/customers/{customer_id}/notifications/stream"]["get"].is_object());
    assert!(paths["/admin/notifications/webhook-failures"]["get"].is_object());

    server.stop().await.expect("api stops");
    notifier.stop().await.expect("notifier stops");
    receiver.stop().await.expect("receiver stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
