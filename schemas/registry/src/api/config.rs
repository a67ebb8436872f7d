//! Compatibility levels, global and per subject.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ConfigRequest {
    pub(super) compatibility: Option<String>,
    pub(super) compatibility_level: Option<String>,
}

impl ConfigRequest {
    pub(super) fn level(self) -> ApiResult<CompatibilityLevel> {
        let text = self
            .compatibility
            .or(self.compatibility_level)
            .unwrap_or_default();
        text.parse()
            .map_err(|_| ApiError::invalid_compatibility_level(&text))
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ConfigReply {
    pub(super) compatibility_level: CompatibilityLevel,
}

#[derive(Debug, Serialize)]
pub(super) struct ConfigUpdateReply {
    pub(super) compatibility: CompatibilityLevel,
}

pub(super) async fn get_global_config(
    State(state): State<AppState>,
) -> ApiResult<SrJson<ConfigReply>> {
    let level = global_level(&mut *conn(&state).await?).await?;
    Ok(ok(ConfigReply {
        compatibility_level: level,
    }))
}

pub(super) async fn put_global_config(
    State(state): State<AppState>,
    Body(request): Body<ConfigRequest>,
) -> ApiResult<SrJson<ConfigUpdateReply>> {
    let level = request.level()?;
    store::set_global_config(&mut *conn(&state).await?, level.as_str()).await?;
    tracing::info!(%level, "set global compatibility level");
    Ok(ok(ConfigUpdateReply {
        compatibility: level,
    }))
}

/// Back to the default level; replies with the level it had.
pub(super) async fn delete_global_config(
    State(state): State<AppState>,
) -> ApiResult<SrJson<ConfigReply>> {
    let old = store::delete_global_config(&mut *conn(&state).await?).await?;
    let level = match old {
        Some(stored) => parse_level(stored)?,
        None => CompatibilityLevel::DEFAULT,
    };
    Ok(ok(ConfigReply {
        compatibility_level: level,
    }))
}

pub(super) async fn get_subject_config(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<ConfigReply>> {
    let mut conn = conn(&state).await?;
    let level = match store::subject_config(&mut conn, &subject).await? {
        Some(stored) => parse_level(stored)?,
        None if flags.flag("defaultToGlobal") => global_level(&mut conn).await?,
        None => return Err(ApiError::subject_config_not_found(&subject)),
    };
    Ok(ok(ConfigReply {
        compatibility_level: level,
    }))
}

pub(super) async fn put_subject_config(
    State(state): State<AppState>,
    Params(subject): Params<String>,
    Body(request): Body<ConfigRequest>,
) -> ApiResult<SrJson<ConfigUpdateReply>> {
    let level = request.level()?;
    store::set_subject_config(&mut *conn(&state).await?, &subject, level.as_str()).await?;
    tracing::info!(%subject, %level, "set subject compatibility level");
    Ok(ok(ConfigUpdateReply {
        compatibility: level,
    }))
}

/// Removes the subject's own level (it falls back to the global one); replies with the level it
/// had.
pub(super) async fn delete_subject_config(
    State(state): State<AppState>,
    Params(subject): Params<String>,
) -> ApiResult<SrJson<ConfigReply>> {
    let mut conn = conn(&state).await?;
    match store::delete_subject_config(&mut conn, &subject).await? {
        Some(stored) => Ok(ok(ConfigReply {
            compatibility_level: parse_level(stored)?,
        })),
        None if store::version_states(&mut conn, &subject).await?.is_empty() => {
            Err(ApiError::subject_not_found(&subject))
        }
        None => Err(ApiError::subject_config_not_found(&subject)),
    }
}
