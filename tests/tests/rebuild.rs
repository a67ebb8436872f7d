//! Rebuilding read models with `replay-tools` run as a user runs it (a child process): during
//! live traffic and swapped in, with the live projector going on exactly once whether its
//! consumer group is ahead of the rebuild or behind it; interrupted with SIGINT and resumed;
//! as of an instant (a read model and a single aggregate); `check` finding no difference
//! between the live model and a fresh rebuild, and every difference after a tamper.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backbone_tests::tools::cli_command;
use backbone_tests::{
    confirm_payment, eventually, place_order, status_after, KillOnDrop, Running, TestEnv,
};
use chrono::{DateTime, SecondsFormat, Utc};
use projections::{AnalyticsProjection, TrackingProjection};
use serde_json::{json, Value};
use streams::consumer::{apply_replayed, create_tables, ReplayVerdict, ReplayedEvent};
use streams::{DecodedEvent, EventMeta};
use tokio_util::sync::CancellationToken;

/// `replay-tools` configured for this environment, as an operator would run it, its output
/// captured.
fn replay_tools(env: &TestEnv, args: &[&str]) -> Command {
    let mut command = cli_command(env, args, &[]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// Runs `replay-tools` to the end; returns its exit status, stdout and stderr.
async fn run(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let mut command = replay_tools(env, args);
    let output: Output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("joined")
        .unwrap_or_else(|e| panic!("cannot run replay-tools: {e}; run `cargo build --bins` first"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `replay-tools` and expects success; returns stdout.
async fn run_ok(env: &TestEnv, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run(env, args).await;
    assert!(ok, "replay-tools {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// Runs `replay-tools` and expects a failure with a message; returns stderr.
async fn run_err(env: &TestEnv, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run(env, args).await;
    assert!(!ok, "replay-tools {args:?} should fail:\n{stdout}");
    assert!(
        stderr.contains("replay-tools") || stderr.contains("error"),
        "a message on stderr for {args:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Per order in the event store: its last sequence and its status after it (from the test's own
/// table of statuses by event type).
async fn store_orders(env: &TestEnv) -> BTreeMap<String, (i64, String)> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_type FROM events WHERE aggregate_type = 'order' \
         ORDER BY aggregate_id, sequence",
    )
    .fetch_all(env.pool())
    .await
    .expect("events");
    let mut orders = BTreeMap::new();
    for (id, sequence, event_type) in rows {
        let entry = orders.entry(id).or_insert((0, String::new()));
        entry.0 = sequence;
        if let Some(status) = status_after(&event_type) {
            entry.1 = status.to_owned();
        }
    }
    orders
}

/// The analytics read model per order (last sequence applied, status), and its total of the
/// additive hourly `orders` counter (an event applied twice would show there).
async fn analytics_view(env: &TestEnv) -> (BTreeMap<String, (i64, String)>, i64) {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT o.order_id, a.last_sequence, o.status FROM analytics.orders o \
         JOIN analytics.applied a ON a.aggregate_type = 'order' AND a.aggregate_id = o.order_id",
    )
    .fetch_all(env.pool())
    .await
    .unwrap_or_default();
    let counted: Option<i64> =
        sqlx::query_scalar("SELECT sum(orders)::bigint FROM analytics.hourly")
            .fetch_one(env.pool())
            .await
            .unwrap_or(None);
    (
        rows.into_iter().map(|(id, s, st)| (id, (s, st))).collect(),
        counted.unwrap_or(0),
    )
}

/// Waits until the analytics read model shows exactly the orders of the event store, each
/// counted once.
async fn analytics_matches_the_store(env: &TestEnv, what: &str) -> usize {
    let expected = store_orders(env).await;
    let (view, counted) = eventually(Duration::from_secs(60), what, || async {
        let (view, counted) = analytics_view(env).await;
        (view == expected).then_some((view, counted))
    })
    .await;
    assert_eq!(
        counted,
        i64::try_from(view.len()).expect("count"),
        "each order counted once in analytics.hourly"
    );
    view.len()
}

/// Orders placed (half of them confirmed) every few milliseconds until `stop`.
fn traffic(env: &TestEnv, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    let orders = env.orders();
    tokio::spawn(async move {
        let mut placed = 0;
        while !stop.load(Ordering::Relaxed) {
            let id = place_order(&orders).await;
            if placed % 2 == 0 {
                confirm_payment(&orders, &id, format!("p{placed}")).await;
            }
            placed += 1;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        placed
    })
}

async fn published(env: &TestEnv) {
    eventually(Duration::from_secs(60), "the relay to publish", || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(env.pool())
                .await
                .unwrap_or(1);
        (left == 0).then_some(())
    })
    .await;
}

async fn schema_exists(env: &TestEnv, schema: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(env.pool())
        .await
        .expect("catalog")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_during_live_traffic_is_swapped_in_and_the_live_projector_goes_on_exactly_once() {
    let env = TestEnv::start("rebuild_live").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(AnalyticsProjection)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = traffic(&env, stop.clone());
    eventually(
        Duration::from_secs(60),
        "live analytics under way",
        || async {
            let (view, _) = analytics_view(&env).await;
            (view.len() >= 40).then_some(())
        },
    )
    .await;

    // Rebuilt from the topics and swapped in while orders keep coming and the live projector
    // keeps applying them.
    let report = run_ok(
        &env,
        &["rebuild", "analytics", "--swap", "--batch-size", "50"],
    )
    .await;
    assert!(
        report.contains("rebuilt into analytics__rebuild"),
        "{report}"
    );
    assert!(report.contains("swapped in"), "{report}");
    eprintln!("{report}");
    let old: String = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'analytics\\_\\_old\\_%'",
    )
    .fetch_one(env.pool())
    .await
    .expect("the previous read model is kept");
    assert!(!schema_exists(&env, "analytics__rebuild").await);
    let leftover: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('analytics.rebuild_state')::text")
            .fetch_one(env.pool())
            .await
            .expect("catalog");
    assert_eq!(
        leftover, None,
        "the swapped-in model has no rebuild bookkeeping"
    );

    // Traffic goes on after the swap; then every order is in the new model exactly once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let placed = writer.await.expect("writer");
    let seen = analytics_matches_the_store(&env, "the swapped-in model to catch up").await;
    assert_eq!(seen, placed);

    // A fresh rebuild of the same events equals the live model; so does one from the store.
    run_ok(&env, &["rebuild", "analytics"]).await;
    let checked = run_ok(&env, &["check", "analytics"]).await;
    assert!(checked.contains("no difference"), "{checked}");
    run_ok(
        &env,
        &["rebuild", "analytics", "--source", "store", "--restart"],
    )
    .await;
    let checked = run_ok(&env, &["check", "analytics"]).await;
    assert!(checked.contains("no difference"), "{checked}");
    // The model kept by the swap lacks the orders placed after it: `check` names each.
    let (ok, differences, _) = run(&env, &["check", "analytics", "--against", &old]).await;
    assert!(!ok, "the old model differs");
    let (old_orders,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {old}.orders"))
        .fetch_one(env.pool())
        .await
        .expect("old orders");
    let missing = i64::try_from(placed).expect("count") - old_orders;
    assert!(missing > 0, "orders were placed after the swap");
    let only_live = differences
        .lines()
        .filter(|l| l.starts_with("orders {") && l.contains("only in analytics:"))
        .count();
    assert_eq!(
        i64::try_from(only_live).expect("count"),
        missing,
        "{differences}"
    );

    // A tampered row is reported with its column, and the check fails.
    let victim: String =
        sqlx::query_scalar("SELECT order_id FROM analytics__rebuild.orders LIMIT 1")
            .fetch_one(env.pool())
            .await
            .expect("a rebuilt order");
    sqlx::query(
        "UPDATE analytics__rebuild.orders SET total_minor = total_minor + 1 WHERE order_id = $1",
    )
    .bind(&victim)
    .execute(env.pool())
    .await
    .expect("tampered");
    let (ok, differences, stderr) = run(&env, &["check", "analytics"]).await;
    assert!(!ok);
    assert!(stderr.contains("1 difference between"), "{stderr}");
    let line = differences
        .lines()
        .find(|l| l.contains(&victim))
        .unwrap_or_else(|| panic!("the tampered order is named: {differences}"));
    assert!(
        line.starts_with("orders ") && line.contains("total_minor"),
        "{line}"
    );

    // The other way round: the live projector stopped (its group offset behind), orders
    // placed, a rebuild from the store swapped in ahead of it; restarted, it skips what the
    // rebuilt model has and applies the rest once.
    projector.stop().await.expect("projector stops");
    let orders = env.orders();
    for _ in 0..15 {
        place_order(&orders).await;
    }
    published(&env).await;
    let report = run_ok(
        &env,
        &[
            "rebuild",
            "analytics",
            "--source",
            "store",
            "--restart",
            "--swap",
        ],
    )
    .await;
    assert!(report.contains("swapped in"), "{report}");
    let projector = env.start_projector(Arc::new(AnalyticsProjection)).await;
    for _ in 0..5 {
        place_order(&orders).await;
    }
    let seen = analytics_matches_the_store(&env, "the restarted projector to catch up").await;
    assert_eq!(seen, placed + 20);
    run_ok(&env, &["rebuild", "analytics", "--restart"]).await;
    let checked = run_ok(&env, &["check", "analytics"]).await;
    assert!(checked.contains("no difference"), "{checked}");

    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

/// The tracking read model's orders and timeline, as JSON rows.
/// How many tables of a schema are unlogged, and the names of its indexes.
async fn build_state(env: &TestEnv, schema: &str) -> (i64, BTreeSet<String>) {
    let unlogged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class \
         WHERE relnamespace = to_regnamespace($1) AND relkind = 'r' AND relpersistence = 'u'",
    )
    .bind(schema)
    .fetch_one(env.pool())
    .await
    .expect("tables");
    let indexes: Vec<String> =
        sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE schemaname = $1")
            .bind(schema)
            .fetch_all(env.pool())
            .await
            .expect("indexes");
    (unlogged, indexes.into_iter().collect())
}

async fn tracking_rows(env: &TestEnv, schema: &str) -> (Vec<Value>, Vec<Value>) {
    let orders = sqlx::query_scalar(&format!(
        "SELECT to_jsonb(o) FROM {schema}.orders o ORDER BY order_id"
    ))
    .fetch_all(env.pool())
    .await
    .expect("orders");
    let timeline = sqlx::query_scalar(&format!(
        "SELECT to_jsonb(t) FROM {schema}.timeline t ORDER BY order_id, sequence"
    ))
    .fetch_all(env.pool())
    .await
    .expect("timeline");
    (orders, timeline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_rebuild_resumes_where_it_stopped_with_the_same_result() {
    let env = TestEnv::start("rebuild_resume").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let orders = env.orders();
    for i in 0..300 {
        let id = place_order(&orders).await;
        if i % 2 == 0 {
            confirm_payment(&orders, &id, format!("p{i}")).await;
        }
    }
    published(&env).await;
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'order'")
            .fetch_one(env.pool())
            .await
            .expect("events");
    eventually(
        Duration::from_secs(60),
        "live tracking caught up",
        || async {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT sum(last_sequence)::bigint FROM tracking.applied")
                    .fetch_one(env.pool())
                    .await
                    .unwrap_or(None);
            (applied == Some(total)).then_some(())
        },
    )
    .await;
    projector.stop().await.expect("projector stops");

    // Small batches, so that it is demonstrably mid-way when SIGINT arrives.
    let mut command = replay_tools(&env, &["rebuild", "tracking", "--batch-size", "3"]);
    let child = command.spawn().expect("replay-tools starts");
    let pid = child.id().to_string();
    eventually(Duration::from_secs(30), "the rebuild under way", || async {
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT applied FROM tracking__rebuild.rebuild_state")
                .fetch_one(env.pool())
                .await
                .ok();
        (applied.unwrap_or(0) > 30).then_some(())
    })
    .await;
    let signalled = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill runs");
    assert!(signalled.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("joined")
        .expect("replay-tools exits");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "an interrupted rebuild is not a success"
    );
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("interrupted rebuild"), "{stdout}");
    let applied: i64 = sqlx::query_scalar("SELECT applied FROM tracking__rebuild.rebuild_state")
        .fetch_one(env.pool())
        .await
        .expect("the shadow keeps its state");
    assert!(
        applied > 0 && applied < total,
        "stopped mid-way: {applied} of {total}"
    );
    // What it applied is exactly what its checkpoints cover: every applied sequence is the
    // aggregate's prefix, and the rows agree with it.
    let shadow_sequences: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(last_sequence), 0)::bigint FROM tracking__rebuild.applied",
    )
    .fetch_one(env.pool())
    .await
    .expect("applied");
    assert_eq!(shadow_sequences, applied);
    // Mid-way the shadow is a bulk load: unlogged, without the indexes only queries use.
    let (unlogged, indexes) = build_state(&env, "tracking__rebuild").await;
    assert!(unlogged >= 3, "{unlogged} unlogged tables");
    assert!(!indexes.contains("tracking_orders_customer"), "{indexes:?}");
    assert!(indexes.contains("orders_pkey"), "{indexes:?}");

    // Not resumed by accident: a plain rebuild refuses to start over it.
    let refused = run_err(&env, &["rebuild", "tracking"]).await;
    assert!(refused.contains("--resume"), "{refused}");
    run_err(
        &env,
        &["rebuild", "tracking", "--resume", "--source", "store"],
    )
    .await;

    let report = run_ok(&env, &["rebuild", "tracking", "--resume"]).await;
    assert!(
        report.contains("rebuilt into tracking__rebuild"),
        "{report}"
    );
    let applied: i64 = sqlx::query_scalar("SELECT applied FROM tracking__rebuild.rebuild_state")
        .fetch_one(env.pool())
        .await
        .expect("state");
    assert_eq!(applied, total, "every event applied once over both runs");
    let checked = run_ok(&env, &["check", "tracking"]).await;
    assert!(checked.contains("no difference"), "{checked}");
    assert_eq!(
        tracking_rows(&env, "tracking__rebuild").await,
        tracking_rows(&env, "tracking").await
    );
    // Done: durable, and indexed as the live model is.
    let (unlogged, indexes) = build_state(&env, "tracking__rebuild").await;
    assert_eq!(unlogged, 0);
    let mut live_indexes = build_state(&env, "tracking").await.1;
    live_indexes.insert("rebuild_state_pkey".to_owned());
    assert_eq!(indexes, live_indexes);

    relay.stop().await.expect("relay stops");
    env.stop().await;
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as_of_an_instant_between_two_events_shows_the_state_before_the_later_one() {
    let env = TestEnv::start("rebuild_asof").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let orders = env.orders();
    let earlier = place_order(&orders).await;
    let order = place_order(&orders).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    confirm_payment(&orders, &order, "p".to_owned()).await;
    let later = place_order(&orders).await;
    published(&env).await;

    let events: Vec<(i64, DateTime<Utc>, Value)> = sqlx::query_as(
        "SELECT sequence, recorded_at, payload::jsonb FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(&order)
    .fetch_all(env.pool())
    .await
    .expect("events");
    assert_eq!(events.len(), 2);
    let (first, second) = (&events[0], &events[1]);
    let instant = first.1 + (second.1 - first.1) / 2;
    assert!(first.1 < instant && instant < second.1);
    let types: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(&order)
    .fetch_all(env.pool())
    .await
    .expect("event types");
    let status_of = |event_type: &str| status_after(event_type).expect("a status change");
    let (before, after) = (status_of(&types[0]), status_of(&types[1]));
    assert_ne!(before, after);
    eventually(
        Duration::from_secs(60),
        "live tracking caught up",
        || async {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM tracking.orders WHERE order_id = $1")
                    .bind(&order)
                    .fetch_optional(env.pool())
                    .await
                    .unwrap_or(None);
            (status.as_deref() == Some(after)).then_some(())
        },
    )
    .await;

    // The read model as of the instant, from the topics and from the store: the order before
    // its later event, the order placed earlier, not the one placed later.
    let at = rfc3339(instant);
    let mut seen = Vec::new();
    for source in ["topics", "store"] {
        let report = run_ok(
            &env,
            &[
                "rebuild",
                "tracking",
                "--source",
                source,
                "--as-of",
                &at,
                "--restart",
            ],
        )
        .await;
        if source == "topics" {
            // The topics hold the later events too: read, and left out.
            assert!(
                report.contains("recorded after the as-of instant"),
                "{report}"
            );
        }
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT order_id, status, last_sequence FROM tracking__rebuild.orders ORDER BY order_id",
        )
        .fetch_all(env.pool())
        .await
        .expect("rows");
        let mut expected = vec![
            (earlier.clone(), before.to_owned(), 1),
            (order.clone(), before.to_owned(), 1),
        ];
        expected.sort();
        assert_eq!(rows, expected, "as of {at} from the {source}");
        assert!(!rows.iter().any(|(id, _, _)| *id == later));
        seen.push(tracking_rows(&env, "tracking__rebuild").await);
    }
    assert_eq!(
        seen[0], seen[1],
        "the topics and the store give the same past"
    );
    // A past state differs from the live model, and is never swapped in.
    let (ok, _, _) = run(&env, &["check", "tracking"]).await;
    assert!(!ok);
    let refused = run_err(&env, &["rebuild", "tracking", "--resume", "--swap"]).await;
    assert!(refused.contains("never swapped in"), "{refused}");
    run_err(&env, &["rebuild", "tracking", "--as-of", &at, "--swap"]).await;

    // One aggregate as of the instant, and now.
    let printed = run_ok(&env, &["as-of", "order", &order, &at]).await;
    let state: Value = serde_json::from_str(&printed).expect("JSON");
    assert_eq!(state["sequence"], 1, "{printed}");
    assert_eq!(state["later_events"], 1, "{printed}");
    assert_eq!(state["state"]["status"], json!(before));
    let placed: Value = first.2["OrderPlaced"].clone();
    assert_eq!(state["state"]["total"], placed["total"], "{printed}");
    let now = rfc3339(Utc::now());
    let printed = run_ok(&env, &["as-of", "order", &order, &now]).await;
    let state: Value = serde_json::from_str(&printed).expect("JSON");
    assert_eq!(state["sequence"], 2);
    assert_eq!(state["state"]["status"], json!(after));

    // Mistakes a user can make: a clear message and a non-zero exit.
    let too_early = rfc3339(first.1 - chrono::Duration::seconds(1));
    let message = run_err(&env, &["as-of", "order", &order, &too_early]).await;
    assert!(message.contains("did not exist yet"), "{message}");
    let message = run_err(&env, &["as-of", "order", "no-such-order", &now]).await;
    assert!(message.contains("no order"), "{message}");
    let message = run_err(&env, &["as-of", "invoice", &order, &now]).await;
    assert!(message.contains("unknown aggregate type"), "{message}");
    let message = run_err(&env, &["as-of", "order", &order, "yesterday"]).await;
    assert!(message.contains("RFC 3339"), "{message}");
    let message = run_err(&env, &["rebuild", "invoices"]).await;
    assert!(message.contains("unknown read model"), "{message}");
    let message = run_err(
        &env,
        &["rebuild", "tracking", "--as-of", "noon", "--restart"],
    )
    .await;
    assert!(message.contains("RFC 3339"), "{message}");
    let message = run_err(
        &env,
        &["check", "tracking", "--against", "tracking__nothing"],
    )
    .await;
    assert!(message.contains("no schema tracking__nothing"), "{message}");
    run_err(&env, &["rebuild", "tracking", "--batch-size", "0"]).await;
    run_err(&env, &["rebuild", "ratings", "--resume"]).await;

    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

/// A webhook receiver on an ephemeral port: records each request's notification id, then
/// answers 200, or never answers while `hang` is set. Returns its URL and what it got.
async fn start_receiver(hang: Arc<AtomicBool>) -> (String, Arc<Mutex<Vec<String>>>, Running) {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let (sink, hang) = (sink.clone(), hang.clone());
            async move {
                let id = headers
                    .get(projections::notifier::ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                sink.lock().expect("inbox").push(id);
                if hang.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                axum::http::StatusCode::OK
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
    (url, got, Running { token, handle })
}

/// The webhook log: (notification id, status) by notification id.
async fn webhook_log(env: &TestEnv) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT notification_id, status FROM notifications.webhook_deliveries \
         ORDER BY notification_id",
    )
    .fetch_all(env.pool())
    .await
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_swap_carries_the_notification_webhook_log_over_so_nothing_is_sent_twice() {
    let env = TestEnv::start("rebuild_notify").await;
    let relay = env.start_relay().await;
    let hang = Arc::new(AtomicBool::new(true));
    let (url, got, receiver) = start_receiver(hang.clone()).await;
    let settings = [
        ("PROJECTIONS", "notifications"),
        ("NOTIFICATIONS_WEBHOOK_URL", url.as_str()),
        (
            "NOTIFICATIONS_WEBHOOK_SECRET",
            "rebuild-test-webhook-secret",
        ),
        ("NOTIFICATIONS_WEBHOOK_POLL_MS", "100"),
    ];
    let orders = env.orders();
    let mut projector = KillOnDrop(env.spawn_process("projector", &settings));

    // The worker's state is the real worker's. First a crash: the projector process (with its
    // webhook worker) is killed with SIGKILL while its POST of the first notification is in
    // flight, the claim and its `sending` log row committed before it.
    let id = place_order(&orders).await;
    confirm_payment(&orders, &id, "p0".to_owned()).await;
    let in_flight = eventually(Duration::from_secs(60), "the first POST", || async {
        let got = got.lock().expect("inbox").clone();
        (got.len() == 1).then(|| got[0].clone())
    })
    .await;
    assert_eq!(
        webhook_log(&env).await,
        [(in_flight.parse().expect("an id"), "sending".to_owned())],
        "claimed and logged before the POST"
    );
    projector.0.kill().expect("SIGKILL");
    projector.0.wait().expect("reaped");
    hang.store(false, Ordering::SeqCst);

    // A new process delivers the next three (and never the one lost in the crash).
    let projector = KillOnDrop(env.spawn_process("projector", &settings));
    for i in 1..4 {
        let id = place_order(&orders).await;
        confirm_payment(&orders, &id, format!("p{i}")).await;
    }
    eventually(Duration::from_secs(60), "three more webhooks", || async {
        let delivered: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notifications.webhook_deliveries WHERE status = 'delivered'",
        )
        .fetch_one(env.pool())
        .await
        .ok()?;
        (delivered == 3).then_some(())
    })
    .await;
    let log_before = webhook_log(&env).await;
    assert_eq!(log_before.len(), 4, "{log_before:?}");

    // Rebuilt and swapped in while the worker runs: the new model's records are claimed where
    // the log has them, and the log points at the rebuilt records.
    let report = run_ok(&env, &["rebuild", "notifications", "--swap"]).await;
    assert!(report.contains("swapped in"), "{report}");
    let log: Vec<(uuid::Uuid, uuid::Uuid, i64, String)> = sqlx::query_as(
        "SELECT customer_id, event_id, notification_id, status FROM notifications.webhook_deliveries \
         ORDER BY notification_id",
    )
    .fetch_all(env.pool())
    .await
    .expect("the log in the new model");
    assert_eq!(log.len(), 4);
    for (customer, event, notification, _) in &log {
        let (claimed, id): (bool, i64) = sqlx::query_as(
            "SELECT webhook_claimed, id FROM notifications.records \
             WHERE customer_id = $1 AND event_id = $2",
        )
        .bind(customer)
        .bind(event)
        .fetch_one(env.pool())
        .await
        .expect("the rebuilt record");
        assert!(
            claimed,
            "a record the worker had is claimed in the new model"
        );
        assert_eq!(id, *notification, "the log points at the rebuilt record");
    }
    // The rebuilt records are numbered anew: the statuses, whichever record has which.
    let mut statuses: Vec<&str> = log.iter().map(|(_, _, _, s)| s.as_str()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, ["delivered", "delivered", "delivered", "sending"]);
    // The previous model and the new one hold the same notifications.
    let old: String = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'notifications\\_\\_old\\_%'",
    )
    .fetch_one(env.pool())
    .await
    .expect("kept");
    let checked = run_ok(&env, &["check", "notifications", "--against", &old]).await;
    assert!(checked.contains("no difference"), "{checked}");

    // The marker: a notification made after the swap is delivered; by then the worker has had
    // its rounds over the rebuilt records. Each notification reached the receiver once, the
    // one in flight at the crash included (lost, never sent again).
    let id = place_order(&orders).await;
    confirm_payment(&orders, &id, "p4".to_owned()).await;
    eventually(Duration::from_secs(60), "the marker's webhook", || async {
        (got.lock().expect("inbox").len() >= 5).then_some(())
    })
    .await;
    let got = got.lock().expect("inbox").clone();
    let distinct: BTreeSet<&String> = got.iter().collect();
    assert_eq!(
        (got.len(), distinct.len()),
        (5, 5),
        "each sent once: {got:?}"
    );
    assert_eq!(got[0], in_flight);

    drop(projector);
    // Not a graceful stop: the handler of the POST cut by the crash never returns.
    receiver.token.cancel();
    receiver.handle.abort();
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

/// The stored order events, as the decoded events a replay hands over, by (order, sequence).
async fn replayable(env: &TestEnv) -> BTreeMap<(String, i64), DecodedEvent> {
    let rows: Vec<(String, i64, String, Value, Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_type, payload::jsonb, metadata::jsonb, recorded_at \
         FROM events WHERE aggregate_type = 'order'",
    )
    .fetch_all(env.pool())
    .await
    .expect("events");
    let contracts = schemas::Contracts::global().expect("contracts");
    rows.into_iter()
        .map(
            |(id, sequence, event_type, payload, metadata, recorded_at)| {
                let (contract, value) = contracts
                    .payload_to_avro("order", &payload)
                    .expect("the contract");
                let meta = EventMeta {
                    aggregate_type: "order".to_owned(),
                    aggregate_id: id.clone(),
                    sequence: u64::try_from(sequence).expect("positive"),
                    event_type,
                    ..EventMeta::default()
                }
                .with_stored(&metadata, recorded_at);
                let event = DecodedEvent {
                    meta,
                    contract,
                    value,
                    topic: "orders".to_owned(),
                    partition: 0,
                    offset: 0,
                    timestamp_ms: None,
                };
                ((id, sequence), event)
            },
        )
        .collect()
}

/// The replay's dedup driven directly, batch by batch: an aggregate met first at its sequence 1
/// is claimed, one already applied is looked up, and each event gets the projector's verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_applies_each_event_once_whether_its_aggregate_is_new_or_known() {
    let env = TestEnv::start("replay_dedup").await;
    let orders = env.orders();
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = place_order(&orders).await;
        confirm_payment(&orders, &id, format!("p{i}")).await;
        ids.push(id);
    }
    let events = replayable(&env).await;
    let mut tx = env.pool().begin().await.expect("tx");
    create_tables(&TrackingProjection, &mut tx)
        .await
        .expect("tables");
    tx.commit().await.expect("created");

    let [a, b, c, d] = [0, 1, 2, 3].map(|i| ids[i].as_str());
    let apply = async |batch: &[(&str, i64, bool)]| {
        let replayed: Vec<ReplayedEvent<'_>> = batch
            .iter()
            .map(|(id, sequence, poison)| {
                let event = &events[&((*id).to_owned(), *sequence)];
                ReplayedEvent {
                    aggregate_type: "order",
                    aggregate_id: &event.meta.aggregate_id,
                    sequence: *sequence,
                    event: if *poison { Err("poison") } else { Ok(event) },
                }
            })
            .collect();
        let mut tx = env.pool().begin().await.expect("tx");
        let verdicts = apply_replayed(&TrackingProjection, "tracking", &mut tx, &replayed)
            .await
            .expect("applied");
        tx.commit().await.expect("committed");
        verdicts
    };
    use ReplayVerdict::{Applied, Duplicate, Gap, Refused};
    // New aggregates, one of them twice.
    assert_eq!(
        apply(&[(a, 1, false), (a, 2, false), (b, 1, false)]).await,
        [Applied, Applied, Applied]
    );
    // Redeliveries of applied events (first at their sequence 1: claimed, found there), the next
    // event after one, a gap, and a poison event that starts an aggregate.
    assert_eq!(
        apply(&[
            (b, 1, false),
            (a, 1, false),
            (b, 2, false),
            (c, 2, false),
            (d, 1, true),
        ])
        .await,
        [Duplicate, Duplicate, Applied, Gap, Refused]
    );
    // The gap filled, with a redelivery inside the batch.
    assert_eq!(
        apply(&[(c, 1, false), (c, 1, false), (c, 2, false)]).await,
        [Applied, Duplicate, Applied]
    );
    let applied: BTreeMap<String, i64> =
        sqlx::query_as("SELECT aggregate_id, last_sequence FROM tracking.applied")
            .fetch_all(env.pool())
            .await
            .expect("applied")
            .into_iter()
            .collect();
    let expected: BTreeMap<String, i64> = [(a, 2), (b, 2), (c, 2), (d, 1)]
        .into_iter()
        .map(|(id, s)| (id.to_owned(), s))
        .collect();
    assert_eq!(applied, expected);
    // The handlers saw each applied event once, and never the refused one.
    let timeline: BTreeMap<String, i64> =
        sqlx::query_as("SELECT order_id, count(*) FROM tracking.timeline GROUP BY order_id")
            .fetch_all(env.pool())
            .await
            .expect("timeline")
            .into_iter()
            .collect();
    let expected: BTreeMap<String, i64> = [(a, 2), (b, 2), (c, 2)]
        .into_iter()
        .map(|(id, n)| (id.to_owned(), n))
        .collect();
    assert_eq!(timeline, expected);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_rebuild_is_swapped_in_by_rebuild_swap_after_catching_up() {
    let env = TestEnv::start("rebuild_then_swap").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(AnalyticsProjection)).await;
    let orders = env.orders();
    for _ in 0..3 {
        place_order(&orders).await;
    }
    eventually(Duration::from_secs(60), "the orders projected", || async {
        let (view, _) = analytics_view(&env).await;
        (view.len() >= 3).then_some(())
    })
    .await;

    // Rebuilt, not swapped: the shadow is finished.
    let report = run_ok(&env, &["rebuild", "analytics"]).await;
    assert!(
        report.contains("rebuilt into analytics__rebuild"),
        "{report}"
    );
    // Asked again without --swap: it says how to swap it in, not "unfinished".
    let refused = run_err(&env, &["rebuild", "analytics"]).await;
    assert!(
        refused.contains("finished") && !refused.contains("unfinished"),
        "{refused}"
    );
    assert!(refused.contains("--swap"), "{refused}");

    // More orders meanwhile; then `--swap` swaps the finished rebuild in, caught up.
    for _ in 0..2 {
        place_order(&orders).await;
    }
    let report = run_ok(&env, &["rebuild", "analytics", "--swap"]).await;
    assert!(report.contains("swapped in"), "{report}");
    assert!(!schema_exists(&env, "analytics__rebuild").await);
    let old: Option<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'analytics\\_\\_old\\_%'",
    )
    .fetch_optional(env.pool())
    .await
    .expect("catalog");
    assert!(old.is_some(), "the previous read model is kept");
    eventually(
        Duration::from_secs(60),
        "every order in the swapped-in model",
        || async {
            let (view, _) = analytics_view(&env).await;
            (view.len() == 5).then_some(())
        },
    )
    .await;

    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
