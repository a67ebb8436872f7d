//! Crashes: the relay and the projector are killed with SIGKILL mid-stream and restarted;
//! nothing is lost and nothing is applied twice.

use std::collections::BTreeMap;
use std::time::Duration;

use backbone_tests::{confirm_payment, eventually, place_order, TestEnv};
use domain::order::OrderEvent;

type View = BTreeMap<String, (String, i64, Vec<(i64, String)>)>;

/// What a clean run produces, computed from the event store alone.
async fn expected_view(env: &TestEnv) -> View {
    let rows: Vec<(String, i64, serde_json::Value)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, payload::jsonb FROM events WHERE aggregate_type = 'order' \
         ORDER BY aggregate_id, sequence",
    )
    .fetch_all(env.pool())
    .await
    .expect("events");
    let mut view = View::new();
    for (id, sequence, payload) in rows {
        let event: OrderEvent = serde_json::from_value(payload).expect("stored event");
        let entry = view
            .entry(id)
            .or_insert_with(|| (String::new(), 0, Vec::new()));
        entry.1 = sequence;
        if let Some(status) = event.status_after() {
            entry.0 = status.as_str().to_owned();
            entry.2.push((sequence, status.as_str().to_owned()));
        }
    }
    view
}

async fn projected_view(env: &TestEnv) -> View {
    let orders: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT order_id, status, last_sequence FROM tracking.orders")
            .fetch_all(env.pool())
            .await
            .unwrap_or_default();
    let timeline: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT order_id, sequence, status FROM tracking.timeline ORDER BY order_id, sequence",
    )
    .fetch_all(env.pool())
    .await
    .unwrap_or_default();
    let mut view: View = orders
        .into_iter()
        .map(|(id, status, last)| (id, (status, last, Vec::new())))
        .collect();
    for (id, sequence, status) in timeline {
        if let Some(entry) = view.get_mut(&id) {
            entry.2.push((sequence, status));
        }
    }
    view
}

fn kill(child: &mut std::process::Child) {
    // SIGKILL: no shutdown path runs.
    child.kill().expect("kill");
    child.wait().expect("reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_relay_and_the_projector_mid_stream_loses_nothing() {
    let env = TestEnv::start("crash").await;
    let orders = env.orders();
    let mut relay = env.spawn_process("relay", &[("RELAY_BATCH_SIZE", "50")]);
    let mut projector = env.spawn_process(
        "projector",
        &[("PROJECTOR_BATCH_SIZE", "20"), ("PROJECTIONS", "tracking")],
    );

    let writer = {
        let orders = orders.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let id = place_order(&orders).await;
                if i % 2 == 0 {
                    confirm_payment(&orders, &id, format!("p{i}")).await;
                }
                if i % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };

    // Kill both once they are demonstrably mid-stream.
    eventually(
        Duration::from_secs(60),
        "the projector to apply some events",
        || async {
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM tracking.timeline")
                .fetch_one(env.pool())
                .await
                .unwrap_or(0);
            (applied > 30).then_some(())
        },
    )
    .await;
    kill(&mut relay);
    kill(&mut projector);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut relay = env.spawn_process("relay", &[("RELAY_BATCH_SIZE", "50")]);
    let mut projector = env.spawn_process(
        "projector",
        &[("PROJECTOR_BATCH_SIZE", "20"), ("PROJECTIONS", "tracking")],
    );

    // And once more, while the writer is still going.
    eventually(
        Duration::from_secs(60),
        "more progress after the restart",
        || async {
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM tracking.timeline")
                .fetch_one(env.pool())
                .await
                .unwrap_or(0);
            (applied > 150).then_some(())
        },
    )
    .await;
    kill(&mut projector);
    let mut projector = env.spawn_process(
        "projector",
        &[("PROJECTOR_BATCH_SIZE", "20"), ("PROJECTIONS", "tracking")],
    );

    writer.await.expect("writer finished");
    let expected = expected_view(&env).await;
    assert_eq!(expected.len(), 300);
    let projected = eventually(
        Duration::from_secs(90),
        "the read model to catch up",
        || async {
            let projected = projected_view(&env).await;
            (projected == expected).then_some(projected)
        },
    )
    .await;
    assert_eq!(projected.len(), 300);

    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(env.pool())
            .await
            .expect("outbox");
    assert_eq!(unpublished, 0);
    kill(&mut relay);
    kill(&mut projector);
    env.stop().await;
}

/// Which instance (`host/pid`) owns each partition of a read model's topics, as measured in the
/// last `fresh` seconds.
async fn owners(env: &TestEnv, schema: &str, fresh: f64) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT owner FROM {schema}.lag \
         WHERE measured_at > clock_timestamp() - make_interval(secs => $1) ORDER BY topic, partition"
    ))
    .bind(fresh)
    .fetch_all(env.pool())
    .await
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_projector_instances_share_the_partitions_and_a_killed_ones_move_to_the_other() {
    let env = TestEnv::start("instances").await;
    let orders = env.orders();
    let relay = env.start_relay().await;
    let settings = [
        ("PROJECTIONS", "tracking,analytics"),
        ("PROJECTOR_BATCH_SIZE", "20"),
    ];
    let mut first = env.spawn_process("projector", &settings);
    let mut second = env.spawn_process("projector", &settings);
    let (first_id, second_id) = (format!("/{}", first.id()), format!("/{}", second.id()));
    // Both read models read two topics.
    let partitions = 2 * usize::try_from(env.kafka.kafka_partitions).expect("partitions");

    let writer = {
        let orders = orders.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let id = place_order(&orders).await;
                confirm_payment(&orders, &id, format!("p{i}")).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Each instance takes partitions of each read model.
    for schema in ["tracking", "analytics"] {
        eventually(
            Duration::from_secs(60),
            "both instances owning partitions",
            || async {
                let owners = owners(&env, schema, 3.0).await;
                (owners.len() == partitions
                    && owners.iter().any(|o| o.ends_with(&first_id))
                    && owners.iter().any(|o| o.ends_with(&second_id)))
                .then_some(())
            },
        )
        .await;
    }

    // One dies mid-stream: the other takes over all its partitions.
    kill(&mut first);
    for schema in ["tracking", "analytics"] {
        eventually(
            Duration::from_secs(90),
            "the survivor owning every partition",
            || async {
                let owners = owners(&env, schema, 2.0).await;
                (owners.len() == partitions && owners.iter().all(|o| o.ends_with(&second_id)))
                    .then_some(())
            },
        )
        .await;
    }

    writer.await.expect("writer finished");
    let expected = expected_view(&env).await;
    assert_eq!(expected.len(), 300);
    eventually(Duration::from_secs(90), "tracking to catch up", || async {
        (projected_view(&env).await == expected).then_some(())
    })
    .await;
    // Analytics counts additively (orders = orders + 1): a doubled event would show.
    let counted = eventually(Duration::from_secs(60), "analytics to catch up", || async {
        let counted: i64 =
            sqlx::query_scalar("SELECT coalesce(sum(orders), 0)::bigint FROM analytics.hourly")
                .fetch_one(env.pool())
                .await
                .ok()?;
        (counted >= 300).then_some(counted)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recounted: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(orders), 0)::bigint FROM analytics.hourly")
            .fetch_one(env.pool())
            .await
            .expect("count");
    assert_eq!(
        (counted, recounted),
        (300, 300),
        "nothing lost, nothing doubled"
    );

    kill(&mut second);
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
