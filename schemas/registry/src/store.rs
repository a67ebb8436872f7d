//! PostgreSQL storage of the registry: connection pool, migrations, locks and every query.
//!
//! All tables live in the registry's own PostgreSQL schema (`REGISTRY_DB_SCHEMA`): every pooled
//! connection has its `search_path` set to it, so the queries below name tables unqualified and
//! the registry can share a database with other services. Migrations are the `.sql` files of
//! `schemas/registry/migrations`, applied at start-up in one transaction that holds a
//! transaction-level advisory lock, and recorded in the registry's own bookkeeping table
//! (`registry_migrations`), so they never collide with another migrator of the same database
//! and two registries starting together apply them once.
//!
//! Writes that create versions or delete them run in [`Store::begin_exclusive`]: one transaction
//! holding the registry's write lock, so that two concurrent registrations of a schema get one
//! id and the version numbers of a subject never collide.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};

use super::error::RegistryError;
use super::schema::SchemaReference;

/// The migrations, in order: (version, name, SQL). Append only; never edit an applied one.
const MIGRATIONS: &[(i32, &str, &str)] =
    &[(1, "initial", include_str!("../migrations/0001_initial.sql"))];

/// Connections the registry holds at most (it serves few, short requests).
const MAX_CONNECTIONS: u32 = 10;

/// Checks that `name` is a plain lower-case PostgreSQL identifier, so it can be used unquoted.
pub(crate) fn validate_schema_name(name: &str) -> Result<(), RegistryError> {
    let mut chars = name.chars();
    let valid = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(RegistryError::InvalidDbSchema(name.to_owned()))
    }
}

/// The pool and the names that scope the registry inside its database.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    pool: PgPool,
    db_schema: String,
}

/// A version of a subject, with its schema.
#[derive(Debug, Clone)]
pub(crate) struct SubjectVersion {
    pub subject: String,
    pub version: i32,
    pub schema: StoredSchema,
}

/// A schema row.
#[derive(Debug, Clone)]
pub(crate) struct StoredSchema {
    pub id: i32,
    pub schema_type: String,
    pub text: String,
    pub references: Vec<SchemaReference>,
}

/// A version number of a subject and whether it is soft-deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VersionState {
    pub version: i32,
    pub deleted: bool,
}

impl Store {
    /// Connects the pool; every connection works inside `db_schema`.
    pub(crate) async fn connect(
        database_url: &str,
        db_schema: &str,
    ) -> Result<Self, RegistryError> {
        validate_schema_name(db_schema)?;
        let options: PgConnectOptions = database_url.parse()?;
        let options = options
            .options([("search_path", db_schema)])
            .application_name("schema-registry");
        // One direct connection first: the pool retries until its timeout and then reports only
        // that it timed out, while this reports why (refused, unknown database, bad password).
        PgConnection::connect_with(&options).await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            db_schema: db_schema.to_owned(),
        })
    }

    /// Applies the migrations not applied yet.
    pub(crate) async fn migrate(&self) -> Result<(), RegistryError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("schema-registry:{}:migrate", self.db_schema))
            .execute(&mut *tx)
            .await?;
        // The name was validated as a plain identifier: safe to splice.
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; SET LOCAL search_path TO {schema};
             CREATE TABLE IF NOT EXISTS registry_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
            schema = self.db_schema
        ))
        .execute(&mut *tx)
        .await?;
        let applied: Vec<i32> = sqlx::query_scalar("SELECT version FROM registry_migrations")
            .fetch_all(&mut *tx)
            .await?;
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO registry_migrations (version, name) VALUES ($1, $2)")
                .bind(version)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tracing::info!(version, name, "applied registry migration");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Answers when the database does.
    pub(crate) async fn ping(&self) -> Result<(), RegistryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A connection for reads.
    pub(crate) async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Postgres>, RegistryError> {
        Ok(self.pool.acquire().await?)
    }

    /// A transaction holding the registry's write lock until it ends.
    pub(crate) async fn begin_exclusive(
        &self,
    ) -> Result<Transaction<'static, Postgres>, RegistryError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("schema-registry:{}:write", self.db_schema))
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Closes the pool (waits for the connections in use to come back).
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }
}

const SUBJECT_VERSION_COLUMNS: &str = "v.subject, v.version, s.id, s.schema_type, \
     s.schema_text, s.refs";

fn subject_version_from_row(row: &sqlx::postgres::PgRow) -> Result<SubjectVersion, sqlx::Error> {
    let Json(references): Json<Vec<SchemaReference>> = row.try_get("refs")?;
    Ok(SubjectVersion {
        subject: row.try_get("subject")?,
        version: row.try_get("version")?,
        schema: StoredSchema {
            id: row.try_get("id")?,
            schema_type: row.try_get("schema_type")?,
            text: row.try_get("schema_text")?,
            references,
        },
    })
}

/// The schema with global id `id`, if a version of some subject (live or soft-deleted) uses it.
pub(crate) async fn schema_by_id(
    conn: &mut PgConnection,
    id: i32,
) -> Result<Option<StoredSchema>, RegistryError> {
    let row = sqlx::query(
        "SELECT s.id, s.schema_type, s.schema_text, s.refs FROM schemas s
         WHERE s.id = $1 AND EXISTS (SELECT 1 FROM subject_versions v WHERE v.schema_id = s.id)",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let Json(references): Json<Vec<SchemaReference>> = row.try_get("refs")?;
    Ok(Some(StoredSchema {
        id: row.try_get("id")?,
        schema_type: row.try_get("schema_type")?,
        text: row.try_get("schema_text")?,
        references,
    }))
}

/// The (subject, version) pairs that use schema `id`, ordered.
pub(crate) async fn versions_of_schema(
    conn: &mut PgConnection,
    id: i32,
    include_deleted: bool,
) -> Result<Vec<(String, i32)>, RegistryError> {
    let rows = sqlx::query_as(
        "SELECT subject, version FROM subject_versions
         WHERE schema_id = $1 AND ($2 OR NOT deleted) ORDER BY subject, version",
    )
    .bind(id)
    .bind(include_deleted)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// Subjects with at least one live version (or any version, with `include_deleted`), sorted.
pub(crate) async fn subjects(
    conn: &mut PgConnection,
    include_deleted: bool,
    deleted_only: bool,
    prefix: &str,
) -> Result<Vec<String>, RegistryError> {
    let rows = sqlx::query_scalar(
        "SELECT subject FROM subject_versions
         WHERE starts_with(subject, $3)
         GROUP BY subject
         HAVING CASE WHEN $2 THEN bool_and(deleted)
                     WHEN $1 THEN true
                     ELSE NOT bool_and(deleted) END
         ORDER BY subject",
    )
    .bind(include_deleted)
    .bind(deleted_only)
    .bind(prefix)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// Every version of a subject, live or soft-deleted, oldest first; empty when the subject is
/// unknown.
pub(crate) async fn version_states(
    conn: &mut PgConnection,
    subject: &str,
) -> Result<Vec<VersionState>, RegistryError> {
    let rows: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT version, deleted FROM subject_versions WHERE subject = $1 ORDER BY version",
    )
    .bind(subject)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(version, deleted)| VersionState { version, deleted })
        .collect())
}

/// One version of a subject with its schema, live or soft-deleted.
pub(crate) async fn subject_version(
    conn: &mut PgConnection,
    subject: &str,
    version: i32,
) -> Result<Option<SubjectVersion>, RegistryError> {
    let row = sqlx::query(&format!(
        "SELECT {SUBJECT_VERSION_COLUMNS} FROM subject_versions v JOIN schemas s ON s.id = v.schema_id
         WHERE v.subject = $1 AND v.version = $2"
    ))
    .bind(subject)
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.as_ref().map(subject_version_from_row).transpose()?)
}

/// The live versions of a subject with their schemas, oldest first.
pub(crate) async fn live_versions(
    conn: &mut PgConnection,
    subject: &str,
) -> Result<Vec<SubjectVersion>, RegistryError> {
    let rows = sqlx::query(&format!(
        "SELECT {SUBJECT_VERSION_COLUMNS} FROM subject_versions v JOIN schemas s ON s.id = v.schema_id
         WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version"
    ))
    .bind(subject)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(subject_version_from_row)
        .collect::<Result<_, _>>()?)
}

/// The latest version of `subject` whose schema has this identity (live only, unless
/// `include_deleted`).
pub(crate) async fn find_in_subject(
    conn: &mut PgConnection,
    subject: &str,
    schema_type: &str,
    identity: &str,
    include_deleted: bool,
) -> Result<Option<SubjectVersion>, RegistryError> {
    let row = sqlx::query(&format!(
        "SELECT {SUBJECT_VERSION_COLUMNS} FROM subject_versions v JOIN schemas s ON s.id = v.schema_id
         WHERE v.subject = $1 AND s.schema_type = $2
           AND s.canonical_md5 = md5($3) AND s.canonical = $3
           AND ($4 OR NOT v.deleted)
         ORDER BY v.deleted, v.version DESC LIMIT 1"
    ))
    .bind(subject)
    .bind(schema_type)
    .bind(identity)
    .bind(include_deleted)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.as_ref().map(subject_version_from_row).transpose()?)
}

/// The global id of the schema with this identity, creating it if it is new.
pub(crate) async fn schema_id_for(
    conn: &mut PgConnection,
    schema_type: &str,
    identity: &str,
    text: &str,
    references: &[SchemaReference],
) -> Result<i32, RegistryError> {
    let inserted: Option<i32> = sqlx::query_scalar(
        "INSERT INTO schemas (schema_type, canonical, schema_text, refs) VALUES ($1, $2, $3, $4)
         ON CONFLICT ON CONSTRAINT schemas_identity_key DO NOTHING RETURNING id",
    )
    .bind(schema_type)
    .bind(identity)
    .bind(text)
    .bind(Json(references))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = inserted {
        return Ok(id);
    }
    let id = sqlx::query_scalar(
        "SELECT id FROM schemas
         WHERE schema_type = $1 AND canonical_md5 = md5($2) AND canonical = $2",
    )
    .bind(schema_type)
    .bind(identity)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// Adds `schema_id` as the next version of `subject` (after every version it ever had that was
/// not permanently deleted) and returns the version number.
pub(crate) async fn add_version(
    conn: &mut PgConnection,
    subject: &str,
    schema_id: i32,
) -> Result<i32, RegistryError> {
    let version = sqlx::query_scalar(
        "INSERT INTO subject_versions (subject, version, schema_id)
         SELECT $1, COALESCE(MAX(version), 0) + 1, $2 FROM subject_versions WHERE subject = $1
         RETURNING version",
    )
    .bind(subject)
    .bind(schema_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(version)
}

/// Marks versions of a subject soft-deleted.
pub(crate) async fn soft_delete(
    conn: &mut PgConnection,
    subject: &str,
    versions: &[i32],
) -> Result<(), RegistryError> {
    sqlx::query(
        "UPDATE subject_versions SET deleted = true WHERE subject = $1 AND version = ANY($2)",
    )
    .bind(subject)
    .bind(versions)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Removes versions of a subject for good.
pub(crate) async fn hard_delete(
    conn: &mut PgConnection,
    subject: &str,
    versions: &[i32],
) -> Result<(), RegistryError> {
    sqlx::query("DELETE FROM subject_versions WHERE subject = $1 AND version = ANY($2)")
        .bind(subject)
        .bind(versions)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Ids of the schemas used by live versions that reference `subject` `version`.
pub(crate) async fn referenced_by(
    conn: &mut PgConnection,
    subject: &str,
    version: i32,
) -> Result<Vec<i32>, RegistryError> {
    let ids = sqlx::query_scalar(
        "SELECT DISTINCT s.id FROM schemas s JOIN subject_versions v ON v.schema_id = s.id
         WHERE NOT v.deleted AND s.refs @> $1 ORDER BY s.id",
    )
    .bind(Json(
        serde_json::json!([{ "subject": subject, "version": version }]),
    ))
    .fetch_all(&mut *conn)
    .await?;
    Ok(ids)
}

/// The compatibility level configured for `subject` itself, as stored.
pub(crate) async fn subject_config(
    conn: &mut PgConnection,
    subject: &str,
) -> Result<Option<String>, RegistryError> {
    Ok(
        sqlx::query_scalar("SELECT compatibility FROM subject_config WHERE subject = $1")
            .bind(subject)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Sets the compatibility level of `subject`.
pub(crate) async fn set_subject_config(
    conn: &mut PgConnection,
    subject: &str,
    compatibility: &str,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO subject_config (subject, compatibility) VALUES ($1, $2)
         ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility, updated_at = now()",
    )
    .bind(subject)
    .bind(compatibility)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Removes the compatibility level of `subject`; returns the one it had.
pub(crate) async fn delete_subject_config(
    conn: &mut PgConnection,
    subject: &str,
) -> Result<Option<String>, RegistryError> {
    Ok(
        sqlx::query_scalar("DELETE FROM subject_config WHERE subject = $1 RETURNING compatibility")
            .bind(subject)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// The global compatibility level, as stored, if one was set.
pub(crate) async fn global_config(
    conn: &mut PgConnection,
) -> Result<Option<String>, RegistryError> {
    Ok(
        sqlx::query_scalar("SELECT compatibility FROM global_config")
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Sets the global compatibility level.
pub(crate) async fn set_global_config(
    conn: &mut PgConnection,
    compatibility: &str,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO global_config (singleton, compatibility) VALUES (true, $1)
         ON CONFLICT (singleton) DO UPDATE SET compatibility = EXCLUDED.compatibility, updated_at = now()",
    )
    .bind(compatibility)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Removes the global compatibility level (back to the default); returns the one it had.
pub(crate) async fn delete_global_config(
    conn: &mut PgConnection,
) -> Result<Option<String>, RegistryError> {
    Ok(
        sqlx::query_scalar("DELETE FROM global_config RETURNING compatibility")
            .fetch_optional(&mut *conn)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_lower_case_identifiers_are_accepted_as_schema_names() {
        assert!(validate_schema_name("schema_registry").is_ok());
        assert!(validate_schema_name("_reg2").is_ok());
        assert!(validate_schema_name("").is_err());
        assert!(validate_schema_name("2reg").is_err());
        assert!(validate_schema_name("Reg").is_err());
        assert!(validate_schema_name("reg; DROP TABLE x").is_err());
        assert!(validate_schema_name(&"a".repeat(64)).is_err());
    }
}
