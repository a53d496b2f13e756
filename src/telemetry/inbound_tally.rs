//! Inbound decisions per route over the last 24 hours, in hourly slots, for the dashboard (the
//! Prometheus counters only ever grow). Lock-free on the request path: a route's slots are
//! resolved once, counting is an atomic add, and a slot is reset when its hour comes round again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

/// What is counted: the decision's outcome, then the refusal's error code.
pub const KEYS: &[&str] = &[
    "forwarded",
    "refused",
    "upstream_error",
    "stored",
    "duplicate",
    "unstored",
    "bad_request",
    "body_too_large",
    "inbox_unavailable",
    "ip_not_allowed",
    "malformed_header",
    "method_not_allowed",
    "missing_header",
    "overloaded",
    "request_timeout",
    "route_not_found",
    "signature_mismatch",
    "timestamp_out_of_tolerance",
    "upstream_timeout",
    "upstream_unavailable",
];
const OUTCOMES: usize = 6;
const HOURS: u64 = 24;

struct Slot {
    hour: AtomicU64,
    counts: [AtomicU64; KEYS.len()],
}

/// One route's slots.
pub struct RouteTally {
    slots: [Slot; HOURS as usize],
}

fn hour_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 3600)
}

impl RouteTally {
    fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| Slot {
                hour: AtomicU64::new(0),
                counts: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        }
    }

    /// Counts one decision (`error`: the refusal's code, if any).
    pub fn count(&self, outcome: &str, error: Option<&str>) {
        let hour = hour_now();
        let slot = &self.slots[(hour % HOURS) as usize];
        if slot.hour.swap(hour, Relaxed) != hour {
            // A new hour in this slot: yesterday's counts go (a count racing the reset may
            // land on either side of it).
            for c in &slot.counts {
                c.store(0, Relaxed);
            }
        }
        for key in [Some(outcome), error].into_iter().flatten() {
            if let Some(i) = KEYS.iter().position(|k| *k == key) {
                slot.counts[i].fetch_add(1, Relaxed);
            }
        }
    }

    /// Outcomes and refusal reasons over the last 24 hours (zeros left out).
    pub fn last_day(&self) -> (BTreeMap<&'static str, u64>, BTreeMap<&'static str, u64>) {
        let now = hour_now();
        let (mut outcomes, mut reasons) = (BTreeMap::new(), BTreeMap::new());
        for slot in &self.slots {
            if now.saturating_sub(slot.hour.load(Relaxed)) >= HOURS {
                continue;
            }
            for (i, c) in slot.counts.iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    let map = if i < OUTCOMES {
                        &mut outcomes
                    } else {
                        &mut reasons
                    };
                    *map.entry(KEYS[i]).or_insert(0) += n;
                }
            }
        }
        (outcomes, reasons)
    }
}

/// Every route's tally, by route path ("-": requests that matched none).
#[derive(Default)]
pub struct InboundTally {
    routes: RwLock<BTreeMap<String, Arc<RouteTally>>>,
}

impl InboundTally {
    /// The route's tally, made on first use (the proxy resolves each route's once).
    pub fn route(&self, path: &str) -> Arc<RouteTally> {
        if let Some(t) = self.routes.read().expect("not poisoned").get(path) {
            return t.clone();
        }
        self.routes
            .write()
            .expect("not poisoned")
            .entry(path.to_string())
            .or_insert_with(|| Arc::new(RouteTally::new()))
            .clone()
    }

    pub fn routes(&self) -> Vec<(String, Arc<RouteTally>)> {
        self.routes
            .read()
            .expect("not poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_reasons_are_counted_apart() {
        let tally = InboundTally::default();
        let r = tally.route("/wh");
        r.count("forwarded", None);
        r.count("refused", Some("signature_mismatch"));
        r.count("refused", Some("signature_mismatch"));
        r.count("refused", Some("not_a_code"));
        let (outcomes, reasons) = tally.route("/wh").last_day();
        assert_eq!(outcomes.get("forwarded"), Some(&1));
        assert_eq!(outcomes.get("refused"), Some(&3));
        assert_eq!(reasons.get("signature_mismatch"), Some(&2));
        assert_eq!(reasons.len(), 1);
    }
}
