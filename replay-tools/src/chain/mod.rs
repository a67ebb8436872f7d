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
//! (hex) headers. The hash cannot be recomputed from a record's Avro value: the store hashes the
//! exact JSON text it holds (the metadata is a map serialised in arbitrary key order; timestamps
//! inside payloads keep nanoseconds, which Avro's `timestamp-micros` truncates; events stored in
//! an older shape are upcast before they are sent, with a new `event_version`). Records the relay
//! sends now also carry that text (`stored_*` headers), from which `restore` recomputes every
//! hash ([`crate::restore`]); records sent before carry none. So the topic check proves:
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

mod anchors;
mod store;
mod topics;

pub use anchors::*;
pub use store::*;
pub use topics::*;

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
