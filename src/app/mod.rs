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

use crate::api::admin::Health;
use crate::config::Config;
use crate::crypto::SecretBox;
use crate::db::{self, NotifySetting, Schema};
use crate::delivery::client::WebhookClient;
use crate::delivery::ssrf::Guard;
use crate::delivery::state::{flow::FlowDefaults, ordering::Ordering, DeliveryStore};
use crate::delivery::{Capacity, Worker, WorkerSettings};
use crate::endpoints;
use crate::outbox::dispatcher::{Dispatcher, FastPath};
use crate::outbox::{self, Signals};
use crate::retention::{self, Retention};
use crate::telemetry::Metrics;

pub mod inbox;
mod watch;

/// Runs the sidecar until `shutdown` is cancelled. `inbox` is the committers' end of the inbox
/// writer the proxy was given (when some route is in inbox mode).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    inbox: Option<crate::inbox::writer::Queue>,
) -> anyhow::Result<()> {
    let schema = Schema::new(&config.database.schema)?;
    let tls = db::tls::from_config(&config.database)?;
    let mode = db::SessionMode::from_config(&config.database);
    let pool = db::pool_with(config.database.url(), config.database.pool_size, &tls, mode)?;
    let vault = SecretBox::from_config(&config)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        database = %crate::config::mask_url_password(config.database.url()),
        schema = schema.name(),
        encrypting_secrets = vault.encrypting(),
        "postern starting"
    );
    let inbound_addr = config.inbound.as_ref().and_then(|i| i.listen.parse().ok());
    let health = Arc::new(Health::new(inbound_addr));
    // The probes answer from the first moment (readyz says why it is not ready yet).
    let admin_stop = CancellationToken::new();
    let admin = match &config.admin {
        Some(a) => Some(crate::api::admin::spawn(
            &a.listen,
            health.clone(),
            metrics.clone(),
            admin_stop.clone(),
        )?),
        None => None,
    };
    let api_listener = match &config.api {
        Some(api) => Some(
            tokio::net::TcpListener::bind(&api.listen)
                .await
                .with_context(|| format!("api.listen: cannot bind {}", api.listen))?,
        ),
        None => None,
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(watch::probe_loop(
        tls.clone(),
        mode,
        config.database.url().to_string(),
        schema.clone(),
        pool.clone(),
        health.clone(),
        metrics.clone(),
        shutdown.child_token(),
    ));
    tasks.spawn(watch::gauge_loop(
        tls.clone(),
        mode,
        config.database.url().to_string(),
        schema.clone(),
        metrics.clone(),
        shutdown.child_token(),
    ));

    // The committers answer from the first moment too: a request that cannot be stored (no
    // database yet, no schema yet) is answered 503 and the provider retries.
    let inbox_wake = Arc::new(tokio::sync::Notify::new());
    let committers = match inbox {
        Some(queue) => Some(inbox::spawn_writer(
            &config,
            queue,
            &schema,
            &tls,
            metrics.clone(),
            inbox_wake.clone(),
            shutdown.clone(),
        )?),
        None => None,
    };
    let result = async {
        // A start the database cuts short (gone again, read-only for a moment after a failover,
        // shutting down) is tried again here; any other failure (a config or a stored value that
        // cannot work) ends the process with the reason. Exiting on the first would leave the pod
        // in CrashLoopBackOff for minutes after the database is back.
        let mut delay = std::time::Duration::from_millis(500);
        loop {
            if db::wait_until_reachable(&pool, &shutdown).await.is_none() {
                return Ok(());
            }
            match prepare(&config, &pool, &schema, &vault).await {
                Ok(()) => break,
                Err(e) if db::is_transient(&e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64,
                        "the database cut the start short; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(std::time::Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
        let mut pipeline = start(
            &config,
            &schema,
            shutdown.clone(),
            metrics.clone(),
            health.clone(),
            vault.clone(),
            tls.clone(),
        )?;
        // Only a warning: what it finds is forwarded or waits for its consumers all the same.
        if let Err(e) = inbox::left_over(&config, &pool, &schema).await {
            tracing::warn!(error = %format!("{e:#}"), "looking for inbox messages of routes no longer configured failed");
        }
        let forwarder_pool = db::pool_with(config.database.url(), 4, &tls, mode)?;
        if let Some(f) = inbox::forwarder(
            &config,
            forwarder_pool,
            &schema,
            metrics.clone(),
            inbox_wake.clone(),
        )? {
            pipeline.spawn("inbox-forwarder", f.run(shutdown.child_token()));
        }
        let cancel = shutdown.child_token();
        if let Some(upkeep) = inbox::upkeep(&config, pool.clone(), &schema, cancel) {
            pipeline.spawn("inbox-upkeep", upkeep);
        }
        if let (Some(listener), Some(api)) = (api_listener, &config.api) {
            let state = crate::api::ApiState {
                pool: pool.clone(),
                schema: schema.clone(),
                vault: vault.clone(),
                guard: Arc::new(Guard::new(config.outbound.allow_private_networks.clone())),
                ordering: Arc::new(Ordering::new(&schema, config.outbound.ordering.on_failure)),
                metrics: metrics.clone(),
            };
            let tokens = api.tokens.iter().map(|t| t.expose().to_string()).collect();
            let limit = crate::api::body_limit(config.outbound.max_payload.0);
            let router = crate::api::router(state, tokens, limit);
            tracing::info!(listen = %api.listen, "management API listening");
            tasks.spawn(crate::api::serve(listener, router, shutdown.child_token()));
        }
        health
            .pipeline
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("postern running");
        // A pipeline task that ends before shutdown (a panic, a bug) leaves the replica unable
        // to do its work: it says so on /readyz, and after a short grace (so probes and logs
        // see why) exits non-zero for Kubernetes to restart it.
        let failed = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            // Tasks end on their own when shutdown begins: only an end before it is a failure.
            ended = pipeline.next_ended() => (!shutdown.is_cancelled()).then_some(ended),
        };
        if let Some(reason) = &failed {
            tracing::error!(reason = %reason, grace_s = TASK_FAILURE_GRACE.as_secs(), "a pipeline task stopped; this replica is unready and exits after the grace");
            health.set_fault(reason.clone());
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(TASK_FAILURE_GRACE) => {}
            }
        }
        health
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("shutting down: no new claims; draining in-flight deliveries");
        shutdown.cancel();
        join_all(pipeline.tasks).await;
        match failed {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => anyhow::Ok(()),
        }
    }
    .await;
    health
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    shutdown.cancel();
    join_all(tasks).await;
    if let Some(committers) = committers {
        let _ = committers.await;
    }
    admin_stop.cancel();
    if let Some(thread) = admin {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    tracing::info!("postern stopped");
    result
}

/// Migrations (or a version check), the notify trigger and the config endpoints.
pub async fn prepare(
    config: &Config,
    pool: &Pool,
    schema: &Schema,
    vault: &SecretBox,
) -> anyhow::Result<()> {
    if config.database.migrate_on_start {
        let applied = db::migrate(
            pool,
            schema,
            &config.database.publisher_roles,
            &config.database.consumer_roles,
        )
        .await?;
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
    // A trigger that cannot be replaced now (the outbox busy past the lock timeout) stays as it
    // is until the next start: polling is the truth, the trigger only a hint.
    match db::install_notify(pool, schema, &wanted, false).await {
        Ok(Some(installed)) => tracing::warn!(
            configured = %format!("{}:{}ms", wanted.mode, wanted.throttle_ms),
            installed = %format!("{}:{}ms", installed.mode, installed.throttle_ms),
            "outbound.notify differs from the trigger installed in the database; keeping the installed one (run `postern migrate` to change it)"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %format!("{e:#}"),
            "the outbox's notify trigger could not be installed now; keeping the one it has (the next start tries again)"),
    }
    let max_payload = config.outbound.max_payload.0;
    // The newest start wins; a limit that cannot be installed now (the outbox busy past the lock
    // timeout) is tried again at the next start, and the table keeps the one it has.
    match db::install_payload_limit(pool, schema, max_payload).await {
        Ok(Some(replaced)) => {
            tracing::warn!(replaced = %replaced, max_payload, "the outbox's payload limit now follows this config's outbound.max_payload")
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), max_payload, "the outbox's payload limit could not be installed now; keeping the one it has")
        }
    }
    let generation = config.config_generation;
    let reconciled =
        endpoints::sync_config_endpoints(pool, schema, vault, &config.endpoints, generation)
            .await
            .context("syncing the config file's endpoints")?;
    if let Some(stored) = reconciled.stale {
        tracing::warn!(
            config_generation = generation,
            database_generation = stored,
            "this config is older than the database's (config_generation {generation} < {stored}): running with the stored endpoint set and changing none"
        );
    }
    if !reconciled.retired.is_empty() {
        tracing::warn!(endpoints = ?reconciled.retired, config_generation = generation,
            "config endpoints removed from the file were retired: inactive, their deliveries paused (`postern endpoints prune` deletes them)");
    }
    if !reconciled.kept.is_empty() {
        tracing::warn!(endpoints = ?reconciled.kept, config_generation = generation,
            "config endpoints missing from this file keep running: this config_generation is not newer than the database's (raise it to retire them)");
    }
    let resealed = endpoints::reseal(pool, schema, vault).await?;
    if resealed > 0 {
        tracing::info!(
            values = resealed,
            key = vault.current_key_id(),
            "stored secrets sealed again with the current key"
        );
    }
    endpoints::check_sealed(pool, schema, vault).await?;
    inbox::reconcile(config, pool, schema).await?;
    Ok(())
}

/// Fan-out loops per replica: `SKIP LOCKED` keeps their passes disjoint, and while one waits on
/// a long pass under load the other takes the next wake-up.
const DISPATCHERS: usize = 2;

/// How long a replica whose pipeline task stopped stays up (unready) before exiting.
const TASK_FAILURE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// For tests only: `POSTERN_TEST_FAIL_TASK=<task>` makes that pipeline task panic a moment after
/// it starts, to show what a dead task does to the replica. Never set it in production.
const FAIL_TASK_VAR: &str = "POSTERN_TEST_FAIL_TASK";

/// The pipeline's tasks, by name.
pub struct Pipeline {
    pub tasks: JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Pipeline {
    fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            names: Default::default(),
        }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let fail = std::env::var(FAIL_TASK_VAR).is_ok_and(|v| v == name);
        let handle = if fail {
            self.tasks.spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                panic!("{FAIL_TASK_VAR}={name}: injected failure");
            })
        } else {
            self.tasks.spawn(task)
        };
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end and says which and how (pending forever when none runs).
    async fn next_ended(&mut self) -> String {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, how) = match ended {
            Ok((id, ())) => (id, "returned".to_string()),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return format!("a pipeline task panicked: {message}");
            }
            Err(e) => (e.id(), format!("failed: {e}")),
        };
        let name = self.names.get(&id).copied().unwrap_or("unknown");
        format!("the pipeline task {name} {how}")
    }
}

/// Spawns the pipeline's tasks; each stops when `shutdown` is cancelled.
pub fn start(
    config: &Config,
    schema: &Schema,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    vault: SecretBox,
    tls: db::tls::Tls,
) -> anyhow::Result<Pipeline> {
    let o = &config.outbound;
    let mode = db::SessionMode::from_config(&config.database);
    let pool = db::pipeline_pool_with(config.database.url(), &tls, mode)?;
    let signals = Arc::new(Signals::default());
    let mut tasks = Pipeline::new();
    let owner = Uuid::new_v4();

    let settings = WorkerSettings::from_config(config);
    let capacity = Capacity::new(&settings);
    if db::listens(o.notify) {
        if config.database.pgbouncer && config.database.listen_url.is_none() {
            // A transaction pooler takes the LISTEN and never delivers a notification: wake-ups
            // and endpoint announcements would be lost without an error (polling still works).
            tracing::warn!("database.pgbouncer is set and database.listen_url is not: LISTEN goes through the pooler, which in transaction mode never delivers notifications; set database.listen_url to a direct (or session-pooled) connection");
        }
        tasks.spawn(
            "listener",
            outbox::listen(
                config.database.listen_url().to_string(),
                tls,
                mode,
                outbox::Channels {
                    outbox: schema.channel(),
                    endpoints: schema.endpoints_channel(),
                },
                signals.clone(),
                capacity.clone(),
                health.clone(),
                metrics.clone(),
                shutdown.child_token(),
            ),
        );
    }
    let (handoff, handoffs) = tokio::sync::mpsc::unbounded_channel();
    let fast_path = FastPath {
        owner,
        lease: settings.lease,
        capacity: capacity.clone(),
        handoff,
        fold: Default::default(),
    };
    for _ in 0..DISPATCHERS {
        // Each loop's pass brings at most a sixteenth of the memory budget's worth of payloads
        // into memory (with the copies made from it, an eighth; two loops, a quarter).
        let dispatcher = Dispatcher::new(
            pool.clone(),
            schema,
            o.dispatch_batch,
            o.memory_budget.0 / 16,
            o.max_payload.0,
            fast_path.clone(),
            Ordering::new(schema, o.ordering.on_failure),
            o.rate_limit.is_some(),
            // pgbouncer's transaction pooling keeps no session's SQL-prepared statements.
            config.database.pgbouncer,
        );
        tasks.spawn(
            "dispatcher",
            outbox::dispatch_loop(
                dispatcher,
                signals.clone(),
                metrics.clone(),
                o.poll_interval.0,
                o.notify_throttle.0,
                shutdown.child_token(),
            ),
        );
    }

    let store = Arc::new(DeliveryStore::new(
        pool.clone(),
        schema,
        o.ordering.on_failure,
        FlowDefaults::new(o.rate_limit, &o.breaker, o.per_endpoint_concurrency),
    ));
    let client = WebhookClient::new(
        Guard::new(o.allow_private_networks.clone()),
        o.request_timeout.0,
        o.per_endpoint_concurrency,
    )?;
    let worker = Worker::new(
        store.clone(),
        client,
        settings,
        vault,
        metrics,
        health,
        owner,
        capacity.clone(),
        signals.deliveries_ready.clone(),
        signals.sweep_now.clone(),
    );
    tasks.spawn("worker", worker.run(handoffs, shutdown.child_token()));

    let retention = Retention::new(
        pool,
        schema,
        config.retention.delivered.0,
        config.retention.failed.0,
        config.retention.inbox.0,
    );
    tasks.spawn(
        "housekeeping",
        retention::housekeeping_loop(
            store,
            retention,
            o.max_lease_lapses,
            o.poll_interval.0,
            config.retention.interval.0,
            signals.deliveries_ready.clone(),
            signals.sweep_now.clone(),
            shutdown.child_token(),
        ),
    );
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
    let tls = db::tls::from_config(&config.database)?;
    let mode = db::SessionMode::from_config(&config.database);
    let pool = db::pool_with(config.database.url(), config.database.pool_size, &tls, mode)?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    db::wait_until_reachable(&pool, &cancel)
        .await
        .context("interrupted while waiting for the database")?;
    let applied = db::migrate(
        &pool,
        &schema,
        &config.database.publisher_roles,
        &config.database.consumer_roles,
    )
    .await?;
    db::install_notify(&pool, &schema, &NotifySetting::from_config(config), true).await?;
    db::install_payload_limit(&pool, &schema, config.outbound.max_payload.0).await?;
    let vault = SecretBox::from_config(config)?;
    let resealed = endpoints::reseal(&pool, &schema, &vault).await?;
    if resealed > 0 {
        tracing::info!(
            values = resealed,
            key = vault.current_key_id(),
            "stored secrets sealed again with the current key"
        );
    }
    Ok(applied)
}

/// `postern endpoints prune`: deletes the config endpoints retired because they left the file.
pub async fn prune_endpoints(config: &Config) -> anyhow::Result<Vec<String>> {
    let schema = Schema::new(&config.database.schema)?;
    let tls = db::tls::from_config(&config.database)?;
    let mode = db::SessionMode::from_config(&config.database);
    let pool = db::pool_with(config.database.url(), config.database.pool_size, &tls, mode)?;
    endpoints::prune_retired(&pool, &schema).await
}
