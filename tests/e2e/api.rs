//! The management API, probes and metrics: the real binary, real Postgres, real HTTP.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

pub(crate) const TOKEN: &str = "test-token-0123456789abcdef";
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

pub(crate) struct Ops {
    pub(crate) db: TestDb,
    pub(crate) postern: Postern,
    pub(crate) api: String,
    pub(crate) admin: String,
    http: reqwest::Client,
}

/// Postern with the API (token, encryption key) and admin listeners; `extra` is appended.
pub(crate) async fn start_ops(db: TestDb, database_url: Option<&str>, extra: &str) -> Ops {
    let (api_port, admin_port) = (dead_port().await, dead_port().await);
    let mut config = base_config(&db);
    if let Some(url) = database_url {
        config = config.replace(
            &format!("url = \"{}\"", db.url),
            &format!("url = \"{url}\""),
        );
    }
    config = config.replace(
        "pool_size = 4\n",
        &format!("pool_size = 4\nencryption_key = \"{KEY}\"\n"),
    );
    let config = format!(
        "{config}\n[api]\nlisten = \"127.0.0.1:{api_port}\"\ntokens = [\"{TOKEN}\"]\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{extra}"
    );
    let postern = Postern::start(&config).await;
    postern
        .wait_log("management API listening", Duration::from_secs(10))
        .await;
    Ops {
        db,
        postern,
        api: format!("http://127.0.0.1:{api_port}/api/v1"),
        admin: format!("http://127.0.0.1:{admin_port}"),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

impl Ops {
    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.api))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub(crate) async fn create(&self, url: &str, extra: Value) -> Value {
        let mut body = json!({"url": url, "events": ["*"]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (s, v) = self.call("POST", "/endpoints", Some(body)).await;
        assert_eq!(s, 201, "{v}");
        v
    }

    /// Follows `next_cursor` from `first` to the last page; returns `field` of every item in `list`.
    async fn walk_pages(&self, first: &str, list: &str, field: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let mut path = first.to_string();
        loop {
            let (s, page) = self.call("GET", &path, None).await;
            assert_eq!(s, 200, "{page}");
            seen.extend(
                page[list]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e[field].as_str().unwrap().to_string()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => path = format!("{first}&cursor={c}"),
                None => return seen,
            }
        }
    }

    /// Polls `/readyz` until it answers `want`; returns the body.
    async fn wait_ready(&self, want: u16) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (s, body) = self.get_text(&format!("{}/readyz", self.admin)).await;
            if s == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "readyz stayed {s} ({body}), wanted {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn get_text(&self, url: &str) -> (u16, String) {
        let resp = self.http.get(url).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_every_api_route_and_the_openapi_document_is_served() {
    let ops = start_ops(TestDb::create().await, None, "").await;
    for (auth, want) in [
        (None, 401),
        (Some("Bearer wrong-token-wrong-token"), 401),
        (Some("Basic abc"), 401),
    ] {
        let mut req = ops.http.get(format!("{}/endpoints", ops.api));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), want);
        let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        assert_eq!(body["error"], "unauthorized");
    }
    let (s, v) = ops.call("GET", "/endpoints", None).await;
    assert_eq!((s, v["endpoints"].as_array().map(Vec::len)), (200, Some(0)));
    let (s, doc) = ops.call("GET", "/openapi.json", None).await;
    assert_eq!(s, 200);
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/endpoints",
        "/api/v1/endpoints/{id}",
        "/api/v1/endpoints/{id}/rotate-secret",
        "/api/v1/endpoints/{id}/deliveries",
        "/api/v1/deliveries/{id}",
        "/api/v1/deliveries/{id}/retry",
        "/api/v1/endpoints/{id}/replay",
        "/api/v1/endpoints/{id}/stats",
        "/api/v1/events",
        "/api/v1/endpoints/{id}/test",
    ] {
        assert!(paths.contains_key(p), "OpenAPI lacks {p}");
    }
    let (s, v) = ops.call("GET", "/no-such-route", None).await;
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_life_pause_resume_delete_and_its_secret_shown_once() {
    let receiver = Receiver::ok().await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops
        .create(
            &receiver.url,
            json!({"description": "billing", "headers": {"x-api-key": "k-1"}}),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(created["source"], "api");
    assert_eq!(created["headers"]["x-api-key"], "<redacted>");

    // Never again: not in a read, a list, the database in the clear, or a log line.
    let (_, one) = ops.call("GET", &format!("/endpoints/{id}"), None).await;
    let (_, list) = ops.call("GET", "/endpoints", None).await;
    assert!(one.get("secret").is_none() && !one.to_string().contains(&secret));
    assert!(!list.to_string().contains(&secret));
    let client = ops.db.client().await;
    let stored: String = client
        .query_one("SELECT secret FROM postern.endpoint_secrets", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        stored.starts_with("enc:v2:") && !stored.contains(&secret[6..]),
        "stored in the clear: {stored}"
    );
    let headers: Value = client
        .query_one("SELECT headers FROM postern.endpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !headers.to_string().contains("k-1"),
        "header value stored in the clear"
    );

    // It delivers, signed with that secret, with the decrypted header.
    let (s, v) = ops
        .call(
            "POST",
            "/events",
            Some(json!({"type": "order.created", "data": {"n": 1}})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    receiver.wait_count(1, Duration::from_secs(10)).await;
    let r = &receiver.requests()[0];
    assert!(verify_independently(&secret, r));
    assert_eq!(r.header("x-api-key"), Some("k-1"));
    assert_eq!(r.event_id(), v["id"].as_str().unwrap());

    // Pause: new deliveries wait as paused; resume: they go out, nothing lost.
    let (s, v) = ops
        .call(
            "PATCH",
            &format!("/endpoints/{id}"),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!((s, v["active"].as_bool()), (200, Some(false)), "{v}");
    for n in 0..3 {
        ops.call(
            "POST",
            "/events",
            Some(json!({"type": "order.created", "data": {"n": n}})),
        )
        .await;
    }
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'paused'",
        3,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(receiver.count(), 1);
    let (s, _) = ops
        .call(
            "PATCH",
            &format!("/endpoints/{id}"),
            Some(json!({"active": true})),
        )
        .await;
    assert_eq!(s, 200);
    receiver.wait_count(4, Duration::from_secs(10)).await;

    // Delete: unfinished deliveries become cancelled and stay listed.
    ops.call(
        "PATCH",
        &format!("/endpoints/{id}"),
        Some(json!({"active": false})),
    )
    .await;
    ops.call(
        "POST",
        "/events",
        Some(json!({"type": "order.created", "data": {}})),
    )
    .await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'paused'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let (s, _) = ops.call("DELETE", &format!("/endpoints/{id}"), None).await;
    assert_eq!(s, 204);
    let (s, _) = ops.call("GET", &format!("/endpoints/{id}"), None).await;
    assert_eq!(s, 404);
    let (s, v) = ops
        .call(
            "GET",
            &format!("/endpoints/{id}/deliveries?status=cancelled"),
            None,
        )
        .await;
    assert_eq!(
        (s, v["deliveries"].as_array().unwrap().len()),
        (200, 1),
        "{v}"
    );
    let cancelled = v["deliveries"][0]["id"].as_str().unwrap().to_string();
    let (s, v) = ops
        .call("POST", &format!("/deliveries/{cancelled}/retry"), None)
        .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("endpoint_deleted")));

    assert!(
        !ops.postern.logs().contains(&secret),
        "the secret reached a log line"
    );
    assert!(
        !ops.postern.logs().contains("k-1"),
        "a header value reached a log line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_error_gets_its_status_and_code() {
    let receiver = Receiver::ok().await;
    let config_endpoint = endpoint("from-config", &receiver.url, &["*"], "");
    let ops = start_ops(TestDb::create().await, None, &config_endpoint).await;
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"url": "not a url", "events": ["*"]}),
            422,
            "invalid_url",
        ),
        (
            json!({"url": "ftp://example.com/x", "events": ["*"]}),
            422,
            "invalid_url",
        ),
        (
            json!({"url": "http://10.0.0.1/hook", "events": ["*"]}),
            422,
            "url_not_allowed",
        ),
        (
            json!({"url": "http://169.254.169.254/latest", "events": ["*"]}),
            422,
            "url_not_allowed",
        ),
        (
            json!({"url": "http://[fd00::1]/hook", "events": ["*"]}),
            422,
            "url_not_allowed",
        ),
        (
            json!({"url": receiver.url, "events": []}),
            422,
            "invalid_events",
        ),
        (
            json!({"url": receiver.url, "events": ["a..b"]}),
            422,
            "invalid_events",
        ),
        (
            json!({"url": receiver.url, "events": ["*"], "colour": "red"}),
            422,
            "invalid_body",
        ),
        (
            json!({"url": receiver.url, "events": ["*"], "tenant": "a b"}),
            422,
            "invalid_tenant",
        ),
        (
            json!({"url": receiver.url, "events": ["*"], "headers": {"webhook-id": "x"}}),
            422,
            "invalid_headers",
        ),
        (
            json!({"url": receiver.url, "events": ["*"], "retry": {"schedule": ["1s"], "max_attempts": 2}}),
            422,
            "invalid_retry",
        ),
        (json!({"events": ["*"]}), 422, "invalid_body"),
    ];
    for (body, status, code) in cases {
        let (s, v) = ops.call("POST", "/endpoints", Some(body.clone())).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (status, Some(code)),
            "{body} -> {v}"
        );
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let resp = ops
        .http
        .post(format!("{}/endpoints", ops.api))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let (s, v) = ops.call("GET", "/endpoints/ep_nope", None).await;
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")));
    let (s, v) = ops.call("GET", "/deliveries/not-a-uuid", None).await;
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")));
    let (s, v) = ops
        .call(
            "POST",
            "/events",
            Some(json!({"type": "bad..type", "data": {}})),
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (422, Some("invalid_event_type")));
    // Config endpoints: visible, `active` changes, anything else is a conflict.
    let (s, v) = ops.call("GET", "/endpoints/from-config", None).await;
    assert_eq!((s, v["source"].as_str()), (200, Some("config")));
    let (s, v) = ops
        .call(
            "PATCH",
            "/endpoints/from-config",
            Some(json!({"url": "https://example.com/x"})),
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("config_managed")));
    let (s, v) = ops
        .call(
            "PATCH",
            "/endpoints/from-config",
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!((s, v["active"].as_bool()), (200, Some(false)));
    let (s, _) = ops.call("DELETE", "/endpoints/from-config", None).await;
    assert_eq!(s, 409);
}

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
}

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
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
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

#[test]
fn a_public_api_listener_without_tokens_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[database]\nurl = \"postgres://x@127.0.0.1/y\"\n[api]\nlisten = \"0.0.0.0:9090\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api.tokens: required when api.listen"));
    // Loopback without tokens is allowed, with a warning; so is a missing encryption key.
    std::fs::write(
        &path,
        "[database]\nurl = \"postgres://x@127.0.0.1/y\"\n[api]\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: database.encryption_key: not set"),
        "{stderr}"
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

/// Issue 12: NUL anywhere an API caller can put it (path ids, query filters, JSON strings of an
/// endpoint or an event) is a 4xx in the error shape, never a 500; a body declared and never sent
/// times out instead of holding the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_anywhere_get_a_4xx_and_unsent_bodies_time_out() {
    let receiver = Receiver::ok().await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops.create(&receiver.url, json!({})).await;
    let id = created["id"].as_str().unwrap().to_string();
    let nul = "a\u{0}b";
    let cases: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", "/endpoints/ep%00x".into(), None),
        (
            "GET",
            format!("/endpoints/{id}/deliveries?event_type=a%00b"),
            None,
        ),
        (
            "GET",
            "/deliveries/00000000-0000-0000-0000-00000000000%00".into(),
            None,
        ),
        (
            "POST",
            "/endpoints".into(),
            Some(json!({"url": receiver.url, "events": ["*"], "description": nul})),
        ),
        (
            "POST",
            "/endpoints".into(),
            Some(json!({"url": receiver.url, "events": ["*"], "tenant": nul})),
        ),
        (
            "POST",
            "/endpoints".into(),
            Some(json!({"url": format!("{}?q={nul}", receiver.url), "events": ["*"]})),
        ),
        (
            "PATCH",
            format!("/endpoints/{id}"),
            Some(json!({"description": nul})),
        ),
        (
            "POST",
            "/events".into(),
            Some(json!({"type": "order.created", "data": {"note": nul}})),
        ),
        (
            "POST",
            "/events".into(),
            Some(json!({"type": "order.created", "data": {}, "ordering_key": nul})),
        ),
        (
            "POST",
            "/events".into(),
            Some(json!({"type": "order.created", "data": {}, "tenant": nul})),
        ),
        (
            "POST",
            "/events".into(),
            Some(json!({"type": nul, "data": {}})),
        ),
    ];
    for (method, path, body) in cases {
        let (status, v) = ops.call(method, &path, body.clone()).await;
        assert!(
            [400, 404, 422].contains(&status),
            "{method} {path} {body:?}: {status} {v}"
        );
        assert!(v["error"].is_string(), "{method} {path}: {v}");
    }
    // A payload over outbound.max_payload (1 MiB by default) breaks the outbox's CHECK: 422.
    let big = json!({"type": "order.created", "data": {"blob": "x".repeat(1_200_000)}});
    let (status, v) = ops.call("POST", "/events", Some(big)).await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("max_payload"),
        "{v}"
    );
    assert!(!ops.postern.logs().contains("management API request failed"));

    // Content-Length: 100 and nothing more: answered within the body read timeout, not never.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = ops
        .api
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        format!(
            "POST /api/v1/endpoints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("the API answered a body that never came")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
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
