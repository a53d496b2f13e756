-- Version 6: the durable verified inbox (issue 14). Design: src/inbox/mod.rs.
-- Additive: the previous release ignores all of it.

-- One verified provider request, committed before the provider got its answer. The row holds what
-- the app would have received: its method, path (`upstream_path` applied), query, headers (the
-- verified mark included, hop-by-hop headers left out) and the exact body bytes.
CREATE TABLE IF NOT EXISTS __SCHEMA__.inbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route            text NOT NULL,
    provider         text NOT NULL,
    -- The provider's own delivery or event id (or a hash of the body): one row per route and key.
    dedupe_key       text NOT NULL,
    method           text NOT NULL,
    path             text NOT NULL,
    query            text,
    -- Names in lower case; values exactly as received (a header value need not be UTF-8).
    header_names     text[] NOT NULL,
    header_values    bytea[] NOT NULL,
    body             bytea NOT NULL,
    -- Who hands it to the app: 'forward' (Postern) or 'sql' (inbox_take); the route's setting,
    -- brought up to date for open messages at startup when the config changes it.
    consume          text NOT NULL DEFAULT 'forward' CHECK (consume IN ('forward', 'sql')),
    received_at      timestamptz NOT NULL DEFAULT now(),
    -- pending -> delivering -> done | pending (retry) | failed   (consume = "forward")
    -- pending -> taken -> done | pending again once taken_until passes   (consume = "sql")
    status           text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivering', 'taken', 'done', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    -- Attempts before the last replay: the retry policy counts from here.
    replayed_after   integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      uuid,
    lease_expires_at timestamptz,
    taken_until      timestamptz,
    handled_at       timestamptz,
    last_status_code integer,
    last_error       text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_route_dedupe UNIQUE (route, dedupe_key)
);
-- Four indexes on the accept path, each earning its place: the key, the dedupe key, the
-- forwarder's claim (due messages), and `inbox_take` and the gauges (a route's open messages in
-- arrival order).
CREATE INDEX IF NOT EXISTS inbox_due ON __SCHEMA__.inbox (next_attempt_at)
    WHERE status = 'pending' AND consume = 'forward';
CREATE INDEX IF NOT EXISTS inbox_open ON __SCHEMA__.inbox (route, id)
    WHERE status IN ('pending', 'delivering', 'taken');
-- Leases that lapse, and handled messages retention prunes (neither is on the accept path).
CREATE INDEX IF NOT EXISTS inbox_leased ON __SCHEMA__.inbox (lease_expires_at) WHERE status = 'delivering';
CREATE INDEX IF NOT EXISTS inbox_handled ON __SCHEMA__.inbox (handled_at) WHERE status = 'done';

-- Each attempt to hand a message to the app (consume = "forward").
CREATE TABLE IF NOT EXISTS __SCHEMA__.inbox_attempts (
    inbox_id         bigint NOT NULL REFERENCES __SCHEMA__.inbox (id) ON DELETE CASCADE,
    attempt          integer NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      integer NOT NULL,
    status_code      integer,
    response_excerpt bytea,
    error            text,
    PRIMARY KEY (inbox_id, attempt)
);

-- consume = "sql": the app takes up to p_limit messages of a route inside its own transaction
-- (rows another transaction holds are skipped) and marks each done in the same transaction as
-- its business change. A rollback returns them at once; messages taken and committed but never
-- marked done are taken again once p_timeout (1 second to 1 day; NULL: 5 minutes) has passed.
-- Only messages of routes consumed by SQL are taken.
CREATE FUNCTION __SCHEMA__.inbox_take(p_route text, p_limit integer DEFAULT 10,
                                      p_timeout interval DEFAULT '5 minutes')
RETURNS SETOF __SCHEMA__.inbox
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH c AS (
        SELECT id FROM __SCHEMA__.inbox
        WHERE route = p_route AND consume = 'sql'
          AND (status = 'pending' OR (status = 'taken' AND taken_until <= now()))
        ORDER BY id
        LIMIT least(greatest(COALESCE(p_limit, 10), 0), 1000)
        FOR UPDATE SKIP LOCKED
    )
    UPDATE __SCHEMA__.inbox m
    SET status = 'taken', attempts = m.attempts + 1, updated_at = now(),
        taken_until = now() + least(greatest(COALESCE(p_timeout, interval '5 minutes'),
                                             interval '1 second'), interval '1 day')
    FROM c WHERE m.id = c.id
    RETURNING m.*
$$;

-- Marks a taken message handled; false when it is not taken (already done, or never taken) or,
-- with p_attempt (the row's `attempts` as inbox_take returned it), when it was taken again since.
CREATE FUNCTION __SCHEMA__.inbox_done(p_id bigint, p_attempt integer DEFAULT NULL) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH d AS (
        UPDATE __SCHEMA__.inbox
        SET status = 'done', handled_at = now(), taken_until = NULL, updated_at = now()
        WHERE id = p_id AND status = 'taken' AND consume = 'sql'
          AND (p_attempt IS NULL OR attempts = p_attempt)
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM d)
$$;

-- Sets a taken message aside as `failed` with the app's reason (a message it cannot handle),
-- so it no longer comes back first; it stays visible and can be replayed through the API.
CREATE FUNCTION __SCHEMA__.inbox_fail(p_id bigint, p_error text, p_attempt integer DEFAULT NULL)
RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH d AS (
        UPDATE __SCHEMA__.inbox
        SET status = 'failed', taken_until = NULL, updated_at = now(),
            last_error = left(COALESCE(p_error, ''), 2000)
        WHERE id = p_id AND status = 'taken' AND consume = 'sql'
          AND (p_attempt IS NULL OR attempts = p_attempt)
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM d)
$$;

-- A header of a message as text (the first value of that name); NULL when absent or not UTF-8.
CREATE FUNCTION __SCHEMA__.inbox_header(m __SCHEMA__.inbox, p_name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN convert_from(m.header_values[array_position(m.header_names, lower(p_name))], 'UTF8');
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION __SCHEMA__.inbox_take(text, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION __SCHEMA__.inbox_done(bigint, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION __SCHEMA__.inbox_fail(bigint, text, integer) FROM PUBLIC;
