//! The command bus against the real event store: repeatable commands act once.

use backbone_tests::{place_order, TestEnv};
use commands::{CommandContext, CommandError};
use domain::order::{OrderCommand, OrderError};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeatable_command_sent_twenty_times_at_once_appends_once() {
    let env = TestEnv::start("repeat").await;
    let orders = env.orders();
    let order_id = place_order(&orders).await;
    let causing_event = uuid::Uuid::new_v4();
    let key = format!("{causing_event}/confirm-order");

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (orders, order_id, key) = (orders.clone(), order_id.clone(), key.clone());
        tasks.spawn(async move {
            let context = CommandContext::repeatable("system:test", &key).caused_by(causing_event);
            let command = OrderCommand::ConfirmPayment {
                payment_reference: "pay-1".to_owned(),
            };
            orders.execute(&order_id, command, &context).await
        });
    }
    let mut first_executions = 0;
    while let Some(result) = tasks.join_next().await {
        let committed = result.expect("task").expect("every repeat succeeds");
        assert_eq!(committed.last_sequence, 2);
        assert_eq!(committed.event_types, ["OrderConfirmed"]);
        if !committed.repeated {
            first_executions += 1;
        }
    }
    assert_eq!(first_executions, 1);

    let confirmations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'OrderConfirmed'",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("count");
    assert_eq!(confirmations, 1);
    let causation: String = sqlx::query_scalar(
        "SELECT metadata->>'causation_id' FROM events WHERE aggregate_id = $1 AND sequence = 2",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("metadata");
    assert_eq!(causation, causing_event.to_string());

    // A different command id for the same step is a new command: the order refuses it.
    let other = CommandContext::repeatable("system:test", "another-cause/confirm-order");
    let refused = orders
        .execute(
            &order_id,
            OrderCommand::ConfirmPayment {
                payment_reference: "pay-2".to_owned(),
            },
            &other,
        )
        .await;
    // Refused by the order itself (a payment is confirmed once), not by the bus or the store.
    assert!(
        matches!(
            refused,
            Err(CommandError::Rejected(OrderError::InvalidTransition {
                action: "confirm payment for",
                status: "Confirmed",
            }))
        ),
        "{refused:?}"
    );
    let confirmations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'OrderConfirmed'",
    )
    .bind(&order_id)
    .fetch_one(env.pool())
    .await
    .expect("count");
    assert_eq!(confirmations, 1, "the refused command appended nothing");
    env.stop().await;
}
