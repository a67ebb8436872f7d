//! The rewards ledger against the real event store: concurrent redemptions never overdraw, and
//! a long ledger loads from its snapshot to exactly the state its events add up to.

use std::sync::Arc;

use backbone_tests::{earn_on, TestEnv};
use commands::{CommandBus, CommandContext, CommandError};
use cqrs_es::Aggregate;
use domain::rewards::{RewardsCommand, RewardsError, RewardsEvent, RewardsLedger, RewardsServices};
use domain::services::SystemClock;
use domain::{CustomerId, OrderId};

/// A customer redeeming `points` on a new order under `key`.
async fn redeem(
    ledger: &CommandBus<RewardsLedger>,
    customer: &str,
    points: u64,
    key: String,
) -> Result<commands::Committed, CommandError<RewardsError>> {
    ledger
        .execute(
            customer,
            RewardsCommand::RedeemPoints {
                order_id: OrderId::new(),
                points,
                idempotency_key: key,
            },
            &CommandContext::new("customer:test"),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_redemptions_never_overdraw_and_every_refusal_says_why() {
    let env = TestEnv::start("redeem").await;
    let ledger: Arc<CommandBus<RewardsLedger>> = Arc::new(CommandBus::new(
        env.store.clone(),
        RewardsServices::new(Arc::new(SystemClock)),
    ));
    let customer = CustomerId::new().to_string();
    // 100.00 GBP at 10 points per 100 minor units: 1,000 points.
    let earned = ledger
        .execute(
            &customer,
            earn_on(OrderId::new(), 10_000, "earn-1".to_owned()),
            &CommandContext::new("system:test"),
        )
        .await
        .expect("earned");
    assert_eq!(earned.event_types, ["PointsEarned"]);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (ledger, customer) = (ledger.clone(), customer.clone());
        tasks.spawn(async move { redeem(&ledger, &customer, 100, format!("redeem-{i}")).await });
    }
    let (mut redeemed, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            Ok(_) => redeemed += 1,
            Err(CommandError::Rejected(error @ RewardsError::InsufficientPoints { .. })) => {
                assert!(error.to_string().contains("available"), "{error}");
                refused += 1;
            }
            Err(other) => panic!("unexpected failure: {other}"),
        }
    }
    assert_eq!((redeemed, refused), (10, 40));

    let (earned_points, redeemed_points): (i64, i64) = sqlx::query_as(
        "SELECT \
           coalesce(sum((payload->'PointsEarned'->>'points')::bigint), 0)::bigint, \
           coalesce(sum((payload->'PointsRedeemed'->>'points')::bigint), 0)::bigint \
         FROM events WHERE aggregate_type = 'rewards' AND aggregate_id = $1",
    )
    .bind(&customer)
    .fetch_one(env.pool())
    .await
    .expect("ledger");
    assert_eq!((earned_points, redeemed_points), (1_000, 1_000));
    env.stop().await;
}

/// Every rewards event of `customer` in the store, in order, folded into a ledger from nothing:
/// the state a load must arrive at, however it is loaded.
async fn folded(env: &TestEnv, customer: &str, up_to: i64) -> RewardsLedger {
    let payloads: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT payload::jsonb FROM events WHERE aggregate_type = 'rewards' \
         AND aggregate_id = $1 AND sequence <= $2 ORDER BY sequence",
    )
    .bind(customer)
    .bind(up_to)
    .fetch_all(env.pool())
    .await
    .expect("events");
    let mut ledger = RewardsLedger::default();
    for payload in payloads {
        ledger.apply(serde_json::from_value::<RewardsEvent>(payload).expect("a rewards event"));
    }
    ledger
}

/// The customer's snapshot rows: `(last_sequence, current_snapshot)`.
async fn snapshots_of(env: &TestEnv, customer: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT last_sequence, current_snapshot FROM snapshots \
         WHERE aggregate_type = 'rewards' AND aggregate_id = $1 ORDER BY last_sequence",
    )
    .bind(customer)
    .fetch_all(env.pool())
    .await
    .expect("snapshots")
}

/// The customer's ledger as the command side loads it (snapshot, then the events after it).
async fn loaded(ledger: &CommandBus<RewardsLedger>, customer: &str) -> RewardsLedger {
    ledger.state(customer, Clone::clone).await.expect("loaded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_ledger_loads_from_its_snapshot_to_exactly_what_its_events_add_up_to() {
    let env = TestEnv::start("snapshots").await;
    let ledger: Arc<CommandBus<RewardsLedger>> = Arc::new(CommandBus::new(
        env.store.clone(),
        RewardsServices::new(Arc::new(SystemClock)),
    ));
    let customer = CustomerId::new().to_string();
    // Four writers at once (their conflicts retried), each earning then spending part of it:
    // 240 events, past four snapshot intervals.
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..4 {
        let (ledger, customer) = (ledger.clone(), customer.clone());
        writers.spawn(async move {
            for i in 0..30 {
                let order_id = OrderId::new();
                for command in [
                    earn_on(order_id, 1_000, format!("earn-{writer}-{i}")),
                    RewardsCommand::RedeemPoints {
                        order_id,
                        points: 30,
                        idempotency_key: format!("redeem-{writer}-{i}"),
                    },
                ] {
                    ledger
                        .execute(&customer, command, &CommandContext::new("system:test"))
                        .await
                        .expect("executed");
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    let every = commands::snapshots::EVERY as i64;
    // One snapshot, at the last interval's end. (Its number depends on the race: a writer that
    // read no snapshot just before one was committed, then the events past it, starts the
    // numbering again, as after an unreadable one.)
    let snapshots = snapshots_of(&env, &customer).await;
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    let (last_sequence, number) = snapshots[0];
    assert_eq!(last_sequence, 240 / every * every);
    assert!((1..=240 / every).contains(&number), "{number}");

    // The snapshot is the state after exactly the events up to its sequence, each once.
    let snapshot: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM snapshots WHERE aggregate_type = 'rewards' AND aggregate_id = $1",
    )
    .bind(&customer)
    .fetch_one(env.pool())
    .await
    .expect("its state");
    let snapshot: RewardsLedger = serde_json::from_value(snapshot).expect("a ledger");
    let expected = folded(&env, &customer, last_sequence).await;
    assert_eq!(
        (snapshot.balance, snapshot.lifetime_earned),
        (expected.balance, expected.lifetime_earned),
        "the snapshot's balance and lifetime points"
    );
    assert!(
        snapshot == expected,
        "the snapshot differs from its events' fold"
    );
    // A load (that snapshot, then the 40 events after it) is the whole history's state.
    let everything = folded(&env, &customer, i64::MAX).await;
    assert_eq!(loaded(&ledger, &customer).await, everything);
    assert_eq!(everything.balance, 4 * 30 * (100 - 30));
    assert_eq!(everything.processed_keys.len(), 240);

    // A snapshot that no longer reads as a ledger (its shape changed in a release) is passed
    // over: the load replays every event, and writing goes on.
    sqlx::query(
        "UPDATE snapshots SET payload = '{\"an\": \"older shape\"}' \
         WHERE aggregate_type = 'rewards' AND aggregate_id = $1",
    )
    .bind(&customer)
    .execute(env.pool())
    .await
    .expect("an unreadable snapshot");
    assert_eq!(loaded(&ledger, &customer).await, everything);
    redeem(&ledger, &customer, 1, "after-the-old-snapshot".to_owned())
        .await
        .expect("redeemed");
    assert_eq!(
        loaded(&ledger, &customer).await,
        folded(&env, &customer, i64::MAX).await
    );
    // The next interval's snapshot replaces the unreadable one.
    for i in 0..every {
        redeem(&ledger, &customer, 1, format!("after-{i}"))
            .await
            .expect("redeemed");
    }
    assert_eq!(snapshots_of(&env, &customer).await, vec![(250, 1)]);
    assert_eq!(
        loaded(&ledger, &customer).await,
        folded(&env, &customer, i64::MAX).await
    );
    env.stop().await;
}
