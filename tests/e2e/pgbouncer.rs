//! Behind pgbouncer (1.18 from Debian, which refuses startup options): with `database.pgbouncer`
//! Postern applies its session settings with SET and delivers as usual; without it, the refusal
//! is visible in the log. pgbouncer runs in session mode: transaction mode needs pgbouncer 1.21
//! or later for the named prepared statements Postern uses (README).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

struct Pgbouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_binary() -> String {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(String::from)
        .expect("pgbouncer is not installed (scripts/test installs it: apt-get install pgbouncer)")
}

async fn start_pgbouncer() -> Pgbouncer {
    start_pgbouncer_in("session").await
}

/// pgbouncer in `pool_mode` (`session` or `transaction`).
async fn start_pgbouncer_in(pool_mode: &str) -> Pgbouncer {
    let (host, pg_port) = pg_target();
    let port = dead_port().await;
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("pgbouncer.ini");
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
    std::fs::write(
        &ini,
        format!(
            "[databases]\n* = host={host} port={pg_port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
             pool_mode = {pool_mode}\nmax_client_conn = 200\ndefault_pool_size = 40\n",
            users.display()
        ),
    )
    .unwrap();
    // pgbouncer refuses to run as root.
    let root = unsafe_is_root();
    let mut cmd = if root {
        let status = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &pgbouncer_binary()]);
        c
    } else {
        Command::new(pgbouncer_binary())
    };
    let child = cmd
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "pgbouncer did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Pgbouncer {
        child,
        port,
        _dir: dir,
    }
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_through_pgbouncer_with_session_settings_applied_by_set() {
    let db = TestDb::create().await;
    let bouncer = start_pgbouncer().await;
    let receiver = Receiver::ok().await;
    let mut through = url::Url::parse(&db.url).unwrap();
    through.set_port(Some(bouncer.port)).unwrap();
    let config = |pgbouncer: bool| {
        base_config(&db).replace(
            &format!("url = \"{}\"\n", db.url),
            &format!(
                "url = \"{through}\"\nlisten_url = \"{}\"\npgbouncer = {pgbouncer}\n",
                db.url
            ),
        ) + &endpoint("e", &receiver.url, &["*"], "")
    };

    // Without the setting, pgbouncer refuses the startup options, and the log says so.
    let refused = Postern::spawn(&config(false), &[]);
    refused
        .wait_log("unsupported startup parameter", Duration::from_secs(10))
        .await;
    drop(refused);

    let _postern = Postern::start(&config(true)).await;
    let mut client = db.client().await;
    publish_batch(&mut client, "order.created", 50, 0).await;
    receiver.wait_count(50, Duration::from_secs(15)).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        50,
        Duration::from_secs(10),
    )
    .await;
    // A pool in SET mode gets the bounds through pgbouncer (the same hook the pipeline's use),
    // but never `synchronous_commit = off`: behind a transaction pooler a session SET can reach
    // the app's transactions, and that one would cost the app's commits their durability.
    let pool = postern::db::pipeline_pool_with(
        through.as_str(),
        &postern::db::tls::unverified(),
        postern::db::SessionMode::Set,
    )
    .unwrap();
    let c = pool.get().await.unwrap();
    for (name, want) in [
        ("statement_timeout", "30s"),
        ("idle_in_transaction_session_timeout", "1min"),
        ("synchronous_commit", "on"),
    ] {
        let got: String = c
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{name}");
    }
}

/// Behind a transaction pooler with no `listen_url`, LISTEN goes through the pooler and no
/// notification ever comes: the start says so in the log, and polling still delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_listen_url_behind_pgbouncer_the_log_warns_and_polling_delivers() {
    let db = TestDb::create().await;
    let bouncer = start_pgbouncer_in("transaction").await;
    let receiver = Receiver::ok().await;
    let mut through = url::Url::parse(&db.url).unwrap();
    through.set_port(Some(bouncer.port)).unwrap();
    let config = base_config(&db).replace(
        &format!("url = \"{}\"\n", db.url),
        &format!("url = \"{through}\"\npgbouncer = true\n"),
    ) + &endpoint("e", &receiver.url, &["*"], "");
    let postern = Postern::start(&config).await;
    postern
        .wait_log(
            "database.pgbouncer is set and database.listen_url is not",
            Duration::from_secs(5),
        )
        .await;
    let mut client = db.client().await;
    publish_batch(&mut client, "order.created", 20, 0).await;
    receiver.wait_count(20, Duration::from_secs(15)).await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        20,
        Duration::from_secs(10),
    )
    .await;
}
