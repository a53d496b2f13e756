//! The database: the connection pool and the embedded versioned migrations (the notify trigger in
//! `notify`).
//! Invariant: every SQL text that names Postern's schema is built here from a validated schema
//! name, and migrations run one replica at a time under a transaction-scoped advisory lock (which
//! works through pgbouncer too).

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
mod notify;
#[cfg(test)]
pub(crate) mod scratch;
pub mod tls;
use tokio_util::sync::CancellationToken;

use crate::config::is_schema_name;
pub use notify::{install_notify, listens, NotifySetting, SPARSE_GAP};

/// Embedded migrations, applied in order; a version once released never changes.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("migrations/0001_init.sql")),
    (
        2,
        "no_row_triggers_on_hot_path",
        include_str!("migrations/0002_no_row_triggers_on_hot_path.sql"),
    ),
    (
        3,
        "hardening",
        include_str!("migrations/0003_hardening.sql"),
    ),
    (4, "ordering", include_str!("migrations/0004_ordering.sql")),
    (5, "flow", include_str!("migrations/0005_flow.sql")),
    (6, "inbox", include_str!("migrations/0006_inbox.sql")),
    (
        7,
        "attempt_headers",
        include_str!("migrations/0007_attempt_headers.sql"),
    ),
    (
        8,
        "notify_mark",
        include_str!("migrations/0008_notify_mark.sql"),
    ),
    (
        9,
        "endpoints_version",
        include_str!("migrations/0009_endpoints_version.sql"),
    ),
    (
        10,
        "finished_by_class",
        include_str!("migrations/0010_finished_by_class.sql"),
    ),
    (
        11,
        "inbox_lapses",
        include_str!("migrations/0011_inbox_lapses.sql"),
    ),
];

/// The schema version this binary needs.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// A validated schema name, the only way SQL text gets one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema(String);

impl Schema {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(is_schema_name(name), "invalid schema name {name:?}");
        Ok(Self(name.to_string()))
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// The NOTIFY channel: `postern_outbox` for the default schema.
    pub fn channel(&self) -> String {
        format!("{}_outbox", self.0)
    }

    /// The channel endpoint changes are announced on (`stop:<id>`, `resume:<id>`, `revoke:<id>`),
    /// so every replica stops sending at once, not after its held deliveries are spent.
    pub fn endpoints_channel(&self) -> String {
        format!("{}_endpoints", self.0)
    }

    /// The advisory lock fan-out passes and the sweeper hold shared and endpoint changes hold
    /// exclusively (see `endpoints::exclude_fan_out`).
    pub fn fan_out_lock_key(&self) -> String {
        format!("postern.fanout.{}", self.0)
    }

    /// Replaces `__SCHEMA__` in a SQL text.
    pub fn sql(&self, text: &str) -> String {
        text.replace("__SCHEMA__", &self.0)
    }
}

/// Bounds on every Postern session, so a frozen or partitioned replica cannot hold row locks or
/// advisory locks for long: a transaction left idle is ended by the server, a statement runs at
/// most this long (migrations lift it for their own transaction), and a dead peer is noticed by
/// TCP keepalives and the user timeout within about a minute rather than the kernel's two hours.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("idle_in_transaction_session_timeout", "60s"),
    ("statement_timeout", "30s"),
];

/// How session settings reach the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SessionMode {
    /// As startup options (`-c name=value`): applied before the first statement, no round trip.
    #[default]
    Startup,
    /// With `SET` after connecting, for a pooler that refuses startup options (pgbouncer).
    Set,
}

impl SessionMode {
    pub fn from_config(db: &crate::config::DatabaseConfig) -> Self {
        if db.pgbouncer {
            SessionMode::Set
        } else {
            SessionMode::Startup
        }
    }
}

/// Parses a connection string as every connection of Postern reads it: as libpq would, except
/// that a database on this machine named with no `sslmode` is reached without TLS
/// ([`crate::config::tls_skipped`]).
pub fn parse_url(url: &str) -> anyhow::Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config = url.parse()?;
    if crate::config::tls_skipped(url) {
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    Ok(pg)
}

/// Prepares a connection config: the TCP keepalives, and `settings` as startup options (in
/// `Startup` mode). Returns the `SET` statements to run after connecting (in `Set` mode).
pub fn bound_session(
    pg: &mut tokio_postgres::Config,
    settings: &[(&str, &str)],
    mode: SessionMode,
) -> String {
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(60));
    match mode {
        SessionMode::Startup => {
            let ours: Vec<String> = settings
                .iter()
                .map(|(k, v)| format!("-c {k}={v}"))
                .collect();
            let options = match pg.get_options() {
                Some(existing) => format!("{existing} {}", ours.join(" ")),
                None => ours.join(" "),
            };
            pg.options(&options);
            String::new()
        }
        SessionMode::Set => settings
            .iter()
            .map(|(k, v)| format!("SET {k} = '{v}';"))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Takes the schema's migration lock until `tx` ends: migrations, the notify trigger and the
/// payload limit change the schema one replica at a time.
async fn take_migration_lock(
    tx: &impl deadpool_postgres::GenericClient,
    schema: &Schema,
) -> anyhow::Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("postern.migrate.{}", schema.name())],
    )
    .await?;
    Ok(())
}

/// Records `key = value` in the schema's settings table, replacing an earlier value.
pub async fn put_setting(
    tx: &impl deadpool_postgres::GenericClient,
    schema: &Schema,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    tx.execute(
        &schema.sql(
            "INSERT INTO __SCHEMA__.settings (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        ),
        &[&key, &value],
    )
    .await?;
    Ok(())
}

/// Builds the pool. Connections are made lazily, so this does not touch the network.
pub fn pool(url: &str, size: usize, tls: &tls::Tls) -> anyhow::Result<Pool> {
    pool_with(url, size, tls, SessionMode::Startup)
}

/// [`pool`], with the session settings applied as `mode` says.
pub fn pool_with(
    url: &str,
    size: usize,
    tls: &tls::Tls,
    mode: SessionMode,
) -> anyhow::Result<Pool> {
    let mut pg = parse_url(url).context("database.url")?;
    let set = bound_session(&mut pg, SESSION_SETTINGS, mode);
    build_pool(pg, size, tls, set)
}

/// The inbox writer's pool: its commits are the inbox's promise to a provider, so they wait for
/// the WAL flush (`synchronous_commit = on`, whatever the server's default).
pub fn inbox_pool(
    url: &str,
    size: usize,
    tls: &tls::Tls,
    mode: SessionMode,
) -> anyhow::Result<Pool> {
    let mut pg = parse_url(url).context("database.url")?;
    let settings: Vec<(&str, &str)> = SESSION_SETTINGS
        .iter()
        .copied()
        .chain([("synchronous_commit", "on")])
        .collect();
    let set = bound_session(&mut pg, &settings, mode);
    if pg.get_application_name().is_none() {
        pg.application_name("postern-inbox");
    }
    build_pool(pg, size, tls, set)
}

/// Connections the delivery pipeline keeps (two fan-out loops, claims, outcomes, housekeeping).
pub const PIPELINE_CONNECTIONS: usize = 5;

/// The pipeline's own pool, whose sessions commit with `synchronous_commit = off`. Everything
/// the pipeline writes can be derived again from rows the app committed durably: if the database
/// crashes before flushing a fan-out or an outcome, the event is fanned out again or the lease
/// lapses and the attempt is made again (at-least-once, as after any crash), never lost. In
/// return, its commits do not queue for the WAL flush behind the app's own commits. The API's
/// writes (endpoints, secrets) use the ordinary pool and stay durable on return.
///
/// Its sessions also plan every statement for the tables as they are now: a generic plan cached
/// while the outbox or deliveries were small (a fresh install, or an outbox retention keeps nearly
/// empty) kept sequential scans as a backlog grew, until autovacuum's next analyze. And they use
/// no bitmap scans: the pipeline's statements take a few rows in index order or by key, and the
/// planner, estimating few matching rows, picked bitmap scans that visit every entry of a partial
/// index (the undispatched events, the leased deliveries), dead ones included, and, unlike an index
/// scan, never mark dead entries so that the next scan skips them.
pub fn pipeline_pool(url: &str, tls: &tls::Tls) -> anyhow::Result<Pool> {
    pipeline_pool_with(url, tls, SessionMode::Startup)
}

/// [`pipeline_pool`], with the session settings applied as `mode` says.
pub fn pipeline_pool_with(url: &str, tls: &tls::Tls, mode: SessionMode) -> anyhow::Result<Pool> {
    let mut pg = parse_url(url).context("database.url")?;
    let set = bound_session(&mut pg, &pipeline_settings(mode), mode);
    if pg.get_application_name().is_none() {
        pg.application_name("postern-pipeline");
    }
    build_pool(pg, PIPELINE_CONNECTIONS, tls, set)
}

/// The pipeline's session settings. Its own commits need no flush to disk (a fan-out or an
/// outcome lost in a crash is done again: at-least-once), except behind a pooler (`Set` mode):
/// there a session `SET` can land on a server connection that the app's transactions use next
/// (pgbouncer's transaction mode), and `synchronous_commit = off` would make the app's commits,
/// its events among them, lose their durability. The rest can cost the app time, never data (the
/// README says to give Postern a role of its own there, so it has a pool of its own).
fn pipeline_settings(mode: SessionMode) -> Vec<(&'static str, &'static str)> {
    let durable_enough = (mode == SessionMode::Startup).then_some(("synchronous_commit", "off"));
    SESSION_SETTINGS
        .iter()
        .copied()
        .chain(durable_enough)
        .chain([
            ("plan_cache_mode", "force_custom_plan"),
            ("enable_bitmapscan", "off"),
        ])
        .collect()
}

/// `set`: statements each new connection runs first (the session settings in `Set` mode).
fn build_pool(
    pg: tokio_postgres::Config,
    size: usize,
    tls: &tls::Tls,
    set: String,
) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        pg,
        tls.clone(),
        ManagerConfig {
            // A connection the server closed (restart, pg_terminate_backend) is dropped on
            // return and replaced, without a query per checkout.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let mut builder = Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)));
    if !set.is_empty() {
        let set = std::sync::Arc::new(set);
        builder = builder.post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
            let set = set.clone();
            Box::pin(async move {
                client
                    .batch_execute(&set)
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)
            })
        }));
    }
    builder.build().context("building the connection pool")
}

/// Waits until the database answers, retrying with capped exponential backoff, logging each
/// failure. Returns `None` when cancelled first.
pub async fn wait_until_reachable(pool: &Pool, cancel: &CancellationToken) -> Option<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        match pool.get().await {
            Ok(client) => match client.simple_query("SELECT 1").await {
                Ok(_) => return Some(()),
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::error_chain(&e), "database not ready; retrying")
                }
            },
            Err(e) => {
                tracing::warn!(
                    error = %crate::telemetry::error_chain(&e),
                    retry_in_ms = delay.as_millis() as u64,
                    "database unreachable; retrying"
                )
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Whether `e` is the database's passing state rather than anything about the request: a
/// connection lost or refused, a server shutting down or starting, a read-only server (a replica
/// being promoted), too many connections, a lock or statement timeout, a serialization failure.
pub fn is_transient(e: &anyhow::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.chain().any(|cause| {
        if cause
            .downcast_ref::<deadpool_postgres::PoolError>()
            .is_some()
        {
            return true;
        }
        let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() else {
            return false;
        };
        let Some(code) = pg.code() else {
            // No SQLSTATE: transient if the connection itself failed or closed (not, say, a
            // value this side could not encode).
            let io = std::error::Error::source(pg).is_some_and(|s| s.is::<std::io::Error>());
            return pg.is_closed() || io;
        };
        code.code().starts_with("08")
            || [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::READ_ONLY_SQL_TRANSACTION,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::LOCK_NOT_AVAILABLE,
                SqlState::QUERY_CANCELED,
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
            ]
            .contains(code)
    })
}

/// Applies every missing migration and the grants for the publisher and consumer roles, in one
/// transaction. Returns the versions applied.
pub async fn migrate(
    pool: &Pool,
    schema: &Schema,
    publisher_roles: &[String],
    consumer_roles: &[String],
) -> anyhow::Result<Vec<i32>> {
    let mut client = pool.get().await.context("connecting for migration")?;
    let tx = client.transaction().await?;
    // A migration may take longer than the sessions' statement bound.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    // Replicas starting together take turns here; the lock ends with the transaction.
    take_migration_lock(&tx, schema).await?;
    tx.batch_execute(&schema.sql(
        "CREATE SCHEMA IF NOT EXISTS __SCHEMA__;
         CREATE TABLE IF NOT EXISTS __SCHEMA__.schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    ))
    .await
    .context("creating the schema")?;
    let done: Vec<i32> = tx
        .query(
            &schema.sql("SELECT version FROM __SCHEMA__.schema_migrations"),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, text) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(&schema.sql(text))
            .await
            .with_context(|| format!("applying migration {version} ({name})"))?;
        tx.execute(
            &schema.sql("INSERT INTO __SCHEMA__.schema_migrations (version, name) VALUES ($1, $2)"),
            &[version, name],
        )
        .await?;
        applied.push(*version);
    }
    for role in publisher_roles {
        // Role names were validated as plain identifiers; quote them anyway.
        let grant = schema.sql(&format!(
            "GRANT USAGE ON SCHEMA __SCHEMA__ TO \"{role}\";
             REVOKE INSERT ON __SCHEMA__.outbox FROM \"{role}\";
             GRANT INSERT (event_id, event_type, payload, tenant, ordering_key, target_endpoint, metadata)
                 ON __SCHEMA__.outbox TO \"{role}\";
             GRANT SELECT (event_id) ON __SCHEMA__.outbox TO \"{role}\";
             GRANT EXECUTE ON FUNCTION __SCHEMA__.publish(text, jsonb, text, text, text, jsonb) TO \"{role}\";
             GRANT USAGE, SELECT, UPDATE ON SEQUENCE __SCHEMA__.notify_clock, __SCHEMA__.notify_mark, __SCHEMA__.notify_mark_at TO \"{role}\";
             GRANT SELECT ON SEQUENCE __SCHEMA__.outbox_id_seq TO \"{role}\";"
        ));
        tx.batch_execute(&grant)
            .await
            .with_context(|| format!("granting publish rights to role {role}"))?;
    }
    // Taking inbox messages: the three functions (which run with the owner's rights) and nothing
    // else of the inbox.
    for role in publisher_roles.iter().chain(consumer_roles) {
        let grant = schema.sql(&format!(
            "GRANT USAGE ON SCHEMA __SCHEMA__ TO \"{role}\";
             GRANT EXECUTE ON FUNCTION __SCHEMA__.inbox_take(text, integer, interval) TO \"{role}\";
             GRANT EXECUTE ON FUNCTION __SCHEMA__.inbox_done(bigint, integer) TO \"{role}\";
             GRANT EXECUTE ON FUNCTION __SCHEMA__.inbox_fail(bigint, text, integer) TO \"{role}\";"
        ));
        tx.batch_execute(&grant)
            .await
            .with_context(|| format!("granting inbox rights to role {role}"))?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// The highest migration applied, or `None` when the schema does not exist yet.
pub async fn schema_version(
    client: &tokio_postgres::Client,
    schema: &Schema,
) -> anyhow::Result<Option<i32>> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.schema_migrations", schema.name())],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_one(
            &schema.sql("SELECT max(version) FROM __SCHEMA__.schema_migrations"),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The outbox's payload limit, named so the app's error says what it broke: an INSERT over it
/// fails inside the app's transaction with `violates check constraint
/// "payload_exceeds_outbound_max_payload_of_<N>_bytes"`. The limit is the payload's JSON text,
/// which is what receivers get inside the envelope.
fn payload_constraint(max_payload: u64) -> String {
    format!("payload_exceeds_outbound_max_payload_of_{max_payload}_bytes")
}

/// Puts `outbound.max_payload` into the outbox table (a CHECK constraint, NOT VALID so existing
/// rows are not scanned), replacing a different limit. Returns the limit it replaced, if any.
/// It checks rows not yet dispatched only: a CHECK applies to every new row version, and the
/// fan-out's own UPDATE of an older row over a lowered limit must not fail (that row fails at
/// delivery instead, with the reason).
/// The ALTER waits at most 2 s for its lock, so the app's inserts never queue behind it for
/// long; a limit that could not be installed is retried at the next start.
pub async fn install_payload_limit(
    pool: &Pool,
    schema: &Schema,
    max_payload: u64,
) -> anyhow::Result<Option<String>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL lock_timeout = '2s'").await?;
    take_migration_lock(&tx, schema).await?;
    let wanted = payload_constraint(max_payload);
    let existing: Vec<String> = tx
        .query(
            "SELECT conname::text FROM pg_constraint
             WHERE conrelid = to_regclass($1) AND conname LIKE 'payload\\_exceeds\\_%'",
            &[&format!("{}.outbox", schema.name())],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if existing.len() == 1 && existing[0] == wanted {
        return Ok(None);
    }
    let mut alter: Vec<String> = existing
        .iter()
        .map(|c| format!("DROP CONSTRAINT {c}"))
        .collect();
    alter.push(format!(
        "ADD CONSTRAINT {wanted} CHECK (dispatched_at IS NOT NULL OR octet_length(payload::text) <= {max_payload}) NOT VALID"
    ));
    tx.batch_execute(&schema.sql(&format!(
        "ALTER TABLE __SCHEMA__.outbox {}",
        alter.join(", ")
    )))
    .await
    .context("installing outbound.max_payload in the outbox table")?;
    tx.commit().await?;
    Ok(existing.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Behind a pooler a session `SET` may outlive Postern's use of a server connection and reach
    /// the app's transactions: `synchronous_commit = off` there would make the app's own commits
    /// (its events among them) lose their durability. Only a direct connection gets it.
    #[test]
    fn behind_a_pooler_the_pipeline_never_turns_off_synchronous_commit() {
        let has = |mode| {
            pipeline_settings(mode)
                .iter()
                .any(|(k, _)| *k == "synchronous_commit")
        };
        assert!(has(SessionMode::Startup));
        assert!(!has(SessionMode::Set));
        let mut pg = parse_url("postgres://postern@127.0.0.1/app").unwrap();
        let set = bound_session(
            &mut pg,
            &pipeline_settings(SessionMode::Set),
            SessionMode::Set,
        );
        assert!(!set.contains("synchronous_commit"), "{set}");
        assert!(set.contains("statement_timeout"), "{set}");
    }
}
