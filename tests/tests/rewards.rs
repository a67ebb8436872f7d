//! The rewards ledger against the real event store: concurrent redemptions never overdraw.

use std::sync::Arc;

use backbone_tests::TestEnv;
use commands::{CommandBus, CommandContext, CommandError};
use domain::rewards::{RewardsCommand, RewardsError, RewardsLedger, RewardsServices};
use domain::services::SystemClock;
use domain::{Currency, CustomerId, Money, OrderId};

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
            RewardsCommand::EarnPoints {
                order_id: OrderId::new(),
                order_total: Money::new(10_000, Currency::parse("GBP").expect("GBP"))
                    .expect("money"),
                points_per_100_minor: 10,
                expires_in_days: 365,
                idempotency_key: "earn-1".to_owned(),
            },
            &CommandContext::new("system:test"),
        )
        .await
        .expect("earned");
    assert_eq!(earned.event_types, ["PointsEarned"]);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (ledger, customer) = (ledger.clone(), customer.clone());
        tasks.spawn(async move {
            ledger
                .execute(
                    &customer,
                    RewardsCommand::RedeemPoints {
                        order_id: OrderId::new(),
                        points: 100,
                        idempotency_key: format!("redeem-{i}"),
                    },
                    &CommandContext::new("customer:test"),
                )
                .await
        });
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
