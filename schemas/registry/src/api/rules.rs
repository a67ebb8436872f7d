//! The rules the handlers share: references resolved, stored schemas parsed, compatibility levels,
//! versions picked and pages cut.

use super::*;

pub(super) async fn conn(
    state: &AppState,
) -> ApiResult<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    Ok(state.store.conn().await?)
}

/// The texts of every schema reachable through `references`, each once.
pub(super) async fn referenced_texts(
    conn: &mut PgConnection,
    references: &[SchemaReference],
) -> ApiResult<Vec<String>> {
    let mut seen = HashSet::new();
    let mut pending: Vec<SchemaReference> = references.to_vec();
    let mut texts = Vec::new();
    while let Some(reference) = pending.pop() {
        if !seen.insert((reference.subject.clone(), reference.version)) {
            continue;
        }
        if seen.len() > MAX_REFERENCES {
            return Err(ApiError::invalid_schema("too many nested references"));
        }
        let found = store::subject_version(conn, &reference.subject, reference.version)
            .await?
            .ok_or_else(|| {
                ApiError::invalid_schema(format!(
                    "reference '{}' to version {} of subject '{}' not found",
                    reference.name, reference.version, reference.subject
                ))
            })?;
        pending.extend(found.schema.references.iter().cloned());
        texts.push(found.schema.text);
    }
    Ok(texts)
}

/// Parses the schema of a request (42201 when it is not a valid Avro schema).
pub(super) async fn parse_request(
    conn: &mut PgConnection,
    request: SchemaRequest,
) -> ApiResult<ParsedSchema> {
    let schema_type = request.schema_type.unwrap_or_else(|| AVRO.to_owned());
    if !schema_type.eq_ignore_ascii_case(AVRO) {
        return Err(ApiError::invalid_schema(format!(
            "schemaType '{schema_type}' is not supported: this registry accepts AVRO schemas only"
        )));
    }
    let text = match request.schema {
        Some(text) if !text.trim().is_empty() => text,
        _ => return Err(ApiError::invalid_schema("the request has no schema")),
    };
    let references = request.references.unwrap_or_default();
    let referenced = referenced_texts(conn, &references).await?;
    parse_avro(&text, references, &referenced).map_err(ApiError::invalid_schema)
}

/// Parses a schema the registry stored; failing is a server error.
pub(super) async fn parse_stored(
    conn: &mut PgConnection,
    schema: &StoredSchema,
) -> ApiResult<ExistingVersion> {
    let referenced = referenced_texts(conn, &schema.references).await?;
    let parsed =
        parse_avro(&schema.text, schema.references.clone(), &referenced).map_err(|reason| {
            RegistryError::CorruptSchema {
                id: schema.id,
                reason,
            }
        })?;
    Ok(ExistingVersion {
        version: 0,
        schema: parsed.resolved,
    })
}

/// Parses the given versions for a compatibility check.
pub(super) async fn parse_versions(
    conn: &mut PgConnection,
    versions: &[SubjectVersion],
) -> ApiResult<Vec<ExistingVersion>> {
    let mut parsed = Vec::with_capacity(versions.len());
    for version in versions {
        let mut existing = parse_stored(conn, &version.schema).await?;
        existing.version = version.version;
        parsed.push(existing);
    }
    Ok(parsed)
}

pub(super) fn parse_level(stored: String) -> ApiResult<CompatibilityLevel> {
    stored.parse().map_err(|_| {
        ApiError::from(RegistryError::CorruptSchema {
            id: 0,
            reason: format!("stored compatibility level {stored:?} is unknown"),
        })
    })
}

pub(super) async fn global_level(conn: &mut PgConnection) -> ApiResult<CompatibilityLevel> {
    match store::global_config(conn).await? {
        Some(stored) => parse_level(stored),
        None => Ok(CompatibilityLevel::DEFAULT),
    }
}

/// The subject's level, else the global one, else BACKWARD.
pub(super) async fn effective_level(
    conn: &mut PgConnection,
    subject: &str,
) -> ApiResult<CompatibilityLevel> {
    match store::subject_config(conn, subject).await? {
        Some(stored) => parse_level(stored),
        None => global_level(conn).await,
    }
}

/// The version that `spec` names among `states` (live only unless `include_deleted`):
/// 40401 when none is visible, 40402 when that one is not.
pub(super) fn pick_version(
    subject: &str,
    states: &[VersionState],
    spec: VersionSpec,
    include_deleted: bool,
) -> ApiResult<VersionState> {
    let visible: Vec<VersionState> = states
        .iter()
        .copied()
        .filter(|state| include_deleted || !state.deleted)
        .collect();
    let picked = match spec {
        _ if visible.is_empty() => return Err(ApiError::subject_not_found(subject)),
        VersionSpec::Latest => visible.last().copied(),
        VersionSpec::Number(number) => visible.iter().copied().find(|s| s.version == number),
    };
    picked.ok_or_else(|| match spec {
        VersionSpec::Number(number) => ApiError::version_not_found(subject, number),
        VersionSpec::Latest => ApiError::version_not_found(subject, "latest"),
    })
}

/// The version of a subject that a GET names, with its schema.
pub(super) async fn find_version(
    conn: &mut PgConnection,
    subject: &str,
    version: &str,
    include_deleted: bool,
) -> ApiResult<SubjectVersion> {
    let spec = VersionSpec::parse(version)?;
    let states = store::version_states(conn, subject).await?;
    let picked = pick_version(subject, &states, spec, include_deleted)?;
    store::subject_version(conn, subject, picked.version)
        .await?
        .ok_or_else(|| ApiError::version_not_found(subject, picked.version))
}

pub(super) fn parse_schema_id(text: &str) -> ApiResult<i32> {
    match text.parse::<i32>() {
        Ok(id) if id >= 1 => Ok(id),
        _ => Err(ApiError::schema_id_not_found(text)),
    }
}

pub(super) async fn stored_schema(conn: &mut PgConnection, id: &str) -> ApiResult<StoredSchema> {
    let id = parse_schema_id(id)?;
    store::schema_by_id(conn, id)
        .await?
        .ok_or_else(|| ApiError::schema_id_not_found(id))
}

/// Applies Confluent's `offset` and `limit` (negative: no limit) to a list.
pub(super) fn paginate<T>(items: Vec<T>, flags: &Flags) -> Vec<T> {
    let offset = usize::try_from(flags.number("offset", 0)).unwrap_or(0);
    let limit = usize::try_from(flags.number("limit", -1)).unwrap_or(usize::MAX);
    items.into_iter().skip(offset).take(limit).collect()
}
