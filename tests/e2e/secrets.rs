//! Endpoint secrets at rest: sealed with `database.encryption_key`, rotated by `postern migrate`,
//! purged past their expiry, and a value a replica cannot open defers its deliveries instead of
//! failing them. The real binary against a real Postgres.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

const KEY_A: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const KEY_B: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

fn with_keys(config: &str, db: &TestDb, current: &str, old: &[&str]) -> String {
    let old: Vec<String> = old.iter().map(|k| format!("{k:?}")).collect();
    config.replace(
        &format!("url = \"{}\"\n", db.url),
        &format!(
            "url = \"{}\"\nencryption_key = \"{current}\"\nencryption_keys = [{}]\n",
            db.url,
            old.join(", ")
        ),
    )
}

/// A secret this replica cannot open is its own fault, not the event's: the delivery is
/// deferred (pending, no attempt counted, the reason recorded), `/readyz` says why, and a
/// restart with the value still unreadable refuses to start, naming the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unopenable_secret_defers_deliveries_and_marks_the_replica_unready() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let admin_port = dead_port().await;
    let config = with_keys(&base_config(&db), &db, KEY_A, &[])
        + &endpoint("e", &receiver.url, &["*"], "")
        + &format!("\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n");
    let postern = Postern::start(&config).await;
    let client = db.client().await;
    publish_one(&client, "order.created", json!({})).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    // The stored secret is damaged behind Postern's back.
    damage_secrets(&client).await;
    publish_one(&client, "order.created", json!({})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries
         WHERE status = 'pending' AND attempts = 0 AND last_error LIKE '%cannot prepare deliveries to endpoint e%'",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(receiver.count(), 1);
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM postern.deliveries WHERE status = 'failed'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.attempts").await,
        1
    );
    let (status, body) = readyz(admin_port).await;
    assert_eq!(status, 503);
    assert!(body.contains("endpoint e"), "{body}");
    drop(postern);

    let mut again = Postern::spawn(&config, &[]);
    let status = again.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success());
    let logs = again.logs();
    assert!(logs.contains("cannot open endpoint e's secret"), "{logs}");
}

/// Rotating `database.encryption_key`: values carry the id of the key that sealed them; with the
/// old key listed in `encryption_keys`, `postern migrate` seals them again with the new key, after
/// which the new key alone delivers. Once a key is in use, plain text is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_encryption_key_rotates_and_plain_text_is_refused_once_a_key_is_in_use() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let plain = base_config(&db)
        + &endpoint(
            "e",
            &receiver.url,
            &["*"],
            "headers = { authorization = \"Bearer t0ken\" }",
        );
    let under_a = with_keys(&plain, &db, KEY_A, &[]);
    let rotating = with_keys(&plain, &db, KEY_B, &[KEY_A]);
    let under_b = with_keys(&plain, &db, KEY_B, &[]);
    let client = db.client().await;

    // Written in the clear first, then sealed under A at A's first start.
    drop(Postern::start(&plain).await);
    drop(Postern::start(&under_a).await);
    let (secret_a, header_a) = stored_values(&client).await;
    assert!(secret_a.starts_with("enc:v2:") && header_a.starts_with("enc:v2:"));
    assert!(!secret_a.contains("whsec") && !header_a.contains("t0ken"));

    // B alone cannot open A's values: refuses to start.
    let mut b_only = Postern::spawn(&under_b, &[]);
    assert!(!b_only.wait_exit(Duration::from_secs(20)).await.success());
    assert!(
        b_only.logs().contains("database.encryption_keys"),
        "{}",
        b_only.logs()
    );

    // migrate with B current and A listed re-seals every value with B.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.toml");
    std::fs::write(&path, &rotating).unwrap();
    let out = std::process::Command::new(binary())
        .args(["migrate", "--config"])
        .arg(&path)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (secret_b, header_b) = stored_values(&client).await;
    assert_ne!(
        secret_a.split(':').nth(2),
        secret_b.split(':').nth(2),
        "another key id"
    );
    assert_ne!(header_a, header_b);

    let _b = Postern::start(&under_b).await;
    publish_one(&client, "order.created", json!({})).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    let r = &receiver.requests()[0];
    assert!(verify_independently(SECRET, r));
    assert_eq!(r.header("authorization"), Some("Bearer t0ken"));

    // Sealed values are bound to their row: another endpoint's copy does not open.
    let moved = client
        .batch_execute(
            "INSERT INTO postern.endpoints (id, url, events, source) VALUES ('f', 'http://127.0.0.1:9/', '{x}', 'api');
             INSERT INTO postern.endpoint_secrets (endpoint_id, secret)
             SELECT 'f', secret FROM postern.endpoint_secrets WHERE endpoint_id = 'e'",
        )
        .await;
    assert!(moved.is_ok());
    let mut swapped = Postern::spawn(&under_b, &[]);
    assert!(!swapped.wait_exit(Duration::from_secs(20)).await.success());
    assert!(
        swapped.logs().contains("cannot open endpoint f's secret"),
        "{}",
        swapped.logs()
    );

    // No downgrade: a plain-text secret is refused by the table itself.
    let err = client
        .batch_execute(
            "INSERT INTO postern.endpoint_secrets (endpoint_id, secret) VALUES ('e', 'whsec_plain')",
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("sealed_only_database_encryption_key_in_use"),
        "{err:?}"
    );
    // Nor a value in the earlier format, which carries no key id and no binding to its row.
    let err = client
        .batch_execute(
            "INSERT INTO postern.endpoint_secrets (endpoint_id, secret) VALUES ('e', 'enc:v1:AAAA')",
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("sealed_only_database_encryption_key_in_use"),
        "{err:?}"
    );
}

/// Retention purges secrets past their expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_secrets_are_purged() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let config = base_config(&db) + &endpoint("e", &receiver.url, &["*"], "");
    let _postern = Postern::start(&config).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO postern.endpoint_secrets (endpoint_id, secret, expires_at)
             VALUES ('e', 'whsec_old', now() - interval '1 minute')",
        )
        .await
        .unwrap();
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.endpoint_secrets WHERE expires_at IS NOT NULL",
        0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.endpoint_secrets").await,
        1
    );
}

async fn stored_values(client: &tokio_postgres::Client) -> (String, String) {
    let row = client
        .query_one(
            "SELECT (SELECT secret FROM postern.endpoint_secrets), headers->>'authorization'
             FROM postern.endpoints WHERE id = 'e'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The fault an unopenable secret raises belongs to its endpoint and lasts only as long as the
/// cause: once the stored value opens again (repaired by hand here), the endpoint's next delivery
/// goes out and `/readyz` is 200 again, without a restart. One damaged row must not keep the pod
/// (a native sidecar's readiness is the pod's) out of its Services for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repaired_secret_clears_its_endpoints_fault_without_a_restart() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let admin_port = dead_port().await;
    let config = with_keys(&base_config(&db), &db, KEY_A, &[])
        + &endpoint("e", &receiver.url, &["*"], "")
        + &format!("\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n");
    let _postern = Postern::start(&config).await;
    let client = db.client().await;
    let ready_within = |limit: Duration| async move {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let (status, body) = readyz(admin_port).await;
            if status == 200 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "unready: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    publish_one(&client, "order.created", json!({})).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    ready_within(Duration::from_secs(10)).await;
    let good: String = client
        .query_one("SELECT secret FROM postern.endpoint_secrets", &[])
        .await
        .unwrap()
        .get(0);
    damage_secrets(&client).await;
    publish_one(&client, "order.created", json!({})).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'pending' AND attempts = 0",
        1,
        Duration::from_secs(10),
    )
    .await;
    let (status, body) = readyz(admin_port).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("endpoint e"), "{body}");

    // Repaired: the next event's delivery prepares, and the fault goes with its cause.
    client
        .execute("UPDATE postern.endpoint_secrets SET secret = $1", &[&good])
        .await
        .unwrap();
    publish_one(&client, "order.created", json!({})).await;
    receiver.wait_count(2, Duration::from_secs(10)).await;
    ready_within(Duration::from_secs(5)).await;
}

/// Damages every stored secret behind Postern's back: it no longer opens with any key.
async fn damage_secrets(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "UPDATE postern.endpoint_secrets
             SET secret = regexp_replace(secret, '.....$', 'AAAA=')",
        )
        .await
        .unwrap();
}

/// `/readyz` on the admin port: its status and body.
async fn readyz(admin_port: u16) -> (u16, String) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = http
        .get(format!("http://127.0.0.1:{admin_port}/readyz"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The fault an endpoint's unopenable secret raises also goes when the endpoint itself changes:
/// deleted, no delivery to it will ever prepare again to clear it, and the replica (with it the
/// pod, whose readiness a native sidecar's is) would stay out of its Services until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_endpoint_whose_secret_cannot_be_opened_clears_its_fault() {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let ops = crate::api::start_ops(db, None, "").await;
    let created = ops.create(&receiver.url, json!({})).await;
    let id = created["id"].as_str().unwrap().to_string();
    ops.wait_ready(200).await;
    let client = ops.db.client().await;
    damage_secrets(&client).await;
    publish_one(&client, "order.created", json!({})).await;
    let body = ops.wait_ready(503).await;
    assert!(body.contains(&format!("endpoint {id}")), "{body}");
    assert_eq!(receiver.count(), 0);

    let (status, _) = ops.call("DELETE", &format!("/endpoints/{id}"), None).await;
    assert_eq!(status, 204);
    ops.wait_ready(200).await;
}
