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
            // sweeper walks every key this way, a batch per pass, and wraps around. The keys are
            // found one index probe each, skipping from one to the next (a `DISTINCT` read every
            // delivery queued behind a key, millions for a hot one, at every tick).
            stalled: schema.sql(
                "WITH RECURSIVE walk AS (
                    (SELECT endpoint_id, ordering_key FROM __SCHEMA__.deliveries
                     WHERE status = 'queued' AND (endpoint_id, ordering_key) > ($2, $3)
                     ORDER BY 1, 2 LIMIT 1)
                    UNION ALL
                    SELECT n.endpoint_id, n.ordering_key FROM walk w, LATERAL (
                        SELECT endpoint_id, ordering_key FROM __SCHEMA__.deliveries
                        WHERE status = 'queued' AND (endpoint_id, ordering_key) > (w.endpoint_id, w.ordering_key)
                        ORDER BY 1, 2 LIMIT 1) n
                 ), q AS (SELECT * FROM walk LIMIT $1)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::scratch::Scratch;

    /// The safety net runs at every tick: it must read one index entry per key, not every
    /// delivery queued behind a hot key (millions, for a key that is slow to drain).
    #[tokio::test]
    async fn the_safety_net_reads_one_entry_per_key_and_mends_only_stalled_keys() {
        let s = Scratch::new().await;
        // A hot key with a head and 50,000 queued behind it; `a` and `c` stalled (queued, no
        // head); `b` with a head in flight.
        s.run(
            "INSERT INTO __SCHEMA__.endpoints (id, url, events, source)
             VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
             INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, ordering_key)
             SELECT g, gen_random_uuid(), 't', 'e', CASE WHEN g = 1 THEN 'pending' ELSE 'queued' END, 'hot'
             FROM generate_series(1, 50001) g;
             INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, ordering_key)
             VALUES (60001, gen_random_uuid(), 't', 'e', 'queued', 'a'),
                    (60002, gen_random_uuid(), 't', 'e', 'queued', 'a'),
                    (60003, gen_random_uuid(), 't', 'e', 'delivering', 'b'),
                    (60004, gen_random_uuid(), 't', 'e', 'queued', 'b'),
                    (60005, gen_random_uuid(), 't', 'e', 'queued', 'c')",
        )
        .await;
        s.run("VACUUM ANALYZE __SCHEMA__.deliveries").await;
        let ordering = Ordering::new(&s.schema, OnFailure::Skip);
        let mut client = s.pool.get().await.unwrap();
        let plan: serde_json::Value = client
            .query_one(
                &format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", ordering.stalled),
                &[&1000i64, &"", &""],
            )
            .await
            .unwrap()
            .get(0);
        fn entries_read(node: &serde_json::Value) -> i64 {
            let own = match node["Index Name"].as_str() {
                Some("deliveries_queued") => {
                    node["Actual Rows"].as_i64().unwrap() * node["Actual Loops"].as_i64().unwrap()
                }
                _ => 0,
            };
            let children = node["Plans"].as_array().into_iter().flatten();
            own + children.map(entries_read).sum::<i64>()
        }
        let read = entries_read(&plan[0]["Plan"]);
        assert!(
            read < 100,
            "read {read} queued entries for 4 keys: {plan:#}"
        );
        // Both stalled keys get their earliest queued delivery as head; the others are untouched.
        let (made, next) = ordering
            .mend(&mut client, 1000, Default::default())
            .await
            .unwrap();
        assert_eq!((made, next), (2, Default::default()));
        let heads: Vec<(String, i64)> = s
            .pairs(
                "SELECT ordering_key, outbox_id FROM __SCHEMA__.deliveries
                 WHERE status IN ('pending', 'delivering') ORDER BY 1",
            )
            .await;
        let want = [("a", 60001), ("b", 60003), ("c", 60005), ("hot", 1)];
        assert_eq!(heads, want.map(|(k, id)| (k.to_string(), id)));
        // A batch of two stops at its second key, and the next starts after it.
        let (_, next) = ordering
            .mend(&mut client, 2, Default::default())
            .await
            .unwrap();
        assert_eq!(next, ("e".to_string(), "b".to_string()));
        drop(client);
        s.drop_schema().await;
    }
}
