//! The relay's hot standby: two relay processes on one database, one active (it holds the
//! PostgreSQL advisory lock), the other waiting. The active one is killed with SIGKILL while
//! writers append and rows wait in the outbox; the standby takes the lock over and publishes the
//! rest. The topic, read against the event store, holds every event, and per aggregate the
//! first copy of each event comes in sequence order without a gap (a re-sent copy of an event
//! the dead relay had sent before it could mark it may follow, as at least once allows).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use backbone_tests::{
    confirm_payment, eventually, place_order, sigkill, with_application_name, KillOnDrop, TestEnv,
};
use uuid::Uuid;

/// The relay's advisory lock key (`streams::relay`'s `RELAY_LOCK_KEY`, "outbox"), as `pg_locks`
/// shows a bigint key: its high and low 32 bits.
const LOCK_CLASSID: i64 = 0x6f75;
const LOCK_OBJID: i64 = 0x7462_6f78;

/// The `application_name` of the session holding the relay's lock in this test's database (the
/// server's other databases have relays of their own), if any.
async fn lock_holder(env: &TestEnv) -> Option<String> {
    sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = $1 \
           AND l.objid::bigint = $2 AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(LOCK_CLASSID)
    .bind(LOCK_OBJID)
    .fetch_optional(env.pool())
    .await
    .expect("pg_locks")
}

fn relay(env: &TestEnv, name: &str) -> KillOnDrop {
    let url = with_application_name(&env.database_url, name);
    KillOnDrop(env.spawn_process(
        "relay",
        &[("DATABASE_URL", url.as_str()), ("RELAY_BATCH_SIZE", "20")],
    ))
}

async fn unpublished(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(env.pool())
        .await
        .expect("outbox")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standby_relay_takes_over_when_the_active_one_is_killed_and_nothing_is_lost_or_reordered(
) {
    let env = TestEnv::start("standby").await;
    let orders = env.orders();

    // The first relay becomes active; the second, started once the lock is taken, stands by.
    let mut active = relay(&env, "relay-a");
    eventually(
        Duration::from_secs(60),
        "relay-a to hold the lock",
        || async { (lock_holder(&env).await.as_deref() == Some("relay-a")).then_some(()) },
    )
    .await;
    let mut standby = relay(&env, "relay-b");
    eventually(
        Duration::from_secs(60),
        "relay-b to try the lock and stand by",
        || async {
            let tried: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'relay-b' \
                 AND datname = current_database() AND query LIKE '%pg_try_advisory_lock%')",
            )
            .fetch_one(env.pool())
            .await
            .ok()?;
            tried.then_some(())
        },
    )
    .await;
    assert_eq!(lock_holder(&env).await.as_deref(), Some("relay-a"));

    let writer = {
        let orders = orders.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                let id = place_order(&orders).await;
                if i % 2 == 0 {
                    confirm_payment(&orders, &id, format!("p{i}")).await;
                }
            }
        })
    };

    // Killed mid-stream: it has published some, the writer goes on.
    eventually(
        Duration::from_secs(60),
        "relay-a to publish some events",
        || async {
            let published: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
                    .fetch_one(env.pool())
                    .await
                    .ok()?;
            (published > 60).then_some(())
        },
    )
    .await;
    sigkill(&mut active);
    let waiting_at_kill = unpublished(&env).await;
    assert!(
        !writer.is_finished(),
        "the kill must land while the writer appends"
    );

    eventually(
        Duration::from_secs(60),
        "relay-b to take the lock over",
        || async { (lock_holder(&env).await.as_deref() == Some("relay-b")).then_some(()) },
    )
    .await;
    writer.await.expect("writer finished");
    eventually(
        Duration::from_secs(120),
        "the standby to publish the rest",
        || async { (unpublished(&env).await == 0).then_some(()) },
    )
    .await;

    // The topic against the store.
    let stored: Vec<(String, i64, Uuid)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_id FROM events WHERE aggregate_type = 'order' \
         ORDER BY aggregate_id, sequence",
    )
    .fetch_all(env.pool())
    .await
    .expect("events");
    let expected: HashMap<(String, i64), Uuid> = stored
        .iter()
        .map(|(id, sequence, event_id)| ((id.clone(), *sequence), *event_id))
        .collect();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for (id, sequence, _) in &stored {
        last.insert(id.clone(), *sequence);
    }
    assert_eq!(last.len(), 400);
    let records = env
        .read_topic("order", Duration::from_secs(120), |records| {
            let distinct: std::collections::HashSet<_> = records
                .iter()
                .map(|r| (r.meta.aggregate_id.clone(), r.meta.sequence))
                .collect();
            distinct.len() == stored.len()
        })
        .await;
    let mut seen: HashMap<String, i64> = HashMap::new();
    let mut copies = 0;
    for record in &records {
        let id = record.meta.aggregate_id.clone();
        let sequence = i64::try_from(record.meta.sequence).expect("sequence");
        assert_eq!(
            expected.get(&(id.clone(), sequence)),
            Some(&record.meta.event_id),
            "a record of the topic is the stored event {id}/{sequence}"
        );
        let high = seen.entry(id.clone()).or_insert(0);
        if sequence <= *high {
            copies += 1;
        } else {
            assert_eq!(
                sequence,
                *high + 1,
                "order {id}: event {sequence} published before event {}",
                *high + 1
            );
            *high = sequence;
        }
    }
    let published: BTreeMap<String, i64> = seen.into_iter().collect();
    assert_eq!(
        published, last,
        "every event of every order is on the topic"
    );
    eprintln!(
        "{} records for {} events ({copies} re-sent copies); {waiting_at_kill} rows waited at the kill",
        records.len(),
        stored.len()
    );
    assert!(
        waiting_at_kill > 0 || copies > 0,
        "the kill landed mid-stream"
    );

    sigkill(&mut standby);
    env.stop().await;
}
