//! The inbound proxy's framing and connections: bodies of every size and encoding, limits, an
//! app that hangs, closes or answers early, slow senders, signals, and malformed or ambiguous
//! requests answered in Postern's contract.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::common::*;
use crate::inbound::*;
use postern::signing::{self, HmacAlgorithm};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_every_size_arrive_intact_with_length_chunked_and_expect() {
    let proxy = start_proxy(Receiver::ok().await).await;
    let mut expected = 0;
    for size in [1024, 64 * 1024 - 1, 64 * 1024 + 1, 5 * 1024 * 1024] {
        let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let (headers, _) = sign("github", &body, now());
        // Content-Length.
        let (s, a) = proxy.post("/wh/github", "", &headers, body.clone()).await;
        assert_eq!(s, 200, "{size} bytes with Content-Length: {a}");
        // Chunked.
        let resp = proxy
            .post_chunked("/wh/github", &headers, &body, 10_000)
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{size} bytes chunked");
        // Expect: 100-continue, over a raw socket so the wait for 100 is real.
        let status = expect_continue(proxy.port, "/wh/github", &headers, &body);
        assert_eq!(status, 200, "{size} bytes with Expect: 100-continue");
        expected += 3;
        proxy
            .upstream
            .wait_count(expected, Duration::from_secs(10))
            .await;
        for got in &proxy.upstream.requests()[expected - 3..] {
            assert_eq!(got.body.len(), size);
            assert_eq!(
                Sha256::digest(&got.body),
                Sha256::digest(&body),
                "{size} bytes: body changed"
            );
        }
    }
}

/// Sends headers with `Expect: 100-continue`, waits for the interim response, then the body.
fn expect_continue(port: u16, path: &str, headers: &[(String, String)], body: &[u8]) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "got {:?}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(body).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_get_413_declared_or_counted() {
    let proxy = start_proxy(Receiver::ok().await).await;
    let body = vec![b'x'; 5 * 1024 * 1024 + 1];
    let (headers, _) = sign("github", &body, now());
    let (s, a) = proxy.post("/wh/github", "", &headers, body.clone()).await;
    assert_eq!((s, a["error"].as_str()), (413, Some("body_too_large")));
    match proxy
        .post_chunked("/wh/github", &headers, &body, 64 * 1024)
        .await
    {
        Ok(resp) => {
            assert_eq!(resp.status().as_u16(), 413);
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&resp.text().await.unwrap()).unwrap()
                    ["error"],
                "body_too_large"
            );
        }
        // The proxy may close while the client is still sending; what matters is nothing passed.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    assert_eq!(proxy.upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_hanging_is_504() {
    let dead = format!("http://127.0.0.1:{}", dead_port().await);
    let proxy = start_proxy_with(Receiver::ok().await, &dead, "").await;
    let body = b"{}".to_vec();
    let (headers, _) = sign("github", &body, now());
    let (s, a) = proxy.post("/wh/github", "", &headers, body.clone()).await;
    assert_eq!(
        (s, a["error"].as_str()),
        (502, Some("upstream_unavailable")),
        "{a}"
    );
    drop(proxy);

    let proxy = start_proxy(
        Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(10))).await,
    )
    .await;
    let started = Instant::now();
    let (s, a) = proxy.post("/wh/github", "", &headers, body.clone()).await;
    assert_eq!(
        (s, a["error"].as_str()),
        (504, Some("upstream_timeout")),
        "{a}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The decision is logged once the answer is out.
    proxy
        .postern
        .wait_log("error=\"upstream_timeout\"", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_half_forged_deliver_exactly_the_valid_half() {
    let proxy = std::sync::Arc::new(start_proxy(Receiver::ok().await).await);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("{{\"i\": {i}}}").into_bytes();
            let (headers, query) = sign("stripe", &body, now());
            let sent = if i % 2 == 0 {
                body.clone()
            } else {
                format!("{{\"i\": {}}}", i + 1000).into_bytes()
            };
            let (status, _) = proxy.post("/wh/stripe", &query, &headers, sent).await;
            (i, status)
        }));
    }
    for t in tasks {
        let (i, status) = t.await.unwrap();
        assert_eq!(status, if i % 2 == 0 { 200 } else { 401 }, "request {i}");
    }
    let mut got: Vec<i64> = proxy
        .upstream
        .requests()
        .iter()
        .map(|r| r.json()["i"].as_i64().unwrap())
        .collect();
    got.sort();
    let want: Vec<i64> = (0..200).step_by(2).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_and_sigterm_let_in_flight_inbound_requests_finish() {
    for signal in ["INT", "TERM"] {
        let upstream =
            Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(800))).await;
        let mut proxy = start_proxy(upstream).await;
        let body = b"{}".to_vec();
        let (headers, _) = sign("github", &body, now());
        let http = proxy.http.clone();
        let url = format!("{}/wh/github", proxy.base);
        let in_flight = tokio::spawn(async move {
            let mut req = http.post(url).body(body);
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            req.send().await.map(|r| r.status().as_u16())
        });
        proxy.upstream.wait_count(1, Duration::from_secs(5)).await;
        let asked = Instant::now();
        proxy.postern.signal(signal);
        assert_eq!(
            in_flight.await.unwrap().unwrap(),
            200,
            "{signal}: the in-flight request was cut"
        );
        let status = proxy.postern.wait_exit(Duration::from_secs(9)).await;
        assert!(status.success(), "{signal}: {status:?}");
        assert!(
            asked.elapsed() < Duration::from_secs(8),
            "{signal}: took {:?}",
            asked.elapsed()
        );
        let logs = proxy.postern.logs();
        assert!(logs.contains("inbound proxy stopped"), "{logs}");
        // pingora's own `log` output arrives through tracing.
        assert!(
            logs.contains("Graceful shutdown"),
            "pingora logs are not bridged:\n{logs}"
        );
    }
}

/// An app that answers each connection once and then closes it (as one with a very short
/// keep-alive timeout does): every request still arrives whole, on a connection of its own, and is
/// answered, whether Postern's pool notices the close or a reused connection fails and is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_closing_every_connection_still_gets_every_request_whole() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = format!("http://{}", listener.local_addr().unwrap());
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut request = Vec::new();
            let mut buf = [0u8; 65536];
            // Read the head, then as many body bytes as it declares.
            let complete = loop {
                let n = conn.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break false;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let declared: usize = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if request.len() >= end + 4 + declared {
                        break true;
                    }
                }
            };
            if complete {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                let _ = seen_tx.send(request);
            }
            // Dropping `conn` closes it, without having said so in the response.
        }
    });
    let proxy = start_proxy_with(Receiver::ok().await, &app, "").await;
    let bodies: Vec<Vec<u8>> = [10usize, 1000, 70_000, 3]
        .iter()
        .map(|n| (0..*n).map(|i| b'a' + (i % 26) as u8).collect())
        .collect();
    for body in &bodies {
        let (headers, _) = sign("github", body, now());
        let (status, answer) = proxy.post("/wh/github", "", &headers, body.clone()).await;
        assert_eq!((status, answer), (200, serde_json::json!("ok")));
    }
    for body in &bodies {
        let request = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        assert_eq!(
            &request[end + 4..],
            &body[..],
            "the body arrived byte for byte"
        );
        let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
        assert!(head.starts_with("post /wh/github http/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
    }
}

/// An HTTP/1.0 sender: the app gets the path, query and body as sent, and the verified mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_request_reaches_the_app_whole() {
    let proxy = start_proxy(Receiver::ok().await).await;
    let body = b"{\"old\":true}".to_vec();
    let (headers, _) = sign("github", &body, now());
    let port = proxy.port;
    let reply = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = format!(
            "POST /wh/github?z=1 HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
    })
    .await
    .unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
        "{reply}"
    );
    proxy.upstream.wait_count(1, Duration::from_secs(5)).await;
    let got = proxy.upstream.requests().pop().unwrap();
    assert_eq!(got.uri, "/wh/github?z=1");
    assert_eq!(&got.body[..], b"{\"old\":true}");
    assert_eq!(got.header("x-postern-verified"), Some("github"));
}

/// Slow uploads cannot take the process's memory: bytes are charged as they arrive, and past
/// `inbound.max_buffered` (8 MiB here) senders get `503` with `Retry-After` at once, while
/// outbound delivery goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_past_the_buffered_budget_get_503_and_outbound_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let receiver = Receiver::ok().await;
    let extra = String::from("max_body = \"4MiB\"\nmax_buffered = \"8MiB\"\n")
        + &endpoint("e", &receiver.url, &["*"], "");
    let app = Receiver::ok().await;
    let url = app.url.trim_end_matches("/hook").to_string();
    let proxy = start_proxy_with(app, &url, &extra).await;
    let path = path_of("github");
    let mut connections = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Hub-Signature-256: sha256={}\r\nContent-Length: {}\r\n\r\n",
            "0".repeat(64),
            4 << 20
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // Half the body now; the rest never comes in time.
        let _ = s.write_all(&vec![b'x'; 2 << 20]).await;
        connections.push(s);
    }
    let answers = futures_util::future::join_all(connections.iter_mut().map(|s| async move {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).to_string()),
            _ => None,
        }
    }))
    .await;
    let mut refused = 0;
    let mut held = 0;
    for answer in answers {
        match answer {
            Some(text) => {
                assert!(text.starts_with("HTTP/1.1 503"), "{text}");
                assert!(
                    text.to_ascii_lowercase().contains("retry-after: 1"),
                    "{text}"
                );
                assert!(text.contains("\"error\":\"overloaded\""), "{text}");
                refused += 1;
            }
            None => held += 1,
        }
    }
    // 8 MiB holds at most four bodies of which 2 MiB arrived (which four depends on the order
    // the proxy reads them in); the rest are refused, none hangs.
    assert_eq!(held + refused, 8);
    assert!((1..=4).contains(&held), "{held} held, {refused} refused");
    // Outbound delivery is not held up by the uploads.
    let client = proxy._db.client().await;
    for i in 0..20 {
        publish_one(&client, "order.created", serde_json::json!({ "i": i })).await;
    }
    receiver.wait_count(20, Duration::from_secs(5)).await;
    let peak = peak_rss_mib(proxy.postern.pid());
    assert!(peak < 100.0, "peak RSS {peak:.1} MiB");
    drop(connections);
}

/// Issue 12: a Twilio signature over the URL alone (what an empty-bodied request carries) must
/// not carry a body no signature covers: JSON, plain text or no content type, it is refused and
/// never reaches the app; the empty body it was made for still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_signature_over_the_url_alone_covers_no_body() {
    let proxy = start_proxy(Receiver::ok().await).await;
    let url = format!("{TWILIO_URL}?pn=1");
    let sig = base64::engine::general_purpose::STANDARD.encode(signing::hmac_with(
        HmacAlgorithm::Sha1,
        PLAIN_SECRET.as_bytes(),
        &[url.as_bytes()],
    ));
    let forged = br#"{"admin":true,"amount":1000000}"#.to_vec();
    for content_type in [Some("application/json"), Some("text/plain"), None] {
        let mut headers = vec![("x-twilio-signature".to_string(), sig.clone())];
        if let Some(ct) = content_type {
            headers.push(("content-type".into(), ct.into()));
        }
        let (status, body) = proxy
            .post("/wh/twilio", "pn=1", &headers, forged.clone())
            .await;
        assert_eq!(status, 401, "{content_type:?}: {body}");
        assert_eq!(body["error"], "signature_mismatch", "{content_type:?}");
    }
    assert_eq!(
        proxy.upstream.count(),
        0,
        "nothing unsigned reached the app"
    );
    let headers = vec![("x-twilio-signature".to_string(), sig)];
    let (status, _) = proxy.post("/wh/twilio", "pn=1", &headers, Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(proxy.upstream.count(), 1);
}

/// Issue 12: a signature-relevant header sent twice is refused: never verify one value and
/// forward both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_header_sent_twice_is_refused() {
    let proxy = start_proxy(Receiver::ok().await).await;
    let body = br#"{"type":"x"}"#.to_vec();
    for (provider, header) in [
        ("standard-webhooks", "webhook-id"),
        ("standard-webhooks", "webhook-signature"),
        ("stripe", "stripe-signature"),
        ("github", "x-hub-signature-256"),
        ("slack", "x-slack-request-timestamp"),
    ] {
        let (mut headers, query) = sign(provider, &body, now());
        let value = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(header))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{provider} signs with {header}"));
        headers.push((header.to_string(), value));
        let (status, v) = proxy
            .post(&path_of(provider), &query, &headers, body.clone())
            .await;
        assert_eq!(
            (status, v["error"].as_str()),
            (401, Some("malformed_header")),
            "{provider}: {header} twice"
        );
    }
    assert_eq!(proxy.upstream.count(), 0);
}

/// Sends `raw` on a fresh connection and reads until the connection closes or `want` responses
/// (counted by their status lines) have arrived, for at most two seconds.
async fn raw_exchange(port: u16, raw: &[u8], want: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; 16 << 10];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
        if String::from_utf8_lossy(&got).matches("HTTP/1.1 ").count() >= want {
            break;
        }
    }
    String::from_utf8_lossy(&got).to_string()
}

/// Issue 12: malformed framing, which pingora's proxy answered with a bare 400 before any of
/// Postern's code ran, gets Postern's contract: `400 {"error":"bad_request"}` (405 for CONNECT),
/// a decision log line and a count, nothing forwarded. Two pipelined requests in one write are both
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_framing_is_refused_in_the_contract_and_pipelined_requests_are_answered() {
    let proxy = start_proxy(Receiver::ok().await).await;
    let head = |extra: &str| {
        format!("POST /wh/github HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n{{}}").into_bytes()
    };
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("conflicting Content-Length", head("Content-Length: 2\r\nContent-Length: 3\r\n"), 400),
        ("non-numeric Content-Length", head("Content-Length: two\r\n"), 400),
        ("signed Content-Length", head("Content-Length: +2\r\n"), 400),
        ("hex Content-Length", head("Content-Length: 0x2\r\n"), 400),
        ("obs-fold", head("Content-Length: 2\r\nX-A: a\r\n b\r\n"), 400),
        ("space before the colon", head("Content-Length: 2\r\nX-A : b\r\n"), 400),
        ("control byte in a value", head("Content-Length: 2\r\nX-A: a\x01b\r\n"), 400),
        ("bare CR", head("Content-Length: 2\r\nX-A: a\rb\r\n"), 400),
        ("Transfer-Encoding gzip, chunked", b"POST /wh/github HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(), 400),
        ("Transfer-Encoding identity", head("Transfer-Encoding: identity\r\n"), 400),
        ("duplicate Host", head("Host: other\r\nContent-Length: 2\r\n"), 400),
        ("300 headers", head(&format!("Content-Length: 2\r\n{many}")), 400),
        ("CONNECT", b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n".to_vec(), 405),
    ];
    for (what, raw, status) in &cases {
        let answer = raw_exchange(proxy.port, raw, 1).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {answer:?}"
        );
        let code = if *status == 405 {
            "method_not_allowed"
        } else {
            "bad_request"
        };
        assert!(
            answer.contains(&format!("\"error\":\"{code}\"")),
            "{what}: {answer:?}"
        );
    }
    assert_eq!(proxy.upstream.count(), 0, "nothing malformed was forwarded");
    // The decision line is written as the answer goes out: the last may land a moment after it.
    let count_logged = || {
        proxy
            .postern
            .logs()
            .lines()
            .filter(|l| {
                l.contains("inbound request")
                    && (l.contains("status=400") || l.contains("status=405"))
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_logged() < cases.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_logged(), cases.len(), "one decision line per refusal");

    // Two valid requests in one write: both answered, both forwarded.
    let body = b"{}".to_vec();
    let (headers, _) = sign("github", &body, now());
    let one: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!(
        "POST /wh/github HTTP/1.1\r\nHost: 127.0.0.1\r\n{one}Content-Length: 2\r\n\r\n{{}}"
    );
    let answer = raw_exchange(proxy.port, format!("{request}{request}").as_bytes(), 2).await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer:?}");
    assert_eq!(proxy.upstream.count(), 2);
}

/// Review of issue 12: an app that answers with an informational head first (103 Early Hints)
/// has its final answer relayed, the connection kept, nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_informational_answer_from_the_app_is_passed_over() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Each request, answered with an informational head before the real one.
                while read_raw_request(&mut s).await {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                        )
                        .await;
                }
            });
        }
    });
    let proxy = start_proxy_with(Receiver::ok().await, &format!("http://{app}"), "").await;
    let body = b"{}".to_vec();
    for _ in 0..2 {
        let (headers, _) = sign("github", &body, now());
        let (status, answer) = proxy.post("/wh/github", "", &headers, body.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(answer, serde_json::Value::String("hello".into()));
    }
}
