//! The durable inbox against a provider's retries and an attacker's requests: a retry is stored
//! once, a forged or stale request never; the real binary, real Postgres, real signed requests.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use super::inbox::{config, now, stripe_event, stripe_headers, Service, GITHUB_SECRET};
use crate::common::*;
use postern::signing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_retry_is_stored_once_and_forged_or_stale_requests_never() {
    let db = TestDb::create().await;
    let app = Receiver::ok().await;
    let app_port = app.port();
    let (config, _) = config(&db, &db.url, app_port, "forward", "");
    let s = Service::start(config).await;

    // Stripe retries an event with a new timestamp and signature: the event id is the key.
    let body = stripe_event("evt_retried");
    let mut answers = Vec::new();
    for delay in [0, 1, 2] {
        let (st, v) = s
            .post(
                "/wh/stripe",
                &stripe_headers(&body, now() - delay),
                body.clone(),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        answers.push(v);
    }
    assert_eq!(answers[0]["duplicate"], false);
    assert_eq!(answers[1]["duplicate"], true);
    assert_eq!(answers[2]["duplicate"], true);
    assert_eq!(answers[0]["id"], answers[2]["id"]);
    // The same delivery ten times at once (several may share a commit): stored once.
    let body = stripe_event("evt_burst");
    let burst: Vec<(u16, Value)> = futures_util::stream::iter(0..10)
        .map(|_| {
            let body = body.clone();
            let s = &s;
            async move {
                s.post("/wh/stripe", &stripe_headers(&body, now()), body.clone())
                    .await
            }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    assert!(burst.iter().all(|(st, _)| *st == 200), "{burst:?}");
    assert_eq!(
        burst
            .iter()
            .filter(|(_, v)| v["duplicate"] == false)
            .count(),
        1,
        "{burst:?}"
    );
    let ids: HashSet<i64> = burst
        .iter()
        .map(|(_, v)| v["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{burst:?}");
    // GitHub redelivers with the same X-GitHub-Delivery.
    let gh_body = br#"{"action":"opened","number":7}"#.to_vec();
    let gh_sig = format!(
        "sha256={}",
        hex::encode(signing::hmac_sha256(GITHUB_SECRET.as_bytes(), &[&gh_body]))
    );
    for _ in 0..2 {
        let headers = vec![
            ("x-hub-signature-256".to_string(), gh_sig.clone()),
            (
                "x-github-delivery".to_string(),
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_string(),
            ),
        ];
        let (st, v) = s.post("/wh/github", &headers, gh_body.clone()).await;
        assert_eq!(st, 200, "{v}");
    }
    // Forged and stale requests are refused exactly as in forward mode, and never stored.
    let forged = stripe_event("evt_forged");
    let mut bad = stripe_headers(&forged, now());
    bad[0].1 = bad[0].1.replace("v1=", "v1=00");
    let (st, v) = s.post("/wh/stripe", &bad, forged).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("signature_mismatch")),
        "{v}"
    );
    let stale = stripe_event("evt_stale");
    let (st, v) = s
        .post("/wh/stripe", &stripe_headers(&stale, now() - 3600), stale)
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("timestamp_out_of_tolerance")),
        "{v}"
    );
    let (st, v) = s.post("/wh/github", &[], gh_body.clone()).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("missing_header")),
        "{v}"
    );

    let c = db.client().await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM postern.inbox").await, 3);
    app.wait_count(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.count(), 3, "a duplicate was forwarded");
    let gh = app
        .requests()
        .into_iter()
        .find(|r| r.uri == "/internal/github")
        .expect("github at its upstream_path");
    assert_eq!(gh.body.as_ref(), gh_body.as_slice());
    assert_eq!(gh.header("x-postern-verified"), Some("github"));

    // Retention prunes handled messages past `retention.inbox` and keeps the rest.
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.inbox WHERE status = 'done'",
        3,
        Duration::from_secs(10),
    )
    .await;
    c.execute(
        "UPDATE postern.inbox SET handled_at = now() - interval '2 days' WHERE route = 'stripe'",
        &[],
    )
    .await
    .unwrap();
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.inbox",
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(
        scalar(
            &c,
            "SELECT count(*) FROM postern.inbox WHERE route = 'github'"
        )
        .await,
        1
    );
    let metrics = reqwest::get(format!("{}/metrics", s.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("postern_inbox_duplicates_total{route=\"stripe\"} 11"),
        "{metrics}"
    );
}
