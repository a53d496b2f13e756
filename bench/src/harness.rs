//! The harness's parts: the receiver and upstream every scenario sends to, the scratch database
//! and the `postern` process under test, and the app-shaped writers. Invariant: a scenario starts
//! with `reset_database`, so it never sees another scenario's rows.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::sync::Notify;
use tokio_postgres::NoTls;

use crate::{Args, Sizes};

// The receiver (outbound deliveries) and upstream (inbound proxy): one fast axum server.

#[derive(Default)]
pub(crate) struct Sink {
    pub(crate) count: AtomicU64,
    pub(crate) reached: Notify,
    pub(crate) target: AtomicU64,
    /// webhook-id -> receipt time, when latency is being recorded.
    pub(crate) receipts: Mutex<Option<HashMap<String, Instant>>>,
}

pub(crate) async fn receive(
    State(sink): State<Arc<Sink>>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let now = Instant::now();
    if let Some(map) = sink.receipts.lock().unwrap().as_mut() {
        if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
            map.entry(id.to_string()).or_insert(now);
        }
    }
    let n = sink.count.fetch_add(1, Ordering::Relaxed) + 1;
    if n == sink.target.load(Ordering::Relaxed) {
        sink.reached.notify_waiters();
    }
    StatusCode::OK
}

pub(crate) async fn upstream(_body: Bytes) -> &'static str {
    "ok"
}

pub(crate) async fn start_sink() -> anyhow::Result<(Arc<Sink>, u16)> {
    let sink = Arc::new(Sink::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new()
        .route("/hook/{n}", axum::routing::post(receive))
        .route("/up", axum::routing::post(upstream))
        .with_state(sink.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((sink, port))
}

impl Sink {
    pub(crate) fn expect(&self, total: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.target.store(total, Ordering::SeqCst);
    }
    pub(crate) async fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.reached.notified();
            if self.count.load(Ordering::SeqCst) >= self.target.load(Ordering::SeqCst) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The database and the postern process.

pub(crate) struct Bench {
    pub(crate) args: Args,
    pub(crate) sizes: Sizes,
    pub(crate) admin_url: String,
    pub(crate) db_url: String,
    pub(crate) sink: Arc<Sink>,
    pub(crate) sink_port: u16,
    pub(crate) dir: PathBuf,
    /// The last latency run's events, commit instant and latency in ms, for `--timeline`.
    pub(crate) timeline: std::sync::Mutex<Vec<(Instant, f64)>>,
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) struct Running {
    pub(crate) child: Child,
    pub(crate) started: Instant,
    pub(crate) ready_after: Duration,
}

impl Running {
    pub(crate) fn rss_kib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bench {
    pub(crate) async fn reset_database(&self) -> anyhow::Result<()> {
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute("DROP DATABASE IF EXISTS postern_bench WITH (FORCE)")
            .await?;
        admin.batch_execute("CREATE DATABASE postern_bench").await?;
        let pool = postern::db::pool(&self.db_url, 2, &postern::db::tls::unverified())?;
        let schema = postern::db::Schema::new("postern")?;
        postern::db::migrate(&pool, &schema, &[], &[]).await?;
        let client = connect(&self.db_url).await?;
        client
            .batch_execute(
                "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL,
                                      created_at timestamptz NOT NULL DEFAULT now());
                 CREATE INDEX orders_created ON orders (created_at);",
            )
            .await?;
        Ok(())
    }

    /// Every write-path run starts from the same state: empty tables (the same index depth, no
    /// dead rows) right after a checkpoint (the same share of full-page writes in the WAL).
    pub(crate) async fn fresh_write_tables(&self) -> anyhow::Result<()> {
        let client = connect(&self.db_url).await?;
        client
            .batch_execute("TRUNCATE orders, postern.outbox RESTART IDENTITY CASCADE")
            .await?;
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute("CHECKPOINT")
            .await
            .context("CHECKPOINT before a write-path run (needs superuser or pg_checkpoint)")?;
        Ok(())
    }

    /// The trigger of `mode` with the run's throttle.
    pub(crate) async fn set_notify(&self, mode: &str) -> anyhow::Result<()> {
        self.set_notify_with(mode, self.args.notify_throttle_ms)
            .await
    }

    pub(crate) async fn set_notify_with(&self, mode: &str, throttle_ms: u64) -> anyhow::Result<()> {
        let pool = postern::db::pool(&self.db_url, 2, &postern::db::tls::unverified())?;
        let schema = postern::db::Schema::new("postern")?;
        let setting = postern::db::NotifySetting {
            mode: mode.to_string(),
            throttle_ms,
        };
        postern::db::install_notify(&pool, &schema, &setting, true).await?;
        Ok(())
    }

    pub(crate) fn config(&self, endpoints: usize, inbound_port: Option<u16>) -> (String, u16) {
        let admin_port = free_port();
        let mut c = format!(
            "shutdown_grace = \"10s\"\n[database]\nurl = \"{}\"\nmigrate_on_start = false\npool_size = 8\n\
             [log]\nlevel = \"warn\"\n[outbound]\nnotify_throttle = \"{}ms\"\nallow_private_networks = [\"127.0.0.0/8\"]\nrequest_timeout = \"5s\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n",
            self.db_url, self.args.notify_throttle_ms
        );
        for n in 0..endpoints {
            c.push_str(&format!(
                "[[endpoints]]\nid = \"bench-{n}\"\nurl = \"http://127.0.0.1:{}/hook/{n}\"\nevents = [\"*\"]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
                self.sink_port
            ));
        }
        if let Some(port) = inbound_port {
            c.push_str(&format!(
                "[inbound]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"http://127.0.0.1:{}\"\n\
                 [[inbound.routes]]\npath = \"/stripe\"\nprovider = \"stripe\"\nsecrets = [\"whsec_bench\"]\nupstream_path = \"/up\"\n",
                self.sink_port
            ));
        }
        (c, admin_port)
    }

    /// Starts postern and waits for `/readyz` 200.
    pub(crate) async fn start_postern(
        &self,
        config: &str,
        admin_port: u16,
    ) -> anyhow::Result<Running> {
        let path = self.dir.join(format!("postern-{}.toml", free_port()));
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(self.dir.join("postern.log"))?;
        let started = Instant::now();
        let child = Command::new(&self.args.postern)
            .args(["run", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.args.postern.display()))?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        let url = format!("http://127.0.0.1:{admin_port}/readyz");
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().as_u16() == 200 {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                let log = std::fs::read_to_string(self.dir.join("postern.log")).unwrap_or_default();
                bail!("postern was not ready within 30 s; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Running {
            ready_after: started.elapsed(),
            child,
            started,
        })
    }

    /// A backlog with ordering keys: 1,000 keys taking turns, and one hot key with every
    /// hundredth event.
    pub(crate) async fn insert_keyed_backlog(&self, n: i64) -> anyhow::Result<()> {
        let client = connect(&self.db_url).await?;
        client
            .execute(
                "INSERT INTO postern.outbox (event_type, payload, ordering_key)
                 SELECT 'order.created', jsonb_build_object('order_id', g, 'total_cents', 1000 + g),
                        CASE WHEN g % 100 = 0 THEN 'hot' ELSE 'customer-' || (g % 1000) END
                 FROM generate_series(1, $1::bigint) g",
                &[&n],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn insert_backlog(&self, n: i64) -> anyhow::Result<()> {
        let client = connect(&self.db_url).await?;
        client
            .execute(
                "INSERT INTO postern.outbox (event_type, payload)
                 SELECT 'order.created', jsonb_build_object('order_id', g, 'total_cents', 1000 + g) FROM generate_series(1, $1::bigint) g",
                &[&n],
            )
            .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Writers.

/// One app-shaped transaction: a business row and its event.
pub(crate) async fn app_commit(
    client: &mut tokio_postgres::Client,
    bare: bool,
) -> anyhow::Result<uuid::Uuid> {
    if bare {
        let row = client
            .query_one(
                "INSERT INTO postern.outbox (event_type, payload) VALUES ('order.created', '{\"order_id\": 1}') RETURNING event_id",
                &[],
            )
            .await?;
        return Ok(row.get(0));
    }
    let tx = client.transaction().await?;
    let order: i64 = tx
        .query_one(
            "INSERT INTO orders (customer, total_cents) VALUES ('acme', 4200) RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let row = tx
        .query_one(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ('order.created', jsonb_build_object('order_id', $1::bigint)) RETURNING event_id",
            &[&order],
        )
        .await?;
    tx.commit().await?;
    Ok(row.get(0))
}

/// `writers` connections committing as fast as they can for `secs`; returns commits.
pub(crate) async fn hammer(
    url: &str,
    writers: usize,
    secs: f64,
    bare: bool,
) -> anyhow::Result<u64> {
    let total = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let mut client = connect(url).await?;
        client.batch_execute("SET synchronous_commit = on").await?;
        let total = total.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if app_commit(&mut client, bare).await.is_ok() {
                    total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(total.load(Ordering::Relaxed))
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 50.0)
}
