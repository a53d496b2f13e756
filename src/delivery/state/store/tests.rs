//! Against the Postgres at `DATABASE_URL`, each test in a schema of its own.

use super::*;
use crate::config::{BreakerConfig, OnFailure};
use crate::db;
use crate::db::scratch::Scratch;

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
    let store = DeliveryStore::new(
        pool.clone(),
        &schema,
        OnFailure::Skip,
        flow::FlowDefaults::new(None, &BreakerConfig::default(), 16),
    );
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
    let store = DeliveryStore::new(
        pool.clone(),
        &schema,
        OnFailure::Skip,
        flow::FlowDefaults::new(None, &BreakerConfig::default(), 16),
    );
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
