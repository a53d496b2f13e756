//! The `[database]` section: where Postgres is, the schema, TLS and the keys secrets are sealed
//! with. Values only; `crypto` and `db::tls` check what they use.

use serde::{Deserialize, Serialize};

use super::{defaults, Secret};

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
    /// Roles that take inbox messages with `inbox_take` / `inbox_done` (`consume = "sql"`); the
    /// publisher roles may too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumer_roles: Vec<String>,
    /// Connections in the pool for the API and start-up (the LISTEN connection, the prober's and
    /// the pipeline's five are extra).
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// Verify the server's TLS certificate and host name (libpq's verify-full) against the Mozilla
    /// roots. Whether to use TLS at all is the URL's `sslmode` (disable / prefer / require; with
    /// none, `prefer`, except on loopback: see [`tls_skipped`]).
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
    /// `database.url` reaches Postgres through pgbouncer, which refuses startup options: the
    /// session settings are applied with `SET` after connecting instead.
    #[serde(default)]
    pub pgbouncer: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            listen_url: None,
            schema: defaults::schema(),
            migrate_on_start: true,
            publisher_roles: Vec::new(),
            consumer_roles: Vec::new(),
            pool_size: defaults::pool_size(),
            tls_verify: false,
            ca_file: None,
            encryption_key: None,
            encryption_keys: Vec::new(),
            pgbouncer: false,
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

/// Whether a connection to `url` goes without TLS although the URL does not say `sslmode=disable`:
/// it names no `sslmode` and every host is on this machine (a loopback address, `localhost` or a
/// Unix socket). There libpq's default, `prefer`, protects nothing (it verifies nothing, falls back
/// to plain text when the server declines, and loopback traffic never leaves the host) and costs
/// every round trip an encryption on each side. A URL that names any `sslmode` is followed as
/// written.
pub fn tls_skipped(url: &str) -> bool {
    if url.contains("sslmode") {
        return false;
    }
    let Ok(pg) = url.parse::<tokio_postgres::Config>() else {
        return false;
    };
    let local = |host: &tokio_postgres::config::Host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => true,
    };
    let hosts = pg.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(local)
        && pg.get_hostaddrs().iter().all(|ip| ip.is_loopback())
}
