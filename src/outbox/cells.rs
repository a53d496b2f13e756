//! The fan-out's rows, whichever protocol brought them: a pipelined statement's row or a row of
//! one simple-query message (always text). Invariant: every column a pass reads is text on the
//! wire (its SQL casts it), so one decoder reads both, and a value means the same either way.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use tokio_postgres::{Row, SimpleQueryRow};
use uuid::Uuid;

/// A row whose columns are read by name, as text (`None`: NULL).
pub(super) trait Cells {
    fn cell(&self, name: &str) -> anyhow::Result<Option<&str>>;

    fn text(&self, name: &str) -> anyhow::Result<&str> {
        self.cell(name)?
            .with_context(|| format!("column {name} is NULL"))
    }

    fn int(&self, name: &str) -> anyhow::Result<i64> {
        let s = self.text(name)?;
        s.parse()
            .with_context(|| format!("column {name}: {s:?} is not an integer"))
    }

    fn float(&self, name: &str) -> anyhow::Result<f64> {
        let s = self.text(name)?;
        s.parse()
            .with_context(|| format!("column {name}: {s:?} is not a number"))
    }

    fn uuid(&self, name: &str) -> anyhow::Result<Option<Uuid>> {
        self.cell(name)?
            .map(|s| Uuid::parse_str(s).with_context(|| format!("column {name}: not a uuid")))
            .transpose()
    }

    /// `t`/`f` as the server sends a boolean, `true`/`false` as `boolean::text` spells it.
    fn flag(&self, name: &str) -> anyhow::Result<bool> {
        match self.text(name)? {
            "t" | "true" => Ok(true),
            "f" | "false" => Ok(false),
            other => anyhow::bail!("column {name}: {other:?} is not a boolean"),
        }
    }

    /// A JSON document (arrays are sent as JSON: `to_json(array)::text`).
    fn json<T: DeserializeOwned>(&self, name: &str) -> anyhow::Result<Option<T>> {
        self.cell(name)?
            .map(|s| serde_json::from_str(s).with_context(|| format!("column {name}: bad JSON")))
            .transpose()
    }

    /// A time sent as seconds since the epoch (`extract(epoch FROM t)::text`), which reads the
    /// same whatever the session's `DateStyle` and `TimeZone`.
    fn epoch(&self, name: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
        self.cell(name)?
            .map(|s| epoch(s).with_context(|| format!("column {name}: {s:?} is not a time")))
            .transpose()
    }
}

impl Cells for Row {
    fn cell(&self, name: &str) -> anyhow::Result<Option<&str>> {
        self.try_get(name).with_context(|| format!("column {name}"))
    }
}

impl Cells for SimpleQueryRow {
    fn cell(&self, name: &str) -> anyhow::Result<Option<&str>> {
        self.try_get(name).with_context(|| format!("column {name}"))
    }
}

/// `[-]seconds[.fraction]`, exact to the microsecond (the fraction's digits past six dropped,
/// as the server keeps none). `None`: not such a number (`Infinity`, say).
pub(super) fn epoch(s: &str) -> Option<DateTime<Utc>> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let mut micros: i64 = whole.parse::<i64>().ok()?.checked_mul(1_000_000)?;
    let mut scale = 100_000;
    for b in fraction.bytes().take(6) {
        micros = micros.checked_add(i64::from(b - b'0') * scale)?;
        scale /= 10;
    }
    DateTime::from_timestamp_micros(if negative { -micros } else { micros })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_read_exactly_to_the_microsecond() {
        let t = |s| epoch(s).map(|d| d.timestamp_micros());
        assert_eq!(t("1765056000.123456"), Some(1_765_056_000_123_456));
        assert_eq!(t("1765056000.1"), Some(1_765_056_000_100_000));
        assert_eq!(t("1765056000"), Some(1_765_056_000_000_000));
        assert_eq!(t("1765056000.1234567"), Some(1_765_056_000_123_456));
        // Before 1970: -1.5 s is 1.5 s before the epoch.
        assert_eq!(t("-1.5"), Some(-1_500_000));
        assert_eq!(t("0.000001"), Some(1));
        for bad in [
            "",
            "-",
            ".5",
            "Infinity",
            "-Infinity",
            "NaN",
            "1e9",
            "1.2.3",
            "+1",
            "1 ",
        ] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        // Beyond what a time can hold: refused, not wrapped.
        assert_eq!(t("99999999999999999999"), None);
        // The whole seconds fit, with the fraction they would not (an epoch Postgres can give).
        assert_eq!(t("9223372036854.9"), None);
    }
}
