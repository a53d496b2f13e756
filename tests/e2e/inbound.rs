//! The inbound proxy: the real binary, a real upstream on 127.0.0.1, real HTTP clients.

use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::common::*;
use postern::signing::{self, HmacAlgorithm};

pub(crate) const STANDARD_SECRET: &str = SECRET;
pub(crate) const PLAIN_SECRET: &str = "plain-secret-for-tests";
pub(crate) const SQUARE_URL: &str = "https://hooks.example.com/square";
pub(crate) const TWILIO_URL: &str = "https://hooks.example.com/twilio";

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Every provider's route, all pointing at the same upstream.
pub(crate) fn routes() -> String {
    let route = |path: &str, provider: &str, secret: &str, extra: &str| {
        format!("\n[[inbound.routes]]\npath = \"{path}\"\nprovider = \"{provider}\"\nsecrets = [\"{secret}\"]\n{extra}\n")
    };
    [
        route("/wh/standard", "standard-webhooks", STANDARD_SECRET, ""),
        route("/wh/stripe", "stripe", PLAIN_SECRET, ""),
        route("/wh/github", "github", PLAIN_SECRET, ""),
        route("/wh/slack", "slack", PLAIN_SECRET, ""),
        route("/wh/shopify", "shopify", PLAIN_SECRET, ""),
        route("/wh/paddle", "paddle", PLAIN_SECRET, ""),
        route("/wh/square", "square", PLAIN_SECRET, &format!("notification_url = \"{SQUARE_URL}\"")),
        route("/wh/twilio", "twilio", PLAIN_SECRET, &format!("public_url = \"{TWILIO_URL}\"")),
        route("/wh/gitlab", "gitlab", PLAIN_SECRET, ""),
        route(
            "/wh/hmac",
            "hmac",
            PLAIN_SECRET,
            "header = \"x-signature\"\nprefix = \"sha256=\"\ntimestamp_header = \"x-timestamp\"\nsigned_template = \"{timestamp}.{body}\"",
        ),
        route("/wh/rewritten", "github", PLAIN_SECRET, "upstream_path = \"/internal/github\""),
        route("/wh/local-only", "github", PLAIN_SECRET, "allow_ips = [\"127.0.0.1/32\"]"),
        route("/wh/elsewhere-only", "github", PLAIN_SECRET, "allow_ips = [\"203.0.113.0/24\"]"),
    ]
    .concat()
}

/// Headers (and a query, for Twilio) that sign `body` for `provider` at `ts`.
pub(crate) fn sign(provider: &str, body: &[u8], ts: i64) -> (Vec<(String, String)>, String) {
    let k = PLAIN_SECRET.as_bytes();
    let hex_mac = |parts: &[&[u8]]| hex::encode(signing::hmac_sha256(k, parts));
    let t = ts.to_string();
    let h = |pairs: &[(&str, String)]| {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.clone()))
            .collect::<Vec<_>>()
    };
    match provider {
        "standard-webhooks" => {
            let key = signing::standard_key(STANDARD_SECRET).unwrap();
            let sig = signing::standard_signature(&key, "msg_1", ts, body);
            (
                h(&[
                    ("webhook-id", "msg_1".into()),
                    ("webhook-timestamp", t),
                    ("webhook-signature", sig),
                ]),
                String::new(),
            )
        }
        "stripe" => (
            h(&[(
                "stripe-signature",
                format!("t={t},v1={},v0=00", hex_mac(&[t.as_bytes(), b".", body])),
            )]),
            String::new(),
        ),
        "github" => (
            h(&[(
                "x-hub-signature-256",
                format!("sha256={}", hex_mac(&[body])),
            )]),
            String::new(),
        ),
        "slack" => (
            h(&[
                ("x-slack-request-timestamp", t.clone()),
                (
                    "x-slack-signature",
                    format!("v0={}", hex_mac(&[b"v0:", t.as_bytes(), b":", body])),
                ),
            ]),
            String::new(),
        ),
        "shopify" => (
            h(&[(
                "x-shopify-hmac-sha256",
                b64(&signing::hmac_sha256(k, &[body])),
            )]),
            String::new(),
        ),
        "paddle" => (
            h(&[(
                "paddle-signature",
                format!("ts={t};h1={}", hex_mac(&[t.as_bytes(), b":", body])),
            )]),
            String::new(),
        ),
        "square" => (
            h(&[(
                "x-square-hmacsha256-signature",
                b64(&signing::hmac_sha256(k, &[SQUARE_URL.as_bytes(), body])),
            )]),
            String::new(),
        ),
        "twilio" => {
            let query = format!("bodySHA256={}", hex::encode(Sha256::digest(body)));
            let url = format!("{TWILIO_URL}?{query}");
            let sig = b64(&signing::hmac_with(
                HmacAlgorithm::Sha1,
                k,
                &[url.as_bytes()],
            ));
            (
                h(&[
                    ("x-twilio-signature", sig),
                    ("content-type", "application/json".into()),
                ]),
                query,
            )
        }
        "gitlab" => (h(&[("x-gitlab-token", PLAIN_SECRET.into())]), String::new()),
        "hmac" => (
            h(&[
                ("x-timestamp", t.clone()),
                (
                    "x-signature",
                    format!("sha256={}", hex_mac(&[t.as_bytes(), b".", body])),
                ),
            ]),
            String::new(),
        ),
        other => panic!("no signer for {other}"),
    }
}

pub(crate) struct Proxy {
    pub(crate) _db: TestDb,
    pub(crate) postern: Postern,
    pub(crate) base: String,
    pub(crate) port: u16,
    pub(crate) upstream: Receiver,
    pub(crate) http: reqwest::Client,
}

pub(crate) async fn start_proxy_with(
    upstream: Receiver,
    upstream_url: &str,
    extra_inbound: &str,
) -> Proxy {
    let db = TestDb::create().await;
    let port = dead_port().await;
    let config = format!(
        "{}\n[inbound]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{upstream_url}\"\nupstream_timeout = \"2s\"\nread_timeout = \"3s\"\n{extra_inbound}\n{}",
        base_config(&db),
        routes()
    );
    let postern = Postern::start(&config).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "inbound listener never came up; log:\n{}",
            postern.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Proxy {
        _db: db,
        postern,
        base: format!("http://127.0.0.1:{port}"),
        port,
        upstream,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

pub(crate) async fn start_proxy(upstream: Receiver) -> Proxy {
    let url = upstream.url.trim_end_matches("/hook").to_string();
    start_proxy_with(upstream, &url, "").await
}

impl Proxy {
    /// POSTs `body` chunked (no Content-Length), in pieces of `piece` bytes.
    pub(crate) async fn post_chunked(
        &self,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
        piece: usize,
    ) -> reqwest::Result<reqwest::Response> {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(piece).map(|c| Ok(c.to_vec())).collect();
        let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let mut req = self.http.post(format!("{}{path}", self.base)).body(stream);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send().await
    }

    pub(crate) async fn post(
        &self,
        path: &str,
        query: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        let url = if query.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?{query}", self.base)
        };
        let mut req = self.http.post(url).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }
}

/// Every provider the proxy knows: the test covers each one the library lists.
use postern::inbound::providers::PROVIDERS;

pub(crate) fn path_of(provider: &str) -> String {
    let short = if provider == "standard-webhooks" {
        "standard"
    } else {
        provider
    };
    format!("/wh/{short}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_forwards_valid_requests_byte_for_byte_and_refuses_the_rest() {
    let proxy = start_proxy(Receiver::ok().await).await;
    for (i, provider) in PROVIDERS.iter().enumerate() {
        let path = path_of(provider);
        let body = format!(
            "{{\"provider\": \"{provider}\", \"n\": {i}, \"text\": \"caf\u{e9} \\u00e9\"}}\n"
        )
        .into_bytes();
        let (headers, query) = sign(provider, &body, now());
        let before = proxy.upstream.count();
        let (status, answer) = proxy.post(&path, &query, &headers, body.clone()).await;
        assert_eq!(status, 200, "{provider}: {answer}");
        assert_eq!(proxy.upstream.count(), before + 1, "{provider}");
        let got = &proxy.upstream.requests()[before];
        assert_eq!(
            Sha256::digest(&got.body),
            Sha256::digest(&body),
            "{provider}: body changed"
        );
        assert_eq!(got.header("x-postern-verified"), Some(*provider));

        let refused = |status: u16, answer: &serde_json::Value, code: &str, what: &str| {
            assert_eq!(status, 401, "{provider} {what}: {answer}");
            assert_eq!(answer["error"], code, "{provider} {what}: {answer}");
            assert!(answer["message"].is_string());
        };
        // Missing.
        let (s, a) = proxy.post(&path, &query, &[], body.clone()).await;
        refused(s, &a, "missing_header", "missing");
        // Tampered: one byte of the body changed (GitLab signs nothing: a wrong token instead).
        if *provider == "gitlab" {
            let wrong = vec![("x-gitlab-token".to_string(), "not-the-token".to_string())];
            let (s, a) = proxy.post(&path, &query, &wrong, body.clone()).await;
            refused(s, &a, "signature_mismatch", "wrong token");
        } else {
            let mut tampered = body.clone();
            tampered[2] ^= 1;
            let (s, a) = proxy.post(&path, &query, &headers, tampered).await;
            refused(s, &a, "signature_mismatch", "tampered");
        }
        // Malformed: the signature header replaced by garbage (GitLab's token has no format).
        if *provider != "gitlab" {
            let garbage: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| {
                    let signature_header =
                        k.contains("signature") || k.contains("hmac") || k == "x-hub-signature-256";
                    (
                        k.clone(),
                        if signature_header {
                            "%%%garbage%%%".to_string()
                        } else {
                            v.clone()
                        },
                    )
                })
                .collect();
            let (s, a) = proxy.post(&path, &query, &garbage, body.clone()).await;
            refused(s, &a, "malformed_header", "malformed");
        }
        // Stale, for the schemes that sign a timestamp.
        if ["standard-webhooks", "stripe", "slack", "paddle", "hmac"].contains(provider) {
            let (stale, q) = sign(provider, &body, now() - 3600);
            let (s, a) = proxy.post(&path, &q, &stale, body.clone()).await;
            refused(s, &a, "timestamp_out_of_tolerance", "stale");
        }
        assert_eq!(
            proxy.upstream.count(),
            before + 1,
            "{provider}: a refused request reached the app"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_answer_is_relayed_and_routing_rules_hold() {
    let upstream = Receiver::start(|_, _| {
        Reply::status(202)
            .with_header("x-app", "yes")
            .with_header("proxy-authenticate", "Basic realm=app")
            .with_header("keep-alive", "timeout=5")
    })
    .await;
    let proxy = start_proxy(upstream).await;
    let body = b"{\"a\":1}".to_vec();
    let (headers, _) = sign("github", &body, now());

    // Relay of status and headers; the path is rewritten and the query kept.
    let resp = proxy
        .http
        .post(format!("{}/wh/rewritten?x=1&y=2", proxy.base))
        .header("x-postern-verified", "forged")
        .header("x-postern-anything", "forged")
        .header("proxy-authorization", "Basic c2VuZGVy")
        .header(&headers[0].0, &headers[0].1)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(resp.headers().get("x-app").unwrap(), "yes");
    // Hop-by-hop headers describe one connection: neither direction passes them on.
    assert_eq!(resp.headers().get("proxy-authenticate"), None);
    assert_eq!(resp.headers().get("keep-alive"), None);
    assert_eq!(resp.text().await.unwrap(), "ok");
    let got = proxy.upstream.requests().pop().unwrap();
    assert_eq!(got.uri, "/internal/github?x=1&y=2");
    assert_eq!(
        got.header("x-postern-verified"),
        Some("github"),
        "the forged mark was replaced"
    );
    assert_eq!(
        got.header("x-postern-anything"),
        None,
        "sender-supplied x-postern-* headers are stripped"
    );
    assert_eq!(got.header("proxy-authorization"), None);

    let n = proxy.upstream.count();
    let (s, a) = proxy.post("/wh/nowhere", "", &headers, body.clone()).await;
    assert_eq!((s, a["error"].as_str()), (404, Some("route_not_found")));
    let resp = proxy
        .http
        .get(format!("{}/wh/github", proxy.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&resp.text().await.unwrap()).unwrap()["error"],
        "method_not_allowed"
    );
    // allow_ips: 127.0.0.1 listed -> admitted; not listed -> 403.
    let (s, _) = proxy
        .post("/wh/local-only", "", &headers, body.clone())
        .await;
    assert_eq!(s, 202);
    let (s, a) = proxy
        .post("/wh/elsewhere-only", "", &headers, body.clone())
        .await;
    assert_eq!((s, a["error"].as_str()), (403, Some("ip_not_allowed")));
    // X-Forwarded-For is not believed from a peer that is not a trusted proxy.
    let mut with_xff = headers.clone();
    with_xff.push(("x-forwarded-for".into(), "203.0.113.7".into()));
    let (s, _) = proxy
        .post("/wh/elsewhere-only", "", &with_xff, body.clone())
        .await;
    assert_eq!(s, 403);
    assert_eq!(proxy.upstream.count(), n + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_honoured_from_trusted_proxies() {
    let upstream = Receiver::ok().await;
    let url = upstream.url.trim_end_matches("/hook").to_string();
    let proxy = start_proxy_with(upstream, &url, "trust_forwarded_for = [\"127.0.0.0/8\"]").await;
    let body = b"{}".to_vec();
    let (mut headers, _) = sign("github", &body, now());
    headers.push(("x-forwarded-for".into(), "203.0.113.7".into()));
    let (s, _) = proxy
        .post("/wh/elsewhere-only", "", &headers, body.clone())
        .await;
    assert_eq!(s, 200, "203.0.113.7 via a trusted proxy is allowed");
    let (s, a) = proxy
        .post("/wh/local-only", "", &headers, body.clone())
        .await;
    assert_eq!(
        (s, a["error"].as_str()),
        (403, Some("ip_not_allowed")),
        "the believed sender is not 127.0.0.1"
    );
    // Issue 12: a sender's forged line first, the proxy's own line (the real client) second: the
    // lines are one list in order, so the real client decides, not the forgery.
    let (mut headers, _) = sign("github", &body, now());
    headers.push(("x-forwarded-for".into(), "203.0.113.7".into()));
    headers.push(("x-forwarded-for".into(), "198.51.100.9".into()));
    let (s, a) = proxy
        .post("/wh/elsewhere-only", "", &headers, body.clone())
        .await;
    assert_eq!(
        (s, a["error"].as_str()),
        (403, Some("ip_not_allowed")),
        "the forged first line was believed"
    );
    // A line that is not text cannot be walked: the sender is unknown, not the trusted proxy.
    let (mut headers, _) = sign("github", &body, now());
    headers.push(("x-forwarded-for".into(), "203.0.113.7".into()));
    let mut req = proxy
        .http
        .post(format!("{}/wh/local-only", proxy.base))
        .body(body.clone());
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    let req = req.header(
        "x-forwarded-for",
        reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
    );
    let status = req.send().await.unwrap().status().as_u16();
    assert_eq!(
        status, 403,
        "an unreadable list fell back to the trusted proxy's address"
    );
}
