//! Configuration: built-in defaults, then the TOML file, then `POSTERN__SECTION__KEY` environment
//! variables, parsed into typed values, one file per section. Invariant: config holds values and
//! checks only what needs no other module (ranges, required keys, identifiers); each module
//! validates its own section (`crate::checks` asks them all), so config imports nothing above it.
//! Every secret in it is resolved, and nothing here ever prints a secret (they serialize as
//! `"<redacted>"`).

mod database;
mod endpoints;
mod env;
mod errors;
mod flow;
mod inbound;
mod operations;
mod outbound;
mod values;

use errors::{describe_figment_error, toml_syntax};

pub use database::{tls_skipped, DatabaseConfig};
pub use endpoints::{EndpointConfig, SignatureScheme};
pub use flow::{breaker_defaults, BreakerConfig, RateLimit};
pub use inbound::{InboundConfig, RespondWith, RouteConfig};
pub use operations::{AdminConfig, ApiConfig, LogConfig, LogFormat};
pub use outbound::{
    NotifyMode, OnFailure, OrderingConfig, OutboundConfig, RetentionConfig, RetryConfig,
};
use values::toml_string;
pub use values::{mask_url_password, ByteSize, Dur, Secret, REDACTED};

use std::path::Path;
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

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

pub(crate) mod defaults {
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
    pub fn respond_status() -> u16 {
        200
    }
    pub fn respond_content_type() -> String {
        "application/json".into()
    }
    pub fn retention_inbox() -> Dur {
        Dur(Duration::from_secs(7 * 86_400))
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
pub(crate) fn is_identifier(s: &str, extra: &[char]) -> bool {
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
        let config = Self::parse(file)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document (plus the environment layer), as `load` does for a file.
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_toml_str(toml)?;
        config.validate()?;
        Ok(config)
    }

    /// The layers parsed into values, not yet validated (`crate::checks` validates it whole).
    pub fn parse(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            let name = path.display();
            if !path.exists() {
                return Err(ConfigError::one(format!("config file {name}: not found")));
            }
            let bytes = std::fs::read(path).map_err(|e| {
                ConfigError::one(format!("config file {name}: cannot read it ({e})"))
            })?;
            let text = String::from_utf8(bytes)
                .map_err(|_| ConfigError::one(format!("config file {name}: not UTF-8 text")))?;
            toml_syntax(&text).map_err(|e| ConfigError::one(format!("config file {name}: {e}")))?;
            figment = figment.merge(Toml::string(&text));
        }
        let (variables, secrets) = env::layer();
        figment = figment.merge(variables).merge(secrets);
        Self::from_figment(figment)
    }

    /// A TOML document (plus the environment layer) parsed, not yet validated.
    pub fn parse_toml_str(toml: &str) -> Result<Self, ConfigError> {
        toml_syntax(toml).map_err(ConfigError::one)?;
        let (variables, secrets) = env::layer();
        let figment = Figment::new()
            .merge(Toml::string(toml))
            .merge(variables)
            .merge(secrets);
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
        Ok(config)
    }

    /// Checks everything serde cannot that needs no other module; every problem is reported, not
    /// only the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = self.listener_clashes();
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
        let verify = self.database.tls_verify || self.database.ca_file.is_some();
        let listen_url = self.database.listen_url.as_ref().map(Secret::expose);
        for (key, url) in [
            ("url", Some(self.database.url())),
            ("listen_url", listen_url),
        ] {
            if verify && url.is_some_and(tls_skipped) {
                p.push(format!(
                    "database.{key}: names a database on this machine and no sslmode, so Postern would not use TLS, but tls_verify or ca_file asks for a verified certificate: add sslmode=require to the URL (or drop the verification)"
                ));
            }
        }
        if !is_schema_name(&self.database.schema) {
            p.push(format!(
                "database.schema: {:?} must be a lower-case identifier (a-z, 0-9, _), at most 48 characters",
                self.database.schema
            ));
        }
        for (key, roles) in [
            ("publisher_roles", &self.database.publisher_roles),
            ("consumer_roles", &self.database.consumer_roles),
        ] {
            for (i, role) in roles.iter().enumerate() {
                if !is_identifier(role, &[]) {
                    p.push(format!(
                        "database.{key}[{i}]: {role:?} is not a plain role name"
                    ));
                }
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
        if r.inbox.0 < Duration::from_secs(60) {
            p.push("retention.inbox: must be at least 1m".into());
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
            if e.events.is_empty() {
                p.push(format!(
                    "{key}.events: must list at least one event type or pattern"
                ));
            }
            if let Some(t) = &e.tenant {
                if t != "*" && !is_identifier(t, &['.', ':']) {
                    p.push(format!(
                        "{key}.tenant: {t:?} must be \"*\" or 1-128 characters of a-z, A-Z, 0-9, _ - . :"
                    ));
                }
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
                // Sent as `Authorization: Bearer <token>`, whose value loses leading and trailing
                // whitespace and cannot carry control characters: such a token never matches.
                let v = t.expose();
                if !v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) || v.trim() != v {
                    p.push(format!(
                        "api.tokens[{i}]: must be printable ASCII, without control characters or leading or trailing spaces (a client could never send it)"
                    ));
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
        let everywhere = |nets: &[ipnet::IpNet]| nets.iter().any(|n| n.prefix_len() == 0);
        if everywhere(&self.outbound.allow_private_networks) {
            w.push("outbound.allow_private_networks: allows every address, so the SSRF guard is off: an endpoint URL can reach this pod's network, its cloud metadata service and the database".into());
        }
        if let Some(inbound) = &self.inbound {
            if everywhere(&inbound.trust_forwarded_for) {
                w.push("inbound.trust_forwarded_for: trusts every sender's X-Forwarded-For, so any sender can claim an address allowed by a route's allow_ips".into());
            }
        }
        w
    }

    /// The listeners that would take the same port (`admin`, `api`, `inbound`): found at load,
    /// not when the second bind fails after the pipeline started.
    fn listener_clashes(&self) -> Vec<String> {
        let listeners: Vec<(&str, std::net::SocketAddr)> = [
            (
                "admin.listen",
                self.admin.as_ref().map(|a| a.listen.as_str()),
            ),
            ("api.listen", self.api.as_ref().map(|a| a.listen.as_str())),
            (
                "inbound.listen",
                self.inbound.as_ref().map(|i| i.listen.as_str()),
            ),
        ]
        .into_iter()
        .filter_map(|(key, listen)| Some((key, listen?.parse().ok()?)))
        .collect();
        let mut p = Vec::new();
        for (i, (key, a)) in listeners.iter().enumerate() {
            for (other, b) in &listeners[..i] {
                let same_host =
                    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
                if a.port() != 0 && a.port() == b.port() && same_host {
                    p.push(format!("{key}: {a} takes the port of {other} ({b})"));
                }
            }
        }
        p
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

#[cfg(test)]
mod tests;
