//! What the proxy decided about one request, and where that is counted: the log line's fields, the
//! Prometheus counters and the dashboard's 24-hour tally. Invariant: every request is counted once,
//! under its route (or "-") and one outcome.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

use super::Route;
use crate::telemetry::inbound_tally::RouteTally;
use crate::telemetry::{InboundLabels, Metrics};

/// What happened to one request, for the log line and the metrics.
pub(super) struct Decision<'r> {
    pub route: Option<&'r Route>,
    pub outcome: Outcome,
    pub error: Option<&'static str>,
    pub status: u16,
}

#[derive(Clone, Copy)]
pub(super) enum Outcome {
    Forwarded,
    Refused,
    UpstreamError,
    /// Inbox routes: committed, a provider's retry of a stored request, or not stored (503).
    Stored,
    Duplicate,
    Unstored,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Forwarded,
        Outcome::Refused,
        Outcome::UpstreamError,
        Outcome::Stored,
        Outcome::Duplicate,
        Outcome::Unstored,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Refused => "refused",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Stored => "stored",
            Outcome::Duplicate => "duplicate",
            Outcome::Unstored => "unstored",
        }
    }
}

/// The request counters of one route (or of "no route"), one per outcome, and its 24-hour
/// tally, resolved once so that counting a request neither allocates labels nor looks the series
/// up.
pub(super) struct RouteCounters([Counter; 6], Arc<RouteTally>);

impl RouteCounters {
    pub fn new(metrics: &Metrics, route: &str) -> Self {
        Self(
            Outcome::ALL.map(|outcome| {
                metrics
                    .inbound_requests
                    .get_or_create(&InboundLabels {
                        route: route.to_string(),
                        outcome: outcome.as_str(),
                    })
                    .clone()
            }),
            metrics.inbound_tally.route(route),
        )
    }

    pub fn count(&self, outcome: Outcome, error: Option<&str>) {
        self.0[outcome as usize].inc();
        self.1.count(outcome.as_str(), error);
    }
}
