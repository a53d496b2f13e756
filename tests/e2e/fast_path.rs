//! The fan-out's fast path writing a delivery's outcome in its own commit: a 2xx that comes
//! while the fan-out waits is recorded exactly as the settler records one, and an endpoint whose
//! breaker is counting failures still sees the success.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::api::{start_ops, Ops};
use crate::common::*;
use crate::probes::parse_prometheus;

async fn folded(ops: &Ops) -> f64 {
    let (s, text) = ops.get_text(&format!("{}/metrics", ops.admin)).await;
    assert_eq!(s, 200);
    parse_prometheus(&text)
        .iter()
        .filter(|(n, _, _)| n == "postern_outbox_folded_total")
        .map(|s| s.2)
        .sum()
}

/// Two events committed back to back: the fan-out waits for outcomes only in a busy stream (a
/// small pass within 10 ms of the previous one), as the second one's pass is.
async fn publish_pair(client: &tokio_postgres::Client, event_type: &str, i: usize) {
    publish_one(client, event_type, json!({ "i": i })).await;
    publish_one(client, event_type, json!({ "i": i + 1 })).await;
}

/// Publishes pairs of events, each after the last was delivered, until the fan-out has written
/// one `delivered` itself (a slow moment on the machine can make any one miss the wait).
async fn publish_until_folded(ops: &Ops, receiver: &Receiver, event_type: &str) -> usize {
    let client = ops.db.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut published = 0;
    loop {
        publish_pair(&client, event_type, published).await;
        published += 2;
        receiver
            .wait_count(published, Duration::from_secs(10))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if folded(ops).await > 0.0 {
            return published;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery was written by its fan-out in {published} events"
        );
    }
}

/// Postern with one endpoint `e` (`extra` appended to its table) whose receiver answers 500 to
/// events of type `bad` and 200 to the rest.
async fn failing_bad_events(extra: &str) -> (Receiver, Ops) {
    let receiver = Receiver::start(|_, r| {
        if r.json()["type"] == "bad" {
            Reply::status(500)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let ops = start_ops(
        TestDb::create().await,
        None,
        &endpoint("e", &receiver.url, &["*"], extra),
    )
    .await;
    ops.wait_ready(200).await;
    (receiver, ops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_outcome_is_written_by_its_fan_out_as_the_settler_writes_it() {
    let receiver = Receiver::ok().await;
    let ops = start_ops(
        TestDb::create().await,
        None,
        &endpoint("e", &receiver.url, &["*"], ""),
    )
    .await;
    ops.wait_ready(200).await;
    let published = publish_until_folded(&ops, &receiver, "order.created").await;
    let client = ops.db.client().await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        published as i64,
        Duration::from_secs(5),
    )
    .await;
    // Every delivery, folded or settled, reads the same: delivered once, no lease, its attempt
    // recorded with what was sent and what came back.
    let odd = scalar(
        &client,
        "SELECT count(*) FROM postern.deliveries d
         LEFT JOIN postern.attempts a ON a.delivery_id = d.id
         WHERE d.attempts <> 1 OR d.lease_owner IS NOT NULL OR d.lease_expires_at IS NOT NULL
            OR d.delivered_at IS NULL OR d.last_status_code IS DISTINCT FROM 200
            OR d.last_error IS NOT NULL
            OR a.attempt IS DISTINCT FROM 1 OR a.status_code IS DISTINCT FROM 200
            OR a.request_headers NOT LIKE '%webhook-signature%' OR a.error IS NOT NULL
            OR a.started_at > d.delivered_at OR d.updated_at < a.started_at",
    )
    .await;
    assert_eq!(odd, 0, "a delivery recorded differently");
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.attempts").await,
        published as i64
    );
    assert_eq!(receiver.count(), published, "each event sent once");
}

/// A breaker counting failures counts every success too (a success resets its consecutive
/// count, and the window's attempts are the failure rate's denominator): a fan-out must not write
/// one past it. Here one event fails every attempt (three failures counted), then fresh events
/// succeed on the fast path: each is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_success_is_counted_by_a_breaker_that_counts_failures() {
    let (receiver, ops) = failing_bad_events(
        "[endpoints.breaker]\nfailures = 1000\nmin_attempts = 1000000\nwindow = \"1h\"",
    )
    .await;
    let client = ops.db.client().await;
    publish_one(&client, "bad", json!({})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.endpoint_flow WHERE consecutive_failures = 3",
        1,
        Duration::from_secs(10),
    )
    .await;
    let before = receiver.count();
    // Fresh events until the fan-out waits for one's outcome; only the breaker's count may say
    // whether it wrote it.
    let client2 = ops.db.client().await;
    for i in 0..10 {
        publish_pair(&client2, "good", 2 * i).await;
        receiver
            .wait_count(before + 2 * i + 2, Duration::from_secs(10))
            .await;
    }
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        20,
        Duration::from_secs(5),
    )
    .await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.endpoint_flow
         WHERE consecutive_failures = 0 AND window_failures = 3 AND window_attempts = 23",
        1,
        Duration::from_secs(5),
    )
    .await;
}

/// A failure the settler has not written yet came first: a later success of the same endpoint
/// must not be written ahead of it by its fan-out, or the breaker would end counting the failure
/// as the last word. Here the settler is held on the endpoint's breaker row (locked by the test)
/// while it writes a failure, and successes follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_success_never_goes_ahead_of_a_failure_not_yet_written() {
    let (receiver, ops) = failing_bad_events(
        "retry = { schedule = [\"1h\"] }\n[endpoints.breaker]\nfailures = 1000\nmin_attempts = 1000000",
    )
    .await;
    let client = ops.db.client().await;
    let mut holder = ops.db.client().await;
    let held = holder.transaction().await.unwrap();
    held.batch_execute("SELECT 1 FROM postern.endpoint_flow WHERE endpoint_id = 'e' FOR UPDATE")
        .await
        .unwrap();
    publish_one(&client, "bad", json!({})).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    let before = folded(&ops).await;
    for i in 0..5 {
        publish_pair(&client, "good", 2 * i).await;
        receiver
            .wait_count(1 + 2 * i + 2, Duration::from_secs(10))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        folded(&ops).await,
        before,
        "a success was written by its fan-out ahead of the failure"
    );
    held.rollback().await.unwrap();
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        10,
        Duration::from_secs(10),
    )
    .await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.endpoint_flow WHERE consecutive_failures = 0 AND window_failures = 1",
        1,
        Duration::from_secs(5),
    )
    .await;
}
