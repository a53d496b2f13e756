//! Issue 11, item 4: races and stuck rows. An endpoint that answers 410, or is paused, deleted or
//! re-tenanted while a replica holds its deliveries or fans events out, gets nothing more and
//! leaves nothing stuck; a dead pipeline task restarts the replica.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// The first 410 stops the replica at once: only requests already in flight follow it (at most
/// `per_endpoint_concurrency`), and everything it held goes back as `paused`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_first_410_only_requests_in_flight_follow() {
    let db = TestDb::create().await;
    let gone = Receiver::start(|_, _| Reply::status(410).after(Duration::from_millis(20))).await;
    let config = base_config(&db).replace(
        "allow_private_networks",
        "per_endpoint_concurrency = 4\nallow_private_networks",
    ) + &endpoint("gone", &gone.url, &["*"], "");
    let _postern = Postern::start(&config).await;
    let mut client = db.client().await;
    publish_batch(&mut client, "order.created", 300, 0).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'paused'",
        300,
        Duration::from_secs(15),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        gone.count() <= 4,
        "{} requests reached the endpoint after it answered 410",
        gone.count()
    );
}

/// A 410 on an endpoint with 50,000 waiting deliveries pauses them in batches, outside the
/// transaction that records outcomes: another endpoint's deliveries keep settling meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_with_a_huge_backlog_does_not_hold_up_other_outcomes() {
    let db = TestDb::create().await;
    let gone = Receiver::start(|_, _| Reply::status(410)).await;
    let healthy = Receiver::ok().await;
    let config = base_config(&db)
        + &endpoint("gone", &gone.url, &["gone.*"], "")
        + &endpoint("healthy", &healthy.url, &["healthy.*"], "");
    let _postern = Postern::start(&config).await;
    let mut client = db.client().await;
    // The backlog: waiting, not yet due.
    client
        .batch_execute(
            "INSERT INTO postern.deliveries (outbox_id, event_id, event_type, endpoint_id, status, next_attempt_at)
             SELECT 0, gen_random_uuid(), 'gone.x', 'gone', 'pending', now() + interval '1 hour'
             FROM generate_series(1, 50000)",
        )
        .await
        .unwrap();
    publish_batch(&mut client, "gone.x", 1, 0).await;
    gone.wait_count(1, Duration::from_secs(10)).await;
    publish_batch(&mut client, "healthy.x", 200, 0).await;
    healthy.wait_count(200, Duration::from_secs(10)).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'healthy' AND status = 'delivered'",
        200,
        Duration::from_secs(10),
    )
    .await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'gone' AND status = 'paused'",
        50001,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(gone.count(), 1);
}

async fn api_call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// Endpoints created and deleted through the API while events stream: no delivery is left
/// waiting for a deleted endpoint, and none reaches it after its deletion committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_deleted_during_a_stream_leave_nothing_waiting() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let api_port = dead_port().await;
    let config = base_config(&db)
        + &endpoint("steady", &receiver.url, &["*"], "")
        + &format!("\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n");
    let postern = Postern::start(&config).await;
    postern
        .wait_log("management API listening", Duration::from_secs(10))
        .await;
    let api = format!("http://127.0.0.1:{api_port}/api/v1");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let writer = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let client = connect(&url).await;
            for i in 0..400 {
                publish_one(&client, "order.created", json!({ "i": i })).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut deleted = Vec::new();
    while !writer.is_finished() {
        let (s, created) = api_call(
            &http,
            "POST",
            &format!("{api}/endpoints"),
            Some(json!({"url": receiver.url, "events": ["*"]})),
        )
        .await;
        assert_eq!(s, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let (s, _) = api_call(&http, "DELETE", &format!("{api}/endpoints/{id}"), None).await;
        assert_eq!(s, 204);
        deleted.push(id);
    }
    writer.await.unwrap();
    assert!(deleted.len() > 5);
    let client = db.client().await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE endpoint_id = 'steady' AND status = 'delivered'",
        400,
        Duration::from_secs(20),
    )
    .await;
    // Within a sweep or two, nothing is left waiting for a deleted endpoint.
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries d JOIN postern.endpoints e ON e.id = d.endpoint_id
         WHERE e.deleted_at IS NOT NULL AND d.status IN ('pending', 'paused', 'delivering')",
        0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.attempts a
             JOIN postern.deliveries d ON d.id = a.delivery_id
             JOIN postern.endpoints e ON e.id = d.endpoint_id
             WHERE e.deleted_at IS NOT NULL AND a.started_at > e.deleted_at + interval '100 milliseconds'"
        )
        .await,
        0,
        "an attempt started after its endpoint was deleted"
    );
}

/// Paused through the API while the replica holds its deliveries: at most the requests in flight
/// follow, the rest go back `paused`; re-tenanted: deliveries of events it may no longer see are
/// cancelled, not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_or_retenanting_through_the_api_stops_held_deliveries() {
    let db = TestDb::create().await;
    let slow = Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(300))).await;
    let api_port = dead_port().await;
    let config = base_config(&db).replace(
        "allow_private_networks",
        "per_endpoint_concurrency = 2\nallow_private_networks",
    ) + &format!("\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n");
    let postern = Postern::start(&config).await;
    postern
        .wait_log("management API listening", Duration::from_secs(10))
        .await;
    let api = format!("http://127.0.0.1:{api_port}/api/v1");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (_, created) = api_call(
        &http,
        "POST",
        &format!("{api}/endpoints"),
        Some(json!({"url": slow.url, "events": ["*"], "tenant": "acme"})),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let client = db.client().await;
    for i in 0..30 {
        client
            .execute(
                "INSERT INTO postern.outbox (event_type, payload, tenant) VALUES ('order.created', $1, 'acme')",
                &[&json!({ "i": i })],
            )
            .await
            .unwrap();
    }
    slow.wait_count(1, Duration::from_secs(10)).await;
    let (s, _) = api_call(
        &http,
        "PATCH",
        &format!("{api}/endpoints/{id}"),
        Some(json!({"active": false})),
    )
    .await;
    assert_eq!(s, 200);
    let at_pause = slow.count();
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status IN ('paused', 'delivered')",
        30,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        slow.count() <= at_pause + 2,
        "{} requests after the pause (in flight: at most 2)",
        slow.count() - at_pause
    );
    let paused = scalar(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'paused'",
    )
    .await;
    assert!(paused >= 20, "{paused}");

    // Re-tenanted and resumed: the paused deliveries of acme's events are cancelled, not sent.
    let before = slow.count();
    let (s, _) = api_call(
        &http,
        "PATCH",
        &format!("{api}/endpoints/{id}"),
        Some(json!({"tenant": "globex"})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = api_call(
        &http,
        "PATCH",
        &format!("{api}/endpoints/{id}"),
        Some(json!({"active": true})),
    )
    .await;
    assert_eq!(s, 200);
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'cancelled' AND last_error LIKE '%tenant changed%'",
        paused,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(slow.count(), before, "nothing went out for the old tenant");
}

/// A pipeline task that dies (here by an injected panic) makes the replica unready, and after a
/// short grace it exits non-zero so Kubernetes restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pipeline_task_makes_the_replica_unready_then_exit() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let admin_port = dead_port().await;
    let config = base_config(&db)
        + &endpoint("e", &receiver.url, &["*"], "")
        + &format!("\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n");
    let mut postern =
        Postern::start_with_env(&config, &[("POSTERN_TEST_FAIL_TASK", "dispatcher")]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        let resp = http
            .get(format!("http://127.0.0.1:{admin_port}/readyz"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        if status == 503 && body.contains("pipeline task") {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never unready for the task: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("injected failure"), "{body}");
    let status = postern.wait_exit(Duration::from_secs(15)).await;
    assert!(!status.success(), "{status:?}");
    assert!(postern.logs().contains("a pipeline task stopped"));
}

/// An attempt still in flight at the drain deadline may have reached its receiver: it is recorded
/// as an attempt with an unknown outcome and the delivery is due again, never handed back as if
/// no request had gone out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_short_at_shutdown_counts_with_an_unknown_outcome() {
    let db = TestDb::create().await;
    let hanging = Receiver::start(|_, _| Reply::status(200).after(Duration::from_secs(10))).await;
    let config = base_config(&db)
        .replace("shutdown_grace = \"8s\"", "shutdown_grace = \"3s\"")
        .replace("request_timeout = \"2s\"", "request_timeout = \"2500ms\"")
        + &endpoint("e", &hanging.url, &["*"], "");
    let mut postern = Postern::start(&config).await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    hanging.wait_count(1, Duration::from_secs(10)).await;
    postern.signal("TERM");
    postern.wait_exit(Duration::from_secs(10)).await;
    let row = client
        .query_one(
            "SELECT d.status, d.attempts, a.error FROM postern.deliveries d
             JOIN postern.attempts a ON a.delivery_id = d.id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert!(row.get::<_, String>(2).contains("outcome unknown"));
}

/// Issue 16: a fresh delivery's request starts while its fan-out's commit is still on the wire.
/// When that commit fails, the attempt's outcome is not written (its delivery does not exist),
/// nothing is lost (the event stays undispatched and is fanned out again) and the receiver gets
/// the event again under the same `webhook-id`; once fan-outs commit, it is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_beside_a_fan_out_that_fails_to_commit_loses_nothing() {
    let (db, receiver, postern) = one_endpoint().await;
    let client = db.client().await;
    // The deliveries' insert (the fan-out's second round trip) fails, slowly, while the flag
    // row exists: the request is on its way before the failure is known.
    refuse_writes(
        &client,
        "refuse_fan_out",
        "INSERT",
        "postern.deliveries",
        0.3,
        "fan-out refused by the test",
    )
    .await;
    publish_one(&client, "order.created", json!({ "n": 1 })).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    postern
        .wait_log("did not commit", Duration::from_secs(10))
        .await;
    assert_nothing_fanned_out(&client, 1).await;
    allow_writes(&client, "refuse_fan_out").await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let requests = receiver.requests();
    assert!(requests.len() >= 2, "{} requests", requests.len());
    let ids: std::collections::HashSet<String> = requests.iter().map(|r| r.event_id()).collect();
    assert_eq!(ids.len(), 1, "one event, one webhook-id: {ids:?}");
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.deliveries").await,
        1
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.attempts").await,
        1
    );
    assert_eq!(
        scalar(&client, "SELECT attempts::bigint FROM postern.deliveries").await,
        1
    );
}

/// Issue 16: fan-out passes keep the endpoints they read and read them again only when their
/// version moved. Changes made in SQL, behind the API's and the config's back, move it too: each
/// event after a change committed goes where the change says, never where the kept copy did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_changed_in_sql_are_seen_by_the_next_event() {
    let (db, first, _postern) = one_endpoint().await;
    let second = Receiver::ok().await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({ "n": 1 })).await;
    first.wait_count(1, Duration::from_secs(10)).await;

    // A new URL, set by a role that may change endpoints and nothing else (the version moves
    // all the same: its trigger runs as its owner).
    client
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE postern_test_endpoint_editor;
             EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT USAGE ON SCHEMA postern TO postern_test_endpoint_editor;
             GRANT SELECT, UPDATE ON postern.endpoints TO postern_test_endpoint_editor;
             SET ROLE postern_test_endpoint_editor",
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE postern.endpoints SET url = $1 WHERE id = 'e'",
            &[&second.url],
        )
        .await
        .unwrap();
    client.batch_execute("RESET ROLE").await.unwrap();
    publish_one(&client, "order.created", json!({ "n": 2 })).await;
    second.wait_count(1, Duration::from_secs(10)).await;
    assert_eq!(second.requests()[0].json()["data"]["n"], 2);

    // A secret added beside the config's: the next request carries both signatures.
    client
        .execute(
            "INSERT INTO postern.endpoint_secrets (endpoint_id, secret) VALUES ('e', $1)",
            &[&SECRET_2],
        )
        .await
        .unwrap();
    publish_one(&client, "order.created", json!({ "n": 3 })).await;
    second.wait_count(2, Duration::from_secs(10)).await;
    let third = &second.requests()[1];
    assert_eq!(third.json()["data"]["n"], 3);
    assert!(verify_independently(SECRET, third) && verify_independently(SECRET_2, third));

    // Deleted: the next event is fanned out to no one.
    client
        .execute(
            "UPDATE postern.endpoints SET deleted_at = now() WHERE id = 'e'",
            &[],
        )
        .await
        .unwrap();
    publish_one(&client, "order.created", json!({ "n": 4 })).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.outbox WHERE dispatched_at IS NULL",
        0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.deliveries").await,
        3
    );
    assert_eq!(first.count() + second.count(), 3);
}

/// A fan-out pass that waited for the fan-out lock (an endpoint change held it) leases its
/// deliveries from when it inserts them, not from when the pass began: the worker counts on the
/// whole lease, so the receiver's answer is recorded, not thrown away with the event sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_waited_for_the_fan_out_lock_keeps_its_whole_lease() {
    let db = TestDb::create().await;
    let slow = Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(1500))).await;
    let config = base_config(&db).replace(
        "request_timeout = \"2s\"\nlease = \"4s\"",
        "request_timeout = \"2s\"\nlease = \"3s\"",
    ) + &endpoint("slow", &slow.url, &["*"], "");
    let _postern = Postern::start(&config).await;
    // An endpoint change's lock, held for 2.5 s while an event is committed.
    let mut locker = db.client().await;
    let change = locker.transaction().await.unwrap();
    change
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('postern.fanout.postern'))",
            &[],
        )
        .await
        .unwrap();
    let client = db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    change.commit().await.unwrap();
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        1,
        Duration::from_secs(10),
    )
    .await;
    // Long enough for a lapsed lease to be reaped and the event sent again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(slow.count(), 1, "sent again after its lease lapsed");
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.attempts WHERE error LIKE 'lease expired%'"
        )
        .await,
        0
    );
}
