-- Postern's schema, version 1. `__SCHEMA__` is replaced by the configured schema name.
-- Rule for every later migration: stay compatible with the previous release's queries, so a
-- rolling update never breaks the old pods still running.

-- The app-facing contract: the app inserts here inside its own transaction.
CREATE TABLE __SCHEMA__.outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    event_type      text        NOT NULL
                    CHECK (event_type ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND length(event_type) <= 255),
    payload         jsonb       NOT NULL,
    tenant          text,
    ordering_key    text,
    target_endpoint text,
    metadata        jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    dispatched_at   timestamptz
);
-- The dispatcher's work list stays tiny however large the table grows.
CREATE INDEX outbox_undispatched ON __SCHEMA__.outbox (id) WHERE dispatched_at IS NULL;
CREATE INDEX outbox_dispatched_at ON __SCHEMA__.outbox (dispatched_at) WHERE dispatched_at IS NOT NULL;
ALTER TABLE __SCHEMA__.outbox SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

CREATE TABLE __SCHEMA__.endpoints (
    id              text        PRIMARY KEY,
    url             text        NOT NULL,
    events          text[]      NOT NULL,
    tenant          text,
    description     text,
    headers         jsonb       NOT NULL DEFAULT '{}',
    retry           jsonb,
    signature       text        NOT NULL DEFAULT 'standard' CHECK (signature IN ('standard', 'legacy')),
    active          boolean     NOT NULL DEFAULT true,
    disabled_reason text,
    source          text        NOT NULL CHECK (source IN ('config', 'api')),
    deleted_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Several secrets per endpoint, each with an optional expiry: deliveries are signed with every
-- unexpired one, so a rotation never breaks a receiver.
CREATE TABLE __SCHEMA__.endpoint_secrets (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id text        NOT NULL REFERENCES __SCHEMA__.endpoints (id) ON DELETE CASCADE,
    secret      text        NOT NULL,
    expires_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX endpoint_secrets_endpoint ON __SCHEMA__.endpoint_secrets (endpoint_id);

CREATE TABLE __SCHEMA__.deliveries (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    outbox_id        bigint      NOT NULL,
    event_id         uuid        NOT NULL,
    event_type       text        NOT NULL,
    endpoint_id      text        NOT NULL REFERENCES __SCHEMA__.endpoints (id),
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivering', 'delivered', 'failed', 'paused', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      uuid,
    lease_expires_at timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);
-- The claim: per endpoint, oldest due first.
CREATE INDEX deliveries_due ON __SCHEMA__.deliveries (endpoint_id, next_attempt_at) WHERE status = 'pending';
-- The reaper: leases that lapsed.
CREATE INDEX deliveries_leased ON __SCHEMA__.deliveries (lease_expires_at) WHERE status = 'delivering';
-- Listing an endpoint's deliveries, newest first.
CREATE INDEX deliveries_endpoint_created ON __SCHEMA__.deliveries (endpoint_id, created_at DESC, id DESC);
CREATE INDEX deliveries_outbox ON __SCHEMA__.deliveries (outbox_id);
-- Retention.
CREATE INDEX deliveries_finished ON __SCHEMA__.deliveries (updated_at) WHERE status IN ('delivered', 'failed', 'cancelled');
ALTER TABLE __SCHEMA__.deliveries SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

CREATE TABLE __SCHEMA__.attempts (
    delivery_id   uuid        NOT NULL REFERENCES __SCHEMA__.deliveries (id) ON DELETE CASCADE,
    attempt       integer     NOT NULL,
    started_at    timestamptz NOT NULL,
    duration_ms   integer     NOT NULL,
    status_code   integer,
    response_body text,
    error         text,
    PRIMARY KEY (delivery_id, attempt)
);
ALTER TABLE __SCHEMA__.attempts SET (autovacuum_vacuum_scale_factor = 0.05);

-- Postern's own settings, shared by every replica (e.g. the notify mode `migrate` installed).
CREATE TABLE __SCHEMA__.settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- The throttled trigger's clock: a sequence, because setval is not transactional and so holds no
-- lock until the app's transaction commits (a row lock would let one long transaction silence
-- every other wake-up).
CREATE SEQUENCE __SCHEMA__.notify_clock MINVALUE 0 START 0;

CREATE FUNCTION __SCHEMA__.publish(
    event_type      text,
    payload         jsonb,
    tenant          text DEFAULT NULL,
    ordering_key    text DEFAULT NULL,
    target_endpoint text DEFAULT NULL,
    metadata        jsonb DEFAULT NULL
) RETURNS uuid
LANGUAGE sql
AS $$
    INSERT INTO __SCHEMA__.outbox (event_type, payload, tenant, ordering_key, target_endpoint, metadata)
    VALUES (event_type, payload, tenant, ordering_key, target_endpoint, metadata)
    RETURNING event_id
$$;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.publish(text, jsonb, text, text, text, jsonb) FROM PUBLIC;
