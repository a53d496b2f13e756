//! The claims' statements: due deliveries taken for one replica, fairly across endpoints, within
//! its memory budget and every endpoint's flow policy. Invariant: what a claim takes is leased to
//! its owner in the same statement; what it leaves is untouched.

use crate::delivery::state::trace_member;

/// The claims' `fit`: of the candidates `c` (numbered `n` in claim order), those whose payloads
/// stay within `$7` bytes (see [`CLAIM_PLAIN`]). One text for both claims.
macro_rules! fit {
    () => {
        "fit AS MATERIALIZED (
                    SELECT id FROM (
                        SELECT x.id, sum(x.len) OVER (ORDER BY x.n) AS upto, x.len
                        FROM (SELECT c.id, c.n, octet_length(o.payload::text) AS len
                              FROM c JOIN __SCHEMA__.outbox o ON o.id = c.outbox_id) x
                        WHERE $7::bigint >= 0 OR x.len <= -$7::bigint) s
                    WHERE CASE WHEN $7::bigint >= 0 THEN upto - len < $7::bigint ELSE upto <= -$7::bigint END
                 )"
    };
}

/// Fair across endpoints: endpoints in random order, each contributing at most its free
/// per-endpoint slots, so one endpoint's backlog cannot fill a batch. The MATERIALIZED fence stops
/// the planner from re-running the LIMIT subquery. `fit` keeps the payloads within `$7` bytes (the
/// first row always; with `$7` negative, only rows that fit whole within `-$7`), so a claim never
/// brings more into memory than the budget has room for; rows it leaves are unlocked at commit,
/// untouched. Leases run from the update (`clock_timestamp()`), not from the statement's start:
/// the gated claim may wait for other replicas' flow rows, and the worker counts the whole lease
/// from when the claim was sent.
///
/// This one runs while no endpoint has a flow policy in force (what the fan-out last saw): the
/// gated statement's work is skipped, and an endpoint whose policy started since is left out (one
/// probe each) until the next fan-out pass says so.
pub(super) const CLAIM_PLAIN: &str = concat!(
                "WITH c AS MATERIALIZED (
                    SELECT due.id, due.outbox_id, row_number() OVER () AS n
                    FROM (SELECT x.id FROM __SCHEMA__.endpoints x
                          WHERE x.active AND x.deleted_at IS NULL
                            AND x.rate_limit IS NULL AND $8::float8 IS NULL
                            AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.endpoint_flow f WHERE f.endpoint_id = x.id
                                AND (f.backoff_rate IS NOT NULL OR f.paused_until > now() OR f.opened_at IS NOT NULL))
                          ORDER BY random()) e
                    CROSS JOIN LATERAL (
                        SELECT d.id, d.outbox_id FROM __SCHEMA__.deliveries d
                        WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at <= now()
                        ORDER BY d.next_attempt_at
                        LIMIT GREATEST(0, $3::int - COALESCE(
                            (SELECT b.n FROM unnest($4::text[], $5::int[]) AS b(id, n) WHERE b.id = e.id), 0))
                        FOR UPDATE OF d SKIP LOCKED
                    ) due
                    LIMIT $2
                 ), ",
    fit!(),
    "
                 UPDATE __SCHEMA__.deliveries d
                 SET status = 'delivering', attempts = d.attempts + 1, lease_owner = $1,
                     lease_expires_at = clock_timestamp() + make_interval(secs => $6), updated_at = now()
                 FROM fit, __SCHEMA__.outbox o, __SCHEMA__.endpoints e
                 WHERE d.id = fit.id AND o.id = d.outbox_id AND e.id = d.endpoint_id
                 RETURNING d.id, d.attempts, d.endpoint_id, d.event_id, o.event_type, o.payload::text,
                           o.created_at, e.url, e.headers, e.signature, e.retry, ARRAY[" , trace_member!("traceparent"), ", ", trace_member!("tracestate"), "],
                           ARRAY(SELECT s.secret FROM __SCHEMA__.endpoint_secrets s
                                 WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now())
                                 ORDER BY s.id DESC) AS secrets, d.ordering_key, false, 0::bigint",
            );

/// The claim while some endpoint has a flow policy in force. `gate` (see `flow`): endpoints
/// under a rate limit, back pressure or an open circuit, their flow rows locked in id order so
/// replicas take tokens one at a time; each contributes at most `cap` (tokens, 0 while paused, 1
/// probe when due while open), and `spent` takes what was claimed from the bucket. Healthy
/// unlimited endpoints have no such row: for them the gate is one index probe of an empty result.
/// The last column counts due deliveries the gate held back (the same count on every row, and one
/// row with no delivery when nothing was claimed).
pub(super) const CLAIM_GATED: &str = concat!(
                "WITH gate AS MATERIALIZED (
                    SELECT g.id, g.avail, g.probe_s,
                           CASE WHEN g.paused_until > now() THEN 0
                                WHEN g.opened_at IS NOT NULL THEN CASE WHEN g.probe_at <= now() THEN 1 ELSE 0 END
                                WHEN g.avail IS NULL THEN NULL
                                ELSE GREATEST(0, floor(g.avail))::int END AS cap,
                           g.opened_at IS NOT NULL AS open,
                           g.paused_until > now() AS paused
                    FROM (SELECT f.endpoint_id AS id, f.paused_until, f.opened_at, f.probe_at,
                                 COALESCE((e.breaker->>'probe_interval_s')::float8, $9) AS probe_s,
                                 CASE WHEN r.rate IS NOT NULL
                                      THEN LEAST(GREATEST(1, r.rate / 10), f.tokens + r.rate * extract(epoch FROM now() - f.refilled_at))
                                 END AS avail
                          FROM __SCHEMA__.endpoint_flow f
                          JOIN __SCHEMA__.endpoints e ON e.id = f.endpoint_id
                          CROSS JOIN LATERAL (SELECT __SCHEMA__.flow_rate(f, COALESCE(__SCHEMA__.per_second(e.rate_limit), $8)) AS rate) r
                          WHERE e.active AND e.deleted_at IS NULL
                            AND (r.rate IS NOT NULL OR f.paused_until > now() OR f.opened_at IS NOT NULL
                                 OR f.backoff_rate IS NOT NULL)
                          ORDER BY f.endpoint_id FOR UPDATE OF f) g
                 ), c AS MATERIALIZED (
                    SELECT due.id, due.outbox_id, e.id AS endpoint_id, row_number() OVER () AS n
                    FROM (SELECT x.id, g.cap FROM __SCHEMA__.endpoints x LEFT JOIN gate g ON g.id = x.id
                          WHERE x.active AND x.deleted_at IS NULL ORDER BY random()) e
                    CROSS JOIN LATERAL (
                        SELECT d.id, d.outbox_id FROM __SCHEMA__.deliveries d
                        WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at <= now()
                        ORDER BY d.next_attempt_at
                        LIMIT LEAST(COALESCE(e.cap, $3::int), GREATEST(0, $3::int - COALESCE(
                            (SELECT b.n FROM unnest($4::text[], $5::int[]) AS b(id, n) WHERE b.id = e.id), 0)))
                        FOR UPDATE OF d SKIP LOCKED
                    ) due
                    LIMIT $2
                 ), ",
    fit!(),
    ", upd AS (
                    UPDATE __SCHEMA__.deliveries d
                    SET status = 'delivering', attempts = d.attempts + 1, lease_owner = $1,
                        lease_expires_at = clock_timestamp() + make_interval(secs => $6), updated_at = now()
                    FROM fit, __SCHEMA__.outbox o, __SCHEMA__.endpoints e
                    WHERE d.id = fit.id AND o.id = d.outbox_id AND e.id = d.endpoint_id
                    RETURNING d.id, d.attempts, d.endpoint_id, d.event_id, o.event_type, o.payload::text,
                              o.created_at, e.url, e.headers, e.signature, e.retry, ARRAY[" , trace_member!("traceparent"), ", ", trace_member!("tracestate"), "],
                              ARRAY(SELECT s.secret FROM __SCHEMA__.endpoint_secrets s
                                    WHERE s.endpoint_id = e.id AND (s.expires_at IS NULL OR s.expires_at > now())
                                    ORDER BY s.id DESC) AS secrets, d.ordering_key
                 ), spent AS (
                    UPDATE __SCHEMA__.endpoint_flow f
                    SET tokens = CASE WHEN g.avail IS NULL THEN f.tokens ELSE g.avail - COALESCE(n.claimed, 0) END,
                        refilled_at = now(),
                        probe_at = CASE WHEN g.open AND n.claimed > 0 THEN now() + make_interval(secs => g.probe_s)
                                        ELSE f.probe_at END,
                        paused_until = CASE WHEN f.paused_until <= now() THEN NULL ELSE f.paused_until END,
                        backoff_rate = CASE WHEN __SCHEMA__.flow_rate(f, NULL) IS NULL THEN NULL ELSE f.backoff_rate END
                    FROM gate g LEFT JOIN (SELECT endpoint_id, count(*) AS claimed FROM upd GROUP BY 1) n
                           ON n.endpoint_id = g.id
                    WHERE f.endpoint_id = g.id
                 ), held AS (
                    -- Deliveries waiting for tokens only (the worker looks again soon for
                    -- those): an open circuit's or a pause's wait is known to be long.
                    SELECT COALESCE(sum(GREATEST(0, w.due - g.cap)), 0)::bigint AS n
                    FROM gate g CROSS JOIN LATERAL (
                        SELECT count(*) AS due FROM (
                            SELECT 1 FROM __SCHEMA__.deliveries d
                            WHERE d.endpoint_id = g.id AND d.status = 'pending' AND d.next_attempt_at <= now()
                            LIMIT $3::int) x) w
                    WHERE g.cap IS NOT NULL AND NOT g.open AND g.paused IS NOT TRUE
                 )
                 SELECT upd.*, g.open, held.n FROM held LEFT JOIN upd ON true
                 LEFT JOIN gate g ON g.id = upd.endpoint_id",
            );

/// What payloads a claim may bring into memory (its `fit`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Room {
    /// At most this many bytes, and the first row whatever its size (the budget has room for
    /// the largest payload allowed).
    Bytes(i64),
    /// Only rows whose payloads fit whole within this many bytes: the budget is short of the
    /// largest payload, yet what fits may still go (a slow endpoint's large payloads holding
    /// the rest must not stop every other endpoint's claims).
    Whole(i64),
}

impl Room {
    /// As the statement takes it: negative for [`Room::Whole`].
    pub(super) fn param(self) -> i64 {
        match self {
            Room::Bytes(b) => b.max(0),
            Room::Whole(b) => -b.max(1),
        }
    }
}
