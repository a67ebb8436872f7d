//! Crashes: the relay and the projector are killed with SIGKILL mid-stream and restarted;
//! nothing is lost and nothing is applied twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backbone_tests::{confirm_payment, eventually, place_order, status_after, KillOnDrop, TestEnv};

type View = BTreeMap<String, (String, i64, Vec<(i64, String)>)>;

/// What a clean run produces, computed from the event store alone (the statuses from the test's
/// own table of event types).
async fn expected_view(env: &TestEnv) -> View {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_type FROM events WHERE aggregate_type = 'order' \
         ORDER BY aggregate_id, sequence",
    )
    .fetch_all(env.pool())
    .await
    .expect("events");
    let mut view = View::new();
    for (id, sequence, event_type) in rows {
        let entry = view
            .entry(id)
            .or_insert_with(|| (String::new(), 0, Vec::new()));
        entry.1 = sequence;
        if let Some(status) = status_after(&event_type) {
            entry.0 = status.to_owned();
            entry.2.push((sequence, status.to_owned()));
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

/// The additive `orders` counter of analytics: one per `OrderPlaced` applied, so an event
/// applied twice counts twice.
async fn orders_counted(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(orders), 0)::bigint FROM analytics.hourly")
        .fetch_one(env.pool())
        .await
        .unwrap_or(0)
}

/// Records a read model refused into its dead letters. A record applied twice shows here: the
/// second `OrderPlaced` of an order breaks analytics' fact table's key (the additive counter is
/// shielded by it), and in a crash test no record has any other reason to be refused.
async fn dead_letters(env: &TestEnv, schema: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.dead_letters"))
        .fetch_one(env.pool())
        .await
        .expect("dead letters")
}

/// Events a read model has applied (the sum of its last applied sequence per aggregate).
async fn applied_events(env: &TestEnv, schema: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(sum(last_sequence), 0)::bigint FROM {schema}.applied"
    ))
    .fetch_one(env.pool())
    .await
    .unwrap_or(0)
}

/// Waits until `read_model`'s consumer group has consumed every record of the orders topic: its
/// committed offsets on the broker are the partitions' ends.
async fn all_consumed(env: &TestEnv, read_model: &str) {
    let topic = env.kafka.topics().for_aggregate("order").expect("topic");
    let group = env.group_of(read_model);
    eventually(
        Duration::from_secs(60),
        &format!("{read_model} to consume every record"),
        || async {
            (env.committed_offsets(&group, &topic) == env.high_watermarks(&topic)).then_some(())
        },
    )
    .await;
}

/// The outbox: its highest id, and how many of its rows up to `up_to` are unpublished.
async fn outbox_top(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT coalesce(max(id), 0)::bigint FROM outbox")
        .fetch_one(env.pool())
        .await
        .expect("outbox")
}

async fn unpublished_up_to(env: &TestEnv, up_to: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL AND id <= $1")
        .bind(up_to)
        .fetch_one(env.pool())
        .await
        .expect("outbox")
}

async fn published_events(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
        .fetch_one(env.pool())
        .await
        .expect("outbox")
}

fn kill(child: &mut KillOnDrop) {
    // SIGKILL: no shutdown path runs.
    child.0.kill().expect("kill");
    child.0.wait().expect("reaped");
}

const RELAY: &[(&str, &str)] = &[("RELAY_BATCH_SIZE", "5")];
const PROJECTOR: &[(&str, &str)] = &[
    ("PROJECTOR_BATCH_SIZE", "20"),
    ("PROJECTIONS", "tracking,analytics"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_relay_and_the_projector_mid_stream_loses_nothing_and_doubles_nothing() {
    let env = TestEnv::start("crash").await;
    let orders = env.orders();
    let mut relay = KillOnDrop(env.spawn_process("relay", RELAY));
    let mut projector = KillOnDrop(env.spawn_process("projector", PROJECTOR));

    // Orders (every other one confirmed) until the kills are over, three writers at once.
    let stop = Arc::new(AtomicBool::new(false));
    let placed = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..3 {
        let (orders, stop, placed) = (orders.clone(), stop.clone(), placed.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = place_order(&orders).await;
                placed.fetch_add(1, Ordering::Relaxed);
                if i % 2 == 0 {
                    confirm_payment(&orders, &id, format!("p{writer}-{i}")).await;
                }
                i += 1;
            }
        }));
    }
    let writing =
        |writers: &[tokio::task::JoinHandle<()>]| writers.iter().all(|w| !w.is_finished());

    // Three rounds: each kills the relay while it has rows to publish, and the projector while
    // records wait for it, the writers going on all along.
    // What each had done when it last (re)started: a kill comes once it has done more.
    let (mut relay_from, mut projector_from) = (0, 0);
    for round in 1..=3 {
        // The relay: killed with rows committed before the kill still unpublished after it
        // (a dead relay publishes nothing, so they were unpublished when it died).
        let top = eventually(
            Duration::from_secs(60),
            &format!("round {round}: a backlog for the relay"),
            || async {
                let top = outbox_top(&env).await;
                (published_events(&env).await > relay_from
                    && unpublished_up_to(&env, top).await >= 10)
                    .then_some(top)
            },
        )
        .await;
        assert!(writing(&writers), "round {round}: the writers still write");
        kill(&mut relay);
        let stranded = unpublished_up_to(&env, top).await;
        assert!(
            stranded > 0,
            "round {round}: the relay died with rows to publish"
        );
        relay = KillOnDrop(env.spawn_process("relay", RELAY));
        relay_from = published_events(&env).await;

        // The projector: killed with published events it had not applied (it applies nothing
        // once dead, so what it had applied then is below what was published before).
        let published = eventually(
            Duration::from_secs(60),
            &format!("round {round}: the projector applying, behind the relay"),
            || async {
                let published = published_events(&env).await;
                let tracking = applied_events(&env, "tracking").await;
                let analytics = applied_events(&env, "analytics").await;
                (tracking > projector_from && tracking.max(analytics) + 5 < published)
                    .then_some(published)
            },
        )
        .await;
        assert!(writing(&writers), "round {round}: the writers still write");
        kill(&mut projector);
        let applied = (
            applied_events(&env, "tracking").await,
            applied_events(&env, "analytics").await,
        );
        // Against what was published when it died (read models apply at their own pace: the
        // one sampled above may have caught up with the earlier count just before the kill).
        let published = published.max(published_events(&env).await);
        assert!(
            applied.0 < published && applied.1 < published,
            "round {round}: the projector died with records to apply ({applied:?} of {published})"
        );
        projector = KillOnDrop(env.spawn_process("projector", PROJECTOR));
        projector_from = applied.0;
    }

    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer finished");
    }
    let placed = i64::try_from(placed.load(Ordering::Relaxed)).expect("count");
    let expected = expected_view(&env).await;
    assert_eq!(
        i64::try_from(expected.len()).expect("count"),
        placed,
        "every order the writers placed is in the store"
    );
    let projected = eventually(
        Duration::from_secs(120),
        "the read model to catch up",
        || async {
            let projected = projected_view(&env).await;
            (projected == expected).then_some(projected)
        },
    )
    .await;
    assert_eq!(projected.len(), expected.len());

    // Analytics counts each order placed once, additively: a record applied twice (after a
    // relay re-sent it, or after a projector restarted from an older committed offset) would
    // count twice. Read once the analytics group has consumed every record on the broker,
    // duplicates included (its committed offsets at each partition's end).
    all_consumed(&env, "analytics").await;
    assert_eq!(
        orders_counted(&env).await,
        placed,
        "each order counted once in analytics"
    );
    for schema in ["tracking", "analytics"] {
        assert_eq!(
            dead_letters(&env, schema).await,
            0,
            "{schema}: nothing refused"
        );
    }

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

/// Which client owns each partition of `read_model`'s topics, as the broker's group
/// coordinator describes the group (stable, every partition assigned once).
fn owners(env: &TestEnv, read_model: &str) -> Option<BTreeMap<(String, i32), String>> {
    let members = env.group_members(&env.group_of(read_model))?;
    let mut owners = BTreeMap::new();
    for (client, partitions) in members {
        for partition in partitions {
            if owners.insert(partition, client.clone()).is_some() {
                return None;
            }
        }
    }
    Some(owners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_projector_instances_share_the_partitions_and_a_killed_ones_move_to_the_other() {
    let env = TestEnv::start("instances").await;
    let orders = env.orders();
    let relay = env.start_relay().await;
    let settings = |client: &'static str| {
        [
            ("PROJECTIONS", "tracking,analytics"),
            ("PROJECTOR_BATCH_SIZE", "20"),
            ("KAFKA_PROPERTIES", client),
        ]
    };
    let mut first = KillOnDrop(env.spawn_process("projector", &settings("client.id=first")));
    let mut second = KillOnDrop(env.spawn_process("projector", &settings("client.id=second")));
    // Both read models read two topics.
    let partitions = 2 * usize::try_from(env.kafka.kafka_partitions).expect("partitions");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (orders, stop) = (orders.clone(), stop.clone());
        tokio::spawn(async move {
            let mut placed = 0;
            while placed < 300 || !stop.load(Ordering::Relaxed) {
                let id = place_order(&orders).await;
                confirm_payment(&orders, &id, format!("p{placed}")).await;
                placed += 1;
                // A pace, not a synchronisation: traffic spread over the rebalances.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            placed
        })
    };

    // Each instance takes partitions of each read model, as the broker's group says.
    for read_model in ["tracking", "analytics"] {
        eventually(
            Duration::from_secs(60),
            "both instances owning partitions",
            || async {
                let owners = owners(&env, read_model)?;
                let clients: BTreeSet<&str> = owners.values().map(String::as_str).collect();
                (owners.len() == partitions && clients == BTreeSet::from(["first", "second"]))
                    .then_some(())
            },
        )
        .await;
    }

    // One dies mid-stream: the other takes over all its partitions.
    assert!(!writer.is_finished(), "the writer is still writing");
    kill(&mut first);
    for read_model in ["tracking", "analytics"] {
        eventually(
            Duration::from_secs(90),
            "the survivor owning every partition",
            || async {
                let owners = owners(&env, read_model)?;
                (owners.len() == partitions && owners.values().all(|o| o == "second")).then_some(())
            },
        )
        .await;
    }

    stop.store(true, Ordering::Relaxed);
    let placed = i64::from(writer.await.expect("writer finished"));
    let expected = expected_view(&env).await;
    assert_eq!(i64::try_from(expected.len()).expect("count"), placed);
    eventually(Duration::from_secs(90), "tracking to catch up", || async {
        (projected_view(&env).await == expected).then_some(())
    })
    .await;
    // Analytics counts additively (orders = orders + 1): a doubled event would show. Read once
    // the group has consumed every record on the broker.
    all_consumed(&env, "analytics").await;
    assert_eq!(
        orders_counted(&env).await,
        placed,
        "nothing lost, nothing doubled"
    );
    for schema in ["tracking", "analytics"] {
        assert_eq!(
            dead_letters(&env, schema).await,
            0,
            "{schema}: nothing refused"
        );
    }

    kill(&mut second);
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
