//! What operators watch: the lag of each read model (in seconds: the age of the oldest record
//! not yet applied, not the time since the last applied one), and the operations endpoint of
//! the relay, the projector and the process manager (`/metrics`, `/health/live`,
//! `/health/ready`, nothing else), whose histograms never report a quantile of 0 for a quiet
//! window.

use std::net::SocketAddr;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{eventually, place_order, TestEnv};
use projections::TrackingProjection;
use serde_json::Value;

/// A free local port (bound and released).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("address")
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(url: &str) -> Option<(u16, String, String)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some((status, content_type, response.text().await.ok()?))
}

/// The value of `metric{projection="<projection>"}` in a Prometheus text page.
fn sample(page: &str, metric: &str, projection: &str) -> Option<f64> {
    let prefix = format!("{metric}{{projection=\"{projection}\"}} ");
    page.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_in_seconds_is_the_age_of_the_oldest_waiting_record_not_the_idle_time_before_it() {
    let env = TestEnv::start("lag").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let (api, server) = env.start_api().await;
    let client = backbone_tests::client();
    let orders = env.orders();

    let first = place_order(&orders).await;
    eventually(
        Duration::from_secs(60),
        "the first order projected",
        || async {
            let found: Option<String> =
                sqlx::query_scalar("SELECT order_id FROM tracking.orders WHERE order_id = $1")
                    .bind(&first)
                    .fetch_optional(env.pool())
                    .await
                    .ok()?;
            found.map(|_| ())
        },
    )
    .await;
    // Idle for a while: the last applied event gets old, and nothing is behind.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The projector is held up (its table locked), and one order comes in.
    let mut blocker = env.pool().begin().await.expect("transaction");
    sqlx::query("LOCK TABLE tracking.orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    place_order(&orders).await;
    let status = eventually(
        Duration::from_secs(30),
        "the waiting record measured",
        || async {
            let body: Value =
                backbone_tests::json_of(&client, format!("{api}/projections/tracking")).await?;
            (body["lag_events"].as_i64()? >= 1 && body["lag_seconds"].as_f64()? >= 1.5)
                .then_some(body)
        },
    )
    .await;
    // The record has waited about 1.5 to 3 s; the last applied one was recorded over 6.5 s ago.
    let seconds = status["lag_seconds"].as_f64().expect("lag_seconds");
    assert!(
        seconds < 5.0,
        "lag is the waiting record's age, not idle time: {status}"
    );
    let metrics = backbone_tests::metrics_text(&client, &api).await;
    let gauge = sample(&metrics, "projector_lag_seconds", "tracking").expect("the gauge");
    assert!(gauge > 0.0 && gauge < 5.0, "projector_lag_seconds {gauge}");

    // Released, it catches up, and nothing is behind.
    blocker.rollback().await.expect("unlocked");
    eventually(Duration::from_secs(30), "caught up", || async {
        let body: Value =
            backbone_tests::json_of(&client, format!("{api}/projections/tracking")).await?;
        (body["lag_events"].as_i64()? == 0 && body["lag_seconds"].as_f64()? == 0.0).then_some(())
    })
    .await;

    server.stop().await.expect("api stops");
    projector.stop().await.expect("projector stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_projector_and_process_manager_serve_metrics_liveness_and_readiness_on_their_own_paths(
) {
    let env = TestEnv::start("probes").await;
    let mut processes = Vec::new();
    let mut endpoints = Vec::new();
    for (binary, extra) in [
        ("relay", vec![]),
        ("projector", vec![("PROJECTIONS", "tracking")]),
        ("process-manager", vec![]),
    ] {
        let addr = free_addr().to_string();
        let mut settings = vec![
            ("METRICS_LISTEN", addr.as_str()),
            ("READY_CHECK_INTERVAL_MS", "200"),
        ];
        settings.extend(extra);
        processes.push(Process(env.spawn_process(binary, &settings)));
        endpoints.push((binary, format!("http://{addr}")));
    }

    for (binary, base) in &endpoints {
        let ready = eventually(Duration::from_secs(60), "ready", || async {
            let (status, content_type, body) = get(&format!("{base}/health/ready")).await?;
            (status == 200).then_some((content_type, body))
        })
        .await;
        assert!(
            ready.0.starts_with("application/json"),
            "{binary}: {ready:?}"
        );
        let body: Value = serde_json::from_str(&ready.1).expect("readiness is JSON");
        assert_eq!(body["ready"], true, "{binary}: {body}");
        for check in ["database", "broker", "lag"] {
            assert_eq!(
                body["checks"][check]["ok"], true,
                "{binary} {check}: {body}"
            );
        }

        let (status, _, live) = get(&format!("{base}/health/live")).await.expect("live");
        assert_eq!(status, 200, "{binary}");
        let live: Value = serde_json::from_str(&live).expect("liveness is JSON");
        assert_eq!(live["alive"], true, "{binary}: {live}");

        let (status, content_type, _) = get(&format!("{base}/metrics")).await.expect("metrics");
        assert_eq!(status, 200, "{binary}");
        assert!(
            content_type.starts_with("text/plain"),
            "{binary}: {content_type}"
        );

        let (status, _, _) = get(&format!("{base}/no-such-path")).await.expect("answer");
        assert_eq!(status, 404, "{binary}: only its three paths are served");
    }

    // An event goes through: the projector's delay is a histogram (buckets that only grow), never
    // a summary whose quantiles drop to 0 when its window empties.
    place_order(&env.orders()).await;
    let projector = &endpoints[1].1;
    let page = eventually(Duration::from_secs(60), "the delay recorded", || async {
        let (_, _, page) = get(&format!("{projector}/metrics")).await?;
        page.contains("projector_event_delay_seconds_bucket{")
            .then_some(page)
    })
    .await;
    assert!(
        !page.contains("quantile=\""),
        "no summaries, whose empty windows read 0:\n{page}"
    );
    assert!(
        page.contains("# TYPE projector_event_delay_seconds histogram"),
        "{page}"
    );

    drop(processes);
    env.stop().await;
}
