//! Events the app may write that a strict JSON reader refuses (numbers beyond a double, nesting
//! past a parser's depth limit): Postgres's `jsonb` holds them, so Postern must carry them without
//! reading them, and one such event must never hold back anyone else's.

use std::time::Duration;

use crate::api::{start_ops, TOKEN};
use crate::common::*;

/// JSON nested `depth` arrays deep around `inner`.
fn nested(depth: usize, inner: &str) -> String {
    format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_json_reader_refuses_are_delivered_and_hold_back_no_one() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    // `e` takes the fast path; `limited` is rate-limited, so its deliveries go through claims.
    let endpoints = endpoint("e", &receiver.url, &["*"], "")
        + &endpoint("limited", &receiver.url, &["*"], "rate_limit = \"50/s\"");
    let ops = start_ops(db, None, &endpoints).await;
    let client = ops.db.client().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let deep = nested(300, "1");
    let rows = [
        ("{\"n\": 1}".to_string(), "{\"x\": 1e400}".to_string()),
        ("{\"n\": 2}".to_string(), format!("{{\"d\": {deep}}}")),
        (
            "{\"n\": 3}".to_string(),
            format!("{{\"traceparent\": \"{traceparent}\", \"x\": -1e400}}"),
        ),
        ("{\"x\": 1e400}".to_string(), "{}".to_string()),
        (format!("{{\"d\": {deep}}}"), "{}".to_string()),
    ];
    let mut ids = Vec::new();
    for (payload, metadata) in &rows {
        let id: uuid::Uuid = client
            .query_one(
                "INSERT INTO postern.outbox (event_type, payload, metadata)
                 VALUES ('odd.json', $1::text::jsonb, $2::text::jsonb) RETURNING event_id",
                &[payload, metadata],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id.to_string());
    }
    let plain = publish_one(&client, "plain", serde_json::json!({"ok": true})).await;
    // Every event reaches both endpoints, the plain one included.
    receiver
        .wait_count(2 * (rows.len() + 1), Duration::from_secs(15))
        .await;
    let seen = receiver.by_event();
    for id in ids.iter().chain([&plain.to_string()]) {
        assert_eq!(seen.get(id), Some(&2), "event {id}: {seen:?}");
    }
    // The trace context beside an unreadable number still travels, on both paths.
    let traced: Vec<_> = receiver
        .requests()
        .into_iter()
        .filter(|r| r.event_id() == ids[2])
        .collect();
    assert_eq!(traced.len(), 2);
    for r in &traced {
        assert_eq!(r.header("traceparent"), Some(traceparent));
    }
    // The payload goes out as Postgres keeps it, unread.
    let big = receiver
        .requests()
        .into_iter()
        .find(|r| r.event_id() == ids[3])
        .unwrap();
    let body = String::from_utf8(big.body.to_vec()).unwrap();
    assert!(
        body.contains(&format!("{{\"x\": 1{}}}", "0".repeat(400))),
        "{body}"
    );

    // The API shows such an event whole, as JSON.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for id in &ids[3..] {
        let resp = http
            .get(format!("{}/events/{id}", ops.api))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "event {id}");
        let text = resp.text().await.unwrap();
        assert!(
            text.starts_with('{') && text.contains("\"payload\":{"),
            "{text}"
        );
        assert!(
            text.contains(&"0".repeat(400)) || text.contains(&deep),
            "{text}"
        );
    }
}
