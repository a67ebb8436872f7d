//! The consumer runtime and the query API around every read model: poison records and their
//! re-drive, a partition replayed from offset 0, read-your-writes positions and the live
//! tracking stream, all over the real pipeline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::ApiConfig;
use async_trait::async_trait;
use backbone_tests::tools::raw_records;
use backbone_tests::{act, binary_path, eventually, order_request, place_request, TestEnv};
use projections::TrackingProjection;
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::{json, Value};
use sqlx::{Postgres, Transaction};
use streams::consumer::{FirstDelivery, Projection, ProjectionError};
use uuid::Uuid;

/// A read model whose handler fails for the events listed in `flaky.broken` (a bug), until the
/// list is emptied (the fix). It counts every application, so a double one would show.
struct FlakyProjection;

#[async_trait]
impl Projection for FlakyProjection {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order"]
    }
    fn schema_sql(&self) -> &'static str {
        "CREATE SCHEMA IF NOT EXISTS flaky;
         CREATE TABLE IF NOT EXISTS flaky.applied_events (order_id text NOT NULL, sequence bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS flaky.broken (order_id text NOT NULL, sequence bigint NOT NULL);"
    }
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: FirstDelivery<'_>,
    ) -> Result<(), ProjectionError> {
        let sequence = i64::try_from(event.meta.sequence).unwrap_or(i64::MAX);
        let broken: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM flaky.broken WHERE order_id = $1 AND sequence = $2)",
        )
        .bind(&event.meta.aggregate_id)
        .bind(sequence)
        .fetch_one(&mut **tx)
        .await?;
        if broken {
            return Err(ProjectionError::event(format!(
                "handler bug on {} #{sequence}",
                event.meta.aggregate_id
            )));
        }
        sqlx::query("INSERT INTO flaky.applied_events VALUES ($1, $2)")
            .bind(&event.meta.aggregate_id)
            .bind(sequence)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn applied(env: &TestEnv, order_id: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT sequence FROM flaky.applied_events WHERE order_id = $1 ORDER BY sequence",
    )
    .bind(order_id)
    .fetch_all(env.pool())
    .await
    .expect("applied events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_are_dead_lettered_and_redriven_once_after_the_fix() {
    let env = TestEnv::start("poison").await;
    let pool = env.pool().clone();
    let relay = env.start_relay().await;
    streams::consumer::ensure_schema(&FlakyProjection, &pool)
        .await
        .expect("schema");
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();

    // The bug: the handler fails on the first event of one order.
    let victim = place_request(&client, &api, &order_request(Uuid::new_v4())).await;
    sqlx::query("INSERT INTO flaky.broken VALUES ($1, 1)")
        .bind(&victim)
        .execute(&pool)
        .await
        .expect("bug planted");
    let projector = env.start_projector(Arc::new(FlakyProjection)).await;

    // Two records that do not decode: garbage with an event's headers, and garbage without any.
    let topic = env
        .kafka
        .topics()
        .for_aggregate("order")
        .expect("orders topic");
    let producer: FutureProducer = env.kafka.client_config().create().expect("producer");
    let stranger = Uuid::new_v4().to_string();
    let headers = streams::EventMeta {
        event_id: Uuid::new_v4(),
        aggregate_type: "order".to_owned(),
        aggregate_id: stranger.clone(),
        sequence: 1,
        event_type: "OrderPlaced".to_owned(),
        event_version: "1.0".to_owned(),
        ..streams::EventMeta::default()
    }
    .to_headers();
    for record in [
        FutureRecord::to(&topic)
            .key(stranger.as_str())
            .payload("not avro")
            .headers(headers),
        FutureRecord::to(&topic)
            .key("nobody")
            .payload("\u{0}\u{0}\u{0}\u{0}\u{9}garbage"),
    ] {
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("poison produced");
    }

    // Later events are still applied: the victim's own next event, and another order.
    act(
        &client,
        &api,
        &victim,
        json!({"action": "confirm_payment", "payment_reference": "p"}),
    )
    .await;
    let healthy = place_request(&client, &api, &order_request(Uuid::new_v4())).await;
    eventually(Duration::from_secs(60), "later events applied", || async {
        (applied(&env, &victim).await == vec![2] && applied(&env, &healthy).await == vec![1])
            .then_some(())
    })
    .await;

    // The dead letters, with their errors, over HTTP.
    let page = eventually(Duration::from_secs(30), "three dead letters", || async {
        let (status, page) =
            get_json(&client, &format!("{api}/projections/flaky/dead-letters")).await;
        (status == 200 && page["items"].as_array().map(Vec::len) == Some(3)).then_some(page)
    })
    .await;
    let items = page["items"].as_array().expect("items");
    let handler = items
        .iter()
        .find(|d| d["aggregate_id"] == json!(victim))
        .expect("the handler failure is dead-lettered");
    assert_eq!(handler["sequence"], 1);
    assert_eq!(handler["status"], "dead");
    assert!(
        handler["error"]
            .as_str()
            .is_some_and(|e| e.contains("handler bug")),
        "{handler}"
    );
    let undecodable = items
        .iter()
        .find(|d| d["aggregate_id"] == json!(stranger))
        .expect("the undecodable record is dead-lettered under its headers' identity");
    assert!(undecodable["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        items.iter().any(|d| d["aggregate_id"].is_null()),
        "the headerless record"
    );

    // Its copies on the dead-letter topic, with the error.
    let copies = raw_records(&env, &env.kafka.topics().named("dead-letters"), 3).await;
    let errors: Vec<String> = copies
        .iter()
        .filter_map(|m| {
            m.headers()?
                .iter()
                .find(|h| h.key == "dead-letter-error")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .collect();
    assert_eq!(errors.len(), 3, "every copy carries its error");
    assert!(errors.iter().any(|e| e.contains("handler bug")));

    // The lag endpoint knows the read model.
    let (status, model) = get_json(&client, &format!("{api}/projections/flaky")).await;
    assert_eq!(status, 200);
    assert_eq!(model["dead_letters"], 3);

    // The command line lists them too.
    let listed = std::process::Command::new(binary_path("replay-tools"))
        .args(["dead-letters", "list", "flaky", "--status", "dead"])
        .env("DATABASE_URL", &env.database_url)
        .output()
        .expect("replay-tools runs");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 3);

    // Re-driving before the fix fails again and keeps it dead.
    let id = handler["id"].as_i64().expect("id");
    let response = client
        .post(format!("{api}/projections/flaky/dead-letters/{id}/redrive"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 202);
    eventually(Duration::from_secs(30), "the failed re-drive", || async {
        let attempts: i32 = sqlx::query_scalar(
            "SELECT attempts FROM flaky.dead_letters WHERE id = $1 AND status = 'dead'",
        )
        .bind(id)
        .fetch_optional(env.pool())
        .await
        .ok()??;
        (attempts == 2).then_some(())
    })
    .await;

    // The fix, then the re-drive (by the command line): applied once.
    sqlx::query("DELETE FROM flaky.broken")
        .execute(&pool)
        .await
        .expect("fixed");
    let redriven = std::process::Command::new(binary_path("replay-tools"))
        .args(["dead-letters", "redrive", "flaky", &id.to_string()])
        .env("DATABASE_URL", &env.database_url)
        .output()
        .expect("replay-tools runs");
    assert!(
        redriven.status.success(),
        "{}",
        String::from_utf8_lossy(&redriven.stderr)
    );
    eventually(Duration::from_secs(30), "the re-drive", || async {
        (applied(&env, &victim).await == vec![1, 2]).then_some(())
    })
    .await;
    let (_, letter) = get_json(
        &client,
        &format!("{api}/projections/flaky/dead-letters?status=redriven"),
    )
    .await;
    assert_eq!(letter["items"][0]["id"], id);
    // A second re-drive is refused and applies nothing.
    let response = client
        .post(format!("{api}/projections/flaky/dead-letters/{id}/redrive"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 409);
    // The marker that the projector's re-drive loop has run since: a re-drive of the
    // undecodable record, which fails again (its attempts go to 2). Had the refused re-drive
    // been queued, the loop (it drains every request, oldest first) would have served it too.
    let stranger_letter = undecodable["id"].as_i64().expect("id");
    let attempts_before: i32 =
        sqlx::query_scalar("SELECT attempts FROM flaky.dead_letters WHERE id = $1")
            .bind(stranger_letter)
            .fetch_one(env.pool())
            .await
            .expect("attempts");
    let response = client
        .post(format!(
            "{api}/projections/flaky/dead-letters/{stranger_letter}/redrive"
        ))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 202);
    eventually(Duration::from_secs(30), "the marker re-drive", || async {
        let attempts: i32 = sqlx::query_scalar(
            "SELECT attempts FROM flaky.dead_letters WHERE id = $1 AND status = 'dead'",
        )
        .bind(stranger_letter)
        .fetch_optional(env.pool())
        .await
        .ok()??;
        (attempts == attempts_before + 1).then_some(())
    })
    .await;
    assert_eq!(
        applied(&env, &victim).await,
        vec![1, 2],
        "applied exactly once"
    );

    // Bad requests.
    for (url, expected) in [
        (format!("{api}/projections/nope/dead-letters"), 404),
        (
            format!("{api}/projections/flaky/dead-letters?status=zombie"),
            400,
        ),
        (
            format!("{api}/projections/flaky/dead-letters?cursor=x"),
            400,
        ),
        (format!("{api}/projections/flaky/dead-letters?limit=0"), 400),
    ] {
        assert_eq!(
            client
                .get(&url)
                .send()
                .await
                .expect("sent")
                .status()
                .as_u16(),
            expected,
            "{url}"
        );
    }

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

/// The tracking read model as comparable text.
async fn tracking_snapshot(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT row_to_json(o)::text FROM tracking.orders o \
         UNION ALL SELECT row_to_json(t)::text FROM tracking.timeline t \
         UNION ALL SELECT row_to_json(a)::text FROM tracking.applied a ORDER BY 1",
    )
    .fetch_all(env.pool())
    .await
    .expect("snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_the_topics_from_offset_zero_changes_nothing() {
    let env = TestEnv::start("replay").await;
    let relay = env.start_relay().await;
    let mut projector = env.start_projector(Arc::new(TrackingProjection)).await;
    // Beside tracking (whose upserts would hide a double application), a read model that
    // inserts a row per application: a record applied twice shows as two rows.
    let mut flaky = env.start_projector(Arc::new(FlakyProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let mut orders = Vec::new();
    for _ in 0..12 {
        let order = place_request(&client, &api, &order_request(Uuid::new_v4())).await;
        act(
            &client,
            &api,
            &order,
            json!({"action": "confirm_payment", "payment_reference": "p"}),
        )
        .await;
        orders.push(order);
    }
    let topic = env.kafka.topics().for_aggregate("order").expect("topic");
    let deliveries = env.kafka.topics().for_aggregate("delivery").expect("topic");
    let applications = || async {
        let (rows, distinct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (order_id, sequence)) FROM flaky.applied_events",
        )
        .fetch_one(env.pool())
        .await
        .unwrap_or((0, 0));
        (rows, distinct)
    };
    eventually(Duration::from_secs(60), "every order tracked", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tracking.timeline")
            .fetch_one(env.pool())
            .await
            .ok()?;
        (n == 24 && applications().await == (24, 24)).then_some(())
    })
    .await;
    let before = tracking_snapshot(&env).await;
    let ends = env.high_watermarks(&topic);
    assert_eq!(ends.iter().sum::<i64>(), 24, "one record per event");

    // Both projectors stop; their groups are rewound to offset 0 on every partition, for real
    // (on the broker, as `kafka-consumer-groups --reset-offsets --to-earliest` does); they start
    // again and read every record a second time.
    projector.stop().await.expect("projector stops");
    flaky.stop().await.expect("projector stops");
    let tracking_group = env.group_of("tracking");
    let flaky_group = env.group_of("flaky");
    env.rewind_group(&tracking_group, &[topic.clone(), deliveries.clone()])
        .await;
    env.rewind_group(&flaky_group, std::slice::from_ref(&topic))
        .await;
    projector = env.start_projector(Arc::new(TrackingProjection)).await;
    flaky = env.start_projector(Arc::new(FlakyProjection)).await;
    // The positive marker: each group has consumed (and committed) every partition from 0 back
    // to its end, so every record has been through the runtime again.
    for group in [&tracking_group, &flaky_group] {
        eventually(
            Duration::from_secs(60),
            "the groups back at the end of every partition",
            || async { (env.committed_offsets(group, &topic) == ends).then_some(()) },
        )
        .await;
    }
    assert_eq!(
        applications().await,
        (24, 24),
        "every event applied exactly once"
    );
    assert_eq!(
        tracking_snapshot(&env).await,
        before,
        "the replay changed the read model"
    );
    let partition = (0..env.kafka.kafka_partitions)
        .max_by_key(|p| ends[usize::try_from(*p).expect("partition")])
        .expect("a partition");
    let end = ends[usize::try_from(partition).expect("partition")];

    // The order list: pages of 5 walk all twelve orders once, newest first.
    let (mut seen, mut cursor, mut previous) = (Vec::new(), None::<String>, None::<String>);
    loop {
        let url = match &cursor {
            Some(c) => format!("{api}/orders?limit=5&cursor={c}"),
            None => format!("{api}/orders?limit=5"),
        };
        let (status, page) = get_json(&client, &url).await;
        assert_eq!(status, 200, "{page}");
        for order in page["items"].as_array().expect("items") {
            let placed = order["placed_at"].as_str().expect("placed_at").to_owned();
            if let Some(previous) = &previous {
                assert!(placed <= *previous, "newest first");
            }
            previous = Some(placed);
            seen.push(order["order_id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    seen.sort();
    let mut placed = orders.clone();
    placed.sort();
    assert_eq!(seen, placed);
    let (_, first) = get_json(&client, &format!("{api}/orders/{}/tracking", orders[0])).await;
    let (_, mine) = get_json(
        &client,
        &format!(
            "{api}/orders?customer_id={}&status=Confirmed",
            first["customer_id"].as_str().expect("customer")
        ),
    )
    .await;
    assert_eq!(mine["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(mine["items"][0]["order_id"], json!(orders[0]));
    for bad in [
        "status=Lost",
        "cursor=zzz",
        "limit=501",
        "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
        "colour=red",
    ] {
        let (status, problem) = get_json(&client, &format!("{api}/orders?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {problem}");
    }

    // Its lag, as the API shows it (measured every second): every partition of both topics
    // caught up, the busiest one at its end.
    eventually(
        Duration::from_secs(30),
        "lag 0 on every partition",
        || async {
            let (status, model) = get_json(&client, &format!("{api}/projections/tracking")).await;
            let partitions = model["partitions"].as_array()?;
            let replayed = partitions
                .iter()
                .find(|p| p["topic"] == json!(topic) && p["partition"] == partition)?;
            (status == 200
                && partitions.len() == 2 * usize::try_from(env.kafka.kafka_partitions).ok()?
                && model["lag_events"] == 0
                && replayed["high_watermark"] == end
                && replayed["next_offset"] == end)
                .then_some(())
        },
    )
    .await;

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    flaky.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_with_a_position_waits_until_the_read_model_has_it() {
    let env = TestEnv::start("position").await;
    let relay = env.start_relay().await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let placed: Value = client
        .post(format!("{api}/orders"))
        .json(&order_request(Uuid::new_v4()))
        .send()
        .await
        .expect("placed")
        .json()
        .await
        .expect("json");
    let order = placed["order_id"].as_str().expect("id").to_owned();
    let token = placed["position"]["token"]
        .as_str()
        .expect("a position token")
        .to_owned();
    assert_eq!(token, format!("order:{order}:1"));

    // No projector yet: the bounded wait runs out with 503 and Retry-After.
    let started = Instant::now();
    let response = client
        .get(format!("{api}/orders/{order}/tracking?position={token}"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(started.elapsed() >= Duration::from_secs(2), "it waited");

    // The projector starts while a query waits: the query answers with the event in it. On an
    // API that lets a client wait long (no deadline a slow start could miss) and one query at
    // a time: of two identical queries, one waits and the other is refused with 429, which is
    // the proof that the first is waiting before the projector starts.
    let (patient, patient_server) = env
        .start_api_with(ApiConfig {
            api_read_your_writes_wait_ms: 120_000,
            api_max_waits_per_client: 1,
            ..TestEnv::api_config()
        })
        .await;
    let query = || {
        let (client, url) = (
            client.clone(),
            format!("{patient}/orders/{order}/tracking?position={token}"),
        );
        tokio::spawn(async move { get_json(&client, &url).await })
    };
    let (mut first, mut second) = (query(), query());
    let waiting = tokio::select! {
            answer = &mut first => {
                let (status, refused) = answer.expect("query task");
                assert_eq!(status, 429, "{refused}");
                second
            }
            answer = &mut second => {
                let (status, refused) = answer.expect("query task");
                assert_eq!(status, 429, "{refused}");
                first
            }
    };
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let (status, view) = waiting.await.expect("query task");
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "Placed");

    // A later command's position: the answer includes that command's event.
    let confirmed: Value = client
        .post(format!("{api}/orders/{order}/actions"))
        .json(&json!({"action": "confirm_payment", "payment_reference": "p"}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let token = confirmed["position"]["token"].as_str().expect("token");
    let (status, view) = get_json(
        &client,
        &format!("{api}/orders/{order}/tracking?position={token}"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(view["status"], "Confirmed", "read your own write");

    // Positions the view cannot follow, or that are not positions.
    for bad in ["nonsense", "order:x:zero", "planet:1:1", "rewards:abc:1"] {
        let (status, problem) = get_json(
            &client,
            &format!("{api}/orders/{order}/tracking?position={bad}"),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {problem}");
    }

    server.stop().await.expect("api stops");
    patient_server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

/// Reads server-sent events from `response` until `enough` says so: (id, event, data).
async fn read_events(
    response: &mut reqwest::Response,
    timeout: Duration,
    mut enough: impl FnMut(&[(Option<String>, String, Value)]) -> bool,
) -> Vec<(Option<String>, String, Value)> {
    let deadline = Instant::now() + timeout;
    let (mut buffer, mut events) = (String::new(), Vec::new());
    while !enough(&events) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out; events so far: {events:?}");
        let Ok(chunk) = tokio::time::timeout(left, response.chunk()).await else {
            continue;
        };
        let chunk = chunk.expect("stream readable").expect("stream open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut id, mut kind, mut data) = (None, String::from("message"), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !data.is_empty() {
                events.push((id, kind, serde_json::from_str(&data).expect("json data")));
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tracking_stream_shows_the_status_changes_in_order() {
    let env = TestEnv::start("stream").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let order = place_request(&client, &api, &order_request(Uuid::new_v4())).await;
    let mut stream = client
        .get(format!("{api}/orders/{order}/tracking/stream"))
        .send()
        .await
        .expect("stream opened");
    assert_eq!(stream.status().as_u16(), 200);
    assert!(stream
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    for action in [
        json!({"action": "confirm_payment", "payment_reference": "p"}),
        json!({"action": "accept", "estimated_preparation_minutes": 10}),
        json!({"action": "start_preparation"}),
        json!({"action": "mark_ready"}),
        json!({"action": "hand_to_courier"}),
        json!({"action": "mark_delivered"}),
    ] {
        act(&client, &api, &order, action).await;
    }
    let expected = [
        "Placed",
        "Confirmed",
        "Accepted",
        "Preparing",
        "Ready",
        "OutForDelivery",
        "Delivered",
    ];
    let status_events = |events: &[(Option<String>, String, Value)]| -> Vec<(String, String)> {
        events
            .iter()
            .filter(|(_, kind, _)| kind == "status")
            .map(|(id, _, data)| {
                (
                    id.clone().unwrap_or_default(),
                    data["status"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let events = read_events(&mut stream, Duration::from_secs(60), |events| {
        status_events(events).len() >= expected.len()
    })
    .await;
    let seen = status_events(&events);
    let statuses: Vec<&str> = seen.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(statuses, expected, "in order, each once");
    let ids: Vec<String> = seen.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, (1..=7).map(|i| i.to_string()).collect::<Vec<_>>());
    drop(stream);

    // A client reconnecting with Last-Event-ID gets only what it missed.
    let mut resumed = client
        .get(format!("{api}/orders/{order}/tracking/stream"))
        .header("Last-Event-ID", "5")
        .send()
        .await
        .expect("stream reopened");
    let events = read_events(&mut resumed, Duration::from_secs(30), |events| {
        status_events(events).len() >= 2
    })
    .await;
    let seen: Vec<String> = status_events(&events).into_iter().map(|(_, s)| s).collect();
    assert_eq!(seen, ["OutForDelivery", "Delivered"]);

    let response = client
        .get(format!("{api}/orders/{order}/tracking/stream"))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 400);

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
