//! Tamper evidence for auditors: the hash chain of the event log, its anchors, and `verify`.
//!
//! **The chain.** When an event is stored, a trigger in the database (migration
//! `20261121000004_hash_chain.sql`, so nothing that writes events can skip it) sets
//! `chain_prev` = the `chain_hash` of the aggregate's previous event (32 zero bytes for its first)
//! and `chain_hash` = SHA-256(`chain_prev` ‖ SHA-256(canonical encoding)). The canonical encoding
//! ([`EventContent::encode`]) is the stored columns, each length-prefixed or fixed-width, so two
//! different events never encode alike: `aggregate_type`, `aggregate_id`, `sequence`,
//! `event_type`, `event_version`, `payload` and `metadata` (the `json` columns keep the exact
//! text written), `event_id`, `recorded_at` (microseconds). [`verify_store`] recomputes every hash
//! here, in Rust, from the stored columns.
//!
//! **What the store check names.** Per aggregate, an event whose content or metadata changed
//! (`altered`), a missing event (`deleted`), an event that claims a place the chain gives to
//! another (`inserted`), an event moved to another sequence (`reordered`: its hash still proves
//! where it was chained), an event the next one is not chained to (`replaced`). A deletion of an
//! aggregate's *last* events, or of a whole aggregate, leaves no broken link: the anchors catch
//! it.
//!
//! **Anchors** ([`anchor`]): at an instant when no transaction writing events is open (a brief
//! SHARE lock on `events`), the heads of every aggregate's chain (`chain_heads`) are brought up to
//! date and hashed into a root (sorted bytewise); the anchor row records the instant, the counts,
//! the root and the hash of the previous anchor. `verify` checks the anchor chain, that the latest
//! root is the hash of the recorded heads, that every anchored head is still stored with the same
//! hash (else `deleted` or `replaced`), and that no event recorded before the latest anchor lies
//! beyond its head (`inserted`). An auditor who keeps an anchor hash outside the database
//! (`verify --anchor-hash`) also detects a rewrite of the anchors themselves.
//!
//! **The topic copy** ([`verify_topics`]): every record carries `chain_prev` and `chain_hash`
//! (hex) headers. The hash cannot be recomputed from a record alone: the store hashes the exact
//! JSON text it holds (the metadata is a map serialised in arbitrary key order; timestamps inside
//! payloads keep nanoseconds, which Avro's `timestamp-micros` truncates; events stored in an older
//! shape are upcast before they are sent, with a new `event_version`). So the topic check proves:
//! (1) from the headers alone, per aggregate, a gap-free chain in sequence order in one partition
//! (nothing missing in the middle, inserted or reordered; redeliveries carry the same hash); and
//! (2) against the event store: each record's chain values are the store's for its (aggregate,
//! sequence); its hash, recomputed from the record's own identity headers (aggregate type and id,
//! sequence, event type, event id, recorded_at) and the stored version, payload and metadata, is
//! its `chain_hash` header; its decoded body equals the stored payload as the relay sends it
//! (upcast, mapped to Avro), and its metadata headers equal the stored metadata.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use streams::headers::{CHAIN_HASH, CHAIN_PREV};
use streams::{EventDecoder, EventMeta, KafkaConfig, Published, RegistryConfig};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::progress;

/// A chain hash.
pub type Hash = [u8; 32];

/// The `chain_prev` of an aggregate's first event.
pub const GENESIS: Hash = [0; 32];

/// Advisory lock that serialises anchors.
const ANCHOR_LOCK_KEY: i64 = 0x6368_6169_6e73; // "chains"

/// The fields of one stored event that its chain hash covers.
#[derive(Debug, Clone, Copy)]
pub struct EventContent<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    /// The `payload` column's text, exactly as stored.
    pub payload: &'a str,
    /// The `metadata` column's text, exactly as stored.
    pub metadata: &'a str,
    pub event_id: Uuid,
    /// `recorded_at` in microseconds since the Unix epoch.
    pub recorded_at_micros: i64,
}

fn text(hasher: &mut Sha256, value: &str) {
    hasher.update((value.len() as u64).to_be_bytes());
    hasher.update(value.as_bytes());
}

impl EventContent<'_> {
    /// SHA-256 of the canonical encoding (what the database's `backbone_chain_digest` computes).
    pub fn encode(&self) -> Hash {
        let mut hasher = Sha256::new();
        text(&mut hasher, self.aggregate_type);
        text(&mut hasher, self.aggregate_id);
        hasher.update(self.sequence.to_be_bytes());
        text(&mut hasher, self.event_type);
        text(&mut hasher, self.event_version);
        text(&mut hasher, self.payload);
        text(&mut hasher, self.metadata);
        hasher.update(self.event_id.as_bytes());
        hasher.update(self.recorded_at_micros.to_be_bytes());
        hasher.finalize().into()
    }

    /// The chain hash of this content after `prev`.
    pub fn chain_hash(&self, prev: &Hash) -> Hash {
        let mut hasher = Sha256::new();
        hasher.update(prev);
        hasher.update(self.encode());
        hasher.finalize().into()
    }
}

/// One aggregate head in an anchor's root.
fn root_entry(
    hasher: &mut Sha256,
    aggregate_type: &str,
    aggregate_id: &str,
    last_sequence: i64,
    head: &[u8],
) {
    text(hasher, aggregate_type);
    text(hasher, aggregate_id);
    hasher.update(last_sequence.to_be_bytes());
    hasher.update(head);
}

/// The hash of one anchor, chained to the previous anchor's.
pub fn anchor_hash(
    prev: &[u8],
    id: i64,
    taken_at_micros: i64,
    aggregates: i64,
    events: i64,
    root: &[u8],
) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(id.to_be_bytes());
    hasher.update(taken_at_micros.to_be_bytes());
    hasher.update(aggregates.to_be_bytes());
    hasher.update(events.to_be_bytes());
    hasher.update(root);
    hasher.finalize().into()
}

fn to_hash(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

/// A hash given on the command line (64 hex digits).
pub fn parse_hash(text: &str) -> Result<Hash, String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("`{text}` is not hex: {e}"))?;
    to_hash(&bytes).ok_or_else(|| format!("`{text}` is not a SHA-256 hash (64 hex digits)"))
}

fn aggregate_arg(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((t, i)) if !t.is_empty() && !i.is_empty() => Ok((t.to_owned(), i.to_owned())),
        _ => Err(format!(
            "`{text}` is not TYPE:ID (for example order:0192f0c4-...)"
        )),
    }
}

/// `replay-tools verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Verify the copy on the Kafka topics (settings `KAFKA_*`, `SCHEMA_REGISTRY_*`) against the
    /// event store, instead of the event store itself.
    #[arg(long)]
    pub topics: bool,
    /// An anchor hash kept outside the database (as `anchor` printed it): it must be in the
    /// anchor chain, else anchors were rewritten or removed. Repeatable.
    #[arg(
        long = "anchor-hash",
        value_name = "HEX",
        value_parser = parse_hash,
        conflicts_with = "topics"
    )]
    pub anchor_hashes: Vec<Hash>,
    /// Resume the chain check at this aggregate (`TYPE:ID`, as an interrupted run prints).
    #[arg(long, value_name = "TYPE:ID", value_parser = aggregate_arg, conflicts_with = "topics")]
    pub from: Option<(String, String)>,
    /// Events read per query.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch_size: i64,
}

/// `replay-tools anchor`.
#[derive(Debug, clap::Args)]
pub struct AnchorArgs {
    /// Keep running and take an anchor every SECS seconds, until Ctrl-C.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub every: Option<u64>,
}

/// What is wrong at one place, keyed so that several checks naming the same event merge.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: Option<i64>,
}

/// Every finding of a run, merged per place.
#[derive(Debug, Default)]
pub struct Findings {
    by_place: BTreeMap<Place, Vec<(&'static str, String)>>,
    /// Findings about the anchors themselves (not an event).
    anchors: Vec<(&'static str, String)>,
}

impl Findings {
    fn event(
        &mut self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: i64,
        kind: &'static str,
        detail: impl Into<String>,
    ) {
        self.at(aggregate_type, aggregate_id, Some(sequence), kind, detail);
    }

    fn at(
        &mut self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: Option<i64>,
        kind: &'static str,
        detail: impl Into<String>,
    ) {
        let entry = self
            .by_place
            .entry(Place {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                sequence,
            })
            .or_default();
        let detail = detail.into();
        if !entry.iter().any(|(k, d)| *k == kind && *d == detail) {
            entry.push((kind, detail));
        }
    }

    fn anchor(&mut self, kind: &'static str, detail: impl Into<String>) {
        self.anchors.push((kind, detail.into()));
    }

    pub fn len(&self) -> usize {
        self.by_place.len() + self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One line per place: `finding: <type> <id> #<sequence> <kind>[+<kind>]: <details>`.
    pub fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        for (place, problems) in &self.by_place {
            let mut kinds: Vec<&str> = Vec::new();
            for (kind, _) in problems {
                if !kinds.contains(kind) {
                    kinds.push(kind);
                }
            }
            let details: Vec<&str> = problems.iter().map(|(_, d)| d.as_str()).collect();
            let sequence = place
                .sequence
                .map_or_else(|| "(aggregate)".to_owned(), |s| format!("#{s}"));
            writeln!(
                out,
                "finding: {} {} {} {}: {}",
                place.aggregate_type,
                place.aggregate_id,
                sequence,
                kinds.join("+"),
                details.join("; ")
            )?;
        }
        for (kind, detail) in &self.anchors {
            writeln!(out, "finding: anchors {kind}: {detail}")?;
        }
        Ok(())
    }
}

/// One stored event with its chain columns, its payload and metadata as the text the chain
/// hashes.
#[derive(Debug, sqlx::FromRow)]
struct ChainedEvent {
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
    event_id: Uuid,
    recorded_at: DateTime<Utc>,
    chain_prev: Option<Vec<u8>>,
    chain_hash: Option<Vec<u8>>,
}

impl ChainedEvent {
    fn content(&self, sequence: i64) -> EventContent<'_> {
        EventContent {
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            sequence,
            event_type: &self.event_type,
            event_version: &self.event_version,
            payload: &self.payload,
            metadata: &self.metadata,
            event_id: self.event_id,
            recorded_at_micros: self.recorded_at.timestamp_micros(),
        }
    }
}

const STORED_COLUMNS: &str = "aggregate_type, aggregate_id, sequence, event_type, event_version, \
     payload::text AS payload, metadata::text AS metadata, event_id, recorded_at, chain_prev, \
     chain_hash";

/// Where an event sits in its aggregate's chain, judged from its own hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Its hash proves it was chained at the sequence it has.
    InPlace,
    /// Its hash proves it was chained at this other sequence.
    Moved(i64),
    /// Its hash matches its content at no sequence the chain suggests.
    Altered,
}

/// What precedes a run of events whose places are being worked out.
#[derive(Debug, Clone, Copy)]
enum Base {
    Genesis,
    After(i64),
    Unknown,
}

/// Checks one aggregate's events (sorted by stored sequence) and records what is wrong.
fn check_aggregate(rows: &[ChainedEvent], findings: &mut Findings) {
    let Some(first) = rows.first() else { return };
    let (aggregate_type, aggregate_id) =
        (first.aggregate_type.as_str(), first.aggregate_id.as_str());
    let n = rows.len();
    let seq: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
    let prev: Vec<Option<Hash>> = rows
        .iter()
        .map(|r| r.chain_prev.as_deref().and_then(to_hash))
        .collect();
    let hash: Vec<Option<Hash>> = rows
        .iter()
        .map(|r| r.chain_hash.as_deref().and_then(to_hash))
        .collect();
    let valid_at = |i: usize, sequence: i64| match (&prev[i], &hash[i]) {
        (Some(p), Some(h)) => rows[i].content(sequence).chain_hash(p) == *h,
        _ => false,
    };
    let mut by_hash: HashMap<Hash, usize> = HashMap::with_capacity(n);
    for (i, h) in hash.iter().enumerate() {
        if let Some(h) = h {
            by_hash.entry(*h).or_insert(i);
        }
    }
    let mut origin: Vec<Option<Origin>> = (0..n)
        .map(|i| valid_at(i, seq[i]).then_some(Origin::InPlace))
        .collect();
    let original = |o: Origin, stored: i64| match o {
        Origin::Moved(s) => s,
        Origin::InPlace | Origin::Altered => stored,
    };
    // An event whose hash does not hold at its sequence: follow its chain_prev back to an event
    // whose place is known; its own original place is the next one, if its hash holds there.
    for i in 0..n {
        if origin[i].is_some() {
            continue;
        }
        let mut path = vec![i];
        let mut on_path: HashSet<usize> = HashSet::from([i]);
        let mut base = Base::Unknown;
        while let Some(&k) = path.last() {
            match prev[k] {
                None => break,
                Some(p) if p == GENESIS => {
                    base = Base::Genesis;
                    break;
                }
                Some(p) => match by_hash.get(&p) {
                    Some(&j) if !on_path.contains(&j) => match origin[j] {
                        Some(o) => {
                            base = Base::After(original(o, seq[j]));
                            break;
                        }
                        None => {
                            path.push(j);
                            on_path.insert(j);
                        }
                    },
                    _ => break,
                },
            }
        }
        for &k in path.iter().rev() {
            let candidates: Vec<i64> = match base {
                Base::Genesis => vec![1, seq[0]],
                Base::After(s) => vec![s + 1],
                Base::Unknown => Vec::new(),
            };
            let found = candidates
                .into_iter()
                .filter(|&c| c != seq[k])
                .find(|&c| valid_at(k, c));
            let o = found.map_or(Origin::Altered, Origin::Moved);
            origin[k] = Some(o);
            base = Base::After(original(o, seq[k]));
        }
    }
    let origin: Vec<Origin> = origin
        .into_iter()
        .map(|o| o.unwrap_or(Origin::Altered))
        .collect();
    let place = |i: usize| original(origin[i], seq[i]);
    for i in 0..n {
        match origin[i] {
            Origin::InPlace => {}
            Origin::Moved(s) => findings.event(
                aggregate_type,
                aggregate_id,
                seq[i],
                "reordered",
                format!("this is the event chained as #{s}"),
            ),
            Origin::Altered => findings.event(
                aggregate_type,
                aggregate_id,
                seq[i],
                "altered",
                if prev[i].is_none() || hash[i].is_none() {
                    "its chain columns are missing or malformed".to_owned()
                } else {
                    "its content or metadata no longer matches its chain hash".to_owned()
                },
            ),
        }
    }

    // In chain order: the first event starts the chain, each next one links to the one before.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (place(i), seq[i]));
    let linked: HashSet<Hash> = prev.iter().flatten().copied().collect();
    let is_linked = |i: usize| hash[i].is_some_and(|h| linked.contains(&h));
    if let Some(&start) = order.first() {
        if let Some(p) = prev[start] {
            if p != GENESIS && origin[start] != Origin::Altered {
                let first_place = place(start);
                if first_place > 1 {
                    for s in 1..first_place {
                        findings.event(
                            aggregate_type,
                            aggregate_id,
                            s,
                            "deleted",
                            format!("missing: the chain of #{} continues an earlier event that is no longer stored", seq[start]),
                        );
                    }
                } else {
                    findings.event(
                        aggregate_type,
                        aggregate_id,
                        seq[start],
                        "unlinked",
                        "the first stored event of its aggregate is chained to an unknown event",
                    );
                }
            }
        }
    }
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let (pa, pb) = (place(a), place(b));
        if pa == pb {
            let claim = |other: usize| {
                format!(
                    "claims #{pa}, the place the chain gives to the event at #{}",
                    seq[other]
                )
            };
            match (is_linked(a), is_linked(b)) {
                (true, false) => {
                    findings.event(aggregate_type, aggregate_id, seq[b], "inserted", claim(a));
                }
                (false, true) => {
                    findings.event(aggregate_type, aggregate_id, seq[a], "inserted", claim(b));
                }
                _ => {
                    findings.event(aggregate_type, aggregate_id, seq[a], "conflict", claim(b));
                    findings.event(aggregate_type, aggregate_id, seq[b], "conflict", claim(a));
                }
            }
        } else if pb > pa + 1 {
            let gap_at_insert = prev[b].is_some() && prev[b] == hash[a];
            for s in pa + 1..pb {
                if gap_at_insert {
                    findings.event(
                        aggregate_type,
                        aggregate_id,
                        s,
                        "gap",
                        format!(
                            "the chain skips #{s}: #{} was chained directly to #{pa}",
                            seq[b]
                        ),
                    );
                } else {
                    findings.event(
                        aggregate_type,
                        aggregate_id,
                        s,
                        "deleted",
                        format!(
                            "missing: #{} is chained to an event that is no longer stored",
                            seq[b]
                        ),
                    );
                }
            }
        } else if prev[b] != hash[a] {
            findings.event(
                aggregate_type,
                aggregate_id,
                seq[a],
                "replaced",
                format!(
                    "#{} is chained to a different event than the one stored here (this event, or the link of #{}, was rewritten)",
                    seq[b], seq[b]
                ),
            );
        }
    }
}

/// Fails with a clear message when the database has no hash chain.
async fn require_chain(pool: &PgPool) -> anyhow::Result<()> {
    let present: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
                        WHERE table_schema = current_schema() AND table_name = 'events' \
                          AND column_name = 'chain_hash') \
                AND to_regclass('chain_anchors') IS NOT NULL \
                AND to_regclass('chain_heads') IS NOT NULL",
    )
    .fetch_one(pool)
    .await
    .context("reading the event store")?;
    if !present {
        bail!(
            "this event store has no hash chain: apply the event store migrations \
             (any backbone process that opens the store, such as the api, applies them)"
        );
    }
    Ok(())
}

/// `replay-tools verify` (or `verify --topics`).
pub async fn verify(pool: &PgPool, args: VerifyArgs, out: &mut impl Write) -> anyhow::Result<()> {
    require_chain(pool).await?;
    let cancel = progress::interrupted();
    if args.topics {
        let kafka = KafkaConfig::from_env().context("KAFKA_* settings")?;
        let registry = RegistryConfig::from_env().context("SCHEMA_REGISTRY_* settings")?;
        return verify_topics(pool, &kafka, &registry, &cancel, out).await;
    }
    verify_store(pool, &args, &cancel, out).await
}

/// Recomputes every stored event's chain hash and checks the anchors.
pub async fn verify_store(
    pool: &PgPool,
    args: &VerifyArgs,
    cancel: &CancellationToken,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    let bar = progress::bar("verify", Some(u64::try_from(total).unwrap_or(0)));
    let mut findings = Findings::default();
    let (mut after_type, mut after_id, mut after_seq) = match &args.from {
        Some((t, i)) => (t.clone(), i.clone(), -1_i64),
        None => (String::new(), String::new(), -1_i64),
    };
    let mut current: Vec<ChainedEvent> = Vec::new();
    let (mut events, mut aggregates) = (0_u64, 0_u64);
    let mut stopped_at: Option<(String, String)> = None;
    loop {
        let rows: Vec<ChainedEvent> = sqlx::query_as(&format!(
            "SELECT {STORED_COLUMNS} FROM events \
             WHERE (aggregate_type, aggregate_id, sequence) > ($1, $2, $3) \
             ORDER BY aggregate_type, aggregate_id, sequence LIMIT $4"
        ))
        .bind(&after_type)
        .bind(&after_id)
        .bind(after_seq)
        .bind(args.batch_size)
        .fetch_all(pool)
        .await
        .context("reading events")?;
        let done = rows.len() < usize::try_from(args.batch_size).unwrap_or(usize::MAX);
        if let Some(last) = rows.last() {
            after_type.clone_from(&last.aggregate_type);
            after_id.clone_from(&last.aggregate_id);
            after_seq = last.sequence;
        }
        for row in rows {
            events += 1;
            let same = current.first().is_some_and(|c| {
                c.aggregate_type == row.aggregate_type && c.aggregate_id == row.aggregate_id
            });
            if !same && !current.is_empty() {
                check_aggregate(&current, &mut findings);
                aggregates += 1;
                current.clear();
            }
            current.push(row);
        }
        bar.set_position(events);
        if done {
            break;
        }
        if cancel.is_cancelled() {
            // The aggregate in hand may continue in the next batch: it is checked on resume.
            stopped_at = current
                .first()
                .map(|c| (c.aggregate_type.clone(), c.aggregate_id.clone()));
            current.clear();
            break;
        }
    }
    if !current.is_empty() {
        check_aggregate(&current, &mut findings);
        aggregates += 1;
    }
    bar.finish_and_clear();

    let anchors = check_anchors(pool, &args.anchor_hashes, &mut findings).await?;
    findings.write(out)?;
    match &anchors {
        Some(latest) => writeln!(
            out,
            "summary: latest anchor #{} taken at {}: {} aggregates, {} events, root {}, anchor hash {}",
            latest.id,
            latest.taken_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            latest.aggregates,
            latest.events,
            hex::encode(&latest.root_hash),
            hex::encode(&latest.anchor_hash)
        )?,
        None => writeln!(
            out,
            "summary: no anchor yet: deleting an aggregate's last events cannot be detected until `replay-tools anchor` runs"
        )?,
    }
    writeln!(
        out,
        "summary: verified {events} events in {aggregates} aggregates; {} findings",
        findings.len()
    )?;
    if let Some((t, i)) = stopped_at {
        writeln!(
            out,
            "summary: interrupted before the end; resume with `replay-tools verify --from {t}:{i}`"
        )?;
        bail!("interrupted: the event store was verified only up to {t}:{i}");
    }
    if !findings.is_empty() {
        bail!(
            "verify found {} problems in the event store",
            findings.len()
        );
    }
    Ok(())
}

#[derive(Debug, sqlx::FromRow)]
struct AnchorRow {
    id: i64,
    taken_at: DateTime<Utc>,
    aggregates: i64,
    events: i64,
    root_hash: Vec<u8>,
    prev_hash: Vec<u8>,
    anchor_hash: Vec<u8>,
}

/// An anchored head the store no longer holds as recorded.
#[derive(Debug, sqlx::FromRow)]
struct AnchoredHead {
    aggregate_type: String,
    aggregate_id: String,
    last_sequence: i64,
    anchor_id: i64,
    stored_hash: Option<Vec<u8>>,
    store_last: Option<i64>,
}

/// Checks the anchor chain, the latest anchor's root and heads against the store; returns the
/// latest anchor.
async fn check_anchors(
    pool: &PgPool,
    kept: &[Hash],
    findings: &mut Findings,
) -> anyhow::Result<Option<AnchorRow>> {
    let mut tx = pool.begin().await?;
    // One snapshot: an anchor committed meanwhile is seen with its heads or not at all.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let anchors: Vec<AnchorRow> = sqlx::query_as(
        "SELECT id, taken_at, aggregates, events, root_hash, prev_hash, anchor_hash \
         FROM chain_anchors ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut previous: Option<&AnchorRow> = None;
    for anchor in &anchors {
        let expected_prev: &[u8] = previous.map_or(&GENESIS[..], |p| &p.anchor_hash[..]);
        let expected_id = previous.map_or(anchor.id, |p| p.id + 1);
        if anchor.id != expected_id {
            findings.anchor(
                "deleted",
                format!(
                    "anchors #{expected_id}..#{} are missing before anchor #{}",
                    anchor.id - 1,
                    anchor.id
                ),
            );
        }
        if anchor.prev_hash != expected_prev {
            findings.anchor(
                "unlinked",
                format!(
                    "anchor #{} is not chained to the anchor before it",
                    anchor.id
                ),
            );
        }
        let recomputed = anchor_hash(
            &anchor.prev_hash,
            anchor.id,
            anchor.taken_at.timestamp_micros(),
            anchor.aggregates,
            anchor.events,
            &anchor.root_hash,
        );
        if anchor.anchor_hash != recomputed {
            findings.anchor(
                "altered",
                format!(
                    "anchor #{} does not hash to its recorded anchor hash",
                    anchor.id
                ),
            );
        }
        if let Some(p) = previous {
            if anchor.taken_at <= p.taken_at {
                findings.anchor(
                    "reordered",
                    format!("anchor #{} is not later than anchor #{}", anchor.id, p.id),
                );
            }
        }
        previous = Some(anchor);
    }
    for kept_hash in kept {
        if !anchors.iter().any(|a| a.anchor_hash == kept_hash[..]) {
            findings.anchor(
                "deleted",
                format!(
                    "no anchor has the hash {} kept outside the database: anchors were rewritten or removed",
                    hex::encode(kept_hash)
                ),
            );
        }
    }
    let Some(latest) = anchors.into_iter().last() else {
        tx.commit().await?;
        return Ok(None);
    };

    // The recorded heads hash to the latest anchor's root.
    let (root, count) = heads_root(&mut tx).await?;
    if root[..] != latest.root_hash[..] || count != latest.aggregates {
        findings.anchor(
            "altered",
            format!(
                "the recorded chain heads ({count} aggregates) do not hash to the root of anchor #{} ({} aggregates): the anchor bookkeeping was altered",
                latest.id, latest.aggregates
            ),
        );
    }

    // Every anchored head is still stored, with the same hash.
    let heads: Vec<AnchoredHead> = sqlx::query_as(
        "SELECT h.aggregate_type, h.aggregate_id, h.last_sequence, h.anchor_id, \
                e.chain_hash AS stored_hash, \
                (SELECT max(m.sequence) FROM events m \
                 WHERE m.aggregate_type = h.aggregate_type AND m.aggregate_id = h.aggregate_id) \
                    AS store_last \
         FROM chain_heads h \
         LEFT JOIN events e ON e.aggregate_type = h.aggregate_type \
             AND e.aggregate_id = h.aggregate_id AND e.sequence = h.last_sequence \
         WHERE e.chain_hash IS DISTINCT FROM h.head_hash",
    )
    .fetch_all(&mut *tx)
    .await
    .context("checking the anchored heads")?;
    for head in heads {
        let AnchoredHead {
            aggregate_type,
            aggregate_id,
            last_sequence,
            anchor_id,
            stored_hash,
            store_last,
        } = head;
        if stored_hash.is_some() {
            findings.event(
                &aggregate_type,
                &aggregate_id,
                last_sequence,
                "replaced",
                format!("its chain hash is not the head anchor #{anchor_id} recorded"),
            );
            continue;
        }
        let from = store_last.map_or(1, |l| l + 1).min(last_sequence);
        for s in from..=last_sequence {
            findings.event(
                &aggregate_type,
                &aggregate_id,
                s,
                "deleted",
                format!(
                    "missing: anchor #{anchor_id} recorded #{last_sequence} as this aggregate's head; the store {}",
                    store_last.map_or_else(
                        || "holds none of its events".to_owned(),
                        |l| format!("now ends at #{l}")
                    )
                ),
            );
        }
    }

    // Nothing recorded before the latest anchor lies beyond the head it recorded.
    let beyond: Vec<(String, String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT e.aggregate_type, e.aggregate_id, e.sequence, h.last_sequence \
         FROM events e \
         LEFT JOIN chain_heads h USING (aggregate_type, aggregate_id) \
         WHERE e.recorded_at < $1 AND (h.last_sequence IS NULL OR e.sequence > h.last_sequence)",
    )
    .bind(latest.taken_at)
    .fetch_all(&mut *tx)
    .await
    .context("checking events recorded before the latest anchor")?;
    for (aggregate_type, aggregate_id, sequence, head) in beyond {
        findings.event(
            &aggregate_type,
            &aggregate_id,
            sequence,
            "inserted",
            format!(
                "recorded before anchor #{} but beyond the head it recorded ({})",
                latest.id,
                head.map_or_else(|| "none".to_owned(), |h| format!("#{h}"))
            ),
        );
    }
    tx.commit().await?;
    Ok(Some(latest))
}

/// The root over `chain_heads` (sorted bytewise) and the number of heads.
async fn heads_root(conn: &mut PgConnection) -> anyhow::Result<(Hash, i64)> {
    use futures::TryStreamExt;
    let mut hasher = Sha256::new();
    let mut count = 0_i64;
    let mut rows = sqlx::query_as::<_, (String, String, i64, Vec<u8>)>(
        "SELECT aggregate_type, aggregate_id, last_sequence, head_hash FROM chain_heads \
         ORDER BY aggregate_type COLLATE \"C\", aggregate_id COLLATE \"C\"",
    )
    .fetch(&mut *conn);
    while let Some((aggregate_type, aggregate_id, last, head)) = rows.try_next().await? {
        root_entry(&mut hasher, &aggregate_type, &aggregate_id, last, &head);
        count += 1;
    }
    Ok((hasher.finalize().into(), count))
}

/// An anchor just taken.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub id: i64,
    pub taken_at: DateTime<Utc>,
    pub aggregates: i64,
    pub events: i64,
    pub root: Hash,
    pub hash: Hash,
}

/// `replay-tools anchor [--every SECS]`.
pub async fn run_anchor(
    pool: &PgPool,
    args: AnchorArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    require_chain(pool).await?;
    let cancel = args.every.map(|_| progress::interrupted());
    loop {
        let taken = anchor(pool).await?;
        writeln!(
            out,
            "anchor #{} taken at {}: {} aggregates, {} events, root {}, anchor hash {}",
            taken.id,
            taken.taken_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            taken.aggregates,
            taken.events,
            hex::encode(taken.root),
            hex::encode(taken.hash)
        )?;
        out.flush()?;
        let (Some(every), Some(cancel)) = (args.every, &cancel) else {
            return Ok(());
        };
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(every)) => {}
        }
    }
}

/// Takes one anchor: the heads of every chain as of now, hashed into a root, chained to the
/// previous anchor. Refuses when the store no longer holds what the previous anchor recorded.
pub async fn anchor(pool: &PgPool) -> anyhow::Result<Anchor> {
    let mut conn = pool.acquire().await?;
    // The instant: taken while holding a lock that waits for every open transaction writing
    // events and keeps new ones out, so the store as of the anchor is exactly the events recorded
    // before it (recorded_at is the clock at insert time, after the writer got its lock).
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *tx)
        .await
        .context("waiting for the transactions writing events (lock_timeout 30 s)")?;
    let taken_at: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;

    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ANCHOR_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let previous: Option<(i64, DateTime<Utc>, Vec<u8>)> = sqlx::query_as(
        "SELECT id, taken_at, anchor_hash FROM chain_anchors ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((id, previous_at, _)) = &previous {
        if *previous_at >= taken_at {
            bail!("anchor #{id} was taken meanwhile; try again");
        }
    }
    let lost: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT h.aggregate_type, h.aggregate_id, h.last_sequence FROM chain_heads h \
         LEFT JOIN events e ON e.aggregate_type = h.aggregate_type \
             AND e.aggregate_id = h.aggregate_id AND e.sequence = h.last_sequence \
         WHERE e.chain_hash IS DISTINCT FROM h.head_hash LIMIT 10",
    )
    .fetch_all(&mut *tx)
    .await?;
    if !lost.is_empty() {
        let named: Vec<String> = lost
            .iter()
            .map(|(t, i, s)| format!("{t} {i} #{s}"))
            .collect();
        bail!(
            "refusing to anchor: the store no longer holds the heads the previous anchor recorded \
             ({}); run `replay-tools verify`",
            named.join(", ")
        );
    }
    let id = previous.as_ref().map_or(1, |(id, _, _)| id + 1);
    let prev_hash = previous.map_or_else(|| GENESIS.to_vec(), |(_, _, h)| h);
    sqlx::query(
        "INSERT INTO chain_heads (aggregate_type, aggregate_id, last_sequence, head_hash, anchor_id) \
         SELECT DISTINCT ON (aggregate_type, aggregate_id) \
                aggregate_type, aggregate_id, sequence, chain_hash, $2 \
         FROM events WHERE recorded_at < $1 \
         ORDER BY aggregate_type, aggregate_id, sequence DESC \
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
         SET last_sequence = excluded.last_sequence, head_hash = excluded.head_hash, \
             anchor_id = excluded.anchor_id \
         WHERE excluded.last_sequence > chain_heads.last_sequence",
    )
    .bind(taken_at)
    .bind(id)
    .execute(&mut *tx)
    .await
    .context("recording the chain heads")?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE recorded_at < $1")
        .bind(taken_at)
        .fetch_one(&mut *tx)
        .await?;
    let (root, aggregates) = heads_root(&mut tx).await?;
    let hash = anchor_hash(
        &prev_hash,
        id,
        taken_at.timestamp_micros(),
        aggregates,
        events,
        &root,
    );
    sqlx::query(
        "INSERT INTO chain_anchors (id, taken_at, aggregates, events, root_hash, prev_hash, anchor_hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(taken_at)
    .bind(aggregates)
    .bind(events)
    .bind(&root[..])
    .bind(&prev_hash)
    .bind(&hash[..])
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Anchor {
        id,
        taken_at,
        aggregates,
        events,
        root,
        hash,
    })
}

/// Every record of some topics, from the beginning to the end each partition had when the scan
/// started (records appended meanwhile are left for the next run).
pub(crate) struct TopicScan {
    consumer: StreamConsumer,
    /// Partitions not read to their end yet, with that end (the high watermark at the start).
    ends: HashMap<(String, i32), i64>,
    /// Partitions whose oldest records were removed by retention (their low watermark > 0).
    trimmed: HashSet<(String, i32)>,
    /// Records to read.
    pub(crate) total: u64,
}

impl std::fmt::Debug for TopicScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicScan")
            .field("ends", &self.ends)
            .finish_non_exhaustive()
    }
}

impl TopicScan {
    pub(crate) fn open(kafka: &KafkaConfig, topics: &[String]) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = kafka
            .client_config()
            .set("group.id", format!("replay-tools-scan-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "fetch.wait.max.ms",
                kafka.kafka_fetch_wait_max_ms.to_string(),
            )
            .create()
            .context("creating a Kafka consumer (KAFKA_BOOTSTRAP_SERVERS)")?;
        let timeout = Duration::from_secs(15);
        let mut assignment = TopicPartitionList::new();
        let mut ends = HashMap::new();
        let mut trimmed = HashSet::new();
        let mut total = 0_u64;
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            for topic in topics {
                let metadata = consumer
                    .fetch_metadata(Some(topic), timeout)
                    .with_context(|| format!("reading the metadata of topic {topic}"))?;
                let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
                    bail!("topic {topic} does not exist");
                };
                if found.error().is_some() || found.partitions().is_empty() {
                    bail!("topic {topic} does not exist or has no partitions");
                }
                for partition in found.partitions() {
                    let (low, high) = consumer
                        .fetch_watermarks(topic, partition.id(), timeout)
                        .with_context(|| {
                            format!("reading the end of {topic}/{}", partition.id())
                        })?;
                    if low > 0 {
                        trimmed.insert((topic.clone(), partition.id()));
                    }
                    if high > low {
                        assignment.add_partition_offset(
                            topic,
                            partition.id(),
                            Offset::Beginning,
                        )?;
                        ends.insert((topic.clone(), partition.id()), high);
                        total += u64::try_from(high - low).unwrap_or(0);
                    }
                }
            }
            Ok(())
        })?;
        consumer.assign(&assignment)?;
        Ok(Self {
            consumer,
            ends,
            trimmed,
            total,
        })
    }

    /// Whether a partition lost its oldest records to retention.
    pub(crate) fn is_trimmed(&self, topic: &str, partition: i32) -> bool {
        self.trimmed.contains(&(topic.to_owned(), partition))
    }

    /// The next record, or `None` once every partition was read to its end.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<OwnedMessage>> {
        loop {
            if self.ends.is_empty() {
                return Ok(None);
            }
            let message = tokio::time::timeout(Duration::from_secs(60), self.consumer.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no record for 60 s while partitions were not read to their end: {:?}",
                        self.ends.keys().collect::<Vec<_>>()
                    )
                })?
                .context("reading a topic")?;
            let key = (message.topic().to_owned(), message.partition());
            let Some(&end) = self.ends.get(&key) else {
                continue; // appended after the scan started
            };
            if message.offset() + 1 >= end {
                self.ends.remove(&key);
            }
            if message.offset() >= end {
                continue;
            }
            return Ok(Some(message.detach()));
        }
    }
}

/// The value of a header, as text.
pub(crate) fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// An aggregate's records seen so far in the copy.
#[derive(Debug)]
struct CopiedChain {
    topic: String,
    partition: i32,
    first: i64,
    hashes: Vec<Hash>,
}

/// Checks the chain of the topic copy, and each record against the event store.
pub async fn verify_topics(
    pool: &PgPool,
    kafka: &KafkaConfig,
    registry: &RegistryConfig,
    cancel: &CancellationToken,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let topics = kafka.topics();
    let mut scan = TopicScan::open(kafka, &topics.all())?;
    let decoder = EventDecoder::new(registry).context("schema registry (SCHEMA_REGISTRY_URL)")?;
    let contracts = schemas::Contracts::global()?;
    let bar = progress::bar("verify topics", Some(scan.total));
    let mut findings = Findings::default();
    let mut chains: HashMap<(String, String), CopiedChain> = HashMap::new();
    let mut records = 0_u64;
    let mut interrupted = false;
    loop {
        let mut batch = Vec::with_capacity(1000);
        while batch.len() < 1000 {
            match scan.next().await? {
                Some(message) => batch.push(message),
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        // The stored events these records claim to be, in one query.
        let metas: Vec<Option<EventMeta>> = batch
            .iter()
            .map(|m| EventMeta::from_headers(m.headers()).ok())
            .collect();
        let (mut types, mut ids, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        for meta in metas.iter().flatten() {
            types.push(meta.aggregate_type.as_str());
            ids.push(meta.aggregate_id.as_str());
            seqs.push(i64::try_from(meta.sequence).unwrap_or(i64::MAX));
        }
        let stored: Vec<ChainedEvent> = sqlx::query_as(&format!(
            "SELECT {} FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k(t, i, s) \
             JOIN events e ON e.aggregate_type = k.t AND e.aggregate_id = k.i AND e.sequence = k.s",
            STORED_COLUMNS
                .split(", ")
                .map(|c| format!("e.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(&types)
        .bind(&ids)
        .bind(&seqs)
        .fetch_all(pool)
        .await
        .context("reading the stored events of a batch of records")?;
        let stored: HashMap<(&str, &str, i64), &ChainedEvent> = stored
            .iter()
            .map(|e| {
                (
                    (
                        e.aggregate_type.as_str(),
                        e.aggregate_id.as_str(),
                        e.sequence,
                    ),
                    e,
                )
            })
            .collect();
        for (message, meta) in batch.iter().zip(&metas) {
            records += 1;
            let location = format!(
                "{}/{}@{}",
                message.topic(),
                message.partition(),
                message.offset()
            );
            let Some(meta) = meta else {
                findings.at(
                    "record",
                    &location,
                    None,
                    "unreadable",
                    "its identity headers are missing or malformed",
                );
                continue;
            };
            let sequence = i64::try_from(meta.sequence).unwrap_or(i64::MAX);
            let (t, i) = (meta.aggregate_type.as_str(), meta.aggregate_id.as_str());
            if message.key() != Some(meta.aggregate_id.as_bytes()) {
                findings.event(
                    t,
                    i,
                    sequence,
                    "misrouted",
                    format!("{location}: its key is not its aggregate id"),
                );
            }
            if topics.for_aggregate(t).as_deref() != Some(message.topic()) {
                findings.event(
                    t,
                    i,
                    sequence,
                    "misrouted",
                    format!("{location}: not the topic of aggregate type {t}"),
                );
            }
            let chain = match (
                header(message, CHAIN_PREV).and_then(|h| parse_hash(h).ok()),
                header(message, CHAIN_HASH).and_then(|h| parse_hash(h).ok()),
            ) {
                (Some(p), Some(h)) => Some((p, h)),
                _ => {
                    findings.event(
                        t,
                        i,
                        sequence,
                        "unchained",
                        format!("{location}: no valid {CHAIN_PREV}/{CHAIN_HASH} headers"),
                    );
                    None
                }
            };
            if let Some((prev, hash)) = chain {
                check_copy_link(
                    &mut chains,
                    &mut findings,
                    (
                        message,
                        &location,
                        scan.is_trimmed(message.topic(), message.partition()),
                    ),
                    (t, i, sequence),
                    prev,
                    hash,
                );
            }
            let Some(row) = stored.get(&(t, i, sequence)) else {
                findings.event(
                    t,
                    i,
                    sequence,
                    "not-in-store",
                    format!("{location}: the event store has no such event"),
                );
                continue;
            };
            if let Some((prev, hash)) = chain {
                if row.chain_prev.as_deref() != Some(&prev[..])
                    || row.chain_hash.as_deref() != Some(&hash[..])
                {
                    findings.event(t, i, sequence, "differs-from-store", format!("{location}: its chain headers are not the store's chain at this sequence"));
                }
                let recorded_at = DateTime::parse_from_rfc3339(&meta.recorded_at)
                    .map(|d| d.timestamp_micros())
                    .unwrap_or(i64::MIN);
                let from_headers = EventContent {
                    aggregate_type: t,
                    aggregate_id: i,
                    sequence,
                    event_type: &meta.event_type,
                    event_version: &row.event_version,
                    payload: &row.payload,
                    metadata: &row.metadata,
                    event_id: meta.event_id,
                    recorded_at_micros: recorded_at,
                };
                if from_headers.chain_hash(&prev) != hash {
                    findings.event(t, i, sequence, "headers-altered", format!("{location}: its identity headers (aggregate, sequence, event type, event id, recorded_at) do not hash to its chain hash"));
                }
            }
            match decoder.decode(message).await {
                Ok(decoded) => {
                    let expected = relayed_form(contracts, row);
                    match expected {
                        Ok((published, body)) => {
                            if decoded.payload().ok().as_ref() != Some(&body) || decoded.contract.event_type != row.event_type {
                                findings.event(t, i, sequence, "content-differs", format!("{location}: its body is not the stored event's payload"));
                            }
                            if metadata_differs(&decoded.meta, &published.meta) {
                                findings.event(t, i, sequence, "metadata-differs", format!("{location}: its metadata headers are not the stored event's metadata"));
                            }
                        }
                        Err(e) => findings.event(t, i, sequence, "content-differs", format!("{location}: the stored event cannot be mapped as the relay sends it: {e}")),
                    }
                }
                Err(e) if e.is_retryable() => {
                    return Err(anyhow::anyhow!("schema registry unavailable: {e}"));
                }
                Err(e) => findings.event(t, i, sequence, "undecodable", format!("{location}: {e}")),
            }
        }
        bar.set_position(records);
        if cancel.is_cancelled() {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    findings.write(out)?;
    writeln!(
        out,
        "summary: verified {records} records of {} aggregates on the topics against the event store; {} findings",
        chains.len(),
        findings.len()
    )?;
    if interrupted {
        bail!("interrupted: only {records} records were verified");
    }
    if !findings.is_empty() {
        bail!("verify found {} problems in the topic copy", findings.len());
    }
    Ok(())
}

/// Checks one record's chain headers against the records of its aggregate seen before it.
fn check_copy_link(
    chains: &mut HashMap<(String, String), CopiedChain>,
    findings: &mut Findings,
    (message, location, trimmed): (&OwnedMessage, &str, bool),
    (t, i, sequence): (&str, &str, i64),
    prev: Hash,
    hash: Hash,
) {
    let key = (t.to_owned(), i.to_owned());
    let Some(chain) = chains.get_mut(&key) else {
        if prev != GENESIS && !trimmed {
            findings.event(t, i, sequence, "unlinked", format!("{location}: the copy starts this aggregate at #{sequence}, chained to an event it does not hold"));
        }
        chains.insert(
            key,
            CopiedChain {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                first: sequence,
                hashes: vec![hash],
            },
        );
        return;
    };
    if chain.topic != message.topic() || chain.partition != message.partition() {
        findings.event(
            t,
            i,
            sequence,
            "misrouted",
            format!(
                "{location}: its aggregate's earlier records are on {}/{}",
                chain.topic, chain.partition
            ),
        );
    }
    let last = chain.first + i64::try_from(chain.hashes.len()).unwrap_or(i64::MAX) - 1;
    if sequence == last + 1 {
        if chain.hashes.last() != Some(&prev) {
            findings.event(
                t,
                i,
                sequence,
                "unlinked",
                format!(
                    "{location}: its {CHAIN_PREV} is not the chain hash of #{last} in the copy"
                ),
            );
        }
        chain.hashes.push(hash);
    } else if sequence >= chain.first && sequence <= last {
        let index = usize::try_from(sequence - chain.first).unwrap_or(usize::MAX);
        if chain.hashes.get(index) != Some(&hash) {
            findings.event(
                t,
                i,
                sequence,
                "conflict",
                format!("{location}: a second record of #{sequence} with another chain hash"),
            );
        }
    } else if sequence < chain.first {
        findings.event(
            t,
            i,
            sequence,
            "reordered",
            format!("{location}: arrives after #{}", chain.first),
        );
    } else {
        findings.event(
            t,
            i,
            sequence,
            "deleted",
            format!("{location}: the copy skips from #{last} to #{sequence}"),
        );
        chain.first = sequence;
        chain.hashes = vec![hash];
    }
}

/// The stored event as the relay sends it ([`Published`]), and its body through the Avro mapping.
fn relayed_form(
    contracts: &schemas::Contracts,
    row: &ChainedEvent,
) -> anyhow::Result<(Published, Json)> {
    let published = Published::of(commands::log::StoredEvent {
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        sequence: row.sequence,
        event_type: row.event_type.clone(),
        event_version: row.event_version.clone(),
        payload: serde_json::from_str(&row.payload)?,
        metadata: serde_json::from_str(&row.metadata).unwrap_or(Json::Null),
        event_id: row.event_id,
        recorded_at: row.recorded_at,
    });
    let (contract, avro) = contracts.payload_to_avro(&row.aggregate_type, &published.payload)?;
    let body = contract.from_avro_as_is(&avro)?;
    Ok((published, body))
}

/// Whether a record's metadata headers differ from the published form's (its identity, checked
/// through the hash chain, aside).
fn metadata_differs(meta: &EventMeta, published: &EventMeta) -> bool {
    meta.event_id != published.event_id
        || meta.event_type != published.event_type
        || meta.event_version != published.event_version
        || meta.occurred_at != published.occurred_at
        || meta.correlation_id != published.correlation_id
        || meta.causation_id != published.causation_id
        || meta.actor != published.actor
        || meta.command_id != published.command_id
        || meta.recorded_at != published.recorded_at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: i64, prev: Hash, payload: &str) -> ChainedEvent {
        let mut row = ChainedEvent {
            aggregate_type: "order".into(),
            aggregate_id: "a1".into(),
            sequence,
            event_type: "OrderPlaced".into(),
            event_version: "1.0".into(),
            payload: payload.into(),
            metadata: "{}".into(),
            event_id: Uuid::from_u128(u128::try_from(sequence).unwrap_or(0)),
            recorded_at: DateTime::from_timestamp_micros(1_800_000_000_000_000 + sequence)
                .unwrap_or_default(),
            chain_prev: Some(prev.to_vec()),
            chain_hash: None,
        };
        row.chain_hash = Some(row.content(sequence).chain_hash(&prev).to_vec());
        row
    }

    fn chain(n: i64) -> Vec<ChainedEvent> {
        let mut rows: Vec<ChainedEvent> = Vec::new();
        let mut prev = GENESIS;
        for s in 1..=n {
            let row = event(s, prev, &format!("{{\"n\":{s}}}"));
            prev = to_hash(row.chain_hash.as_deref().unwrap_or_default()).unwrap_or(GENESIS);
            rows.push(row);
        }
        rows
    }

    fn named(rows: &[ChainedEvent]) -> Vec<(i64, String)> {
        let mut findings = Findings::default();
        check_aggregate(rows, &mut findings);
        findings
            .by_place
            .iter()
            .map(|(p, k)| {
                let kinds: Vec<&str> = k.iter().map(|(k, _)| *k).collect();
                (p.sequence.unwrap_or(-1), kinds.join("+"))
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_has_no_findings() {
        assert!(named(&chain(5)).is_empty());
    }

    #[test]
    fn an_altered_payload_is_named() {
        let mut rows = chain(5);
        rows[2].payload = "{\"n\":9}".into();
        assert_eq!(named(&rows), vec![(3, "altered".to_owned())]);
    }

    #[test]
    fn a_deleted_event_in_the_middle_is_named() {
        let mut rows = chain(5);
        rows.remove(2);
        assert_eq!(named(&rows), vec![(3, "deleted".to_owned())]);
    }

    #[test]
    fn deleted_first_events_are_named() {
        let mut rows = chain(4);
        rows.drain(0..2);
        assert_eq!(
            named(&rows),
            vec![(1, "deleted".to_owned()), (2, "deleted".to_owned())]
        );
    }

    #[test]
    fn swapped_events_are_named_adjacent_or_not() {
        for (a, b) in [(1_usize, 2_usize), (1, 3), (0, 4)] {
            let mut rows = chain(5);
            let (sa, sb) = (rows[a].sequence, rows[b].sequence);
            rows[a].sequence = sb;
            rows[b].sequence = sa;
            rows.sort_by_key(|r| r.sequence);
            assert_eq!(
                named(&rows),
                vec![(sa, "reordered".to_owned()), (sb, "reordered".to_owned())],
                "swap #{sa} and #{sb}"
            );
        }
    }

    #[test]
    fn an_event_inserted_by_shifting_the_rest_is_named() {
        let mut rows = chain(4);
        let prev = to_hash(rows[1].chain_hash.as_deref().unwrap_or_default()).unwrap_or(GENESIS);
        for row in rows.iter_mut().skip(2) {
            row.sequence += 1;
        }
        rows.push(event(3, prev, "{\"forged\":true}"));
        rows.sort_by_key(|r| r.sequence);
        assert_eq!(
            named(&rows),
            vec![
                (3, "inserted".to_owned()),
                (4, "reordered".to_owned()),
                (5, "reordered".to_owned())
            ]
        );
    }

    #[test]
    fn an_event_rewritten_with_a_fresh_hash_is_named() {
        let mut rows = chain(4);
        let prev = to_hash(rows[0].chain_hash.as_deref().unwrap_or_default()).unwrap_or(GENESIS);
        rows[1] = event(2, prev, "{\"forged\":true}");
        assert_eq!(named(&rows), vec![(2, "replaced".to_owned())]);
    }

    #[test]
    fn the_encoding_separates_fields() {
        let mut a = event(1, GENESIS, "{}");
        let mut b = event(1, GENESIS, "{}");
        a.aggregate_type = "ab".into();
        a.aggregate_id = "c".into();
        b.aggregate_type = "a".into();
        b.aggregate_id = "bc".into();
        assert_ne!(a.content(1).encode(), b.content(1).encode());
    }
}
