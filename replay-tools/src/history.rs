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
use clap::{Args, ValueEnum};
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
pub type HistoryEvent = commands::log::AuditedEvent;

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
    Ok(
        commands::log::aggregate_page(pool, aggregate_type, aggregate_id, after_sequence, limit)
            .await?
            .into_iter()
            .map(HistoryEvent::from)
            .collect(),
    )
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
}
