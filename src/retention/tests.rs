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
    let left: Vec<(String, i64)> = client
        .query(
            &schema.sql("SELECT event_type, count(*) FROM __SCHEMA__.outbox GROUP BY 1 ORDER BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want = [("kept", 2500), ("waiting", 2), ("young", 3)];
    assert_eq!(left, want.map(|(t, n)| (t.to_string(), n)));
    // The walk ended, so the next pass starts again from the oldest, and finds nothing to do.
    assert!(retention.events_from.lock().unwrap().is_none());
    assert_eq!(retention.prune().await.unwrap().events, 0);
    s.drop_schema().await;
}
