//! Schemas by their global id: the schema, its text, and the subjects and versions that use it.

use super::*;

pub(super) async fn schema_types() -> SrJson<[&'static str; 1]> {
    ok([AVRO])
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SchemaReply {
    #[serde(skip_serializing_if = "is_avro")]
    pub(super) schema_type: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) references: Vec<SchemaReference>,
    pub(super) schema: String,
}

pub(super) async fn schema_by_id(
    State(state): State<AppState>,
    Params(id): Params<String>,
) -> ApiResult<SrJson<SchemaReply>> {
    let schema = stored_schema(&mut *conn(&state).await?, &id).await?;
    Ok(ok(SchemaReply {
        schema_type: schema.schema_type,
        references: schema.references,
        schema: schema.text,
    }))
}

pub(super) async fn schema_text_by_id(
    State(state): State<AppState>,
    Params(id): Params<String>,
) -> ApiResult<Response> {
    let schema = stored_schema(&mut *conn(&state).await?, &id).await?;
    Ok(raw_schema(schema.text))
}

pub(super) async fn subjects_of_schema(
    State(state): State<AppState>,
    Params(id): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<String>>> {
    let mut conn = conn(&state).await?;
    let schema = stored_schema(&mut conn, &id).await?;
    let mut subjects: Vec<String> =
        store::versions_of_schema(&mut conn, schema.id, flags.flag("deleted"))
            .await?
            .into_iter()
            .map(|(subject, _)| subject)
            .filter(|subject| flags.text("subject").is_none_or(|only| only == subject))
            .collect();
    subjects.dedup();
    Ok(ok(paginate(subjects, &flags)))
}

#[derive(Debug, Serialize)]
pub(super) struct SubjectAndVersion {
    pub(super) subject: String,
    pub(super) version: i32,
}

pub(super) async fn versions_of_schema(
    State(state): State<AppState>,
    Params(id): Params<String>,
    flags: Flags,
) -> ApiResult<SrJson<Vec<SubjectAndVersion>>> {
    let mut conn = conn(&state).await?;
    let schema = stored_schema(&mut conn, &id).await?;
    let versions = store::versions_of_schema(&mut conn, schema.id, flags.flag("deleted"))
        .await?
        .into_iter()
        .filter(|(subject, _)| flags.text("subject").is_none_or(|only| only == subject))
        .map(|(subject, version)| SubjectAndVersion { subject, version })
        .collect();
    Ok(ok(paginate(versions, &flags)))
}
