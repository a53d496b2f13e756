//! Per-key FIFO: deliveries of one `ordering_key` to one endpoint go one at a time, in outbox `id`
//! order. Invariant: each (endpoint, key) has at most one *head* (a delivery `pending`,
//! `delivering` or `paused`); every later one waits `queued`; only the SQL function
//! `advance_ordering_keys` (migration 4) makes a head, and only under the key's row lock.
//!
//! Design, and why:
//! - **Heads, not gates.** The claim stays the unordered claim: a queued delivery is not in the
//!   `deliveries_due` index, so claiming costs the same with 100,000 keys or one hot key of
//!   millions (the claim never reads a row that is waiting its turn). Moving a key on is two index
//!   probes (`deliveries_key_head`: has it a head? `deliveries_queued`: its earliest waiting row).
//! - **One lock per key.** Every change of a key's head (fan-out adding to it, an outcome finishing
//!   it, a retry or cancel through the API) first locks the key's `ordering_keys` row, creating it
//!   if needed, in (endpoint, key) order so two transactions never deadlock on keys. Postgres's
//!   READ COMMITTED takes a new snapshot per statement, so the statements after the lock see what
//!   the previous holder committed: two writers can never both see "no head" and both make one.
//! - **Fan-out in `id` order per key.** Two replicas fan out disjoint batches (SKIP LOCKED), so a
//!   later event of a key could be fanned out, and sent, before an earlier one held in another
//!   replica's open pass. A pass therefore leaves a keyed event undispatched while an earlier event
//!   of its key is undispatched outside its batch (`outbox_keyed_undispatched`: one probe per key
//!   in the batch), and takes it in a later pass.
//! - **What the app promises.** `id` order is insert order; for two events of one key to be
//!   delivered in commit order, the app commits them in order (e.g. it locks the entity's row, as
//!   it would to change it). An event inserted earlier but committed after a later one was sent
//!   cannot be sent before it: that is the one case no outbox can order without waiting on every
//!   open transaction.
//! - **Failed heads.** `on_failure = "skip"` (default): the next delivery becomes the head and the
//!   failed one stays `failed`, visible and retryable (a retried delivery rejoins its key's queue
//!   and goes next in `id` order). `"block"`: the key's row is marked `blocked_by` the failed
//!   delivery and nothing moves until it is retried and delivered, or cancelled.
//! - **A safety net.** The sweeper moves on keys that have queued deliveries and no head (left so
//!   by a replica that died between two statements, or by an older release during a rolling
//!   update), a bounded batch at a time.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::config::OnFailure;
use crate::db::Schema;

/// The keys a set of deliveries belong to, column by column (for `unnest`).
#[derive(Debug, Default, Clone)]
pub struct Keys {
    pub endpoints: Vec<String>,
    pub keys: Vec<String>,
}

impl Keys {
    pub fn push(&mut self, endpoint: &str, key: &str) {
        self.endpoints.push(endpoint.to_string());
        self.keys.push(key.to_string());
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// SQL texts for one schema.
pub struct Ordering {
    lock: String,
    advance: String,
    stalled: String,
    default_on_failure: OnFailure,
}

impl Ordering {
    pub fn new(schema: &Schema, default_on_failure: OnFailure) -> Self {
        Self {
            lock: schema.sql("SELECT __SCHEMA__.lock_ordering_keys($1, $2)"),
            advance: schema.sql("SELECT __SCHEMA__.advance_ordering_keys($1, $2, $3, $4)"),
            // Up to `$1` keys with queued deliveries after the cursor ($2, $3), in index order, each
            // with whether it has neither a head nor a block (a block whose delivery is gone,
            // pruned or moved by an older release, no longer counts: advancing lifts it): the
            // sweeper walks every key this way, a batch per pass, and wraps around.
            stalled: schema.sql(
                "WITH q AS (
                    SELECT DISTINCT endpoint_id, ordering_key FROM __SCHEMA__.deliveries
                    WHERE status = 'queued' AND (endpoint_id, ordering_key) > ($2, $3)
                    ORDER BY 1, 2 LIMIT $1)
                 SELECT q.endpoint_id, q.ordering_key,
                        NOT EXISTS (SELECT 1 FROM __SCHEMA__.deliveries h
                                    WHERE h.endpoint_id = q.endpoint_id AND h.ordering_key = q.ordering_key
                                      AND h.status IN ('pending', 'delivering', 'paused'))
                        AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.ordering_keys k
                                        JOIN __SCHEMA__.deliveries b ON b.id = k.blocked_by
                                        WHERE k.endpoint_id = q.endpoint_id AND k.ordering_key = q.ordering_key
                                          AND b.status = 'failed')
                 FROM q ORDER BY 1, 2",
            ),
            default_on_failure,
        }
    }

    /// Locks the keys' rows (first, before changing any of their deliveries).
    pub async fn lock(&self, tx: &impl GenericClient, keys: &Keys) -> anyhow::Result<()> {
        if !keys.is_empty() {
            tx.execute(&self.lock, &[&keys.endpoints, &keys.keys])
                .await?;
        }
        Ok(())
    }

    /// The statement `advance` runs. A caller that pipelines `advance` with what follows it (the
    /// fan-out's commit) prepares it first: a statement prepared on first use waits for its
    /// description, and so would run after what was queued behind it.
    pub fn advance_sql(&self) -> &str {
        &self.advance
    }

    /// Moves the keys on (see the module notes); `failed` are deliveries that just failed, which
    /// block their key where the endpoint says so. Returns how many heads it made.
    pub async fn advance(
        &self,
        tx: &impl GenericClient,
        keys: &Keys,
        failed: &[Uuid],
    ) -> anyhow::Result<i32> {
        if keys.is_empty() {
            return Ok(0);
        }
        let stmt = tx.prepare_cached(&self.advance).await?;
        let row = tx
            .query_one(
                &stmt,
                &[
                    &keys.endpoints,
                    &keys.keys,
                    &failed,
                    &self.default_on_failure.as_str(),
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The safety net: looks at up to `batch` keys with queued deliveries after `cursor` and moves
    /// on those left without a head. Returns the heads made and where the next pass starts (back
    /// at the beginning once it reached the end).
    pub async fn mend(
        &self,
        client: &mut deadpool_postgres::Client,
        batch: i64,
        cursor: (String, String),
    ) -> anyhow::Result<(i32, (String, String))> {
        let rows = client
            .query(&self.stalled, &[&batch, &cursor.0, &cursor.1])
            .await?;
        let next = match rows.last() {
            Some(r) if rows.len() as i64 == batch => (r.get(0), r.get(1)),
            _ => Default::default(),
        };
        let mut keys = Keys::default();
        for r in rows.iter().filter(|r| r.get::<_, bool>(2)) {
            keys.push(r.get(0), r.get(1));
        }
        if keys.is_empty() {
            return Ok((0, next));
        }
        let tx = client.transaction().await?;
        let n = self.advance(&tx, &keys, &[]).await?;
        tx.commit().await?;
        Ok((n, next))
    }
}
