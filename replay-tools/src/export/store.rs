//! Reading the event store: one snapshot, in recorded order, each event in its published form.

use super::*;

pub(super) const STORE_FILTER: &str = "($1::text IS NULL OR aggregate_type = $1) \
     AND (cardinality($2::text[]) = 0 OR event_type = ANY($2)) \
     AND ($3::text IS NULL OR aggregate_id = $3) \
     AND ($4::timestamptz IS NULL OR recorded_at >= $4) \
     AND ($5::timestamptz IS NULL OR recorded_at < $5)";

/// Streams the matching events of one snapshot of the store, in recorded order, in batches.
pub(super) async fn read_store(
    pool: sqlx::PgPool,
    filter: Filter,
    contracts: &'static Contracts,
    batch_size: usize,
    sender: mpsc::Sender<anyhow::Result<Chunk>>,
) {
    let result = async {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let total: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM events WHERE {STORE_FILTER}"))
                .bind(&filter.aggregate_type)
                .bind(&filter.event_types)
                .bind(&filter.aggregate_id)
                .bind(filter.from)
                .bind(filter.to)
                .fetch_one(&mut *tx)
                .await?;
        if sender
            .send(Ok(Chunk::Total(u64::try_from(total).unwrap_or(0))))
            .await
            .is_err()
        {
            return Ok(());
        }
        let sql = format!(
            "SELECT {STORED_COLUMNS} FROM events e WHERE {STORE_FILTER} \
             ORDER BY e.recorded_at, e.aggregate_type, e.aggregate_id, e.sequence"
        );
        let mut rows = sqlx::query_as::<_, StoredEvent>(&sql)
            .bind(&filter.aggregate_type)
            .bind(&filter.event_types)
            .bind(&filter.aggregate_id)
            .bind(filter.from)
            .bind(filter.to)
            .fetch(&mut *tx);
        let mut batch = Vec::with_capacity(batch_size);
        while let Some(stored) = rows.try_next().await? {
            batch.push(from_store(stored, contracts));
            if batch.len() >= batch_size {
                let rows = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
                let read = rows.len() as u64;
                if sender.send(Ok(Chunk::Rows { rows, read })).await.is_err() {
                    return Ok(());
                }
            }
        }
        if !batch.is_empty() {
            let read = batch.len() as u64;
            let _ = sender.send(Ok(Chunk::Rows { rows: batch, read })).await;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        let _ = sender.send(Err(e.context("reading the event store"))).await;
    }
}

/// A stored event as the relay publishes it: upcast, mapped through its contract.
pub(super) fn from_store(stored: StoredEvent, contracts: &Contracts) -> ExportRow {
    let (event_id, aggregate_type, aggregate_id, sequence, recorded_at) = (
        stored.event_id,
        stored.aggregate_type.clone(),
        stored.aggregate_id.clone(),
        stored.sequence,
        stored.recorded_at,
    );
    let published = Published::of(stored);
    let body = published.body();
    let Published { meta, .. } = published;
    let text = |value: String| Some(value).filter(|v| !v.is_empty());
    let occurred_at = parse_instant(&meta.occurred_at).ok();
    let (event_version, payload, payload_as_stored) = match contracts
        .get(&aggregate_type, &meta.event_type)
        .and_then(|c| Ok((c, c.to_avro(&body)?)))
        .and_then(|(c, avro)| Ok((c, c.from_avro_as_is(&avro)?)))
    {
        Ok((contract, json)) => (contract.event_version.to_owned(), json, false),
        Err(_) => (meta.event_version, body, true),
    };
    ExportRow {
        event_id,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type: meta.event_type,
        event_version,
        occurred_at,
        recorded_at,
        correlation_id: text(meta.correlation_id),
        causation_id: text(meta.causation_id),
        actor: text(meta.actor),
        command_id: text(meta.command_id),
        payload,
        payload_as_stored,
    }
}
