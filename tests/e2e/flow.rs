//! Flow policies across replicas: a rate limit, a receiver's back pressure, the circuit breaker
//! and disabling, with their operational events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::start_ops;
use crate::common::*;

/// Arrivals per 1-second bin, counted from the first arrival.
fn per_second_bins(requests: &[Received]) -> Vec<usize> {
    let Some(first) = requests.iter().map(|r| r.at).min() else {
        return Vec::new();
    };
    let mut bins = Vec::new();
    for r in requests {
        let i = (r.at - first).as_secs() as usize;
        if bins.len() <= i {
            bins.resize(i + 1, 0);
        }
        bins[i] += 1;
    }
    bins
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_across_two_replicas() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let config =
        base_config(&db) + &endpoint("limited", &receiver.url, &["*"], "rate_limit = \"20/s\"");
    let _a = Postern::start(&config).await;
    let _b = Postern::start(&config).await;
    let mut client = db.client().await;
    publish_batch(&mut client, "order.created", 400, 0).await;
    receiver.wait_count(400, Duration::from_secs(60)).await;
    let bins = per_second_bins(&receiver.requests());
    // The first second may hold the bucket's one second of burst on top of its rate.
    assert!(
        bins[1..].iter().all(|n| *n <= 22),
        "more than 22 receipts in a second: {bins:?}"
    );
    // 400 at 20/s take about 20 s: the limit is the endpoint's, not each replica's (which would
    // be about 10 s).
    assert!(
        bins.len() >= 18,
        "{} s for 400 at 20/s: {bins:?}",
        bins.len()
    );
    for w in bins.windows(10).skip(1) {
        assert!(w.iter().sum::<usize>() <= 220, "{bins:?}");
    }
    // Waiting for tokens is not an attempt.
    assert_eq!(
        scalar(
            &client,
            "SELECT max(attempts)::bigint FROM postern.deliveries"
        )
        .await,
        1
    );
    assert_eq!(receiver.by_event().len(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_with_retry_after_pauses_the_whole_endpoint() {
    let db = TestDb::create().await;
    // The 30th request is refused with Retry-After: 2; every other one is taken.
    let receiver = Receiver::start(|n, _| {
        if n == 29 {
            Reply::status(429).with_header("retry-after", "2")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let config = base_config(&db).replace(
        "schedule = [\"200ms\", \"200ms\"]",
        "schedule = [\"3s\", \"3s\"]",
    ) + &endpoint("pushy", &receiver.url, &["*"], "");
    let _a = Postern::start(&config).await;
    let _b = Postern::start(&config).await;
    let mut client = db.client().await;
    for i in 0..10 {
        publish_batch(&mut client, "order.created", 20, i * 20).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    receiver.wait_count(201, Duration::from_secs(60)).await;
    let requests = receiver.requests();
    let refused_at = requests[29].at;
    // Requests already in flight when the 429 went out may still land just after it.
    let during: Vec<Duration> = requests
        .iter()
        .filter(|r| r.at > refused_at + Duration::from_millis(150))
        .map(|r| r.at - refused_at)
        .filter(|d| *d < Duration::from_millis(1900))
        .collect();
    assert!(during.is_empty(), "requests during the pause: {during:?}");
    assert_eq!(receiver.by_event().len(), 200);
}

/// The data of the events of type `kind` among `requests`.
fn ops_events(requests: &[Received], kind: &str) -> Vec<serde_json::Value> {
    requests
        .iter()
        .map(|r| r.json())
        .filter(|v| v["type"] == kind)
        .map(|v| v["data"].clone())
        .collect()
}

async fn attempts(client: &tokio_postgres::Client) -> i64 {
    scalar(
        client,
        "SELECT COALESCE(sum(attempts), 0)::bigint FROM postern.deliveries WHERE endpoint_id = 'flaky'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_circuit_probes_then_closes_and_delivers_everything() {
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let receiver = Receiver::start(move |_, _| {
        if d.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let ops = Receiver::ok().await;
    let db = TestDb::create().await;
    let extra = endpoint(
        "flaky",
        &receiver.url,
        &["order.*"],
        // The default threshold, the rate rule out of the way; retries enough that no delivery
        // runs out of attempts while the receiver is down (the breaker is what holds them).
        &format!(
            "retry = {{ schedule = [{}] }}\n[endpoints.breaker]\nfailures = 20\nmin_attempts = 1000000\nprobe_interval = \"1s\"",
            ["\"200ms\""; 12].join(", ")
        ),
    ) + &endpoint("ops", &ops.url, &["postern.endpoint.*"], "");
    let service = start_ops(db, None, &extra).await;
    let mut client = service.db.client().await;
    publish_batch(&mut client, "order.created", 30, 0).await;
    // 20 consecutive failures open the circuit; the deliveries then wait without attempts.
    ops.wait_for(Duration::from_secs(30), "circuit_opened", |r| {
        !ops_events(r, "postern.endpoint.circuit_opened").is_empty()
    })
    .await;
    let opened = &ops_events(&ops.requests(), "postern.endpoint.circuit_opened")[0];
    assert_eq!(opened["endpoint_id"], "flaky");
    assert!(
        opened["consecutive_failures"].as_i64().unwrap() >= 20,
        "{opened}"
    );
    let (s, v) = service.call("GET", "/endpoints/flaky", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["circuit"]["state"], "open", "{v}");
    assert!(v["circuit"]["consecutive_failures"].as_i64().unwrap() >= 20);
    assert!(v["circuit"]["opened_at"].is_string());
    // Open: attempts barely grow (one probe a second), however many deliveries are due.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = attempts(&client).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grew = attempts(&client).await - before;
    assert!((1..=4).contains(&grew), "{grew} attempts in 3 s while open");
    // Back up: the next probe succeeds, the circuit closes and the backlog drains.
    down.store(false, Ordering::SeqCst);
    ops.wait_for(Duration::from_secs(20), "circuit_closed", |r| {
        !ops_events(r, "postern.endpoint.circuit_closed").is_empty()
    })
    .await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'flaky' AND status IN ('pending', 'delivering')",
        0,
        Duration::from_secs(20),
    )
    .await;
    let delivered = scalar(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'flaky' AND status = 'delivered'",
    )
    .await;
    assert_eq!(
        delivered, 30,
        "everything is delivered once the receiver is back"
    );
    let (_, v) = service.call("GET", "/endpoints/flaky", None).await;
    assert_eq!(v["circuit"]["state"], "closed", "{v}");
    let metrics = reqwest::get(format!("{}/metrics", service.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("postern_endpoint_circuit_open"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_open_past_disable_after_is_disabled_and_announced() {
    let receiver = Receiver::start(|_, _| Reply::status(500)).await;
    let ops = Receiver::ok().await;
    let db = TestDb::create().await;
    let extra = endpoint(
        "flaky",
        &receiver.url,
        &["order.*"],
        "[endpoints.breaker]\nfailures = 3\nmin_attempts = 1000000\nprobe_interval = \"1s\"\ndisable_after = \"3s\"",
    ) + &endpoint("ops", &ops.url, &["postern.endpoint.*"], "");
    let service = start_ops(db, None, &extra).await;
    let mut client = service.db.client().await;
    publish_batch(&mut client, "order.created", 10, 0).await;
    let started = Instant::now();
    ops.wait_for(Duration::from_secs(30), "disabled", |r| {
        !ops_events(r, "postern.endpoint.disabled").is_empty()
    })
    .await;
    assert!(started.elapsed() >= Duration::from_secs(3));
    let disabled = &ops_events(&ops.requests(), "postern.endpoint.disabled")[0];
    assert_eq!(disabled["endpoint_id"], "flaky");
    assert!(
        disabled["reason"]
            .as_str()
            .unwrap()
            .contains("disable_after"),
        "{disabled}"
    );
    let (_, v) = service.call("GET", "/endpoints/flaky", None).await;
    assert_eq!(v["active"], false, "{v}");
    assert!(
        v["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("circuit breaker"),
        "{v}"
    );
    // Nothing lost: what was waiting is paused, not failed or cancelled.
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'flaky' AND status IN ('pending', 'delivering')",
        0,
        Duration::from_secs(10),
    )
    .await;
    let paused = scalar(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'flaky' AND status = 'paused'",
    )
    .await;
    assert!(paused > 0, "nothing paused");
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'flaky' AND status = 'cancelled'").await,
        0
    );
}
