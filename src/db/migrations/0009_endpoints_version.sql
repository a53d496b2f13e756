-- Version 9: endpoints and their secrets carry a version that every committed change to them
-- moves, so a fan-out pass reads them only when they changed (it keeps what it read last).
-- Additive for the previous release: it never reads the version, and its changes move it too.
CREATE TABLE IF NOT EXISTS __SCHEMA__.endpoints_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    -- Random, not a counter: a database restored from a backup cannot bring back a version a
    -- replica already holds with other contents.
    version uuid    NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO __SCHEMA__.endpoints_version DEFAULT VALUES ON CONFLICT DO NOTHING;

-- As its owner: a role allowed to change endpoints in SQL needs no grant on the version.
CREATE OR REPLACE FUNCTION __SCHEMA__.endpoints_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE __SCHEMA__.endpoints_version SET version = gen_random_uuid();
    RETURN NULL;
END $$;

-- Deferred to the commit, so the version row is the last lock a change takes: changes that
-- touch several endpoints in different orders cannot deadlock on it. Row triggers (a constraint
-- trigger is one): a statement that changes no row (`WHERE id = ANY('{}')`) moves nothing.
CREATE CONSTRAINT TRIGGER endpoints_changed AFTER INSERT OR UPDATE OR DELETE
    ON __SCHEMA__.endpoints DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION __SCHEMA__.endpoints_changed();
CREATE CONSTRAINT TRIGGER endpoint_secrets_changed AFTER INSERT OR UPDATE OR DELETE
    ON __SCHEMA__.endpoint_secrets DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION __SCHEMA__.endpoints_changed();
CREATE TRIGGER endpoints_truncated AFTER TRUNCATE ON __SCHEMA__.endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.endpoints_changed();
CREATE TRIGGER endpoint_secrets_truncated AFTER TRUNCATE ON __SCHEMA__.endpoint_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.endpoints_changed();
