//! Logging: one tracing subscriber (text or JSON, to stderr) for the whole process. Invariant: log
//! fields are structured (`delivery.id`, `endpoint.id`, `attempt`) and never carry a secret. Also
//! the replica's health, which the pipeline reports to and the admin listener reads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log.level`. Calling it twice
/// is harmless (the second call is ignored), which keeps tests and `demo` simple.
pub fn init(config: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; files and log collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// An error with its causes, `outer: inner: innermost`, without repeating the same text: the
/// cause is usually what an operator needs (e.g. why a TLS handshake failed).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Every metric name Postern exposes, in one place. Counters get `_total` appended by the
/// exposition format. Labels stay low-cardinality: never URLs, tenants or ids.
pub mod names {
    pub const DELIVERIES: &str = "postern_deliveries";
    pub const ATTEMPT_DURATION: &str = "postern_attempt_duration_seconds";
    pub const DELIVERIES_DUE: &str = "postern_deliveries_due";
    pub const OLDEST_DUE: &str = "postern_oldest_due_seconds";
    pub const DISPATCH_LAG: &str = "postern_outbox_dispatch_lag_seconds";
    pub const OUTBOX_UNDISPATCHED: &str = "postern_outbox_undispatched";
    pub const ENDPOINTS_INACTIVE: &str = "postern_endpoints_inactive";
    pub const ORDERING_KEYS_BLOCKED: &str = "postern_ordering_keys_blocked";
    pub const RATE_LIMITED: &str = "postern_rate_limited";
    pub const CIRCUIT_OPEN: &str = "postern_endpoint_circuit_open";
    pub const INBOUND_REQUESTS: &str = "postern_inbound_requests";
    pub const INBOUND_DURATION: &str = "postern_inbound_duration_seconds";
    pub const INBOX_ACCEPTED: &str = "postern_inbox_accepted";
    pub const INBOX_DUPLICATES: &str = "postern_inbox_duplicates";
    pub const INBOX_PENDING: &str = "postern_inbox_pending";
    pub const INBOX_OLDEST_PENDING: &str = "postern_inbox_oldest_pending_seconds";
    pub const INBOX_FORWARDS: &str = "postern_inbox_forwards";
    pub const DB_POOL_IN_USE: &str = "postern_db_pool_in_use";
    pub const LISTENER_CONNECTED: &str = "postern_listener_connected";
    pub const OUTBOX_PASSES: &str = "postern_outbox_passes";
    pub const OUTBOX_PROBES: &str = "postern_outbox_probes";
    pub const OUTBOX_FOLDED: &str = "postern_outbox_folded";
}

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// delivered | retry | failed | gone
    pub outcome: &'static str,
}

/// Why a fan-out pass ran.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabel {
    /// notification (a wake-up, or a reconnect's catch-up) | probe (a probe found an event) |
    /// poll (the poll timer) | more (the pass before it filled its batch, or left a whole batch
    /// of keyed events for another replica's pass)
    pub reason: &'static str,
}

/// What a probe of the outbox answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabel {
    /// waiting (an event waits) | none | failed
    pub answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    /// The route's configured path (bounded by the config), or "-" when none matched.
    pub route: String,
    /// forwarded | refused | upstream_error
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The route's name (bounded by the config).
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    pub route: String,
    /// delivered | retry | failed | app_unavailable
    pub outcome: &'static str,
}

/// The process's metrics; one instance, shared by reference.
pub struct Metrics {
    registry: Registry,
    pub deliveries: Family<OutcomeLabel, Counter>,
    pub attempt_duration: Histogram,
    pub deliveries_due: Gauge,
    pub outbox_undispatched: Gauge,
    pub oldest_due_seconds: Gauge<f64, AtomicU64>,
    pub dispatch_lag: Histogram,
    pub endpoints_inactive: Gauge,
    pub ordering_keys_blocked: Gauge,
    pub rate_limited: Counter,
    pub circuit_open: Gauge,
    pub inbound_requests: Family<InboundLabels, Counter>,
    pub inbound_duration: Histogram,
    pub inbox_accepted: Family<RouteLabel, Counter>,
    pub inbox_duplicates: Family<RouteLabel, Counter>,
    pub inbox_pending: Gauge,
    pub inbox_oldest_pending: Gauge<f64, AtomicU64>,
    pub inbox_forwards: Family<ForwardLabels, Counter>,
    pub db_pool_in_use: Gauge,
    pub listener_connected: Gauge,
    pub outbox_passes: Family<PassLabel, Counter>,
    pub outbox_probes: Family<ProbeLabel, Counter>,
    /// Deliveries the fan-out inserted already delivered (their outcome came before its commit).
    pub outbox_folded: Counter,
    /// Inbound decisions over the last 24 hours, for the dashboard.
    pub inbound_tally: inbound_tally::InboundTally,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Self {
            deliveries: Family::default(),
            attempt_duration: latency(),
            deliveries_due: Gauge::default(),
            outbox_undispatched: Gauge::default(),
            oldest_due_seconds: Gauge::default(),
            dispatch_lag: latency(),
            endpoints_inactive: Gauge::default(),
            ordering_keys_blocked: Gauge::default(),
            rate_limited: Counter::default(),
            circuit_open: Gauge::default(),
            inbound_requests: Family::default(),
            inbound_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            inbox_accepted: Family::default(),
            inbox_duplicates: Family::default(),
            inbox_pending: Gauge::default(),
            inbox_oldest_pending: Gauge::default(),
            inbox_forwards: Family::default(),
            db_pool_in_use: Gauge::default(),
            listener_connected: Gauge::default(),
            outbox_passes: Family::default(),
            outbox_probes: Family::default(),
            outbox_folded: Counter::default(),
            inbound_tally: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            names::DELIVERIES,
            "Delivery attempts by outcome",
            m.deliveries.clone(),
        );
        registry.register(
            names::ATTEMPT_DURATION,
            "Duration of delivery attempts",
            m.attempt_duration.clone(),
        );
        registry.register(
            names::DELIVERIES_DUE,
            "Deliveries due now and not yet claimed",
            m.deliveries_due.clone(),
        );
        registry.register(
            names::OUTBOX_UNDISPATCHED,
            "Events committed to the outbox and not yet fanned out (the backlog under overload)",
            m.outbox_undispatched.clone(),
        );
        registry.register(
            names::OLDEST_DUE,
            "Age of the oldest due delivery",
            m.oldest_due_seconds.clone(),
        );
        registry.register(
            names::OUTBOX_PASSES,
            "Fan-out passes, by what started them",
            m.outbox_passes.clone(),
        );
        registry.register(
            names::OUTBOX_PROBES,
            "Probes of the outbox while events flow, by answer",
            m.outbox_probes.clone(),
        );
        registry.register(
            names::OUTBOX_FOLDED,
            "Deliveries written delivered by the fan-out that made them, their 2xx in before its commit",
            m.outbox_folded.clone(),
        );
        registry.register(
            names::DISPATCH_LAG,
            "Time from outbox insert to fan-out",
            m.dispatch_lag.clone(),
        );
        registry.register(
            names::ENDPOINTS_INACTIVE,
            "Endpoints that are inactive",
            m.endpoints_inactive.clone(),
        );
        registry.register(
            names::ORDERING_KEYS_BLOCKED,
            "Ordering keys waiting on a failed delivery (on_failure = block), all endpoints",
            m.ordering_keys_blocked.clone(),
        );
        registry.register(
            names::RATE_LIMITED,
            "Due deliveries a claim left waiting for tokens: their endpoint's rate limit or back pressure (not an open circuit or a pause, whose wait is known)",
            m.rate_limited.clone(),
        );
        registry.register(
            names::CIRCUIT_OPEN,
            "Endpoints whose circuit is open (all replicas' view)",
            m.circuit_open.clone(),
        );
        registry.register(
            names::INBOUND_REQUESTS,
            "Inbound webhook requests by route and outcome",
            m.inbound_requests.clone(),
        );
        registry.register(
            names::INBOUND_DURATION,
            "Time to decide and answer inbound requests",
            m.inbound_duration.clone(),
        );
        registry.register(
            names::INBOX_ACCEPTED,
            "Inbox messages stored (committed before the provider was answered), by route",
            m.inbox_accepted.clone(),
        );
        registry.register(
            names::INBOX_DUPLICATES,
            "Inbox requests whose dedupe key was stored already (a provider's retry), by route",
            m.inbox_duplicates.clone(),
        );
        registry.register(
            names::INBOX_PENDING,
            "Inbox messages not yet handled by the app (pending, being forwarded or taken)",
            m.inbox_pending.clone(),
        );
        registry.register(
            names::INBOX_OLDEST_PENDING,
            "Age of the oldest inbox message not yet handled",
            m.inbox_oldest_pending.clone(),
        );
        registry.register(
            names::INBOX_FORWARDS,
            "Attempts to hand inbox messages to the app, by route and outcome",
            m.inbox_forwards.clone(),
        );
        registry.register(
            names::DB_POOL_IN_USE,
            "Pool connections in use",
            m.db_pool_in_use.clone(),
        );
        registry.register(
            names::LISTENER_CONNECTED,
            "1 when the LISTEN connection is up",
            m.listener_connected.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// What readiness is made of: written by the prober and the pipeline (which report a replica's
/// faults here), read by `/readyz`.
#[derive(Default)]
pub struct Health {
    pub database: AtomicBool,
    pub schema: AtomicBool,
    pub pipeline: AtomicBool,
    pub stopping: AtomicBool,
    /// A fault of this replica (a pipeline task that stopped): the first reason reported stays
    /// until the process restarts.
    fault: std::sync::Mutex<Option<String>>,
    /// Endpoints whose deliveries this replica cannot prepare (a secret it cannot decrypt), each
    /// with the reason: a fault lasts until that endpoint's next delivery prepares, so a value
    /// repaired (or a key supplied) does not need a restart to make the replica ready again.
    endpoint_faults: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// Whether `endpoint_faults` holds any: read on every attempt, locked only when it does.
    any_endpoint_fault: AtomicBool,
    /// Where the inbound proxy listens, when configured.
    pub inbound: Option<SocketAddr>,
}

impl Health {
    pub fn new(inbound: Option<SocketAddr>) -> Self {
        Self {
            inbound,
            ..Self::default()
        }
    }

    /// Marks the replica unready for `reason` (the first fault reported is kept).
    pub fn set_fault(&self, reason: impl Into<String>) {
        let mut fault = self.fault.lock().expect("health fault");
        if fault.is_none() {
            *fault = Some(reason.into());
        }
    }

    /// Marks the replica unready while it cannot prepare deliveries to `endpoint`.
    pub fn set_endpoint_fault(&self, endpoint: &str, reason: impl Into<String>) {
        let mut faults = self.endpoint_faults.lock().expect("endpoint faults");
        faults
            .entry(endpoint.to_string())
            .or_insert_with(|| reason.into());
        self.any_endpoint_fault.store(true, Ordering::Relaxed);
    }

    /// A delivery to `endpoint` was prepared: whatever kept it from being prepared is gone.
    pub fn clear_endpoint_fault(&self, endpoint: &str) {
        if !self.any_endpoint_fault.load(Ordering::Relaxed) {
            return;
        }
        let mut faults = self.endpoint_faults.lock().expect("endpoint faults");
        if faults.remove(endpoint).is_some() {
            tracing::info!(
                endpoint.id = endpoint,
                "deliveries to the endpoint can be prepared again"
            );
        }
        self.any_endpoint_fault
            .store(!faults.is_empty(), Ordering::Relaxed);
    }

    /// The replica's own fault, else the first endpoint's.
    pub fn fault(&self) -> Option<String> {
        let fault = self.fault.lock().expect("health fault").clone();
        fault.or_else(|| {
            let faults = self.endpoint_faults.lock().expect("endpoint faults");
            faults.values().next().cloned()
        })
    }

    /// `Err(reason)` while not ready.
    pub fn readiness(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        if let Some(fault) = self.fault() {
            return Err(fault);
        }
        if !self.database.load(Ordering::Relaxed) {
            return Err("database unreachable".into());
        }
        if !self.schema.load(Ordering::Relaxed) {
            return Err(format!(
                "schema older than this binary needs (version {})",
                crate::db::SCHEMA_VERSION
            ));
        }
        if !self.pipeline.load(Ordering::Relaxed) {
            return Err("outbound pipeline not running".into());
        }
        if let Some(addr) = self.inbound {
            // A connect to our own listener: cheap, local, and true to what a sender sees.
            let target = if addr.ip().is_unspecified() {
                SocketAddr::new(
                    if addr.is_ipv4() {
                        [127, 0, 0, 1].into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    },
                    addr.port(),
                )
            } else {
                addr
            };
            if std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_err() {
                return Err(format!("inbound listener {addr} not accepting"));
            }
        }
        Ok(())
    }
}

pub mod inbound_tally;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_fault_lasts_until_that_endpoint_prepares_again() {
        let health = Health::new(None);
        for flag in [&health.database, &health.schema, &health.pipeline] {
            flag.store(true, Ordering::Relaxed);
        }
        assert_eq!(health.readiness(), Ok(()));
        health.set_endpoint_fault("a", "cannot open a");
        health.set_endpoint_fault("b", "cannot open b");
        health.clear_endpoint_fault("a");
        assert_eq!(health.readiness(), Err("cannot open b".into()));
        health.clear_endpoint_fault("b");
        assert_eq!(health.readiness(), Ok(()));
        // The replica's own faults stay.
        health.set_fault("a pipeline task stopped");
        health.clear_endpoint_fault("a");
        assert_eq!(health.readiness(), Err("a pipeline task stopped".into()));
    }
}
