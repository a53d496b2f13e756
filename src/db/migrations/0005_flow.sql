-- Version 5: per-endpoint rate limits, back pressure and circuit breaking (issue 13).
-- Design: src/delivery/state/flow.rs. Additive: the previous release ignores all of it.

-- "50/s", "300/m", "1000/h"; NULL: `outbound.rate_limit` (none by default).
ALTER TABLE __SCHEMA__.endpoints ADD COLUMN IF NOT EXISTS rate_limit text
    CHECK (rate_limit ~ '^[1-9][0-9]{0,8}/[smh]$');
-- The endpoint's own breaker settings ({"failures": 20, "window_s": 300, ...}); NULL or a missing
-- key: `[outbound.breaker]`.
ALTER TABLE __SCHEMA__.endpoints ADD COLUMN IF NOT EXISTS breaker jsonb;

-- What every replica must agree on about an endpoint's flow, one row per endpoint that has ever
-- been limited, pushed back or failed (a healthy unlimited endpoint has none, and costs nothing).
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

-- Requests per second of a rate limit text.
CREATE FUNCTION __SCHEMA__.per_second(rate text) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT split_part(rate, '/', 1)::double precision
           / CASE split_part(rate, '/', 2) WHEN 's' THEN 1 WHEN 'm' THEN 60 ELSE 3600 END
$$;
