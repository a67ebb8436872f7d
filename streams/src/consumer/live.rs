//! Live-update signals: a projection tells listeners (the API's SSE streams) which keys of its
//! read model changed. The signal is a PostgreSQL `NOTIFY` sent inside the projection's
//! transaction, so it is delivered on commit and never announces a change that was rolled back.
//! It carries no data: a listener re-reads the read model by its own cursor, so a lost or
//! coalesced signal delays an update but never loses or reorders one.

use sqlx::{Postgres, Transaction};

/// The PostgreSQL channel every read model signals on.
pub const CHANNEL: &str = "backbone_live";

/// Signals that `keys` of `channel` (a read model's stream, e.g. `tracking`) changed. The
/// payload of each notification is `<channel>:<key>`.
pub async fn notify(
    tx: &mut Transaction<'static, Postgres>,
    channel: &str,
    keys: &[String],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, $2 || ':' || k) FROM unnest($3::text[]) AS k")
        .bind(CHANNEL)
        .bind(channel)
        .bind(keys)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
