//! Probes and metrics: readiness follows the database and shutdown, the Prometheus exposition
//! parses, and its counters say what happened.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::api::start_ops;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_and_metrics_count_deliveries() {
    let relay = TcpRelay::start(pg_target()).await;
    let db = TestDb::create().await;
    let through_relay = relay.url_for(&db.url);
    let receiver = Receiver::ok().await;
    let ops = start_ops(
        db,
        Some(&through_relay),
        &endpoint("e", &receiver.url, &["*"], ""),
    )
    .await;
    ops.wait_ready(200).await;
    assert_eq!(ops.get_text(&format!("{}/healthz", ops.admin)).await.0, 200);

    let client = ops.db.client().await;
    for i in 0..25 {
        publish_one(&client, "order.created", json!({ "i": i })).await;
    }
    receiver.wait_count(25, Duration::from_secs(10)).await;
    // The counter moves when an attempt settles, just after the receiver answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, samples) = loop {
        let (s, text) = ops.get_text(&format!("{}/metrics", ops.admin)).await;
        assert_eq!(s, 200);
        let samples = parse_prometheus(&text);
        let delivered = samples
            .iter()
            .find(|(name, labels, _)| {
                name == "postern_deliveries_total" && labels.contains("outcome=\"delivered\"")
            })
            .map(|s| s.2);
        if delivered == Some(25.0) || Instant::now() > deadline {
            assert_eq!(delivered, Some(25.0), "{text}");
            break (text, samples);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        25,
        Duration::from_secs(5),
    )
    .await;
    for family in [
        "postern_attempt_duration_seconds_bucket",
        "postern_deliveries_due",
        "postern_outbox_undispatched",
        "postern_oldest_due_seconds",
        "postern_outbox_dispatch_lag_seconds_count",
        "postern_endpoints_inactive",
        "postern_inbound_duration_seconds_count",
        "postern_db_pool_in_use",
        "postern_listener_connected",
    ] {
        assert!(
            samples.iter().any(|(n, _, _)| n == family),
            "no {family} in:\n{text}"
        );
    }
    assert!(
        text.contains("# TYPE postern_inbound_requests counter"),
        "{text}"
    );

    relay.cut();
    let body = ops.wait_ready(503).await;
    assert!(body.contains("database unreachable"), "{body}");
    assert_eq!(
        ops.get_text(&format!("{}/healthz", ops.admin)).await.0,
        200,
        "alive all the same"
    );
    relay.restore();
    ops.wait_ready(200).await;
}

/// Parses the Prometheus text format strictly enough to catch a malformed exposition:
/// (name, labels, value) per sample.
pub(crate) fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split_whitespace().nth(1).unwrap();
                assert!(
                    [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "untyped",
                        "info",
                        "unknown"
                    ]
                    .contains(&kind),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                assert!(l.ends_with('}'), "{line}");
                (n, l.trim_end_matches('}'))
            }
            None => (series, ""),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        out.push((name.to_string(), labels.to_string(), value));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_readyz_turns_503_first() {
    let receiver =
        Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(1500))).await;
    let mut ops = start_ops(
        TestDb::create().await,
        None,
        &endpoint("e", &receiver.url, &["*"], ""),
    )
    .await;
    let client = ops.db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    ops.wait_ready(200).await;
    ops.postern.signal("TERM");
    let body = ops.wait_ready(503).await;
    assert!(body.contains("shutting down"), "{body}");
    assert!(
        ops.postern.is_running(),
        "readyz must turn 503 before the process exits"
    );
    assert!(ops
        .postern
        .wait_exit(Duration::from_secs(9))
        .await
        .success());
}

/// The passes' and probes' counters say what woke the fan-out: a commit's notification starts a
/// pass (probes follow a pass that took events), and the poll timer starts one every
/// `poll_interval` (200 ms here) whether or not anything waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_fan_out_passes_by_what_started_them() {
    let receiver = Receiver::ok().await;
    let ops = start_ops(
        TestDb::create().await,
        None,
        &endpoint("e", &receiver.url, &["*"], ""),
    )
    .await;
    ops.wait_ready(200).await;
    let count = |samples: &[(String, String, f64)], name: &str, label: &str| {
        samples
            .iter()
            .filter(|(n, l, _)| n == name && l.contains(label))
            .map(|s| s.2)
            .sum::<f64>()
    };
    let read = || async {
        let (s, text) = ops.get_text(&format!("{}/metrics", ops.admin)).await;
        assert_eq!(s, 200);
        parse_prometheus(&text)
    };
    let passes = "postern_outbox_passes_total";
    let before = read().await;
    let client = ops.db.client().await;
    // A notification's pass that takes the event is followed by probes. The poll timer may take
    // an event first (its pass then finds none), so events are committed until one is seen.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut published = 0;
    loop {
        publish_one(&client, "order.created", json!({ "i": published })).await;
        published += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = read().await;
        let woken = count(&now, passes, "reason=\"notification\"")
            > count(&before, passes, "reason=\"notification\"");
        let probed = count(&now, "postern_outbox_probes_total", "answer=")
            > count(&before, "postern_outbox_probes_total", "answer=");
        if woken && probed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no notification pass or probe counted: {now:?}"
        );
    }
    receiver
        .wait_count(published, Duration::from_secs(10))
        .await;
    // With nothing committed, the poll timer still runs its passes.
    let polled = count(&read().await, passes, "reason=\"poll\"");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let later = count(&read().await, passes, "reason=\"poll\"");
    assert!(
        later >= polled + 2.0,
        "poll passes went from {polled} to {later}"
    );
}
