//! Event-type patterns for endpoint subscriptions. Invariant: one definition of matching, used by
//! the dispatcher for every event: `*` matches exactly one segment, a trailing `*` one or more,
//! and `*` alone everything.

use std::fmt;

/// A parsed subscription pattern such as `order.*`, `*.created` or `invoice.paid`.
#[derive(Clone, PartialEq, Eq)]
pub struct EventPattern {
    segments: Vec<Segment>,
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum Segment {
    Literal(String),
    Star,
}

impl fmt::Debug for EventPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<&str> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Star => "*",
            })
            .collect();
        write!(f, "{}", parts.join("."))
    }
}

/// Whether `s` is a valid event type: dot-separated non-empty segments of `[A-Za-z0-9_-]`.
pub fn is_valid_event_type(s: &str) -> bool {
    s.len() <= 255
        && s.split('.')
            .all(|seg| !seg.is_empty() && seg.chars().all(is_segment_char))
}

fn is_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Patterns one endpoint may list: every event is matched against every endpoint's list in
/// every pass, so one endpoint's list must not be able to slow the fan-out for all the others.
pub const MAX_PATTERNS: usize = 1000;

impl EventPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        if pattern.len() > 255 {
            return Err("pattern longer than 255 characters".into());
        }
        let mut segments = Vec::new();
        for seg in pattern.split('.') {
            if seg == "*" {
                segments.push(Segment::Star);
            } else if !seg.is_empty() && seg.chars().all(is_segment_char) {
                segments.push(Segment::Literal(seg.to_string()));
            } else {
                return Err(format!(
                    "{pattern:?}: each dot-separated segment must be `*` or characters from A-Z a-z 0-9 _ -"
                ));
            }
        }
        Ok(Self { segments })
    }

    pub fn matches(&self, event_type: &str) -> bool {
        let parts: Vec<&str> = event_type.split('.').collect();
        let n = self.segments.len();
        if n == 1 && self.segments[0] == Segment::Star {
            return true;
        }
        let trailing_star = self.segments.last() == Some(&Segment::Star);
        if trailing_star {
            if parts.len() < n {
                return false;
            }
        } else if parts.len() != n {
            return false;
        }
        self.segments
            .iter()
            .zip(&parts)
            .all(|(seg, part)| match seg {
                Segment::Star => !part.is_empty(),
                Segment::Literal(l) => l == part,
            })
    }
}

/// An endpoint's subscription: any pattern matching accepts.
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    patterns: Vec<EventPattern>,
}

impl Subscription {
    /// Parses every pattern; invalid ones (which validation keeps out of the table) are skipped
    /// rather than failing the whole dispatcher batch.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        Self {
            patterns: patterns
                .iter()
                .filter_map(|p| EventPattern::parse(p.as_ref()).ok())
                .collect(),
        }
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(event_type))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, e: &str) -> bool {
        EventPattern::parse(p).unwrap().matches(e)
    }

    #[test]
    fn star_rules() {
        assert!(m("*", "order.created"));
        assert!(m("*", "x"));
        assert!(m("order.*", "order.created"));
        assert!(m("order.*", "order.item.added"));
        assert!(!m("order.*", "order"));
        assert!(!m("order.*", "orders.created"));
        assert!(m("*.created", "user.created"));
        assert!(!m("*.created", "user.profile.created"));
        assert!(!m("*.created", "created"));
        assert!(m("a.*.c", "a.b.c"));
        assert!(!m("a.*.c", "a.b.b.c"));
        assert!(m("invoice.paid", "invoice.paid"));
        assert!(!m("invoice.paid", "invoice.paid.late"));
        assert!(!m("invoice.paid", "invoice"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in ["", "a..b", ".a", "a.", "a.b*", "a b", "ä"] {
            assert!(EventPattern::parse(p).is_err(), "{p:?} accepted");
        }
        assert!(is_valid_event_type("order.created"));
        assert!(!is_valid_event_type("order..created"));
        assert!(!is_valid_event_type("order.*"));
    }

    #[test]
    fn subscription_matches_any() {
        let s = Subscription::new(&["order.*", "invoice.paid"]);
        assert!(s.matches("order.x"));
        assert!(s.matches("invoice.paid"));
        assert!(!s.matches("invoice.void"));
    }
}
