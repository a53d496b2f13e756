//! Retry policies: when the next attempt of a failed delivery is due, or that there is none.
//! Invariant: `max_attempts` counts every attempt, the first included; a `Retry-After` can only
//! postpone an attempt, never hasten it, and never beyond the policy's longest delay.

use std::time::Duration;

use rand::Rng;

use crate::config::RetryConfig;

#[derive(Debug, Clone, PartialEq)]
pub enum RetryPolicy {
    /// N delays mean N + 1 attempts.
    Schedule { delays: Vec<Duration>, jitter: f64 },
    /// `initial * multiplier^(n-1)`, capped at `max_delay`.
    Exponential {
        max_attempts: u32,
        initial: Duration,
        multiplier: f64,
        max_delay: Duration,
        jitter: f64,
    },
}

impl RetryPolicy {
    pub fn max_attempts(&self) -> u32 {
        match self {
            RetryPolicy::Schedule { delays, .. } => delays.len() as u32 + 1,
            RetryPolicy::Exponential { max_attempts, .. } => *max_attempts,
        }
    }

    fn jitter(&self) -> f64 {
        match self {
            RetryPolicy::Schedule { jitter, .. } | RetryPolicy::Exponential { jitter, .. } => {
                *jitter
            }
        }
    }

    /// The longest delay the policy itself would ever wait (before jitter).
    pub fn longest_delay(&self) -> Duration {
        match self {
            RetryPolicy::Schedule { delays, .. } => {
                delays.iter().copied().max().unwrap_or_default()
            }
            RetryPolicy::Exponential { max_delay, .. } => *max_delay,
        }
    }

    /// The nominal delay after attempt number `attempt` (1-based) failed, or `None` when that
    /// was the last attempt.
    pub fn base_delay(&self, attempt: u32) -> Option<Duration> {
        if attempt == 0 || attempt >= self.max_attempts() {
            return None;
        }
        match self {
            RetryPolicy::Schedule { delays, .. } => delays.get(attempt as usize - 1).copied(),
            RetryPolicy::Exponential {
                initial,
                multiplier,
                max_delay,
                ..
            } => {
                let factor = multiplier.powi(attempt as i32 - 1);
                let secs = (initial.as_secs_f64() * factor).min(max_delay.as_secs_f64());
                Some(Duration::from_secs_f64(secs))
            }
        }
    }

    /// The delay before the next attempt after `attempt` failed: jittered uniformly within
    /// +-jitter, then raised to `retry_after` (capped at the policy's longest delay).
    pub fn next_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        let base = self.base_delay(attempt)?;
        let j = self.jitter();
        let jittered = if j > 0.0 {
            let f = rand::thread_rng().gen_range(1.0 - j..=1.0 + j);
            Duration::from_secs_f64(base.as_secs_f64() * f)
        } else {
            base
        };
        Some(match retry_after {
            Some(ra) => jittered.max(ra.min(self.longest_delay())),
            None => jittered,
        })
    }
}

/// No retry waits longer than this: a delay past it is a typo, and unbounded delays overflow
/// date arithmetic.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

impl RetryPolicy {
    /// The policy a retry table describes, or the problems with it (each a `key: message`
    /// relative to the retry table).
    pub fn from_config(table: &RetryConfig) -> Result<RetryPolicy, Vec<String>> {
        let this = table;
        let exponential_keys = [
            ("max_attempts", this.max_attempts.is_some()),
            ("initial_delay", this.initial_delay.is_some()),
            ("multiplier", this.multiplier.is_some()),
            ("max_delay", this.max_delay.is_some()),
        ];
        let exponential: Vec<&str> = exponential_keys
            .iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| *k)
            .collect();
        let jitter = this.jitter.unwrap_or(crate::config::defaults::JITTER);
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&jitter) {
            problems.push(format!("jitter: must be between 0 and 1, got {jitter}"));
        }
        let policy = match (&this.schedule, exponential.is_empty()) {
            (Some(_), false) => {
                problems.push(format!(
                    "schedule: excludes the exponential keys ({}); use one form",
                    exponential.join(", ")
                ));
                None
            }
            (Some(schedule), true) => {
                if schedule.len() > 100 {
                    problems.push("schedule: at most 100 delays".into());
                }
                for (i, d) in schedule.iter().enumerate() {
                    if d.0 > MAX_RETRY_DELAY {
                        problems.push(format!("schedule[{i}]: {d} is longer than 30d"));
                    }
                }
                Some(RetryPolicy::Schedule {
                    delays: schedule.iter().map(|d| d.0).collect(),
                    jitter,
                })
            }
            (None, true) => Some(RetryPolicy::Schedule {
                delays: crate::config::defaults::retry_schedule(),
                jitter,
            }),
            (None, false) => {
                let max_attempts = this.max_attempts.unwrap_or(6);
                let multiplier = this.multiplier.unwrap_or(2.0);
                let initial = this
                    .initial_delay
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(1));
                let max_delay = this
                    .max_delay
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(3600));
                if max_attempts == 0 || max_attempts > 100 {
                    problems.push(format!(
                        "max_attempts: must be 1 to 100 (it counts the first attempt), got {max_attempts}"
                    ));
                }
                if !(1.0..=100.0).contains(&multiplier) {
                    problems.push(format!("multiplier: must be 1 to 100, got {multiplier}"));
                }
                if max_delay < initial {
                    problems.push("max_delay: must not be below initial_delay".into());
                }
                if initial > MAX_RETRY_DELAY {
                    problems.push("initial_delay: must be at most 30d".into());
                }
                if max_delay > MAX_RETRY_DELAY {
                    problems.push("max_delay: must be at most 30d".into());
                }
                Some(RetryPolicy::Exponential {
                    max_attempts,
                    initial,
                    multiplier,
                    max_delay,
                    jitter,
                })
            }
        };
        match policy {
            Some(p) if problems.is_empty() => Ok(p),
            _ => Err(problems),
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: &[u64], jitter: f64) -> RetryPolicy {
        RetryPolicy::Schedule {
            delays: secs.iter().map(|&x| Duration::from_secs(x)).collect(),
            jitter,
        }
    }

    #[test]
    fn schedule_counts_attempts() {
        let p = s(&[1, 10], 0.0);
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(p.next_delay(1, None), Some(Duration::from_secs(1)));
        assert_eq!(p.next_delay(2, None), Some(Duration::from_secs(10)));
        assert_eq!(p.next_delay(3, None), None);
    }

    #[test]
    fn exponential_caps() {
        let p = RetryPolicy::Exponential {
            max_attempts: 6,
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: 0.0,
        };
        let delays: Vec<_> = (1..=6)
            .map(|a| p.next_delay(a, None).map(|d| d.as_secs()))
            .collect();
        assert_eq!(
            delays,
            vec![Some(1), Some(2), Some(4), Some(8), Some(10), None]
        );
    }

    #[test]
    fn retry_after_of_any_size_never_panics() {
        let p = s(&[5, 60], 0.2);
        let now = std::time::SystemTime::now();
        for v in [
            "18446744073709551615",
            "99999999999999999999999",
            "-1",
            "1e99",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "",
            "\u{0}",
        ] {
            let ra = parse_retry_after(v, now);
            let d = p.next_delay(1, ra).unwrap();
            assert!(d <= Duration::from_secs(72), "{v}: {d:?}");
        }
    }

    #[test]
    fn delays_over_thirty_days_are_refused_at_validation() {
        use crate::config::{Dur, RetryConfig};
        let long = Dur(MAX_RETRY_DELAY + Duration::from_secs(1));
        let schedule = RetryConfig {
            schedule: Some(vec![Dur(Duration::from_secs(1)), long]),
            ..RetryConfig::default()
        };
        let errs = RetryPolicy::from_config(&schedule).unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("schedule[1]:")),
            "{errs:?}"
        );
        let exponential = RetryConfig {
            max_delay: Some(long),
            ..RetryConfig::default()
        };
        let errs = RetryPolicy::from_config(&exponential).unwrap_err();
        assert!(errs.iter().any(|e| e.starts_with("max_delay:")), "{errs:?}");
        let ok = RetryConfig {
            max_delay: Some(Dur(MAX_RETRY_DELAY)),
            ..RetryConfig::default()
        };
        assert!(RetryPolicy::from_config(&ok).is_ok());
    }

    #[test]
    fn jitter_stays_in_band() {
        let p = s(&[100], 0.2);
        for _ in 0..1000 {
            let d = p.next_delay(1, None).unwrap().as_secs_f64();
            assert!((80.0..=120.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn retry_after_postpones_never_hastens_and_is_capped() {
        let p = s(&[5, 60], 0.0);
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(1))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(30))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(3600))),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
