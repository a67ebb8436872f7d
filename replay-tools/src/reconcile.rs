//! `replay-tools reconcile`: the event store ⇄ the topics ⇄ the read models.
//!
//! Three places should agree on how far every aggregate got: the event store (its last
//! sequence), the topic copy (the highest sequence in its records' headers) and each read model
//! that follows the aggregate's type (the consumer runtime's `<schema>.applied`, written in the
//! transaction that changes the read model, so it is the one row shape every read model shares).
//! Per aggregate type, the event counts (a read model's: the sum of its last applied sequences)
//! and a checksum (SHA-256 over the `(aggregate id, last sequence)` pairs sorted bytewise) are
//! printed side by side. The tracking read model is also checked row by row: `tracking.orders`
//! holds one row per order, at the sequence tracking applied last.
//!
//! Every difference is one line `difference: ...` naming the aggregate, the place and what each
//! side has; the command fails when there is any.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use anyhow::{bail, Context};
use futures::TryStreamExt;
use projections::operations;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use streams::{EventMeta, KafkaConfig};

use crate::chain::TopicScan;
use crate::progress;

/// `replay-tools reconcile`.
#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// Only this read model (default: every read model in the database).
    #[arg(long, value_name = "NAME")]
    pub read_model: Option<String>,
    /// Compare the event store with the read models only, without reading the topics.
    #[arg(long)]
    pub no_topics: bool,
}

/// The aggregate types a read model follows: those of the project's projections, else (a read
/// model this tool does not know) the types found in its `applied` table.
async fn followed_types(pool: &PgPool, name: &str) -> anyhow::Result<Vec<String>> {
    if let Ok(projection) = projections::read_models::by_name(name) {
        return Ok(projection
            .aggregate_types()
            .iter()
            .map(|t| (*t).to_owned())
            .collect());
    }
    Ok(sqlx::query_scalar(&format!(
        "SELECT DISTINCT aggregate_type FROM {name}.applied ORDER BY 1"
    ))
    .fetch_all(pool)
    .await?)
}

/// Where each place stands for one aggregate.
#[derive(Debug, Default, Clone)]
struct Sides {
    store: Option<i64>,
    store_events: i64,
    topic: Option<i64>,
    topic_events: i64,
    models: Vec<Option<i64>>,
}

/// Per aggregate type and place: events and a running checksum.
#[derive(Debug, Default)]
struct Tally {
    aggregates: i64,
    events: i64,
    hasher: Sha256,
}

impl Tally {
    fn add(&mut self, aggregate_id: &str, last: i64, events: i64) {
        self.aggregates += 1;
        self.events += events;
        self.hasher
            .update((aggregate_id.len() as u64).to_be_bytes());
        self.hasher.update(aggregate_id.as_bytes());
        self.hasher.update(last.to_be_bytes());
    }

    fn finish(self) -> (i64, i64, String) {
        (
            self.aggregates,
            self.events,
            hex::encode(self.hasher.finalize()),
        )
    }
}

fn show(value: Option<i64>) -> String {
    value.map_or_else(|| "none".to_owned(), |v| format!("#{v}"))
}

/// A read model to compare, and the aggregate types it follows.
type Model = (String, Vec<String>);

/// Where every aggregate stands, per place, as read so far.
struct Positions {
    models: Vec<Model>,
    sides: BTreeMap<(String, String), Sides>,
    blank: Sides,
    differences: Vec<String>,
}

impl Positions {
    fn entry(&mut self, aggregate_type: String, aggregate_id: String) -> &mut Sides {
        let blank = &self.blank;
        self.sides
            .entry((aggregate_type, aggregate_id))
            .or_insert_with(|| blank.clone())
    }

    fn follows(&self, index: usize, aggregate_type: &str) -> bool {
        self.models[index].1.iter().any(|f| f == aggregate_type)
    }
}

/// `replay-tools reconcile`.
pub async fn reconcile(
    pool: &PgPool,
    args: ReconcileArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let models = models_to_compare(pool, args.read_model.as_deref()).await?;
    let mut at = Positions {
        blank: Sides {
            models: vec![None; models.len()],
            ..Sides::default()
        },
        models,
        sides: BTreeMap::new(),
        differences: Vec::new(),
    };
    read_store(pool, &mut at).await?;
    let kafka = if args.no_topics {
        None
    } else {
        Some(KafkaConfig::from_env().context("KAFKA_* settings")?)
    };
    if let Some(kafka) = &kafka {
        read_topics(kafka, &mut at).await?;
    }
    read_applied(pool, &mut at).await?;
    let has_topic = |t: &str| {
        kafka
            .as_ref()
            .is_some_and(|k| k.topics().for_aggregate(t).is_some())
    };
    let tallies = compare_aggregates(pool, &mut at, &has_topic).await?;
    if at.models.iter().any(|(name, _)| name == "tracking") {
        check_tracking_rows(pool, &mut at.differences).await?;
    }
    let summary = compare_types(&mut at, tallies, &has_topic);

    for line in at.differences.iter().chain(&summary) {
        writeln!(out, "{line}")?;
    }
    let compared: Vec<String> = std::iter::once("the event store".to_owned())
        .chain(kafka.is_some().then(|| "the topics".to_owned()))
        .chain(
            at.models
                .iter()
                .map(|(name, _)| format!("read model {name}")),
        )
        .collect();
    writeln!(
        out,
        "summary: compared {} over {} aggregates; {} differences",
        compared.join(", "),
        at.sides.len(),
        at.differences.len()
    )?;
    if !at.differences.is_empty() {
        bail!("reconcile found {} differences", at.differences.len());
    }
    Ok(())
}

/// The read models to compare (one, or every one in the database) with the types they follow.
async fn models_to_compare(pool: &PgPool, only: Option<&str>) -> anyhow::Result<Vec<Model>> {
    let all = operations::read_models(pool).await?;
    let names: Vec<String> = match only {
        Some(name) => match operations::find(pool, name).await? {
            Some(found) => vec![found],
            None => bail!(
                "no read model `{name}` in this database; known: {}",
                if all.is_empty() {
                    "none".to_owned()
                } else {
                    all.join(", ")
                }
            ),
        },
        None => all,
    };
    let mut models = Vec::with_capacity(names.len());
    for name in names {
        let types = followed_types(pool, &name).await?;
        models.push((name, types));
    }
    Ok(models)
}

/// The event store: each aggregate's last sequence and event count.
async fn read_store(pool: &PgPool, at: &mut Positions) -> anyhow::Result<()> {
    let mut rows = sqlx::query_as::<_, (String, String, i64, i64)>(
        "SELECT aggregate_type, aggregate_id, max(sequence), count(*) FROM events GROUP BY 1, 2",
    )
    .fetch(pool);
    while let Some((t, i, last, count)) = rows.try_next().await.context("reading events")? {
        let entry = at.entry(t, i);
        entry.store = Some(last);
        entry.store_events = count;
    }
    Ok(())
}

/// The topics: the identity headers of every record.
async fn read_topics(kafka: &KafkaConfig, at: &mut Positions) -> anyhow::Result<()> {
    let topics = kafka.topics();
    let cancel = progress::interrupted();
    let mut scan = TopicScan::open(kafka, &topics.all())?;
    let bar = progress::bar("topics", Some(scan.total));
    let mut records = 0_u64;
    while let Some(message) = scan.next().await? {
        records += 1;
        match EventMeta::from_headers(rdkafka::Message::headers(&message)) {
            Ok(meta) => {
                let sequence = i64::try_from(meta.sequence).unwrap_or(i64::MAX);
                let entry = at.entry(meta.aggregate_type, meta.aggregate_id);
                if entry.topic.is_none_or(|seen| sequence > seen) {
                    entry.topic = Some(sequence);
                    entry.topic_events += 1;
                }
            }
            Err(e) => at.differences.push(format!(
                "difference: record {}/{}@{}: no readable identity ({e})",
                rdkafka::Message::topic(&message),
                rdkafka::Message::partition(&message),
                rdkafka::Message::offset(&message)
            )),
        }
        if records.is_multiple_of(1000) {
            bar.set_position(records);
            if cancel.is_cancelled() {
                bar.finish_and_clear();
                bail!(
                    "interrupted after {records} of {} records: nothing was compared",
                    scan.total
                );
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The read models' applied sequences.
async fn read_applied(pool: &PgPool, at: &mut Positions) -> anyhow::Result<()> {
    for index in 0..at.models.len() {
        let (name, types) = at.models[index].clone();
        let sql = format!(
            "SELECT aggregate_type, aggregate_id, last_sequence FROM {name}.applied \
             WHERE aggregate_type = ANY($1)"
        );
        let mut rows = sqlx::query_as::<_, (String, String, i64)>(&sql)
            .bind(&types)
            .fetch(pool);
        while let Some((t, i, last)) = rows
            .try_next()
            .await
            .with_context(|| format!("reading {name}.applied"))?
        {
            at.entry(t, i).models[index] = Some(last);
        }
    }
    Ok(())
}

/// Per aggregate, a difference wherever a place is not where the store is; returns the tallies
/// per aggregate type and place.
async fn compare_aggregates(
    pool: &PgPool,
    at: &mut Positions,
    has_topic: &impl Fn(&str) -> bool,
) -> anyhow::Result<BTreeMap<(String, String), Tally>> {
    let unpublished: HashMap<(String, String), i64> = sqlx::query_as::<_, (String, String, i64)>(
        "SELECT aggregate_type, aggregate_id, count(*) FROM outbox WHERE published_at IS NULL GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(t, i, n)| ((t, i), n))
    .collect();
    let mut tallies: BTreeMap<(String, String), Tally> = BTreeMap::new();
    let mut tally = |t: &str, place: &str, i: &str, last: i64, events: i64| {
        tallies
            .entry((t.to_owned(), place.to_owned()))
            .or_default()
            .add(i, last, events);
    };
    let mut differences = Vec::new();
    for ((t, i), side) in &at.sides {
        let mut places: Vec<(String, Option<i64>)> = vec![("store".to_owned(), side.store)];
        if let Some(last) = side.store {
            tally(t, "store", i, last, side.store_events);
        }
        if has_topic(t) {
            places.push(("topic".to_owned(), side.topic));
            if let Some(last) = side.topic {
                tally(t, "topic", i, last, side.topic_events);
            }
        }
        for (index, (name, _)) in at.models.iter().enumerate() {
            if !at.follows(index, t) {
                continue;
            }
            places.push((name.clone(), side.models[index]));
            if let Some(last) = side.models[index] {
                tally(t, name, i, last, last);
            }
        }
        if places.iter().any(|(_, v)| *v != side.store) {
            let listed: Vec<String> = places
                .iter()
                .map(|(place, v)| format!("{place} {}", show(*v)))
                .collect();
            let behind = unpublished
                .get(&(t.clone(), i.clone()))
                .map(|n| format!(" ({n} events not published yet: the relay is behind)"))
                .unwrap_or_default();
            differences.push(format!(
                "difference: {t} {i} last sequence: {}{behind}",
                listed.join(", ")
            ));
        }
    }
    at.differences.extend(differences);
    Ok(tallies)
}

/// The tracking read model, row by row: one row per order, at the sequence tracking applied.
async fn check_tracking_rows(pool: &PgPool, differences: &mut Vec<String>) -> anyhow::Result<()> {
    let present: bool = sqlx::query_scalar("SELECT to_regclass('tracking.orders') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !present {
        return Ok(());
    }
    let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT a.aggregate_id, a.last_sequence, o.last_sequence \
         FROM tracking.applied a \
         LEFT JOIN tracking.orders o ON o.order_id = a.aggregate_id \
         WHERE a.aggregate_type = 'order' AND o.last_sequence IS DISTINCT FROM a.last_sequence \
         ORDER BY a.aggregate_id",
    )
    .fetch_all(pool)
    .await?;
    for (order, applied, row) in rows {
        differences.push(match row {
            None => format!(
                "difference: order {order} tracking.orders: no row, though tracking applied the order's events up to #{applied}"
            ),
            Some(at) => format!(
                "difference: order {order} tracking.orders: the row is at #{at}, though tracking applied the order's events up to #{applied}"
            ),
        });
    }
    let extra: Vec<(String, i64)> = sqlx::query_as(
        "SELECT o.order_id, o.last_sequence FROM tracking.orders o \
         WHERE NOT EXISTS (SELECT 1 FROM tracking.applied a \
                           WHERE a.aggregate_type = 'order' AND a.aggregate_id = o.order_id) \
         ORDER BY o.order_id",
    )
    .fetch_all(pool)
    .await?;
    for (order, at) in extra {
        differences.push(format!(
            "difference: order {order} tracking.orders: a row at #{at} for an order tracking never applied"
        ));
    }
    Ok(())
}

/// Counts and checksums per aggregate type, place by place: a difference where they disagree,
/// and the summary lines.
fn compare_types(
    at: &mut Positions,
    tallies: BTreeMap<(String, String), Tally>,
    has_topic: &impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut per_type: BTreeMap<String, Vec<(String, i64, i64, String)>> = BTreeMap::new();
    for ((t, place), tally) in tallies {
        let (aggregates, events, checksum) = tally.finish();
        per_type
            .entry(t)
            .or_default()
            .push((place, aggregates, events, checksum));
    }
    let mut summary = Vec::new();
    for (t, places) in per_type {
        // The store first, then the topic, then the read models by name.
        let expected: Vec<String> = std::iter::once("store".to_owned())
            .chain(has_topic(&t).then(|| "topic".to_owned()))
            .chain(
                at.models
                    .iter()
                    .enumerate()
                    .filter(|(index, _)| at.follows(*index, &t))
                    .map(|(_, (name, _))| name.clone()),
            )
            .collect();
        let found = |place: &str| places.iter().find(|(p, ..)| p == place);
        let counts: Vec<(String, i64)> = expected
            .iter()
            .map(|p| (p.clone(), found(p).map_or(0, |(_, _, e, _)| *e)))
            .collect();
        let checksums: Vec<(String, String)> = expected
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    found(p).map_or_else(|| "none".to_owned(), |(.., c)| c[..16].to_owned()),
                )
            })
            .collect();
        if counts.iter().any(|(_, c)| *c != counts[0].1) {
            let listed: Vec<String> = counts.iter().map(|(p, c)| format!("{p} {c}")).collect();
            at.differences.push(format!(
                "difference: {t} event counts: {}",
                listed.join(", ")
            ));
        }
        if checksums.iter().any(|(_, c)| *c != checksums[0].1) {
            let listed: Vec<String> = checksums.iter().map(|(p, c)| format!("{p} {c}")).collect();
            at.differences
                .push(format!("difference: {t} checksums: {}", listed.join(", ")));
        }
        let listed: Vec<String> = expected
            .iter()
            .map(|p| match found(p) {
                Some((_, aggregates, events, checksum)) => format!(
                    "{p} {events} events in {aggregates} aggregates (checksum {})",
                    &checksum[..16]
                ),
                None => format!("{p} nothing"),
            })
            .collect();
        summary.push(format!("summary: {t}: {}", listed.join(", ")));
    }
    summary
}
