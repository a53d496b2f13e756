-- Version 10: finished deliveries indexed per retention class. Delivered ones go after
-- `retention.delivered` (7 days), failed and cancelled ones after `retention.failed` (30 days), so
-- in one index of all three every dead letter kept meanwhile sat in a delivered batch's range,
-- older than the rows it deletes, and every batch read them all. Each finished row is in exactly
-- one of the two, as it was in the one they replace: no more index writes than before. The
-- previous release's statements use these as they used that one.
CREATE INDEX IF NOT EXISTS deliveries_delivered ON __SCHEMA__.deliveries (updated_at)
    WHERE status = 'delivered';
CREATE INDEX IF NOT EXISTS deliveries_dead ON __SCHEMA__.deliveries (updated_at)
    WHERE status IN ('failed', 'cancelled');
DROP INDEX IF EXISTS __SCHEMA__.deliveries_finished;
