//! `replay-tools history`: one aggregate's events with all their metadata, for auditors.
//!
//! Each event as it was recorded in the event store: who (`actor`), when (`occurred_at`, when
//! the command ran; `recorded_at`, when the store wrote it), why (`correlation_id` of the
//! business transaction, `causation_id` of the command or event that caused it, `command_id`),
//! the schema version of its payload as stored (`event_version`; older versions are not upcast
//! here) and the payload itself (the stored body, without the event-type tag, personal data
//! revealed or shown as `[erased]`, see [`crate::privacy`]). In sequence
//! order, as JSON lines (`--format jsonl`, default) or a table for reading (`--format table`).
//! The HTTP twin is `GET /audit/{aggregate_type}/{aggregate_id}/events`.

use std::io::Write;

use anyhow::bail;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::Value as Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::export::known_aggregate_types;
use crate::privacy::Revealer;

/// How the history is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HistoryFormat {
    /// One JSON object per event.
    Jsonl,
    /// An aligned table, each event's payload on the line below it.
    Table,
}

/// `replay-tools history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The aggregate type: order, delivery, payment, rewards or ads.
    pub aggregate_type: String,
    /// The aggregate id: an order id (order, delivery, payment) or a customer id (rewards, ads).
    pub aggregate_id: String,
    /// JSON lines or a table.
    #[arg(long, value_enum, default_value_t = HistoryFormat::Jsonl)]
    pub format: HistoryFormat,
}

/// One event of the history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEvent {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub event_version: String,
    pub occurred_at: Option<String>,
    pub recorded_at: String,
    pub actor: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub command_id: Option<String>,
    pub payload: Json,
}

#[derive(sqlx::FromRow)]
struct Row {
    sequence: i64,
    event_id: Uuid,
    event_type: String,
    event_version: String,
    payload: Json,
    metadata: Json,
    recorded_at: DateTime<Utc>,
}

/// Events per query.
const PAGE: i64 = 500;

/// Checks the aggregate type and id; the id in the store's spelling.
pub fn parse_aggregate(aggregate_type: &str, aggregate_id: &str) -> anyhow::Result<String> {
    if !known_aggregate_types().contains(&aggregate_type) {
        bail!(
            "`{aggregate_type}` is not an aggregate type of the backbone; use one of {}",
            known_aggregate_types().join(", ")
        );
    }
    match Uuid::parse_str(aggregate_id) {
        Ok(id) => Ok(id.to_string()),
        Err(_) => bail!(
            "`{aggregate_id}` is not a valid {aggregate_type} id: aggregate ids are UUIDs \
             (an order id, or a customer id for rewards and ads)"
        ),
    }
}

/// One page of an aggregate's events after `after_sequence`, in sequence order.
pub async fn page(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    after_sequence: i64,
    limit: i64,
) -> Result<Vec<HistoryEvent>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT sequence, event_id, event_type, event_version, payload, metadata, recorded_at \
         FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 \
         ORDER BY sequence \
         LIMIT $4",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(after_sequence)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let text = |key: &str| {
                row.metadata
                    .get(key)
                    .and_then(Json::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            };
            HistoryEvent {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                sequence: row.sequence,
                event_id: row.event_id,
                occurred_at: text("occurred_at"),
                recorded_at: row.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
                actor: text("actor"),
                correlation_id: text("correlation_id"),
                causation_id: text("causation_id"),
                command_id: text("command_id"),
                payload: body(row.payload, &row.event_type),
                event_type: row.event_type,
                event_version: row.event_version,
            }
        })
        .collect())
}

/// The stored payload without its event-type tag (`{"OrderPlaced": {...}}` → `{...}`).
fn body(payload: Json, event_type: &str) -> Json {
    match payload {
        Json::Object(mut map) if map.len() == 1 && map.contains_key(event_type) => {
            map.remove(event_type).unwrap_or(Json::Null)
        }
        other => other,
    }
}

/// Runs `replay-tools history`.
pub async fn run(args: HistoryArgs, pool: &PgPool, out: &mut impl Write) -> anyhow::Result<()> {
    let aggregate_id = parse_aggregate(&args.aggregate_type, &args.aggregate_id)?;
    let revealer = Revealer::new(pool.clone());
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let mut page = page(pool, &args.aggregate_type, &aggregate_id, after, PAGE).await?;
        revealer
            .reveal(page.iter_mut().map(|e| &mut e.payload))
            .await?;
        let Some(last) = page.last() else { break };
        after = last.sequence;
        match args.format {
            HistoryFormat::Jsonl => {
                for event in &page {
                    writeln!(out, "{}", serde_json::to_string(event)?)?;
                }
                if events.is_empty() {
                    // Remembers that there were events; JSON lines are not kept.
                    events.extend(page.into_iter().take(1));
                }
            }
            HistoryFormat::Table => events.extend(page),
        }
    }
    if events.is_empty() {
        bail!(
            "no events for {} {aggregate_id} in this event store",
            args.aggregate_type
        );
    }
    if args.format == HistoryFormat::Table {
        write_table(&events, out)?;
    }
    Ok(())
}

/// The events as an aligned table, each payload (compact JSON) indented below its event.
fn write_table(events: &[HistoryEvent], out: &mut impl Write) -> anyhow::Result<()> {
    const HEADERS: [&str; 10] = [
        "SEQ",
        "EVENT TYPE",
        "VERSION",
        "OCCURRED AT",
        "RECORDED AT",
        "ACTOR",
        "CORRELATION ID",
        "CAUSATION ID",
        "COMMAND ID",
        "EVENT ID",
    ];
    let none = || "-".to_owned();
    let rows: Vec<[String; 10]> = events
        .iter()
        .map(|e| {
            [
                e.sequence.to_string(),
                e.event_type.clone(),
                e.event_version.clone(),
                e.occurred_at.clone().unwrap_or_else(none),
                e.recorded_at.clone(),
                e.actor.clone().unwrap_or_else(none),
                e.correlation_id.clone().unwrap_or_else(none),
                e.causation_id.clone().unwrap_or_else(none),
                e.command_id.clone().unwrap_or_else(none),
                e.event_id.to_string(),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    if let Some(first) = events.first() {
        writeln!(
            out,
            "{} {}: {} events",
            first.aggregate_type,
            first.aggregate_id,
            events.len()
        )?;
    }
    writeln!(out, "{}", line(&HEADERS))?;
    for (row, event) in rows.iter().zip(events) {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&cells))?;
        writeln!(out, "    payload: {}", event.payload)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_types_and_ids_are_checked() {
        let id = Uuid::new_v4();
        assert_eq!(
            parse_aggregate("order", &id.to_string().to_uppercase()).ok(),
            Some(id.to_string())
        );
        assert!(parse_aggregate("spaceship", &id.to_string()).is_err());
        assert!(parse_aggregate("order", "not-a-uuid").is_err());
    }

    #[test]
    fn the_event_type_tag_is_taken_off_the_payload() {
        let stored = serde_json::json!({"OrderAccepted": {"by": "store"}});
        assert_eq!(
            body(stored, "OrderAccepted"),
            serde_json::json!({"by": "store"})
        );
        let untagged = serde_json::json!({"a": 1, "b": 2});
        assert_eq!(body(untagged.clone(), "OrderAccepted"), untagged);
    }
}
