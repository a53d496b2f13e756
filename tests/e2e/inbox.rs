//! The durable inbox: the real binary, real Postgres, a real app on 127.0.0.1 that goes away and
//! comes back, real signed provider requests.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::*;
use postern::signing;

const STRIPE_SECRET: &str = "whsec_inbox_stripe_test_secret";
const GITHUB_SECRET: &str = "inbox-github-test-secret";
const TOKEN: &str = "inbox-test-token-0123456789abcdef";

/// A Stripe event of about 1 KiB.
fn stripe_event(id: &str) -> Vec<u8> {
    json!({
        "id": id,
        "object": "event",
        "type": "charge.succeeded",
        "data": {"object": {"id": format!("ch_{id}"), "amount": 1000, "note": "x".repeat(850)}},
    })
    .to_string()
    .into_bytes()
}

fn stripe_headers(body: &[u8], ts: i64) -> Vec<(String, String)> {
    let t = ts.to_string();
    let mac = hex::encode(signing::hmac_sha256(
        STRIPE_SECRET.as_bytes(),
        &[t.as_bytes(), b".", body],
    ));
    vec![("stripe-signature".into(), format!("t={t},v1={mac}"))]
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Postern with the API, the admin listener and two inbox routes (`stripe` consumed as
/// `consume`, `github` forwarded), in front of the app at `app_port`.
struct Service {
    config: String,
    postern: Postern,
    inbound: String,
    api: String,
    admin: String,
    http: reqwest::Client,
}

fn config(
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

fn free_port() -> u16 {
    unused_port()
}

impl Service {
    async fn start(config: String) -> Self {
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

    async fn post(&self, path: &str, headers: &[(String, String)], body: Vec<u8>) -> (u16, Value) {
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

    async fn stripe(&self, id: &str) -> (u16, Value) {
        let body = stripe_event(id);
        self.post("/wh/stripe", &stripe_headers(&body, now()), body)
            .await
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
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
async fn send_many(
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
    let waiting = "SELECT count(*) FROM postern.inbox WHERE status = 'pending' AND attempts = 0";
    assert_eq!(scalar(&c, waiting).await, 500);
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(started.elapsed())).await;
    assert_eq!(scalar(&c, waiting).await, 500, "{}", s.postern.logs());

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
async fn a_provider_retry_is_stored_once_and_forged_or_stale_requests_never() {
    let db = TestDb::create().await;
    let app = Receiver::ok().await;
    let app_port: u16 = app
        .url
        .trim_end_matches("/hook")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (config, _) = config(&db, &db.url, app_port, "forward", "");
    let s = Service::start(config).await;

    // Stripe retries an event with a new timestamp and signature: the event id is the key.
    let body = stripe_event("evt_retried");
    let mut answers = Vec::new();
    for delay in [0, 1, 2] {
        let (st, v) = s
            .post(
                "/wh/stripe",
                &stripe_headers(&body, now() - delay),
                body.clone(),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        answers.push(v);
    }
    assert_eq!(answers[0]["duplicate"], false);
    assert_eq!(answers[1]["duplicate"], true);
    assert_eq!(answers[2]["duplicate"], true);
    assert_eq!(answers[0]["id"], answers[2]["id"]);
    // The same delivery ten times at once (several may share a commit): stored once.
    let body = stripe_event("evt_burst");
    let burst: Vec<(u16, Value)> = futures_util::stream::iter(0..10)
        .map(|_| {
            let body = body.clone();
            let s = &s;
            async move {
                s.post("/wh/stripe", &stripe_headers(&body, now()), body.clone())
                    .await
            }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    assert!(burst.iter().all(|(st, _)| *st == 200), "{burst:?}");
    assert_eq!(
        burst
            .iter()
            .filter(|(_, v)| v["duplicate"] == false)
            .count(),
        1,
        "{burst:?}"
    );
    let ids: HashSet<i64> = burst
        .iter()
        .map(|(_, v)| v["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{burst:?}");
    // GitHub redelivers with the same X-GitHub-Delivery.
    let gh_body = br#"{"action":"opened","number":7}"#.to_vec();
    let gh_sig = format!(
        "sha256={}",
        hex::encode(signing::hmac_sha256(GITHUB_SECRET.as_bytes(), &[&gh_body]))
    );
    for _ in 0..2 {
        let headers = vec![
            ("x-hub-signature-256".to_string(), gh_sig.clone()),
            (
                "x-github-delivery".to_string(),
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_string(),
            ),
        ];
        let (st, v) = s.post("/wh/github", &headers, gh_body.clone()).await;
        assert_eq!(st, 200, "{v}");
    }
    // Forged and stale requests are refused exactly as in forward mode, and never stored.
    let forged = stripe_event("evt_forged");
    let mut bad = stripe_headers(&forged, now());
    bad[0].1 = bad[0].1.replace("v1=", "v1=00");
    let (st, v) = s.post("/wh/stripe", &bad, forged).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("signature_mismatch")),
        "{v}"
    );
    let stale = stripe_event("evt_stale");
    let (st, v) = s
        .post("/wh/stripe", &stripe_headers(&stale, now() - 3600), stale)
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("timestamp_out_of_tolerance")),
        "{v}"
    );
    let (st, v) = s.post("/wh/github", &[], gh_body.clone()).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("missing_header")),
        "{v}"
    );

    let c = db.client().await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM postern.inbox").await, 3);
    app.wait_count(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.count(), 3, "a duplicate was forwarded");
    let gh = app
        .requests()
        .into_iter()
        .find(|r| r.uri == "/internal/github")
        .expect("github at its upstream_path");
    assert_eq!(gh.body.as_ref(), gh_body.as_slice());
    assert_eq!(gh.header("x-postern-verified"), Some("github"));

    // Retention prunes handled messages past `retention.inbox` and keeps the rest.
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.inbox WHERE status = 'done'",
        3,
        Duration::from_secs(10),
    )
    .await;
    c.execute(
        "UPDATE postern.inbox SET handled_at = now() - interval '2 days' WHERE route = 'stripe'",
        &[],
    )
    .await
    .unwrap();
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.inbox",
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(
        scalar(
            &c,
            "SELECT count(*) FROM postern.inbox WHERE route = 'github'"
        )
        .await,
        1
    );
    let metrics = reqwest::get(format!("{}/metrics", s.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("postern_inbox_duplicates_total{route=\"stripe\"} 11"),
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
    let app_port: u16 = app
        .url
        .trim_end_matches("/hook")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sql_consumers_take_a_thousand_messages_each_handled_once() {
    let db = TestDb::create().await;
    let c = db.client().await;
    // A role of the app's that may take messages and nothing else of Postern's.
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE postern_test_consumer LOGIN;
         EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE handled (inbox_id bigint PRIMARY KEY, event_id text NOT NULL UNIQUE);
         GRANT SELECT, INSERT ON handled TO postern_test_consumer;",
    )
    .await
    .unwrap();
    let app_port = free_port();
    let (config, _) = config(&db, &db.url, app_port, "sql", "");
    let config = config.replace(
        "pool_size = 4\n",
        "pool_size = 4\nconsumer_roles = [\"postern_test_consumer\"]\n",
    );
    let s = Service::start(config).await;
    let answers = send_many(&s, "q", 1000, 32).await;
    assert!(answers.iter().all(|(_, st, _)| *st == 200));

    let mut consumer_url = url::Url::parse(&db.url).unwrap();
    consumer_url.set_username("postern_test_consumer").unwrap();
    let consumer_url = consumer_url.to_string();
    let probe = connect(&consumer_url).await;
    let denied = probe.query("SELECT count(*) FROM postern.inbox", &[]).await;
    assert!(
        denied.is_err(),
        "a consumer role reads the inbox table directly"
    );

    let consumers: Vec<_> = (0..3)
        .map(|n| {
            let url = consumer_url.clone();
            tokio::spawn(async move {
                let mut client = connect(&url).await;
                let (mut committed, mut rolled_back, mut round) = (0usize, 0usize, 0usize);
                loop {
                    round += 1;
                    let tx = client.transaction().await.unwrap();
                    let rows = tx
                        .query(
                            "SELECT id, dedupe_key FROM postern.inbox_take('stripe', 10)",
                            &[],
                        )
                        .await
                        .unwrap();
                    if rows.is_empty() {
                        tx.rollback().await.unwrap();
                        break;
                    }
                    for r in &rows {
                        let (id, key): (i64, String) = (r.get(0), r.get(1));
                        tx.execute("INSERT INTO handled VALUES ($1, $2)", &[&id, &key])
                            .await
                            .unwrap();
                        let done: bool = tx
                            .query_one("SELECT postern.inbox_done($1)", &[&id])
                            .await
                            .unwrap()
                            .get(0);
                        assert!(done);
                    }
                    // The first consumer fails every third transaction: its messages go back.
                    if n == 0 && round % 3 == 0 {
                        tx.rollback().await.unwrap();
                        rolled_back += rows.len();
                    } else {
                        tx.commit().await.unwrap();
                        committed += rows.len();
                    }
                }
                (committed, rolled_back)
            })
        })
        .collect();
    let mut totals = Vec::new();
    for c in consumers {
        totals.push(c.await.unwrap());
    }
    let committed: usize = totals.iter().map(|t| t.0).sum();
    assert_eq!(committed, 1000, "{totals:?}");
    assert!(
        totals[0].1 > 0,
        "the failing consumer never rolled back: {totals:?}"
    );
    assert_eq!(
        scalar(&c, "SELECT count(DISTINCT inbox_id) FROM handled").await,
        1000
    );
    assert_eq!(
        scalar(
            &c,
            "SELECT count(*) FROM postern.inbox WHERE status = 'done'"
        )
        .await,
        1000
    );

    // Taken and committed without `inbox_done`: back after the timeout.
    let late = s.stripe("evt_late").await;
    assert_eq!(late.0, 200);
    let mut consumer = connect(&consumer_url).await;
    let taken = consumer
        .query(
            "SELECT id FROM postern.inbox_take('stripe', 10, interval '1 second')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    let again = consumer
        .query("SELECT id FROM postern.inbox_take('stripe', 10)", &[])
        .await
        .unwrap();
    assert!(
        again.is_empty(),
        "a taken message was taken again before its timeout"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tx = consumer.transaction().await.unwrap();
    let again = tx
        .query("SELECT id FROM postern.inbox_take('stripe', 10)", &[])
        .await
        .unwrap();
    assert_eq!(
        again.len(),
        1,
        "a message taken and abandoned did not come back"
    );
    tx.commit().await.unwrap();
    // A message the app cannot handle is set aside, not handed back first forever.
    let poison = s.stripe("evt_poison").await;
    assert_eq!(poison.0, 200);
    let tx = consumer.transaction().await.unwrap();
    let taken = tx
        .query(
            "SELECT id, attempts FROM postern.inbox_take('stripe', 10)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    let (id, attempt): (i64, i32) = (taken[0].get(0), taken[0].get(1));
    let stale: bool = tx
        .query_one(
            "SELECT postern.inbox_fail($1, 'cannot parse', $2)",
            &[&id, &(attempt - 1)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !stale,
        "a fenced call with an old attempt changed the message"
    );
    let failed: bool = tx
        .query_one(
            "SELECT postern.inbox_fail($1, 'cannot parse', $2)",
            &[&id, &attempt],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failed);
    tx.commit().await.unwrap();
    let left = consumer
        .query("SELECT id FROM postern.inbox_take('stripe', 10)", &[])
        .await
        .unwrap();
    assert!(left.is_empty(), "a failed message came back");
    assert_eq!(
        scalar(&c, &format!("SELECT count(*) FROM postern.inbox WHERE id = {id} AND status = 'failed' AND last_error = 'cannot parse'")).await,
        1
    );
    // A forward route's messages are not the consumers' to take.
    let gh_body = br#"{"zen":"Keep it logically awesome."}"#.to_vec();
    let gh_sig = format!(
        "sha256={}",
        hex::encode(signing::hmac_sha256(GITHUB_SECRET.as_bytes(), &[&gh_body]))
    );
    let headers = vec![
        ("x-hub-signature-256".to_string(), gh_sig),
        ("x-github-delivery".to_string(), "d-1".to_string()),
    ];
    assert_eq!(s.post("/wh/github", &headers, gh_body).await.0, 200);
    let stolen = consumer
        .query("SELECT id FROM postern.inbox_take('github', 10)", &[])
        .await
        .unwrap();
    assert!(
        stolen.is_empty(),
        "a consumer took a forward route's message"
    );
    // Nothing was forwarded: the app takes sql routes' messages itself.
    assert!(std::net::TcpStream::connect(("127.0.0.1", app_port)).is_err());
}
