//! The durable inbox's SQL consumers: several app connections take messages through the role
//! Postern grants, each message handled once; the real binary, real Postgres.

use std::time::Duration;

use super::inbox::{config, free_port, send_many, Service, GITHUB_SECRET};
use crate::common::*;
use postern::signing;

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

/// A route switched from forwarding to SQL consumers, with no forward route left, keeps every
/// message: the one the forwarder held when its replica died (once its lease lapses), and one an
/// old replica stored with the old setting after the new one started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_switched_to_sql_strands_no_message() {
    let db = TestDb::create().await;
    let app_port = free_port();
    // The app never answers in time: the forwarder holds the message when its replica dies.
    let _app = Receiver::start_at(app_port, |_, _| {
        Reply::status(200).after(Duration::from_secs(60))
    })
    .await;
    let (forwarding, _) = config(&db, &db.url, app_port, "forward", "");
    let mut s = Service::start(forwarding.clone()).await;
    assert_eq!(s.stripe("evt_held").await.0, 200);
    let c = db.client().await;
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.inbox WHERE status = 'delivering'",
        1,
        Duration::from_secs(10),
    )
    .await;
    s.postern.kill9();

    // Every route consumed by SQL now: this replica runs no forwarder.
    let sql_only = forwarding
        .replace("consume = \"forward\"", "consume = \"sql\"")
        .replace("upstream_path = \"/internal/github\"", "consume = \"sql\"");
    let s2 = Service::start(sql_only).await;
    // The dead replica's lease runs out.
    c.execute(
        "UPDATE postern.inbox SET lease_expires_at = now() - interval '1 second' WHERE status = 'delivering'",
        &[],
    )
    .await
    .unwrap();
    // An old replica, still up in a rolling update, stores a message as its config said.
    assert_eq!(s2.stripe("evt_old_pod").await.0, 200);
    c.execute(
        "UPDATE postern.inbox SET consume = 'forward' WHERE dedupe_key LIKE '%evt_old_pod%'",
        &[],
    )
    .await
    .unwrap();
    let mut taken = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while taken.len() < 2 && std::time::Instant::now() < deadline {
        for r in c
            .query(
                "SELECT dedupe_key FROM postern.inbox_take('stripe', 10)",
                &[],
            )
            .await
            .unwrap()
        {
            taken.push(r.get::<_, String>(0));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    taken.sort();
    assert_eq!(taken.len(), 2, "taken: {taken:?}; {}", s2.postern.logs());
    assert!(
        taken[0].contains("evt_held") && taken[1].contains("evt_old_pod"),
        "{taken:?}"
    );
}

/// Routes taken out of inbox mode (set back to `forward` mode, here both of them) leave their
/// stored messages behind: with no inbox route left, a replica still forwards the messages
/// stored for forwarding (and reaps their leases) rather than leaving them acknowledged and never
/// handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_left_by_routes_taken_out_of_inbox_mode_still_reach_the_app() {
    let db = TestDb::create().await;
    let app_port = free_port();
    // The app is down while the message is stored.
    let (inbox_config, _) = config(&db, &db.url, app_port, "forward", "");
    let s = Service::start(inbox_config.clone()).await;
    assert_eq!(s.stripe("evt_left").await.0, 200);
    drop(s);
    // The first replica may have died holding it (a claim in flight while the app was down):
    // that lease lapses now, and the upkeep, running with no inbox route, reaps it.
    db.client()
        .await
        .batch_execute(
            "UPDATE postern.inbox SET lease_expires_at = now() - interval '1 second'
             WHERE status = 'delivering'",
        )
        .await
        .unwrap();
    // Both routes back in forward mode; the app is up.
    let forward_only = inbox_config
        .replace("mode = \"inbox\"\n", "")
        .replace("consume = \"forward\"\n", "");
    assert!(!forward_only.contains("inbox\""), "{forward_only}");
    let app = Receiver::start_at(app_port, |_, _| Reply::status(200)).await;
    let _s = Service::start(forward_only).await;
    app.wait_for(Duration::from_secs(20), "the message stored before", |r| {
        r.iter().any(|m| {
            m.header("x-postern-inbox-id").is_some() && m.body.windows(8).any(|w| w == b"evt_left")
        })
    })
    .await;
    let c = db.client().await;
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.inbox WHERE status = 'done'",
        1,
        Duration::from_secs(10),
    )
    .await;
}
