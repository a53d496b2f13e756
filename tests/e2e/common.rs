//! Test harness: a database of its own per test, real HTTP receivers on 127.0.0.1 ports the OS
//! picks, and the real `postern` binary as a child process.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

mod receiver;

pub use receiver::*;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const SECRET_2: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(base: &str, db: &str) -> String {
    let mut url =
        url::Url::parse(base).expect("DATABASE_URL must be a postgres:// URL for the tests");
    url.set_path(&format!("/{db}"));
    url.to_string()
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to test Postgres");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database created for one test and dropped after it.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("postern_t_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&base_url()).await;
        let mut tries = 0;
        loop {
            match admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
            {
                Ok(()) => break,
                // Concurrent CREATE DATABASE from one template can collide; try again.
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("create database retry: {e}");
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => panic!("cannot create test database: {e}"),
            }
        }
        let url = with_database(&base_url(), &name);
        Self { name, url }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A blocking drop on a fresh thread: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) = tokio_postgres::connect(&base_url(), NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A port with nothing listening, for Postern to bind (or for a connection to be refused on).
pub async fn dead_port() -> u16 {
    unused_port()
}

/// A loopback port nothing listens on, taken below the kernel's ephemeral range. A port bound to 0
/// and released lies inside that range, where any outgoing connection on the machine (to Postgres,
/// to a receiver) may take it as its local port before Postern binds it: seen in `.ci/run` as
/// "api.listen: cannot bind ...: Address already in use". A process-wide counter keeps this run's
/// picks apart, the process id spreads concurrent runs, and each pick is checked by binding it.
pub fn unused_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SPAN: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low < SPAN + 1_024 {
        // An unusual range leaves no room below it: fall back to the kernel's pick.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        return l.local_addr().unwrap().port();
    }
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (ephemeral_low - SPAN + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {ephemeral_low}");
}

/// A test database, a receiver answering 200, and Postern running with one endpoint `e` that takes
/// every event.
pub async fn one_endpoint() -> (TestDb, Receiver, Postern) {
    let db = TestDb::create().await;
    let receiver = Receiver::ok().await;
    let config = base_config(&db) + &endpoint("e", &receiver.url, &["*"], "");
    let postern = Postern::start(&config).await;
    (db, receiver, postern)
}

/// The standard part of a test config; tests append `[[endpoints]]` tables.
pub fn base_config(db: &TestDb) -> String {
    format!(
        r#"shutdown_grace = "8s"

[database]
url = "{url}"
pool_size = 4

[log]
level = "info,postern=debug"

[outbound]
poll_interval = "200ms"
request_timeout = "2s"
lease = "4s"
allow_private_networks = ["127.0.0.0/8"]

[outbound.retry]
schedule = ["200ms", "200ms"]
jitter = 0.0

# Tests of other things expect every failing attempt to be made: the breaker stays out of the
# way unless a test sets an endpoint's own.
[outbound.breaker]
failures = 1000000
min_attempts = 1000000

[retention]
interval = "1s"
"#,
        url = db.url
    )
}

pub fn endpoint(id: &str, url: &str, events: &[&str], extra: &str) -> String {
    let events: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "\n[[endpoints]]\nid = \"{id}\"\nurl = \"{url}\"\nevents = [{}]\nsecret = \"{SECRET}\"\n{extra}\n",
        events.join(", ")
    )
}

/// The real binary, running `postern run` with a config file.
pub struct Postern {
    child: Option<Child>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_postern")
}

impl Postern {
    /// Starts the binary and waits until its pipeline runs.
    pub async fn start(config: &str) -> Self {
        Self::start_with_env(config, &[]).await
    }

    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let p = Self::spawn(config, env);
        p.wait_log("pipeline started", Duration::from_secs(20))
            .await;
        p
    }

    pub fn spawn(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postern.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("postern.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("DATABASE_URL")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn postern");
        Self {
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "postern did not log {needle:?} within {timeout:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit; panics after `timeout`.
    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "postern did not exit within {timeout:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    pub fn kill9(&mut self) {
        let child = self.child.as_mut().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("---- postern log ----\n{}", self.logs());
        }
    }
}

/// Publishes `n` events of `event_type` in one transaction; returns their event ids.
pub async fn publish_batch(
    client: &mut tokio_postgres::Client,
    event_type: &str,
    n: usize,
    offset: usize,
) -> Vec<uuid::Uuid> {
    let tx = client.transaction().await.unwrap();
    let stmt = tx
        .prepare(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ($1, $2) RETURNING event_id",
        )
        .await
        .unwrap();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let payload = serde_json::json!({"n": offset + i, "nested": {"b": [1, 2, 3], "a": "x"}});
        ids.push(
            tx.query_one(&stmt, &[&event_type, &payload])
                .await
                .unwrap()
                .get(0),
        );
    }
    tx.commit().await.unwrap();
    ids
}

/// Publishes one event in its own transaction (autocommit).
pub async fn publish_one(
    client: &tokio_postgres::Client,
    event_type: &str,
    payload: serde_json::Value,
) -> uuid::Uuid {
    client
        .query_one(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ($1, $2) RETURNING event_id",
            &[&event_type, &payload],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls a SQL query returning one bigint until it equals `want`.
pub async fn wait_sql(client: &tokio_postgres::Client, sql: &str, want: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {sql} = {got}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes `ops` (e.g. `INSERT OR UPDATE`) on `table` fail with `message`, after `delay_s` seconds,
/// until [`allow_writes`] is called with the same `name`: a database refusing one part of a pass.
pub async fn refuse_writes(
    client: &tokio_postgres::Client,
    name: &str,
    ops: &str,
    table: &str,
    delay_s: f64,
    message: &str,
) {
    client
        .batch_execute(&format!(
            "CREATE TABLE public.{name} (x int);
             INSERT INTO public.{name} VALUES (1);
             CREATE FUNCTION public.{name}() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF EXISTS (SELECT 1 FROM public.{name}) THEN
                   PERFORM pg_sleep({delay_s});
                   RAISE EXCEPTION '{message}';
                 END IF;
                 RETURN NEW;
               END $$;
             CREATE TRIGGER {name} BEFORE {ops} ON {table}
               FOR EACH ROW EXECUTE FUNCTION public.{name}();"
        ))
        .await
        .unwrap();
}

/// Ends what [`refuse_writes`] started under `name`.
pub async fn allow_writes(client: &tokio_postgres::Client, name: &str) {
    client
        .batch_execute(&format!("DELETE FROM public.{name}"))
        .await
        .unwrap();
}

/// Asserts that no event has been fanned out: no deliveries, `undispatched` events waiting.
pub async fn assert_nothing_fanned_out(client: &tokio_postgres::Client, undispatched: i64) {
    assert_eq!(
        scalar(client, "SELECT count(*) FROM postern.deliveries").await,
        0
    );
    assert_eq!(
        scalar(
            client,
            "SELECT count(*) FROM postern.outbox WHERE dispatched_at IS NULL"
        )
        .await,
        undispatched
    );
}

pub async fn scalar(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Verifies a request's Standard Webhooks signature with the reference library, not our signer.
pub fn verify_independently(secret: &str, r: &Received) -> bool {
    let wh = standardwebhooks::Webhook::new(secret).unwrap();
    wh.verify(&r.body, &r.headers).is_ok()
}

/// A TCP relay on 127.0.0.1 in front of Postgres that a test can cut and restore, to make the
/// database unreachable for Postern without touching the shared server.
pub struct TcpRelay {
    pub port: u16,
    enabled: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TcpRelay {
    pub async fn start(target: (String, u16)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let enabled = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (on, held) = (enabled.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !on.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().unwrap().push(link);
            }
        });
        Self {
            port,
            enabled,
            links,
        }
    }

    /// Refuses new connections and cuts the open ones.
    pub fn cut(&self) {
        self.enabled
            .store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn restore(&self) {
        self.enabled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// `url` with its host and port replaced by this relay's.
    pub fn url_for(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.to_string()
    }
}

/// Host and port of the test Postgres.
pub fn pg_target() -> (String, u16) {
    let u = url::Url::parse(&base_url()).unwrap();
    (
        u.host_str().unwrap_or("127.0.0.1").to_string(),
        u.port().unwrap_or(5432),
    )
}

/// A process's peak resident memory (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Reads one whole HTTP/1.1 request (head and `Content-Length` body) from a raw connection, for
/// the tests' hand-written servers; `false` when the peer closed first.
pub async fn read_raw_request(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 << 10];
    let mut seen = Vec::new();
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        seen.extend_from_slice(&buf[..n]);
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if seen.len() >= end + 4 + len {
                return true;
            }
        }
    }
}
