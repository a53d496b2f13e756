//! The sweeper's statement: deliveries whose status disagrees with their endpoint's state, moved
//! a batch at a time. Invariant: it reads only waiting deliveries (partial-index probes, never a
//! scan of the finished ones).

/// The endpoints the sweeper looks at on every reaper tick: those changed within the hour.
pub(super) const RECENT: &str = " AND e.updated_at > now() - interval '1 hour'";

/// The sweeper: waiting deliveries whose status does not match their endpoint's state (inactive:
/// paused; active again: pending; deleted: cancelled), a batch at a time. It closes the races
/// between fan-out, outcomes and an endpoint's change, finishes what an endpoint change left to it
/// (large backlogs), and pauses a 410'd endpoint's backlog outside the settle transaction. It runs
/// under the fan-out lock held shared, so an endpoint change (holding it exclusively) never
/// interleaves with a batch. One index probe per endpoint looked at (`recent` narrows them), a
/// constant status per branch so each probe is of a partial index of waiting deliveries (a status
/// chosen per endpoint matched none, and scanned every finished delivery).
pub(super) fn sweep_sql(recent: &str) -> String {
    format!(
        "WITH s AS MATERIALIZED (
            SELECT x.id, 'pending' AS next FROM __SCHEMA__.endpoints e CROSS JOIN LATERAL (
                SELECT d.id FROM __SCHEMA__.deliveries d
                WHERE d.endpoint_id = e.id AND d.status = 'paused'
                LIMIT $1 FOR UPDATE OF d SKIP LOCKED) x
            WHERE e.active AND e.deleted_at IS NULL{recent}
            UNION ALL
            SELECT x.id, CASE WHEN e.deleted_at IS NOT NULL THEN 'cancelled' ELSE 'paused' END
            FROM __SCHEMA__.endpoints e CROSS JOIN LATERAL (
                SELECT d.id FROM __SCHEMA__.deliveries d
                WHERE d.endpoint_id = e.id AND d.status = 'pending'
                LIMIT $1 FOR UPDATE OF d SKIP LOCKED) x
            WHERE (NOT e.active OR e.deleted_at IS NOT NULL){recent}
            UNION ALL
            SELECT x.id, 'cancelled' FROM __SCHEMA__.endpoints e CROSS JOIN LATERAL (
                SELECT d.id FROM __SCHEMA__.deliveries d
                WHERE d.endpoint_id = e.id AND d.status = 'paused'
                LIMIT $1 FOR UPDATE OF d SKIP LOCKED) x
            WHERE e.deleted_at IS NOT NULL{recent}
            UNION ALL
            SELECT x.id, 'cancelled' FROM __SCHEMA__.endpoints e CROSS JOIN LATERAL (
                SELECT d.id FROM __SCHEMA__.deliveries d
                WHERE d.endpoint_id = e.id AND d.status = 'queued'
                LIMIT $1 FOR UPDATE OF d SKIP LOCKED) x
            WHERE e.deleted_at IS NOT NULL{recent}
            LIMIT $1
         )
         UPDATE __SCHEMA__.deliveries d
         SET status = s.next, next_attempt_at = CASE WHEN s.next = 'pending' THEN now() ELSE d.next_attempt_at END,
             updated_at = now()
         FROM s WHERE d.id = s.id"
    )
}
