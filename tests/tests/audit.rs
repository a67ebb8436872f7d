//! For auditors: the hash chain of the event log with its anchors (`replay-tools verify`,
//! `anchor`, `verify --topics`) and the reconciliation of store, topics and read models
//! (`replay-tools reconcile`), run as child processes against the real pipeline and tampered
//! with the way someone with SQL or broker access would.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use backbone_tests::tools::{self, everything_published, raw_records};
use backbone_tests::{eventually, place_order, TestEnv};
use chrono::{DateTime, Utc};
use commands::{CommandBus, CommandContext};
use domain::order::{Order, OrderCommand};
use projections::{AnalyticsProjection, TrackingProjection};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use uuid::Uuid;

/// Events each test order has: placed, confirmed, accepted, preparing, ready, out for delivery.
const EVENTS_PER_ORDER: i64 = 6;

/// Places an order and takes it to "out for delivery" through the command bus.
async fn order_with_history(orders: &CommandBus<Order>) -> String {
    let id = place_order(orders).await;
    let steps = [
        OrderCommand::ConfirmPayment {
            payment_reference: format!("pay-{id}"),
        },
        OrderCommand::AcceptOrder {
            estimated_preparation_minutes: 12,
        },
        OrderCommand::StartPreparation,
        OrderCommand::MarkReady,
        OrderCommand::HandToCourier,
    ];
    for step in steps {
        orders
            .execute(&id, step, &CommandContext::new("store:test"))
            .await
            .expect("order step");
    }
    id
}

/// Runs `replay-tools` as a user would, configured for `env`.
async fn replay_tools(env: &TestEnv, args: &[&str]) -> Output {
    tools::replay_tools(env, args, &[]).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `finding: <type> <id> #<sequence> <kinds>: <details>` lines, as (id, sequence) → kinds
/// (findings about the anchors themselves are left out).
fn findings(output: &Output) -> BTreeMap<(String, i64), String> {
    stdout(output)
        .lines()
        .filter_map(|line| line.strip_prefix("finding: "))
        .filter(|rest| !rest.starts_with("anchors "))
        .map(|rest| {
            let mut words = rest.split_whitespace();
            let _aggregate_type = words.next();
            let id = words.next().expect("an aggregate id").to_owned();
            let sequence = words
                .next()
                .and_then(|s| s.strip_prefix('#'))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("a sequence in `{rest}`"));
            let kinds = words
                .next()
                .expect("kinds")
                .trim_end_matches(':')
                .to_owned();
            ((id, sequence), kinds)
        })
        .collect()
}

fn text(hasher: &mut Sha256, value: &str) {
    hasher.update((value.len() as u64).to_be_bytes());
    hasher.update(value.as_bytes());
}

/// Recomputes every stored chain hash from the encoding the migration documents, independently
/// of `replay-tools`, and checks each event links to the one before it.
async fn assert_chain_as_documented(env: &TestEnv) -> usize {
    type Row = (
        String,
        String,
        i64,
        String,
        String,
        String,
        String,
        Uuid,
        DateTime<Utc>,
        Vec<u8>,
        Vec<u8>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload::text, \
                metadata::text, event_id, recorded_at, chain_prev, chain_hash \
         FROM events ORDER BY aggregate_type, aggregate_id, sequence",
    )
    .fetch_all(env.pool())
    .await
    .expect("events with their chain");
    let mut previous: Option<(String, String, Vec<u8>)> = None;
    for (t, i, s, event_type, version, payload, metadata, event_id, recorded_at, prev, hash) in
        &rows
    {
        let expected_prev = match &previous {
            Some((pt, pi, h)) if pt == t && pi == i => h.clone(),
            _ => vec![0; 32],
        };
        assert_eq!(
            prev, &expected_prev,
            "{t} {i} #{s} links to its predecessor"
        );
        let mut content = Sha256::new();
        text(&mut content, t);
        text(&mut content, i);
        content.update(s.to_be_bytes());
        text(&mut content, event_type);
        text(&mut content, version);
        text(&mut content, payload);
        text(&mut content, metadata);
        content.update(event_id.as_bytes());
        content.update(recorded_at.timestamp_micros().to_be_bytes());
        let mut chained = Sha256::new();
        chained.update(prev);
        chained.update(content.finalize());
        assert_eq!(
            hash.as_slice(),
            chained.finalize().as_slice(),
            "{t} {i} #{s}"
        );
        previous = Some((t.clone(), i.clone(), hash.clone()));
    }
    rows.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_each_altered_deleted_and_swapped_event_and_nothing_else() {
    let env = TestEnv::start("audit_verify").await;
    let orders = env.orders();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(order_with_history(&orders).await);
    }
    let stored = assert_chain_as_documented(&env).await;
    assert_eq!(stored, 4 * EVENTS_PER_ORDER as usize);

    let clean = replay_tools(&env, &["verify"]).await;
    assert!(
        clean.status.success(),
        "{}{}",
        stdout(&clean),
        stderr(&clean)
    );
    assert!(findings(&clean).is_empty(), "{}", stdout(&clean));
    assert!(
        stdout(&clean).contains(&format!(
            "verified {stored} events in 4 aggregates; 0 findings"
        )),
        "{}",
        stdout(&clean)
    );

    let anchored = replay_tools(&env, &["anchor"]).await;
    assert!(anchored.status.success(), "{}", stderr(&anchored));
    assert!(
        stdout(&anchored).contains("anchor #1 taken at")
            && stdout(&anchored).contains(&format!("4 aggregates, {stored} events")),
        "{}",
        stdout(&anchored)
    );
    // Appending after the anchor is what the store is for: not a finding.
    let later = order_with_history(&orders).await;

    // The attacker, with SQL access.
    let pool = env.pool();
    let (altered, middle, last, swapped) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let payload: String = sqlx::query_scalar(
        "SELECT payload::text FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = 2",
    )
    .bind(altered)
    .fetch_one(pool)
    .await
    .expect("payload");
    // One byte: the last digit, to another digit (the JSON stays valid).
    let at = payload
        .rfind(|c: char| c.is_ascii_digit())
        .expect("a digit");
    let digit = payload.as_bytes()[at] - b'0';
    let mut forged = payload.clone().into_bytes();
    forged[at] = b'0' + (digit + 1) % 10;
    let forged = String::from_utf8(forged).expect("utf-8");
    assert_eq!(forged.len(), payload.len());
    sqlx::query(
        "UPDATE events SET payload = $2::text::json \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = 2",
    )
    .bind(altered)
    .bind(&forged)
    .execute(pool)
    .await
    .expect("payload altered");
    sqlx::query(
        "DELETE FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = 3",
    )
    .bind(middle)
    .execute(pool)
    .await
    .expect("middle event deleted");
    sqlx::query(
        "DELETE FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = $2",
    )
    .bind(last)
    .bind(EVENTS_PER_ORDER)
    .execute(pool)
    .await
    .expect("last event deleted");
    let mut tx = pool.begin().await.expect("transaction");
    for (from, to) in [(2, 1_000_000), (4, 2), (1_000_000, 4)] {
        sqlx::query(
            "UPDATE events SET sequence = $3 \
             WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = $2",
        )
        .bind(swapped)
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await
        .expect("sequences swapped");
    }
    tx.commit().await.expect("swap committed");

    let tampered = replay_tools(&env, &["verify"]).await;
    assert!(!tampered.status.success(), "{}", stdout(&tampered));
    let expected: BTreeMap<(String, i64), String> = [
        ((altered.clone(), 2), "altered"),
        ((middle.clone(), 3), "deleted"),
        ((last.clone(), EVENTS_PER_ORDER), "deleted"),
        ((swapped.clone(), 2), "reordered"),
        ((swapped.clone(), 4), "reordered"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect();
    assert_eq!(findings(&tampered), expected, "{}", stdout(&tampered));
    assert!(!stdout(&tampered).contains(&later));
    assert!(
        stderr(&tampered).contains("verify found 5 problems"),
        "{}",
        stderr(&tampered)
    );

    // An anchor does not bless a store that lost what the previous one recorded.
    let refused = replay_tools(&env, &["anchor"]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("refusing to anchor") && stderr(&refused).contains(last.as_str()),
        "{}",
        stderr(&refused)
    );

    // Mistakes a user can make get a message, not a panic.
    for (args, message) in [
        (&["verify", "--anchor-hash", "xyz"][..], "not hex"),
        (&["verify", "--from", "order"][..], "is not TYPE:ID"),
        (&["verify", "--batch-size", "0"][..], "batch-size"),
    ] {
        let output = replay_tools(&env, args).await;
        assert!(!output.status.success(), "{args:?}");
        assert!(
            stderr(&output).contains(message),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
    }
    // An anchor hash kept outside the database that no anchor has.
    let unknown = "ab".repeat(32);
    let missing = replay_tools(&env, &["verify", "--anchor-hash", &unknown]).await;
    assert!(!missing.status.success());
    assert!(stdout(&missing).contains(&unknown), "{}", stdout(&missing));
    env.stop().await;
}

fn header_of(message: &OwnedMessage, name: &str) -> String {
    message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| panic!("header {name}"))
}

/// The record of `id` at `sequence`.
fn record<'a>(records: &'a [OwnedMessage], id: &str, sequence: i64) -> &'a OwnedMessage {
    records
        .iter()
        .find(|m| {
            header_of(m, "aggregate_id") == id && header_of(m, "sequence") == sequence.to_string()
        })
        .unwrap_or_else(|| panic!("record {id} #{sequence}"))
}

/// `message`'s headers with some values replaced.
fn headers_with(message: &OwnedMessage, replaced: &[(&str, String)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    for header in message.headers().expect("headers").iter() {
        let value = replaced
            .iter()
            .find(|(name, _)| *name == header.key)
            .map_or_else(
                || header.value.unwrap_or_default().to_vec(),
                |(_, v)| v.as_bytes().to_vec(),
            );
        headers = headers.insert(Header {
            key: header.key,
            value: Some(&value),
        });
    }
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topic_copy_verifies_and_a_record_that_does_not_link_or_differs_is_named() {
    let env = TestEnv::start("audit_topics").await;
    let relay = env.start_relay().await;
    let orders = env.orders();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(order_with_history(&orders).await);
    }
    let events = 3 * EVENTS_PER_ORDER;
    everything_published(&env, events).await;

    let clean = replay_tools(&env, &["verify", "--topics"]).await;
    assert!(
        clean.status.success(),
        "{}{}",
        stdout(&clean),
        stderr(&clean)
    );
    assert!(
        stdout(&clean).contains(&format!("verified {events} records of 3 aggregates")),
        "{}",
        stdout(&clean)
    );
    // The chain headers are the store's chain.
    let topic = env
        .kafka
        .topics()
        .for_aggregate("order")
        .expect("orders topic");
    let records = raw_records(&env, &topic, usize::try_from(events).expect("count")).await;
    for message in &records {
        let (id, sequence) = (
            header_of(message, "aggregate_id"),
            header_of(message, "sequence"),
        );
        let (prev, hash): (Vec<u8>, Vec<u8>) = sqlx::query_as(
            "SELECT chain_prev, chain_hash FROM events \
             WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = $2",
        )
        .bind(&id)
        .bind(sequence.parse::<i64>().expect("sequence"))
        .fetch_one(env.pool())
        .await
        .expect("stored event");
        assert_eq!(header_of(message, "chain_prev"), hex::encode(prev));
        assert_eq!(header_of(message, "chain_hash"), hex::encode(hash));
    }

    // Someone with access to the broker appends a record to the first order that claims to be
    // its next event but is chained to nothing it holds...
    let producer: FutureProducer = env.kafka.client_config().create().expect("producer");
    let head = record(&records, &ids[0], EVENTS_PER_ORDER);
    let unlinked = headers_with(
        head,
        &[
            ("sequence", (EVENTS_PER_ORDER + 1).to_string()),
            ("event_id", Uuid::new_v4().to_string()),
            ("chain_prev", hex::encode(rand::random::<[u8; 32]>())),
            ("chain_hash", hex::encode(rand::random::<[u8; 32]>())),
        ],
    );
    // ...and re-sends the second order's first record with the first order's body.
    let original = record(&records, &ids[1], 1);
    let other_body = record(&records, &ids[0], 1);
    for (target, headers, body) in [
        (head, unlinked, head.payload()),
        (original, headers_with(original, &[]), other_body.payload()),
    ] {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(target.partition())
                    .key(target.key().expect("key"))
                    .payload(body.expect("body"))
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("tampered record produced");
    }

    let tampered = replay_tools(&env, &["verify", "--topics"]).await;
    assert!(!tampered.status.success(), "{}", stdout(&tampered));
    let found = findings(&tampered);
    assert_eq!(
        found.keys().cloned().collect::<Vec<_>>(),
        {
            let mut expected = vec![(ids[0].clone(), EVENTS_PER_ORDER + 1), (ids[1].clone(), 1)];
            expected.sort();
            expected
        },
        "{}",
        stdout(&tampered)
    );
    assert!(found[&(ids[0].clone(), EVENTS_PER_ORDER + 1)].contains("unlinked"));
    assert!(found[&(ids[1].clone(), 1)].contains("content-differs"));
    relay.stop().await.expect("relay stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_nothing_once_settled_and_exactly_a_deleted_tracking_row() {
    let env = TestEnv::start("audit_reconcile").await;
    let relay = env.start_relay().await;
    let tracking = env.start_projector(Arc::new(TrackingProjection)).await;
    let analytics = env.start_projector(Arc::new(AnalyticsProjection)).await;
    let orders = env.orders();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(order_with_history(&orders).await);
    }
    let events = 3 * EVENTS_PER_ORDER;
    everything_published(&env, events).await;
    for schema in ["tracking", "analytics"] {
        eventually(Duration::from_secs(30), schema, || async {
            let applied: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT sum(last_sequence)::bigint FROM {schema}.applied WHERE aggregate_type = 'order'"
            ))
            .fetch_one(env.pool())
            .await
            .ok()?;
            (applied == Some(events)).then_some(())
        })
        .await;
    }
    let differences = |output: &Output| -> Vec<String> {
        stdout(output)
            .lines()
            .filter(|l| l.starts_with("difference: "))
            .map(str::to_owned)
            .collect()
    };

    let settled = replay_tools(&env, &["reconcile"]).await;
    assert!(
        settled.status.success(),
        "{}{}",
        stdout(&settled),
        stderr(&settled)
    );
    assert!(differences(&settled).is_empty());
    let summary = stdout(&settled);
    for place in ["store", "topic", "analytics", "tracking"] {
        assert!(
            summary.contains(&format!("{place} {events} events in 3 aggregates")),
            "{place}: {summary}"
        );
    }

    sqlx::query("DELETE FROM tracking.orders WHERE order_id = $1")
        .bind(&ids[1])
        .execute(env.pool())
        .await
        .expect("row deleted");
    let broken = replay_tools(&env, &["reconcile"]).await;
    assert!(!broken.status.success());
    let found = differences(&broken);
    assert_eq!(found.len(), 1, "{}", stdout(&broken));
    assert!(
        found[0].contains(&ids[1]) && found[0].contains("tracking.orders: no row"),
        "{}",
        found[0]
    );

    // Limited to another read model, nothing differs; an unknown one is refused.
    let limited = replay_tools(
        &env,
        &["reconcile", "--read-model", "analytics", "--no-topics"],
    )
    .await;
    assert!(
        limited.status.success(),
        "{}{}",
        stdout(&limited),
        stderr(&limited)
    );
    let unknown = replay_tools(&env, &["reconcile", "--read-model", "nope"]).await;
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no read model `nope`"),
        "{}",
        stderr(&unknown)
    );
    tracking.stop().await.expect("tracking stops");
    analytics.stop().await.expect("analytics stops");
    relay.stop().await.expect("relay stops");
    env.stop().await;
}
