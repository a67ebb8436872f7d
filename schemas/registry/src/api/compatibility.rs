//! Compatibility checks of a schema against a subject's versions.

use super::*;

#[derive(Debug, Serialize)]
pub(super) struct CompatibilityReply {
    pub(super) is_compatible: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) messages: Option<Vec<String>>,
}

/// `POST /compatibility/subjects/{subject}/versions/{version}`: would the schema be compatible
/// with that version under the subject's level?
pub(super) async fn check_compatibility_with_version(
    State(state): State<AppState>,
    Params((subject, version)): Params<(String, String)>,
    flags: Flags,
    Body(request): Body<SchemaRequest>,
) -> ApiResult<SrJson<CompatibilityReply>> {
    let spec = VersionSpec::parse(&version)?;
    check_compatibility(state, subject, Some(spec), flags, request).await
}

/// `POST /compatibility/subjects/{subject}/versions`: would the schema be accepted as the next
/// version (against the latest, or every version for a transitive level)?
pub(super) async fn check_compatibility_with_subject(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
    Body(request): Body<SchemaRequest>,
) -> ApiResult<SrJson<CompatibilityReply>> {
    check_compatibility(state, subject, None, flags, request).await
}

pub(super) async fn check_compatibility(
    state: AppState,
    subject: String,
    spec: Option<VersionSpec>,
    flags: Flags,
    request: SchemaRequest,
) -> ApiResult<SrJson<CompatibilityReply>> {
    let mut conn = conn(&state).await?;
    let parsed = parse_request(&mut conn, request).await?;
    let level = effective_level(&mut conn, &subject).await?;
    let live = store::live_versions(&mut conn, &subject).await?;
    let against: Vec<SubjectVersion> = match spec {
        // Nothing to be incompatible with: the first version of a subject is always accepted.
        None | Some(VersionSpec::Latest) if live.is_empty() => Vec::new(),
        None if level.is_transitive() => live,
        None | Some(VersionSpec::Latest) => live.last().cloned().into_iter().collect(),
        Some(VersionSpec::Number(number)) => {
            if live.is_empty() {
                return Err(ApiError::subject_not_found(&subject));
            }
            let found = live
                .into_iter()
                .find(|v| v.version == number)
                .ok_or_else(|| ApiError::version_not_found(&subject, number))?;
            vec![found]
        }
    };
    let existing = parse_versions(&mut conn, &against).await?;
    let reasons = incompatibilities(level, &parsed.resolved, &existing);
    Ok(ok(CompatibilityReply {
        is_compatible: reasons.is_empty(),
        messages: flags.flag("verbose").then_some(reasons),
    }))
}
