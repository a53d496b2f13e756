//! Against the Postgres at `DATABASE_URL`, each test in a schema of its own.

use super::*;
use crate::config::{BreakerConfig, OnFailure};
use crate::db;
use crate::db::scratch::Scratch;

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

/// Endpoint `e`'s tenant changed to `globex`, as the API does it: the endpoint, then the cancel
/// of what the new tenant may not get, in `tx`.
async fn retenant(tx: &deadpool_postgres::Transaction<'_>, schema: &crate::db::Schema) {
    tx.batch_execute(
        &schema.sql("UPDATE __SCHEMA__.endpoints SET tenant = 'globex' WHERE id = 'e'"),
    )
    .await
    .unwrap();
    crate::delivery::state::cancel_ineligible(tx, schema, "e")
        .await
        .unwrap();
}

/// The sweeper runs on every reaper tick for each endpoint changed within the hour: its work must
/// not grow with the deliveries an endpoint has finished (the table's bulk), or an endpoint's
/// change makes every tick scan the whole table for an hour.
#[tokio::test]
async fn the_sweep_reads_only_waiting_deliveries() {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
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
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
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
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
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
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
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
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
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
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
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
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
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

/// An operator's retry racing a tenant change: the retry waits for the change and then sees the
/// new tenant, so it cannot move a delivery the change's cancel has already looked past.
#[tokio::test]
async fn a_retry_racing_a_tenant_change_sees_the_new_tenant() {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source, tenant) VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api', 'acme');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, tenant, dispatched_at) VALUES ('t', '{}', 'acme', now());
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, attempts)
         VALUES (1, gen_random_uuid(), 't', 'e', 'failed', 1)",
    )
    .await;
    let id: Uuid = s
        .pairs::<Uuid, i64>("SELECT id, outbox_id FROM __SCHEMA__.deliveries")
        .await[0]
        .0;
    // The tenant change, as the API makes it: the endpoint, then the cancel, one transaction.
    let mut changer = pool.get().await.unwrap();
    let change = changer.transaction().await.unwrap();
    retenant(&change, &schema).await;
    let retry = {
        let (pool, schema) = (pool.clone(), schema.clone());
        tokio::spawn(async move {
            let mut client = pool.get().await.unwrap();
            let ordering = ordering::Ordering::new(&schema, OnFailure::Skip);
            crate::delivery::state::retry_now(
                &mut client,
                &schema,
                &ordering,
                id,
                DeliveryStatus::Failed,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    change.commit().await.unwrap();
    assert!(
        !retry.await.unwrap().unwrap(),
        "the retry moved the old tenant's delivery"
    );
    let status = s
        .pairs::<String, i64>("SELECT status::text, outbox_id FROM __SCHEMA__.deliveries")
        .await;
    assert_eq!(status[0].0, "failed");
    s.drop_schema().await;
}

/// A keyed delivery in flight at a tenant change is left to finish (cancelling it would let its
/// key's next delivery overtake it), but if it comes back due it must not go to the new tenant:
/// handed back (its slot never came, or shutdown), deferred, or reaped after its lease lapsed,
/// it is cancelled, as an attempt that did not deliver is (the ack statement).
#[tokio::test]
async fn an_old_tenants_keyed_delivery_coming_back_due_is_cancelled() {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
    let owner = Uuid::now_v7();
    s.run(&format!(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source, tenant) VALUES ('e', 'http://127.0.0.1:9/a', '{{*}}', 'api', 'acme');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, tenant, ordering_key, dispatched_at)
         SELECT 't', '{{}}', 'acme', 'k' || g, now() FROM generate_series(1, 3) g;
         INSERT INTO __SCHEMA__.deliveries
            (outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at, ordering_key)
         SELECT g, gen_random_uuid(), 't', 'e', 'delivering', 1, '{owner}',
                CASE WHEN g = 3 THEN now() - interval '1 second' ELSE now() + interval '1 minute' END, 'k' || g
         FROM generate_series(1, 3) g"
    ))
    .await;
    // The tenant change, as the API makes it: keyed deliveries in flight stay.
    let mut client = pool.get().await.unwrap();
    let change = client.transaction().await.unwrap();
    retenant(&change, &schema).await;
    change.commit().await.unwrap();
    let ids: Vec<Uuid> = s
        .pairs::<Uuid, i64>("SELECT id, outbox_id FROM __SCHEMA__.deliveries ORDER BY outbox_id")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let store = store_in(&pool, &schema, OnFailure::Skip);
    assert_eq!(store.hand_back(owner, &[(ids[0], 1)]).await.unwrap(), 1);
    let deferral = crate::delivery::Deferral {
        id: ids[1],
        attempt: 1,
        reason: "cannot open".into(),
    };
    store
        .defer(owner, &[deferral], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(store.reap(500, 3).await.unwrap(), 1);
    let seen = s
        .pairs::<i64, String>(
            "SELECT outbox_id, status::text FROM __SCHEMA__.deliveries ORDER BY outbox_id",
        )
        .await;
    let expected: Vec<(i64, String)> = (1..=3).map(|i| (i, "cancelled".to_string())).collect();
    assert_eq!(seen, expected, "handed back, deferred, reaped");
    let why = s
        .pairs::<i64, String>(
            "SELECT outbox_id, last_error FROM __SCHEMA__.deliveries ORDER BY outbox_id",
        )
        .await;
    assert!(
        why.iter()
            .all(|(_, e)| e.contains("tenant of the endpoint changed")),
        "{why:?}"
    );
    s.drop_schema().await;
}

/// The same delivery settled as due again (its receiver answered 500) is cancelled, and its key
/// moves on in the same transaction: the new tenant's next delivery of the key is not left
/// queued without a head until the sweeper's safety net finds it.
#[tokio::test]
async fn an_old_tenants_keyed_retry_is_cancelled_and_its_key_moves_on() {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
    let owner = Uuid::now_v7();
    s.run(&format!(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source, tenant) VALUES ('e', 'http://127.0.0.1:9/a', '{{*}}', 'api', '*');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, tenant, ordering_key, dispatched_at)
         VALUES ('t', '{{}}', 'acme', 'k', now()), ('t', '{{}}', 'globex', 'k', now());
         INSERT INTO __SCHEMA__.deliveries
            (outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at, ordering_key)
         VALUES (1, gen_random_uuid(), 't', 'e', 'delivering', 1, '{owner}', now() + interval '1 minute', 'k'),
                (2, gen_random_uuid(), 't', 'e', 'queued', 0, NULL, NULL, 'k');
         UPDATE __SCHEMA__.endpoints SET tenant = 'globex'"
    ))
    .await;
    let id = s
        .pairs::<Uuid, i64>("SELECT id, outbox_id FROM __SCHEMA__.deliveries WHERE outbox_id = 1")
        .await[0]
        .0;
    let store = store_in(&pool, &schema, OnFailure::Skip);
    let retry = ack(id, Some("k"), Settle::Retry { at: Utc::now() }, 500);
    store.settle(owner, &[retry]).await.unwrap();
    let seen = s
        .pairs::<i64, String>(
            "SELECT outbox_id, status::text FROM __SCHEMA__.deliveries ORDER BY outbox_id",
        )
        .await;
    assert_eq!(
        seen,
        [(1, "cancelled".to_string()), (2, "pending".to_string())]
    );
    s.drop_schema().await;
}

/// A replay of an endpoint's failed deliveries goes in batches, each its own transaction: a
/// replay of millions must not hold every key's lock (and the endpoint's row) until it ends,
/// stalling every settle of those keys (and every endpoint change, which waits for the row while
/// holding fan-out off). Here a settle-like writer holds the key of the last batch: the batches
/// before it are committed (visible to others) while the replay waits for that key.
#[tokio::test]
async fn a_replay_commits_batch_by_batch() {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
    // 2,500 failed keyed deliveries, one key each, created in key order.
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, ordering_key, dispatched_at)
         SELECT 't', '{}', 'k' || lpad(g::text, 5, '0'), now() FROM generate_series(1, 2500) g;
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, ordering_key, created_at)
         SELECT id, gen_random_uuid(), 't', 'e', 'failed', ordering_key, now() - interval '1 hour' + id * interval '1 ms'
         FROM __SCHEMA__.outbox",
    )
    .await;
    let mut holder = pool.get().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    let mut last = ordering::Keys::default();
    last.push("e", "k02500");
    let ordering = ordering::Ordering::new(&schema, OnFailure::Skip);
    ordering.lock(&tx, &last).await.unwrap();
    let replay = {
        let (pool, schema) = (pool.clone(), schema.clone());
        tokio::spawn(async move {
            let mut client = pool.get().await.unwrap();
            let ordering = ordering::Ordering::new(&schema, OnFailure::Skip);
            let since = Utc::now() - chrono::Duration::days(1);
            crate::delivery::state::replay_failed(&mut client, &schema, &ordering, "e", since, None)
                .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let moved = s
            .pairs::<String, i64>(
                "SELECT status::text, count(*) FROM __SCHEMA__.deliveries WHERE status = 'pending' GROUP BY 1",
            )
            .await;
        if moved.first().is_some_and(|(_, n)| *n >= 2000) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing the replay moved is committed while it waits for one key: {moved:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!replay.is_finished(), "the replay waits for the held key");
    tx.commit().await.unwrap();
    assert_eq!(replay.await.unwrap().unwrap(), 2500);
    let left = s
        .pairs::<String, i64>("SELECT status::text, count(*) FROM __SCHEMA__.deliveries GROUP BY 1")
        .await;
    assert_eq!(left, [("pending".to_string(), 2500)]);
    s.drop_schema().await;
}

/// A database away for longer than a lease (a failover) lets the lease lapse under an attempt
/// that did finish: the reaper, first back, makes the delivery due again and counts a lapse. The
/// outcome, written when the database returns, is still that attempt's own while no replica has
/// claimed the delivery since: it is recorded (a 2xx is not sent again) and the lapse forgotten,
/// so outages never add up to a "poison pill".
#[tokio::test]
async fn an_outcome_written_after_its_lease_lapsed_still_counts_until_another_claim() {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
    let owner = Uuid::now_v7();
    s.run(&format!(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES ('e', 'http://127.0.0.1:9/a', '{{*}}', 'api');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, dispatched_at) SELECT 't', '{{}}', now() FROM generate_series(1, 2);
         INSERT INTO __SCHEMA__.deliveries
            (outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at, lease_lapses)
         SELECT g, gen_random_uuid(), 't', 'e', 'delivering', 1, '{owner}', now() - interval '1 second', 2
         FROM generate_series(1, 2) g"
    ))
    .await;
    let store = store_in(&pool, &schema, OnFailure::Skip);
    assert_eq!(store.reap(500, 5).await.unwrap(), 2);
    let ids: Vec<Uuid> = s
        .pairs::<Uuid, i64>("SELECT id, outbox_id FROM __SCHEMA__.deliveries ORDER BY outbox_id")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // The second is claimed again by another replica before the first outcome comes in.
    s.run(&format!(
        "UPDATE __SCHEMA__.deliveries SET status = 'delivering', attempts = 2, lease_owner = gen_random_uuid(),
                lease_expires_at = now() + interval '1 minute' WHERE id = '{}'",
        ids[1]
    ))
    .await;
    let delivered = |id| ack(id, None, Settle::Delivered, 200);
    store
        .settle(owner, &[delivered(ids[0]), delivered(ids[1])])
        .await
        .unwrap();
    let seen = s
        .pairs::<i64, String>(
            "SELECT outbox_id, status::text || ' ' || lease_lapses FROM __SCHEMA__.deliveries ORDER BY outbox_id",
        )
        .await;
    assert_eq!(
        seen,
        [
            (1, "delivered 0".to_string()),
            (2, "delivering 3".to_string())
        ]
    );
    let attempts = s
        .pairs::<i32, Option<i32>>(&format!(
            "SELECT attempt, status_code FROM __SCHEMA__.attempts WHERE delivery_id = '{}'",
            ids[0]
        ))
        .await;
    assert_eq!(
        attempts,
        [(1, Some(200))],
        "the real outcome replaces 'unknown'"
    );
    s.drop_schema().await;
}

/// A keyed head the reaper failed for good (its leases lapsed `max_lapses` times) has let its key
/// move on (`on_failure = "skip"`): a late retry outcome of that attempt must not make it due again,
/// which would give the key a second head and send it after later events of its key.
#[tokio::test]
async fn a_late_retry_of_a_keyed_head_failed_by_the_reaper_leaves_it_failed() {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = db::pipeline_pool(&s.url, &db::tls::unverified()).unwrap();
    let owner = Uuid::now_v7();
    s.run(&format!(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES ('e', 'http://127.0.0.1:9/a', '{{*}}', 'api');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, ordering_key, dispatched_at)
         SELECT 't', '{{}}', 'k', now() FROM generate_series(1, 2);
         INSERT INTO __SCHEMA__.deliveries
            (outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at,
             lease_lapses, ordering_key)
         VALUES (1, gen_random_uuid(), 't', 'e', 'delivering', 1, '{owner}', now() - interval '1 second', 2, 'k'),
                (2, gen_random_uuid(), 't', 'e', 'queued', 0, NULL, NULL, 0, 'k')"
    ))
    .await;
    let store = store_in(&pool, &schema, OnFailure::Skip);
    assert_eq!(store.reap(500, 3).await.unwrap(), 1);
    let first = s
        .pairs::<Uuid, i64>("SELECT id, outbox_id FROM __SCHEMA__.deliveries WHERE outbox_id = 1")
        .await[0]
        .0;
    let retry = ack(first, Some("k"), Settle::Retry { at: Utc::now() }, 500);
    store.settle(owner, &[retry]).await.unwrap();
    let seen = s
        .pairs::<i64, String>(
            "SELECT outbox_id, status::text FROM __SCHEMA__.deliveries ORDER BY outbox_id",
        )
        .await;
    assert_eq!(
        seen,
        [(1, "failed".to_string()), (2, "pending".to_string())]
    );
    s.drop_schema().await;
}
