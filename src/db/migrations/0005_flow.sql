-- Version 5: per-endpoint rate limits, back pressure and circuit breaking (issue 13).
-- Design: src/delivery/state/flow.rs. Additive: the previous release ignores all of it.

-- "50/s", "300/m", "1000/h"; NULL: `outbound.rate_limit` (none by default).
ALTER TABLE __SCHEMA__.endpoints ADD COLUMN IF NOT EXISTS rate_limit text
    CHECK (rate_limit ~ '^[1-9][0-9]{0,8}/[smh]$');
-- The endpoint's own breaker settings ({"failures": 20, "window_s": 300, ...}); NULL or a missing
-- key: `[outbound.breaker]`.
ALTER TABLE __SCHEMA__.endpoints ADD COLUMN IF NOT EXISTS breaker jsonb;

-- What every replica must agree on about an endpoint's flow, one row per endpoint (a healthy
-- unlimited endpoint's row is never locked or written).
CREATE TABLE IF NOT EXISTS __SCHEMA__.endpoint_flow (
    endpoint_id          text PRIMARY KEY,
    -- Token bucket: tokens left at refilled_at (negative: what concurrent claims overdrew).
    tokens               double precision NOT NULL DEFAULT 0,
    refilled_at          timestamptz NOT NULL DEFAULT now(),
    -- Back pressure (429/503): the rate it was cut to at backoff_at, and the rate it recovers
    -- to, additively; NULL once recovered.
    backoff_rate         double precision,
    backoff_at           timestamptz,
    ceiling              double precision,
    -- A Retry-After for the whole endpoint.
    paused_until         timestamptz,
    -- Circuit breaker.
    consecutive_failures integer NOT NULL DEFAULT 0,
    window_started_at    timestamptz NOT NULL DEFAULT now(),
    window_attempts      integer NOT NULL DEFAULT 0,
    window_failures      integer NOT NULL DEFAULT 0,
    opened_at            timestamptz,
    probe_at             timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE __SCHEMA__.endpoint_flow SET (fillfactor = 50);
-- Every endpoint has its row (created with it from now on), so a limit set later has a row to lock.
INSERT INTO __SCHEMA__.endpoint_flow (endpoint_id) SELECT id FROM __SCHEMA__.endpoints ON CONFLICT DO NOTHING;

-- Requests per second of a rate limit text.
CREATE FUNCTION __SCHEMA__.per_second(rate text) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT split_part(rate, '/', 1)::double precision
           / CASE split_part(rate, '/', 2) WHEN 's' THEN 1 WHEN 'm' THEN 60 ELSE 3600 END
$$;

-- The rate an endpoint is held to now: its limit (or the default), lowered while it recovers from
-- back pressure (additively, a tenth of the ceiling per second); NULL: unlimited.
CREATE FUNCTION __SCHEMA__.flow_rate(f __SCHEMA__.endpoint_flow, configured double precision)
RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT LEAST(configured,
                 CASE WHEN f.backoff_rate IS NOT NULL
                           AND f.backoff_rate + GREATEST(1, f.ceiling / 10)
                               * extract(epoch FROM now() - f.backoff_at) < f.ceiling
                      THEN f.backoff_rate + GREATEST(1, f.ceiling / 10)
                               * extract(epoch FROM now() - f.backoff_at) END)
$$;

-- Records a batch of outcomes per endpoint (`p_failures` of `p_attempts` failed, the last
-- `p_trailing` of them after the batch's last success; `p_pushback`: a 429 or 503 came back, with
-- `p_retry_after` seconds if it said so) and moves each endpoint's breaker: closed -> open after
-- `failures` consecutive failures or `failure_rate` of at least `min_attempts` attempts in the
-- window; open -> closed on a success; open for `disable_after` -> disabled (the caller disables
-- the endpoint). Settings: the endpoint's `breaker` over `p_defaults`. Returns the transitions.
CREATE FUNCTION __SCHEMA__.record_flow(
    p_endpoints text[], p_attempts integer[], p_failures integer[], p_trailing integer[],
    p_succeeded boolean[], p_pushback boolean[], p_retry_after double precision[],
    p_defaults jsonb
) RETURNS TABLE (endpoint_id text, transition text, reason text, consecutive_failures integer,
                 opened_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    e __SCHEMA__.endpoints;
    f __SCHEMA__.endpoint_flow;
    cfg jsonb;
    configured double precision;
    cur double precision;
    why text;
BEGIN
    -- In endpoint order, so two batches never lock the same rows in opposite orders.
    FOR i IN SELECT u.ord FROM unnest(p_endpoints) WITH ORDINALITY AS u(id, ord) ORDER BY u.id LOOP
        why := NULL;
        SELECT * INTO e FROM __SCHEMA__.endpoints x WHERE x.id = p_endpoints[i];
        CONTINUE WHEN NOT FOUND;
        cfg := p_defaults || COALESCE(e.breaker, '{}'::jsonb);
        IF p_failures[i] = 0 AND NOT p_pushback[i] THEN
            -- Successes only: a row with nothing to reset or close is left alone (not even locked).
            SELECT * INTO f FROM __SCHEMA__.endpoint_flow x
            WHERE x.endpoint_id = e.id
              AND (x.consecutive_failures > 0 OR x.window_failures > 0 OR x.opened_at IS NOT NULL)
            FOR UPDATE;
            CONTINUE WHEN NOT FOUND;
        ELSE
            INSERT INTO __SCHEMA__.endpoint_flow AS x (endpoint_id) VALUES (e.id) ON CONFLICT DO NOTHING;
            SELECT * INTO f FROM __SCHEMA__.endpoint_flow x WHERE x.endpoint_id = e.id FOR UPDATE;
        END IF;

        IF f.window_started_at < now() - make_interval(secs => (cfg->>'window_s')::float8)
           OR (f.window_failures = 0 AND p_failures[i] > 0) THEN
            f.window_started_at := now();
            f.window_attempts := 0;
            f.window_failures := 0;
        END IF;
        f.window_attempts := f.window_attempts + p_attempts[i];
        f.window_failures := f.window_failures + p_failures[i];
        f.consecutive_failures := CASE WHEN p_succeeded[i] THEN p_trailing[i]
                                       ELSE f.consecutive_failures + p_trailing[i] END;

        IF p_pushback[i] THEN
            configured := COALESCE(__SCHEMA__.per_second(e.rate_limit), (p_defaults->>'rate')::float8);
            cur := COALESCE(__SCHEMA__.flow_rate(f, NULL), configured, (p_defaults->>'pushback_start')::float8);
            IF f.backoff_rate IS NULL THEN
                f.ceiling := COALESCE(configured, cur * 2);
            END IF;
            f.backoff_rate := GREATEST(0.1, cur / 2);
            f.backoff_at := now();
            IF p_retry_after[i] IS NOT NULL THEN
                f.paused_until := GREATEST(COALESCE(f.paused_until, now()),
                                           now() + make_interval(secs => LEAST(p_retry_after[i], 3600)));
            END IF;
        END IF;

        transition := NULL;
        IF f.opened_at IS NULL THEN
            IF f.consecutive_failures >= (cfg->>'failures')::int THEN
                why := f.consecutive_failures || ' consecutive failed attempts';
            ELSIF f.window_attempts >= (cfg->>'min_attempts')::int
                  AND f.window_failures >= (cfg->>'failure_rate')::float8 * f.window_attempts THEN
                why := f.window_failures || ' of ' || f.window_attempts || ' attempts failed since '
                       || to_char(f.window_started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"');
            END IF;
            IF why IS NOT NULL THEN
                f.opened_at := now();
                f.probe_at := now() + make_interval(secs => (cfg->>'probe_interval_s')::float8);
                transition := 'opened';
            END IF;
        ELSIF p_succeeded[i] THEN
            why := 'an attempt succeeded after ' || f.consecutive_failures || ' failures';
            f.opened_at := NULL;
            f.probe_at := NULL;
            f.consecutive_failures := p_trailing[i];
            f.window_started_at := now();
            f.window_attempts := 0;
            f.window_failures := 0;
            transition := 'closed';
        ELSIF f.opened_at <= now() - make_interval(secs => (cfg->>'disable_after_s')::float8) AND e.active THEN
            why := 'the circuit was open since '
                   || to_char(f.opened_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                   || ' (breaker.disable_after)';
            transition := 'disabled';
            endpoint_id := e.id;
            reason := why;
            consecutive_failures := f.consecutive_failures;
            opened_at := f.opened_at;
            -- Re-enabled later, the endpoint starts with a closed circuit.
            f.opened_at := NULL;
            f.probe_at := NULL;
            f.consecutive_failures := 0;
        END IF;

        UPDATE __SCHEMA__.endpoint_flow x
        SET tokens = f.tokens, refilled_at = f.refilled_at, backoff_rate = f.backoff_rate,
            backoff_at = f.backoff_at, ceiling = f.ceiling, paused_until = f.paused_until,
            consecutive_failures = f.consecutive_failures, window_started_at = f.window_started_at,
            window_attempts = f.window_attempts, window_failures = f.window_failures,
            opened_at = f.opened_at, probe_at = f.probe_at, updated_at = now()
        WHERE x.endpoint_id = e.id;

        IF transition IS NOT NULL THEN
            IF transition <> 'disabled' THEN
                endpoint_id := e.id;
                reason := why;
                consecutive_failures := f.consecutive_failures;
                opened_at := f.opened_at;
            END IF;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.record_flow(text[], integer[], integer[], integer[], boolean[], boolean[], double precision[], jsonb) FROM PUBLIC;
