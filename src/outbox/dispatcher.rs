//! Fan-out: turns undispatched outbox rows into one delivery per matching endpoint.
//! Invariant: claiming the rows, inserting their deliveries and marking them dispatched happen in
//! one transaction, so an event is fanned out exactly once even with several replicas (rows are
//! taken with `FOR UPDATE SKIP LOCKED`, never by a high-water mark: `id` order is not commit order).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::fold::{gather, FoldState, FoldedColumns, INSERT_FOLDED};
use super::opening::{taken, Opening, TAKEN};
use super::target::{Known, Target};
use crate::db::Schema;
use crate::delivery::state::ordering::{Keys, Ordering};
use crate::delivery::state::{Claimed, DeliveryStatus};
use crate::delivery::{Capacity, FanOutCommit, Handoff};

/// Whether any event waits to be fanned out: one probe of the undispatched-rows index.
const WAITING: &str = "SELECT EXISTS (SELECT 1 FROM __SCHEMA__.outbox WHERE dispatched_at IS NULL)";

/// Whether keyed events wait to be fanned out: one probe of a partial index.
pub(super) const KEYED_WAITING: &str = "SELECT EXISTS (SELECT 1 FROM __SCHEMA__.outbox
                                WHERE dispatched_at IS NULL AND ordering_key IS NOT NULL)";

/// What one dispatcher pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dispatched {
    pub events: usize,
    pub deliveries: usize,
    /// Deliveries inserted `pending`, for the worker to claim (the rest were handed to it).
    pub pending: usize,
    /// Seconds from each event's insert to its dispatch (for the lag metric).
    pub lags: Vec<f64>,
    /// Keyed events left for a later pass: an earlier event of their key was in another pass.
    pub held_back: usize,
    /// Undispatched rows the pass looked at, and the highest id among them.
    pub scanned: usize,
    pub last_id: i64,
    /// Deliveries inserted `delivered`, their outcome written with the fan-out (see `fold`).
    pub folded: usize,
}

/// The fan-out fast path: fresh deliveries to active endpoints are inserted already claimed by
/// this replica (attempt 1, under a lease) while it has capacity, and handed to its worker in
/// memory. The rest are inserted `pending` for whichever replica claims them.
#[derive(Clone)]
pub struct FastPath {
    pub owner: Uuid,
    pub lease: Duration,
    pub capacity: Arc<Capacity>,
    pub handoff: mpsc::UnboundedSender<Vec<Handoff>>,
    pub fold: FoldState,
}

pub struct Dispatcher {
    pool: Pool,
    batch: i64,
    /// Payload bytes one pass may take into memory.
    batch_bytes: i64,
    fast: FastPath,
    ordering: Ordering,
    /// `outbound.rate_limit` is set: every endpoint is limited, none takes the fast path.
    default_limited: bool,
    /// As many payloads as the byte budget holds at `outbound.max_payload` each (at least one).
    small_batch: i64,
    /// The first round trip: the transaction's start, the take, the pass's head.
    opening: Opening,
    waiting: String,
    take_keyed: String,
    insert: String,
    /// `insert` with the outcomes a pass waited for (`fold`).
    insert_folded: String,
    /// The endpoints as a pass last read them: passes read them again only when they changed.
    known: Known,
}

impl Dispatcher {
    /// `batch_bytes`: the payload bytes a pass may take into memory, at least `max_payload`
    /// (`outbound.max_payload`, which the outbox's constraint holds every new payload to).
    /// `pipelined`: the first round trip as three messages (behind pgbouncer), not one.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: Pool,
        schema: &Schema,
        batch: usize,
        batch_bytes: u64,
        max_payload: u64,
        fast: FastPath,
        ordering: Ordering,
        default_limited: bool,
        pipelined: bool,
    ) -> Self {
        Self {
            pool,
            batch: batch as i64,
            batch_bytes: batch_bytes.min(i64::MAX as u64) as i64,
            small_batch: small_batch(batch, batch_bytes, max_payload),
            fast,
            ordering,
            default_limited,
            opening: Opening::new(schema, pipelined),
            waiting: schema.sql(WAITING),
            // Keyed events, only when some wait (their statement costs more to plan and run). Per
            // ordering key they are fanned out in `id` order: a keyed event is left (locked
            // until this transaction ends, untouched) when an earlier undispatched event of its
            // key is outside this batch, i.e. in another replica's open pass (`ordering`). One
            // index probe per key in the batch. Always one row at least: the last columns count
            // the events left so and the rows looked at, and give the batch's highest id, from
            // which the next pass goes on (`$3`) when a whole batch was held back, so events held
            // by a stuck pass never keep others waiting.
            take_keyed: schema.sql(&format!(
                "WITH batch AS MATERIALIZED (
                    SELECT ctid, id, payload, ordering_key FROM __SCHEMA__.outbox
                    WHERE dispatched_at IS NULL AND ordering_key IS NOT NULL AND id > $3
                    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
                 ), fenced AS MATERIALIZED (
                    SELECT k.ordering_key, (
                        SELECT o.id FROM __SCHEMA__.outbox o
                        WHERE o.ordering_key = k.ordering_key AND o.dispatched_at IS NULL
                          AND NOT EXISTS (SELECT 1 FROM batch b WHERE b.id = o.id)
                        ORDER BY o.id LIMIT 1) AS first_elsewhere
                    FROM (SELECT DISTINCT ordering_key FROM batch) k
                 ), ok AS MATERIALIZED (
                    SELECT b.ctid, b.id, b.payload FROM batch b JOIN fenced f ON f.ordering_key = b.ordering_key
                    WHERE f.first_elsewhere IS NULL OR b.id < f.first_elsewhere
                 ), taken AS (
                    UPDATE __SCHEMA__.outbox SET dispatched_at = now()
                    WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM (
                            SELECT ctid, sum(octet_length(payload::text)) OVER (ORDER BY id)
                                         - octet_length(payload::text) AS before
                            FROM ok) s
                        WHERE before < $2))
                    RETURNING {TAKEN}
                 )
                 SELECT t.*, h.n, h.scanned, h.last FROM (
                    SELECT (SELECT count(*) FROM batch) - (SELECT count(*) FROM ok) AS n,
                           (SELECT count(*) FROM batch) AS scanned, (SELECT max(id) FROM batch) AS last) h
                 LEFT JOIN taken t ON true"
            )),
            // With it, what a small take locked is marked dispatched (`$10`; one statement, not
            // two: each costs its executor's start on every pass). Leases run from the insert
            // (`clock_timestamp()`), not from the transaction's start: the pass may have waited
            // for the fan-out lock (an endpoint change), and the worker counts the whole lease
            // from the handoff.
            insert: schema.sql(
                "WITH marked AS (
                     UPDATE __SCHEMA__.outbox SET dispatched_at = now() WHERE id = ANY($10::bigint[]))
                 INSERT INTO __SCHEMA__.deliveries
                    (id, outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner,
                     lease_expires_at, ordering_key)
                 SELECT u.id, u.outbox_id, u.event_id, u.event_type, u.endpoint_id, u.status,
                        CASE WHEN u.status = 'delivering' THEN 1 ELSE 0 END,
                        CASE WHEN u.status = 'delivering' THEN $7::uuid END,
                        CASE WHEN u.status = 'delivering' THEN clock_timestamp() + make_interval(secs => $8) END,
                        u.ordering_key
                 FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::text[], $9::text[])
                   AS u(id, outbox_id, event_id, event_type, endpoint_id, status, ordering_key)",
            ),
            insert_folded: schema.sql(INSERT_FOLDED),
            known: Known::default(),
        }
    }

    /// Fans out one batch. Call again while it returns a full batch ([`Dispatcher::batch`], or
    /// [`Dispatcher::small_batch`] for a `small` pass: one woken by a notification or a probe).
    /// Only keyed events with an `id` above `after` (0: all).
    ///
    /// Two round trips when there is something to fan out (three when the endpoints changed):
    /// the transaction's start, the lock, the take and the pass's head go out together; the
    /// deliveries' insert, a small take's marking and the commit go out together. The transaction is opened by hand (`BEGIN` sent with the rest), so every
    /// way out of it before the commit rolls it back before the connection returns to the pool.
    pub async fn dispatch_once(&self, after: i64, small: bool) -> anyhow::Result<Dispatched> {
        let mut guard = InTransaction(Some(self.pool.get().await?));
        let client = guard.0.as_ref().expect("just set");
        let result = self.pass(client, after, small).await;
        // Outside a transaction `ROLLBACK` only warns. A connection that cannot confirm it
        // promptly leaves the pool with the guard.
        let clean = result.is_ok()
            || (!client.is_closed()
                && tokio::time::timeout(ROLLBACK_WAIT, client.batch_execute("ROLLBACK"))
                    .await
                    .is_ok_and(|r| r.is_ok()));
        if clean {
            drop(guard.0.take());
        }
        result
    }

    async fn pass(
        &self,
        client: &deadpool_postgres::Client,
        after: i64,
        small: bool,
    ) -> anyhow::Result<Dispatched> {
        // Everything the pass runs is prepared before it starts, so each round trip goes out
        // whole on its first poll (`advance` included: see `Ordering::advance_sql`).
        let (insert, insert_folded, _) = futures_util::try_join!(
            client.prepare_cached(&self.insert),
            client.prepare_cached(&self.insert_folded),
            client.prepare_cached(self.ordering.advance_sql()),
        )?;
        // The lock (shared; an endpoint change takes it exclusively, see
        // `endpoints::exclude_fan_out`) comes first, so the endpoints are not about to change
        // under this pass. Their version is read in the take's own statement (one snapshot), so
        // an endpoint created before an event committed is seen by the pass that takes the event.
        // The pass runs on cached plans: planning the take cost more than running it. Every plan
        // is made (and remade after the outbox is analyzed) with sequential scans off, so a plan
        // cached while the outbox was small cannot keep scanning the whole table once it is large:
        // the take always walks the undispatched-rows index in `id` order. The endpoint tables
        // have no index to use instead; costed with sequential scans off, their read would be
        // compiled (JIT) on every run, so JIT is off. Every message is one more answer the server
        // flushes and this side wakes for: all of it goes as one message where it can.
        let take = if small {
            vec![self.small_batch]
        } else {
            vec![self.batch, self.batch_bytes]
        };
        let opened = self.opening.open(client, small, &take, &self.known).await?;
        let (head, targets, mut rows) = (opened.head, opened.targets, opened.taken);
        // Events a small take locked without marking them: marked in the second round trip.
        let unmarked: Vec<i64> = if opened.marked {
            Vec::new()
        } else {
            rows.iter().map(|r| r.id).collect()
        };
        let unhindered =
            |t: &Target| !self.default_limited && !t.rate_limited && !head.hindered.contains(&t.id);
        // Claims take the gated statement only while some endpoint has a policy in force (seen
        // on every pass, empty ones included; until then a claim just skips that endpoint).
        self.fast.capacity.set_hindered(
            self.default_limited || targets.iter().any(|t| t.active && !unhindered(t)),
        );
        let (mut held_back, mut scanned, mut last_id) = (0, 0, 0);
        if head.keyed {
            // Keyed events may bring as much again into memory, at most half as much.
            let half = self.batch_bytes / 2;
            let params: [&(dyn ToSql + Sync); 3] = [&self.batch, &half, &after];
            let stmt = client.prepare_cached(&self.take_keyed).await?;
            // Planned for the outbox as it is now (its plan depends on how many keys wait), with
            // sequential scans allowed, then cached plans again.
            let (_, keyed_rows, _) = futures_util::try_join!(
                client.batch_execute(
                    "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_seqscan = on"
                ),
                client.query(&stmt, &params),
                client.batch_execute("SET LOCAL plan_cache_mode = force_generic_plan"),
            )?;
            // One row even when nothing was taken, for the counts.
            if let Some(r) = keyed_rows.first() {
                held_back = r.try_get::<_, i64>("n")? as usize;
                scanned = r.try_get::<_, i64>("scanned")? as usize;
                last_id = r.try_get::<_, Option<i64>>("last")?.unwrap_or(0);
            }
            rows.extend(taken(&keyed_rows)?);
        }
        // RETURNING keeps no order; fan out in commit-id order.
        rows.sort_unstable_by_key(|r| r.id);
        if rows.is_empty() {
            client.batch_execute("COMMIT").await?;
            let done = Dispatched {
                held_back,
                scanned,
                last_id,
                ..Dispatched::default()
            };
            return Ok(done);
        }

        let mut new = NewDeliveries::default();
        let mut keys = Keys::default();
        let mut handoffs = Vec::new();
        let (committed, commit) = FanOutCommit::new();
        let mut lags = Vec::with_capacity(rows.len());
        for r in &rows {
            let (id, event_id) = (r.id, r.event_id);
            let (event_type, ordering_key) = (r.event_type.as_str(), r.ordering_key.as_deref());
            lags.push(r.lag);
            for t in targets
                .iter()
                .filter(|t| t.wants(event_type, r.tenant.as_deref(), r.target.as_deref()))
            {
                let delivery_id = Uuid::now_v7();
                // A keyed delivery waits its turn: the key's head is chosen below, under its lock.
                if let Some(key) = ordering_key {
                    let queued = DeliveryStatus::Queued;
                    new.push(
                        delivery_id,
                        id,
                        event_id,
                        event_type,
                        &t.id,
                        queued,
                        ordering_key,
                    );
                    keys.push(&t.id, key);
                    continue;
                }
                let hold = (t.active && unhindered(t))
                    .then(|| self.fast.capacity.try_hold(&t.id, r.payload.len()))
                    .flatten();
                // Inactive endpoints still get their deliveries, paused, so re-activating one
                // loses nothing.
                let status = match (&hold, t.active) {
                    (Some(_), _) => DeliveryStatus::Delivering,
                    (None, true) => DeliveryStatus::Pending,
                    (None, false) => DeliveryStatus::Paused,
                };
                new.push(delivery_id, id, event_id, event_type, &t.id, status, None);
                if let Some(hold) = hold {
                    let delivery = Claimed {
                        id: delivery_id,
                        attempt: 1,
                        endpoint_id: t.id.clone(),
                        event_id,
                        event_type: event_type.to_string(),
                        payload: r.payload.clone(),
                        created_at: r.created_at,
                        url: t.url.clone(),
                        headers: t.headers.clone(),
                        signature: t.signature.clone(),
                        retry: t.retry.clone(),
                        trace: r.trace.clone(),
                        secrets: t.secrets.clone(),
                        ordering_key: None,
                        probe: false,
                    };
                    handoffs.push(Handoff {
                        delivery,
                        hold,
                        commit: commit.clone(),
                        fold: None,
                    });
                }
            }
        }
        let (owner, lease) = (self.fast.owner, self.fast.lease.as_secs_f64());
        let deliveries = new.ids.len();
        let mut pending = new
            .statuses
            .iter()
            .filter(|s| **s == DeliveryStatus::Pending)
            .count();
        // A small pass (the latency path) hands its deliveries over first and waits a moment for
        // their 2xx outcomes, to insert them `delivered` (`FOLD_WAIT`); any other commits at once,
        // and so does one with deliveries that wait for its commit to become due (pending ones,
        // a key's next head).
        let busy = small && self.fast.fold.small_pass();
        let offered = if busy && pending == 0 && keys.is_empty() {
            self.fast.fold.offer(&mut handoffs)
        } else {
            Vec::new()
        };
        let fold = !offered.is_empty();
        if fold {
            self.hand_over(std::mem::take(&mut handoffs));
        }
        let folded = gather(&self.fast.fold, offered).await;
        let outcomes = FoldedColumns::of(&folded);
        // Keys with no head get one: their earliest queued delivery becomes due. Then the
        // commit, in the same round trip.
        let outcome = {
            let second = async {
                futures_util::try_join!(
                    async {
                        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                            &new.ids,
                            &new.outbox_ids,
                            &new.event_ids,
                            &new.event_types,
                            &new.endpoints,
                            &new.statuses,
                            &owner,
                            &lease,
                            &new.ordering_keys,
                            &unmarked,
                        ];
                        if fold {
                            params.extend(outcomes.params());
                            let rows = client.query(&insert_folded, &params).await?;
                            return rows
                                .iter()
                                .map(|r| Ok(r.try_get::<_, Uuid>(0)?))
                                .collect::<anyhow::Result<Vec<Uuid>>>();
                        }
                        if deliveries > 0 || !unmarked.is_empty() {
                            client.execute(&insert, &params).await?;
                        }
                        Ok(Vec::new())
                    },
                    self.ordering.advance(client, &keys, &[]),
                    async { Ok(client.batch_execute("COMMIT").await?) },
                )
            };
            tokio::pin!(second);
            // Polled once, the round trip is on the wire; the requests start now, beside it.
            let first_poll = futures_util::poll!(&mut second);
            self.hand_over(handoffs);
            match first_poll {
                std::task::Poll::Ready(outcome) => outcome,
                std::task::Poll::Pending => second.await,
            }
        };
        drop(outcomes);
        committed.settle(outcome.is_ok());
        let written = match &outcome {
            Ok((written, _, _)) => written.as_slice(),
            Err(_) => &[],
        };
        let folded_n = written.len();
        if outcome.is_err() && !folded.is_empty() {
            tracing::warn!(
                deliveries = folded.len(),
                "a fan-out that waited for its deliveries' outcomes did not confirm its commit; unless it committed, the events are fanned out and delivered again"
            );
        }
        for f in folded {
            match outcome {
                Ok(_) if written.contains(&f.ack.id) => f.written(),
                Ok(_) => f.settle(),
                // The delivery does not exist: its hold is freed as it is dropped.
                Err(_) => drop(f),
            }
        }
        let (_, heads, _) = outcome?;
        pending += heads as usize;
        let done = Dispatched {
            events: rows.len(),
            deliveries,
            pending,
            lags,
            held_back,
            scanned,
            last_id,
            folded: folded_n,
        };
        Ok(done)
    }

    /// Starts the requests of the deliveries a pass handed over.
    fn hand_over(&self, handoffs: Vec<Handoff>) {
        // Only a stopped worker drops the receiver; the leases then lapse and the reaper makes
        // these deliveries due again.
        if !handoffs.is_empty() && self.fast.handoff.send(handoffs).is_err() {
            tracing::warn!(
                "the delivery worker has stopped; fresh deliveries wait for their lease to lapse"
            );
        }
    }

    /// Whether any event waits (taken or not by a pass in progress): one round trip, no
    /// transaction, no lock; what decides whether a pass is worth running while events flow.
    pub async fn waiting(&self) -> anyhow::Result<bool> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(&self.waiting).await?;
        Ok(client.query_one(&stmt, &[]).await?.get(0))
    }

    pub fn batch(&self) -> usize {
        self.batch as usize
    }

    pub fn small_batch(&self) -> usize {
        self.small_batch as usize
    }
}

/// How many payloads of at most `max_payload` bytes fit in `batch_bytes`: at least one (a pass
/// always takes its first row) and at most `batch`.
fn small_batch(batch: usize, batch_bytes: u64, max_payload: u64) -> i64 {
    (batch_bytes / max_payload.max(1)).clamp(1, batch.max(1) as u64) as i64
}

/// How long a failed pass waits for its `ROLLBACK` before giving the connection up.
const ROLLBACK_WAIT: Duration = Duration::from_secs(2);

/// A pooled connection in a transaction opened by hand. Unless the pass takes it back out (its
/// transaction committed or rolled back), dropping the guard (a panic, a dropped future, a
/// rollback that did not answer) takes the connection out of the pool and closes it: going back
/// with the transaction open, the next user's `COMMIT` would commit this pass's take without its
/// deliveries.
struct InTransaction(Option<deadpool_postgres::Client>);

impl Drop for InTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The delivery rows of one pass, column by column (for `unnest`).
#[derive(Default)]
struct NewDeliveries<'a> {
    ids: Vec<Uuid>,
    outbox_ids: Vec<i64>,
    event_ids: Vec<Uuid>,
    event_types: Vec<&'a str>,
    endpoints: Vec<&'a str>,
    statuses: Vec<DeliveryStatus>,
    ordering_keys: Vec<Option<&'a str>>,
}

impl<'a> NewDeliveries<'a> {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        id: Uuid,
        outbox_id: i64,
        event_id: Uuid,
        event_type: &'a str,
        endpoint: &'a str,
        status: DeliveryStatus,
        ordering_key: Option<&'a str>,
    ) {
        self.ids.push(id);
        self.outbox_ids.push(outbox_id);
        self.event_ids.push(event_id);
        self.event_types.push(event_type);
        self.endpoints.push(endpoint);
        self.statuses.push(status);
        self.ordering_keys.push(ordering_key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_take_stays_within_the_byte_budget_at_the_largest_payload() {
        const MIB: u64 = 1 << 20;
        // The defaults: a 4 MiB budget per pass, 1 MiB payloads at most.
        assert_eq!(small_batch(500, 4 * MIB, MIB), 4);
        // A payload larger than the budget still goes, alone.
        assert_eq!(small_batch(500, MIB, 4 * MIB), 1);
        // Never more than a full batch.
        assert_eq!(small_batch(2, 4 * MIB, 1024), 2);
        for (batch, bytes, max) in [(500, 4 * MIB, MIB), (100, 3 * MIB + 5, MIB), (7, 999, 100)] {
            let n = small_batch(batch, bytes, max) as u64;
            assert!(n * max <= bytes.max(max), "{n} x {max} > {bytes}");
        }
    }
}
