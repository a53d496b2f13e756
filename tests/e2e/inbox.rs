//! The durable inbox: the real binary, real Postgres, a real app on 127.0.0.1 that goes away and
//! comes back, real signed provider requests.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::*;
use postern::signing;

pub(super) const STRIPE_SECRET: &str = "whsec_inbox_stripe_test_secret";
pub(super) const GITHUB_SECRET: &str = "inbox-github-test-secret";
const TOKEN: &str = "inbox-test-token-0123456789abcdef";

/// A Stripe event of about 1 KiB.
pub(super) fn stripe_event(id: &str) -> Vec<u8> {
    json!({
        "id": id,
        "object": "event",
        "type": "charge.succeeded",
        "data": {"object": {"id": format!("ch_{id}"), "amount": 1000, "note": "x".repeat(850)}},
    })
    .to_string()
    .into_bytes()
}

pub(super) fn stripe_headers(body: &[u8], ts: i64) -> Vec<(String, String)> {
    let t = ts.to_string();
    let mac = hex::encode(signing::hmac_sha256(
        STRIPE_SECRET.as_bytes(),
        &[t.as_bytes(), b".", body],
    ));
    vec![("stripe-signature".into(), format!("t={t},v1={mac}"))]
}

pub(super) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Postern with the API, the admin listener and two inbox routes (`stripe` consumed as
/// `consume`, `github` forwarded), in front of the app at `app_port`.
pub(super) struct Service {
    config: String,
    pub(super) postern: Postern,
    inbound: String,
    api: String,
    pub(super) admin: String,
    http: reqwest::Client,
}

pub(super) fn config(
    db: &TestDb,
    database_url: &str,
    app_port: u16,
    consume: &str,
    extra: &str,
) -> (String, u16) {
    let inbound_port = unused_port();
    let (api_port, admin_port) = (free_port(), free_port());
    let base = base_config(db).replace(
        &format!("url = \"{}\"", db.url),
        &format!("url = \"{database_url}\""),
    );
    let config = format!(
        r#"{base}
inbox = "1d"
{extra}

[api]
listen = "127.0.0.1:{api_port}"
tokens = ["{TOKEN}"]

[admin]
listen = "127.0.0.1:{admin_port}"

[inbound]
listen = "127.0.0.1:{inbound_port}"
upstream = "http://127.0.0.1:{app_port}"
upstream_timeout = "2s"

[[inbound.routes]]
path = "/wh/stripe"
name = "stripe"
provider = "stripe"
secrets = ["{STRIPE_SECRET}"]
mode = "inbox"
consume = "{consume}"

[[inbound.routes]]
path = "/wh/github"
name = "github"
provider = "github"
secrets = ["{GITHUB_SECRET}"]
mode = "inbox"
upstream_path = "/internal/github"
"#
    );
    (config, inbound_port)
}

pub(super) fn free_port() -> u16 {
    unused_port()
}

impl Service {
    pub(super) async fn start(config: String) -> Self {
        let postern = Postern::spawn(&config, &[]);
        let find = |key: &str, section: &str| -> String {
            let at = config.find(section).unwrap();
            let line = config[at..]
                .lines()
                .find(|l| l.starts_with(key))
                .unwrap()
                .to_string();
            line.split('"').nth(1).unwrap().to_string()
        };
        let service = Self {
            inbound: format!("http://{}", find("listen", "[inbound]")),
            api: format!("http://{}/api/v1", find("listen", "[api]")),
            admin: format!("http://{}", find("listen", "[admin]")),
            config: config.clone(),
            postern,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        // Ready: the schema is migrated and the inbound listener accepts (before that, an inbox
        // route answers 503 and the provider retries).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ready = service
                .http
                .get(format!("{}/readyz", service.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never ready; log:\n{}",
                service.postern.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        service
    }

    pub(super) async fn post(
        &self,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.inbound)).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub(super) async fn stripe(&self, id: &str) -> (u16, Value) {
        let body = stripe_event(id);
        self.post("/wh/stripe", &stripe_headers(&body, now()), body)
            .await
    }

    pub(super) async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
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
}

/// Sends `n` Stripe events `evt_{prefix}{i}`, `concurrency` at a time; returns each answer.
pub(super) async fn send_many(
    s: &Service,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> Vec<(String, u16, Value)> {
    futures_util::stream::iter(0..n)
        .map(|i| async move {
            let id = format!("evt_{prefix}{i}");
            let (status, body) = s.stripe(&id).await;
            (id, status, body)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Event ids of the Stripe bodies an app received, with how often each came.
fn received_ids(app: &Receiver) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in app.requests() {
        *m.entry(r.json()["id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_down_for_20_s_gets_every_acknowledged_request_once_when_it_returns() {
    let db = TestDb::create().await;
    let app_port = free_port();
    let (config, _) = config(&db, &db.url, app_port, "forward", "");
    let s = Service::start(config).await;
    let started = Instant::now();

    let answers = send_many(&s, "", 500, 16).await;
    let mut inbox_ids = HashSet::new();
    for (id, status, body) in &answers {
        assert_eq!(*status, 200, "{id}: {body}");
        assert_eq!(body["received"], true, "{body}");
        assert_eq!(body["duplicate"], false, "{body}");
        inbox_ids.insert(body["id"].as_i64().unwrap());
    }
    assert_eq!(inbox_ids.len(), 500);
    let c = db.client().await;
    // While the app is down nothing is attempted: no attempt is counted, every message waits.
    // One message at a time probes the app, claimed (`delivering`, its attempt counted) until
    // the refused connection hands it back uncounted: a reading can fall inside that moment
    // (CI saw 499 once), so the count is read until every message is back. An attempt that
    // stayed counted would keep it below 500 for good.
    let waiting = "SELECT count(*) FROM postern.inbox WHERE status = 'pending' AND attempts = 0";
    wait_sql(&c, waiting, 500, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(started.elapsed())).await;
    wait_sql(&c, waiting, 500, Duration::from_secs(5)).await;
    let attempts = "SELECT count(*) FROM postern.inbox_attempts";
    assert_eq!(scalar(&c, attempts).await, 0, "{}", s.postern.logs());

    let app = Receiver::start_at(app_port, |_, _| Reply::status(200)).await;
    app.wait_count(500, Duration::from_secs(30)).await;
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.inbox WHERE status = 'done'",
        500,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = received_ids(&app);
    assert_eq!(app.count(), 500, "some message arrived twice");
    assert_eq!(got.len(), 500);
    assert!(answers.iter().all(|(id, _, _)| got.get(id) == Some(&1)));
    // What the app gets: the exact bytes, the verified mark, the inbox id it can dedupe on.
    let mut seen_ids = HashSet::new();
    for r in app.requests() {
        let id = r.json()["id"].as_str().unwrap().to_string();
        assert_eq!(r.body.as_ref(), stripe_event(&id).as_slice());
        assert_eq!(r.header("x-postern-verified"), Some("stripe"));
        assert!(r.header("stripe-signature").is_some());
        assert_eq!(r.uri, "/wh/stripe");
        seen_ids.insert(
            r.header("x-postern-inbox-id")
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
    }
    assert_eq!(seen_ids, inbox_ids);

    // The API: listing with cursors, one message with its attempts, stats, replay.
    let (st, page) = s
        .call("GET", "/inbox?route=stripe&status=done&limit=200", None)
        .await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["messages"].as_array().unwrap().len(), 200);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, next) = s
        .call(
            "GET",
            &format!("/inbox?route=stripe&status=done&limit=200&cursor={cursor}"),
            None,
        )
        .await;
    let first: HashSet<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert!(next["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| !first.contains(&m["id"].as_i64().unwrap())));
    let one = *inbox_ids.iter().next().unwrap();
    let (st, detail) = s.call("GET", &format!("/inbox/{one}"), None).await;
    assert_eq!(st, 200, "{detail}");
    assert_eq!(detail["status"], "done");
    assert_eq!(detail["provider"], "stripe");
    assert_eq!(detail["attempt_log"][0]["status_code"], 200, "{detail}");
    assert!(detail["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["name"] == "x-postern-verified" && h["value"] == "stripe"));
    let (st, stats) = s.call("GET", "/inbox/stats", None).await;
    assert_eq!(st, 200);
    let route = stats["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "stripe")
        .unwrap()
        .clone();
    assert_eq!(
        (
            route["received"].as_i64(),
            route["done"].as_i64(),
            route["pending"].as_i64()
        ),
        (Some(500), Some(500), Some(0)),
        "{stats}"
    );
    let (st, replayed) = s.call("POST", &format!("/inbox/{one}/replay"), None).await;
    assert_eq!(st, 202, "{replayed}");
    app.wait_count(501, Duration::from_secs(10)).await;
    let last = app.requests().last().unwrap().clone();
    assert_eq!(
        last.header("x-postern-inbox-id"),
        Some(one.to_string().as_str())
    );
    assert_eq!(s.call("GET", "/inbox/nope", None).await.0, 404);
    assert_eq!(s.call("GET", "/inbox?status=lost", None).await.0, 400);

    let metrics = reqwest::get(format!("{}/metrics", s.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("postern_inbox_accepted_total{route=\"stripe\"} 500"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("postern_inbox_forwards_total{route=\"stripe\",outcome=\"delivered\"} 501"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_after_acknowledging_loses_nothing_the_database_holds_it_all() {
    let db = TestDb::create().await;
    let app_port = free_port();
    let (config, _) = config(&db, &db.url, app_port, "forward", "");
    let mut s = Service::start(config.clone()).await;
    let answers = send_many(&s, "k", 100, 16).await;
    assert!(answers.iter().all(|(_, st, _)| *st == 200), "{answers:?}");
    s.postern.kill9();

    let app = Receiver::start_at(app_port, |_, _| Reply::status(200)).await;
    let s2 = Service::start(s.config.clone()).await;
    app.wait_count(100, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = received_ids(&app);
    assert_eq!(app.count(), 100, "{}", s2.postern.logs());
    assert!(answers.iter().all(|(id, _, _)| got.get(id) == Some(&1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_unreachable_the_route_answers_503_and_acknowledges_nothing_unstored() {
    let db = TestDb::create().await;
    let relay = TcpRelay::start(pg_target()).await;
    let app = Receiver::ok().await;
    let app_port = app.port();
    let (config, _) = config(&db, &relay.url_for(&db.url), app_port, "forward", "");
    let s = Service::start(config).await;
    let mut acknowledged = Vec::new();
    for (id, st, v) in send_many(&s, "before", 5, 5).await {
        assert_eq!(st, 200, "{v}");
        acknowledged.push(id);
    }

    relay.cut();
    let during = send_many(&s, "during", 10, 10).await;
    for (id, st, v) in &during {
        match st {
            503 => assert_eq!(v["error"], "inbox_unavailable", "{v}"),
            // Only a commit that made it before the cut can be acknowledged.
            200 => acknowledged.push(id.clone()),
            other => panic!("{id}: {other} {v}"),
        }
    }
    assert!(
        during.iter().filter(|(_, st, _)| *st == 503).count() >= 9,
        "{during:?}"
    );
    relay.restore();
    // Back: new requests are stored again (the provider's retries, here one per second).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = s.stripe("evt_after").await;
        if st == 200 {
            acknowledged.push("evt_after".into());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never stored again: {v}\n{}",
            s.postern.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let c = db.client().await;
    let stored: HashSet<String> = c
        .query("SELECT dedupe_key FROM postern.inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "{id} was acknowledged but not stored");
    }
    app.wait_for(Duration::from_secs(30), "every acknowledged request", |r| {
        let ids: HashSet<String> = r
            .iter()
            .map(|x| x.json()["id"].as_str().unwrap().to_string())
            .collect();
        acknowledged.iter().all(|a| ids.contains(a))
    })
    .await;
}

/// With the database stalled, a request answered 503 after the inbox wait still has its body
/// queued for the committers: the queue bounds the bytes it holds (`inbound.max_buffered`), so
/// a stall cannot pile bodies up in memory; and the proxy's own body budget is not what fills,
/// so a forward route, which needs no database, still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_queued_for_a_stalled_database_stay_within_the_buffered_budget() {
    let db = TestDb::create().await;
    let (_app, s) = small_budget_with_a_forward_route(&db).await;
    // The database stalls: every insert into the inbox waits.
    let mut holder = db.client().await;
    let stall = holder.transaction().await.unwrap();
    stall.batch_execute("LOCK postern.inbox").await.unwrap();
    let big = |id: &str| {
        let body = json!({"id": id, "object": "event", "note": "x".repeat(900 * 1024)})
            .to_string()
            .into_bytes();
        (stripe_headers(&body, now()), body)
    };
    // Four bodies of 900 KiB fill the queue's bound; each waits out the inbox wait and gets 503.
    let first = futures_util::future::join_all((0..4).map(|i| big_inbox_request(&s, i))).await;
    for (st, v) in &first {
        assert_eq!(
            (*st, v["error"].as_str()),
            (503, Some("inbox_unavailable")),
            "{v}"
        );
    }
    // A forward route does not wait for the database: a large body still goes to the app.
    let (st, v) = large_forward(&s).await;
    assert_eq!(st, 200, "{v}");
    // The inbox's bodies are still queued: the next one is refused at once, not queued beside
    // them.
    let (h, b) = big("evt_more");
    let started = Instant::now();
    let (st, v) = s.post("/wh/stripe", &h, b).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (503, Some("inbox_unavailable")),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Unstalled, the budget comes back.
    stall.rollback().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (h, b) = big("evt_after");
        let (st, v) = s.post("/wh/stripe", &h, b).await;
        if st == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never stored again: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// While inbox requests wait for a stalled database (up to the inbox wait), their bodies are
/// counted by the inbox queue's own bound, not the proxy's: a forward route's sender, who needs no
/// database, gets through meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_requests_waiting_for_a_stalled_database_keep_no_forward_route_out() {
    let db = TestDb::create().await;
    let (_app, s) = small_budget_with_a_forward_route(&db).await;
    let mut holder = db.client().await;
    let stall = holder.transaction().await.unwrap();
    stall.batch_execute("LOCK postern.inbox").await.unwrap();
    let waiting = futures_util::future::join_all((0..4).map(|i| big_inbox_request(&s, i)));
    let forward = async {
        // The four are read and waiting for their commit by now.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        large_forward(&s).await
    };
    let (first, (st, v)) = futures_util::future::join(waiting, forward).await;
    assert_eq!(st, 200, "the forward route was kept out: {v}");
    for (st, v) in &first {
        assert_eq!(
            (*st, v["error"].as_str()),
            (503, Some("inbox_unavailable")),
            "{v}"
        );
    }
    stall.rollback().await.unwrap();
}

/// An inbox service whose proxy buffers at most 4 MiB (bodies up to 1 MiB), with a forward
/// route `/wh/github-forward` beside the inbox routes, warmed up; and its app.
async fn small_budget_with_a_forward_route(db: &TestDb) -> (Receiver, Service) {
    let app = Receiver::ok().await;
    let app_port = app.port();
    let (config, _) = config(db, &db.url, app_port, "forward", "");
    let config = config.replace(
        "upstream_timeout = \"2s\"",
        "upstream_timeout = \"2s\"\nmax_body = \"1MiB\"\nmax_buffered = \"4MiB\"",
    ) + &format!(
        "\n[[inbound.routes]]\npath = \"/wh/github-forward\"\nname = \"github-forward\"\nprovider = \"github\"\nsecrets = [\"{GITHUB_SECRET}\"]\n"
    );
    let s = Service::start(config).await;
    assert_eq!(s.stripe("evt_warm").await.0, 200);
    (app, s)
}

/// A 900 KiB inbox request `i`, to the Stripe route when `i` is even and the GitHub one when odd:
/// tests that send several at once spread them over two routes, since one route's requests may
/// hold only half of the proxy's budget while their bodies arrive.
async fn big_inbox_request(s: &Service, i: usize) -> (u16, Value) {
    let body =
        json!({"id": format!("evt_big{i}"), "object": "event", "note": "x".repeat(900 * 1024)})
            .to_string()
            .into_bytes();
    if i % 2 == 0 {
        return s
            .post("/wh/stripe", &stripe_headers(&body, now()), body)
            .await;
    }
    let headers = github_headers(&body, &format!("d-big{i}"));
    s.post("/wh/github", &headers, body).await
}

/// A GitHub `ping` signed with the test secret, delivery id `delivery`.
fn github_headers(body: &[u8], delivery: &str) -> Vec<(String, String)> {
    let mac = hex::encode(signing::hmac_sha256(GITHUB_SECRET.as_bytes(), &[body]));
    vec![
        ("x-hub-signature-256".to_string(), format!("sha256={mac}")),
        ("x-github-event".to_string(), "ping".to_string()),
        ("x-github-delivery".to_string(), delivery.to_string()),
    ]
}

/// A signed 900 KiB request to the forward route.
async fn large_forward(s: &Service) -> (u16, Value) {
    let body = json!({"zen": "x".repeat(900 * 1024)})
        .to_string()
        .into_bytes();
    let headers = github_headers(&body, "d-1");
    s.post("/wh/github-forward", &headers, body).await
}
