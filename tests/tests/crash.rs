//! Crashes: the relay and the projector are killed with SIGKILL mid-stream and restarted;
//! nothing is lost and nothing is applied twice.

use std::collections::BTreeMap;
use std::time::Duration;

use backbone_tests::{eventually, place_order, TestEnv};
use commands::CommandContext;
use domain::order::{OrderCommand, OrderEvent};

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
    let mut projector = env.spawn_process("projector", &[("PROJECTOR_BATCH_SIZE", "20")]);

    let writer = {
        let orders = orders.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let id = place_order(&orders).await;
                let context = CommandContext::new("test");
                if i % 2 == 0 {
                    let confirm = OrderCommand::ConfirmPayment {
                        payment_reference: format!("p{i}"),
                    };
                    orders
                        .execute(&id, confirm, &context)
                        .await
                        .expect("confirmed");
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
    let mut projector = env.spawn_process("projector", &[("PROJECTOR_BATCH_SIZE", "20")]);

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
    let mut projector = env.spawn_process("projector", &[("PROJECTOR_BATCH_SIZE", "20")]);

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
