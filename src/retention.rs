//! Retention and lease reaping: the housekeeping any replica may run. Invariant: work is done in
//! small batches with `SKIP LOCKED`-friendly statements, so it never blocks the pipeline, and only
//! finished rows older than their retention are deleted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use deadpool_postgres::Pool;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_util::sync::CancellationToken;

use crate::db::Schema;
use crate::delivery::state::{DeliveryStore, LAPSE_GRACE};

const BATCH: i64 = 1000;
/// A pruning pass yields after this long, so a huge backlog of old rows is worked off over
/// several passes rather than in one long burst of I/O.
const PASS_BUDGET: Duration = Duration::from_secs(5);

/// What a pruning pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deliveries: u64,
    pub events: u64,
    pub secrets: u64,
    pub keys: u64,
    pub inbox: u64,
    /// Steps that failed (each logged); the others ran all the same.
    pub failed: u64,
}

pub struct Retention {
    pool: Pool,
    delivered: Duration,
    failed: Duration,
    inbox: Duration,
    prune_delivered: String,
    prune_failed: String,
    prune_events: String,
    /// Where the next batch of event pruning goes on from (`None`: the oldest event).
    events_from: Mutex<Option<(DateTime<Utc>, i64)>>,
    /// Where the next batch of dead-letter pruning goes on from (`None`: the oldest).
    failed_from: Mutex<Option<(DateTime<Utc>, uuid::Uuid)>>,
    prune_secrets: String,
    prune_keys: String,
    /// Where the next batch of key pruning goes on from (`None`: the first key).
    keys_from: Mutex<Option<(String, String)>>,
    prune_inbox: String,
}

impl Retention {
    pub fn new(
        pool: Pool,
        schema: &Schema,
        delivered: Duration,
        failed: Duration,
        inbox: Duration,
    ) -> Self {
        Self {
            pool,
            delivered,
            failed,
            inbox,
            // Inbox messages the app handled (their attempts go by cascade); unhandled ones,
            // failed included, stay until someone handles or replays them.
            prune_inbox: schema.sql(
                "WITH gone AS (
                    DELETE FROM __SCHEMA__.inbox WHERE id IN (
                        SELECT id FROM __SCHEMA__.inbox
                        WHERE status = 'done' AND handled_at < now() - make_interval(secs => $1)
                        LIMIT $2 FOR UPDATE SKIP LOCKED)
                    RETURNING 1
                 )
                 SELECT count(*) FROM gone",
            ),
            prune_delivered: schema.sql(&prune_deliveries("status = 'delivered'")),
            // Dead letters, walked in `(updated_at, id)` order from where the last batch stopped
            // (`$3`, `$4`; NULL: from the oldest), as events are: the ones kept past their age
            // (below) are passed over once per walk, not re-read by every batch. Kept: a failed
            // delivery that blocks its key (`on_failure = "block"`) at an endpoint not deleted:
            // it is why nothing of the key moves, and without it the safety net would lift the
            // block. The last columns say how many it looked at and where it stopped.
            prune_failed: schema.sql(
                "WITH batch AS MATERIALIZED (
                    SELECT d.id, d.updated_at FROM __SCHEMA__.deliveries d
                    WHERE d.status IN ('failed', 'cancelled')
                      AND d.updated_at < now() - make_interval(secs => $1)
                      AND d.updated_at >= coalesce($3::timestamptz, '-infinity')
                      AND ($3::timestamptz IS NULL OR d.updated_at > $3 OR d.id > $4::uuid)
                    ORDER BY d.updated_at, d.id LIMIT $2
                 ), gone AS (
                    DELETE FROM __SCHEMA__.deliveries WHERE id = ANY(ARRAY(
                        SELECT d.id FROM __SCHEMA__.deliveries d JOIN batch b ON b.id = d.id
                        WHERE NOT (d.status = 'failed' AND d.ordering_key IS NOT NULL
                            AND EXISTS (SELECT 1 FROM __SCHEMA__.ordering_keys k
                                        WHERE k.endpoint_id = d.endpoint_id
                                          AND k.ordering_key = d.ordering_key AND k.blocked_by = d.id)
                            AND EXISTS (SELECT 1 FROM __SCHEMA__.endpoints e
                                        WHERE e.id = d.endpoint_id AND e.deleted_at IS NULL))
                        FOR UPDATE OF d SKIP LOCKED))
                    RETURNING id
                 ), attempts AS (
                    DELETE FROM __SCHEMA__.attempts WHERE delivery_id = ANY(ARRAY(SELECT id FROM gone))
                 ), last AS (
                    SELECT updated_at, id FROM batch ORDER BY updated_at DESC, id DESC LIMIT 1
                 )
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM batch),
                        (SELECT updated_at FROM last), (SELECT id FROM last)",
            ),
            // An event goes once no delivery of it is left (all pruned, or none were made).
            // A secret past its expiry never signs again: keep no copy of it.
            prune_secrets: schema.sql(
                "WITH gone AS (
                    DELETE FROM __SCHEMA__.endpoint_secrets WHERE id IN (
                        SELECT id FROM __SCHEMA__.endpoint_secrets
                        WHERE expires_at < now() - make_interval(secs => $1) LIMIT $2)
                    RETURNING 1
                 )
                 SELECT count(*) FROM gone",
            ),
            // An ordering key's row once nothing of the key waits and it is not blocked by a
            // failed delivery (its head lock row is made again when the key is next used). Walked
            // in key order from where the last batch stopped (`$3`, `$4`; `$3` NULL: from the first key): a batch looks at the
            // next `$2` keys whatever it deletes, so the keys in use are passed over once per
            // walk, not read again by every batch: the rows it deletes are those of the batch's key
            // range (an index range), found again by `ctid` (locked, so it cannot change). The
            // last columns say how many it looked at and where it stopped.
            prune_keys: schema.sql(
                "WITH batch AS MATERIALIZED (
                    SELECT endpoint_id, ordering_key FROM __SCHEMA__.ordering_keys
                    WHERE (endpoint_id, ordering_key) > (coalesce($3::text, ''), $4)
                    ORDER BY endpoint_id, ordering_key LIMIT $2
                 ), last AS (
                    SELECT endpoint_id, ordering_key FROM batch
                    ORDER BY endpoint_id DESC, ordering_key DESC LIMIT 1
                 ), gone AS (
                    DELETE FROM __SCHEMA__.ordering_keys WHERE ctid = ANY(ARRAY(
                        SELECT k.ctid FROM __SCHEMA__.ordering_keys k
                        WHERE (k.endpoint_id, k.ordering_key) > (coalesce($3::text, ''), $4)
                          AND (k.endpoint_id, k.ordering_key)
                              <= ((SELECT endpoint_id FROM last), (SELECT ordering_key FROM last))
                          AND k.updated_at < now() - make_interval(secs => $1)
                          AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.deliveries d
                                          WHERE d.endpoint_id = k.endpoint_id AND d.ordering_key = k.ordering_key
                                            AND d.status IN ('pending', 'delivering', 'paused', 'queued'))
                          AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.deliveries f
                                          WHERE f.id = k.blocked_by AND f.status = 'failed')
                        FOR UPDATE OF k SKIP LOCKED))
                    RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM batch),
                        (SELECT endpoint_id FROM last), (SELECT ordering_key FROM last)",
            ),
            // Old events without deliveries, walked in `(dispatched_at, id)` order from where
            // the last batch stopped (`$3`, `$4`; NULL: from the oldest): a batch looks at the
            // next `$2` old events whatever it deletes, so the events whose dead letters are
            // kept longer are passed over once per walk, not once per batch. The last columns
            // say how many it looked at and where it stopped.
            prune_events: schema.sql(
                "WITH batch AS MATERIALIZED (
                    SELECT o.id, o.dispatched_at FROM __SCHEMA__.outbox o
                    WHERE o.dispatched_at < now() - make_interval(secs => $1)
                      AND o.dispatched_at >= coalesce($3::timestamptz, '-infinity')
                      AND ($3::timestamptz IS NULL OR o.dispatched_at > $3 OR o.id > $4::bigint)
                    ORDER BY o.dispatched_at, o.id LIMIT $2
                 ), gone AS (
                    DELETE FROM __SCHEMA__.outbox WHERE id IN (
                        SELECT o.id FROM __SCHEMA__.outbox o JOIN batch b ON b.id = o.id
                        WHERE NOT EXISTS (SELECT 1 FROM __SCHEMA__.deliveries d WHERE d.outbox_id = o.id)
                        FOR UPDATE OF o SKIP LOCKED)
                    RETURNING 1
                 ), last AS (
                    SELECT dispatched_at, id FROM batch ORDER BY dispatched_at DESC, id DESC LIMIT 1
                 )
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM batch),
                        (SELECT dispatched_at FROM last), (SELECT id FROM last)",
            ),
            events_from: Mutex::new(None),
            failed_from: Mutex::new(None),
            keys_from: Mutex::new(None),
        }
    }

    /// One pruning pass, batch by batch, until nothing old is left or the budget is spent.
    pub async fn prune(&self) -> anyhow::Result<Pruned> {
        let started = tokio::time::Instant::now();
        let client = self.pool.get().await?;
        let mut pruned = Pruned::default();
        let steps = [
            (
                "delivered",
                &self.prune_delivered,
                self.delivered,
                Kind::Deliveries,
            ),
            ("failed", &self.prune_failed, self.failed, Kind::DeadLetters),
            ("events", &self.prune_events, self.delivered, Kind::Events),
            (
                "secrets",
                &self.prune_secrets,
                Duration::ZERO,
                Kind::Secrets,
            ),
            ("ordering keys", &self.prune_keys, KEY_ROW_AGE, Kind::Keys),
            ("inbox", &self.prune_inbox, self.inbox, Kind::Inbox),
        ];
        // A step that fails (a timeout, a lock, a row the database refuses) is logged and the
        // next one runs: expired secrets must not wait on a deliveries table that is hard to prune.
        for (step, sql, age, kind) in steps {
            loop {
                // Each statement answers with how many rows it deleted; a batch that deleted a
                // whole batch may have left more.
                let batch = match kind {
                    Kind::Events => walk_batch(&client, sql, age, &self.events_from).await,
                    Kind::DeadLetters => walk_batch(&client, sql, age, &self.failed_from).await,
                    Kind::Keys => walk_batch(&client, sql, age, &self.keys_from).await,
                    _ => client
                        .query_one(sql.as_str(), &[&age.as_secs_f64(), &BATCH])
                        .await
                        .map(|r| {
                            let n = r.get::<_, i64>(0) as u64;
                            (n, n == BATCH as u64)
                        })
                        .map_err(anyhow::Error::from),
                };
                let (n, more) = match batch {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::warn!(step, error = %format!("{e:#}"), "a retention step failed; the pass goes on with the next");
                        pruned.failed += 1;
                        break;
                    }
                };
                match kind {
                    Kind::Deliveries | Kind::DeadLetters => pruned.deliveries += n,
                    Kind::Events => pruned.events += n,
                    Kind::Secrets => pruned.secrets += n,
                    Kind::Keys => pruned.keys += n,
                    Kind::Inbox => pruned.inbox += n,
                }
                if !more || started.elapsed() > PASS_BUDGET {
                    break;
                }
            }
        }
        Ok(pruned)
    }
}

/// One batch of a pruning walk (dead letters, events, ordering keys) from where the last one stopped: how many
/// rows it deleted, and whether the walk goes on (it looked at a whole batch). A walk that reached
/// its end starts over (`from` back to `None`). The statement takes the age, the batch size and
/// the cursor (`$3` NULL at the start), and answers with what it deleted, how many rows it looked
/// at and where it stopped.
async fn walk_batch<A, B>(
    client: &deadpool_postgres::Client,
    sql: &str,
    age: Duration,
    from: &Mutex<Option<(A, B)>>,
) -> anyhow::Result<(u64, bool)>
where
    A: ToSql + Sync + Clone + for<'a> FromSql<'a>,
    B: ToSql + Sync + Clone + Default + for<'a> FromSql<'a>,
{
    let start = from.lock().expect("never poisoned").clone();
    let (a, b) = match start {
        Some((a, b)) => (Some(a), b),
        None => (None, B::default()),
    };
    let row = client
        .query_one(sql, &[&age.as_secs_f64(), &BATCH, &a, &b])
        .await?;
    let (deleted, looked): (i64, i64) = (row.get(0), row.get(1));
    let next = row.get::<_, Option<A>>(2).zip(row.get::<_, Option<B>>(3));
    let more = looked == BATCH && next.is_some();
    *from.lock().expect("never poisoned") = if more { next } else { None };
    Ok((deleted as u64, more))
}

enum Kind {
    Deliveries,
    DeadLetters,
    Events,
    Secrets,
    Keys,
    Inbox,
}

/// An idle ordering key's row is kept this long after its last use.
const KEY_ROW_AGE: Duration = Duration::from_secs(3600);

/// Deletes a batch of finished deliveries matching `finished` and, in the same statement, their
/// attempts (no foreign key cascades them: see migration 2). Returns the deliveries deleted.
/// The oldest first, from the class's own index (migration 10), so a batch reads only what it
/// deletes; both deletes find their rows by key (`= ANY`), which no estimate can turn into a scan
/// of the table.
fn prune_deliveries(finished: &str) -> String {
    format!(
        "WITH gone AS (
            DELETE FROM __SCHEMA__.deliveries WHERE id = ANY(ARRAY(
                SELECT id FROM __SCHEMA__.deliveries
                WHERE {finished} AND updated_at < now() - make_interval(secs => $1)
                ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED))
            RETURNING id
         ), attempts AS (
            DELETE FROM __SCHEMA__.attempts WHERE delivery_id = ANY(ARRAY(SELECT id FROM gone))
         )
         SELECT count(*) FROM gone"
    )
}

/// Which endpoints a sweep looks at.
#[derive(Clone, Copy)]
enum Sweep {
    /// Those changed within the hour: every reaper tick.
    Recent,
    /// All of them: every pruning interval, for what the hour did not finish.
    All,
}

/// Sweeps in batches until nothing is left or the pass budget is spent (the next tick goes on).
async fn sweep(store: &DeliveryStore, which: Sweep) {
    let started = tokio::time::Instant::now();
    let mut moved = 0;
    loop {
        let batch = match which {
            Sweep::Recent => store.sweep(BATCH).await,
            Sweep::All => store.sweep_all(BATCH).await,
        };
        match batch {
            Ok(n) => {
                moved += n;
                if n < BATCH as u64 || started.elapsed() > PASS_BUDGET {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "sweeping deliveries of inactive endpoints failed");
                break;
            }
        }
    }
    if moved > 0 {
        tracing::info!(
            deliveries = moved,
            "deliveries of inactive or deleted endpoints paused or cancelled"
        );
    }
}

/// Reaps lapsed leases and sweeps recently changed endpoints every `reap_every` (and at once when
/// `sweep_now` rings), prunes and sweeps every endpoint every `prune_every`, until cancelled.
#[allow(clippy::too_many_arguments)]
pub async fn housekeeping_loop(
    store: Arc<DeliveryStore>,
    retention: Retention,
    max_lease_lapses: u32,
    reap_every: Duration,
    prune_every: Duration,
    wake_worker: Arc<tokio::sync::Notify>,
    sweep_now: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let mut reap = tokio::time::interval(reap_every);
    // Where the ordering safety net goes on from: it walks every key with queued deliveries, a
    // batch per tick.
    let mut keys_cursor = (String::new(), String::new());
    let mut prune = tokio::time::interval(prune_every);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sweep_now.notified() => sweep(&store, Sweep::Recent).await,
            _ = reap.tick() => {
                match store.reap(500, max_lease_lapses as i32).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(
                            reaped = n,
                            grace_s = LAPSE_GRACE.as_secs(),
                            "deliveries whose lease lapsed are due again"
                        );
                        // The reaped ones are due after the grace, but a key whose head was
                        // failed or cancelled here has its next delivery due now.
                        wake_worker.notify_one();
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "reaping lapsed leases failed"),
                }
                sweep(&store, Sweep::Recent).await;
                match store.mend_keys(BATCH, std::mem::take(&mut keys_cursor)).await {
                    Ok((mended, next)) => {
                        keys_cursor = next;
                        if mended > 0 {
                            tracing::warn!(keys = mended, "ordering keys left without a head were moved on");
                            wake_worker.notify_one();
                        }
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "mending ordering keys failed"),
                }
            }
            _ = prune.tick() => {
                match retention.prune().await {
                    Ok(p) if p == Pruned::default() => {}
                    Ok(p) => tracing::info!(deliveries = p.deliveries, events = p.events, expired_secrets = p.secrets, ordering_keys = p.keys, inbox = p.inbox, failed_steps = p.failed, "retention pruned old rows"),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "retention pass failed"),
                }
                sweep(&store, Sweep::All).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
