//! The inbox's SQL for the forwarder: claim under a lease, settle fenced by (attempt, lease
//! owner), hand back, reap. Invariant: a message leaves `delivering` only through one of these
//! statements, and a statement whose fence fails changes nothing (another replica owns it now).

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use uuid::Uuid;

use super::InboxStatus;
use crate::db::Schema;
use crate::delivery::state::LAPSE_GRACE;

/// A message claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub route: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub header_names: Vec<String>,
    pub header_values: Vec<Vec<u8>>,
    /// Shared with the request, never copied.
    pub body: bytes::Bytes,
    pub attempt: i32,
    /// Attempts made before the last replay: the retry policy counts from here.
    pub replayed_after: i32,
}

/// How one attempt ended, as recorded.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: InboxStatus,
    pub next_at: Option<DateTime<Utc>>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub response_excerpt: Option<Vec<u8>>,
}

pub struct InboxStore {
    pool: Pool,
    claim: String,
    settle: String,
    hand_back: String,
    reap: String,
}

impl InboxStore {
    pub fn new(pool: Pool, schema: &Schema) -> Self {
        Self {
            pool,
            // Bodies within `$4` bytes in all, each whole (the first always, when `$5`: nothing
            // is held, so one body larger than the room still goes, alone); the rest stay due,
            // untouched. Sizes are read from the stored values' headers, not their contents.
            claim: schema.sql(
                "WITH c AS MATERIALIZED (
                    SELECT id, next_attempt_at, octet_length(body)::bigint AS len FROM __SCHEMA__.inbox
                    WHERE status = 'pending' AND consume = 'forward' AND next_attempt_at <= now()
                    ORDER BY next_attempt_at
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                 ), fit AS (
                    SELECT id FROM (
                        SELECT id, len, sum(len) OVER (ORDER BY next_attempt_at, id)::bigint AS upto FROM c) s
                    WHERE upto <= $4::bigint OR ($5::bool AND upto = len)
                 )
                 UPDATE __SCHEMA__.inbox m
                 SET status = 'delivering', attempts = m.attempts + 1, lease_owner = $1,
                     lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
                 FROM fit c WHERE m.id = c.id
                 RETURNING m.id, m.route, m.method, m.path, m.query, m.header_names,
                           m.header_values, m.body, m.attempts, m.replayed_after",
            ),
            settle: schema.sql(
                "WITH u AS (
                    UPDATE __SCHEMA__.inbox
                    SET status = $4, next_attempt_at = COALESCE($5, next_attempt_at),
                        lease_owner = NULL, lease_expires_at = NULL, lease_lapses = 0,
                        handled_at = CASE WHEN $4 = 'done' THEN now() END,
                        last_status_code = $6, last_error = $7, updated_at = now()
                    WHERE id = $1 AND attempts = $2
                      AND ((lease_owner = $3 AND status = 'delivering')
                           -- The same attempt's outcome after its lease lapsed (the database
                           -- away longer than a lease), while no replica has claimed it since.
                           OR (lease_owner IS NULL AND status IN ('pending', 'failed') AND lease_lapses > 0))
                    RETURNING id, attempts
                 )
                 INSERT INTO __SCHEMA__.inbox_attempts
                    (inbox_id, attempt, started_at, duration_ms, status_code, response_excerpt, error)
                 SELECT id, attempts, $8, $9, $6, $10, $7 FROM u
                 -- The reaper's 'outcome unknown' for a lapsed attempt gives way to the outcome.
                 ON CONFLICT (inbox_id, attempt) DO UPDATE SET
                    started_at = EXCLUDED.started_at, duration_ms = EXCLUDED.duration_ms,
                    status_code = EXCLUDED.status_code, response_excerpt = EXCLUDED.response_excerpt,
                    error = EXCLUDED.error",
            ),
            // The app was not listening: no attempt is counted, and the message is due again.
            hand_back: schema.sql(
                "UPDATE __SCHEMA__.inbox
                 SET status = 'pending', attempts = inbox.attempts - 1, lease_owner = NULL,
                     lease_expires_at = NULL, next_attempt_at = now(), updated_at = now()
                 FROM unnest($2::bigint[], $3::int[]) AS h(id, attempt)
                 WHERE inbox.id = h.id AND inbox.attempts = h.attempt AND lease_owner = $1
                   AND status = 'delivering'",
            ),
            // A replica died holding these: they count as attempted (the app may have got them),
            // recorded as such, and are due again after `$2` (`LAPSE_GRACE`: a replica cut off
            // from the database meanwhile writes the app's answer first, see `settle`). One whose leases lapse `$1` times in a row is a poison pill (it
            // kills or stalls whoever forwards it): failed, with the reason, not claimed forever.
            reap: schema.sql(
                "WITH upd AS (
                    UPDATE __SCHEMA__.inbox m
                    SET status = CASE WHEN m.lease_lapses + 1 >= $1 THEN 'failed' ELSE 'pending' END,
                        lease_lapses = m.lease_lapses + 1,
                        lease_owner = NULL, lease_expires_at = NULL,
                        next_attempt_at = now() + make_interval(secs => $2), updated_at = now(),
                        last_error = CASE WHEN m.lease_lapses + 1 >= $1
                            THEN 'given up: the lease lapsed ' || (m.lease_lapses + 1)
                                 || ' times in a row without an outcome being recorded (outbound.max_lease_lapses)'
                            ELSE 'lease expired: the replica forwarding this message stopped or stalled' END
                    FROM (SELECT id FROM __SCHEMA__.inbox
                          WHERE status = 'delivering' AND lease_expires_at < now()
                          LIMIT 1000 FOR UPDATE SKIP LOCKED) x
                    WHERE m.id = x.id
                    RETURNING m.id, m.attempts
                 ), ins AS (
                    INSERT INTO __SCHEMA__.inbox_attempts (inbox_id, attempt, started_at, duration_ms, error)
                    SELECT id, attempts, now(), 0, 'lease expired: outcome unknown' FROM upd
                    ON CONFLICT DO NOTHING
                 )
                 SELECT count(*) FROM upd",
            ),
        }
    }

    /// Up to `limit` due messages whose bodies fit in `room` bytes together (`first`: the first
    /// one whatever its size, for a forwarder holding nothing).
    pub async fn claim(
        &self,
        owner: Uuid,
        limit: i64,
        lease: Duration,
        room: u64,
        first: bool,
    ) -> anyhow::Result<Vec<Claimed>> {
        let client = self.pool.get().await?;
        let room = room.min(i64::MAX as u64) as i64;
        let rows = client
            .query(
                &self.claim,
                &[&owner, &limit, &lease.as_secs_f64(), &room, &first],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                route: r.get(1),
                method: r.get(2),
                path: r.get(3),
                query: r.get(4),
                header_names: r.get(5),
                header_values: r.get(6),
                body: bytes::Bytes::from(r.get::<_, Vec<u8>>(7)),
                attempt: r.get(8),
                replayed_after: r.get(9),
            })
            .collect())
    }

    /// Records the attempt and moves the message on; false when the fence failed.
    pub async fn settle(&self, owner: Uuid, m: &Claimed, o: &Outcome) -> anyhow::Result<bool> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                &self.settle,
                &[
                    &m.id,
                    &m.attempt,
                    &owner,
                    &o.status.as_str(),
                    &o.next_at,
                    &o.status_code,
                    &o.error.as_deref().map(crate::delivery::state::storable),
                    &o.started_at,
                    &o.duration_ms,
                    &o.response_excerpt,
                ],
            )
            .await?;
        Ok(n > 0)
    }

    /// `items`: (id, attempt) of claims this replica still holds.
    pub async fn hand_back(&self, owner: Uuid, items: &[(i64, i32)]) -> anyhow::Result<u64> {
        if items.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = items.iter().map(|i| i.0).collect();
        let attempts: Vec<i32> = items.iter().map(|i| i.1).collect();
        let client = self.pool.get().await?;
        Ok(client
            .execute(&self.hand_back, &[&owner, &ids, &attempts])
            .await?)
    }

    /// Brings open messages of each inbox route up to its configured `consume` (a message taken
    /// by SQL that now goes to the forwarder becomes pending again).
    /// `every_open`: taken and delivering messages too (at start); else only pending ones, which
    /// no one holds (the periodic pass: while replicas of two configs run side by side in a
    /// rolling update, what one holds is never reset under it).
    pub async fn reconcile(
        &self,
        schema: &Schema,
        routes: &[(String, &str)],
        every_open: bool,
    ) -> anyhow::Result<u64> {
        let client = self.pool.get().await?;
        let names: Vec<&str> = routes.iter().map(|r| r.0.as_str()).collect();
        let modes: Vec<&str> = routes.iter().map(|r| r.1).collect();
        Ok(client
            .execute(
                &schema.sql(
                    "UPDATE __SCHEMA__.inbox m
                     SET consume = r.consume, taken_until = NULL, updated_at = now(),
                         status = CASE WHEN m.status = 'taken' THEN 'pending' ELSE m.status END
                     FROM unnest($1::text[], $2::text[]) AS r(route, consume)
                     WHERE m.route = r.route AND m.consume <> r.consume
                       AND (m.status = 'pending' OR ($3 AND m.status IN ('delivering', 'taken')))",
                ),
                &[&names, &modes, &every_open],
            )
            .await?)
    }

    /// Makes lapsed claims due again after [`LAPSE_GRACE`], failing those lapsed `max_lapses`
    /// times in a row.
    pub async fn reap(&self, max_lapses: i32) -> anyhow::Result<u64> {
        let client = self.pool.get().await?;
        let grace = LAPSE_GRACE.as_secs_f64();
        let n: i64 = client
            .query_one(&self.reap, &[&max_lapses, &grace])
            .await?
            .get(0);
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::scratch::Scratch;

    const MIB: usize = 1 << 20;

    async fn with_bodies(s: &Scratch, sizes: &[usize]) {
        for len in sizes {
            s.run(&format!(
                "INSERT INTO __SCHEMA__.inbox (route, provider, dedupe_key, method, path, header_names, header_values, body)
                 VALUES ('r', 'stripe', gen_random_uuid()::text, 'POST', '/', '{{}}', '{{}}', convert_to(repeat('x', {len}), 'UTF8'))"
            ))
            .await;
        }
    }

    /// The forwarder holds bodies within its byte room, not only within its 32 slots: 32 bodies
    /// of `max_body` (5 MiB) each would be 160 MiB, twice that while sent, in a 256 MiB pod.
    #[tokio::test]
    async fn a_claim_takes_bodies_within_its_room_and_one_alone_when_nothing_is_held() {
        let s = Scratch::new().await;
        let store = InboxStore::new(s.pool.clone(), &s.schema);
        with_bodies(&s, &[MIB; 5]).await;
        let owner = Uuid::now_v7();
        let lease = Duration::from_secs(30);
        let claimed = store
            .claim(owner, 32, lease, 5 * MIB as u64 / 2, false)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 2, "2 of 1 MiB fit in 2.5 MiB");
        assert!(claimed.iter().all(|m| m.body.len() == MIB));
        let none = store
            .claim(owner, 32, lease, MIB as u64 / 2, false)
            .await
            .unwrap();
        assert!(none.is_empty(), "nothing fits in half a MiB");
        let alone = store
            .claim(owner, 32, lease, MIB as u64 / 2, true)
            .await
            .unwrap();
        assert_eq!(
            alone.len(),
            1,
            "holding nothing, one goes whatever its size"
        );
        s.drop_schema().await;
    }

    /// A message whose forward attempt never ends (it kills or stalls every replica that makes
    /// it) is failed once its lease lapsed `max_lapses` times in a row, each lapse recorded, and
    /// is no longer claimed.
    #[tokio::test]
    async fn a_message_whose_leases_keep_lapsing_is_failed() {
        let s = Scratch::new().await;
        let store = InboxStore::new(s.pool.clone(), &s.schema);
        with_bodies(&s, &[10]).await;
        let owner = Uuid::now_v7();
        for round in 1..=3 {
            let claimed = store
                .claim(owner, 32, Duration::from_secs(30), 1024, true)
                .await
                .unwrap();
            assert_eq!(claimed.len(), 1, "round {round}");
            s.run("UPDATE __SCHEMA__.inbox SET lease_expires_at = now() - interval '1 second'")
                .await;
            assert_eq!(store.reap(3).await.unwrap(), 1);
            // Due again only after the grace (in which a cut-off replica writes its answer).
            let early = store
                .claim(owner, 32, Duration::from_secs(30), 1024, true)
                .await
                .unwrap();
            assert!(early.is_empty(), "round {round}: claimed within the grace");
            s.run("UPDATE __SCHEMA__.inbox SET next_attempt_at = now() - interval '1 second'")
                .await;
        }
        let left: Vec<(String, String)> = s
            .pairs("SELECT status, last_error FROM __SCHEMA__.inbox")
            .await;
        assert_eq!(left[0].0, "failed", "{left:?}");
        assert!(left[0].1.contains("lapsed 3 times"), "{left:?}");
        let attempts: Vec<(i32, String)> = s
            .pairs("SELECT attempt, error FROM __SCHEMA__.inbox_attempts ORDER BY attempt")
            .await;
        assert_eq!(attempts.len(), 3, "{attempts:?}");
        let again = store
            .claim(owner, 32, Duration::from_secs(30), 1024, true)
            .await
            .unwrap();
        assert!(again.is_empty());
        s.drop_schema().await;
    }

    /// An outcome that comes in after its lease lapsed (the database away longer than a lease)
    /// is still the attempt's own while nobody has claimed the message since: recorded, not
    /// forwarded again, the lapse forgotten.
    #[tokio::test]
    async fn an_outcome_after_a_lapsed_lease_is_recorded_until_another_claim() {
        let s = Scratch::new().await;
        let store = InboxStore::new(s.pool.clone(), &s.schema);
        with_bodies(&s, &[10]).await;
        let owner = Uuid::now_v7();
        let m = store
            .claim(owner, 32, Duration::from_secs(30), 1024, true)
            .await
            .unwrap()
            .remove(0);
        s.run("UPDATE __SCHEMA__.inbox SET lease_expires_at = now() - interval '1 second'")
            .await;
        assert_eq!(store.reap(3).await.unwrap(), 1);
        let done = Outcome {
            status: InboxStatus::Done,
            next_at: None,
            status_code: Some(200),
            error: None,
            started_at: Utc::now(),
            duration_ms: 4,
            response_excerpt: None,
        };
        assert!(store.settle(owner, &m, &done).await.unwrap());
        let seen: Vec<(String, i32)> = s
            .pairs("SELECT status, lease_lapses FROM __SCHEMA__.inbox")
            .await;
        assert_eq!(seen, [("done".to_string(), 0)]);
        let attempts: Vec<(i32, Option<i32>)> = s
            .pairs("SELECT attempt, status_code FROM __SCHEMA__.inbox_attempts")
            .await;
        assert_eq!(attempts, [(1, Some(200))]);
        s.drop_schema().await;
    }
}
