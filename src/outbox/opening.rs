//! A fan-out pass's first round trip: its transaction's start and the take of undispatched events
//! with the pass's head (see `target::head_sql`), sent as one simple-query message (the takes
//! prepared once per connection with SQL `PREPARE`), or pipelined as two messages behind
//! pgbouncer, whose transaction pooling does not keep a session's SQL-prepared statements.
//! Invariant: both send the same statements, in the same order, in one transaction opened by the
//! first, and give the same rows (every column text, see `cells`).

use std::sync::{Arc, Mutex, Weak};

use anyhow::Context;
use chrono::{DateTime, Utc};
use deadpool_postgres::StatementCache;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow};
use uuid::Uuid;

use super::cells::{epoch, Cells};
use super::target::{head_sql, read_sql, Head, Known, KnownParams, Target};
use crate::db::Schema;
use crate::delivery::state::{event_time, trace_member, Trace};

/// What every take returns per event, every column text. The app may write any `created_at`,
/// infinite included, which a subtraction refuses (and every take with it): no lag for those.
pub(super) const TAKEN: &str = concat!(
    "id::text AS id, event_id::text AS event_id, event_type, tenant,
    target_endpoint, CASE WHEN isfinite(created_at)
        THEN extract(epoch FROM clock_timestamp() - created_at)::float8 ELSE 0 END::text AS lag,
    payload::text AS payload, extract(epoch FROM created_at)::text AS created_at, ",
    trace_member!("traceparent"),
    " AS traceparent, ",
    trace_member!("tracestate"),
    " AS tracestate, ordering_key"
);

/// An event a pass took (a row of [`TAKEN`]).
pub(super) struct Taken {
    pub(super) id: i64,
    pub(super) event_id: Uuid,
    pub(super) event_type: String,
    pub(super) tenant: Option<String>,
    pub(super) target: Option<String>,
    /// Seconds from its insert to its take.
    pub(super) lag: f64,
    pub(super) payload: Arc<str>,
    pub(super) created_at: DateTime<Utc>,
    pub(super) trace: Trace,
    pub(super) ordering_key: Option<String>,
}

/// A take's rows: the head (in every row), and the events taken.
fn split(rows: &[impl Cells]) -> anyhow::Result<(Head, Vec<Taken>)> {
    Ok((Head::from_rows(rows)?, taken(rows)?))
}

/// The events among a take's rows (those with one: a take always returns a row, for its counts
/// or its head).
pub(super) fn taken(rows: &[impl Cells]) -> anyhow::Result<Vec<Taken>> {
    let mut taken = Vec::with_capacity(rows.len());
    for r in rows {
        if r.cell("id")?.is_some() {
            taken.push(Taken::from_cells(r)?);
        }
    }
    Ok(taken)
}

impl Taken {
    pub(super) fn from_cells(r: &impl Cells) -> anyhow::Result<Self> {
        Ok(Self {
            id: r.int("id")?,
            event_id: r.uuid("event_id")?.context("column event_id is NULL")?,
            event_type: r.text("event_type")?.to_owned(),
            tenant: r.cell("tenant")?.map(str::to_owned),
            target: r.cell("target_endpoint")?.map(str::to_owned),
            lag: r.float("lag")?,
            payload: r.text("payload")?.into(),
            created_at: event_time(r.cell("created_at")?.and_then(epoch)),
            trace: Trace {
                parent: r.cell("traceparent")?.map(str::to_owned),
                state: r.cell("tracestate")?.map(str::to_owned),
            },
            ordering_key: r.cell("ordering_key")?.map(str::to_owned),
        })
    }
}

/// What the first round trip brought: the events taken, and the endpoints they may go to.
pub(super) struct Opened {
    pub(super) taken: Vec<Taken>,
    /// The take marked them dispatched; if not (a small take), the pass does, before it commits.
    pub(super) marked: bool,
    pub(super) head: Head,
    pub(super) targets: Arc<[Target]>,
}

/// A statement the pass runs, and its SQL-prepared form.
struct Statement {
    sql: String,
    /// Named by a digest of what it prepares, so another build's statement never answers to it.
    name: String,
    prepare: String,
}

impl Statement {
    fn new(sql: String, types: &str) -> Self {
        let prepare = format!("({types}) AS {sql}");
        let digest = Sha256::digest(prepare.as_bytes());
        let name = format!("postern_fan_out_{}", hex::encode(&digest[..8]));
        let prepare = format!("PREPARE {name} {prepare}");
        Self { sql, name, prepare }
    }
}

pub(super) struct Opening {
    /// The transaction, its planner settings, the shared fan-out lock.
    begin: String,
    /// Each take returns the pass's head (`target::head_sql`, `$1` and `$2`) in every row, and
    /// the events taken beside it (none: one row, the head). One statement, not two: each costs
    /// its executor's start (opening and locking every relation of its plan) on every pass.
    take: Statement,
    /// The take of a pass woken by a notification or a probe: at most `small_batch` rows.
    take_small: Statement,
    /// The endpoints, read only when the head says the kept ones are out of date.
    read: String,
    /// Pipelined (pgbouncer) instead of one message.
    pipelined: bool,
    /// The connections this opening has prepared its statements on (by their statement cache,
    /// one per connection; a `Weak` keeps the address from being reused while it is listed).
    prepared: Mutex<Vec<Weak<StatementCache>>>,
}

impl Opening {
    pub(super) fn new(schema: &Schema, pipelined: bool) -> Self {
        let head = head_sql(schema);
        Self {
            // The lock's key is made of the schema's name, an identifier; quoted all the same.
            begin: format!(
                "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan;
                 SET LOCAL enable_seqscan = off; SET LOCAL jit = off;
                 SELECT pg_advisory_xact_lock_shared(hashtext('{}'))",
                schema.fan_out_lock_key().replace('\'', "''")
            ),
            // Events without an ordering key, in `id` order, after the head. Taking a batch marks
            // it dispatched in the same statement (the transaction makes that one with the deliveries' insert): one
            // statement per pass instead of two. The locked rows are found again by `ctid`, which
            // cannot change while this transaction holds their locks. The batch stops at `$4`
            // bytes of payload (the first row always), so one pass never brings more into memory
            // than that; rows past it stay locked until this transaction ends and go in the next.
            take: Statement::new(
                schema.sql(&format!(
                    "WITH taken AS (
                         UPDATE __SCHEMA__.outbox SET dispatched_at = now()
                         WHERE ctid = ANY(ARRAY(
                             SELECT ctid FROM (
                                 SELECT ctid, sum(octet_length(payload::text)) OVER (ORDER BY id)
                                              - octet_length(payload::text) AS before
                                 FROM (SELECT ctid, id, payload FROM __SCHEMA__.outbox
                                       WHERE dispatched_at IS NULL AND ordering_key IS NULL
                                       ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) batch) s
                             WHERE before < $4))
                         RETURNING {TAKEN})
                     SELECT h.*, t.* FROM ({head}) h LEFT JOIN taken t ON true"
                )),
                "uuid, timestamptz, bigint, bigint",
            ),
            // A pass woken by a notification or a probe finds a commit or two: rows bounded by
            // count alone (`small_batch` payloads of at most `max_payload` each fit the byte
            // budget), without the running byte count (a sort and a window over the batch). Only
            // locked, not marked dispatched: the pass marks them in its second round trip, which
            // is on the wire when the first request starts, while an update here (a new row
            // version, an entry in each index) cost the take about 60 µs more than the lock.
            take_small: Statement::new(
                schema.sql(&format!(
                    "SELECT h.*, t.* FROM ({head}) h LEFT JOIN LATERAL (
                         SELECT {TAKEN} FROM __SCHEMA__.outbox
                         WHERE dispatched_at IS NULL AND ordering_key IS NULL
                         ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) t ON true"
                )),
                "uuid, timestamptz, bigint",
            ),
            read: read_sql(schema),
            pipelined,
            prepared: Mutex::default(),
        }
    }

    /// Opens the pass's transaction on `client`, takes events (`take`: the take's arguments,
    /// `[batch, bytes]`, or `[rows]` for a `small` pass) and reads the pass's head, then the
    /// endpoints if the ones `known` keeps are out of date (a round trip more). An error leaves
    /// the transaction to the caller to roll back.
    pub(super) async fn open(
        &self,
        client: &deadpool_postgres::Client,
        small: bool,
        take: &[i64],
        known: &Known,
    ) -> anyhow::Result<Opened> {
        let statement = if small { &self.take_small } else { &self.take };
        let (kept, params) = known.current();
        let (head, taken) = if self.pipelined {
            split(&self.pipelined(client, statement, take, params).await?)?
        } else {
            split(&self.one_message(client, statement, take, params).await?)?
        };
        let targets = match kept {
            Some(kept) if !head.read => kept,
            _ => {
                let read = client.prepare_cached(&self.read).await?;
                known.store(&client.query(&read, &[]).await?)?
            }
        };
        Ok(Opened {
            taken,
            marked: !small,
            head,
            targets,
        })
    }

    /// Two messages, both sent before either answer is awaited; they run in order.
    async fn pipelined(
        &self,
        client: &deadpool_postgres::Client,
        take: &Statement,
        args: &[i64],
        (version, expiry): KnownParams,
    ) -> anyhow::Result<Vec<tokio_postgres::Row>> {
        let take = client.prepare_cached(&take.sql).await?;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&version, &expiry];
        params.extend(args.iter().map(|a| a as &(dyn ToSql + Sync)));
        let (_, rows) = futures_util::try_join!(
            client.batch_execute(&self.begin),
            client.query(&take, &params),
        )?;
        Ok(rows)
    }

    /// One message, one answer: the server flushes once and this side wakes once.
    async fn one_message(
        &self,
        client: &deadpool_postgres::Client,
        take: &Statement,
        args: &[i64],
        (version, expiry): KnownParams,
    ) -> anyhow::Result<Vec<SimpleQueryRow>> {
        self.prepare(client).await?;
        // Every argument is a number, a uuid or a time this replica formats: nothing from outside
        // is spliced into the statement.
        let args: Vec<String> = args.iter().map(i64::to_string).collect();
        let version = version.map_or("NULL".into(), |v| format!("'{v}'"));
        let expiry = expiry.map_or("NULL".into(), |t| {
            format!(
                "'{}'",
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            )
        });
        let sql = format!(
            "{}; EXECUTE {}({version}, {expiry}, {})",
            self.begin,
            take.name,
            args.join(", ")
        );
        let messages = match client.simple_query(&sql).await {
            Ok(messages) => messages,
            Err(e) => {
                if e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) {
                    // Gone from the session (a transaction pooler, `DISCARD ALL`): prepared
                    // again by the next pass on this connection.
                    self.forget(client);
                    return Err(e).context(
                        "the fan-out's prepared statements are gone from this connection (behind \
                         a transaction pooler, set database.pgbouncer = true)",
                    );
                }
                return Err(e.into());
            }
        };
        // Each statement's rows end with its completion; the take's are the last.
        let mut statements: Vec<Vec<SimpleQueryRow>> = vec![Vec::new()];
        for m in messages {
            match m {
                SimpleQueryMessage::Row(r) => statements.last_mut().expect("never empty").push(r),
                SimpleQueryMessage::CommandComplete(_) => statements.push(Vec::new()),
                _ => {}
            }
        }
        statements.pop();
        statements.pop().context("no answer to the take")
    }

    /// Prepares the statements on `client` unless this opening already did.
    async fn prepare(&self, client: &deadpool_postgres::Client) -> anyhow::Result<()> {
        let listed = |list: &[Weak<StatementCache>]| {
            list.iter()
                .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&client.statement_cache)))
        };
        if listed(&self.prepared.lock().expect("never poisoned")) {
            return Ok(());
        }
        let all = [&self.take, &self.take_small];
        // The other dispatcher loop may have prepared them on this connection.
        let names: Vec<String> = all.iter().map(|s| format!("'{}'", s.name)).collect();
        let present: Vec<String> = client
            .simple_query(&format!(
                "SELECT name FROM pg_prepared_statements WHERE name IN ({})",
                names.join(", ")
            ))
            .await?
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect();
        let missing: Vec<&str> = all
            .iter()
            .filter(|s| !present.contains(&s.name))
            .map(|s| s.prepare.as_str())
            .collect();
        if !missing.is_empty() {
            client
                .batch_execute(&missing.join(";\n"))
                .await
                .context("preparing the fan-out's statements")?;
        }
        let mut list = self.prepared.lock().expect("never poisoned");
        list.retain(|w| w.strong_count() > 0);
        if !listed(&list) {
            list.push(Arc::downgrade(&client.statement_cache));
        }
        Ok(())
    }

    fn forget(&self, client: &deadpool_postgres::Client) {
        let cache = Arc::as_ptr(&client.statement_cache);
        let mut list = self.prepared.lock().expect("never poisoned");
        list.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), cache));
    }
}

/// Against the Postgres at `DATABASE_URL`, each test in a schema of its own.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::scratch::Scratch;

    /// Opens a pass in `opening`'s way, then rolls it back (the events stay undispatched).
    async fn open(s: &Scratch, opening: &Opening, known: &Known) -> anyhow::Result<Opened> {
        let client = s.pool.get().await.unwrap();
        let opened = opening.open(&client, false, &[500, 1 << 22], known).await;
        client.batch_execute("ROLLBACK").await.unwrap();
        opened
    }

    #[tokio::test]
    async fn one_message_and_the_pipeline_read_the_same_rows_and_keep_the_same_endpoints() {
        let s = Scratch::new().await;
        s.run(
            "INSERT INTO __SCHEMA__.endpoints (id, url, events, tenant, headers, retry, source)
             VALUES ('a', 'http://127.0.0.1:1/a', ARRAY['order.*', 'invoice.*'], NULL,
                     '{\"x-a\": \"1\"}', '{\"max_attempts\": 3}', 'api'),
                    ('b', 'http://127.0.0.1:1/b', '{*}', 'acme', '{}', NULL, 'api');
             INSERT INTO __SCHEMA__.endpoint_secrets (endpoint_id, secret, expires_at)
             VALUES ('a', 'old', now() + interval '1.5 seconds'), ('a', 'n\"e,w\\{} NULL', NULL);
             INSERT INTO __SCHEMA__.endpoint_flow (endpoint_id, paused_until)
             VALUES ('b', now() + interval '1 hour');
             INSERT INTO __SCHEMA__.outbox (event_type, payload, tenant, target_endpoint, metadata, created_at)
             VALUES ('order.created', '{\"s\": \"caf\u{e9} \\\\ \\\"q\\\" \\n\"}', NULL, NULL, NULL,
                     '1969-12-31 23:59:58.5+00'),
                    ('order.paid', '[1, 2.5, null]', 'acme', 'b',
                     '{\"k\": [1e400], \"traceparent\": \"00-t\", \"tracestate\": 7}', now());
             INSERT INTO __SCHEMA__.outbox (event_type, payload, ordering_key)
             VALUES ('order.keyed', '{}', 'k1');",
        )
        .await;
        let client = s.pool.get().await.unwrap();
        let truth = client
            .query(
                &s.schema.sql(
                    "SELECT id, event_id, payload::text, created_at FROM __SCHEMA__.outbox
                     WHERE ordering_key IS NULL ORDER BY id",
                ),
                &[],
            )
            .await
            .unwrap();
        let expiry: DateTime<Utc> = client
            .query_one(
                &s.schema
                    .sql("SELECT min(expires_at) FROM __SCHEMA__.endpoint_secrets"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        drop(client);

        let (one, piped) = (
            Opening::new(&s.schema, false),
            Opening::new(&s.schema, true),
        );
        let (one_known, piped_known) = (Known::default(), Known::default());
        let mut seen = Vec::new();
        for (opening, known) in [(&one, &one_known), (&piped, &piped_known)] {
            // A small take: the same events, locked, not marked.
            let client = s.pool.get().await.unwrap();
            let o = opening.open(&client, true, &[4], known).await.unwrap();
            let marked = client
                .query_one(
                    &s.schema.sql(
                        "SELECT count(*) FROM __SCHEMA__.outbox WHERE dispatched_at IS NOT NULL",
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            client.batch_execute("ROLLBACK").await.unwrap();
            drop(client);
            assert_eq!((o.taken.len(), o.marked, marked), (2, false, 0));
            let o = open(&s, opening, known).await.unwrap();
            assert!(o.marked);
            assert!(o.head.keyed);
            assert_eq!(o.head.hindered, ["b"]);
            // The keyed event is not the plain take's.
            assert_eq!(o.taken.len(), 2);
            for (t, r) in o.taken.iter().zip(&truth) {
                assert_eq!(t.id, r.get::<_, i64>(0));
                assert_eq!(t.event_id, r.get::<_, Uuid>(1));
                assert_eq!(&*t.payload, r.get::<_, &str>(2));
                assert_eq!(t.created_at, r.get::<_, DateTime<Utc>>(3));
                assert!(t.lag >= 0.0);
            }
            let (first, second) = (&o.taken[0], &o.taken[1]);
            assert_eq!(
                (first.tenant.as_deref(), first.target.as_deref()),
                (None, None)
            );
            assert_eq!(first.trace, Trace::default());
            assert_eq!(
                (second.tenant.as_deref(), second.target.as_deref()),
                (Some("acme"), Some("b"))
            );
            // Metadata no JSON reader here could take; only string members are carried.
            let trace = Trace {
                parent: Some("00-t".into()),
                state: None,
            };
            assert_eq!(second.trace, trace);
            let a = o.targets.iter().find(|t| t.id == "a").unwrap();
            assert!(a.wants("order.created", None, None));
            assert!(a.wants("invoice.paid", None, None));
            assert!(!a.wants("refund.paid", None, None));
            // Array elements that need quoting as text arrive whole.
            assert_eq!(a.secrets, ["n\"e,w\\{} NULL", "old"]);
            assert_eq!(a.headers, serde_json::json!({"x-a": "1"}));
            assert_eq!(a.retry, Some(serde_json::json!({"max_attempts": 3})));
            assert!(a.active && !a.rate_limited && a.tenant.is_none());
            let b = o.targets.iter().find(|t| t.id == "b").unwrap();
            assert_eq!(
                (b.tenant.as_deref(), b.retry.as_ref()),
                (Some("acme"), None)
            );
            assert_eq!(known.current().1 .1, Some(expiry));
            seen.push(o.targets);
        }
        // Kept while nothing changed: the next pass (version and expiry given back) reads none.
        for ((opening, known), first) in [(&one, &one_known), (&piped, &piped_known)]
            .into_iter()
            .zip(&seen)
        {
            let o = open(&s, opening, known).await.unwrap();
            assert!(
                Arc::ptr_eq(&o.targets, first),
                "read again though unchanged"
            );
        }
        // Read again once the first secret has expired, without it.
        let wait = (expiry - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait + std::time::Duration::from_millis(50)).await;
        for ((opening, known), first) in [(&one, &one_known), (&piped, &piped_known)]
            .into_iter()
            .zip(&seen)
        {
            let o = open(&s, opening, known).await.unwrap();
            assert!(
                !Arc::ptr_eq(&o.targets, first),
                "kept past a secret's expiry"
            );
            let a = o.targets.iter().find(|t| t.id == "a").unwrap();
            assert_eq!(a.secrets, ["n\"e,w\\{} NULL"]);
        }
        s.drop_schema().await;
    }

    #[tokio::test]
    async fn statements_gone_from_a_connection_are_prepared_again() {
        let s = Scratch::new().await;
        s.run("INSERT INTO __SCHEMA__.outbox (event_type, payload) VALUES ('a.b', '{}')")
            .await;
        let (opening, known) = (Opening::new(&s.schema, false), Known::default());
        assert_eq!(open(&s, &opening, &known).await.unwrap().taken.len(), 1);
        // As a transaction pooler or `DISCARD ALL` would leave the (only) connection.
        s.run(
            "DO $$ DECLARE n text; BEGIN
               FOR n IN SELECT name FROM pg_prepared_statements WHERE name LIKE 'postern_fan_out_%'
               LOOP EXECUTE format('DEALLOCATE %I', n); END LOOP; END $$",
        )
        .await;
        let e = open(&s, &opening, &known)
            .await
            .err()
            .expect("the statements are gone");
        assert!(format!("{e:#}").contains("database.pgbouncer"), "{e:#}");
        assert_eq!(open(&s, &opening, &known).await.unwrap().taken.len(), 1);
        s.drop_schema().await;
    }
}
