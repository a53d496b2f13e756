-- Version 3: a receiver's bytes and a poison pill cannot stall the pipeline (issue 11).
-- Additive only: the previous release's queries keep working during a rolling update.

-- The response excerpt as the exact bytes received (NUL and invalid UTF-8 included). The text
-- column stays for rows written by earlier releases.
ALTER TABLE __SCHEMA__.attempts ADD COLUMN IF NOT EXISTS response_excerpt bytea;

-- Leases that lapsed in a row without an outcome being recorded: a delivery that keeps killing or
-- stalling the replica making it is failed after `outbound.max_lease_lapses`, not re-sent forever.
ALTER TABLE __SCHEMA__.deliveries ADD COLUMN IF NOT EXISTS lease_lapses integer NOT NULL DEFAULT 0;

-- The sweeper finds paused deliveries of deleted endpoints without reading their history.
CREATE INDEX IF NOT EXISTS deliveries_paused ON __SCHEMA__.deliveries (endpoint_id) WHERE status = 'paused';
