//! Subjects and their versions: listed, read, looked up, registered and deleted (soft, then hard).

use super::*;

pub(super) async fn list_subjects(
    State(state): State<AppState>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<String>>> {
    let subjects = store::subjects(
        &mut *conn(&state).await?,
        flags.flag("deleted"),
        flags.flag("deleted_only") || flags.flag("deletedOnly"),
        flags.text("subjectPrefix").unwrap_or(""),
    )
    .await?;
    Ok(ok(paginate(subjects, &flags)))
}

pub(super) async fn list_versions(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<i32>>> {
    let include_deleted = flags.flag("deleted");
    let deleted_only = flags.flag("deleted_only") || flags.flag("deletedOnly");
    let states = store::version_states(&mut *conn(&state).await?, &subject).await?;
    let versions: Vec<i32> = states
        .iter()
        .filter(|s| {
            if deleted_only {
                s.deleted
            } else {
                include_deleted || !s.deleted
            }
        })
        .map(|s| s.version)
        .collect();
    if versions.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    Ok(ok(paginate(versions, &flags)))
}

pub(super) async fn get_version(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
    flags: Flags,
) -> ApiResult<SrJson<SubjectVersionReply>> {
    let found = find_version(
        &mut *conn(&state).await?,
        &subject,
        &version,
        flags.flag("deleted"),
    )
    .await?;
    Ok(ok(found.into()))
}

pub(super) async fn get_version_schema_text(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
    flags: Flags,
) -> ApiResult<Response> {
    let found = find_version(
        &mut *conn(&state).await?,
        &subject,
        &version,
        flags.flag("deleted"),
    )
    .await?;
    Ok(raw_schema(found.schema.text))
}

pub(super) async fn get_referenced_by(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
) -> ApiResult<SrJson<Vec<i32>>> {
    let mut conn = conn(&state).await?;
    let found = find_version(&mut conn, &subject, &version, false).await?;
    Ok(ok(
        store::referenced_by(&mut conn, &subject, found.version).await?
    ))
}

/// `POST /subjects/{subject}`: which version of the subject is this schema?
pub(super) async fn lookup_schema(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
    Body(request): Body<SchemaRequest>,
) -> ApiResult<SrJson<SubjectVersionReply>> {
    let include_deleted = flags.flag("deleted");
    let mut conn = conn(&state).await?;
    let states = store::version_states(&mut conn, &subject).await?;
    if !states.iter().any(|s| include_deleted || !s.deleted) {
        return Err(ApiError::subject_not_found(&subject));
    }
    let parsed = parse_request(&mut conn, request).await?;
    let found =
        store::find_in_subject(&mut conn, &subject, AVRO, &parsed.identity, include_deleted)
            .await?
            .ok_or_else(ApiError::schema_not_found)?;
    Ok(ok(found.into()))
}

#[derive(Debug, Serialize)]
pub(super) struct RegisteredReply {
    pub(super) id: i32,
}

/// `POST /subjects/{subject}/versions`: registers a schema as the next version of a subject,
/// after the compatibility check; a schema the subject already has keeps its id and version.
pub(super) async fn register_schema(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    Body(request): Body<SchemaRequest>,
) -> ApiResult<SrJson<RegisteredReply>> {
    let parsed = {
        let mut conn = conn(&state).await?;
        let parsed = parse_request(&mut conn, request).await?;
        // Fast path without the write lock: already a live version of the subject.
        if let Some(found) =
            store::find_in_subject(&mut conn, &subject, AVRO, &parsed.identity, false).await?
        {
            return Ok(ok(RegisteredReply {
                id: found.schema.id,
            }));
        }
        parsed
    };

    let mut tx = state.store.begin_exclusive().await?;
    if let Some(found) =
        store::find_in_subject(&mut tx, &subject, AVRO, &parsed.identity, false).await?
    {
        tx.commit().await?;
        return Ok(ok(RegisteredReply {
            id: found.schema.id,
        }));
    }
    let level = effective_level(&mut tx, &subject).await?;
    if level != CompatibilityLevel::None {
        let live = store::live_versions(&mut tx, &subject).await?;
        let against = if level.is_transitive() {
            &live[..]
        } else {
            live.last().map(std::slice::from_ref).unwrap_or_default()
        };
        let existing = parse_versions(&mut tx, against).await?;
        let reasons = incompatibilities(level, &parsed.resolved, &existing);
        if !reasons.is_empty() {
            return Err(ApiError::incompatible(&subject, &reasons));
        }
    }
    let id = store::schema_id_for(
        &mut tx,
        AVRO,
        &parsed.identity,
        &parsed.text,
        &parsed.references,
    )
    .await?;
    let version = store::add_version(&mut tx, &subject, id).await?;
    tx.commit().await?;
    tracing::info!(%subject, version, id, "registered schema");
    Ok(ok(RegisteredReply { id }))
}

/// `DELETE /subjects/{subject}`: soft-deletes every live version, or with `permanent=true`
/// removes a subject that was soft-deleted first. Replies with the versions deleted.
pub(super) async fn delete_subject(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<i32>>> {
    let permanent = flags.flag("permanent");
    let mut tx = state.store.begin_exclusive().await?;
    let states = store::version_states(&mut tx, &subject).await?;
    if states.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    let live: Vec<i32> = states
        .iter()
        .filter(|s| !s.deleted)
        .map(|s| s.version)
        .collect();
    let deleted = if permanent {
        if !live.is_empty() {
            return Err(ApiError::subject_not_soft_deleted(&subject));
        }
        let all: Vec<i32> = states.iter().map(|s| s.version).collect();
        store::hard_delete(&mut tx, &subject, &all).await?;
        all
    } else {
        if live.is_empty() {
            return Err(ApiError::subject_soft_deleted(&subject));
        }
        for &version in &live {
            let referrers = store::referenced_by(&mut tx, &subject, version).await?;
            if !referrers.is_empty() {
                return Err(ApiError::referenced(&subject, version, &referrers));
            }
        }
        store::soft_delete(&mut tx, &subject, &live).await?;
        live
    };
    // A deleted subject forgets its own compatibility level, as in Confluent.
    store::delete_subject_config(&mut tx, &subject).await?;
    tx.commit().await?;
    tracing::info!(%subject, permanent, versions = ?deleted, "deleted subject");
    Ok(ok(deleted))
}

/// `DELETE /subjects/{subject}/versions/{version}`: soft delete, or with `permanent=true`
/// removal of a version that was soft-deleted first. Replies with the version number.
pub(super) async fn delete_version(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
    flags: Flags,
) -> ApiResult<SrJson<i32>> {
    let permanent = flags.flag("permanent");
    let spec = VersionSpec::parse(&version)?;
    let mut tx = state.store.begin_exclusive().await?;
    let states = store::version_states(&mut tx, &subject).await?;
    if states.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    let target = match spec {
        VersionSpec::Number(number) => states
            .iter()
            .copied()
            .find(|s| s.version == number)
            .ok_or_else(|| ApiError::version_not_found(&subject, number))?,
        // The latest live version for a soft delete, the latest of all for a permanent one.
        VersionSpec::Latest => pick_version(&subject, &states, spec, permanent)?,
    };
    if permanent {
        if !target.deleted {
            return Err(ApiError::version_not_soft_deleted(&subject, target.version));
        }
        store::hard_delete(&mut tx, &subject, &[target.version]).await?;
    } else {
        if target.deleted {
            return Err(ApiError::version_soft_deleted(&subject, target.version));
        }
        let referrers = store::referenced_by(&mut tx, &subject, target.version).await?;
        if !referrers.is_empty() {
            return Err(ApiError::referenced(&subject, target.version, &referrers));
        }
        store::soft_delete(&mut tx, &subject, &[target.version]).await?;
    }
    tx.commit().await?;
    tracing::info!(%subject, version = target.version, permanent, "deleted version");
    Ok(ok(target.version))
}
