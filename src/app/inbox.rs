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

/// The forwarder, when some inbox route is consumed by forwarding.
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
    if !forwarded {
        return Ok(None);
    }
    let settings = ForwardSettings {
        upstream: section.upstream.clone(),
        timeout: section.upstream_timeout.0,
        retry: RetryPolicy::from_config(&config.outbound.retry)
            .map_err(|e| anyhow::anyhow!(e.join("; ")))?,
        poll_interval: config.outbound.poll_interval.0,
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

/// Brings the open messages of every inbox route up to the route's `consume` setting.
pub async fn reconcile(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    schema: &Schema,
) -> anyhow::Result<()> {
    let Some(section) = &config.inbound else {
        return Ok(());
    };
    let routes: Vec<(String, &str)> = section
        .routes
        .iter()
        .filter(|r| inbound::is_inbox(r))
        .map(|r| (inbound::route_name(r), inbound::consume_of(r)))
        .collect();
    if routes.is_empty() {
        return Ok(());
    }
    let moved = InboxStore::new(pool.clone(), schema)
        .reconcile(schema, &routes)
        .await?;
    if moved > 0 {
        tracing::info!(
            messages = moved,
            "open inbox messages follow their route's new consume setting"
        );
    }
    Ok(())
}
