//! Against the Postgres at `DATABASE_URL`, in a schema of its own.

use super::*;
use crate::db::scratch::Scratch;

const DAY: Duration = Duration::from_secs(86_400);

/// Event pruning walks the old events once per pass, from where its last batch stopped: events
/// without deliveries go, wherever they sit among the events whose dead letters are kept (ties
/// on `dispatched_at` included); kept, young and undispatched events stay.
#[tokio::test]
async fn event_pruning_walks_past_kept_dead_letters_and_deletes_only_what_is_done() {
    let s = Scratch::new().await;
    let (pool, schema) = (s.pool.clone(), s.schema.clone());
    let client = pool.get().await.unwrap();
    // 2,500 ten-day-old events, each with a failed delivery kept (30 days); among them 10 without
    // deliveries, 5 of them dispatched at the same instant as a kept one; 3 young events and 2
    // undispatched ones without deliveries.
    client
        .batch_execute(&schema.sql(
            "ALTER TABLE __SCHEMA__.outbox DISABLE TRIGGER USER;
             INSERT INTO __SCHEMA__.endpoints (id, url, events, source)
             VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
             INSERT INTO __SCHEMA__.outbox (event_type, payload, dispatched_at)
             SELECT 'kept', '{}', now() - interval '10 days' - g * interval '1 second'
             FROM generate_series(1, 2500) g;
             INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, updated_at)
             SELECT id, event_id, event_type, 'e', 'failed', now() - interval '1 day' FROM __SCHEMA__.outbox;
             INSERT INTO __SCHEMA__.outbox (event_type, payload, dispatched_at)
             SELECT 'done', '{}'::jsonb, now() - interval '10 days' - g * interval '1 second'
             FROM generate_series(500, 2500, 500) g
             UNION ALL
             SELECT 'done', '{}'::jsonb, now() - interval '10 days' - g * interval '1 second' - interval '1 ms'
             FROM generate_series(250, 2250, 500) g
             UNION ALL
             SELECT 'young', '{}'::jsonb, now() - interval '1 hour' FROM generate_series(1, 3)
             UNION ALL
             SELECT 'waiting', '{}'::jsonb, NULL FROM generate_series(1, 2);
             ANALYZE __SCHEMA__.outbox",
        ))
        .await
        .unwrap();
    let retention = Retention::new(pool.clone(), &schema, 7 * DAY, 30 * DAY, 7 * DAY);
    // One pass looks at all 2,510 old events, a batch of 1,000 at a time.
    let pruned = retention.prune().await.unwrap();
    assert_eq!(pruned.events, 10);
    assert_eq!(pruned.deliveries, 0);
    let left: Vec<(String, i64)> = s
        .pairs("SELECT event_type, count(*) FROM __SCHEMA__.outbox GROUP BY 1 ORDER BY 1")
        .await;
    let want = [("kept", 2500), ("waiting", 2), ("young", 3)];
    assert_eq!(left, want.map(|(t, n)| (t.to_string(), n)));
    // The walk ended, so the next pass starts again from the oldest, and finds nothing to do.
    assert!(retention.events_from.lock().unwrap().is_none());
    assert_eq!(retention.prune().await.unwrap().events, 0);
    s.drop_schema().await;
}

/// Delivered deliveries go a week after they finish, dead letters a month after: the dead letters
/// kept meanwhile are all older than the delivered ones a batch deletes, and a batch must not read
/// them (with many, every batch re-read them all and pruning fell behind for good).
#[tokio::test]
async fn delivered_pruning_reads_none_of_the_kept_dead_letters() {
    let s = Scratch::new().await;
    let schema = s.schema.clone();
    let pool = crate::db::pipeline_pool(&s.url, &crate::db::tls::unverified()).unwrap();
    let client = pool.get().await.unwrap();
    // 40,000 dead letters ten days old (kept: 30 days), 1,500 deliveries delivered eight days ago
    // (due to go: 7 days), 100 delivered yesterday.
    client
        .batch_execute(&schema.sql(
            "INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, updated_at)
             SELECT g, gen_random_uuid(), 't', 'e', (ARRAY['failed', 'cancelled'])[g % 2 + 1],
                    now() - interval '10 days' - g * interval '1 second'
             FROM generate_series(1, 40000) g;
             INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, updated_at)
             SELECT g, gen_random_uuid(), 't', 'e', 'delivered', now() - interval '8 days' + g * interval '1 ms'
             FROM generate_series(1, 1500) g;
             INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, updated_at)
             SELECT g, gen_random_uuid(), 't', 'e', 'delivered', now() - interval '1 day'
             FROM generate_series(1, 100) g;
             INSERT INTO __SCHEMA__.attempts (delivery_id, attempt, started_at, duration_ms)
             SELECT id, 1, updated_at, 1 FROM __SCHEMA__.deliveries;
             ANALYZE __SCHEMA__.deliveries; ANALYZE __SCHEMA__.attempts",
        ))
        .await
        .unwrap();
    let retention = Retention::new(pool.clone(), &schema, 7 * DAY, 30 * DAY, 7 * DAY);
    // One batch of each class, run for its plan inside a transaction rolled back (dead letters
    // as if kept for 9 days, so that a batch of them is due too). Every row a batch reads is one
    // it deletes: index scans, nothing filtered out.
    // The dead letters' walk starts from the oldest (no cursor).
    let (no_time, no_id): (Option<chrono::DateTime<Utc>>, uuid::Uuid) = (None, uuid::Uuid::nil());
    for (sql, age, walk) in [
        (&retention.prune_delivered, 7 * DAY, false),
        (&retention.prune_failed, 9 * DAY, true),
    ] {
        let (age, batch) = (age.as_secs_f64(), BATCH);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&age, &batch];
        if walk {
            params.extend([&no_time as &(dyn ToSql + Sync), &no_id]);
        }
        client.batch_execute("BEGIN").await.unwrap();
        let plan: serde_json::Value = client
            .query_one(
                &format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"),
                &params,
            )
            .await
            .unwrap()
            .get(0);
        client.batch_execute("ROLLBACK").await.unwrap();
        let nodes = plan_nodes(&plan[0]["Plan"]);
        // Of the deliveries and their attempts (a check of a blocked key may read the small
        // `ordering_keys` and `endpoints` tables as the planner likes).
        let small = |n: &&serde_json::Value| {
            matches!(
                n["Relation Name"].as_str(),
                Some("ordering_keys" | "endpoints")
            )
        };
        let scans: Vec<&str> = nodes
            .iter()
            .filter(|n| !small(n))
            .filter_map(|n| n["Node Type"].as_str())
            .collect();
        let filtered: i64 = nodes
            .iter()
            .filter_map(|n| n["Rows Removed by Filter"].as_i64())
            .sum();
        let whole = nodes.iter().any(|n| {
            n["Node Type"] == "ModifyTable"
                && n["Relation Name"] == "deliveries"
                && n["Actual Rows"] == 1000
        }) || nodes[1]["Actual Rows"] == 1000;
        assert!(whole, "a whole batch: {plan:#}");
        assert!(
            !scans.contains(&"Seq Scan") && filtered == 0,
            "a batch read {filtered} rows it did not delete ({scans:?}): {plan:#}"
        );
    }
    // And a pass deletes every delivered delivery due to go, and nothing else.
    assert_eq!(retention.prune().await.unwrap().deliveries, 1500);
    let left: Vec<(String, i64)> = s
        .pairs("SELECT status, count(*) FROM __SCHEMA__.deliveries GROUP BY 1 ORDER BY 1")
        .await;
    let want = [("cancelled", 20000), ("delivered", 100), ("failed", 20000)];
    assert_eq!(left, want.map(|(t, n)| (t.to_string(), n)));
    let attempts: i64 = client
        .query_one(&schema.sql("SELECT count(*) FROM __SCHEMA__.attempts"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 40100, "the attempts went with their deliveries");
    s.drop_schema().await;
}

/// A step that fails (here the database refuses to delete deliveries) is only that step: the
/// steps after it (expired secrets here) prune all the same, and the pass counts the failure.
#[tokio::test]
async fn a_failing_pruning_step_does_not_stop_the_others() {
    let s = Scratch::new().await;
    let (pool, schema) = (s.pool.clone(), s.schema.clone());
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source)
         VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
         INSERT INTO __SCHEMA__.endpoint_secrets (endpoint_id, secret, expires_at)
         VALUES ('e', 'whsec_old', now() - interval '1 hour');
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, updated_at)
         VALUES (1, gen_random_uuid(), 't', 'e', 'delivered', now() - interval '8 days');
         CREATE FUNCTION __SCHEMA__.refuse() RETURNS trigger LANGUAGE plpgsql
           AS $$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
         CREATE TRIGGER refuse BEFORE DELETE ON __SCHEMA__.deliveries
           FOR EACH ROW EXECUTE FUNCTION __SCHEMA__.refuse();",
    )
    .await;
    let retention = Retention::new(pool.clone(), &schema, 7 * DAY, 30 * DAY, 7 * DAY);
    let pruned = retention.prune().await.unwrap();
    assert_eq!(
        (pruned.deliveries, pruned.secrets, pruned.failed),
        (0, 1, 1)
    );
    let client = pool.get().await.unwrap();
    let left: (i64, i64) = client
        .query_one(
            &schema.sql(
                "SELECT (SELECT count(*) FROM __SCHEMA__.deliveries),
                        (SELECT count(*) FROM __SCHEMA__.endpoint_secrets)",
            ),
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(left, (1, 0));
    s.drop_schema().await;
}

/// Idle ordering keys' rows go an hour after their last use; a batch must read the next keys
/// from where the last one stopped, not the whole table (with a million keys used within the hour,
/// every batch scanned them all and pruning fell behind for good).
#[tokio::test]
async fn ordering_key_pruning_walks_the_keys_once_per_pass() {
    let s = Scratch::new().await;
    let (pool, schema) = (s.pool.clone(), s.schema.clone());
    // 10,000 keys used just now, and among them 12 idle for two hours: 10 without deliveries (to
    // go), 1 whose delivery still waits, 1 blocked by a failed delivery (both kept).
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source)
         VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
         INSERT INTO __SCHEMA__.ordering_keys (endpoint_id, ordering_key, updated_at)
         SELECT 'e', 'k' || lpad(g::text, 5, '0'),
                CASE WHEN g % 800 = 0 THEN now() - interval '2 hours' ELSE now() END
         FROM generate_series(1, 10000) g;
         INSERT INTO __SCHEMA__.deliveries (id, outbox_id, event_id, event_type, endpoint_id, status, ordering_key)
         VALUES ('00000000-0000-0000-0000-000000000001', 1, gen_random_uuid(), 't', 'e', 'queued', 'k00800'),
                ('00000000-0000-0000-0000-000000000002', 2, gen_random_uuid(), 't', 'e', 'failed', 'k01600');
         UPDATE __SCHEMA__.ordering_keys SET blocked_by = '00000000-0000-0000-0000-000000000002'
         WHERE ordering_key = 'k01600';
         ANALYZE __SCHEMA__.ordering_keys",
    )
    .await;
    let retention = Retention::new(pool.clone(), &schema, 7 * DAY, 30 * DAY, 7 * DAY);
    // One batch, run for its plan inside a transaction rolled back.
    let client = pool.get().await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    let plan: serde_json::Value = client
        .query_one(
            &format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", retention.prune_keys),
            &[&KEY_ROW_AGE.as_secs_f64(), &BATCH, &"", &""],
        )
        .await
        .unwrap()
        .get(0);
    client.batch_execute("ROLLBACK").await.unwrap();
    let read: i64 = plan_nodes(&plan[0]["Plan"])
        .iter()
        .filter(|n| n["Relation Name"] == "ordering_keys")
        .map(|n| {
            let rows = n["Actual Rows"].as_i64().unwrap()
                + n["Rows Removed by Filter"].as_i64().unwrap_or(0);
            rows * n["Actual Loops"].as_i64().unwrap()
        })
        .sum();
    assert!(
        read < 3000,
        "a batch read {read} key rows of 10,000: {plan:#}"
    );
    // A pass walks every key once and deletes only the idle, free ones; the next starts over.
    assert_eq!(retention.prune().await.unwrap().keys, 10);
    let left: Vec<(String, i64)> = s
        .pairs(
            "SELECT ordering_key, 0::bigint FROM __SCHEMA__.ordering_keys
             WHERE updated_at < now() - interval '1 hour' ORDER BY 1",
        )
        .await;
    assert_eq!(left, [("k00800".to_string(), 0), ("k01600".to_string(), 0)]);
    assert!(retention.keys_from.lock().unwrap().is_none());
    drop(client);
    s.drop_schema().await;
}

/// A plan's nodes, the top one first.
fn plan_nodes(node: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut nodes = vec![node];
    for child in node["Plans"].as_array().into_iter().flatten() {
        nodes.extend(plan_nodes(child));
    }
    nodes
}

/// A failed delivery that blocks its key (`on_failure = "block"`) is the key's dead letter and
/// the reason nothing of the key moves: pruning it would let the safety net lift the block and
/// send the next delivery, the failed event gone without trace. It stays however old; a failed
/// delivery blocking nothing goes as usual.
#[tokio::test]
async fn a_dead_letter_blocking_its_key_is_kept_past_its_retention() {
    let s = Scratch::new().await;
    let (pool, schema) = (s.pool.clone(), s.schema.clone());
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, ordering_key, dispatched_at)
         SELECT 't', '{}', 'k', now() - interval '40 days' FROM generate_series(1, 3);
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, ordering_key, updated_at)
         VALUES (1, gen_random_uuid(), 't', 'e', 'failed', 'k', now() - interval '40 days'),
                (2, gen_random_uuid(), 't', 'e', 'failed', 'k', now() - interval '40 days'),
                (3, gen_random_uuid(), 't', 'e', 'queued', 'k', now() - interval '40 days');
         INSERT INTO __SCHEMA__.ordering_keys (endpoint_id, ordering_key, blocked_by, blocked_at)
         SELECT 'e', 'k', id, now() - interval '40 days' FROM __SCHEMA__.deliveries WHERE outbox_id = 2",
    )
    .await;
    // The same at an endpoint since deleted: nobody can retry or cancel it there, so it goes
    // with its retention.
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source, deleted_at) VALUES ('gone', 'http://127.0.0.1:9/b', '{*}', 'api', now());
         INSERT INTO __SCHEMA__.outbox (event_type, payload, ordering_key, dispatched_at) VALUES ('t', '{}', 'k', now() - interval '40 days');
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, ordering_key, updated_at)
         VALUES (4, gen_random_uuid(), 't', 'gone', 'failed', 'k', now() - interval '40 days');
         INSERT INTO __SCHEMA__.ordering_keys (endpoint_id, ordering_key, blocked_by, blocked_at)
         SELECT 'gone', 'k', id, now() - interval '40 days' FROM __SCHEMA__.deliveries WHERE outbox_id = 4",
    )
    .await;
    let retention = Retention::new(pool.clone(), &schema, 7 * DAY, 30 * DAY, 7 * DAY);
    let pruned = retention.prune().await.unwrap();
    assert_eq!(pruned.deliveries, 2);
    let left: Vec<(i64, String)> = s
        .pairs("SELECT outbox_id, status::text FROM __SCHEMA__.deliveries ORDER BY outbox_id")
        .await;
    assert_eq!(left, [(2, "failed".to_string()), (3, "queued".to_string())]);
    s.drop_schema().await;
}

/// Kept dead letters (blocking their keys) are the oldest of their index, more than a batch of
/// them here: the walk passes them (once per walk, where a batch that began at the oldest every
/// time read them all again), prunes every other dead letter due, and ends past them.
#[tokio::test]
async fn a_thousand_kept_dead_letters_do_not_stop_the_pruning_of_the_others() {
    let s = Scratch::new().await;
    let (pool, schema) = (s.pool.clone(), s.schema.clone());
    s.run(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES ('e', 'http://127.0.0.1:9/a', '{*}', 'api');
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, ordering_key, updated_at)
         SELECT g, gen_random_uuid(), 't', 'e', 'failed', 'k' || g, now() - interval '50 days' + g * interval '1 second'
         FROM generate_series(1, 1200) g;
         INSERT INTO __SCHEMA__.ordering_keys (endpoint_id, ordering_key, blocked_by, blocked_at)
         SELECT 'e', ordering_key, id, now() FROM __SCHEMA__.deliveries;
         INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status, updated_at)
         SELECT g, gen_random_uuid(), 't', 'e', 'failed', now() - interval '40 days' + g * interval '1 second'
         FROM generate_series(1, 300) g",
    )
    .await;
    let retention = Retention::new(pool.clone(), &schema, 7 * DAY, 30 * DAY, 7 * DAY);
    assert_eq!(retention.prune().await.unwrap().deliveries, 300);
    assert!(
        retention.failed_from.lock().unwrap().is_none(),
        "the walk ended, and starts from the oldest next time"
    );
    let left: Vec<(String, i64)> = s
        .pairs("SELECT status::text, count(*) FROM __SCHEMA__.deliveries GROUP BY 1")
        .await;
    assert_eq!(left, [("failed".to_string(), 1200)]);
    s.drop_schema().await;
}
