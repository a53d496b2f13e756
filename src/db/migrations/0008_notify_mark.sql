-- Version 8: the throttled trigger remembers its last wake-up (the outbox identity's value and the
-- time when it was sent), so a sparse stream is announced commit by commit and only a dense one is
-- throttled. Sequences for the same reason as notify_clock: no lock until commit.
CREATE SEQUENCE IF NOT EXISTS __SCHEMA__.notify_mark MINVALUE 0 START 0;
CREATE SEQUENCE IF NOT EXISTS __SCHEMA__.notify_mark_at MINVALUE 0 START 0;
