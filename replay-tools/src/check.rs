//! `replay-tools check`: compares two versions of a read model (the live one and its rebuild,
//! or one kept by a swap) table by table, and prints every difference.
//!
//! Rows are compared as JSON (`to_jsonb`), paired by the table's primary key (or another unique
//! key, or as a multiset of whole rows when no key is usable), in SQL, so a table of millions of
//! rows costs one join. Left out, because they legitimately differ between two builds of the
//! same events: the runtime's and the rebuild's bookkeeping of where a projector stands
//! (`checkpoints`, `lag`, `dead_letters`, `rebuild_state`; `applied` is compared, it is what was
//! applied), identity columns (numbered in the order of application, which follows the
//! interleaving of partitions), and what a worker writes beside the read model
//! ([`crate::rebuild::worker_state`]). Compare a moving live model once it has caught up, or
//! with its projector stopped: rows it applied after the rebuild stopped are differences.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use anyhow::bail;
use clap::Args;
use futures::TryStreamExt;
use serde_json::Value as Json;
use sqlx::PgPool;

use crate::rebuild::{shadow_name, worker_state, WorkerState, BOOKKEEPING_TABLES};

/// `replay-tools check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The read model (its live schema), e.g. `tracking`.
    pub read_model: String,
    /// The schema to compare it with [default: its rebuild, `<read model>__rebuild`]; e.g. the
    /// model a swap kept, `tracking__old_20261121_180000`.
    #[arg(long, value_name = "SCHEMA")]
    pub against: Option<String>,
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct Column {
    name: String,
    data_type: String,
    /// An identity or serial column.
    generated: bool,
}

/// Runs the comparison; fails (non-zero exit) on any difference.
pub async fn run(args: CheckArgs, pool: &PgPool, out: &mut impl Write) -> anyhow::Result<()> {
    let left = args.read_model;
    let right = args.against.unwrap_or_else(|| shadow_name(&left));
    for schema in [&left, &right] {
        if !is_identifier(schema) {
            bail!("`{schema}` is not a schema name (lower-case letters, digits and _)");
        }
    }
    if left == right {
        bail!("nothing to compare: both sides are {left}");
    }
    require_schemas(pool, [&left, &right]).await?;
    let model = left.split("__").next().unwrap_or(&left).to_owned();
    let worker = worker_state(&model);
    let skipped = |table: &str| {
        BOOKKEEPING_TABLES.contains(&table) || worker.is_some_and(|w| w.tables.contains(&table))
    };
    let left_tables = tables(pool, &left).await?;
    let right_tables = tables(pool, &right).await?;
    writeln!(
        out,
        "comparing {left} with {right} (values: {left} | {right})"
    )?;
    let mut differences = 0u64;
    let mut rows = 0i64;
    let mut compared = 0;
    for table in left_tables.union(&right_tables) {
        if skipped(table) {
            continue;
        }
        if !left_tables.contains(table) || !right_tables.contains(table) {
            let only = if left_tables.contains(table) {
                &left
            } else {
                &right
            };
            writeln!(out, "{table}: table only in {only}")?;
            differences += 1;
            continue;
        }
        compared += 1;
        let (table_rows, table_differences) =
            compare_table(pool, (&left, &right), table, worker, out).await?;
        rows += table_rows;
        differences += table_differences;
    }
    if differences > 0 {
        bail!(
            "{differences} difference{} between {left} and {right}",
            if differences == 1 { "" } else { "s" }
        );
    }
    writeln!(
        out,
        "no difference: {compared} tables, {rows} rows of {left} compared with {right}"
    )?;
    Ok(())
}

/// Fails, naming the versions that do exist, when either schema is missing.
async fn require_schemas(pool: &PgPool, schemas: [&String; 2]) -> anyhow::Result<()> {
    for schema in schemas {
        if !schema_exists(pool, schema).await? {
            let base = schema.split("__").next().unwrap_or(schema);
            let known: Vec<String> = sqlx::query_scalar(
                "SELECT nspname::text FROM pg_namespace WHERE nspname = $1 OR nspname LIKE $1 || '\\_\\_%' \
                 ORDER BY 1",
            )
            .bind(base)
            .fetch_all(pool)
            .await?;
            bail!(
                "there is no schema {schema}{}",
                if known.is_empty() {
                    String::new()
                } else {
                    format!("; versions of {base} here: {}", known.join(", "))
                }
            );
        }
    }
    Ok(())
}

/// One table present on both sides: its columns, then its rows (by key when it has one);
/// returns the rows compared and the differences written.
async fn compare_table(
    pool: &PgPool,
    (left, right): (&str, &str),
    table: &str,
    worker: Option<WorkerState>,
    out: &mut impl Write,
) -> anyhow::Result<(i64, u64)> {
    let mut differences = 0u64;
    let left_columns = columns(pool, left, table).await?;
    let right_columns = columns(pool, right, table).await?;
    let mut ignored: BTreeSet<String> = worker
        .map(|w| {
            w.columns
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, c)| (*c).to_owned())
                .collect()
        })
        .unwrap_or_default();
    for column in left_columns.iter().chain(&right_columns) {
        if column.generated {
            ignored.insert(column.name.clone());
        }
    }
    let by_name = |cols: &[Column]| -> BTreeMap<String, String> {
        cols.iter()
            .map(|c| (c.name.clone(), c.data_type.clone()))
            .collect()
    };
    let (l, r) = (by_name(&left_columns), by_name(&right_columns));
    for (name, data_type) in &l {
        match r.get(name) {
            None => {
                writeln!(out, "{table}: column {name} only in {left}")?;
                differences += 1;
                ignored.insert(name.clone());
            }
            Some(other) if other != data_type => {
                writeln!(
                    out,
                    "{table}: column {name} is {data_type} in {left}, {other} in {right}"
                )?;
                differences += 1;
                ignored.insert(name.clone());
            }
            Some(_) => {}
        }
    }
    for name in r.keys().filter(|n| !l.contains_key(*n)) {
        writeln!(out, "{table}: column {name} only in {right}")?;
        differences += 1;
        ignored.insert(name.clone());
    }
    let ignored: Vec<String> = ignored.into_iter().collect();
    let key = key(pool, left, table, &ignored, &r).await?;
    let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {left}.{}", quoted(table)))
        .fetch_one(pool)
        .await?;
    differences += match key {
        Some(key) => compare_keyed(pool, (left, right), table, &key, &ignored, out).await?,
        None => compare_rows(pool, (left, right), table, &ignored, out).await?,
    };
    Ok((count, differences))
}

fn is_identifier(name: &str) -> bool {
    name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// An identifier quoted for SQL.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal for SQL.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

async fn schema_exists(pool: &PgPool, schema: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(pool)
        .await
}

async fn tables(pool: &PgPool, schema: &str) -> Result<BTreeSet<String>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')",
    )
    .bind(schema)
    .fetch_all(pool)
    .await?;
    Ok(names.into_iter().collect())
}

async fn columns(pool: &PgPool, schema: &str, table: &str) -> Result<Vec<Column>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS data_type, \
                (a.attidentity <> '' \
                 OR coalesce(pg_get_expr(d.adbin, d.adrelid), '') LIKE 'nextval(%') AS generated \
         FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await
}

/// The columns pairing rows: the primary key, else another unique key, made only of compared
/// columns present on both sides.
async fn key(
    pool: &PgPool,
    schema: &str,
    table: &str,
    ignored: &[String],
    other: &BTreeMap<String, String>,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let keys: Vec<Vec<String>> = sqlx::query_scalar(
        "SELECT array_agg(a.attname::text ORDER BY k.ord) \
         FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique \
           AND i.indpred IS NULL AND i.indexprs IS NULL \
         GROUP BY i.indexrelid, i.indisprimary \
         ORDER BY i.indisprimary DESC, i.indexrelid",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await?;
    Ok(keys.into_iter().find(|columns| {
        columns
            .iter()
            .all(|c| !ignored.contains(c) && other.contains_key(c))
    }))
}

/// Rows paired by key: missing on one side, or with different values.
async fn compare_keyed(
    pool: &PgPool,
    (left, right): (&str, &str),
    table: &str,
    key: &[String],
    ignored: &[String],
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let key_expr = format!(
        "jsonb_build_object({})",
        key.iter()
            .map(|c| format!("{}, t.{}", literal(c), quoted(c)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let name = quoted(table);
    let sql = format!(
        "WITH a AS (SELECT {key_expr} AS k, to_jsonb(t) - $1::text[] AS r FROM {left}.{name} t), \
              b AS (SELECT {key_expr} AS k, to_jsonb(t) - $1::text[] AS r FROM {right}.{name} t) \
         SELECT coalesce(a.k, b.k) AS k, a.r AS left_row, b.r AS right_row \
         FROM a FULL JOIN b ON a.k = b.k \
         WHERE a.r IS DISTINCT FROM b.r \
         ORDER BY 1"
    );
    let mut rows = sqlx::query_as::<_, (Json, Option<Json>, Option<Json>)>(&sql)
        .bind(ignored)
        .fetch(pool);
    let mut differences = 0;
    while let Some((key, left_row, right_row)) = rows.try_next().await? {
        differences += 1;
        match (left_row, right_row) {
            (Some(row), None) => writeln!(out, "{table} {key}: only in {left}: {row}")?,
            (None, Some(row)) => writeln!(out, "{table} {key}: only in {right}: {row}")?,
            (Some(a), Some(b)) => writeln!(out, "{table} {key}: {}", changed(&a, &b))?,
            (None, None) => {}
        }
    }
    Ok(differences)
}

/// `column: left | right` for each column whose values differ.
fn changed(left: &Json, right: &Json) -> String {
    let empty = serde_json::Map::new();
    let a = left.as_object().unwrap_or(&empty);
    let b = right.as_object().unwrap_or(&empty);
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .filter(|n| a.get(*n) != b.get(*n))
        .map(|n| {
            let show = |v: Option<&Json>| v.map_or_else(|| "(none)".to_owned(), Json::to_string);
            format!("{n}: {} | {}", show(a.get(n)), show(b.get(n)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Tables without a usable key: whole rows counted on each side.
async fn compare_rows(
    pool: &PgPool,
    (left, right): (&str, &str),
    table: &str,
    ignored: &[String],
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let name = quoted(table);
    let sql = format!(
        "WITH a AS (SELECT to_jsonb(t) - $1::text[] AS r, count(*) AS n FROM {left}.{name} t GROUP BY 1), \
              b AS (SELECT to_jsonb(t) - $1::text[] AS r, count(*) AS n FROM {right}.{name} t GROUP BY 1) \
         SELECT coalesce(a.r, b.r) AS r, coalesce(a.n, 0) AS left_n, coalesce(b.n, 0) AS right_n \
         FROM a FULL JOIN b ON a.r = b.r \
         WHERE a.n IS DISTINCT FROM b.n \
         ORDER BY 1"
    );
    let mut rows = sqlx::query_as::<_, (Json, i64, i64)>(&sql)
        .bind(ignored)
        .fetch(pool);
    let mut differences = 0;
    while let Some((row, a, b)) = rows.try_next().await? {
        differences += 1;
        writeln!(
            out,
            "{table} {row}: {a} times in {left}, {b} times in {right}"
        )?;
    }
    Ok(differences)
}
