//! Secret rotation through the API: both secrets sign during the grace, then only the new one
//! (Standard Webhooks), and a legacy receiver gets the older secret until its grace ends.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::api::start_ops;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_signs_with_both_secrets_during_the_grace_then_only_the_new() {
    let receiver = Receiver::ok().await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops.create(&receiver.url, json!({})).await;
    let id = created["id"].as_str().unwrap();
    let old = created["secret"].as_str().unwrap().to_string();
    let (s, rotated) = ops
        .call(
            "POST",
            &format!("/endpoints/{id}/rotate-secret"),
            Some(json!({"grace": "3s"})),
        )
        .await;
    assert_eq!(s, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(old, new);
    let rotated_at = Instant::now();
    ops.call("POST", &format!("/endpoints/{id}/test"), None)
        .await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    let during = &receiver.requests()[0];
    assert_eq!(during.json()["type"], "postern.test");
    assert_eq!(
        during
            .header("webhook-signature")
            .unwrap()
            .split(' ')
            .count(),
        2
    );
    assert!(verify_independently(&old, during) && verify_independently(&new, during));

    tokio::time::sleep(
        Duration::from_secs(3).saturating_sub(rotated_at.elapsed()) + Duration::from_millis(300),
    )
    .await;
    ops.call("POST", &format!("/endpoints/{id}/test"), None)
        .await;
    receiver.wait_count(2, Duration::from_secs(10)).await;
    let after = &receiver.requests()[1];
    assert_eq!(
        after
            .header("webhook-signature")
            .unwrap()
            .split(' ')
            .count(),
        1
    );
    assert!(verify_independently(&new, after));
    assert!(!verify_independently(&old, after));
    // The default grace is accepted without a body.
    let (s, _) = ops
        .call("POST", &format!("/endpoints/{id}/rotate-secret"), None)
        .await;
    assert_eq!(s, 200);
    // A body follows the JSON rules of every other route: malformed JSON, or JSON not declared
    // as such, is 400 bad_request (neither rotates).
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for (content_type, body) in [
        ("application/json", "{"),
        ("text/plain", r#"{"grace": "1h"}"#),
    ] {
        let resp = http
            .post(format!("{}/endpoints/{id}/rotate-secret", ops.api))
            .bearer_auth(crate::api::TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let v: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("bad_request")),
            "{content_type} {body}: {v}"
        );
    }
}

/// Issue 12: a legacy receiver verifies one signature, so during a rotation's grace Postern keeps
/// signing with the older secret (the one the receiver has), then with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_rotation_signs_with_the_older_secret_until_its_grace_ends() {
    let receiver = Receiver::ok().await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops
        .create(&receiver.url, json!({"signature": "legacy"}))
        .await;
    let id = created["id"].as_str().unwrap();
    let old = created["secret"].as_str().unwrap().to_string();
    let (s, rotated) = ops
        .call(
            "POST",
            &format!("/endpoints/{id}/rotate-secret"),
            Some(json!({"grace": "3s"})),
        )
        .await;
    assert_eq!(s, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_string();
    let rotated_at = Instant::now();
    let legacy_ok = |secret: &str, r: &Received| {
        let ts: i64 = r.header("x-webhook-timestamp").unwrap().parse().unwrap();
        r.header("x-webhook-signature")
            == Some(postern::signing::legacy_signature(secret, ts, &r.body).as_str())
    };
    ops.call("POST", &format!("/endpoints/{id}/test"), None)
        .await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    assert!(
        legacy_ok(&old, &receiver.requests()[0]),
        "during the grace: the older secret"
    );
    tokio::time::sleep(
        Duration::from_secs(3).saturating_sub(rotated_at.elapsed()) + Duration::from_millis(300),
    )
    .await;
    ops.call("POST", &format!("/endpoints/{id}/test"), None)
        .await;
    receiver.wait_count(2, Duration::from_secs(10)).await;
    assert!(
        legacy_ok(&new, &receiver.requests()[1]),
        "after the grace: the new secret"
    );
}

/// Every unexpired secret signs each delivery, so rotations are capped: at most
/// `MAX_SIGNING_SECRETS` sign at once. A rotation past that is 409 and changes nothing; one with
/// a zero grace (retiring the others at once, as after a leak) is always taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_stop_at_five_signing_secrets_until_one_retires() {
    let receiver = Receiver::ok().await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops.create(&receiver.url, json!({})).await;
    let id = created["id"].as_str().unwrap();
    let rotate = |grace: &'static str| {
        let path = format!("/endpoints/{id}/rotate-secret");
        let ops = &ops;
        async move {
            ops.call("POST", &path, Some(json!({ "grace": grace })))
                .await
        }
    };
    for n in 2..=5 {
        let (s, body) = rotate("1h").await;
        assert_eq!(s, 200, "rotation to {n} secrets: {body}");
    }
    let (s, body) = rotate("1h").await;
    assert_eq!(
        (s, body["error"].as_str()),
        (409, Some("too_many_secrets")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("\"0s\""),
        "the refusal says how to go on: {body}"
    );
    ops.call("POST", &format!("/endpoints/{id}/test"), None)
        .await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    let signatures = |r: &Received| r.header("webhook-signature").unwrap().split(' ').count();
    assert_eq!(
        signatures(&receiver.requests()[0]),
        5,
        "the refused rotation added none"
    );

    let (s, rotated) = rotate("0s").await;
    assert_eq!(s, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_string();
    ops.call("POST", &format!("/endpoints/{id}/test"), None)
        .await;
    receiver.wait_count(2, Duration::from_secs(10)).await;
    let after = &receiver.requests()[1];
    assert_eq!(signatures(after), 1);
    assert!(verify_independently(&new, after));
}
