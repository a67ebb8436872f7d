//! Verifying the chain in the event store: each aggregate's events link and hash as recorded, and the anchors hold.

use super::*;

/// One stored event with its chain columns, its payload and metadata as the text the chain
/// hashes.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct ChainedEvent {
    pub(super) aggregate_type: String,
    pub(super) aggregate_id: String,
    pub(super) sequence: i64,
    pub(super) event_type: String,
    pub(super) event_version: String,
    pub(super) payload: String,
    pub(super) metadata: String,
    pub(super) event_id: Uuid,
    pub(super) recorded_at: DateTime<Utc>,
    pub(super) chain_prev: Option<Vec<u8>>,
    pub(super) chain_hash: Option<Vec<u8>>,
}

impl ChainedEvent {
    pub(super) fn content(&self, sequence: i64) -> EventContent<'_> {
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

pub(super) const STORED_COLUMNS: &str =
    "aggregate_type, aggregate_id, sequence, event_type, event_version, \
     payload::text AS payload, metadata::text AS metadata, event_id, recorded_at, chain_prev, \
     chain_hash";

/// Where an event sits in its aggregate's chain, judged from its own hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// Its hash proves it was chained at the sequence it has.
    InPlace,
    /// Its hash proves it was chained at this other sequence.
    Moved(i64),
    /// Its hash matches its content at no sequence the chain suggests.
    Altered,
}

/// What precedes a run of events whose places are being worked out.
#[derive(Debug, Clone, Copy)]
pub(super) enum Base {
    Genesis,
    After(i64),
    Unknown,
}

/// Checks one aggregate's events (sorted by stored sequence) and records what is wrong.
pub(super) fn check_aggregate(rows: &[ChainedEvent], findings: &mut Findings) {
    let Some(chain) = AggregateChain::of(rows) else {
        return;
    };
    let origin = chain.origins();
    chain.report_origins(&origin, findings);
    // In chain order: the first event starts the chain, each next one links to the one before.
    let place = |i: usize| original(origin[i], chain.seq[i]);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| (place(i), chain.seq[i]));
    if let Some(&start) = order.first() {
        chain.check_start(start, place(start), origin[start], findings);
    }
    let linked: HashSet<Hash> = chain.prev.iter().flatten().copied().collect();
    for pair in order.windows(2) {
        chain.check_link(
            pair[0],
            pair[1],
            (place(pair[0]), place(pair[1])),
            &linked,
            findings,
        );
    }
}

/// Where an event was first chained, given where it was found.
fn original(origin: Origin, stored: i64) -> i64 {
    match origin {
        Origin::Moved(s) => s,
        Origin::InPlace | Origin::Altered => stored,
    }
}

/// One aggregate's stored events with their chain columns read.
struct AggregateChain<'r> {
    rows: &'r [ChainedEvent],
    aggregate_type: &'r str,
    aggregate_id: &'r str,
    seq: Vec<i64>,
    prev: Vec<Option<Hash>>,
    hash: Vec<Option<Hash>>,
    by_hash: HashMap<Hash, usize>,
}

impl<'r> AggregateChain<'r> {
    fn of(rows: &'r [ChainedEvent]) -> Option<Self> {
        let first = rows.first()?;
        let hash: Vec<Option<Hash>> = rows
            .iter()
            .map(|r| r.chain_hash.as_deref().and_then(to_hash))
            .collect();
        let mut by_hash: HashMap<Hash, usize> = HashMap::with_capacity(rows.len());
        for (i, h) in hash.iter().enumerate() {
            if let Some(h) = h {
                by_hash.entry(*h).or_insert(i);
            }
        }
        Some(Self {
            rows,
            aggregate_type: &first.aggregate_type,
            aggregate_id: &first.aggregate_id,
            seq: rows.iter().map(|r| r.sequence).collect(),
            prev: rows
                .iter()
                .map(|r| r.chain_prev.as_deref().and_then(to_hash))
                .collect(),
            hash,
            by_hash,
        })
    }

    /// Whether event `i`'s hash holds were it at `sequence`.
    fn valid_at(&self, i: usize, sequence: i64) -> bool {
        match (&self.prev[i], &self.hash[i]) {
            (Some(p), Some(h)) => self.rows[i].content(sequence).chain_hash(p) == *h,
            _ => false,
        }
    }

    /// Where each event was chained: in place, moved from another sequence, or altered.
    fn origins(&self) -> Vec<Origin> {
        let n = self.rows.len();
        let mut origin: Vec<Option<Origin>> = (0..n)
            .map(|i| self.valid_at(i, self.seq[i]).then_some(Origin::InPlace))
            .collect();
        for i in 0..n {
            if origin[i].is_none() {
                self.trace_back(i, &mut origin);
            }
        }
        origin
            .into_iter()
            .map(|o| o.unwrap_or(Origin::Altered))
            .collect()
    }

    /// An event whose hash does not hold at its sequence: follow its chain_prev back to an
    /// event whose place is known; its own original place is the next one, if its hash holds
    /// there (and so on forward along the path).
    fn trace_back(&self, i: usize, origin: &mut [Option<Origin>]) {
        let (seq, prev) = (&self.seq, &self.prev);
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
                Some(p) => match self.by_hash.get(&p) {
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
                .find(|&c| self.valid_at(k, c));
            let o = found.map_or(Origin::Altered, Origin::Moved);
            origin[k] = Some(o);
            base = Base::After(original(o, seq[k]));
        }
    }

    fn finding(
        &self,
        findings: &mut Findings,
        sequence: i64,
        kind: &'static str,
        detail: impl Into<String>,
    ) {
        findings.event(
            self.aggregate_type,
            self.aggregate_id,
            sequence,
            kind,
            detail,
        );
    }

    /// Events found elsewhere than where they were chained, or altered.
    fn report_origins(&self, origin: &[Origin], findings: &mut Findings) {
        for (i, o) in origin.iter().enumerate() {
            match o {
                Origin::InPlace => {}
                Origin::Moved(s) => self.finding(
                    findings,
                    self.seq[i],
                    "reordered",
                    format!("this is the event chained as #{s}"),
                ),
                Origin::Altered => self.finding(
                    findings,
                    self.seq[i],
                    "altered",
                    if self.prev[i].is_none() || self.hash[i].is_none() {
                        "its chain columns are missing or malformed".to_owned()
                    } else {
                        "its content or metadata no longer matches its chain hash".to_owned()
                    },
                ),
            }
        }
    }

    /// The first event in chain order starts the chain (at genesis), or earlier events are
    /// gone.
    fn check_start(&self, start: usize, first_place: i64, origin: Origin, findings: &mut Findings) {
        let Some(p) = self.prev[start] else { return };
        if p == GENESIS || origin == Origin::Altered {
            return;
        }
        if first_place > 1 {
            for s in 1..first_place {
                self.finding(
                    findings,
                    s,
                    "deleted",
                    format!(
                        "missing: the chain of #{} continues an earlier event that is no longer stored",
                        self.seq[start]
                    ),
                );
            }
        } else {
            self.finding(
                findings,
                self.seq[start],
                "unlinked",
                "the first stored event of its aggregate is chained to an unknown event",
            );
        }
    }

    /// Two events next to each other in chain order (at places `pa` and `pb`): the same
    /// place claimed twice, places skipped (deleted, or a gap at insert), or a broken link.
    fn check_link(
        &self,
        a: usize,
        b: usize,
        (pa, pb): (i64, i64),
        linked: &HashSet<Hash>,
        findings: &mut Findings,
    ) {
        let (seq, prev, hash) = (&self.seq, &self.prev, &self.hash);
        let is_linked = |i: usize| hash[i].is_some_and(|h| linked.contains(&h));
        if pa == pb {
            let claim = |other: usize| {
                format!(
                    "claims #{pa}, the place the chain gives to the event at #{}",
                    seq[other]
                )
            };
            match (is_linked(a), is_linked(b)) {
                (true, false) => self.finding(findings, seq[b], "inserted", claim(a)),
                (false, true) => self.finding(findings, seq[a], "inserted", claim(b)),
                _ => {
                    self.finding(findings, seq[a], "conflict", claim(b));
                    self.finding(findings, seq[b], "conflict", claim(a));
                }
            }
        } else if pb > pa + 1 {
            let gap_at_insert = prev[b].is_some() && prev[b] == hash[a];
            for s in pa + 1..pb {
                if gap_at_insert {
                    self.finding(
                        findings,
                        s,
                        "gap",
                        format!(
                            "the chain skips #{s}: #{} was chained directly to #{pa}",
                            seq[b]
                        ),
                    );
                } else {
                    self.finding(
                        findings,
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
            self.finding(
                findings,
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
pub(super) async fn require_chain(pool: &PgPool) -> anyhow::Result<()> {
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
    let total = commands::log::count(pool).await?;
    let mut findings = Findings::default();
    let walked = walk_aggregates(pool, args, total, cancel, &mut findings).await?;
    let (events, aggregates, stopped_at) = (walked.events, walked.aggregates, walked.stopped_at);
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

/// How far a walk of the store got.
struct Walked {
    events: u64,
    aggregates: u64,
    /// The aggregate an interruption stopped at (checked again on resume).
    stopped_at: Option<(String, String)>,
}

/// Checks the store's aggregates one by one, in key order from `args.from`, in batches.
async fn walk_aggregates(
    pool: &PgPool,
    args: &VerifyArgs,
    total: i64,
    cancel: &CancellationToken,
    findings: &mut Findings,
) -> anyhow::Result<Walked> {
    let bar = progress::bar("verify", Some(u64::try_from(total).unwrap_or(0)));
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
                check_aggregate(&current, findings);
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
        check_aggregate(&current, findings);
        aggregates += 1;
    }
    bar.finish_and_clear();
    Ok(Walked {
        events,
        aggregates,
        stopped_at,
    })
}
