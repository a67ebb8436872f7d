//! `replay-tools rebuild` (the real binary) killed with SIGKILL, where no shutdown path runs:
//! once mid-build, once mid-finish (its tables made durable but `rebuild_state` not yet: the
//! test holds a share lock on `rebuild_state`, so the finish blocks at its last step, and is
//! killed there). Each time `--resume` goes on from what was committed, and the end is the same
//! read model a fresh rebuild gives: every event applied once, `check` finding no difference
//! with the live model, durable and indexed as the live one.

use std::collections::BTreeSet;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use backbone_tests::tools::cli_command;
use backbone_tests::{
    blocked_on_a_lock, confirm_payment, end_sessions_of, eventually, place_order, sigkill,
    with_application_name, KillOnDrop, TestEnv,
};
use projections::TrackingProjection;
use serde_json::Value;
use sqlx::Connection;

/// `replay-tools` for this environment, its sessions named `application_name`.
fn replay_tools(env: &TestEnv, application_name: &str, args: &[&str]) -> std::process::Command {
    let url = with_application_name(&env.database_url, application_name);
    cli_command(env, args, &[("DATABASE_URL", url.as_str())])
}

/// `replay-tools` started in the background (its output, a progress bar, discarded).
fn spawn(env: &TestEnv, application_name: &str, args: &[&str]) -> KillOnDrop {
    let mut command = replay_tools(env, application_name, args);
    command.stdout(Stdio::null()).stderr(Stdio::null());
    KillOnDrop(command.spawn().expect("replay-tools starts"))
}

async fn run_ok(env: &TestEnv, args: &[&str]) -> String {
    let mut command = replay_tools(env, "replay-tools", args);
    let output: Output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("joined")
        .expect("replay-tools runs; run `cargo build --bins` first");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "replay-tools {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn scalar(env: &TestEnv, sql: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(sql)
        .fetch_one(env.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or(0)
}

/// Whether each table of a schema is durable (`p`) or unlogged (`u`), by name.
async fn persistence(env: &TestEnv, schema: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT relname::text, relpersistence::text FROM pg_class \
         WHERE relnamespace = to_regnamespace($1) AND relkind = 'r' ORDER BY relname",
    )
    .bind(schema)
    .fetch_all(env.pool())
    .await
    .expect("tables")
}

async fn indexes(env: &TestEnv, schema: &str) -> BTreeSet<String> {
    sqlx::query_scalar::<_, String>("SELECT indexname::text FROM pg_indexes WHERE schemaname = $1")
        .bind(schema)
        .fetch_all(env.pool())
        .await
        .expect("indexes")
        .into_iter()
        .collect()
}

async fn rows(env: &TestEnv, schema: &str) -> (Vec<Value>, Vec<Value>) {
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
async fn a_rebuild_killed_mid_build_and_mid_finish_resumes_to_the_same_read_model() {
    let env = TestEnv::start("rebuild_kill").await;
    let relay = env.start_relay().await;
    let projector = env.start_projector(Arc::new(TrackingProjection)).await;
    let orders = env.orders();
    for i in 0..300 {
        let id = place_order(&orders).await;
        if i % 2 == 0 {
            confirm_payment(&orders, &id, format!("p{i}")).await;
        }
    }
    let total = scalar(
        &env,
        "SELECT count(*) FROM events WHERE aggregate_type = 'order'",
    )
    .await;
    eventually(
        Duration::from_secs(90),
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

    // Mid-build: small batches, killed once some are committed.
    let mut building = spawn(
        &env,
        "rebuild-1",
        &["rebuild", "tracking", "--batch-size", "3"],
    );
    eventually(Duration::from_secs(60), "the rebuild under way", || async {
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT applied FROM tracking__rebuild.rebuild_state")
                .fetch_one(env.pool())
                .await
                .ok();
        (applied.unwrap_or(0) > 30).then_some(())
    })
    .await;
    sigkill(&mut building);
    end_sessions_of(env.pool(), "rebuild-1").await;
    let applied = scalar(&env, "SELECT applied FROM tracking__rebuild.rebuild_state").await;
    assert!(
        applied > 0 && applied < total,
        "killed mid-build: {applied} of {total}"
    );
    assert_eq!(
        scalar(
            &env,
            "SELECT sum(last_sequence)::bigint FROM tracking__rebuild.applied"
        )
        .await,
        applied,
        "what was committed is what its bookkeeping says"
    );

    // Mid-finish: resumed, it applies the rest and makes its tables durable, then blocks making
    // `rebuild_state` durable, its last step, on the test's lock; killed there.
    let mut holder = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connects");
    let mut hold = holder.begin().await.expect("begins");
    sqlx::query("LOCK TABLE tracking__rebuild.rebuild_state IN ACCESS SHARE MODE")
        .execute(&mut *hold)
        .await
        .expect("locked");
    let mut finishing = spawn(&env, "rebuild-2", &["rebuild", "tracking", "--resume"]);
    blocked_on_a_lock(
        env.pool(),
        "rebuild-2",
        "ALTER TABLE tracking.rebuild_state",
    )
    .await;
    sigkill(&mut finishing);
    end_sessions_of(env.pool(), "rebuild-2").await;
    hold.rollback().await.expect("released");
    assert_eq!(
        scalar(&env, "SELECT applied FROM tracking__rebuild.rebuild_state").await,
        total,
        "every event applied before the finish"
    );
    let tables = persistence(&env, "tracking__rebuild").await;
    assert!(
        tables
            .iter()
            .all(|(table, p)| (table == "rebuild_state") == (p == "u")),
        "killed mid-finish: every table durable but rebuild_state: {tables:?}"
    );

    // Resumed to the end.
    let report = run_ok(&env, &["rebuild", "tracking", "--resume"]).await;
    assert!(
        report.contains("rebuilt into tracking__rebuild"),
        "{report}"
    );
    assert_eq!(
        scalar(&env, "SELECT applied FROM tracking__rebuild.rebuild_state").await,
        total,
        "every event applied once over the three runs"
    );
    let checked = run_ok(&env, &["check", "tracking"]).await;
    assert!(checked.contains("no difference"), "{checked}");
    assert_eq!(
        rows(&env, "tracking__rebuild").await,
        rows(&env, "tracking").await
    );
    assert!(persistence(&env, "tracking__rebuild")
        .await
        .iter()
        .all(|(_, p)| p == "p"));
    let mut live_indexes = indexes(&env, "tracking").await;
    live_indexes.insert("rebuild_state_pkey".to_owned());
    assert_eq!(indexes(&env, "tracking__rebuild").await, live_indexes);

    relay.stop().await.expect("relay stops");
    env.stop().await;
}
