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

/// Publishes events one at a time, each after the last was delivered, until the fan-out has
/// written one `delivered` itself (a slow moment on the machine can make any one miss the wait).
async fn publish_until_folded(ops: &Ops, receiver: &Receiver, event_type: &str) -> usize {
    let client = ops.db.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut published = 0;
    loop {
        publish_one(&client, event_type, json!({ "i": published })).await;
        published += 1;
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

/// A breaker counting failures is reset by a success: a fan-out must not write that success
/// past it. Here one event fails every attempt (three consecutive failures counted), then fresh
/// events succeed on the fast path: the count goes back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_success_resets_a_breaker_that_counts_failures() {
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
        &endpoint(
            "e",
            &receiver.url,
            &["*"],
            "[endpoints.breaker]\nfailures = 1000\nmin_attempts = 1000000",
        ),
    )
    .await;
    ops.wait_ready(200).await;
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
    for i in 0..20 {
        publish_one(&client2, "good", json!({ "i": i })).await;
        receiver
            .wait_count(before + i + 1, Duration::from_secs(10))
            .await;
    }
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        20,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.endpoint_flow WHERE consecutive_failures = 0"
        )
        .await,
        1,
        "the successes did not reset the breaker's count"
    );
}
