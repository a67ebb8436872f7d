//! Swapping the rebuilt shadow in for the live read model, under its lock.

use super::*;

/// Swaps the finished shadow in and says what that took.
pub(super) async fn swap_in(
    out: &mut impl Write,
    rebuild: &Rebuild,
    interrupted: &CancellationToken,
) -> anyhow::Result<()> {
    let live = rebuild.schemas.live;
    let swapped = rebuild.swap(interrupted).await?;
    let old = &swapped.old;
    writeln!(
        out,
        "{live}: swapped in, after catching up {} events the live model applied meanwhile \
             ({} of them under the lock); the previous read model is kept as {old} (`DROP \
             SCHEMA {old} CASCADE` once satisfied)",
        swapped.caught_up + swapped.under_lock,
        swapped.under_lock
    )?;
    Ok(())
}

impl Rebuild {
    /// Swaps the shadow in (see the module's documentation).
    pub(super) async fn swap(&self, interrupted: &CancellationToken) -> anyhow::Result<Swapped> {
        // Most of what the live model applied meanwhile, without holding anything.
        let bar = progress::bar("catch up", None);
        let mut tally = Tally::default();
        if !self
            .store_pass(StoreQuery::TopUp, &bar, interrupted, &mut tally)
            .await?
        {
            bail!(
                "interrupted before the swap; run `replay-tools rebuild {} --resume --swap`",
                self.schemas.live
            );
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.swap_once().await {
                Ok((old, under_lock)) => {
                    return Ok(Swapped {
                        old,
                        caught_up: tally.applied,
                        under_lock,
                    })
                }
                Err(e) if attempt < 3 && is_lock_conflict(&e) => {
                    eprintln!("replay-tools: swap attempt {attempt} failed ({e:#}); retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.context("swap failed; nothing was changed")),
            }
        }
    }

    /// Returns where the previous read model is kept, and the events applied under the lock.
    pub(super) async fn swap_once(&self) -> anyhow::Result<(String, u64)> {
        let Schemas { live, shadow, .. } = &self.schemas;
        let live = *live;
        let mut lock = self.pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '30s'")
            .execute(&mut *lock)
            .await?;
        let worker = worker_state(live);
        let tables: Vec<String> = ["applied", "checkpoints", "dead_letters"]
            .iter()
            .chain(worker.map_or(&[][..], |w| w.tables))
            .map(|t| format!("{live}.{t}"))
            .collect();
        // The live projector's next batch waits here (it starts by locking its `applied` rows);
        // readers go on.
        sqlx::raw_sql(&format!(
            "LOCK TABLE {} IN EXCLUSIVE MODE",
            tables.join(", ")
        ))
        .execute(&mut *lock)
        .await?;
        let bar = ProgressBar::hidden();
        let mut tally = Tally::default();
        self.store_pass(
            StoreQuery::TopUp,
            &bar,
            &CancellationToken::new(),
            &mut tally,
        )
        .await?;
        let behind: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {live}.applied l \
             LEFT JOIN {shadow}.applied s USING (aggregate_type, aggregate_id) \
             WHERE s.last_sequence IS NULL OR s.last_sequence < l.last_sequence"
        ))
        .fetch_one(&mut *lock)
        .await?;
        if behind > 0 {
            bail!(
                "{behind} aggregates are further in the live read model than in the rebuilt one \
                 even after catching up from the event store (events missing from the store?)"
            );
        }
        sqlx::query(&format!(
            "INSERT INTO {shadow}.checkpoints (topic, partition, next_offset, last_recorded_at) \
             SELECT topic, partition, next_offset, last_recorded_at FROM {live}.checkpoints \
             ON CONFLICT (topic, partition) DO UPDATE \
             SET next_offset = greatest({shadow}.checkpoints.next_offset, excluded.next_offset), \
                 last_recorded_at = greatest({shadow}.checkpoints.last_recorded_at, excluded.last_recorded_at)"
        ))
        .execute(&mut *lock)
        .await?;
        if let Some(worker) = worker {
            let sql = worker
                .carry_over
                .replace("{live}", live)
                .replace("{shadow}", shadow);
            sqlx::raw_sql(&sql).execute(&mut *lock).await?;
        }
        let old = format!("{live}__old_{}", Utc::now().format("%Y%m%d_%H%M%S"));
        sqlx::raw_sql(&format!(
            "DROP TABLE {shadow}.rebuild_state; \
             ALTER SCHEMA {live} RENAME TO {old}; \
             ALTER SCHEMA {shadow} RENAME TO {live}"
        ))
        .execute(&mut *lock)
        .await?;
        lock.commit().await?;
        Ok((old, tally.applied))
    }
}

/// A deadlock or a lock wait that timed out: worth another attempt.
pub(super) fn is_lock_conflict(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .is_some_and(|code| code == "40P01" || code == "55P03")
    })
}

/// Takes the per-read-model rebuild lock on a connection of its own (released when dropped).
pub(super) async fn exclusive(pool: &PgPool, live: &str) -> anyhow::Result<PgConnection> {
    let mut connection = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(format!("replay-tools rebuild {live}"))
        .fetch_one(&mut connection)
        .await?;
    if !locked {
        bail!("another rebuild of {live} is running");
    }
    Ok(connection)
}

/// Waits for a feeder: its error wins; an interrupted drain stops it.
pub(super) async fn finish(
    feeder: tokio::task::JoinHandle<anyhow::Result<()>>,
    completed: anyhow::Result<bool>,
    bar: &ProgressBar,
) -> anyhow::Result<bool> {
    bar.finish_and_clear();
    match completed {
        Ok(true) => {
            feeder.await.context("the event reader stopped")??;
            Ok(true)
        }
        Ok(false) => {
            feeder.abort();
            Ok(false)
        }
        Err(e) => {
            feeder.abort();
            Err(e)
        }
    }
}
