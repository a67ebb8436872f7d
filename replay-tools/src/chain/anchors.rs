//! Anchors: a hash of every aggregate's head at an instant, themselves chained, kept outside the log's reach.

use super::*;

#[derive(Debug, sqlx::FromRow)]
pub(super) struct AnchorRow {
    pub(super) id: i64,
    pub(super) taken_at: DateTime<Utc>,
    pub(super) aggregates: i64,
    pub(super) events: i64,
    pub(super) root_hash: Vec<u8>,
    pub(super) prev_hash: Vec<u8>,
    pub(super) anchor_hash: Vec<u8>,
}

/// An anchored head the store no longer holds as recorded.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct AnchoredHead {
    pub(super) aggregate_type: String,
    pub(super) aggregate_id: String,
    pub(super) last_sequence: i64,
    pub(super) anchor_id: i64,
    pub(super) stored_hash: Option<Vec<u8>>,
    pub(super) store_last: Option<i64>,
}

/// Checks the anchor chain, the latest anchor's root and heads against the store; returns the
/// latest anchor.
pub(super) async fn check_anchors(
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
    check_anchor_chain(&anchors, kept, findings);
    let Some(latest) = anchors.into_iter().last() else {
        tx.commit().await?;
        return Ok(None);
    };
    check_heads_root(&mut tx, &latest, findings).await?;
    check_anchored_heads(&mut tx, findings).await?;
    check_nothing_beyond_heads(&mut tx, &latest, findings).await?;
    tx.commit().await?;
    Ok(Some(latest))
}

/// The anchors follow each other (ids, links, times), each hashes to its recorded hash, and
/// every hash kept outside the database is one of them.
fn check_anchor_chain(anchors: &[AnchorRow], kept: &[Hash], findings: &mut Findings) {
    let mut previous: Option<&AnchorRow> = None;
    for anchor in anchors {
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
}

/// The recorded heads hash to the latest anchor's root.
async fn check_heads_root(
    conn: &mut PgConnection,
    latest: &AnchorRow,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let (root, count) = heads_root(conn).await?;
    if root[..] != latest.root_hash[..] || count != latest.aggregates {
        findings.anchor(
            "altered",
            format!(
                "the recorded chain heads ({count} aggregates) do not hash to the root of anchor #{} ({} aggregates): the anchor bookkeeping was altered",
                latest.id, latest.aggregates
            ),
        );
    }
    Ok(())
}

/// Every anchored head is still stored, with the same hash.
async fn check_anchored_heads(
    conn: &mut PgConnection,
    findings: &mut Findings,
) -> anyhow::Result<()> {
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
    .fetch_all(&mut *conn)
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
    Ok(())
}

/// Nothing recorded before the latest anchor lies beyond the head it recorded.
async fn check_nothing_beyond_heads(
    conn: &mut PgConnection,
    latest: &AnchorRow,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let beyond: Vec<(String, String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT e.aggregate_type, e.aggregate_id, e.sequence, h.last_sequence \
         FROM events e \
         LEFT JOIN chain_heads h USING (aggregate_type, aggregate_id) \
         WHERE e.recorded_at < $1 AND (h.last_sequence IS NULL OR e.sequence > h.last_sequence)",
    )
    .bind(latest.taken_at)
    .fetch_all(&mut *conn)
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
    Ok(())
}

/// The root over `chain_heads` (sorted bytewise) and the number of heads.
pub(super) async fn heads_root(conn: &mut PgConnection) -> anyhow::Result<(Hash, i64)> {
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
    let taken_at = anchor_instant(&mut conn).await?;

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
    refuse_lost_heads(&mut tx).await?;
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

/// The instant of an anchor: taken while holding a lock that waits for every open transaction
/// writing events and keeps new ones out, so the store as of the anchor is exactly the events
/// recorded before it (recorded_at is the clock at insert time, after the writer got its lock).
async fn anchor_instant(conn: &mut PgConnection) -> anyhow::Result<DateTime<Utc>> {
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
    Ok(taken_at)
}

/// Refuses to anchor a store that lost the heads the previous anchor recorded.
async fn refuse_lost_heads(tx: &mut PgConnection) -> anyhow::Result<()> {
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
    Ok(())
}
