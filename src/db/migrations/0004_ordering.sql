-- Version 4: per-key FIFO delivery (issue 13). Design: src/delivery/state/ordering.rs.
-- Additive for the previous release: its queries never read `queued` rows (they only claim
-- `pending`), and events without an ordering key behave exactly as before.

-- A delivery behind an earlier delivery of its ordering key to the same endpoint waits as
-- `queued`; exactly one delivery per (endpoint, key) at a time is the head (pending, delivering
-- or paused), so the existing claim needs no change and never reads a waiting row.
ALTER TABLE __SCHEMA__.deliveries DROP CONSTRAINT IF EXISTS deliveries_status_check;
ALTER TABLE __SCHEMA__.deliveries ADD CONSTRAINT deliveries_status_check
    CHECK (status IN ('pending', 'delivering', 'delivered', 'failed', 'paused', 'cancelled', 'queued'));
ALTER TABLE __SCHEMA__.deliveries ADD COLUMN IF NOT EXISTS ordering_key text;

-- A key is indexed (below), and a B-tree entry has a size limit: a key over 255 bytes is refused
-- at insert, in the app's transaction, rather than failing every fan-out pass after it.
ALTER TABLE __SCHEMA__.outbox ADD CONSTRAINT ordering_key_exceeds_255_bytes
    CHECK (octet_length(ordering_key) <= 255) NOT VALID;

-- The next delivery of a key: one index probe, however many wait behind it.
CREATE INDEX IF NOT EXISTS deliveries_queued
    ON __SCHEMA__.deliveries (endpoint_id, ordering_key, outbox_id) WHERE status = 'queued';
-- Whether a key has a head: one index probe.
CREATE INDEX IF NOT EXISTS deliveries_key_head
    ON __SCHEMA__.deliveries (endpoint_id, ordering_key)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'delivering', 'paused');

-- Fan-out takes a keyed event only when no earlier event of its key waits undispatched (held by
-- another replica's pass). Unkeyed inserts never touch this index (its predicate is false).
CREATE INDEX IF NOT EXISTS outbox_keyed_undispatched
    ON __SCHEMA__.outbox (ordering_key, id) WHERE dispatched_at IS NULL AND ordering_key IS NOT NULL;

-- One row per (endpoint, key) that has had deliveries: the lock every change of the key's head
-- takes first, and the mark of a key blocked by its failed head (`on_failure = "block"`).
CREATE TABLE IF NOT EXISTS __SCHEMA__.ordering_keys (
    endpoint_id  text        NOT NULL,
    ordering_key text        NOT NULL,
    blocked_by   uuid,
    blocked_at   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, ordering_key)
);
CREATE INDEX IF NOT EXISTS ordering_keys_blocked
    ON __SCHEMA__.ordering_keys (endpoint_id, blocked_at) WHERE blocked_by IS NOT NULL;
ALTER TABLE __SCHEMA__.ordering_keys SET (fillfactor = 70);

-- What a failed head does to its key, per endpoint; NULL: the replica's configured default.
ALTER TABLE __SCHEMA__.endpoints ADD COLUMN IF NOT EXISTS ordering_on_failure text
    CHECK (ordering_on_failure IN ('skip', 'block'));

-- Locks the given keys' rows (creating missing ones) in one fixed order, so two transactions
-- touching the same keys never deadlock on them.
CREATE FUNCTION __SCHEMA__.lock_ordering_keys(p_endpoints text[], p_keys text[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO __SCHEMA__.ordering_keys (endpoint_id, ordering_key)
    SELECT DISTINCT e, k FROM unnest(p_endpoints, p_keys) AS u(e, k) WHERE k IS NOT NULL ORDER BY 1, 2
    ON CONFLICT (endpoint_id, ordering_key) DO UPDATE SET updated_at = now()
$$;

-- Moves the given keys on: marks a key blocked when its head just failed and its endpoint says
-- "block"; lifts the mark once that delivery is no longer failed; and, for each key with no
-- head and no mark, makes its earliest queued delivery the head (pending, or paused for an
-- inactive endpoint). Takes the keys' locks first; each statement then reads what the previous
-- holder committed (READ COMMITTED takes a snapshot per statement). Returns the heads made.
CREATE FUNCTION __SCHEMA__.advance_ordering_keys(
    p_endpoints text[], p_keys text[], p_failed uuid[], p_default_on_failure text
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    promoted integer;
BEGIN
    PERFORM __SCHEMA__.lock_ordering_keys(p_endpoints, p_keys);

    UPDATE __SCHEMA__.ordering_keys k
    SET blocked_by = d.id, blocked_at = now(), updated_at = now()
    FROM __SCHEMA__.deliveries d, __SCHEMA__.endpoints e
    WHERE d.id = ANY(p_failed) AND d.status = 'failed' AND d.ordering_key IS NOT NULL
      AND k.endpoint_id = d.endpoint_id AND k.ordering_key = d.ordering_key AND k.blocked_by IS NULL
      AND e.id = d.endpoint_id AND COALESCE(e.ordering_on_failure, p_default_on_failure) = 'block';

    UPDATE __SCHEMA__.ordering_keys k
    SET blocked_by = NULL, blocked_at = NULL, updated_at = now()
    FROM unnest(p_endpoints, p_keys) AS u(e, key)
    WHERE k.endpoint_id = u.e AND k.ordering_key = u.key AND k.blocked_by IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.deliveries d WHERE d.id = k.blocked_by AND d.status = 'failed');

    WITH keys AS (
        SELECT DISTINCT u.e, u.key FROM unnest(p_endpoints, p_keys) AS u(e, key)
        JOIN __SCHEMA__.ordering_keys k ON k.endpoint_id = u.e AND k.ordering_key = u.key
        WHERE k.blocked_by IS NULL
          AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.deliveries h
                          WHERE h.endpoint_id = u.e AND h.ordering_key = u.key
                            AND h.status IN ('pending', 'delivering', 'paused'))
    ), next AS (
        SELECT (SELECT q.id FROM __SCHEMA__.deliveries q
                WHERE q.endpoint_id = keys.e AND q.ordering_key = keys.key AND q.status = 'queued'
                ORDER BY q.outbox_id, q.created_at LIMIT 1) AS id
        FROM keys
    )
    UPDATE __SCHEMA__.deliveries d
    SET status = CASE WHEN e.active THEN 'pending' ELSE 'paused' END,
        next_attempt_at = now(), updated_at = now()
    FROM next, __SCHEMA__.endpoints e
    WHERE d.id = next.id AND d.status = 'queued' AND e.id = d.endpoint_id AND e.deleted_at IS NULL;
    GET DIAGNOSTICS promoted = ROW_COUNT;
    RETURN promoted;
END
$$;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.lock_ordering_keys(text[], text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.advance_ordering_keys(text[], text[], uuid[], text) FROM PUBLIC;
