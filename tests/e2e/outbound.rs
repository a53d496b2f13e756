//! Delivery scenarios: the real binary, a real Postgres, real receivers on 127.0.0.1.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;

use crate::common::*;

fn payload(n: usize) -> serde_json::Value {
    json!({"n": n, "nested": {"b": [1, 2, 3], "a": "x"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_events_reach_two_endpoints_exactly_once() {
    let db = TestDb::create().await;
    let a = Receiver::ok().await;
    let b = Receiver::ok().await;
    let config = base_config(&db)
        + &endpoint("a", &a.url, &["*"], "")
        + &endpoint("b", &b.url, &["order.*"], "");
    let _postern = Postern::start(&config).await;

    let mut client = db.client().await;
    let mut ids = publish_batch(&mut client, "order.created", 500, 0).await;
    for i in 500..1000 {
        ids.push(publish_one(&client, "order.paid", payload(i)).await);
    }
    a.wait_count(1000, Duration::from_secs(60)).await;
    b.wait_count(1000, Duration::from_secs(60)).await;
    // Give a duplicate time to show up.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let expected: HashMap<String, usize> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (id.to_string(), n))
        .collect();
    assert_eq!(expected.len(), 1000, "event ids are unique");
    for (name, receiver) in [("a", &a), ("b", &b)] {
        let requests = receiver.requests();
        assert_eq!(requests.len(), 1000, "endpoint {name} got duplicates");
        let mut seen = HashSet::new();
        for r in &requests {
            let id = r.event_id();
            assert!(seen.insert(id.clone()), "endpoint {name} got {id} twice");
            let n = *expected
                .get(&id)
                .unwrap_or_else(|| panic!("unknown event id {id}"));
            assert!(
                verify_independently(SECRET, r),
                "signature of {id} does not verify"
            );
            let body = r.json();
            assert_eq!(body["id"], json!(id));
            assert_eq!(
                body["type"],
                json!(if n < 500 {
                    "order.created"
                } else {
                    "order.paid"
                })
            );
            assert_eq!(body["data"], payload(n), "payload of event {n}");
            assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert!(r.header("user-agent").unwrap().starts_with("postern/"));
        }
    }
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered' AND attempts = 1",
        2000,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.attempts WHERE status_code = 200"
        )
        .await,
        2000
    );
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.outbox WHERE dispatched_at IS NULL"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn globs_tenants_and_targets_decide_who_gets_what() {
    let db = TestDb::create().await;
    let orders = Receiver::ok().await;
    let created = Receiver::ok().await;
    let all = Receiver::ok().await;
    let invoices = Receiver::ok().await;
    let config = base_config(&db)
        + &endpoint("orders", &orders.url, &["order.*"], "")
        + &endpoint("created", &created.url, &["*.created"], "tenant = \"acme\"")
        + &endpoint(
            "all",
            &all.url,
            &["order.*", "user.*", "invoice.*"],
            "tenant = \"*\"",
        )
        + &endpoint("invoices", &invoices.url, &["invoice.paid"], "");
    let _postern = Postern::start(&config).await;
    let client = db.client().await;

    let events: &[(&str, &str, Option<&str>, Option<&str>)] = &[
        ("e1", "order.created", None, None),
        ("e2", "order.item.added", None, None),
        ("e3", "user.created", Some("acme"), None),
        ("e4", "user.profile.created", Some("acme"), None),
        ("e5", "order.created", Some("acme"), None),
        ("e6", "invoice.paid", None, None),
        ("e7", "invoice.paid", Some("other"), None),
        ("e8", "order.created", None, Some("invoices")),
        ("e9", "nobody.listens", None, None),
    ];
    let mut label_of = HashMap::new();
    for (label, event_type, tenant, target) in events {
        let id: uuid::Uuid = client
            .query_one(
                "SELECT postern.publish($1, $2, tenant => $3, target_endpoint => $4)",
                &[event_type, &json!({"label": label}), tenant, target],
            )
            .await
            .unwrap()
            .get(0);
        label_of.insert(id.to_string(), *label);
    }
    let want: &[(&Receiver, &[&str])] = &[
        (&orders, &["e1", "e2"]),
        (&created, &["e3", "e5"]),
        (&all, &["e1", "e2", "e3", "e4", "e5", "e6", "e7"]),
        (&invoices, &["e6", "e8"]),
    ];
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.outbox WHERE dispatched_at IS NULL",
        0,
        Duration::from_secs(10),
    )
    .await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status <> 'delivered'",
        0,
        Duration::from_secs(10),
    )
    .await;
    for (receiver, labels) in want {
        receiver
            .wait_count(labels.len(), Duration::from_secs(10))
            .await;
        let mut got: Vec<&str> = receiver
            .requests()
            .iter()
            .map(|r| label_of[&r.event_id()])
            .collect();
        got.sort();
        assert_eq!(&got, labels);
    }
    // The unsubscribed event was dispatched with zero deliveries.
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.deliveries d JOIN postern.outbox o ON o.id = d.outbox_id WHERE o.event_type = 'nobody.listens'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.deliveries").await,
        13
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_and_every_attempt_recorded() {
    let db = TestDb::create().await;
    let flaky = Receiver::start(|n, _| Reply::status(if n < 2 { 500 } else { 200 })).await;
    let config = base_config(&db) + &endpoint("flaky", &flaky.url, &["*"], "");
    let _postern = Postern::start(&config).await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({"x": 1})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered' AND attempts = 3",
        1,
        Duration::from_secs(15),
    )
    .await;
    let rows = client
        .query(
            "SELECT attempt, status_code, error FROM postern.attempts ORDER BY attempt",
            &[],
        )
        .await
        .unwrap();
    let codes: Vec<(i32, Option<i32>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(codes, vec![(1, Some(500)), (2, Some(500)), (3, Some(200))]);
    assert_eq!(
        rows[0].get::<_, Option<String>>(2).as_deref(),
        Some("HTTP 500")
    );
    // The same webhook-id on every retry.
    let ids: HashSet<String> = flaky.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(flaky.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_postpones_the_next_attempt() {
    let db = TestDb::create().await;
    let limited = Receiver::start(|n, _| {
        if n == 0 {
            Reply::status(429).with_header("retry-after", "2")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let config = base_config(&db)
        + &endpoint(
            "limited",
            &limited.url,
            &["*"],
            "retry = { schedule = [\"200ms\", \"10s\"], jitter = 0.0 }",
        );
    let _postern = Postern::start(&config).await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    limited.wait_count(2, Duration::from_secs(15)).await;
    let r = limited.requests();
    let gap = r[1].at - r[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "second attempt after {gap:?}, Retry-After said 2s"
    );
    assert!(gap < Duration::from_secs(5), "second attempt after {gap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_and_pauses_its_deliveries_until_resumed() {
    let db = TestDb::create().await;
    let gone = Receiver::start(|n, _| Reply::status(if n == 0 { 410 } else { 200 })).await;
    let config = base_config(&db) + &endpoint("gone", &gone.url, &["*"], "");
    let _postern = Postern::start(&config).await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'paused'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let row = client
        .query_one(
            "SELECT active, disabled_reason FROM postern.endpoints WHERE id = 'gone'",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert!(row.get::<_, Option<String>>(1).unwrap().contains("410"));
    // New events for an inactive endpoint are kept, paused, not lost.
    publish_one(&client, "order.created", json!({})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'paused'",
        2,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(gone.count(), 1);

    // Re-activated, both paused deliveries go out.
    let pool = postern::db::pool(&db.url, 2, &postern::db::tls::unverified()).unwrap();
    let schema = postern::db::Schema::new("postern").unwrap();
    assert!(
        postern::endpoints::set_active(&pool, &schema, "gone", true, None)
            .await
            .unwrap()
    );
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        2,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(gone.count(), 3);
    let reason: Option<String> = client
        .query_one(
            "SELECT disabled_reason FROM postern.endpoints WHERE id = 'gone'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, None);
    assert!(
        !postern::endpoints::set_active(&pool, &schema, "no-such-endpoint", true, None)
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_succeeds_ends_failed() {
    let db = TestDb::create().await;
    let broken = Receiver::start(|_, _| Reply::status(500)).await;
    let config = base_config(&db) + &endpoint("broken", &broken.url, &["*"], "");
    let _postern = Postern::start(&config).await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'failed' AND attempts = 3",
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.attempts").await,
        3
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        broken.count(),
        3,
        "a failed delivery is not attempted again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssrf_guard_refuses_loopback_unless_allowed() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let config = (base_config(&db) + &endpoint("local", &receiver.url, &["*"], ""))
        .replace("allow_private_networks = [\"127.0.0.0/8\"]", "");
    let postern = Postern::start(&config).await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'failed'",
        1,
        Duration::from_secs(15),
    )
    .await;
    let errors: Vec<String> = client
        .query("SELECT error FROM postern.attempts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(errors.len(), 3);
    assert!(
        errors
            .iter()
            .all(|e| e.contains("SSRF guard") && e.contains("127.0.0.1")),
        "{errors:?}"
    );
    assert_eq!(receiver.count(), 0, "no packet may reach a refused address");
    drop(postern);

    // The same endpoint by name ("localhost" resolves to loopback): refused too.
    let by_name = receiver.url.replace("127.0.0.1", "localhost");
    let config = (base_config(&db) + &endpoint("local", &by_name, &["*"], "")).replace(
        "allow_private_networks = [\"127.0.0.0/8\"]",
        "allow_private_networks = [\"10.0.0.0/8\"]",
    );
    let _postern = Postern::start(&config).await;
    publish_one(&client, "order.created", json!({})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'failed'",
        2,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(receiver.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_refused_at_insert_and_the_limit_follows_the_config() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let config = |limit: &str| {
        base_config(&db).replace(
            "[outbound]\n",
            &format!("[outbound]\nmax_payload = \"{limit}\"\n"),
        ) + &endpoint("e", &receiver.url, &["*"], "")
    };
    let postern = Postern::start(&config("4KiB")).await;
    let client = db.client().await;
    // Refused inside the app's transaction, with the limit in the message.
    let big = json!({"blob": "x".repeat(3000)});
    let err = client
        .execute(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ('big.event', $1)",
            &[&json!({"blob": "x".repeat(5000)})],
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("payload_exceeds_outbound_max_payload_of_4096_bytes"),
        "{err:?}"
    );
    publish_one(&client, "fits.event", big.clone()).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    drop(postern);

    // A smaller limit follows the config at the next start. A row the table accepted before is
    // still delivered: the table is the gate, and nothing it let in is lost.
    client
        .execute(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ('big.event', $1)",
            &[&big],
        )
        .await
        .unwrap();
    let _postern = Postern::start(&config("1KiB")).await;
    assert!(client
        .execute(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ('big.event', $1)",
            &[&json!({"blob": "x".repeat(2000)})],
        )
        .await
        .is_err());
    publish_one(&client, "small.event", json!({"blob": "x"})).await;
    receiver.wait_count(3, Duration::from_secs(10)).await;
    let types: Vec<String> = receiver
        .requests()
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types.iter().filter(|t| *t == "big.event").count(), 1);
    assert_eq!(types.iter().filter(|t| *t == "small.event").count(), 1);
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.deliveries WHERE status = 'failed'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_signatures_and_custom_headers() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let config = base_config(&db)
        + &endpoint(
            "legacy",
            &receiver.url,
            &["*"],
            "signature = \"legacy\"\nheaders = { \"X-Api-Key\" = \"env:POSTERN_TEST_API_KEY\" }",
        )
        .replace(SECRET, "my-legacy-secret");
    let _postern = Postern::start_with_env(&config, &[("POSTERN_TEST_API_KEY", "k-123")]).await;
    let client = db.client().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    client
        .execute(
            "INSERT INTO postern.outbox (event_type, payload, metadata) VALUES ('order.created', '{\"a\": 1}', $1)",
            &[&json!({ "traceparent": traceparent })],
        )
        .await
        .unwrap();
    receiver.wait_count(1, Duration::from_secs(10)).await;
    let r = &receiver.requests()[0];
    assert_eq!(r.header("traceparent"), Some(traceparent));
    let ts = r.header("x-webhook-timestamp").unwrap();
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"my-legacy-secret").unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(&r.body);
    let want = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.header("x-webhook-signature"), Some(want.as_str()));
    // The request may arrive before the fan-out's commit is answered (issue 16): the row shows
    // up moments later.
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries",
        1,
        Duration::from_secs(5),
    )
    .await;
    let delivery_id: uuid::Uuid = client
        .query_one("SELECT id FROM postern.deliveries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        r.header("x-webhook-delivery-id"),
        Some(delivery_id.to_string().as_str())
    );
    assert_eq!(r.header("x-api-key"), Some("k-123"));
    assert!(r.header("webhook-signature").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_secret_signs_beside_the_old_one() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let config = base_config(&db) + &endpoint("e", &receiver.url, &["*"], "");
    drop(Postern::start(&config).await);
    let _postern = Postern::start(&config.replace(SECRET, SECRET_2)).await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    let r = &receiver.requests()[0];
    assert_eq!(r.header("webhook-signature").unwrap().split(' ').count(), 2);
    assert!(verify_independently(SECRET, r));
    assert!(verify_independently(SECRET_2, r));
}

/// The pipeline's sessions commit asynchronously, plan each statement for the table as it is and
/// use no bitmap scans; the API's pool keeps the server's defaults (durable commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_sessions_carry_their_settings_and_the_api_pool_does_not() {
    let db = TestDb::create().await;
    let tls = postern::db::tls::unverified();
    let setting = |pool: deadpool_postgres::Pool, name: &'static str| async move {
        let client = pool.get().await.unwrap();
        let row = client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap();
        row.get::<_, String>(0)
    };
    let pipeline = postern::db::pipeline_pool(&db.url, &tls).unwrap();
    assert_eq!(setting(pipeline.clone(), "synchronous_commit").await, "off");
    assert_eq!(
        setting(pipeline.clone(), "plan_cache_mode").await,
        "force_custom_plan"
    );
    assert_eq!(setting(pipeline.clone(), "enable_bitmapscan").await, "off");
    assert_eq!(
        setting(pipeline, "application_name").await,
        "postern-pipeline"
    );
    // Every session is bounded, so a frozen replica cannot hold locks for long.
    for pool in [
        postern::db::pipeline_pool(&db.url, &tls).unwrap(),
        postern::db::pool(&db.url, 2, &tls).unwrap(),
    ] {
        assert_eq!(setting(pool.clone(), "statement_timeout").await, "30s");
        assert_eq!(
            setting(pool, "idle_in_transaction_session_timeout").await,
            "1min"
        );
    }
    let api = postern::db::pool(&db.url, 2, &tls).unwrap();
    assert_eq!(setting(api.clone(), "synchronous_commit").await, "on");
    assert_eq!(setting(api.clone(), "plan_cache_mode").await, "auto");
    assert_eq!(setting(api, "enable_bitmapscan").await, "on");
}
