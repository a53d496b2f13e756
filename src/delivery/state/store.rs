//! The pipeline's statements on deliveries: claims, outcomes, hand-backs, deferrals, the sweeper
//! and the reaper, each fenced as the parent module says (owner, attempt, `delivering`).

use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{flow, ordering, storable, Ack, Claimed, DeliveryStatus, Settle, Trace};
use crate::db::Schema;

mod claim;
mod sweep;

pub use claim::Room;
use claim::{CLAIM_GATED, CLAIM_PLAIN};
use sweep::{sweep_sql, RECENT};

/// Prepared SQL texts for one schema.
pub struct DeliveryStore {
    pool: Pool,
    pub ordering: ordering::Ordering,
    flow: flow::Flow,
    flow_defaults: flow::FlowDefaults,
    claim: String,
    claim_plain: String,
    ack: String,
    ack_late: String,
    disable_gone: String,
    hand_back: String,
    sweep: String,
    /// The sweep of every endpoint, not only those changed within the hour.
    sweep_all: String,
    fan_out_lock: String,
    announce_gone: String,
    defer: String,
    reap: String,
    /// The keys of lapsed heads `reap` is about to fail or cancel, to lock first.
    reap_keys: String,
}

/// Why a keyed delivery of an endpoint's old tenant, left in flight by a tenant change, was
/// cancelled as it came back due (see `keyed_for_another_tenant`).
/// (Written into SQL as a literal: no quote in it.)
const RETENANTED: &str =
    "cancelled: the tenant of the endpoint changed while this keyed attempt was in flight";

/// The outcome statement: `$1` the owner, `$2`-`$10` and `$13` the outcomes column by column,
/// `$11`-`$12` the endpoints that answered well and how often, `$14` the default breaker window.
/// `fence`: which deliveries an outcome may still change; `conflict`: the attempt row's conflict
/// clause.
fn ack_sql(fence: &str, conflict: &str) -> String {
    let another_tenant = super::keyed_for_another_tenant();
    format!(
        "WITH u AS (
                    SELECT * FROM unnest($2::uuid[], $3::int[], $4::text[], $5::timestamptz[], $6::int[],
                                         $7::text[], $8::timestamptz[], $9::int[], $10::bytea[], $13::text[])
                      AS u(id, attempt, status, next_at, status_code, error, started_at, duration_ms,
                           response_excerpt, request_headers)
                 ), upd AS (
                    UPDATE __SCHEMA__.deliveries d
                    SET status = CASE
                            WHEN u.status <> 'delivered' AND e.deleted_at IS NOT NULL THEN 'cancelled'
                            -- Nor tried again, nor left failed to block its key: see
                            -- `keyed_for_another_tenant`.
                            WHEN u.status IN ('pending', 'failed') AND {another_tenant} THEN 'cancelled'
                            WHEN u.status = 'pending' AND NOT e.active THEN 'paused'
                            ELSE u.status END,
                        next_attempt_at = COALESCE(u.next_at, d.next_attempt_at),
                        lease_owner = NULL, lease_expires_at = NULL, lease_lapses = 0,
                        last_status_code = u.status_code, last_error = u.error, updated_at = now(),
                        delivered_at = CASE WHEN u.status = 'delivered' THEN now() ELSE d.delivered_at END
                    FROM u, __SCHEMA__.endpoints e
                    WHERE d.id = u.id AND d.attempts = u.attempt AND e.id = d.endpoint_id
                      AND {fence}
                    RETURNING d.id
                 ), healthy AS (
                    -- Successes clear the breaker's count of an endpoint that had failed (see
                    -- `flow`), and start a new window once the last one ended (as `record_flow`
                    -- does), so the row is left alone again and its count never overflows; the
                    -- rows are locked in endpoint order, as every flow writer does.
                    UPDATE __SCHEMA__.endpoint_flow f
                    SET consecutive_failures = 0,
                        window_started_at = CASE WHEN l.ended THEN now() ELSE f.window_started_at END,
                        window_attempts = CASE WHEN l.ended THEN l.n
                                               ELSE LEAST(f.window_attempts::bigint + l.n, 2147483647) END,
                        window_failures = CASE WHEN l.ended THEN 0 ELSE f.window_failures END,
                        updated_at = now()
                    FROM (SELECT x.endpoint_id, h.n,
                                 -- The endpoint's own window, read only for a row found here:
                                 -- joined, the plan read every endpoint on every settle.
                                 x.window_started_at < now() - make_interval(secs => COALESCE(
                                     (SELECT (e.breaker->>'window_s')::float8 FROM __SCHEMA__.endpoints e
                                      WHERE e.id = x.endpoint_id), $14::float8)) AS ended
                          FROM __SCHEMA__.endpoint_flow x
                          JOIN unnest($11::text[], $12::int[]) AS h(id, n) ON h.id = x.endpoint_id
                          WHERE x.opened_at IS NULL AND (x.consecutive_failures > 0 OR x.window_failures > 0)
                          ORDER BY x.endpoint_id FOR UPDATE OF x) l
                    WHERE f.endpoint_id = l.endpoint_id
                 )
                 INSERT INTO __SCHEMA__.attempts
                    (delivery_id, attempt, started_at, duration_ms, status_code, response_excerpt, error,
                     request_headers)
                 SELECT u.id, u.attempt, u.started_at, u.duration_ms, u.status_code, u.response_excerpt,
                        u.error, u.request_headers
                 FROM u JOIN upd ON upd.id = u.id
                 {conflict}"
    )
}

impl DeliveryStore {
    pub fn new(
        pool: Pool,
        schema: &Schema,
        on_failure: crate::config::OnFailure,
        flow_defaults: flow::FlowDefaults,
    ) -> Self {
        let another_tenant = super::keyed_for_another_tenant();
        Self {
            pool,
            ordering: ordering::Ordering::new(schema, on_failure),
            flow: flow::Flow::new(schema, &flow_defaults),
            flow_defaults,
            claim_plain: schema.sql(CLAIM_PLAIN),
            claim: schema.sql(CLAIM_GATED),
            ack: schema.sql(&ack_sql(
                "d.status = 'delivering' AND d.lease_owner = $1",
                "",
            )),
            // The same attempt's outcome after its lease lapsed (the database away longer than
            // a lease), while no replica has claimed it since: still its own (a claim would have
            // moved `attempts` on). The reaper's 'outcome unknown' row gives way to it. Apart from
            // the usual statement, run only for outcomes it refused: with the two fences in one
            // statement, its cached generic plan cost Postgres 40 % more CPU per event at 1,000/s
            // and held bursts up by over a second.
            ack_late: schema.sql(&ack_sql(
                // (`$1`, the owner, named only so the statement has the usual parameters.)
                // Not a keyed delivery the reaper failed: its key has moved on (skip) and a late
                // retry would give it a second head.
                "d.status IN ('pending', 'paused', 'failed') AND d.lease_owner IS NULL
                 AND d.lease_lapses > 0 AND $1::uuid IS NOT NULL
                 AND NOT (d.status = 'failed' AND d.ordering_key IS NOT NULL)",
                "ON CONFLICT (delivery_id, attempt) DO UPDATE SET
                    started_at = EXCLUDED.started_at, duration_ms = EXCLUDED.duration_ms,
                    status_code = EXCLUDED.status_code, response_excerpt = EXCLUDED.response_excerpt,
                    error = EXCLUDED.error, request_headers = EXCLUDED.request_headers",
            )),
            disable_gone: schema.sql(
                "UPDATE __SCHEMA__.endpoints
                 SET active = false, disabled_reason = 'the endpoint answered 410 Gone', updated_at = now()
                 WHERE id = ANY($1) AND active",
            ),
            // In the state its endpoint calls for: a delivery handed back because its endpoint was
            // stopped must not become claimable again.
            // Keys whose head this cancels move on by the sweeper (as after `cancel_ineligible`).
            hand_back: schema.sql(&format!(
                "UPDATE __SCHEMA__.deliveries d
                 SET status = CASE WHEN e.deleted_at IS NOT NULL OR {another_tenant} THEN 'cancelled'
                                   WHEN e.active THEN 'pending' ELSE 'paused' END,
                     attempts = d.attempts - 1, lease_owner = NULL,
                     lease_expires_at = NULL, next_attempt_at = now(), updated_at = now(),
                     last_error = CASE WHEN e.deleted_at IS NULL AND {another_tenant} THEN '{RETENANTED}'
                                       ELSE d.last_error END
                 FROM unnest($2::uuid[], $3::int[]) AS u(id, attempt), __SCHEMA__.endpoints e
                 WHERE d.id = u.id AND d.attempts = u.attempt AND d.status = 'delivering'
                   AND d.lease_owner = $1 AND e.id = d.endpoint_id"
            )),
            fan_out_lock: schema.fan_out_lock_key(),
            // Every replica stops sending to an endpoint that answered 410 (held deliveries back).
            announce_gone: format!(
                "SELECT pg_notify('{}', 'stop:' || id) FROM unnest($1::text[]) AS g(id)",
                schema.endpoints_channel()
            ),
            sweep: schema.sql(&sweep_sql(RECENT)),
            sweep_all: schema.sql(&sweep_sql("")),
            // Not attempted (no request went out), so the claim's attempt count is undone; due
            // again after a delay, with the reason, in the state its endpoint calls for.
            defer: schema.sql(&format!(
                "UPDATE __SCHEMA__.deliveries d
                 SET status = CASE WHEN e.deleted_at IS NOT NULL OR {another_tenant} THEN 'cancelled'
                                   WHEN e.active THEN 'pending' ELSE 'paused' END,
                     attempts = d.attempts - 1, lease_owner = NULL, lease_expires_at = NULL,
                     next_attempt_at = now() + make_interval(secs => $5),
                     last_error = CASE WHEN e.deleted_at IS NULL AND {another_tenant} THEN '{RETENANTED}'
                                       ELSE u.reason END,
                     updated_at = now()
                 FROM unnest($2::uuid[], $3::int[], $4::text[]) AS u(id, attempt, reason),
                      __SCHEMA__.endpoints e
                 WHERE d.id = u.id AND d.attempts = u.attempt AND d.status = 'delivering'
                   AND d.lease_owner = $1 AND e.id = d.endpoint_id"
            )),
            // A lapsed lease means the replica died (or stalled) mid-attempt: whether the request
            // went out is unknown, so the attempt is recorded as such and the delivery is due again
            // (after `$3`, the grace in which a replica cut off meanwhile writes what it holds).
            // A delivery whose leases lapse `$2` times in a row is a poison pill (it kills or stalls
            // whoever makes it): it is failed, with the reason, instead of being sent forever.
            reap_keys: schema.sql(&format!(
                "SELECT DISTINCT d.endpoint_id, d.ordering_key
                 FROM __SCHEMA__.deliveries d JOIN __SCHEMA__.endpoints e ON e.id = d.endpoint_id
                 WHERE d.status = 'delivering' AND d.lease_expires_at < now() AND d.ordering_key IS NOT NULL
                   AND (d.lease_lapses + 1 >= $2 OR e.deleted_at IS NOT NULL OR {another_tenant})
                 ORDER BY 1, 2 LIMIT $1"
            )),
            reap: schema.sql(&format!(
                "WITH lapsed AS MATERIALIZED (
                    SELECT id FROM __SCHEMA__.deliveries
                    WHERE status = 'delivering' AND lease_expires_at < now()
                    ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
                 ), upd AS (
                    UPDATE __SCHEMA__.deliveries d
                    SET status = CASE WHEN e.deleted_at IS NOT NULL OR {another_tenant} THEN 'cancelled'
                                      WHEN d.lease_lapses + 1 >= $2 THEN 'failed'
                                      WHEN e.active THEN 'pending' ELSE 'paused' END,
                        lease_lapses = d.lease_lapses + 1,
                        lease_owner = NULL, lease_expires_at = NULL,
                        next_attempt_at = now() + make_interval(secs => $3),
                        last_error = CASE WHEN e.deleted_at IS NULL AND {another_tenant} THEN '{RETENANTED}'
                            WHEN d.lease_lapses + 1 >= $2 AND e.deleted_at IS NULL
                            THEN 'given up: the lease lapsed ' || (d.lease_lapses + 1)
                                 || ' times in a row without an outcome being recorded (outbound.max_lease_lapses)'
                            ELSE 'lease expired: the replica making this attempt stopped or stalled' END,
                        updated_at = now()
                    FROM lapsed, __SCHEMA__.endpoints e
                    WHERE d.id = lapsed.id AND e.id = d.endpoint_id
                    RETURNING d.id, d.attempts, d.status, d.endpoint_id, d.ordering_key
                 ), ins AS (
                    INSERT INTO __SCHEMA__.attempts (delivery_id, attempt, started_at, duration_ms, error)
                    SELECT id, attempts, now(), 0, 'lease expired: outcome unknown' FROM upd
                    ON CONFLICT DO NOTHING
                 )
                 SELECT id, status, endpoint_id, ordering_key FROM upd"
            )),
        }
    }

    /// Claims up to `limit` due deliveries for `owner`, at most `per_endpoint` per endpoint minus
    /// what this replica already has in flight there (`busy`), their payloads within `room`.
    /// `gated`: some endpoint has a flow policy in force (see `flow`); otherwise the cheaper
    /// statement, which leaves any such endpoint out.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        gated: bool,
        owner: Uuid,
        limit: i64,
        per_endpoint: i32,
        busy: &[(String, i32)],
        lease: Duration,
        room: Room,
    ) -> anyhow::Result<(Vec<Claimed>, u64)> {
        let max_bytes = room.param();
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(if gated {
                &self.claim
            } else {
                &self.claim_plain
            })
            .await?;
        let busy_ids: Vec<&str> = busy.iter().map(|(id, _)| id.as_str()).collect();
        let busy_n: Vec<i32> = busy.iter().map(|(_, n)| *n).collect();
        let (lease_s, probe_s) = (lease.as_secs_f64(), self.flow_defaults.probe_seconds());
        let params: [&(dyn ToSql + Sync); 9] = [
            &owner,
            &limit,
            &per_endpoint,
            &busy_ids,
            &busy_n,
            &lease_s,
            &max_bytes,
            &self.flow_defaults.rate,
            &probe_s,
        ];
        // The plain statement takes no probe interval.
        let params = if gated { &params[..] } else { &params[..8] };
        let rows = client.query(&stmt, params).await?;
        // The gated statement always returns one row, for the count of deliveries it held back.
        let held = rows.first().map_or(0, |r| r.get::<_, i64>(15)) as u64;
        let claimed = rows
            .iter()
            .filter(|r| r.get::<_, Option<Uuid>>(0).is_some())
            .map(|r| Claimed {
                id: r.get(0),
                attempt: r.get(1),
                endpoint_id: r.get(2),
                event_id: r.get(3),
                event_type: r.get(4),
                // Straight from the row buffer: one copy of the payload, not two.
                payload: r.get::<_, &str>(5).into(),
                created_at: super::event_time(r.try_get(6).ok()),
                url: r.get(7),
                headers: r.get(8),
                signature: r.get(9),
                retry: r.get(10),
                trace: Trace::from_pair(r.get(11)),
                secrets: r.get(12),
                ordering_key: r.get(13),
                probe: r.get::<_, Option<bool>>(14).unwrap_or(false),
            })
            .collect();
        Ok((claimed, held))
    }

    /// Writes a batch of outcomes in one transaction: attempts recorded, deliveries settled,
    /// endpoints that answered 410 disabled (their waiting deliveries are paused by [`Self::sweep`],
    /// outside this transaction). Acks whose fence fails are dropped by the database.
    /// Returns how many ordering keys' next deliveries it made due.
    pub async fn settle(&self, owner: Uuid, acks: &[Ack]) -> anyhow::Result<i32> {
        if acks.is_empty() {
            return Ok(0);
        }
        let mut client = self.pool.get().await?;
        let n = acks.len();
        let (mut ids, mut attempts, mut statuses, mut next_at) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut sent: Vec<Option<&str>> = Vec::with_capacity(n);
        let (mut codes, mut errors, mut started, mut durations, mut bodies) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for a in acks {
            ids.push(a.id);
            attempts.push(a.attempt);
            let (status, at) = match a.settle {
                Settle::Delivered => (DeliveryStatus::Delivered, None),
                Settle::Retry { at } => (DeliveryStatus::Pending, Some(at)),
                Settle::Failed => (DeliveryStatus::Failed, None),
                // Paused by the CASE in the statement, since the endpoint is now inactive.
                Settle::EndpointGone => (DeliveryStatus::Pending, Some(Utc::now())),
            };
            statuses.push(status);
            next_at.push(at);
            codes.push(a.record.status_code);
            errors.push(a.record.error.as_deref().map(storable));
            started.push(a.record.started_at);
            durations.push(a.record.duration_ms);
            bodies.push(a.record.response_body.as_deref());
            sent.push(a.record.request_headers.as_deref());
        }
        let mut flow = flow::FlowBatch::of(acks);
        let mut gone: Vec<&str> = acks
            .iter()
            .filter(|a| a.settle == Settle::EndpointGone)
            .map(|a| a.endpoint_id.as_str())
            .collect();
        // Keyed deliveries that leave their key's head: the key moves on in the same transaction,
        // under its lock (taken first, see `ordering`). One due again may leave it too (cancelled
        // by the statement: `keyed_for_another_tenant`); advancing a key that still has its head
        // changes nothing.
        let mut keys = ordering::Keys::default();
        let mut failed = Vec::new();
        for a in acks {
            if let Some(key) = &a.ordering_key {
                keys.push(&a.endpoint_id, key);
                if a.settle == Settle::Failed {
                    failed.push(a.id);
                }
            }
        }
        let alone = gone.is_empty() && keys.is_empty() && !flow.needs_record();
        if !alone {
            // One flow writer per transaction, locking in endpoint order (see `flow`): the
            // healthy endpoints go through `record_flow` with the rest, not the ack statement.
            flow.fold_healthy_into_record();
        }
        let window_s = self.flow_defaults.window_seconds();
        let params: [&(dyn ToSql + Sync); 14] = [
            &owner,
            &ids,
            &attempts,
            &statuses,
            &next_at,
            &codes,
            &errors,
            &started,
            &durations,
            &bodies,
            &flow.healthy,
            &flow.healthy_attempts,
            &sent,
            &window_s,
        ];
        if alone {
            // The usual case: one statement in a transaction of its own, sent as one pipelined
            // round trip. It runs on a cached plan: it updates rows by key, so no plan depends on
            // a table's size, and planning it afresh cost more than running it.
            let stmt = client.prepare_cached(&self.ack).await?;
            let (begin, ack, commit) = tokio::join!(
                client.batch_execute("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan"),
                client.execute(&stmt, &params),
                client.batch_execute("COMMIT"),
            );
            begin?;
            let written = ack?;
            commit?;
            if (written as usize) < n {
                self.write_late(&client, &params).await?;
            }
            return Ok(0);
        }
        gone.sort_unstable();
        gone.dedup();
        let tx = client.transaction().await?;
        self.ordering.lock(&tx, &keys).await?;
        if !gone.is_empty() {
            tx.execute(&self.disable_gone, &[&gone]).await?;
            tx.execute(&self.announce_gone, &[&gone]).await?;
        }
        let stmt = tx.prepare_cached(&self.ack).await?;
        if (tx.execute(&stmt, &params).await? as usize) < n {
            self.write_late(&tx, &params).await?;
        }
        let promoted = self.ordering.advance(&tx, &keys, &failed).await?;
        let transitions = self.flow.record(&tx, &flow).await?;
        tx.commit().await?;
        for t in &transitions {
            tracing::warn!(endpoint.id = %t.endpoint_id, circuit = %t.kind, reason = %t.reason, "endpoint circuit changed");
        }
        Ok(promoted)
    }

    /// Outcomes the usual statement refused, written if their lease lapsed with no claim since
    /// (see `ack_late`). Their successes are not counted again by the breaker's window.
    async fn write_late(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        params: &[&(dyn ToSql + Sync); 14],
    ) -> anyhow::Result<u64> {
        let (none, zero): (Vec<&str>, Vec<i32>) = (Vec::new(), Vec::new());
        let mut late = *params;
        late[10] = &none;
        late[11] = &zero;
        let stmt = client.prepare_cached(&self.ack_late).await?;
        Ok(client.execute(&stmt, &late).await?)
    }

    /// Returns claimed-but-unfinished deliveries to `pending` at once (shutdown), undoing the
    /// attempt count the claim added, so another replica takes them without waiting for a lease.
    pub async fn hand_back(&self, owner: Uuid, items: &[(Uuid, i32)]) -> anyhow::Result<u64> {
        if items.is_empty() {
            return Ok(0);
        }
        let client = self.pool.get().await?;
        let ids: Vec<Uuid> = items.iter().map(|(id, _)| *id).collect();
        let attempts: Vec<i32> = items.iter().map(|(_, a)| *a).collect();
        Ok(client
            .execute(&self.hand_back, &[&owner, &ids, &attempts])
            .await?)
    }

    /// Returns deliveries this replica could not prepare, due again after `delay`.
    pub async fn defer(
        &self,
        owner: Uuid,
        items: &[crate::delivery::Deferral],
        delay: Duration,
    ) -> anyhow::Result<u64> {
        let client = self.pool.get().await?;
        let ids: Vec<Uuid> = items.iter().map(|d| d.id).collect();
        let attempts: Vec<i32> = items.iter().map(|d| d.attempt).collect();
        let reasons: Vec<std::borrow::Cow<'_, str>> =
            items.iter().map(|d| storable(&d.reason)).collect();
        Ok(client
            .execute(
                &self.defer,
                &[&owner, &ids, &attempts, &reasons, &delay.as_secs_f64()],
            )
            .await?)
    }

    /// One sweeper batch (see the statement); returns how many deliveries it moved.
    pub async fn sweep(&self, batch: i64) -> anyhow::Result<u64> {
        self.sweep_with(&self.sweep, batch).await
    }

    /// One sweeper batch over every endpoint, however long ago it changed: what the windowed sweep
    /// left (a backlog larger than an hour of sweeping, replicas down for that hour) still moves.
    /// Costs an index probe per endpoint and state, so it runs on the pruning interval.
    pub async fn sweep_all(&self, batch: i64) -> anyhow::Result<u64> {
        self.sweep_with(&self.sweep_all, batch).await
    }

    async fn sweep_with(&self, sql: &str, batch: i64) -> anyhow::Result<u64> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock_shared(hashtext($1))",
            &[&self.fan_out_lock],
        )
        .await?;
        let n = tx.execute(sql, &[&batch]).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// The ordering safety net (see `ordering`): one batch of keys after `cursor`.
    pub async fn mend_keys(
        &self,
        batch: i64,
        cursor: (String, String),
    ) -> anyhow::Result<(i32, (String, String))> {
        let mut client = self.pool.get().await?;
        self.ordering.mend(&mut client, batch, cursor).await
    }

    /// Makes deliveries whose lease lapsed due again after [`super::LAPSE_GRACE`] (or failed,
    /// after `max_lapses` in a row); returns how many.
    /// A keyed delivery failed here leaves its key in the same transaction, under the key's lock:
    /// committed apart, the failure would be visible before the key is blocked (`block`), and
    /// anything moving the key on meanwhile would send the next delivery past it.
    /// Keys are locked before rows, as every writer does (a settle of the same head would
    /// otherwise wait for the reaper's row while the reaper waits for its key).
    pub async fn reap(&self, batch: i64, max_lapses: i32) -> anyhow::Result<u64> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut locked = ordering::Keys::default();
        for r in tx.query(&self.reap_keys, &[&batch, &max_lapses]).await? {
            locked.push(r.get(0), r.get(1));
        }
        self.ordering.lock(&tx, &locked).await?;
        let grace = super::LAPSE_GRACE.as_secs_f64();
        let rows = tx.query(&self.reap, &[&batch, &max_lapses, &grace]).await?;
        // A keyed delivery failed or cancelled here no longer heads its key.
        let mut keys = ordering::Keys::default();
        let mut unlocked = ordering::Keys::default();
        let mut failed = Vec::new();
        for r in &rows {
            let status: DeliveryStatus = r.get(1);
            if let (Some(key), true) = (
                r.get::<_, Option<&str>>(3),
                matches!(status, DeliveryStatus::Failed | DeliveryStatus::Cancelled),
            ) {
                let endpoint: &str = r.get(2);
                keys.push(endpoint, key);
                failed.push(r.get::<_, Uuid>(0));
                let known = (locked.endpoints.iter().zip(&locked.keys))
                    .any(|(e, k)| e == endpoint && k == key);
                if !known {
                    unlocked.push(endpoint, key);
                }
            }
        }
        if !keys.is_empty() {
            // One that lapsed after the look above: locked now (the rare case the order
            // cannot cover).
            self.ordering.lock(&tx, &unlocked).await?;
            self.ordering.advance(&tx, &keys, &failed).await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }
}

#[cfg(test)]
mod tests;
