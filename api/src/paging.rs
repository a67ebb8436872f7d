//! What list endpoints share: page sizes, id cursors and time ranges, each refused with a
//! problem document that names the parameter and what is allowed.

use chrono::{DateTime, Utc};

use crate::error::ApiError;

/// Page size when none is given.
pub const DEFAULT_LIMIT: i64 = 50;
/// The largest page.
pub const MAX_LIMIT: i64 = 500;

/// `limit`: 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
pub fn limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::BadRequest(format!(
            "limit {limit} is out of range: pass 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})"
        )))
    }
}

/// A cursor that is the last id of the previous page (0: from the start).
pub fn id_cursor(cursor: Option<&str>) -> Result<i64, ApiError> {
    cursor.map_or(Ok(0), |c| {
        c.parse::<i64>().ok().filter(|c| *c >= 0).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "cursor `{c}` is not one this API returned; pass `next_cursor` from the previous page"
            ))
        })
    })
}

/// A time range's bounds, each optional.
pub type Bounds = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// `from`/`to` (RFC 3339; from inclusive, to exclusive; from before to).
pub fn time_range(from: Option<&str>, to: Option<&str>) -> Result<Bounds, ApiError> {
    let parse = |name: &str, raw: Option<&str>| {
        raw.map(|value| {
            DateTime::parse_from_rfc3339(value)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::BadRequest(format!(
                        "{name} `{value}` is not an RFC 3339 timestamp; use e.g. 2024-05-01T12:00:00Z"
                    ))
                })
        })
        .transpose()
    };
    let (from, to) = (parse("from", from)?, parse("to", to)?);
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(ApiError::BadRequest(format!(
                "from ({}) must be before to ({}): from is inclusive, to exclusive",
                f.to_rfc3339(),
                t.to_rfc3339()
            )));
        }
    }
    Ok((from, to))
}

/// Cuts a page fetched with `limit + 1` rows to `limit`, and the cursor of the next page.
pub fn page<T>(
    mut rows: Vec<T>,
    limit: i64,
    cursor_of: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let size = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > size;
    rows.truncate(size);
    let next = if more {
        rows.last().map(cursor_of)
    } else {
        None
    };
    (rows, next)
}
