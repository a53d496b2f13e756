//! Isolation: one endpoint that hangs, fails or holds a backlog, or one event with an impossible
//! timestamp, never delays anyone else's deliveries. The real binary, a real Postgres, real
//! receivers on 127.0.0.1.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_does_not_delay_another() {
    let db = TestDb::create().await;
    let hanging = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(30))).await;
    let healthy = Receiver::ok().await;
    let config = base_config(&db)
        + &endpoint("hanging", &hanging.url, &["*"], "")
        + &endpoint("healthy", &healthy.url, &["*"], "");
    let _postern = Postern::start(&config).await;
    let mut client = db.client().await;
    publish_batch(&mut client, "order.created", 40, 0).await;
    let committed = Instant::now();
    healthy.wait_count(40, Duration::from_secs(10)).await;
    let last = healthy.requests().iter().map(|r| r.at).max().unwrap();
    assert!(
        last - committed < Duration::from_millis(1500),
        "healthy endpoint took {:?} while the other hung",
        last - committed
    );
    // The hanging endpoint's attempts time out and are recorded as such.
    wait_sql(
        &client,
        "SELECT count(DISTINCT a.delivery_id) FROM postern.attempts a JOIN postern.deliveries d ON d.id = a.delivery_id
         WHERE d.endpoint_id = 'hanging' AND a.error LIKE 'timed out%'",
        40,
        Duration::from_secs(20),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_goes_on_when_every_hold_waits_on_a_hanging_endpoint() {
    let db = TestDb::create().await;
    let hanging = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(30))).await;
    // One request slot: the replica holds at most 4 deliveries, all stuck behind the hang.
    let config = base_config(&db).replace(
        "[outbound]\n",
        "[outbound]\nconcurrency = 1\nper_endpoint_concurrency = 1\n",
    ) + &endpoint("hanging", &hanging.url, &["*"], "");
    let _postern = Postern::start(&config).await;
    let mut client = db.client().await;
    publish_batch(&mut client, "order.created", 20, 0).await;
    // Fan-out never waits on delivery: what the replica cannot hold is recorded as pending at
    // once. Pacing fan-out by room would take about 5 s here (room frees only as held
    // deliveries are handed back).
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries",
        20,
        Duration::from_millis(3000),
    )
    .await;
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.outbox WHERE dispatched_at IS NULL"
        )
        .await,
        0
    );
    assert!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.deliveries WHERE status = 'delivering'"
        )
        .await
            <= 4,
        "a replica never holds more than 4 x concurrency deliveries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoints_backlog_does_not_slow_a_healthy_one() {
    let db = TestDb::create().await;
    let dead_url = format!("http://127.0.0.1:{}/hook", dead_port().await);
    let healthy = Receiver::ok().await;
    let config = base_config(&db)
        + &endpoint(
            "dead",
            &dead_url,
            &["dead.*"],
            "retry = { schedule = [\"50ms\", \"50ms\", \"50ms\", \"50ms\"], jitter = 0.0 }",
        )
        + &endpoint("healthy", &healthy.url, &["live.*"], "");
    // The backlog exists before Postern starts.
    let mut client = {
        let p = Postern::start(&config).await;
        drop(p);
        db.client().await
    };
    publish_batch(&mut client, "dead.thing", 3000, 0).await;
    let _postern = Postern::start(&config).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.outbox WHERE dispatched_at IS NULL",
        0,
        Duration::from_secs(20),
    )
    .await;
    let started = Instant::now();
    publish_batch(&mut client, "live.thing", 300, 0).await;
    healthy.wait_count(300, Duration::from_secs(20)).await;
    let took = healthy.requests().iter().map(|r| r.at).max().unwrap() - started;
    let dead_pending = scalar(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'dead' AND status IN ('pending', 'delivering')",
    )
    .await;
    assert!(
        dead_pending > 0,
        "the dead backlog should still be there while the healthy one drains"
    );
    assert!(
        took < Duration::from_secs(5),
        "healthy endpoint needed {took:?} beside a dead backlog"
    );
}

/// An app may write any `created_at` the column takes: infinite, or past what a timestamp in the
/// delivery can hold. Such an event is delivered (stamped with the time it was taken) and never
/// stops the events after it, on the fast path or through a claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_created_at_neither_stalls_the_fan_out_nor_is_lost() {
    for via_claims in [false, true] {
        let db = TestDb::create().await;
        let receiver = Receiver::ok().await;
        // A default rate limit takes every delivery off the fast path, through a claim.
        let limit = if via_claims {
            "rate_limit = \"1000/s\"\n"
        } else {
            ""
        };
        let config = base_config(&db).replace("[outbound]\n", &format!("[outbound]\n{limit}"))
            + &endpoint("e", &receiver.url, &["*"], "");
        let postern = Postern::start(&config).await;
        let client = db.client().await;
        for at in [
            "infinity",
            "-infinity",
            "294270-01-01 00:00:00+00",
            "4713-01-01 00:00:00+00 BC",
        ] {
            client
                .execute(
                    "INSERT INTO postern.outbox (event_type, payload, created_at)
                     VALUES ('odd.time', '{}', $1::text::timestamptz)",
                    &[&at],
                )
                .await
                .unwrap();
        }
        publish_one(&client, "plain.event", json!({"n": 1})).await;
        receiver.wait_count(5, Duration::from_secs(15)).await;
        for r in receiver.requests() {
            let at = r.json()["timestamp"].as_str().unwrap().to_string();
            chrono::DateTime::parse_from_rfc3339(&at).unwrap();
        }
        // A request starts beside its pass's commit: the marks land a moment after it.
        let undispatched = "SELECT count(*) FROM postern.outbox WHERE dispatched_at IS NULL";
        wait_sql(&client, undispatched, 0, Duration::from_secs(10)).await;
        drop(postern);
    }
}

/// An endpoint that answers 200, only slowly, keeps every delivery it is given waiting for its
/// request slots: it must not take every hold the replica has, or another endpoint's fresh
/// delivery waits for the slow one's queue (seconds per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_holding_every_hold_does_not_delay_another() {
    let db = TestDb::create().await;
    let slow = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(3))).await;
    let healthy = Receiver::ok().await;
    // 4 requests: 16 holds per replica, and one request per endpoint: 16 holds per endpoint, so
    // the slow endpoint alone can fill the replica.
    let config = base_config(&db)
        .replace(
            "[outbound]\n",
            "[outbound]\nconcurrency = 4\nper_endpoint_concurrency = 1\n",
        )
        .replace(
            "request_timeout = \"2s\"\nlease = \"4s\"",
            "request_timeout = \"6s\"\nlease = \"15s\"",
        )
        + &endpoint("slow", &slow.url, &["slow.*"], "")
        + &endpoint("healthy", &healthy.url, &["live.*"], "");
    let _postern = Postern::start(&config).await;
    let mut client = db.client().await;
    publish_batch(&mut client, "slow.event", 20, 0).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'slow' AND status = 'delivering'",
        16,
        Duration::from_secs(5),
    )
    .await;
    publish_one(&client, "live.event", json!({})).await;
    let committed = Instant::now();
    healthy.wait_count(1, Duration::from_secs(10)).await;
    let took = healthy.requests()[0].at - committed;
    assert!(
        took < Duration::from_millis(1500),
        "the healthy endpoint waited {took:?} behind the slow one's holds"
    );
    // And through a claim: a due delivery waiting in the table is claimed at once too.
    client
        .batch_execute(
            "INSERT INTO postern.deliveries (outbox_id, event_id, event_type, endpoint_id, status, next_attempt_at)
             SELECT id, event_id, event_type, 'healthy', 'pending', now() FROM postern.outbox
             WHERE event_type = 'live.event'",
        )
        .await
        .unwrap();
    let inserted = Instant::now();
    healthy.wait_count(2, Duration::from_secs(10)).await;
    let took = healthy.requests()[1].at - inserted;
    assert!(
        took < Duration::from_millis(1500),
        "a claim for the healthy endpoint waited {took:?} behind the slow one's holds"
    );
}

/// The same with large payloads: a slow endpoint's held deliveries take the memory budget's room
/// (not every hold) and must still leave another endpoint to be sent to at once, by the fast
/// path and by claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_holding_the_memory_budget_does_not_delay_another() {
    let db = TestDb::create().await;
    let slow = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(3))).await;
    let healthy = Receiver::ok().await;
    // Held deliveries get half of 8 MiB; a 200 KiB payload is charged about 401 KiB, so ten of
    // the slow endpoint's fill it (per endpoint it may hold 16).
    let config = base_config(&db)
        .replace(
            "[outbound]\n",
            "[outbound]\nconcurrency = 4\nper_endpoint_concurrency = 1\nmax_payload = \"256KiB\"\nmemory_budget = \"8MiB\"\n",
        )
        .replace(
            "request_timeout = \"2s\"\nlease = \"4s\"",
            "request_timeout = \"6s\"\nlease = \"15s\"",
        )
        + &endpoint("slow", &slow.url, &["slow.*"], "")
        + &endpoint("healthy", &healthy.url, &["live.*"], "");
    let _postern = Postern::start(&config).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO postern.outbox (event_type, payload)
             SELECT 'slow.event', jsonb_build_object('pad', repeat('x', 200 * 1024)) FROM generate_series(1, 14)",
        )
        .await
        .unwrap();
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'slow' AND status = 'delivering'",
        10,
        Duration::from_secs(5),
    )
    .await;
    publish_one(&client, "live.event", json!({})).await;
    let committed = Instant::now();
    healthy.wait_count(1, Duration::from_secs(10)).await;
    let took = healthy.requests()[0].at - committed;
    assert!(
        took < Duration::from_millis(1500),
        "the healthy endpoint waited {took:?} behind the slow one's payloads"
    );
    // And through a claim.
    client
        .batch_execute(
            "INSERT INTO postern.deliveries (outbox_id, event_id, event_type, endpoint_id, status, next_attempt_at)
             SELECT id, event_id, event_type, 'healthy', 'pending', now() FROM postern.outbox
             WHERE event_type = 'live.event'",
        )
        .await
        .unwrap();
    let inserted = Instant::now();
    healthy.wait_count(2, Duration::from_secs(10)).await;
    let took = healthy.requests()[1].at - inserted;
    assert!(
        took < Duration::from_millis(1500),
        "a claim for the healthy endpoint waited {took:?} behind the slow one's payloads"
    );
}
