//! Against the Postgres at `DATABASE_URL`, each test in a schema of its own.

use super::*;
use crate::config::{BreakerConfig, OnFailure};
use crate::db;
use crate::db::scratch::Scratch;

mod due_again;

/// A migrated schema of its own, and a pool with the pipeline's session settings over it.
async fn scratch() -> (Scratch, crate::db::Schema, Pool) {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
    (s, schema, pool)
}

/// The store the pipeline would have over `pool`, with the default breaker.
fn store_in(pool: &Pool, schema: &crate::db::Schema, on_failure: OnFailure) -> DeliveryStore {
    let defaults = flow::FlowDefaults::new(None, &BreakerConfig::default(), 16);
    DeliveryStore::new(pool.clone(), schema, on_failure, defaults)
}

/// An outcome of attempt 1 of delivery `id` at endpoint `e`, answered `code`.
fn ack(id: Uuid, key: Option<&str>, settle: Settle, code: i32) -> Ack {
    Ack {
        id,
        attempt: 1,
        endpoint_id: "e".into(),
        ordering_key: key.map(str::to_string),
        judged: true,
        probe: false,
        retry_after: None,
        settle,
        record: super::super::AttemptRecord {
            started_at: Utc::now(),
            duration_ms: 3,
            status_code: Some(code),
            response_body: None,
            error: None,
            request_headers: None,
        },
    }
}

/// The sweeper runs on every reaper tick for each endpoint changed within the hour: its work must
/// not grow with the deliveries an endpoint has finished (the table's bulk), or an endpoint's
/// change makes every tick scan the whole table for an hour.
#[tokio::test]
async fn the_sweep_reads_only_waiting_deliveries() {
    let (s, schema, pool) = scratch().await;
    let client = pool.get().await.unwrap();
    // Endpoints in each state the sweep looks at, all changed just now, and 40,000 finished
    // deliveries beside a few waiting ones.
    client
        .batch_execute(&schema.sql(
            "INSERT INTO __SCHEMA__.endpoints (id, url, events, source, active, deleted_at) VALUES
                ('on', 'http://127.0.0.1:9/a', '{*}', 'api', true, NULL),
                ('off', 'http://127.0.0.1:9/b', '{*}', 'api', false, NULL),
                ('gone', 'http://127.0.0.1:9/c', '{*}', 'api', true, now());
             INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status)
             SELECT g, gen_random_uuid(), 't', (ARRAY['on', 'off', 'gone'])[g % 3 + 1], 'delivered'
             FROM generate_series(1, 40000) g;
             INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status)
             VALUES (1, gen_random_uuid(), 't', 'on', 'paused'), (2, gen_random_uuid(), 't', 'off', 'pending'),
                    (3, gen_random_uuid(), 't', 'gone', 'pending'), (4, gen_random_uuid(), 't', 'gone', 'paused');
             ANALYZE __SCHEMA__.deliveries",
        ))
        .await
        .unwrap();
    let store = store_in(&pool, &schema, OnFailure::Skip);
    // The statement's own work, counted in buffers, inside a transaction rolled back.
    client.batch_execute("BEGIN").await.unwrap();
    let plan: serde_json::Value = client
        .query_one(
            &format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}", store.sweep),
            &[&500i64],
        )
        .await
        .unwrap()
        .get(0);
    client.batch_execute("ROLLBACK").await.unwrap();
    let top = &plan[0]["Plan"];
    let buffers =
        top["Shared Hit Blocks"].as_i64().unwrap() + top["Shared Read Blocks"].as_i64().unwrap();
    let pages: i64 = client
        .query_one(
            &schema.sql("SELECT relpages::bigint FROM pg_class WHERE oid = '__SCHEMA__.deliveries'::regclass"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        pages > 200,
        "the table is large enough to tell: {pages} pages"
    );
    assert!(
        buffers < 100,
        "the sweep touched {buffers} buffers of a {pages}-page table: {plan:#}"
    );
    // And it still moves each waiting delivery as its endpoint calls for.
    assert_eq!(store.sweep(500).await.unwrap(), 4);
    let moved: Vec<(String, String)> = s
        .pairs(
            "SELECT endpoint_id, status FROM __SCHEMA__.deliveries
             WHERE status <> 'delivered' ORDER BY endpoint_id, status",
        )
        .await;
    let expected = [
        ("gone", "cancelled"),
        ("gone", "cancelled"),
        ("off", "paused"),
        ("on", "pending"),
    ];
    assert_eq!(moved, expected.map(|(e, s)| (e.to_string(), s.to_string())));
    s.drop_schema().await;
}

/// An endpoint re-activated with a backlog larger than its change moved (10,000) leaves the rest
/// to the sweeper; if that is not done within the hour the sweeper watches changed endpoints for
/// (replicas down, a huge backlog), the rest must still become due, not stay paused for good.
#[tokio::test]
async fn paused_deliveries_of_an_endpoint_active_for_hours_become_due() {
    let (s, schema, pool) = scratch().await;
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source, active, updated_at)
         VALUES ('on', 'http://127.0.0.1:9/a', '{*}', 'api', true, now() - interval '2 hours');
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status)
         SELECT g, gen_random_uuid(), 't', 'on', 'paused' FROM generate_series(1, 5) g",
    )
    .await;
    let store = store_in(&pool, &schema, OnFailure::Skip);
    // Outside the window of every tick, inside that of the pruning interval's.
    assert_eq!(store.sweep(500).await.unwrap(), 0);
    assert_eq!(store.sweep_all(500).await.unwrap(), 5);
    let client = pool.get().await.unwrap();
    let pending: i64 = client
        .query_one(
            &schema.sql("SELECT count(*) FROM __SCHEMA__.deliveries WHERE status = 'pending'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 5);
    drop(client);
    s.drop_schema().await;
}

/// After one failure the breaker's window is left with a failure in it; successes after that must
/// start a new window when the old one ends, not add to the old one for ever (its counter would
/// overflow, and every settle would then be refused, its deliveries sent again and failed).
#[tokio::test]
async fn successes_after_a_failure_start_a_new_window_and_never_overflow_it() {
    let (s, schema, pool) = scratch().await;
    let owner = Uuid::new_v4();
    let id = Uuid::now_v7();
    s.run(&format!(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source)
         VALUES ('e', 'http://127.0.0.1:9/a', '{{*}}', 'api');
         INSERT INTO __SCHEMA__.endpoint_flow (endpoint_id, window_started_at, window_attempts, window_failures)
         VALUES ('e', now() - interval '1 day', 2147483647, 1);
         INSERT INTO __SCHEMA__.deliveries
            (id, outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at)
         VALUES ('{id}', 1, gen_random_uuid(), 't', 'e', 'delivering', 1, '{owner}', now() + interval '1 minute')"
    ))
    .await;
    let store = store_in(&pool, &schema, OnFailure::Skip);
    let ack = ack(id, None, Settle::Delivered, 200);
    store
        .settle(owner, std::slice::from_ref(&ack))
        .await
        .unwrap();
    let (attempts, failures) = s
        .pairs::<i32, i32>("SELECT window_attempts, window_failures FROM __SCHEMA__.endpoint_flow")
        .await[0];
    assert_eq!((attempts, failures), (1, 0));
    // Within a window that has not ended (a long `window`), the count stops at its ceiling.
    let id = Uuid::now_v7();
    s.run(&format!(
        "UPDATE __SCHEMA__.endpoint_flow SET window_started_at = now(), window_attempts = 2147483647, window_failures = 1;
         INSERT INTO __SCHEMA__.deliveries
            (id, outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at)
         VALUES ('{id}', 2, gen_random_uuid(), 't', 'e', 'delivering', 1, '{owner}', now() + interval '1 minute')"
    ))
    .await;
    let ack = Ack { id, ..ack };
    store.settle(owner, &[ack]).await.unwrap();
    let (attempts, failures) = s
        .pairs::<i32, i32>("SELECT window_attempts, window_failures FROM __SCHEMA__.endpoint_flow")
        .await[0];
    assert_eq!((attempts, failures), (2147483647, 1));
    s.drop_schema().await;
}

/// A delivery waiting for an open circuit's probe time or a pause is not waiting for tokens: the
/// claim must not report it as held for tokens (which makes the worker claim again within 50 ms,
/// for as long as the circuit stays open), while one a rate limit holds still is.
#[tokio::test]
async fn only_deliveries_waiting_for_tokens_count_as_held_by_the_rate() {
    let (s, schema, pool) = scratch().await;
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source, rate_limit) VALUES
            ('open', 'http://127.0.0.1:9/a', '{*}', 'api', NULL),
            ('paused', 'http://127.0.0.1:9/b', '{*}', 'api', NULL),
            ('limited', 'http://127.0.0.1:9/c', '{*}', 'api', '1/h');
         INSERT INTO __SCHEMA__.endpoint_flow (endpoint_id, opened_at, probe_at, paused_until, tokens)
         VALUES ('open', now(), now() + interval '1 hour', NULL, 0),
                ('paused', NULL, NULL, now() + interval '1 hour', 0),
                ('limited', NULL, NULL, NULL, 1);
         INSERT INTO __SCHEMA__.outbox (event_type, payload, dispatched_at)
         SELECT 't', '{}', now() FROM generate_series(1, 4);
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, next_attempt_at)
         SELECT g, gen_random_uuid(), 't', (ARRAY['open', 'paused', 'limited', 'limited'])[g], 'pending', now() - interval '1 second'
         FROM generate_series(1, 4) g",
    )
    .await;
    let store = store_in(&pool, &schema, OnFailure::Skip);
    let (claimed, held) = store
        .claim(
            true,
            Uuid::new_v4(),
            10,
            4,
            &[],
            Duration::from_secs(30),
            Room::Bytes(1 << 20),
        )
        .await
        .unwrap();
    // The limited endpoint's bucket holds one token; its second delivery waits for tokens. The open and paused endpoints' wait for no token.
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].endpoint_id, "limited");
    assert_eq!(held, 1);
    s.drop_schema().await;
}

/// A keyed head the reaper fails (its lease lapsed too often) leaves its key in the same
/// transaction, under the key's lock: until then no one sees it failed, so nothing can promote
/// the next delivery past a key that `on_failure = "block"` must block.
#[tokio::test]
async fn the_reaper_fails_a_keyed_head_and_blocks_its_key_in_one_transaction() {
    let (s, schema, pool) = scratch().await;
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, ordering_key, dispatched_at)
         SELECT 't', '{}', 'k', now() FROM generate_series(1, 2);
         INSERT INTO __SCHEMA__.deliveries
            (outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at,
             lease_lapses, ordering_key)
         VALUES (1, gen_random_uuid(), 't', 'e', 'delivering', 1, gen_random_uuid(), now() - interval '1 second', 2, 'k'),
                (2, gen_random_uuid(), 't', 'e', 'queued', 0, NULL, NULL, 0, 'k')",
    )
    .await;
    let store = std::sync::Arc::new(store_in(&pool, &schema, OnFailure::Block));
    // Another writer holds the key.
    let mut holder = pool.get().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    let mut keys = ordering::Keys::default();
    keys.push("e", "k");
    store.ordering.lock(&tx, &keys).await.unwrap();
    let reaper = {
        let store = store.clone();
        tokio::spawn(async move { store.reap(500, 3).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While the reaper waits for the key, its head is not seen failed.
    let seen = s
        .pairs::<String, i64>(
            "SELECT status::text, outbox_id FROM __SCHEMA__.deliveries ORDER BY outbox_id",
        )
        .await;
    assert_eq!(seen[0].0, "delivering", "{seen:?}");
    tx.commit().await.unwrap();
    assert_eq!(reaper.await.unwrap().unwrap(), 1);
    let seen = s
        .pairs::<String, i64>(
            "SELECT status::text, outbox_id FROM __SCHEMA__.deliveries ORDER BY outbox_id",
        )
        .await;
    assert_eq!(
        (seen[0].0.as_str(), seen[1].0.as_str()),
        ("failed", "queued"),
        "{seen:?}"
    );
    let blocked = s
        .pairs::<String, bool>(
            "SELECT ordering_key, blocked_by IS NOT NULL FROM __SCHEMA__.ordering_keys",
        )
        .await;
    assert_eq!(blocked, [("k".to_string(), true)]);
    s.drop_schema().await;
}

/// A claim made while the memory budget is short of the largest payload takes only the rows whose
/// payloads fit whole in the room left, and leaves the rest due, untouched.
#[tokio::test]
async fn a_claim_short_of_room_takes_only_payloads_that_fit_whole() {
    let (s, schema, pool) = scratch().await;
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES
            ('big', 'http://127.0.0.1:9/a', '{*}', 'api'), ('small', 'http://127.0.0.1:9/b', '{*}', 'api');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, dispatched_at)
         VALUES ('t', jsonb_build_object('pad', repeat('x', 100000)), now()), ('t', '{\"n\": 1}', now());
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, next_attempt_at)
         VALUES (1, gen_random_uuid(), 't', 'big', 'pending', now() - interval '1 second'),
                (2, gen_random_uuid(), 't', 'small', 'pending', now() - interval '1 second')",
    )
    .await;
    let store = store_in(&pool, &schema, OnFailure::Skip);
    let claim = |room| {
        let store = &store;
        async move {
            store
                .claim(
                    false,
                    Uuid::new_v4(),
                    10,
                    4,
                    &[],
                    Duration::from_secs(30),
                    room,
                )
                .await
                .unwrap()
                .0
        }
    };
    let claimed = claim(Room::Whole(10_000)).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].endpoint_id, "small");
    // With room for the largest payload, the first row goes whatever its size.
    let claimed = claim(Room::Bytes(10_000)).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].endpoint_id, "big");
    s.drop_schema().await;
}

/// Every writer locks a key before its deliveries' rows (a settle: the key, then the row), and so
/// does the reaper: a late settle of the very head the reaper is failing waits for it, or it for
/// the settle, never both for each other (a deadlock, which Postgres would break by failing one).
#[tokio::test]
async fn the_reaper_and_a_late_settle_of_the_same_head_do_not_deadlock() {
    let (s, schema, pool) = scratch().await;
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, ordering_key, dispatched_at) VALUES ('t', '{}', 'k', now());
         INSERT INTO __SCHEMA__.deliveries
            (outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at,
             lease_lapses, ordering_key)
         VALUES (1, gen_random_uuid(), 't', 'e', 'delivering', 1, gen_random_uuid(), now() - interval '1 second', 2, 'k')",
    )
    .await;
    let store = std::sync::Arc::new(store_in(&pool, &schema, OnFailure::Block));
    // A settle: the key first...
    let mut settler = pool.get().await.unwrap();
    let tx = settler.transaction().await.unwrap();
    let mut keys = ordering::Keys::default();
    keys.push("e", "k");
    store.ordering.lock(&tx, &keys).await.unwrap();
    let reaper = {
        let store = store.clone();
        tokio::spawn(async move { store.reap(500, 3).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...then the row.
    let touched = tokio::time::timeout(
        Duration::from_secs(5),
        tx.execute(
            &schema.sql("UPDATE __SCHEMA__.deliveries SET updated_at = now() WHERE outbox_id = 1"),
            &[],
        ),
    )
    .await
    .expect("the settle waited for the reaper");
    touched.expect("the settle was failed to break a deadlock");
    tx.commit().await.unwrap();
    assert_eq!(reaper.await.unwrap().expect("the reaper was failed"), 1);
    s.drop_schema().await;
}
