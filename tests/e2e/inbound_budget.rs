//! The inbound proxy's buffered-body budget (`inbound.max_buffered`) against a slow app: a body
//! is charged while Postern needs it, not while the app's answer trickles back.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::inbound::{now, path_of, sign, start_proxy_with};

/// An app that reads each request whole and answers at once, except the first, whose answer's
/// body it sends a byte every 100 ms (its head at once); `answering` rings when that has begun.
async fn slow_answering_app(answering: std::sync::Arc<tokio::sync::Notify>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let slow = std::mem::take(&mut first);
            let answering = answering.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                // The head, then as many bytes as it declares.
                let (head_end, length) = loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the proxy closed before sending a request");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..at]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        break (at + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0);
                    buf.extend_from_slice(&chunk[..n]);
                }
                if slow {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n")
                        .await
                        .unwrap();
                    answering.notify_one();
                    for _ in 0..12 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        s.write_all(b"x").await.unwrap();
                    }
                } else {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_on_a_forward_route_holds_no_budget_once_the_app_has_the_body() {
    let answering = std::sync::Arc::new(tokio::sync::Notify::new());
    let app_url = slow_answering_app(answering.clone()).await;
    // Room for one body of 900 KiB at a time.
    let extra = "max_body = \"1MiB\"\nmax_buffered = \"1MiB\"\n";
    let proxy = start_proxy_with(Receiver::ok().await, &app_url, extra).await;
    let path = path_of("github");
    let body = |n: u8| -> Vec<u8> {
        let mut b = format!("{{\"n\":{n},\"pad\":\"").into_bytes();
        b.extend(std::iter::repeat_n(b'x', 900 * 1024));
        b.extend_from_slice(b"\"}");
        b
    };
    let first = {
        let (b, proxy_http, base, path) = (
            body(1),
            proxy.http.clone(),
            proxy.base.clone(),
            path.clone(),
        );
        tokio::spawn(async move {
            let (headers, _) = sign("github", &b, now());
            let mut req = proxy_http.post(format!("{base}{path}")).body(b);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    };
    answering.notified().await;
    // The first answer is still trickling back: the budget is free for the next sender.
    let b = body(2);
    let (headers, _) = sign("github", &b, now());
    let (status, answer) = proxy.post(&path, "", &headers, b).await;
    assert_eq!(status, 200, "{answer}");
    let (status, text) = first.await.unwrap();
    assert_eq!((status, text.len()), (200, 12));
}

/// A chunked body sent a byte per chunk costs the proxy its bytes, not a buffer per chunk: one
/// unsigned request of 512 KiB in 1-byte chunks (within `max_body` and the budget) must not grow
/// the process by tens of MiB (it did, about 64 bytes per chunk: a few 5 MiB ones would OOM-kill
/// a 256 Mi pod, its outbound delivery with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_one_byte_chunks_costs_its_bytes_not_a_buffer_per_chunk() {
    let app = Receiver::ok().await;
    let url = app.url.trim_end_matches("/hook").to_string();
    let proxy = start_proxy_with(app, &url, "").await;
    let before = peak_rss_mib(proxy.postern.pid());
    let path = path_of("github");
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Half a million chunks: a debug build on a loaded machine parses them well within the
    // route's read_timeout (3 s).
    let chunks = b"1\r\nx\r\n".repeat(1 << 19);
    s.write_all(&chunks).await.unwrap();
    s.write_all(b"0\r\n\r\n").await.unwrap();
    // Unsigned: refused once the body is in (or, on a machine too loaded to parse it within the
    // route's read_timeout, cut short: what is measured is the memory either way).
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(90), s.read(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(
        answer.starts_with("HTTP/1.1 401") || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let grown = peak_rss_mib(proxy.postern.pid()) - before;
    eprintln!("peak RSS grew by {grown:.1} MiB");
    assert!(
        grown < 16.0,
        "peak RSS grew by {grown:.1} MiB for a 512 KiB body"
    );
}

/// One route's senders cannot take the whole buffered-body budget: slow uploads to one route (a
/// provider's path anyone can reach, signature or not) hold at most half of it, so a signed
/// request to another route still gets through instead of 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_to_one_route_leave_room_for_the_others() {
    let app = Receiver::ok().await;
    let url = app.url.trim_end_matches("/hook").to_string();
    let extra = "max_body = \"1MiB\"\nmax_buffered = \"2MiB\"\n";
    let proxy = start_proxy_with(app, &url, extra).await;
    let github = path_of("github");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        let head = format!(
            "POST {github} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Hub-Signature-256: sha256={}\r\nContent-Length: {}\r\n\r\n",
            "0".repeat(64),
            1 << 20
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // All but the last KiB: the body never completes.
        let _ = s.write_all(&vec![b'x'; (1 << 20) - 1024]).await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = br#"{"id":"evt_1","type":"invoice.paid"}"#.to_vec();
    let (headers, _) = sign("stripe", &body, now());
    let (status, answer) = proxy.post(&path_of("stripe"), "", &headers, body).await;
    assert_eq!(status, 200, "{answer}");
    drop(held);
}

/// A request whose head already fails its route's checks (no signature header, a malformed one,
/// a timestamp outside the tolerance) is refused on its head: its body is never read, so senders
/// without a signature cannot hold the buffered-body budget while their bodies trickle in. A
/// `100-continue` sender is refused before it sends the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_head_fails_is_refused_before_its_body_is_read() {
    let app = Receiver::ok().await;
    let url = app.url.trim_end_matches("/hook").to_string();
    let proxy = start_proxy_with(app, &url, "").await;
    let stale = format!("t={},v1={}", now() - 3600, "0".repeat(64));
    for (path, header, expect, code) in [
        (path_of("github"), String::new(), "", "missing_header"),
        (
            path_of("github"),
            "X-Hub-Signature-256: md5=abc\r\n".to_string(),
            "",
            "malformed_header",
        ),
        (
            path_of("stripe"),
            format!("Stripe-Signature: {stale}\r\n"),
            "",
            "timestamp_out_of_tolerance",
        ),
        (
            path_of("github"),
            String::new(),
            "Expect: 100-continue\r\n",
            "missing_header",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        // The head only: the declared body never comes. Read before `inbound.read_timeout`
        // (3 s here) could end the wait with 408.
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{header}{expect}Content-Length: 100000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_millis(1500), async {
            while !String::from_utf8_lossy(&got).contains(code) {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            read.is_ok() && text.starts_with("HTTP/1.1 401") && text.contains(code),
            "{path} {header}{expect}: {text:?}"
        );
        assert!(!text.contains("100 Continue"), "{text}");
    }
    assert_eq!(proxy.upstream.count(), 0);
}
