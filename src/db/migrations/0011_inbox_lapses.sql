-- Version 11: the inbox counts a forward attempt's lapsed leases in a row, as deliveries do
-- (`lease_lapses`), so a message whose attempt kills or stalls every replica that makes it (a body
-- too large for the pod, say) is failed with the reason instead of being claimed forever. Adding
-- a column with a constant default rewrites nothing; the previous release's statements never
-- name it.
ALTER TABLE __SCHEMA__.inbox ADD COLUMN IF NOT EXISTS lease_lapses integer NOT NULL DEFAULT 0;
