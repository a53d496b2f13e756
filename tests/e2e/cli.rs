//! The command line: check-config, migrate, and the app-facing SQL contract it installs.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use crate::common::*;

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("postern.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn postern(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn check_config_prints_the_effective_config_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            r#"
            [database]
            url = "postgres://app:db-password@127.0.0.1:5432/app"
            [[endpoints]]
            id = "billing"
            url = "https://example.com/hooks"
            events = ["order.*"]
            secret = "env:BILLING_SECRET"
            headers = {{ "x-api-key" = "file:{}" }}
            "#,
            dir.path().join("api-key").display()
        ),
    );
    std::fs::write(dir.path().join("api-key"), "api-key-value\n").unwrap();
    let out = postern(
        &["check-config", "--config", path.to_str().unwrap()],
        &[
            ("BILLING_SECRET", SECRET),
            ("POSTERN__OUTBOUND__CONCURRENCY", "64"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("concurrency = 64"),
        "env layer applies:\n{stdout}"
    );
    assert!(stdout.contains("secret = \"<redacted>\""), "{stdout}");
    assert!(stdout.contains("x-api-key = \"<redacted>\""), "{stdout}");
    assert!(
        stdout.contains("postgres://app:<redacted>@127.0.0.1:5432/app"),
        "{stdout}"
    );
    for secret in [SECRET, "api-key-value", "db-password"] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }
    // The output is itself a valid config.
    let reparsed: toml::Value = toml::from_str(&stdout).unwrap();
    assert_eq!(reparsed["shutdown_grace"].as_str(), Some("25s"));
}

#[test]
fn check_config_names_every_bad_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            r#"
            shutdown_grace = "soon"
            [database]
            url = "postgres://127.0.0.1/app"
            [[endpoints]]
            id = "ok"
            url = "https://example.com/a"
            events = ["a.b"]
            secret = "{SECRET}"
            "#
        ),
    );
    let out = postern(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("shutdown_grace: "), "{stderr}");

    let path = write_config(
        &dir,
        &format!(
            r#"
            [database]
            url = "postgres://127.0.0.1/app"
            [outbound]
            notify = "throttled"
            concurrency = 0
            [[endpoints]]
            id = "ok"
            url = "https://example.com/a"
            events = ["a.b"]
            secret = "{SECRET}"
            [[endpoints]]
            id = "bad"
            url = "not a url"
            events = []
            secret = "no-prefix"
            "#
        ),
    );
    let out = postern(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    for key in [
        "outbound.concurrency:",
        "endpoints[1].url:",
        "endpoints[1].events:",
        "endpoints[1].secret:",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(key)),
            "no line for {key}:\n{stderr}"
        );
    }
    assert!(!stderr.contains("endpoints[0]"), "{stderr}");

    let path = write_config(
        &dir,
        "[database]\nurl = \"postgres://127.0.0.1/app\"\nschema_name = \"x\"\n",
    );
    let out = postern(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.schema_name: unknown key"));
}

#[test]
fn database_url_falls_back_to_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "");
    let out = postern(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.url: not set"));
    let out = postern(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("DATABASE_URL", "postgres://x@127.0.0.1/y")],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("postgres://x@127.0.0.1/y"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            "[database]\nurl = \"{}\"\npublisher_roles = [\"postern_test_app\"]\n",
            db.url
        ),
    );
    let client = db.client().await;
    client
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE postern_test_app; EXCEPTION WHEN duplicate_object THEN NULL; END $$;",
        )
        .await
        .unwrap();
    let path_s = path.to_str().unwrap().to_string();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let p = path_s.clone();
            std::thread::spawn(move || postern(&["migrate", "--config", &p], &[]))
        })
        .collect();
    for r in runs {
        let out = r.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM postern.schema_migrations").await,
        postern::db::SCHEMA_VERSION as i64
    );
    let out = postern(&["migrate", "--config", &path_s], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));

    // The publisher role can publish, and nothing more.
    client
        .batch_execute("SET ROLE postern_test_app")
        .await
        .unwrap();
    let id: uuid::Uuid = client
        .query_one(
            "SELECT postern.publish('order.created', '{\"id\": 42}'::jsonb)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "INSERT INTO postern.outbox (event_type, payload, tenant, ordering_key) VALUES ('order.paid', '{\"id\": 42}', 'acme', 'order-42')",
            &[],
        )
        .await
        .unwrap();
    // Issue 12: the trigger (installed by migrate) ran for this role; and it can set only the
    // columns an event is made of, not the ones Postern keeps.
    for sql in [
        "INSERT INTO postern.outbox (event_type, payload, dispatched_at) VALUES ('x.y', '{}', now())",
        "INSERT INTO postern.outbox (event_type, payload, created_at) VALUES ('x.y', '{}', now() - interval '1 day')",
        "INSERT INTO postern.outbox (id, event_type, payload) OVERRIDING SYSTEM VALUE VALUES (1, 'x.y', '{}')",
    ] {
        let err = client.execute(sql, &[]).await.unwrap_err();
        assert!(format!("{err:?}").contains("permission denied"), "{sql}: {err:?}");
    }
    client
        .execute(
            "INSERT INTO postern.outbox (event_id, event_type, payload, metadata, target_endpoint)
             VALUES (gen_random_uuid(), 'x.y', '{}', '{\"traceparent\": \"00-1-2-01\"}', 'e')",
            &[],
        )
        .await
        .unwrap();
    assert!(client
        .query("SELECT * FROM postern.deliveries", &[])
        .await
        .is_err());
    assert!(client
        .query("SELECT payload FROM postern.outbox", &[])
        .await
        .is_err());
    client.batch_execute("RESET ROLE").await.unwrap();
    assert_eq!(
        scalar(
            &client,
            &format!("SELECT count(*) FROM postern.outbox WHERE event_id = '{id}'")
        )
        .await,
        1
    );
    // A bad event type is refused by the table itself.
    assert!(client
        .execute(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ('bad..type', '{}')",
            &[]
        )
        .await
        .is_err());
    client
        .batch_execute("DROP OWNED BY postern_test_app")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_sets_the_notify_mode_and_a_differing_replica_warns() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    migrate(
        &dir,
        &format!(
            "[database]\nurl = \"{}\"\n[outbound]\nnotify = \"statement\"\n",
            db.url
        ),
    );
    let client = db.client().await;
    let setting = notify_setting(&client).await;
    assert!(setting.starts_with("statement:"), "{setting}");

    // A replica configured for `throttled` keeps the installed mode and says so.
    let receiver = Receiver::ok().await;
    let config = base_config(&db) + &endpoint("e", &receiver.url, &["*"], "");
    let postern = Postern::start(&config).await;
    postern
        .wait_log("differs from the trigger installed", Duration::from_secs(5))
        .await;
    let setting = notify_setting(&client).await;
    assert!(setting.starts_with("statement:"));
    publish_one(&client, "order.created", json!({})).await;
    receiver.wait_count(1, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_at_startup_is_waited_for() {
    let port = dead_port().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[database]\nurl = \"postgres://postgres@127.0.0.1:{port}/postgres\"\n");
    let path = write_config(&dir, &config);
    let mut child = Command::new(binary())
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "postern gave up instead of waiting for the database"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("database unreachable; retrying"),
        "{stderr}"
    );
}

#[test]
fn the_reference_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/postern.toml");
    let out = postern(
        &["check-config", "--config", path],
        &[
            ("DATABASE_URL", "postgres://app:pw@127.0.0.1:5432/app"),
            ("BILLING_WEBHOOK_SECRET", SECRET),
            ("BILLING_API_KEY", "key"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_stripe"),
            ("GITHUB_WEBHOOK_SECRET", "gh-secret-value"),
            ("ACME_WEBHOOK_SECRET", "acme-secret-value"),
            (
                "POSTERN_ENCRYPTION_KEY",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            ),
            ("POSTERN_API_TOKEN", "api-token-value-0123456789"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("id = \"billing\""), "{stdout}");
    assert!(stdout.contains("provider = \"stripe\""), "{stdout}");
    for secret in [
        "whsec_stripe",
        "gh-secret-value",
        "acme-secret-value",
        "MDEyMzQ1Njc4",
        "api-token-value",
    ] {
        assert!(!stdout.contains(secret), "{secret} leaked");
    }
}

#[test]
fn demo_delivers_and_shows_the_proxy_refusing_a_forgery() {
    let schema = format!("postern_demo_{}", uuid::Uuid::new_v4().simple());
    let out = postern(
        &["demo", "--events", "20", "--schema", &schema],
        &[("DATABASE_URL", &base_url())],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("delivered "))
        .expect("a summary line");
    assert!(
        summary.contains("delivered 20/20 events, 20 signatures verified"),
        "{summary}"
    );
    assert!(
        summary.contains("commit-to-receipt latency p50"),
        "{summary}"
    );
    assert!(
        stdout.contains("a forged one was refused (401 signature_mismatch)"),
        "{stdout}"
    );
}

#[test]
fn inbound_config_problems_name_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
        [database]
        url = "postgres://127.0.0.1/app"
        [inbound]
        upstream = "http://127.0.0.1:8080"
        [[inbound.routes]]
        path = "/webhooks/square"
        provider = "square"
        secrets = ["s"]
        [[inbound.routes]]
        path = "/webhooks/x"
        provider = "mystery"
        secrets = []
        "#,
    );
    let out = postern(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("inbound.routes[0].notification_url: required"),
        "{stderr}"
    );
    assert!(
        stderr.contains("inbound.routes[1].secrets: at least one secret"),
        "{stderr}"
    );

    let path = write_config(
        &dir,
        "[database]\nurl = \"postgres://127.0.0.1/app\"\n[inbound]\n[[inbound.routes]]\npath = \"/a\"\nprovider = \"github\"\nsecrets = [\"s\"]\nallow_ips = [\"10.0.0.0/33\"]\n",
    );
    let out = postern(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("inbound.routes[0].allow_ips"),
        "{stderr}"
    );
}

/// Writes `config` and runs `postern migrate` with it, which must succeed.
fn migrate(dir: &tempfile::TempDir, config: &str) {
    let path = write_config(dir, config);
    let out = postern(&["migrate", "--config", path.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The notify setting `migrate` (or a starting replica) recorded.
async fn notify_setting(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "SELECT value FROM postern.settings WHERE key = 'notify'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Notifications on `postern_outbox` received by a plain client, counted as they arrive.
async fn count_notifications(url: &str) -> (tokio_postgres::Client, Arc<AtomicUsize>) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = message {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    client.batch_execute("LISTEN postern_outbox").await.unwrap();
    (client, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throttled_trigger_announces_sparse_commits_throttles_dense_ones_and_upgrades_replace_an_old_one(
) {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\nurl = \"{}\"\n[outbound]\nnotify = \"throttled\"\nnotify_throttle = \"400ms\"\n",
        db.url
    );
    migrate(&dir, &config);
    let client = db.client().await;
    let (_listener, notifications) = count_notifications(&db.url).await;
    // Waits for at least `n` notifications, then a little longer for any extra one.
    let settle = |n: usize| {
        let notifications = notifications.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while notifications.load(Ordering::SeqCst) < n && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            notifications.load(Ordering::SeqCst)
        }
    };

    // Sparse commits (further apart than 0.5 ms on average since the previous wake-up) are each
    // announced at once.
    for i in 0..3 {
        publish_one(&client, "order.created", json!({ "i": i })).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(settle(3).await, 3);
    // A dense stream (1,000-row statements back to back, far more than one event per 0.5 ms, and
    // the first alone more than the 0.5 s since the last wake-up allows) is throttled: its first
    // wake-up closes the 400 ms window and the statements inside it are not announced; one more
    // if the stream straddles a window's edge, never one per statement.
    let dense = std::time::Instant::now();
    for _ in 0..10 {
        client
            .batch_execute(
                "INSERT INTO postern.outbox (event_type, payload)
                 SELECT 'order.created', '{}' FROM generate_series(1, 1000)",
            )
            .await
            .unwrap();
    }
    assert!(
        dense.elapsed() < Duration::from_millis(300),
        "the statements took {:?}, not one window",
        dense.elapsed()
    );
    let after_dense = settle(4).await;
    assert!(
        (4..=5).contains(&after_dense),
        "{after_dense} notifications after 10 dense statements"
    );
    // A commit after the window is announced again.
    tokio::time::sleep(Duration::from_millis(900)).await;
    publish_one(&client, "order.created", json!({})).await;
    assert_eq!(settle(after_dense + 1).await, after_dense + 1);
    // A clock set ahead (by hand, or a stepped system clock) cannot silence wake-ups.
    client
        .batch_execute("SELECT setval('postern.notify_clock', 9000000000000000)")
        .await
        .unwrap();
    publish_one(&client, "order.created", json!({})).await;
    assert_eq!(settle(after_dense + 2).await, after_dense + 2);

    // A database whose trigger an earlier build installed for the same setting: the next start
    // replaces it (not only `migrate`), and records the shape it installed.
    client
        .batch_execute(
            "UPDATE postern.settings SET value = 'throttled:400' WHERE key = 'notify';
             DROP TRIGGER outbox_notify ON postern.outbox;
             CREATE TRIGGER outbox_notify AFTER INSERT ON postern.outbox
               FOR EACH STATEMENT WHEN (false) EXECUTE FUNCTION postern.outbox_notify();",
        )
        .await
        .unwrap();
    let receiver = Receiver::ok().await;
    let config = base_config(&db).replace(
        "[outbound]\n",
        "[outbound]\nnotify = \"throttled\"\nnotify_throttle = \"400ms\"\n",
    ) + &endpoint("e", &receiver.url, &["*"], "");
    let postern = Postern::start(&config).await;
    postern
        .wait_log("listening for outbox notifications", Duration::from_secs(5))
        .await;
    let definition: String = client
        .query_one(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'outbox_notify'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(definition.contains("IS DISTINCT FROM"), "{definition}");
    let setting = notify_setting(&client).await;
    assert_eq!(setting, "throttled:400:4");
    assert!(!postern
        .logs()
        .contains("differs from the trigger installed"));
}
