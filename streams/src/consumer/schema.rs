//! A consumer's PostgreSQL schema: its tables and the runtime's bookkeeping.

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Transaction};

use super::*;

/// Creates a projection's tables and the runtime's bookkeeping (idempotent). Readers of the read
/// model (the API) call it too, so a query before the first projector start is a 404, not an
/// error.
pub async fn ensure_schema(projection: &dyn Projection, pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = begin_with_bookkeeping(pool, projection.name()).await?;
    sqlx::raw_sql(projection.schema_sql())
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// A transaction that holds `schema`'s lock (processes starting at once must not race on
/// CREATE) and in which the runtime's own tables (dedup, checkpoints, dead letters, lag) exist.
async fn begin_with_bookkeeping(
    pool: &PgPool,
    schema: &str,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    let runtime_sql = include_str!("../../sql/consumer.sql").replace("{schema}", schema);
    sqlx::raw_sql(&runtime_sql).execute(&mut *tx).await?;
    Ok(tx)
}

/// Where a consumer whose state was lost (its database restored from the topics) starts again:
/// every aggregate of `aggregate_types` counts as applied up to its last event recorded before
/// `instant`, so that, read from the records published since `instant`, each aggregate's next
/// event is the one after (no sequence gap to wait on) and nothing before it is applied twice.
/// Returns the aggregates positioned.
pub async fn resume_from(
    pool: &PgPool,
    schema: &str,
    aggregate_types: &[&str],
    instant: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    let mut tx = begin_with_bookkeeping(pool, schema).await?;
    let positioned = sqlx::query(&format!(
        "INSERT INTO {schema}.applied AS a (aggregate_type, aggregate_id, last_sequence) \
         SELECT aggregate_type, aggregate_id, max(sequence) FROM events \
         WHERE aggregate_type = ANY($1) AND recorded_at < $2 \
         GROUP BY aggregate_type, aggregate_id \
         ON CONFLICT (aggregate_type, aggregate_id) \
         DO UPDATE SET last_sequence = GREATEST(a.last_sequence, excluded.last_sequence)"
    ))
    .bind(aggregate_types)
    .bind(instant)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(positioned)
}

/// Begins a transaction whose unqualified names resolve in `schema` (as [`use_schema`] makes
/// them), in one round trip: the `BEGIN` and the `SET LOCAL` travel in one message. A consumer
/// begins one per batch, and at a few events per batch the round trips are most of its cost.
pub async fn begin_in_schema(
    pool: &PgPool,
    schema: &str,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let quoted = format!("\"{}\"", schema.replace('"', "\"\""));
    pool.begin_with(format!("BEGIN; SET LOCAL search_path = {quoted}"))
        .await
}

/// Where a batch leaves read model `schema`, written in one statement: the last sequence
/// applied per aggregate (never moving back), the next offset per partition with the store's
/// commit time of its last applied event (see [`store_checkpoints`]), and the live signal that
/// these aggregates moved (delivered on commit, see [`super::live`]).
pub(super) async fn record_batch(
    tx: &mut Transaction<'static, Postgres>,
    schema: &str,
    positions: &HashMap<(String, String), i64>,
    checkpoints: &[(&str, i32, i64, Option<&str>)],
    moved: &[String],
) -> Result<(), sqlx::Error> {
    let (types, ids, sequences) = super::replay::position_columns(
        positions
            .iter()
            .map(|((t, i), s)| ((t.as_str(), i.as_str()), *s)),
    );
    let columns = CheckpointColumns::of(checkpoints.iter().copied());
    // Data-modifying CTEs run whether or not the query reads them.
    sqlx::query(&format!(
        "WITH positions AS ({}), checkpoints AS ({}) \
         SELECT pg_notify($8, $9 || ':' || k) FROM unnest($10::text[]) AS k",
        super::replay::positions_upsert(schema),
        checkpoints_upsert(schema, 4),
    ))
    .bind(&types)
    .bind(&ids)
    .bind(&sequences)
    .bind(&columns.topics)
    .bind(&columns.partitions)
    .bind(&columns.offsets)
    .bind(&columns.recorded)
    .bind(super::live::CHANNEL)
    .bind(applied_channel(schema))
    .bind(moved)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Checkpoints `(topic, partition, next offset, the store's commit time of the last applied
/// event)` as the four arrays the SQL unnests.
struct CheckpointColumns<'c> {
    topics: Vec<&'c str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    recorded: Vec<Option<chrono::DateTime<chrono::FixedOffset>>>,
}

impl<'c> CheckpointColumns<'c> {
    fn of(checkpoints: impl IntoIterator<Item = (&'c str, i32, i64, Option<&'c str>)>) -> Self {
        let mut columns = Self {
            topics: Vec::new(),
            partitions: Vec::new(),
            offsets: Vec::new(),
            recorded: Vec::new(),
        };
        for (topic, partition, next_offset, recorded_at) in checkpoints {
            columns.topics.push(topic);
            columns.partitions.push(partition);
            columns.offsets.push(next_offset);
            columns
                .recorded
                .push(recorded_at.and_then(|r| chrono::DateTime::parse_from_rfc3339(r).ok()));
        }
        columns
    }
}

/// The upsert of checkpoints from the four arrays starting at parameter `$first`: the next offset
/// never moves back, and a partition keeps its last commit time when the batch applied nothing
/// on it.
fn checkpoints_upsert(schema: &str, first: usize) -> String {
    let [topics, partitions, offsets, recorded] = [first, first + 1, first + 2, first + 3];
    format!(
        "INSERT INTO {schema}.checkpoints (topic, partition, next_offset, last_recorded_at) \
         SELECT * FROM unnest(${topics}::text[], ${partitions}::int[], ${offsets}::bigint[], \
                              ${recorded}::timestamptz[]) \
         ON CONFLICT (topic, partition) DO UPDATE \
         SET next_offset = greatest({schema}.checkpoints.next_offset, excluded.next_offset), \
             last_recorded_at = coalesce(excluded.last_recorded_at, {schema}.checkpoints.last_recorded_at), \
             updated_at = clock_timestamp()"
    )
}

/// Points the transaction's unqualified names at `schema`: handlers name their tables without a
/// schema (`INSERT INTO orders ...`), so the same handlers write the live read model in the
/// projector and a shadow in a rebuild. Only `schema` and `pg_catalog` are searched: a table
/// missing from it is an error, never another schema's table of the same name.
pub async fn use_schema(
    tx: &mut Transaction<'static, Postgres>,
    schema: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('search_path', quote_ident($1), true)")
        .bind(schema)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Creates a projection's tables and the runtime's bookkeeping inside `tx`, under the
/// projection's name (`replay-tools rebuild` runs it while its shadow schema carries that name
/// within the transaction, so the projection's own SQL builds the shadow unchanged).
pub async fn create_tables(
    projection: &dyn Projection,
    tx: &mut Transaction<'static, Postgres>,
) -> Result<(), sqlx::Error> {
    let runtime_sql = include_str!("../../sql/consumer.sql").replace("{schema}", projection.name());
    sqlx::raw_sql(&runtime_sql).execute(&mut **tx).await?;
    sqlx::raw_sql(projection.schema_sql())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Moves the checkpoints of read model `schema` forward (never back): per partition
/// `(topic, partition, next offset, the store's commit time of its last applied event)`, the
/// time the lag in seconds is measured from, one entry per partition (a single statement). The
/// projector (in [`record_batch`]) and a rebuild's shadow both keep them so.
pub async fn store_checkpoints<'c>(
    tx: &mut Transaction<'static, Postgres>,
    schema: &str,
    checkpoints: impl IntoIterator<Item = (&'c str, i32, i64, Option<&'c str>)>,
) -> Result<(), sqlx::Error> {
    let columns = CheckpointColumns::of(checkpoints);
    sqlx::query(&checkpoints_upsert(schema, 1))
        .bind(&columns.topics)
        .bind(&columns.partitions)
        .bind(&columns.offsets)
        .bind(&columns.recorded)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
