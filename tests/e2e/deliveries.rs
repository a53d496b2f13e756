//! The API over deliveries and events: stats, retry and replay, stable cursor pages, the
//! dashboard's reads.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::start_ops;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_pagination_is_stable_under_concurrent_inserts() {
    let receiver = Receiver::ok().await;
    let ops = Arc::new(start_ops(TestDb::create().await, None, "").await);
    let mut original = Vec::new();
    for i in 0..7 {
        original.push(
            ops.create(&receiver.url, json!({"description": format!("e{i}")}))
                .await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let writer = {
        let (ops, url) = (ops.clone(), receiver.url.clone());
        tokio::spawn(async move {
            for _ in 0..10 {
                ops.create(&url, json!({})).await;
            }
        })
    };
    let seen = ops
        .walk_pages("/endpoints?limit=3", "endpoints", "id")
        .await;
    writer.await.unwrap();
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a page repeated an endpoint");
    assert_eq!(
        &seen[..7],
        &original[..],
        "the first endpoints keep their order"
    );
    let (s, v) = ops.call("GET", "/endpoints?cursor=garbage", None).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_retry_and_replay_follow_a_scripted_scenario_exactly() {
    let healed = Arc::new(AtomicBool::new(false));
    let flag = healed.clone();
    let receiver = Receiver::start(move |_, r| {
        let ok = r.json()["data"]["ok"] == json!(true) || flag.load(Ordering::SeqCst);
        Reply::status(if ok { 200 } else { 500 })
    })
    .await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops
        .create(
            &receiver.url,
            json!({"retry": {"schedule": [], "jitter": 0.0}}),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    for ok in [true, true, true, false] {
        let (s, _) = ops
            .call(
                "POST",
                "/events",
                Some(json!({"type": "order.created", "data": {"ok": ok}})),
            )
            .await;
        assert_eq!(s, 202);
    }
    let client = ops.db.client().await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status IN ('delivered', 'failed')",
        4,
        Duration::from_secs(10),
    )
    .await;
    let (s, stats) = ops
        .call("GET", &format!("/endpoints/{id}/stats"), None)
        .await;
    assert_eq!(s, 200, "{stats}");
    assert_eq!(
        (
            &stats["total"],
            &stats["delivered"],
            &stats["failed"],
            &stats["pending"]
        ),
        (&json!(4), &json!(3), &json!(1), &json!(0))
    );
    assert_eq!(stats["success_rate"], json!(75.0));
    let mut durations: Vec<i32> = client
        .query(
            "SELECT duration_ms FROM postern.attempts ORDER BY duration_ms",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    durations.sort();
    let mean = durations.iter().map(|&d| f64::from(d)).sum::<f64>() / 4.0;
    assert_eq!(stats["latency_ms"]["mean"], json!(mean));
    assert_eq!(
        stats["latency_ms"]["p50"],
        json!(f64::from(durations[1])),
        "nearest rank of 4: the 2nd"
    );
    assert_eq!(stats["latency_ms"]["p95"], json!(f64::from(durations[3])));

    // The failed one: its record, then retry and replay.
    let (_, list) = ops
        .call(
            "GET",
            &format!("/endpoints/{id}/deliveries?status=failed"),
            None,
        )
        .await;
    let failed_id = list["deliveries"][0]["id"].as_str().unwrap().to_string();
    let (s, one) = ops
        .call("GET", &format!("/deliveries/{failed_id}"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(one["attempts"], 1);
    assert_eq!(one["attempt_log"][0]["status_code"], 500);
    let (_, delivered) = ops
        .call(
            "GET",
            &format!("/endpoints/{id}/deliveries?status=delivered&limit=1"),
            None,
        )
        .await;
    let delivered_id = delivered["deliveries"][0]["id"].as_str().unwrap();
    let (s, v) = ops
        .call("POST", &format!("/deliveries/{delivered_id}/retry"), None)
        .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("already_delivered")));
    // Replay outside the window requeues nothing; inside, exactly the failed one.
    let (s, v) = ops
        .call(
            "POST",
            &format!("/endpoints/{id}/replay"),
            Some(json!({"since": "2001-01-01T00:00:00Z", "until": "2001-01-02T00:00:00Z"})),
        )
        .await;
    assert_eq!((s, &v["requeued"]), (202, &json!(0)));
    healed.store(true, Ordering::SeqCst);
    let (s, v) = ops
        .call(
            "POST",
            &format!("/endpoints/{id}/replay"),
            Some(json!({"since": before})),
        )
        .await;
    assert_eq!((s, &v["requeued"]), (202, &json!(1)), "{v}");
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        4,
        Duration::from_secs(10),
    )
    .await;
    let (_, one) = ops
        .call("GET", &format!("/deliveries/{failed_id}"), None)
        .await;
    assert_eq!(
        (one["status"].as_str(), one["attempts"].as_i64()),
        (Some("delivered"), Some(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_pages_stay_stable_while_new_deliveries_arrive() {
    let receiver = Receiver::ok().await;
    let ops = Arc::new(start_ops(TestDb::create().await, None, "").await);
    // Paused, so the deliveries stay put while we page through them.
    let created = ops.create(&receiver.url, json!({"active": false})).await;
    let id = created["id"].as_str().unwrap().to_string();
    let client = ops.db.client().await;
    let mut first = Vec::new();
    for i in 0..7 {
        first.push(publish_one(&client, "order.created", json!({ "i": i })).await);
        // Distinct creation times, so "newest first" has one answer.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries",
        7,
        Duration::from_secs(10),
    )
    .await;
    let writer = {
        let url = ops.db.url.clone();
        tokio::spawn(async move {
            let client = connect(&url).await;
            for i in 0..10 {
                publish_one(&client, "order.created", json!({ "late": i })).await;
            }
        })
    };
    let seen = ops
        .walk_pages(
            &format!("/endpoints/{id}/deliveries?limit=2"),
            "deliveries",
            "event_id",
        )
        .await;
    writer.await.unwrap();
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a page repeated a delivery");
    // Newest first as the database orders them: deliveries fanned out in one transaction share
    // a creation time, and the id breaks the tie.
    let expected: Vec<String> = client
        .query(
            "SELECT event_id::text FROM postern.deliveries WHERE event_id = ANY($1) ORDER BY created_at DESC, id DESC",
            &[&first],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(expected.len(), 7);
    let tail: Vec<String> = seen
        .iter()
        .filter(|e| expected.contains(e))
        .cloned()
        .collect();
    assert_eq!(
        tail, expected,
        "the first deliveries appear once each, newest first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboards_reads_count_outcomes_find_events_and_refuse_bad_windows() {
    let ops = start_ops(TestDb::create().await, None, "").await;
    let good = Receiver::ok().await;
    let bad = Receiver::start(|_, _| Reply::status(500)).await;
    let ok_ep = ops
        .create(
            &good.url,
            json!({"events": ["order.*"], "headers": {"x-api-key": "k-123-secret"}}),
        )
        .await;
    let bad_ep = ops.create(&bad.url, json!({"events": ["order.*"]})).await;
    let c = ops.db.client().await;
    let event: uuid::Uuid = c
        .query_one(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ('order.created', '{}') RETURNING event_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The test config allows three attempts: the failing endpoint's delivery dies after them.
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.deliveries WHERE status IN ('delivered', 'failed')",
        2,
        Duration::from_secs(20),
    )
    .await;
    let sum = |v: &Value, key: &str| -> i64 {
        v["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b[key].as_i64().unwrap())
            .sum()
    };
    let (s, all) = ops.call("GET", "/stats/timeseries?bucket=60", None).await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(
        (
            sum(&all, "delivered"),
            sum(&all, "retried"),
            sum(&all, "failed")
        ),
        (1, 2, 1),
        "{all}"
    );
    assert_eq!(all["buckets"].as_array().unwrap().len(), 24 * 60 + 1);
    let path = format!(
        "/stats/timeseries?bucket=3600&endpoint_id={}",
        bad_ep["id"].as_str().unwrap()
    );
    let (_, one) = ops.call("GET", &path, None).await;
    assert_eq!(
        (
            sum(&one, "delivered"),
            sum(&one, "retried"),
            sum(&one, "failed")
        ),
        (0, 2, 1),
        "{one}"
    );
    for bad_query in [
        "/stats/timeseries?bucket=10",
        "/stats/timeseries?since=2020-01-01T00:00:00Z",
        "/stats/timeseries?bucket=60&since=2026-01-01T00:00:00Z",
    ] {
        let (s, v) = ops.call("GET", bad_query, None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (400, Some("bad_request")),
            "{bad_query}: {v}"
        );
    }

    let (s, found) = ops.call("GET", &format!("/events/{event}"), None).await;
    assert_eq!(s, 200, "{found}");
    assert_eq!(found["type"], "order.created");
    let endpoints: HashSet<&str> = found["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["endpoint_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        endpoints,
        HashSet::from([
            ok_ep["id"].as_str().unwrap(),
            bad_ep["id"].as_str().unwrap()
        ])
    );
    // Each attempt keeps what its request carried; a custom header's value is not among it.
    let ok_delivery = found["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["endpoint_id"] == ok_ep["id"])
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, d) = ops
        .call("GET", &format!("/deliveries/{ok_delivery}"), None)
        .await;
    let sent: Vec<(String, String)> = d["attempt_log"][0]["request_headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let value = |n: &str| sent.iter().find(|h| h.0 == n).map(|h| h.1.clone());
    assert_eq!(value("webhook-id"), Some(event.to_string()), "{sent:?}");
    assert_eq!(
        value("webhook-signature"),
        good.requests()[0]
            .header("webhook-signature")
            .map(str::to_string)
    );
    assert_eq!(
        value("x-api-key").as_deref(),
        Some("<redacted>"),
        "{sent:?}"
    );
    assert!(!d.to_string().contains("k-123-secret"));
    assert_eq!(ops.call("GET", "/events/not-an-id", None).await.0, 404);
    assert_eq!(
        ops.call("GET", &format!("/events/{}", uuid::Uuid::new_v4()), None)
            .await
            .0,
        404
    );
    let (_, types) = ops.call("GET", "/event-types", None).await;
    assert_eq!(types["event_types"], json!(["order.created"]));
    let (s, inbound) = ops.call("GET", "/inbound/stats", None).await;
    assert_eq!(
        (s, inbound["window_hours"].as_i64()),
        (200, Some(24)),
        "{inbound}"
    );
}

/// An event whose `created_at` the app set beyond what a timestamp can spell is shown, not a
/// failure: with the time it is read, as its deliveries carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_with_an_impossible_created_at_is_shown() {
    let ops = start_ops(TestDb::create().await, None, "").await;
    let c = ops.db.client().await;
    let row = c
        .query_one(
            "INSERT INTO postern.outbox (event_type, payload, created_at)
             VALUES ('odd.time', '{}', 'infinity') RETURNING event_id",
            &[],
        )
        .await
        .unwrap();
    let event: uuid::Uuid = row.get(0);
    let (s, found) = ops.call("GET", &format!("/events/{event}"), None).await;
    assert_eq!(s, 200, "{found}");
    let at = found["created_at"].as_str().unwrap_or_default();
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{found}");
}

/// An endpoint moved to another tenant never gets the old tenant's events again: not by retrying
/// one (409 `not_for_tenant`), not by replaying a window (skipped), and its own tenant's still
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retenanted_endpoint_gets_no_retry_or_replay_of_the_old_tenants_events() {
    let receiver = Receiver::start(|_, _| Reply::status(500)).await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops
        .create(
            &receiver.url,
            json!({"tenant": "acme", "retry": {"schedule": [], "jitter": 0.0}}),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let client = ops.db.client().await;
    for tenant in ["acme", "globex"] {
        client
            .execute(
                "INSERT INTO postern.outbox (event_type, payload, tenant) VALUES ('order.created', '{}', $1)",
                &[&tenant],
            )
            .await
            .unwrap();
    }
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'failed'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let acme: uuid::Uuid = client
        .query_one("SELECT id FROM postern.deliveries", &[])
        .await
        .unwrap()
        .get(0);
    let (s, v) = ops
        .call(
            "PATCH",
            &format!("/endpoints/{id}"),
            Some(json!({"tenant": "globex"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let sent = receiver.count();
    let (s, v) = ops
        .call("POST", &format!("/deliveries/{acme}/retry"), None)
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("not_for_tenant")),
        "{v}"
    );
    let (s, v) = ops
        .call(
            "POST",
            &format!("/endpoints/{id}/replay"),
            Some(json!({"since": before})),
        )
        .await;
    assert_eq!((s, &v["requeued"]), (202, &json!(0)), "{v}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.count(),
        sent,
        "acme's event went out after the move"
    );
    let status: String = client
        .query_one(
            "SELECT status::text FROM postern.deliveries WHERE id = $1",
            &[&acme],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "failed");
    // globex's own events still replay.
    client
        .execute(
            "INSERT INTO postern.outbox (event_type, payload, tenant) VALUES ('order.created', '{}', 'globex')",
            &[],
        )
        .await
        .unwrap();
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'failed'",
        2,
        Duration::from_secs(10),
    )
    .await;
    let (s, v) = ops
        .call(
            "POST",
            &format!("/endpoints/{id}/replay"),
            Some(json!({"since": before})),
        )
        .await;
    assert_eq!((s, &v["requeued"]), (202, &json!(1)), "{v}");
}

/// A keyed delivery in flight when its endpoint moves to another tenant is left to finish (its
/// key's next must not start beside it); if that attempt fails, the delivery is cancelled, not
/// retried to the endpoint's new tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_attempt_in_flight_at_a_tenant_change_is_not_retried_to_the_new_tenant() {
    let receiver =
        Receiver::start(|_, _| Reply::status(500).after(Duration::from_millis(1500))).await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops
        .create(
            &receiver.url,
            json!({"tenant": "acme", "retry": {"schedule": ["100ms", "100ms"], "jitter": 0.0}}),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let client = ops.db.client().await;
    client
        .execute(
            "INSERT INTO postern.outbox (event_type, payload, tenant, ordering_key) VALUES ('order.created', '{}', 'acme', 'k')",
            &[],
        )
        .await
        .unwrap();
    receiver.wait_count(1, Duration::from_secs(10)).await;
    let (s, v) = ops
        .call(
            "PATCH",
            &format!("/endpoints/{id}"),
            Some(json!({"tenant": "globex"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'cancelled'",
        1,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(receiver.count(), 1, "the old tenant's event went out again");
}
