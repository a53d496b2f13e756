//! The API's answers where HTTP or the database, not a handler, would answer: a method a route
//! does not take, a body past the limit, a connection lost mid-request, a pool of two. Every one
//! is the documented status with the JSON error body.

use std::time::Duration;

use serde_json::{json, Value};

use crate::api::{start_ops, start_ops_with_env, TOKEN};
use crate::common::*;

async fn raw(method: &str, url: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .request(method.parse().unwrap(), url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text:?}"));
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_outside_the_handlers_are_json_with_the_documented_status() {
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops.create("http://127.0.0.1:9/x", json!({})).await;
    let id = created["id"].as_str().unwrap();
    let (s, v) = raw(
        "PUT",
        &format!("{}/endpoints/{id}", ops.api),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (405, Some("method_not_allowed")),
        "{v}"
    );
    // The same on the routes outside the token layer: the token question and the dashboard.
    let root = ops.api.trim_end_matches("/api/v1").to_string();
    for url in [format!("{}/auth", ops.api), format!("{root}/")] {
        let (s, v) = raw("POST", &url, Vec::new()).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (405, Some("method_not_allowed")),
            "{url}: {v}"
        );
    }
    // One endpoint's subscription list is bounded (every pass matches every event against it).
    let many: Vec<String> = (0..1001).map(|i| format!("t{i}.*")).collect();
    let (s, v) = ops
        .call(
            "POST",
            "/endpoints",
            Some(json!({"url": "http://127.0.0.1:9/y", "events": many})),
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("invalid_events")),
        "{v}"
    );
    let big = vec![b' '; 3 << 20];
    let (s, v) = raw(
        "POST",
        &format!("{}/endpoints/{id}/rotate-secret", ops.api),
        big,
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (413, Some("body_too_large")),
        "{v}"
    );
}

/// Waits until one backend matches `waiting` (a request blocked on the test's lock), then ends
/// it, as a failover or an operator's `pg_terminate_backend` would.
async fn terminate_the_waiting(db: &TestDb, waiting: &str) {
    let watcher = db.client().await;
    wait_sql(
        &watcher,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE {waiting}"),
        1,
        Duration::from_secs(10),
    )
    .await;
    watcher
        .execute(
            &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {waiting}"),
            &[],
        )
        .await
        .unwrap();
}

/// The API's list of endpoints, waiting for the lock the test holds.
const API_WAITING: &str = "wait_event_type = 'Lock' AND datname = current_database()
    AND query LIKE '%ORDER BY created_at, id LIMIT%'";

/// The API's connection to Postgres ends while a request waits on it (a failover, a restart, an
/// operator's `pg_terminate_backend`): 503, not 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_request_is_503() {
    let ops = start_ops(TestDb::create().await, None, "").await;
    let mut holder = ops.db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("LOCK postern.endpoints").await.unwrap();
    let url = format!("{}/endpoints", ops.api);
    let request = tokio::spawn(async move { raw("GET", &url, Vec::new()).await });
    terminate_the_waiting(&ops.db, API_WAITING).await;
    let (s, v) = request.await.unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (503, Some("database_unavailable")),
        "{v}"
    );
    tx.rollback().await.unwrap();
}

/// With `pool_size = 2` (the least allowed) the reads that run several statements side by side
/// still answer, and rotations show their new secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_answers_every_read_and_rotation() {
    let env = [("POSTERN__DATABASE__POOL_SIZE", "2")];
    let ops = start_ops_with_env(TestDb::create().await, None, "", &env).await;
    let (a, b) = (
        ops.create("http://127.0.0.1:9/a", json!({})).await,
        ops.create("http://127.0.0.1:9/b", json!({})).await,
    );
    let (s, v) = ops.call("GET", "/stats/timeseries?bucket=60", None).await;
    assert_eq!(s, 200, "{v}");
    let rotate = |id: String| {
        let api = ops.api.clone();
        async move {
            raw(
                "POST",
                &format!("{api}/endpoints/{id}/rotate-secret"),
                Vec::new(),
            )
            .await
        }
    };
    let ids = [&a, &b].map(|e| e["id"].as_str().unwrap().to_string());
    let (ra, rb) = tokio::join!(rotate(ids[0].clone()), rotate(ids[1].clone()));
    for (s, v) in [ra, rb] {
        assert_eq!(s, 200, "{v}");
        assert!(
            v["secret"]
                .as_str()
                .is_some_and(|s| s.starts_with("whsec_")),
            "{v}"
        );
    }
}

/// Without a token, the loopback API answers only this machine's own callers: not a page the
/// operator's browser visits (a foreign `Origin`), not a DNS-rebound name (a foreign `Host`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_without_a_token_refuses_foreign_pages_and_hosts() {
    let db = TestDb::create().await;
    let port = dead_port().await;
    let config = base_config(&db) + &format!("\n[api]\nlisten = \"127.0.0.1:{port}\"\n");
    let postern = Postern::start(&config).await;
    postern
        .wait_log("management API listening", Duration::from_secs(10))
        .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{port}/api/v1/endpoints");
    let call = |headers: Vec<(&'static str, String)>| {
        let mut req = http.get(&url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null);
            (status, v)
        }
    };
    assert_eq!(call(vec![]).await.0, 200);
    let same = format!("http://127.0.0.1:{port}");
    assert_eq!(call(vec![("origin", same)]).await.0, 200);
    for host in ["localhost.", "LOCALHOST", "[::ffff:127.0.0.1]"] {
        let header = vec![("host", format!("{host}:{port}"))];
        assert_eq!(call(header).await.0, 200, "{host}");
    }
    for headers in [
        vec![("origin", "https://evil.example".to_string())],
        vec![("host", format!("evil.example:{port}"))],
        vec![("origin", "null".to_string())],
    ] {
        let (s, v) = call(headers.clone()).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (403, Some("forbidden")),
            "{headers:?}: {v}"
        );
    }
}

/// `POST /events` takes any payload the outbox does: with `outbound.max_payload` above the API's
/// usual 2 MiB, a larger event is published, not refused as too large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_as_large_as_max_payload_can_be_published_through_the_api() {
    let env = [("POSTERN__OUTBOUND__MAX_PAYLOAD", "3MiB")];
    let ops = start_ops_with_env(TestDb::create().await, None, "", &env).await;
    let big = "x".repeat(2_500_000);
    let (s, v) = ops
        .call(
            "POST",
            "/events",
            Some(json!({"type": "big.one", "data": {"s": big}})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    // Past it, the API refuses with its own error, before the database would.
    let bigger = "x".repeat(3_300_000);
    let (s, v) = ops
        .call(
            "POST",
            "/events",
            Some(json!({"type": "big.one", "data": {"s": bigger}})),
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (413, Some("body_too_large")),
        "{v}"
    );
}

/// Database failures inside a larger operation (a PATCH, a replay) get the statuses every other
/// route gives them, not 500: a value Postgres cannot hold is 400 `bad_request` (the earliest
/// date it has, less the microsecond the replay subtracts), a connection lost mid-request 503
/// `database_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_failures_inside_an_operation_get_the_documented_status() {
    let receiver = Receiver::ok().await;
    let ops = start_ops(TestDb::create().await, None, "").await;
    let created = ops.create(&receiver.url, json!({})).await;
    let id = created["id"].as_str().unwrap().to_string();
    let (s, v) = ops
        .call(
            "POST",
            &format!("/endpoints/{id}/replay"),
            Some(json!({ "since": "-4713-11-24T00:00:00Z" })),
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");

    let mut holder = ops.db.client().await;
    let tx = holder.transaction().await.unwrap();
    // The endpoint's row held: only the PATCH waits for it.
    tx.batch_execute(&format!(
        "SELECT 1 FROM postern.endpoints WHERE id = '{id}' FOR UPDATE"
    ))
    .await
    .unwrap();
    let waiting = "wait_event_type = 'Lock' AND datname = current_database()";
    let url = format!("{}/endpoints/{id}", ops.api);
    let request = tokio::spawn(async move {
        raw(
            "PATCH",
            &url,
            json!({ "description": "x" }).to_string().into_bytes(),
        )
        .await
    });
    terminate_the_waiting(&ops.db, waiting).await;
    let (s, v) = request.await.unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (503, Some("database_unavailable")),
        "{v}"
    );
    tx.rollback().await.unwrap();
}

/// A connection whose request head never finishes is closed, on the API port and the admin port
/// alike: without a bound, anyone who can reach them could hold connections (and the process's
/// file descriptors, which outbound delivery shares) for as long as they like.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_finishes_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ops = start_ops(TestDb::create().await, None, "").await;
    for base in [ops.api.trim_end_matches("/api/v1"), ops.admin.as_str()] {
        let addr = base.trim_start_matches("http://").to_string();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /api/v1/endpoints HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = vec![0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{addr}: still open after 20 s");
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "{addr}: cut too soon"
        );
    }
}
