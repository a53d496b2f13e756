//! Values of the flow policies: `rate_limit` ("50/s") and `[outbound.breaker]` / an endpoint's
//! `breaker`. Values only: `delivery::state::flow` applies them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Dur;

/// Requests per second, minute or hour: `"50/s"`, `"300/m"`, `"1000/h"`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    /// Seconds per unit: 1, 60 or 3600.
    pub per_seconds: u32,
}

impl RateLimit {
    pub fn per_second(self) -> f64 {
        f64::from(self.count) / f64::from(self.per_seconds)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per_seconds {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for RateLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid rate limit {s:?}: write e.g. \"50/s\", \"300/m\", \"1000/h\"");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || count > 999_999_999 {
            return Err(bad());
        }
        let per_seconds = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        Ok(Self { count, per_seconds })
    }
}

impl Serialize for RateLimit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Circuit breaker settings. In `[outbound.breaker]` every key has its default; in an endpoint's
/// `breaker` an unset key takes `[outbound.breaker]`'s value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed attempts that open the circuit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
    /// The window the failure rate is measured over (from its first failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Dur>,
    /// Share of failed attempts in the window (0 < x <= 1) that opens the circuit...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<f64>,
    /// ...once the window holds at least this many attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_attempts: Option<u32>,
    /// While open, one attempt (a probe) per this interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_interval: Option<Dur>,
    /// Open this long: the endpoint is disabled and its deliveries paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_after: Option<Dur>,
}

/// The defaults, and why: 20 consecutive failures is Postern's own choice (a receiver down for
/// good fails every attempt, and 20 is a few minutes of a busy endpoint's retries, never a blip);
/// the failure rate is Convoy's (70 % of at least 10 requests); the probe interval is Convoy's
/// error timeout order (30 s); disabling after 5 days is Svix's.
pub mod breaker_defaults {
    pub const FAILURES: u32 = 20;
    pub const WINDOW_S: u64 = 300;
    pub const FAILURE_RATE: f64 = 0.7;
    pub const MIN_ATTEMPTS: u32 = 10;
    pub const PROBE_INTERVAL_S: u64 = 30;
    pub const DISABLE_AFTER_S: u64 = 5 * 86_400;
}

/// Bounds that keep every setting representable where it is used (an `int`, an `interval`).
const MAX_COUNT: u32 = 1_000_000_000;
const MAX_SPAN: std::time::Duration = std::time::Duration::from_secs(3650 * 86_400);

impl BreakerConfig {
    /// Problems with the values set, each naming its key under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (key, n) in [
            ("failures", self.failures),
            ("min_attempts", self.min_attempts),
        ] {
            if n.is_some_and(|n| n == 0 || n > MAX_COUNT) {
                p.push(format!("{prefix}.{key}: must be from 1 to {MAX_COUNT}"));
            }
        }
        if let Some(r) = self.failure_rate {
            if !(r > 0.0 && r <= 1.0) {
                p.push(format!(
                    "{prefix}.failure_rate: must be above 0 and at most 1"
                ));
            }
        }
        for (key, d) in [
            ("window", self.window),
            ("probe_interval", self.probe_interval),
            ("disable_after", self.disable_after),
        ] {
            if d.is_some_and(|d| d.0 < std::time::Duration::from_secs(1) || d.0 > MAX_SPAN) {
                p.push(format!("{prefix}.{key}: must be from 1s to 3650d"));
            }
        }
        p
    }

    /// The settings as stored with an endpoint (and passed as the defaults): seconds for
    /// durations, only the keys that are set.
    pub fn to_stored(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("failures", self.failures.map(Into::into));
        put("window_s", self.window.map(|d| d.0.as_secs_f64().into()));
        put("failure_rate", self.failure_rate.map(Into::into));
        put("min_attempts", self.min_attempts.map(Into::into));
        put(
            "probe_interval_s",
            self.probe_interval.map(|d| d.0.as_secs_f64().into()),
        );
        put(
            "disable_after_s",
            self.disable_after.map(|d| d.0.as_secs_f64().into()),
        );
        serde_json::Value::Object(m)
    }

    /// Back from the stored form.
    pub fn from_stored(v: &serde_json::Value) -> Self {
        let dur = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_f64)
                .map(|s| Dur(std::time::Duration::from_secs_f64(s.max(0.0))))
        };
        let int = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|n| n as u32)
        };
        Self {
            failures: int("failures"),
            window: dur("window_s"),
            failure_rate: v.get("failure_rate").and_then(serde_json::Value::as_f64),
            min_attempts: int("min_attempts"),
            probe_interval: dur("probe_interval_s"),
            disable_after: dur("disable_after_s"),
        }
    }

    /// Every key filled: these settings over the built-in defaults.
    pub fn with_defaults(&self) -> Self {
        use breaker_defaults::*;
        let secs = |s| Dur(std::time::Duration::from_secs(s));
        Self {
            failures: Some(self.failures.unwrap_or(FAILURES)),
            window: Some(self.window.unwrap_or(secs(WINDOW_S))),
            failure_rate: Some(self.failure_rate.unwrap_or(FAILURE_RATE)),
            min_attempts: Some(self.min_attempts.unwrap_or(MIN_ATTEMPTS)),
            probe_interval: Some(self.probe_interval.unwrap_or(secs(PROBE_INTERVAL_S))),
            disable_after: Some(self.disable_after.unwrap_or(secs(DISABLE_AFTER_S))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_parse_and_print() {
        for (s, per_s) in [("50/s", 50.0), ("300/m", 5.0), ("7200/h", 2.0)] {
            let r: RateLimit = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
            assert_eq!(r.per_second(), per_s);
        }
        for bad in ["0/s", "50", "50/d", "-1/s", "x/s", "1000000000/s", ""] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn breaker_settings_round_trip_through_storage() {
        let b = BreakerConfig {
            failures: Some(5),
            probe_interval: Some("2s".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(BreakerConfig::from_stored(&b.to_stored()), b);
        let full = b.with_defaults();
        assert_eq!(full.failures, Some(5));
        assert_eq!(full.min_attempts, Some(breaker_defaults::MIN_ATTEMPTS));
        assert!(
            BreakerConfig {
                failure_rate: Some(1.5),
                failures: Some(0),
                ..Default::default()
            }
            .problems("outbound.breaker")
            .len()
                == 2
        );
        let too_big = BreakerConfig {
            failures: Some(3_000_000_000),
            window: Some(Dur(std::time::Duration::from_secs(4000 * 86_400))),
            ..Default::default()
        };
        assert_eq!(
            too_big.problems("b").len(),
            2,
            "{:?}",
            too_big.problems("b")
        );
    }
}
