//! The process's own view of the database, each on a connection of its own: readiness (the
//! database answers, the schema is new enough) and the backlog gauges. A slow count never flips
//! readiness, and a saturated pool never makes the process look dead.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::api::admin::Health;
use crate::db::{self, Schema};
use crate::telemetry::Metrics;

/// Keeps `Health` current, on a connection of its own so a saturated pool never makes the process
/// look dead. Readiness asks only what the pod needs (the database answers, the schema is new
/// enough); the backlog gauges are counted by [`gauge_loop`] on another connection, so a slow count
/// can never flip readiness.
#[allow(clippy::too_many_arguments)]
pub(super) async fn probe_loop(
    tls: db::tls::Tls,
    mode: db::SessionMode,
    url: String,
    schema: Schema,
    pool: Pool,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = pool.status();
        metrics
            .db_pool_in_use
            .set((status.size - status.available.min(status.size)) as i64);
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect_probe(&url, &tls, mode, "postern-probe").await;
        }
        let Some(c) = &client else {
            health.database.store(false, Relaxed);
            continue;
        };
        let probe = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            db::schema_version(c, &schema),
        )
        .await;
        match probe {
            Ok(Ok(version)) => {
                health.database.store(true, Relaxed);
                health
                    .schema
                    .store(version.is_some_and(|v| v >= db::SCHEMA_VERSION), Relaxed);
            }
            _ => {
                health.database.store(false, Relaxed);
                client = None;
            }
        }
    }
}

/// Counting stops here: past it the gauges read this many (a backlog this deep is an alert
/// already, and counting further would cost the database more with every row).
const GAUGE_COUNT_CAP: i64 = 100_000;

/// Keeps the backlog gauges current every few seconds on a connection of its own, each query under
/// a `statement_timeout`: the counts walk partial indexes and stop at [`GAUGE_COUNT_CAP`], and the
/// oldest due delivery is one index probe per endpoint. A failure leaves the gauges as they were.
pub(super) async fn gauge_loop(
    tls: db::tls::Tls,
    mode: db::SessionMode,
    url: String,
    schema: Schema,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let gauges = schema.sql(&format!(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM __SCHEMA__.deliveries
                  WHERE status = 'pending' AND next_attempt_at <= now() LIMIT {GAUGE_COUNT_CAP}) d),
                (SELECT COALESCE(extract(epoch FROM now() - min(first.at)), 0)::float8
                   FROM __SCHEMA__.endpoints e CROSS JOIN LATERAL (
                     SELECT d.next_attempt_at AS at FROM __SCHEMA__.deliveries d
                     WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at <= now()
                     ORDER BY d.next_attempt_at LIMIT 1) first),
                (SELECT count(*) FROM __SCHEMA__.endpoints WHERE NOT active AND deleted_at IS NULL),
                (SELECT count(*) FROM (SELECT 1 FROM __SCHEMA__.outbox
                  WHERE dispatched_at IS NULL LIMIT {GAUGE_COUNT_CAP}) o),
                (SELECT count(*) FROM (SELECT 1 FROM __SCHEMA__.ordering_keys k
                  JOIN __SCHEMA__.deliveries d ON d.id = k.blocked_by
                  WHERE d.status = 'failed' LIMIT {GAUGE_COUNT_CAP}) k),
                (SELECT count(*) FROM __SCHEMA__.endpoint_flow f JOIN __SCHEMA__.endpoints e ON e.id = f.endpoint_id
                  WHERE f.opened_at IS NOT NULL AND e.deleted_at IS NULL)"
    ));
    let inbox = schema.sql(&format!(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM __SCHEMA__.inbox
                  WHERE status IN ('pending', 'delivering', 'taken') LIMIT {GAUGE_COUNT_CAP}) m),
                COALESCE((SELECT extract(epoch FROM now() - received_at)::float8
                   FROM __SCHEMA__.inbox WHERE id = (SELECT min(id) FROM __SCHEMA__.inbox
                                                    WHERE status IN ('pending', 'delivering', 'taken'))), 0)"
    ));
    let mut client: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect_probe(&url, &tls, mode, "postern-gauges").await;
        }
        let Some(c) = &client else { continue };
        match bounded(c, &gauges).await {
            Ok(row) => {
                metrics.deliveries_due.set(row.get(0));
                metrics.oldest_due_seconds.set(row.get(1));
                metrics.endpoints_inactive.set(row.get(2));
                metrics.outbox_undispatched.set(row.get(3));
                metrics.ordering_keys_blocked.set(row.get(4));
                metrics.circuit_open.set(row.get(5));
            }
            // Before the schema exists, or a count that ran out of time: try again next tick.
            Err(e) => {
                tracing::debug!(error = %crate::telemetry::error_chain(&e), "gauges not updated")
            }
        }
        if let Ok(row) = bounded(c, &inbox).await {
            metrics.inbox_pending.set(row.get(0));
            metrics.inbox_oldest_pending.set(row.get(1));
        }
    }
}

/// One row of `sql`, given at most 2 s. The bound is the transaction's own (`SET LOCAL`), never
/// the session's: behind a transaction pooler a session `SET` would outlive this connection's use
/// of the server connection and cut the app's statements short.
async fn bounded(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    // Prepared first: a query given as text is parsed in a round trip of its own, and would
    // run after the COMMIT below, outside the transaction and its bound.
    let stmt = c.prepare(sql).await?;
    let (begun, row, ended) = tokio::join!(
        c.batch_execute("BEGIN; SET LOCAL statement_timeout = '2s'"),
        c.query_one(&stmt, &[]),
        // After a failed statement, COMMIT rolls back.
        c.batch_execute("COMMIT"),
    );
    begun?;
    let row = row?;
    ended?;
    Ok(row)
}

async fn connect_probe(
    url: &str,
    tls: &db::tls::Tls,
    mode: db::SessionMode,
    name: &str,
) -> Option<tokio_postgres::Client> {
    let mut config = db::parse_url(url).ok()?;
    config
        .application_name(name)
        .connect_timeout(std::time::Duration::from_secs(2));
    let set = db::bound_session(&mut config, db::SESSION_SETTINGS, mode);
    let (client, connection) = config.connect(tls.clone()).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    if !set.is_empty() {
        client.batch_execute(&set).await.ok()?;
    }
    Some(client)
}
