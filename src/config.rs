//! Configuration: built-in defaults, then the TOML file, then `POSTERN__SECTION__KEY` environment
//! variables, validated into typed values. Invariant: a `Config` that exists is valid, every secret
//! in it is resolved, and nothing here ever prints a secret (they serialize as `"<redacted>"`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::delivery::retry::RetryPolicy;
use crate::outbox::glob::EventPattern;

/// Every problem found in a configuration, one line each, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

/// The whole configuration. Field names are the TOML keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// SIGTERM-to-exit budget for everything.
    #[serde(default = "defaults::shutdown_grace")]
    pub shutdown_grace: Dur,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Raise it whenever `[[endpoints]]` change. Only a config at least as new as the one the
    /// database last reconciled may change endpoints, and only a newer one retires endpoints it no
    /// longer lists, so an older pod restarting during a rolling update changes nothing.
    #[serde(default)]
    pub config_generation: u64,
    /// Probes and metrics (no token); absent = that listener is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// The management REST API; absent = that listener is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiConfig>,
    /// The verifying reverse proxy for provider webhooks; absent = no inbound listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "defaults::api_listen")]
    pub listen: String,
    /// Bearer tokens accepted on every `/api/*` route.
    #[serde(default)]
    pub tokens: Vec<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    #[serde(default = "defaults::inbound_listen")]
    pub listen: String,
    /// The app, on localhost: `http://host:port`.
    #[serde(default = "defaults::inbound_upstream")]
    pub upstream: String,
    #[serde(default = "defaults::inbound_max_body")]
    pub max_body: ByteSize,
    /// Request bodies buffered at once, over every connection: past it, senders get `503` with
    /// `Retry-After` (their providers retry) instead of the process growing without bound.
    #[serde(default = "defaults::inbound_max_buffered")]
    pub max_buffered: ByteSize,
    /// Slow senders are cut off: the whole request body must arrive within this.
    #[serde(default = "defaults::inbound_read_timeout")]
    pub read_timeout: Dur,
    #[serde(default = "defaults::inbound_upstream_timeout")]
    pub upstream_timeout: Dur,
    /// CIDRs of proxies (e.g. the ingress) whose X-Forwarded-For is believed.
    #[serde(default)]
    pub trust_forwarded_for: Vec<IpNet>,
    /// Worker threads of the proxy's runtime.
    #[serde(default = "defaults::inbound_threads")]
    pub threads: usize,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One provider route. Provider-specific keys are checked by the provider's verifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact path match (the query string is ignored for routing).
    pub path: String,
    pub provider: String,
    #[serde(default)]
    pub secrets: Vec<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_path: Option<String>,
    #[serde(default)]
    pub allow_ips: Vec<IpNet>,
    /// Accepted methods; webhooks are POST unless a route says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// square: the notification URL registered with Square.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_url: Option<String>,
    /// twilio: the URL Twilio requests, without its query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// hmac: the signature header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// hmac: sha256 | sha1 | sha512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// hmac: hex | base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// hmac: text before the signature in the header, e.g. `sha256=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// hmac: the header carrying a unix timestamp, when the sender signs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_header: Option<String>,
    /// hmac: what is signed, from `{timestamp}` and `{body}`; default `{body}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_template: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Falls back to `DATABASE_URL` when unset.
    #[serde(default)]
    pub url: Option<Secret>,
    /// A separate URL for LISTEN (transaction-pooling pgbouncer cannot LISTEN). Empty = `url`.
    #[serde(default)]
    pub listen_url: Option<Secret>,
    #[serde(default = "defaults::schema")]
    pub schema: String,
    #[serde(default = "defaults::yes")]
    pub migrate_on_start: bool,
    #[serde(default)]
    pub publisher_roles: Vec<String>,
    /// Connections in the pool for the API and start-up (the LISTEN connection, the prober's and
    /// the pipeline's five are extra).
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// Verify the server's TLS certificate and host name (libpq's verify-full) against the Mozilla
    /// roots. Whether to use TLS at all is the URL's `sslmode` (disable / prefer / require).
    #[serde(default)]
    pub tls_verify: bool,
    /// PEM CA certificates to verify the server against (implies `tls_verify`), e.g. a cloud
    /// provider's CA bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// 32 bytes, base64: endpoint secrets and custom header values are encrypted at rest with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<Secret>,
    /// Earlier keys, still used to open what they sealed while a key rotation is under way
    /// (`postern migrate` re-seals everything with `encryption_key`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encryption_keys: Vec<Secret>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            listen_url: None,
            schema: defaults::schema(),
            migrate_on_start: true,
            publisher_roles: Vec::new(),
            pool_size: defaults::pool_size(),
            tls_verify: false,
            ca_file: None,
            encryption_key: None,
            encryption_keys: Vec::new(),
        }
    }
}

impl DatabaseConfig {
    /// The URL Postern's pool connects to (validated to exist).
    pub fn url(&self) -> &str {
        self.url.as_ref().map(Secret::expose).unwrap_or_default()
    }

    /// The URL the LISTEN connection uses.
    pub fn listen_url(&self) -> &str {
        match &self.listen_url {
            Some(s) if !s.expose().is_empty() => s.expose(),
            _ => self.url(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "defaults::log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: defaults::log_level(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How the outbox trigger wakes Postern (DESIGN.md: protect the app's write path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyMode {
    /// At most one NOTIFY per `notify_throttle`, clocked by a sequence (no row lock held).
    #[default]
    Throttled,
    /// One NOTIFY per INSERT statement: simplest, costly under concurrent writers.
    Statement,
    /// No trigger: polling only.
    None,
}

impl NotifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyMode::Throttled => "throttled",
            NotifyMode::Statement => "statement",
            NotifyMode::None => "none",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    #[serde(default)]
    pub notify: NotifyMode,
    #[serde(default = "defaults::notify_throttle")]
    pub notify_throttle: Dur,
    #[serde(default = "defaults::poll_interval")]
    pub poll_interval: Dur,
    #[serde(default = "defaults::request_timeout")]
    pub request_timeout: Dur,
    #[serde(default = "defaults::max_payload")]
    pub max_payload: ByteSize,
    /// Memory for deliveries held in the replica (claimed or handed over, not yet settled): each
    /// is charged twice its payload (the payload and the request body built from it).
    #[serde(default = "defaults::memory_budget")]
    pub memory_budget: ByteSize,
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    #[serde(default = "defaults::per_endpoint_concurrency")]
    pub per_endpoint_concurrency: usize,
    #[serde(default)]
    pub allow_private_networks: Vec<IpNet>,
    /// How long a claimed delivery stays reserved for this replica; after that another replica
    /// may retry it. Default: `request_timeout` + 15s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Dur>,
    /// Outbox rows fanned out per dispatcher transaction.
    #[serde(default = "defaults::dispatch_batch")]
    pub dispatch_batch: usize,
    /// A delivery whose lease lapses this many times in a row without an outcome (it kills or
    /// stalls whoever makes it) is failed instead of being sent again.
    #[serde(default = "defaults::max_lease_lapses")]
    pub max_lease_lapses: u32,
    #[serde(default)]
    pub retry: RetryConfig,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            notify: NotifyMode::default(),
            notify_throttle: defaults::notify_throttle(),
            poll_interval: defaults::poll_interval(),
            request_timeout: defaults::request_timeout(),
            max_payload: defaults::max_payload(),
            memory_budget: defaults::memory_budget(),
            concurrency: defaults::concurrency(),
            per_endpoint_concurrency: defaults::per_endpoint_concurrency(),
            allow_private_networks: Vec::new(),
            lease: None,
            dispatch_batch: defaults::dispatch_batch(),
            max_lease_lapses: defaults::max_lease_lapses(),
            retry: RetryConfig::default(),
        }
    }
}

/// A retry policy as written: either `schedule` (+ `jitter`) or the exponential keys.
/// Both forms are optional here so that defaults never collide with what the user wrote;
/// [`RetryConfig::policy`] decides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Vec<Dur>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<Dur>,
}

/// No retry waits longer than this: a delay past it is a typo, and unbounded delays overflow
/// date arithmetic.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

impl RetryConfig {
    /// The policy this describes, or the problems with it (each a `key: message` relative to
    /// the retry table).
    pub fn policy(&self) -> Result<RetryPolicy, Vec<String>> {
        let exponential_keys = [
            ("max_attempts", self.max_attempts.is_some()),
            ("initial_delay", self.initial_delay.is_some()),
            ("multiplier", self.multiplier.is_some()),
            ("max_delay", self.max_delay.is_some()),
        ];
        let exponential: Vec<&str> = exponential_keys
            .iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| *k)
            .collect();
        let jitter = self.jitter.unwrap_or(defaults::JITTER);
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&jitter) {
            problems.push(format!("jitter: must be between 0 and 1, got {jitter}"));
        }
        let policy = match (&self.schedule, exponential.is_empty()) {
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
                delays: defaults::retry_schedule(),
                jitter,
            }),
            (None, false) => {
                let max_attempts = self.max_attempts.unwrap_or(6);
                let multiplier = self.multiplier.unwrap_or(2.0);
                let initial = self
                    .initial_delay
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(1));
                let max_delay = self
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delivered deliveries, their attempts and fully delivered events are pruned after this.
    #[serde(default = "defaults::retention_delivered")]
    pub delivered: Dur,
    /// Failed and cancelled deliveries are pruned after this.
    #[serde(default = "defaults::retention_failed")]
    pub failed: Dur,
    /// How often a replica runs a pruning pass.
    #[serde(default = "defaults::retention_interval")]
    pub interval: Dur,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            delivered: defaults::retention_delivered(),
            failed: defaults::retention_failed(),
            interval: defaults::retention_interval(),
        }
    }
}

/// The signature scheme an endpoint receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureScheme {
    /// Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    #[default]
    Standard,
    /// The seed service's `x-webhook-signature: v1=<hex>` scheme.
    Legacy,
}

impl SignatureScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureScheme::Standard => "standard",
            SignatureScheme::Legacy => "legacy",
        }
    }
}

impl FromStr for SignatureScheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "standard" => Ok(Self::Standard),
            "legacy" => Ok(Self::Legacy),
            other => Err(format!("unknown signature scheme {other:?}")),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub secret: Secret,
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    #[serde(default)]
    pub signature: SignatureScheme,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    #[serde(default = "defaults::yes")]
    pub active: bool,
}

/// A secret as written (`literal`, `env:NAME` or `file:PATH`) plus its resolved value.
/// It serializes as `"<redacted>"` and debug-prints the same, so it cannot leak through
/// `check-config` or a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
}

pub const REDACTED: &str = "<redacted>";

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self {
            value: value.into(),
        }
    }

    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Resolves a reference as written in the config.
    pub fn resolve(written: &str) -> Result<Self, String> {
        if let Some(name) = written.strip_prefix("env:") {
            return std::env::var(name)
                .map(Self::new)
                .map_err(|_| format!("environment variable {name} is not set"));
        }
        if let Some(path) = written.strip_prefix("file:") {
            return std::fs::read_to_string(path)
                .map(|s| Self::new(s.strip_suffix('\n').unwrap_or(&s).trim_end_matches('\r')))
                .map_err(|e| format!("cannot read secret file {path}: {e}"));
        }
        Ok(Self::new(written))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// Deserializing resolves the reference; a failure becomes a serde error at this key, so the
/// message names the key like every other config problem.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let written = String::deserialize(d)?;
        Secret::resolve(&written).map_err(serde::de::Error::custom)
    }
}

/// A duration written as `"500ms"`, `"30s"`, `"5m"`, `"10h"`, `"7d"` (or a combination).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Dur {
    /// The largest unit that divides the value exactly, so `7d` prints as `7d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"30s\", \"10h\", \"7d\"")
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A byte size written as `"1MiB"`, `"512KiB"`, `"1MB"` or a plain number of bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n % size == 0 {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad =
            || format!("invalid size {s:?}; write e.g. \"1MiB\", \"512KiB\" or a number of bytes");
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

mod defaults {
    use super::{ByteSize, Dur};
    use std::time::Duration;

    pub const JITTER: f64 = 0.2;

    pub fn yes() -> bool {
        true
    }
    pub fn shutdown_grace() -> Dur {
        Dur(Duration::from_secs(25))
    }
    pub fn schema() -> String {
        "postern".into()
    }
    pub fn pool_size() -> usize {
        8
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn notify_throttle() -> Dur {
        Dur(Duration::from_millis(10))
    }
    pub fn poll_interval() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn request_timeout() -> Dur {
        Dur(Duration::from_secs(15))
    }
    pub fn max_payload() -> ByteSize {
        ByteSize(1 << 20)
    }
    pub fn concurrency() -> usize {
        256
    }
    pub fn per_endpoint_concurrency() -> usize {
        16
    }
    /// Sized for the 256 MiB memory limit in deploy/kubernetes, beside the inbound budget.
    pub fn memory_budget() -> ByteSize {
        ByteSize(64 << 20)
    }
    pub fn max_lease_lapses() -> u32 {
        3
    }
    pub fn dispatch_batch() -> usize {
        500
    }
    pub fn retry_schedule() -> Vec<Duration> {
        [5, 300, 1800, 7200, 18_000, 36_000, 36_000]
            .into_iter()
            .map(Duration::from_secs)
            .collect()
    }
    pub fn retention_delivered() -> Dur {
        Dur(Duration::from_secs(7 * 86_400))
    }
    pub fn retention_failed() -> Dur {
        Dur(Duration::from_secs(30 * 86_400))
    }
    pub fn retention_interval() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn admin_listen() -> String {
        "0.0.0.0:9091".into()
    }
    pub fn api_listen() -> String {
        "127.0.0.1:9090".into()
    }
    pub fn inbound_listen() -> String {
        "0.0.0.0:8081".into()
    }
    pub fn inbound_upstream() -> String {
        "http://127.0.0.1:8080".into()
    }
    pub fn inbound_max_body() -> ByteSize {
        ByteSize(5 << 20)
    }
    /// Sized for the 256 MiB memory limit in deploy/kubernetes, beside outbound.memory_budget.
    pub fn inbound_max_buffered() -> ByteSize {
        ByteSize(32 << 20)
    }
    pub fn inbound_read_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn inbound_upstream_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn inbound_threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    }
}

/// Where an endpoint id, tenant or schema name may come from: short, printable, no surprises.
fn is_identifier(s: &str, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(&c))
}

/// A Postgres schema name Postern will splice into SQL: lower-case identifier characters only.
pub fn is_schema_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Config {
    /// How long a claim reserves a delivery.
    pub fn lease(&self) -> Duration {
        self.outbound
            .lease
            .map(|d| d.0)
            .unwrap_or(self.outbound.request_timeout.0 + Duration::from_secs(15))
    }

    /// Loads defaults, then `file` (if any), then `POSTERN__*` variables, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::one(format!(
                    "config file {}: not found",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("POSTERN__").split("__").lowercase(true));
        Self::from_figment(figment)
    }

    /// Parses a TOML document (plus the environment layer), as `load` does for a file.
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        let figment = Figment::new()
            .merge(Toml::string(toml))
            .merge(Env::prefixed("POSTERN__").split("__").lowercase(true));
        Self::from_figment(figment)
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(|e| ConfigError {
            problems: e.into_iter().map(describe_figment_error).collect(),
        })?;
        if config.database.url.is_none() {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                config.database.url = Some(Secret::new(url));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks everything serde cannot; every problem is reported, not only the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let grace = self.shutdown_grace.0;
        if grace < Duration::from_secs(1) {
            p.push("shutdown_grace: must be at least 1s".into());
        }
        match &self.database.url {
            None => p.push("database.url: not set (set it, or DATABASE_URL)".into()),
            Some(u) if u.expose().is_empty() => p.push("database.url: is empty".into()),
            Some(u) => {
                if let Err(e) = u.expose().parse::<tokio_postgres::Config>() {
                    p.push(format!(
                        "database.url: not a Postgres connection string ({e})"
                    ));
                }
            }
        }
        if let Some(u) = &self.database.listen_url {
            if !u.expose().is_empty() {
                if let Err(e) = u.expose().parse::<tokio_postgres::Config>() {
                    p.push(format!(
                        "database.listen_url: not a Postgres connection string ({e})"
                    ));
                }
            }
        }
        if !is_schema_name(&self.database.schema) {
            p.push(format!(
                "database.schema: {:?} must be a lower-case identifier (a-z, 0-9, _), at most 48 characters",
                self.database.schema
            ));
        }
        for (i, role) in self.database.publisher_roles.iter().enumerate() {
            if !is_identifier(role, &[]) {
                p.push(format!(
                    "database.publisher_roles[{i}]: {role:?} is not a plain role name"
                ));
            }
        }
        if self.database.pool_size < 2 || self.database.pool_size > 200 {
            p.push("database.pool_size: must be 2 to 200".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.push(format!(
                "log.level: {:?} is not a level or filter directive",
                self.log.level
            ));
        }
        let o = &self.outbound;
        if o.notify_throttle.0 < Duration::from_millis(1)
            || o.notify_throttle.0 > Duration::from_secs(10)
        {
            p.push("outbound.notify_throttle: must be 1ms to 10s".into());
        }
        if o.poll_interval.0 < Duration::from_millis(10) {
            p.push("outbound.poll_interval: must be at least 10ms".into());
        }
        if o.request_timeout.0 < Duration::from_millis(100) {
            p.push("outbound.request_timeout: must be at least 100ms".into());
        }
        if o.request_timeout.0 >= grace {
            p.push(format!(
                "outbound.request_timeout: {} must be below shutdown_grace ({}) so in-flight requests can finish on shutdown",
                o.request_timeout, self.shutdown_grace
            ));
        }
        if let Some(lease) = o.lease {
            if lease.0 < o.request_timeout.0 + Duration::from_secs(1) {
                p.push(format!(
                    "outbound.lease: {lease} must exceed outbound.request_timeout ({}) by at least 1s",
                    o.request_timeout
                ));
            }
        }
        if o.max_payload.0 == 0 {
            p.push("outbound.max_payload: must be above zero".into());
        }
        if o.memory_budget.0 < 16 * o.max_payload.0 {
            p.push(format!(
                "outbound.memory_budget: {} is too small for outbound.max_payload ({}); it needs at least 16 times that",
                o.memory_budget, o.max_payload
            ));
        }
        if o.concurrency == 0 || o.concurrency > 10_000 {
            p.push("outbound.concurrency: must be 1 to 10000".into());
        }
        if o.per_endpoint_concurrency == 0 || o.per_endpoint_concurrency > o.concurrency {
            p.push("outbound.per_endpoint_concurrency: must be 1 to outbound.concurrency".into());
        }
        if o.max_lease_lapses == 0 || o.max_lease_lapses > 1000 {
            p.push("outbound.max_lease_lapses: must be 1 to 1000".into());
        }
        if o.dispatch_batch == 0 || o.dispatch_batch > 10_000 {
            p.push("outbound.dispatch_batch: must be 1 to 10000".into());
        }
        if let Err(errs) = o.retry.policy() {
            p.extend(errs.into_iter().map(|e| format!("outbound.retry.{e}")));
        }
        let r = &self.retention;
        if r.interval.0 < Duration::from_secs(1) {
            p.push("retention.interval: must be at least 1s".into());
        }
        if r.delivered.0 < Duration::from_secs(60) {
            p.push("retention.delivered: must be at least 1m".into());
        }
        if r.failed.0 < Duration::from_secs(60) {
            p.push("retention.failed: must be at least 1m".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let key = format!("endpoints[{i}]");
            if !is_identifier(&e.id, &['.', ':']) {
                p.push(format!(
                    "{key}.id: {:?} must be 1-128 characters of a-z, A-Z, 0-9, _ - . :",
                    e.id
                ));
            } else if !seen.insert(e.id.clone()) {
                p.push(format!("{key}.id: {:?} is used by another endpoint", e.id));
            }
            if let Err(msg) = validate_endpoint_url(&e.url) {
                p.push(format!("{key}.url: {msg}"));
            }
            if e.events.is_empty() {
                p.push(format!(
                    "{key}.events: must list at least one event type or pattern"
                ));
            }
            for (j, pattern) in e.events.iter().enumerate() {
                if let Err(msg) = EventPattern::parse(pattern) {
                    p.push(format!("{key}.events[{j}]: {msg}"));
                }
            }
            if let Some(t) = &e.tenant {
                if t != "*" && !is_identifier(t, &['.', ':']) {
                    p.push(format!(
                        "{key}.tenant: {t:?} must be \"*\" or 1-128 characters of a-z, A-Z, 0-9, _ - . :"
                    ));
                }
            }
            if let Err(msg) = crate::signing::validate_secret(e.signature, e.secret.expose()) {
                p.push(format!("{key}.secret: {msg}"));
            }
            for name in e.headers.keys() {
                if let Err(msg) = validate_custom_header(name) {
                    p.push(format!("{key}.headers.{name}: {msg}"));
                }
            }
            if let Some(retry) = &e.retry {
                if let Err(errs) = retry.policy() {
                    p.extend(errs.into_iter().map(|m| format!("{key}.retry.{m}")));
                }
            }
        }
        if let Some(inbound) = &self.inbound {
            p.extend(crate::inbound::validate(inbound));
        }
        if let Some(path) = &self.database.ca_file {
            if let Err(e) = crate::db::tls::verified(Some(path)) {
                p.push(format!("{e:#}"));
            }
        }
        if let Some(key) = &self.database.encryption_key {
            if let Err(e) = crate::crypto::SecretBox::from_base64(key.expose()) {
                p.push(format!("database.encryption_key: {e}"));
            }
        }
        for (i, key) in self.database.encryption_keys.iter().enumerate() {
            if let Err(e) = crate::crypto::SecretBox::from_base64(key.expose()) {
                p.push(format!("database.encryption_keys[{i}]: {e}"));
            }
        }
        if !self.database.encryption_keys.is_empty() && self.database.encryption_key.is_none() {
            p.push("database.encryption_keys: older keys need database.encryption_key (the key that seals new values)".into());
        }
        if let Some(admin) = &self.admin {
            if admin.listen.parse::<std::net::SocketAddr>().is_err() {
                p.push(format!(
                    "admin.listen: {:?} is not an address like 0.0.0.0:9091",
                    admin.listen
                ));
            }
        }
        if let Some(api) = &self.api {
            match api.listen.parse::<std::net::SocketAddr>() {
                Err(_) => p.push(format!(
                    "api.listen: {:?} is not an address like 127.0.0.1:9090",
                    api.listen
                )),
                Ok(addr) if !addr.ip().is_loopback() && api.tokens.is_empty() => p.push(format!(
                    "api.tokens: required when api.listen ({}) is not a loopback address",
                    api.listen
                )),
                Ok(_) => {}
            }
            for (i, t) in api.tokens.iter().enumerate() {
                if t.expose().len() < 16 {
                    p.push(format!("api.tokens[{i}]: must be at least 16 characters"));
                }
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }

    /// Things that work but deserve an operator's attention (`check-config` prints them).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.database.encryption_key.is_none() {
            w.push("database.encryption_key: not set; endpoint secrets are stored in Postgres in plain text".into());
        }
        if let Some(api) = &self.api {
            if api.tokens.is_empty() {
                w.push("api.tokens: not set; any process that reaches the loopback listener can use the API".into());
            }
        }
        w
    }

    /// The effective configuration as TOML, every secret shown as `"<redacted>"`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        // A database URL carries a password: print it with the password masked rather than
        // hiding the whole URL, because host and database are what an operator checks.
        let mask = |s: &Secret| Secret::new(mask_url_password(s.expose()));
        let url = shown.database.url.as_ref().map(mask);
        let listen = shown.database.listen_url.as_ref().map(mask);
        let mut text =
            toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        // `Secret` always serializes redacted; re-insert the masked URLs by hand.
        if let Some(u) = url {
            text = text.replacen(
                &format!("url = \"{REDACTED}\""),
                &format!("url = {}", toml_string(u.expose())),
                1,
            );
        }
        if let Some(u) = listen {
            text = text.replacen(
                &format!("listen_url = \"{REDACTED}\""),
                &format!("listen_url = {}", toml_string(u.expose())),
                1,
            );
        }
        shown.database.url = None;
        text
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `postgres://user:secret@host/db` -> `postgres://user:<redacted>@host/db`; key=value strings
/// get `password=<redacted>`.
pub fn mask_url_password(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:{REDACTED}{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                format!("password={REDACTED}")
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An endpoint URL must be absolute http(s) with a host. (Whether its address is allowed is
/// decided at connect time by the SSRF guard, which sees the address actually used.)
pub fn validate_endpoint_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a valid URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("must include a host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials; use headers instead".into());
    }
    Ok(parsed)
}

/// Custom headers may not override what Postern itself sets (signature, identity, framing).
pub fn validate_custom_header(name: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    if reqwest::header::HeaderName::from_bytes(lower.as_bytes()).is_err() {
        return Err("not a valid header name".into());
    }
    const RESERVED: &[&str] = &[
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "transfer-encoding",
        "connection",
    ];
    if RESERVED.contains(&lower.as_str())
        || lower.starts_with("webhook-")
        || lower.starts_with("x-webhook-")
    {
        return Err("is set by Postern and cannot be overridden".into());
    }
    Ok(())
}

/// figment's path sometimes already ends with the offending field.
fn append_field(key: &mut String, field: &str) {
    if key == field || key.ends_with(&format!(".{field}")) {
        return;
    }
    if !key.is_empty() {
        key.push('.');
    }
    key.push_str(field);
}

/// Turns figment's error (which carries the key path) into `key: message`.
fn describe_figment_error(e: figment::Error) -> String {
    let mut key = String::new();
    for segment in &e.path {
        if let Ok(i) = segment.parse::<usize>() {
            key.push_str(&format!("[{i}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
    }
    let message = match &e.kind {
        figment::error::Kind::UnknownField(field, _) => {
            append_field(&mut key, field);
            "unknown key".to_string()
        }
        figment::error::Kind::MissingField(field) => {
            append_field(&mut key, field);
            "missing (required)".to_string()
        }
        kind => kind.to_string(),
    };
    if key.is_empty() {
        message
    } else {
        format!("{key}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [database]
        url = "postgres://postgres@127.0.0.1/postgres"
    "#;

    #[test]
    fn durations_and_sizes_round_trip() {
        for (text, ms) in [
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("10h", 36_000_000),
            ("7d", 604_800_000),
        ] {
            let d: Dur = text.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms);
            assert_eq!(d.to_string(), text);
        }
        assert!("soon".parse::<Dur>().is_err());
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("512KiB".parse::<ByteSize>().unwrap().to_string(), "512KiB");
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        assert!("1 parsec".parse::<ByteSize>().is_err());
    }

    #[test]
    fn defaults_fill_a_minimal_file() {
        let c = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.shutdown_grace.0, Duration::from_secs(25));
        assert_eq!(c.outbound.notify, NotifyMode::Throttled);
        assert_eq!(c.outbound.concurrency, 256);
        assert_eq!(c.database.schema, "postern");
        let policy = c.outbound.retry.policy().unwrap();
        assert_eq!(policy.max_attempts(), 8);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err =
            Config::from_toml_str(&format!("{MINIMAL}\n[outbound]\nconcurency = 3\n")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(
            err.problems[0].starts_with("outbound.concurency: unknown key"),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let toml = format!(
            r#"{MINIMAL}
            [outbound]
            per_endpoint_concurrency = 0
            [outbound.retry]
            schedule = ["1s"]
            max_attempts = 3
            [[endpoints]]
            id = "ok"
            url = "https://example.com/a"
            events = ["a.b"]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            [[endpoints]]
            id = "bad"
            url = "ftp://example.com"
            events = ["a..b"]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            "#
        );
        let err = Config::from_toml_str(&toml).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("outbound.per_endpoint_concurrency:"),
            "{text}"
        );
        assert!(text.contains("outbound.retry.schedule: excludes"), "{text}");
        assert!(
            text.contains("endpoints[1].url: scheme must be http or https"),
            "{text}"
        );
        assert!(text.contains("endpoints[1].events[0]:"), "{text}");
        assert!(!text.contains("endpoints[0]"), "{text}");
    }

    #[test]
    fn secrets_resolve_from_env_and_file_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        std::env::set_var("POSTERN_TEST_HEADER_SECRET", "hunter2");
        let toml = format!(
            r#"
            [database]
            url = "postgres://app:pw@127.0.0.1/app"
            [[endpoints]]
            id = "e"
            url = "https://example.com/a"
            events = ["*"]
            secret = "file:{}"
            headers = {{ "x-api-key" = "env:POSTERN_TEST_HEADER_SECRET" }}
            "#,
            file.display()
        );
        let c = Config::from_toml_str(&toml).unwrap();
        assert_eq!(
            c.endpoints[0].secret.expose(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        );
        assert_eq!(c.endpoints[0].headers["x-api-key"].expose(), "hunter2");
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("MfKQ9r8"), "{shown}");
        assert!(!shown.contains(":pw@"), "{shown}");
        assert!(
            shown.contains("postgres://app:<redacted>@127.0.0.1/app"),
            "{shown}"
        );
        assert!(format!("{c:?}").contains("<redacted>"));
        assert!(!format!("{c:?}").contains("hunter2"));

        let missing = toml.replace(
            "env:POSTERN_TEST_HEADER_SECRET",
            "env:POSTERN_TEST_NOT_SET_ANYWHERE",
        );
        let err = Config::from_toml_str(&missing).unwrap_err().to_string();
        assert!(err.contains("endpoints[0].headers.x-api-key"), "{err}");
        assert!(
            err.contains("POSTERN_TEST_NOT_SET_ANYWHERE is not set"),
            "{err}"
        );
    }

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            mask_url_password("postgres://u:p@h:5432/db?x=1"),
            "postgres://u:<redacted>@h:5432/db?x=1"
        );
        assert_eq!(mask_url_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            mask_url_password("host=h password=p user=u"),
            "host=h password=<redacted> user=u"
        );
    }
}
