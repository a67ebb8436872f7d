//! The shadow schema a rebuild fills: its bookkeeping, its creation and the end of its build.

use super::*;

impl Rebuild {
    /// Whether the shadow's build finished: `rebuild_state` is made durable (logged) last, once
    /// every table and index is in place.
    pub(super) async fn finished(&self) -> anyhow::Result<bool> {
        let persistence: Option<String> = sqlx::query_scalar(
            "SELECT relpersistence::text FROM pg_class WHERE oid = to_regclass($1)",
        )
        .bind(format!("{}.rebuild_state", self.schemas.shadow))
        .fetch_optional(&self.pool)
        .await?;
        Ok(persistence.as_deref() == Some("p"))
    }

    /// The shadow's state; `None` without a shadow.
    pub(super) async fn state(&self) -> anyhow::Result<Option<State>> {
        let shadow = &self.schemas.shadow;
        let (schema, table): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1), \
                    to_regclass($2) IS NOT NULL",
        )
        .bind(shadow)
        .bind(format!("{shadow}.rebuild_state"))
        .fetch_one(&self.pool)
        .await?;
        if !schema {
            return Ok(None);
        }
        if !table {
            bail!(
                "the schema {shadow} exists but is not a rebuild (no rebuild_state table); \
                 rename or drop it first"
            );
        }
        let state: Option<State> = sqlx::query_as(&format!(
            "SELECT source, as_of, started_at, applied, store_recorded_at, store_aggregate_type, \
                    store_aggregate_id, store_sequence FROM {shadow}.rebuild_state"
        ))
        .fetch_optional(&self.pool)
        .await?;
        state.map(Some).with_context(|| {
            format!(
                "{shadow}.rebuild_state is empty: a rebuild's tables are unlogged until it \
                     completes, and PostgreSQL empties unlogged tables when it recovers from a \
                     crash; start over with --restart"
            )
        })
    }

    /// Opens a transaction in which the handlers' unqualified names are the shadow's.
    pub(super) async fn enter(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        use_schema(&mut tx, &self.schemas.shadow).await?;
        Ok(tx)
    }

    /// Opens a transaction in which the shadow carries the live name: for the projection's DDL,
    /// which names the live schema.
    pub(super) async fn enter_renamed(
        &self,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let Schemas {
            live,
            shadow,
            parked,
        } = &self.schemas;
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(&format!(
            "ALTER SCHEMA {live} RENAME TO {parked}; ALTER SCHEMA {shadow} RENAME TO {live}"
        ))
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }

    /// Gives the names back and commits.
    pub(super) async fn leave_renamed(
        &self,
        mut tx: Transaction<'static, Postgres>,
    ) -> Result<(), sqlx::Error> {
        let Schemas {
            live,
            shadow,
            parked,
        } = &self.schemas;
        sqlx::raw_sql(&format!(
            "ALTER SCHEMA {live} RENAME TO {shadow}; ALTER SCHEMA {parked} RENAME TO {live}"
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Creates the shadow with the projection's own DDL, under the live name.
    pub(super) async fn create_shadow(&self, source: Source) -> anyhow::Result<()> {
        let Schemas { live, parked, .. } = &self.schemas;
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(&format!(
            "ALTER SCHEMA {live} RENAME TO {parked}; CREATE SCHEMA {live}"
        ))
        .execute(&mut *tx)
        .await?;
        create_tables(self.projection.as_ref(), &mut tx).await?;
        sqlx::raw_sql(&format!(
            "CREATE TABLE {live}.rebuild_state ( \
               one                  boolean PRIMARY KEY DEFAULT true CHECK (one), \
               source               text        NOT NULL, \
               as_of                timestamptz, \
               started_at           timestamptz NOT NULL DEFAULT clock_timestamp(), \
               applied              bigint      NOT NULL DEFAULT 0, \
               store_recorded_at    timestamptz, \
               store_aggregate_type text, \
               store_aggregate_id   text, \
               store_sequence       bigint, \
               store_dead_letters   bigint      NOT NULL DEFAULT 0)"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO {live}.rebuild_state (source, as_of) VALUES ($1, $2)"
        ))
        .bind(source.as_str())
        .bind(self.as_of)
        .execute(&mut *tx)
        .await?;
        // Bulk mode until `finish_build`: unlogged tables, the query-only indexes left out.
        for table in tables_of(&mut *tx, live, Persistence::Logged).await? {
            sqlx::raw_sql(&format!("ALTER TABLE {live}.{table} SET UNLOGGED"))
                .execute(&mut *tx)
                .await?;
        }
        for index in self.projection.query_only_indexes() {
            sqlx::raw_sql(&format!("DROP INDEX {live}.{index}"))
                .execute(&mut *tx)
                .await
                .with_context(|| format!("dropping the query-only index {index} of {live}"))?;
        }
        self.leave_renamed(tx).await?;
        Ok(())
    }

    /// Ends the bulk mode of a shadow whose history is applied: its tables made durable (one
    /// sequential rewrite each, with its indexes rebuilt by sorting; the largest first, a few
    /// side by side) and the query-only indexes built. `rebuild_state` is made durable last:
    /// until it is, a database crash empties it with the rest, and the rebuild starts over,
    /// never from a half-durable shadow. Idempotent: a resumed rebuild that had got this far
    /// does it again.
    pub(super) async fn finish_build(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let shadow = &self.schemas.shadow;
        let tables = tables_of(&self.pool, shadow, Persistence::Unlogged).await?;
        futures::stream::iter(tables.iter().filter(|t| *t != "rebuild_state"))
            .map(|table| async move {
                sqlx::raw_sql(&format!("ALTER TABLE {shadow}.{table} SET LOGGED"))
                    .execute(&self.pool)
                    .await
                    .with_context(|| format!("making {shadow}.{table} durable"))
            })
            .buffer_unordered(FINISHING_SIDE_BY_SIDE)
            .try_collect::<Vec<_>>()
            .await?;
        let mut tx = self.enter_renamed().await?;
        let live = self.schemas.live;
        // The projection's DDL is idempotent: it creates what is missing, the indexes left out.
        create_tables(self.projection.as_ref(), &mut tx)
            .await
            .with_context(|| format!("building the indexes of {shadow}"))?;
        sqlx::raw_sql(&format!("ALTER TABLE {live}.rebuild_state SET LOGGED"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("making {shadow}.rebuild_state durable"))?;
        self.leave_renamed(tx).await?;
        self.profile.finish.add(started);
        Ok(())
    }
}
