//! A relay killed between the broker's acknowledgement and `published_at`: the test holds the
//! outbox rows locked, so the relay (the real binary) sends them, gets the broker's
//! acknowledgements and then blocks marking them published; it is killed there with SIGKILL. The
//! rows are still unpublished, so the next relay publishes them again: both copies are on the
//! topic, and the analytics projector (the real binary) applies each event once (its additive
//! hourly `orders` counter and its dead letters would show a second application).

use std::collections::HashMap;
use std::time::Duration;

use backbone_tests::{
    blocked_on_a_lock, end_sessions_of, eventually, place_order, sigkill, with_application_name,
    KillOnDrop, TestEnv,
};
use rdkafka::consumer::Consumer;
use sqlx::Connection;

const ORDERS: usize = 20;

/// Whether the analytics projector has consumed every record of the orders topic: its
/// checkpoints reach each partition's high watermark.
async fn consumed_to_the_end(env: &TestEnv) -> bool {
    let topic = env.kafka.topics().for_aggregate("order").expect("topic");
    let consumer = env.consumer_from_beginning(&topic);
    let mut end = 0;
    for partition in 0..env.kafka.kafka_partitions {
        let (_, high) = consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(10))
            .expect("watermarks");
        end += high;
    }
    let checkpoints: Option<i64> = sqlx::query_scalar(
        "SELECT sum(next_offset)::bigint FROM analytics.checkpoints WHERE topic = $1",
    )
    .bind(&topic)
    .fetch_one(env.pool())
    .await
    .unwrap_or(None);
    checkpoints == Some(end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_after_the_acknowledgement_publishes_again_and_the_copy_is_absorbed() {
    let env = TestEnv::start("relaydup").await;
    let orders = env.orders();
    let mut ids = Vec::new();
    for _ in 0..ORDERS {
        ids.push(place_order(&orders).await);
    }
    let mut projector = KillOnDrop(env.spawn_process("projector", &[("PROJECTIONS", "analytics")]));

    // Hold the outbox rows: the relay can read and send them, not mark them.
    let mut holder = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connects");
    let mut hold = holder.begin().await.expect("begins");
    let locked: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE")
            .fetch_all(&mut *hold)
            .await
            .expect("locked");
    assert_eq!(locked.len(), ORDERS);

    let first_url = with_application_name(&env.database_url, "relay-first");
    let mut relay = KillOnDrop(env.spawn_process("relay", &[("DATABASE_URL", first_url.as_str())]));
    // Acknowledged: every event is on the topic; and blocked marking them.
    env.read_topic("order", Duration::from_secs(60), |records| {
        records.len() == ORDERS
    })
    .await;
    blocked_on_a_lock(env.pool(), "relay-first", "UPDATE outbox SET published_at").await;
    sigkill(&mut relay);
    end_sessions_of(env.pool(), "relay-first").await;
    hold.rollback().await.expect("released");
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(env.pool())
            .await
            .expect("outbox");
    assert_eq!(
        unpublished,
        i64::try_from(ORDERS).expect("count"),
        "acknowledged but never marked"
    );

    let mut relay = KillOnDrop(env.spawn_process("relay", &[]));
    let records = env
        .read_topic("order", Duration::from_secs(60), |records| {
            records.len() == 2 * ORDERS
        })
        .await;
    let mut copies: HashMap<(String, u64), Vec<uuid::Uuid>> = HashMap::new();
    for record in &records {
        copies
            .entry((record.meta.aggregate_id.clone(), record.meta.sequence))
            .or_default()
            .push(record.meta.event_id);
    }
    assert_eq!(copies.len(), ORDERS);
    for ((id, sequence), event_ids) in &copies {
        assert!(ids.contains(id));
        assert_eq!(*sequence, 1);
        assert_eq!(event_ids.len(), 2, "{id}: published twice");
        assert_eq!(event_ids[0], event_ids[1], "{id}: the same event twice");
    }

    // Downstream: every record consumed, each event applied once.
    eventually(
        Duration::from_secs(60),
        "the projector to consume both copies",
        || async { consumed_to_the_end(&env).await.then_some(()) },
    )
    .await;
    let counted: Option<i64> =
        sqlx::query_scalar("SELECT sum(orders)::bigint FROM analytics.hourly")
            .fetch_one(env.pool())
            .await
            .expect("hourly");
    assert_eq!(counted, Some(i64::try_from(ORDERS).expect("count")));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics.orders")
        .fetch_one(env.pool())
        .await
        .expect("orders");
    assert_eq!(rows, i64::try_from(ORDERS).expect("count"));
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics.dead_letters")
        .fetch_one(env.pool())
        .await
        .expect("dead letters");
    assert_eq!(dead, 0, "no second application failed either");

    sigkill(&mut relay);
    sigkill(&mut projector);
    env.stop().await;
}
