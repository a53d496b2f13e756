//! Deliveries that come back due by another way than a claim: an operator's retry or replay, a
//! tenant change's cancels, and an outcome written after its lease lapsed. Against the Postgres at
//! `DATABASE_URL`, each test in a schema of its own.

use super::*;

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

/// An operator's retry racing a tenant change: the retry waits for the change and then sees the
/// new tenant, so it cannot move a delivery the change's cancel has already looked past.
#[tokio::test]
async fn a_retry_racing_a_tenant_change_sees_the_new_tenant() {
    let (s, schema, pool) = scratch().await;
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
    let (s, schema, pool) = scratch().await;
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
    let (s, schema, pool) = scratch().await;
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
    let (s, schema, pool) = scratch().await;
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
    let (s, schema, pool) = scratch().await;
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
    // Due again only after the grace, in which the replica that made the attempt writes it.
    let not_due = s
        .pairs::<i64, bool>(&format!(
            "SELECT outbox_id, next_attempt_at = updated_at + interval '{} milliseconds'
             FROM __SCHEMA__.deliveries ORDER BY outbox_id",
            crate::delivery::state::LAPSE_GRACE.as_millis()
        ))
        .await;
    assert_eq!(not_due, [(1, true), (2, true)]);
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
    let (s, schema, pool) = scratch().await;
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

/// An operator's "retry now" of a delivery the reaper made due again is the operator's call: the
/// lapsed attempt's outcome, coming in afterwards (its replica was cut off), must not undo it by
/// marking the delivery delivered under the retry (`ack_late` needs a lapse the retry forgot).
#[tokio::test]
async fn a_late_outcome_does_not_undo_an_operators_retry_of_the_reaped_delivery() {
    let (s, schema, pool) = scratch().await;
    let owner = Uuid::now_v7();
    s.run(&format!(
        "INSERT INTO __SCHEMA__.endpoints (id, url, events, source) VALUES ('e', 'http://127.0.0.1:9/a', '{{*}}', 'api');
         INSERT INTO __SCHEMA__.outbox (event_type, payload, dispatched_at) VALUES ('t', '{{}}', now());
         INSERT INTO __SCHEMA__.deliveries
            (outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner, lease_expires_at)
         VALUES (1, gen_random_uuid(), 't', 'e', 'delivering', 1, '{owner}', now() - interval '1 second')"
    ))
    .await;
    let store = store_in(&pool, &schema, OnFailure::Skip);
    assert_eq!(store.reap(500, 3).await.unwrap(), 1);
    let id: Uuid = s
        .pairs::<Uuid, i64>("SELECT id, outbox_id FROM __SCHEMA__.deliveries")
        .await[0]
        .0;
    let mut client = pool.get().await.unwrap();
    let ordering = ordering::Ordering::new(&schema, OnFailure::Skip);
    let moved = crate::delivery::state::retry_now(
        &mut client,
        &schema,
        &ordering,
        id,
        DeliveryStatus::Pending,
    )
    .await
    .unwrap();
    assert!(moved);
    store
        .settle(owner, &[ack(id, None, Settle::Delivered, 200)])
        .await
        .unwrap();
    let seen = s
        .pairs::<String, bool>(
            "SELECT status::text, next_attempt_at <= now() FROM __SCHEMA__.deliveries",
        )
        .await;
    assert_eq!(seen, [("pending".to_string(), true)], "the retry stands");
    let attempts = s
        .pairs::<i32, Option<i32>>("SELECT attempt, status_code FROM __SCHEMA__.attempts")
        .await;
    assert_eq!(attempts, [(1, None)], "the attempt stays 'unknown'");
    s.drop_schema().await;
}
