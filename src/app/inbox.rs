//! Wiring the inbox: the committers that store what the proxy verified, and the forwarder that
//! hands forward routes' messages to the app.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::db::{self, Schema};
use crate::delivery::retry::RetryPolicy;
use crate::inbound;
use crate::inbox::forward::{ForwardSettings, Forwarder};
use crate::inbox::store::InboxStore;
use crate::inbox::writer::{self, Queue};
use crate::telemetry::Metrics;

/// Starts the committers. They serve until the proxy drops its writer, or until `drain` after
/// shutdown begins, whichever comes first (what is still queued then is answered 503).
pub fn spawn_writer(
    config: &Config,
    queue: Queue,
    schema: &Schema,
    tls: &db::tls::Tls,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mode = db::SessionMode::from_config(&config.database);
    let pool = db::inbox_pool(config.database.url(), writer::COMMITTERS, tls, mode)?;
    let drain = drain_time(config);
    Ok(tokio::spawn(writer::run(
        queue,
        pool,
        schema.clone(),
        metrics,
        wake,
        shutdown,
        drain,
    )))
}

/// Names, in a warning, the open messages this config's routes do not account for (a route set
/// back to `mode = "forward"`, renamed, removed), and what becomes of them: those stored for
/// forwarding are still forwarded (the forwarder runs wherever `[inbound]` is); those left for
/// SQL consumers wait for `inbox_take` with the old route's name.
pub async fn left_over(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    schema: &Schema,
) -> anyhow::Result<()> {
    let routes = inbox_routes(config);
    let client = pool.get().await?;
    let rows = client
        .query(
            &schema.sql(
                "SELECT route, consume, count(*) FROM __SCHEMA__.inbox
                 WHERE status IN ('pending', 'delivering', 'taken') GROUP BY 1, 2",
            ),
            &[],
        )
        .await?;
    for r in &rows {
        let (route, consume, n): (&str, &str, i64) = (r.get(0), r.get(1), r.get(2));
        if routes.iter().any(|(name, _)| name == route) {
            continue;
        }
        match (consume, &config.inbound) {
            ("forward", Some(_)) => tracing::warn!(route, messages = n,
                "open inbox messages of a route that is no longer an inbox route here: still forwarded to inbound.upstream"),
            ("forward", None) => tracing::warn!(route, messages = n,
                "open inbox messages of a route that is no longer an inbox route here cannot be forwarded: there is no [inbound] section"),
            _ => tracing::warn!(route, messages = n,
                "open inbox messages of a route that is no longer an inbox route here wait for inbox_take with this route's name"),
        }
    }
    Ok(())
}

/// The forwarder, wherever `[inbound]` is (the app it forwards to): with no route forwarded
/// from the inbox it still looks, every [`UPKEEP_EVERY`], for messages stored for forwarding by
/// another config (a route since set back to `forward` mode, renamed or removed; an old replica
/// during a rolling update), so none is left acknowledged and never handled.
pub fn forwarder(
    config: &Config,
    pool: deadpool_postgres::Pool,
    schema: &Schema,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> anyhow::Result<Option<Forwarder>> {
    let Some(section) = &config.inbound else {
        return Ok(None);
    };
    let forwarded = section
        .routes
        .iter()
        .any(|r| inbound::is_inbox(r) && r.consume.as_deref() != Some("sql"));
    let settings = ForwardSettings {
        max_held: section.max_buffered.0,
        upstream: section.upstream.clone(),
        timeout: section.upstream_timeout.0,
        retry: RetryPolicy::from_config(&config.outbound.retry)
            .map_err(|e| anyhow::anyhow!(e.join("; ")))?,
        poll_interval: if forwarded {
            config.outbound.poll_interval.0
        } else {
            UPKEEP_EVERY
        },
        drain: drain_time(config),
    };
    let store = Arc::new(InboxStore::new(pool, schema));
    Forwarder::new(store, settings, Uuid::new_v4(), metrics, wake).map(Some)
}

/// What shutdown leaves the inbox: the grace, less time to write the last outcomes.
fn drain_time(config: &Config) -> Duration {
    let grace = config.shutdown_grace.0;
    grace.saturating_sub(Duration::from_secs(2).min(grace / 4))
}

/// The inbox routes and how each is consumed.
fn inbox_routes(config: &Config) -> Vec<(String, &str)> {
    let Some(section) = &config.inbound else {
        return Vec::new();
    };
    section
        .routes
        .iter()
        .filter(|r| inbound::is_inbox(r))
        .map(|r| (inbound::route_name(r), inbound::consume_of(r)))
        .collect()
}

/// How often every replica with inbox routes makes lapsed leases due again and brings pending
/// messages up to their route's `consume` setting.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Every replica with an inbox route, forwarding or not, keeps the inbox moving: a message a dead
/// forwarder held becomes due again when its lease lapses (for whatever consumes its route now),
/// and a message an old replica stored with its old `consume` during a rolling update follows
/// the setting. Without it such messages stay acknowledged and unhandled. It runs wherever
/// `[inbound]` is, inbox routes or not: messages another config stored may be left.
pub fn upkeep(
    config: &Config,
    pool: deadpool_postgres::Pool,
    schema: &Schema,
    cancel: CancellationToken,
) -> Option<impl std::future::Future<Output = ()>> {
    config.inbound.as_ref()?;
    let routes: Vec<(String, String)> = inbox_routes(config)
        .into_iter()
        .map(|(name, consume)| (name, consume.to_string()))
        .collect();
    let (store, schema) = (InboxStore::new(pool, schema), schema.clone());
    let max_lapses = config.outbound.max_lease_lapses as i32;
    Some(async move {
        let routes: Vec<(String, &str)> = routes
            .iter()
            .map(|(n, c)| (n.clone(), c.as_str()))
            .collect();
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match store.reap(max_lapses).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    messages = n,
                    "inbox leases lapsed; due again (or failed, past outbound.max_lease_lapses)"
                ),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "inbox reap failed"),
            }
            if routes.is_empty() {
                continue;
            }
            match store.reconcile(&schema, &routes, false).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    messages = n,
                    "pending inbox messages stored under another consume setting follow this one"
                ),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "inbox reconcile failed"),
            }
        }
    })
}

/// Brings the open messages of every inbox route up to the route's `consume` setting.
pub async fn reconcile(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    schema: &Schema,
) -> anyhow::Result<()> {
    let routes = inbox_routes(config);
    if routes.is_empty() {
        return Ok(());
    }
    let moved = InboxStore::new(pool.clone(), schema)
        .reconcile(schema, &routes, true)
        .await?;
    if moved > 0 {
        tracing::info!(
            messages = moved,
            "open inbox messages follow their route's new consume setting"
        );
    }
    Ok(())
}
