//! Many bad receivers at once: endpoints that hang, or answer 2xx and then trickle the body, take
//! every request slot of a replica between them; another endpoint must still be sent to at once,
//! and an endpoint whose circuit opened gets nothing more than its probe.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// Four request slots, two per endpoint: two bad endpoints can take them all. A request timeout
/// far above what the assertions wait for.
fn narrow(db: &TestDb) -> String {
    base_config(db).replace(
        "request_timeout = \"2s\"\nlease = \"4s\"",
        "request_timeout = \"6s\"\nlease = \"20s\"\nconcurrency = 4\nper_endpoint_concurrency = 2",
    )
}

/// A receiver that answers `200` with a 100,000-byte body at once in its head, then sends that
/// body a byte every 500 ms.
async fn trickling_receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nx";
                if s.write_all(head).await.is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if s.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// The status is the outcome: once a 2xx head is in, the body gets a short while, not the rest
/// of the request timeout, so a receiver that trickles its body holds a slot for a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_whose_body_trickles_is_delivered_without_waiting_for_the_body() {
    let db = TestDb::create().await;
    let url = trickling_receiver().await;
    let config = narrow(&db) + &endpoint("trickle", &url, &["*"], "");
    let _postern = Postern::start(&config).await;
    let client = db.client().await;
    publish_one(&client, "order.created", serde_json::json!({})).await;
    let published = Instant::now();
    loop {
        let delivered = scalar(
            &client,
            "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        )
        .await;
        if delivered == 1 {
            break;
        }
        assert!(
            published.elapsed() < Duration::from_secs(5),
            "not delivered within 5 s (request_timeout is 6 s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = scalar(
        &client,
        "SELECT coalesce(max(duration_ms), -1)::bigint FROM postern.attempts",
    )
    .await;
    assert!(took < 3000, "the attempt took {took} ms");
    let kept = scalar(
        &client,
        "SELECT coalesce(max(length(response_excerpt)), -1)::bigint FROM postern.attempts",
    )
    .await;
    assert!(kept >= 1, "what arrived of the body is kept: {kept}");
}

/// Two endpoints that never answer hold every request slot of the replica (two each, for the
/// request timeout): a third endpoint's first request in flight takes a slot of the reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_that_hang_in_every_request_slot_leave_one_for_another() {
    let db = TestDb::create().await;
    let hanging = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(60))).await;
    let healthy = Receiver::ok().await;
    let config = narrow(&db)
        + &endpoint("hang1", &hanging.url, &["slow.*"], "")
        + &endpoint("hang2", &hanging.url, &["slow.*"], "")
        + &endpoint("healthy", &healthy.url, &["fast.*"], "");
    let _postern = Postern::start(&config).await;
    let mut client = db.client().await;
    publish_batch(&mut client, "slow.event", 10, 0).await;
    hanging.wait_count(4, Duration::from_secs(5)).await;
    publish_batch(&mut client, "fast.event", 6, 0).await;
    let published = Instant::now();
    healthy.wait_count(6, Duration::from_secs(8)).await;
    assert!(
        published.elapsed() < Duration::from_secs(3),
        "the healthy endpoint waited {:?} for a slot",
        published.elapsed()
    );
    assert_eq!(
        hanging.count(),
        4,
        "the hanging endpoints stay at their share"
    );
}

/// An open circuit gets its probe and nothing else: what a replica held for the endpoint when the
/// circuit opened goes back to the database instead of out, one request timeout after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_that_opens_sends_nothing_the_replica_held_for_it() {
    let db = TestDb::create().await;
    let hanging = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(60))).await;
    let config = base_config(&db).replace(
        "request_timeout = \"2s\"\nlease = \"4s\"",
        "request_timeout = \"1s\"\nlease = \"20s\"\nper_endpoint_concurrency = 2",
    ) + &endpoint(
        "down",
        &hanging.url,
        &["*"],
        "breaker = { failures = 2, probe_interval = \"60s\" }",
    );
    let _postern = Postern::start(&config).await;
    let mut client = db.client().await;
    publish_batch(&mut client, "order.created", 20, 0).await;
    // Open after the first two timeouts (about 1 s); without the revocation the replica's held
    // deliveries go out two by two, a second each.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let opened = scalar(
        &client,
        "SELECT count(*) FROM postern.outbox WHERE event_type = 'postern.endpoint.circuit_opened'",
    )
    .await;
    assert_eq!(opened, 1);
    assert!(
        hanging.count() <= 5,
        "{} requests reached the endpoint while its circuit was open",
        hanging.count()
    );
}
