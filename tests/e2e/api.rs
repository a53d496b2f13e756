//! The management API: tokens, endpoints and their validation, NUL bytes and unsent bodies; the
//! helpers other modules start Postern's API with.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

pub(crate) const TOKEN: &str = "test-token-0123456789abcdef";
pub(crate) const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

pub(crate) struct Ops {
    pub(crate) db: TestDb,
    pub(crate) postern: Postern,
    pub(crate) api: String,
    pub(crate) admin: String,
    http: reqwest::Client,
}

/// Postern with the API (token, encryption key) and admin listeners; `extra` is appended.
pub(crate) async fn start_ops(db: TestDb, database_url: Option<&str>, extra: &str) -> Ops {
    start_ops_with_env(db, database_url, extra, &[]).await
}

/// As [`start_ops`], with environment variables for Postern.
pub(crate) async fn start_ops_with_env(
    db: TestDb,
    database_url: Option<&str>,
    extra: &str,
    env: &[(&str, &str)],
) -> Ops {
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
    let postern = Postern::start_with_env(&config, env).await;
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
    pub(crate) async fn walk_pages(&self, first: &str, list: &str, field: &str) -> Vec<String> {
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
    pub(crate) async fn wait_ready(&self, want: u16) -> String {
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

    pub(crate) async fn get_text(&self, url: &str) -> (u16, String) {
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
