//! Keyset pagination shared by the lists: page sizes, opaque cursors, and cutting a page. Invariant:
//! a cursor names the last item shown (its time and id), so concurrent inserts never repeat or skip
//! an item, and a cursor this API did not make is a 400, never a 500.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};

use super::error::ApiError;

pub(super) fn encode_cursor(at: DateTime<Utc>, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{id}", at.timestamp_micros()))
}

pub(super) fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, String), ApiError> {
    let bad = || ApiError::bad_request("cursor: not a cursor this API returned");
    let text =
        String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?).map_err(|_| bad())?;
    let (micros, id) = text.split_once(':').ok_or_else(bad)?;
    let at = DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok((at, id.to_string()))
}

pub(super) fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit.unwrap_or(50) {
        n @ 1..=250 => Ok(n),
        _ => Err(ApiError::bad_request("limit: must be 1 to 250")),
    }
}

/// Cuts `items` (fetched as `limit + 1`) to the page and returns the cursor to the next one, if
/// there is more.
pub(super) fn next_page<T>(
    items: &mut Vec<T>,
    limit: i64,
    cursor_of: impl Fn(&T) -> String,
) -> Option<String> {
    if items.len() as i64 <= limit {
        return None;
    }
    items.truncate(limit as usize);
    items.last().map(cursor_of)
}
