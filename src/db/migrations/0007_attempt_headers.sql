-- Version 7: each attempt keeps the headers its request carried (custom header values redacted),
-- for the attempt log and the dashboard. Additive: the previous release does not write it.
ALTER TABLE __SCHEMA__.attempts ADD COLUMN IF NOT EXISTS request_headers text;
