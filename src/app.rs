//! The process: connects, prepares the schema, starts every task under one cancellation tree and
//! drains them on shutdown. Invariant: one token reaches every task; when it is cancelled nothing
//! new is claimed, in-flight attempts finish or are handed back, and `run` returns only after
//! every outcome is written (the caller bounds the whole by `shutdown_grace`).

use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::db::{self, NotifySetting, Schema};
use crate::delivery::client::WebhookClient;
use crate::delivery::ssrf::Guard;
use crate::delivery::store::DeliveryStore;
use crate::delivery::{Worker, WorkerSettings};
use crate::endpoints;
use crate::outbox::dispatcher::Dispatcher;
use crate::outbox::{self, Signals};
use crate::retention::{self, Retention};

/// Runs the sidecar until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let schema = Schema::new(&config.database.schema)?;
    let pool = db::pool(config.database.url(), config.database.pool_size)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        database = %crate::config::mask_url_password(config.database.url()),
        schema = schema.name(),
        "postern starting"
    );
    if db::wait_until_reachable(&pool, &shutdown).await.is_none() {
        return Ok(());
    }
    prepare(&config, &pool, &schema).await?;
    let tasks = start(&config, pool, &schema, shutdown.clone())?;
    tracing::info!("postern running");
    shutdown.cancelled().await;
    tracing::info!("shutting down: no new claims; draining in-flight deliveries");
    join_all(tasks).await;
    tracing::info!("postern stopped");
    Ok(())
}

/// Migrations (or a version check), the notify trigger and the config endpoints.
pub async fn prepare(config: &Config, pool: &Pool, schema: &Schema) -> anyhow::Result<()> {
    if config.database.migrate_on_start {
        let applied = db::migrate(pool, schema, &config.database.publisher_roles).await?;
        if !applied.is_empty() {
            tracing::info!(versions = ?applied, "schema migrated");
        }
    } else {
        let client = pool.get().await?;
        let version = db::schema_version(&client, schema).await?;
        anyhow::ensure!(
            version.is_some_and(|v| v >= db::SCHEMA_VERSION),
            "schema {} is at version {:?} but this binary needs {}; run `postern migrate` (or set database.migrate_on_start = true)",
            schema.name(),
            version,
            db::SCHEMA_VERSION
        );
    }
    let wanted = NotifySetting::from_config(config);
    if let Some(installed) = db::install_notify(pool, schema, &wanted, false).await? {
        tracing::warn!(
            configured = %format!("{}:{}ms", wanted.mode, wanted.throttle_ms),
            installed = %format!("{}:{}ms", installed.mode, installed.throttle_ms),
            "outbound.notify differs from the trigger installed in the database; keeping the installed one (run `postern migrate` to change it)"
        );
    }
    endpoints::sync_config_endpoints(pool, schema, &config.endpoints)
        .await
        .context("syncing the config file's endpoints")?;
    Ok(())
}

/// Spawns the pipeline's tasks; each stops when `shutdown` is cancelled.
pub fn start(
    config: &Config,
    pool: Pool,
    schema: &Schema,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinSet<()>> {
    let o = &config.outbound;
    let signals = Arc::new(Signals::default());
    let mut tasks = JoinSet::new();
    let owner = Uuid::new_v4();

    if db::listens(o.notify) {
        tasks.spawn(outbox::listen(
            config.database.listen_url().to_string(),
            schema.channel(),
            signals.clone(),
            shutdown.child_token(),
        ));
    }
    let dispatcher = Dispatcher::new(pool.clone(), schema, o.dispatch_batch);
    tasks.spawn(outbox::dispatch_loop(
        dispatcher,
        signals.clone(),
        o.poll_interval.0,
        o.notify_throttle.0,
        shutdown.child_token(),
    ));

    let store = Arc::new(DeliveryStore::new(pool.clone(), schema));
    let client = WebhookClient::new(
        Guard::new(o.allow_private_networks.clone()),
        o.request_timeout.0,
        o.per_endpoint_concurrency,
    )?;
    let worker = Worker::new(
        store.clone(),
        client,
        WorkerSettings::from_config(config),
        owner,
        signals.deliveries_ready.clone(),
    );
    tasks.spawn(worker.run(shutdown.child_token()));

    let retention = Retention::new(
        pool,
        schema,
        config.retention.delivered.0,
        config.retention.failed.0,
    );
    tasks.spawn(retention::housekeeping_loop(
        store,
        retention,
        o.poll_interval.0,
        config.retention.interval.0,
        signals.deliveries_ready.clone(),
        shutdown.child_token(),
    ));
    tracing::info!(replica = %owner, notify = o.notify.as_str(), "pipeline started");
    Ok(tasks)
}

async fn join_all(mut tasks: JoinSet<()>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            tracing::error!(error = %e, "a pipeline task failed");
        }
    }
}

/// `postern migrate`: waits for the database, applies migrations and grants, and installs the
/// configured notify trigger (replacing whatever mode was installed).
pub async fn migrate(config: &Config) -> anyhow::Result<Vec<i32>> {
    let schema = Schema::new(&config.database.schema)?;
    let pool = db::pool(config.database.url(), config.database.pool_size)?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    db::wait_until_reachable(&pool, &cancel)
        .await
        .context("interrupted while waiting for the database")?;
    let applied = db::migrate(&pool, &schema, &config.database.publisher_roles).await?;
    db::install_notify(&pool, &schema, &NotifySetting::from_config(config), true).await?;
    Ok(applied)
}
