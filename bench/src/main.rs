//! `postern-bench`: the measuring instrument. Starts the real `postern` binary against the real
//! Postgres with a fast Rust receiver and upstream, runs the scenarios of BENCHMARKS.md, prints a
//! table and writes `target/bench/results.json`. Every figure that matters is a ratio against a
//! reference measured in the same run; `--quick` runs everything small, to prove the harness works
//! (it asserts nothing about timings).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use clap::Parser;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_postgres::NoTls;

mod floor;
mod inbox;
mod latency;

#[derive(Parser, Clone)]
#[command(about = "Postern's benchmark harness (see BENCHMARKS.md)")]
struct Args {
    /// The postern binary to measure.
    #[arg(long, default_value = "target/release/postern")]
    postern: PathBuf,
    /// Small sizes, a few seconds each: checks the harness, not the figures.
    #[arg(long)]
    quick: bool,
    /// Postgres to use (a scratch database `postern_bench` is created there and dropped).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Run only these scenarios (1-8); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u32>,
    /// The notify throttle of the throttled trigger in every scenario but the write path (which
    /// measures each setting), and of Postern's config. Postern's default.
    #[arg(long, default_value_t = 10)]
    notify_throttle_ms: u64,
    /// Leave the scratch database behind after the run, for inspection.
    #[arg(long)]
    keep_database: bool,
    /// Scenario 8's relay makes its round trip in the shape of Postern's first one (a transaction,
    /// a planner setting, a shared lock, the take, an endpoint read), not a single statement.
    #[arg(long)]
    floor_postern_shape: bool,
    /// An nginx binary: scenario 5 then also sends the same load through nginx proxying to the
    /// same upstream (no verification), a reference for what any proxy costs on this machine.
    #[arg(long)]
    reference_proxy: Option<PathBuf>,
}

struct Sizes {
    write_secs: f64,
    write_rounds: usize,
    backlog: i64,
    live_secs: f64,
    latency_secs: f64,
    rates: Vec<u32>,
    /// Events committed as fast as 16 writers can, for the burst's latency.
    burst: u64,
    inbound_secs: f64,
    inbound_rounds: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                write_secs: 1.0,
                write_rounds: 1,
                backlog: 1000,
                live_secs: 2.0,
                latency_secs: 2.0,
                rates: vec![200],
                burst: 500,
                inbound_secs: 2.0,
                inbound_rounds: 1,
            }
        } else {
            Self {
                write_secs: 5.0,
                write_rounds: 4,
                backlog: 20_000,
                live_secs: 20.0,
                latency_secs: 20.0,
                rates: vec![20, 200, 1000],
                burst: 10_000,
                inbound_secs: 15.0,
                inbound_rounds: 3,
            }
        }
    }
}

/// One measured figure, its target and the verdict.
#[derive(Clone)]
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    target: Option<(&'static str, f64)>,
}

impl Figure {
    fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
            target: None,
        }
    }
    fn at_least(mut self, t: f64) -> Self {
        self.target = Some((">=", t));
        self
    }
    fn at_most(mut self, t: f64) -> Self {
        self.target = Some(("<=", t));
        self
    }
    fn verdict(&self) -> &'static str {
        match self.target {
            None => "",
            Some((">=", t)) if self.value >= t => "met",
            Some(("<=", t)) if self.value <= t => "met",
            Some(_) => "MISSED",
        }
    }
    fn json(&self) -> Value {
        json!({
            "name": self.name, "value": self.value, "unit": self.unit,
            "target": self.target.map(|(op, t)| format!("{op} {t}")),
            "verdict": self.verdict(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The receiver (outbound deliveries) and upstream (inbound proxy): one fast axum server.

#[derive(Default)]
struct Sink {
    count: AtomicU64,
    reached: Notify,
    target: AtomicU64,
    /// webhook-id -> receipt time, when latency is being recorded.
    receipts: Mutex<Option<HashMap<String, Instant>>>,
}

async fn receive(State(sink): State<Arc<Sink>>, headers: HeaderMap, _body: Bytes) -> StatusCode {
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

async fn upstream(_body: Bytes) -> &'static str {
    "ok"
}

async fn start_sink() -> anyhow::Result<(Arc<Sink>, u16)> {
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
    fn expect(&self, total: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.target.store(total, Ordering::SeqCst);
    }
    async fn wait(&self, timeout: Duration) -> bool {
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

struct Bench {
    args: Args,
    sizes: Sizes,
    admin_url: String,
    db_url: String,
    sink: Arc<Sink>,
    sink_port: u16,
    dir: PathBuf,
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running {
    child: Child,
    started: Instant,
    ready_after: Duration,
}

impl Running {
    fn rss_kib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn stop(mut self) {
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
    async fn reset_database(&self) -> anyhow::Result<()> {
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
    async fn fresh_write_tables(&self) -> anyhow::Result<()> {
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
    async fn set_notify(&self, mode: &str) -> anyhow::Result<()> {
        self.set_notify_with(mode, self.args.notify_throttle_ms)
            .await
    }

    async fn set_notify_with(&self, mode: &str, throttle_ms: u64) -> anyhow::Result<()> {
        let pool = postern::db::pool(&self.db_url, 2, &postern::db::tls::unverified())?;
        let schema = postern::db::Schema::new("postern")?;
        let setting = postern::db::NotifySetting {
            mode: mode.to_string(),
            throttle_ms,
        };
        postern::db::install_notify(&pool, &schema, &setting, true).await?;
        Ok(())
    }

    fn config(&self, endpoints: usize, inbound_port: Option<u16>) -> (String, u16) {
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
    async fn start_postern(&self, config: &str, admin_port: u16) -> anyhow::Result<Running> {
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
    async fn insert_keyed_backlog(&self, n: i64) -> anyhow::Result<()> {
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

    async fn insert_backlog(&self, n: i64) -> anyhow::Result<()> {
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
async fn app_commit(client: &mut tokio_postgres::Client, bare: bool) -> anyhow::Result<uuid::Uuid> {
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
async fn hammer(url: &str, writers: usize, secs: f64, bare: bool) -> anyhow::Result<u64> {
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 50.0)
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

async fn write_path(b: &Bench, out: &mut Vec<Figure>) -> anyhow::Result<()> {
    // Each notify setting: the mode and, for the throttled trigger, its window.
    const MODES: [(&str, u64); 4] = [
        ("none", 0),
        ("throttled 10ms", 10),
        ("throttled 1ms", 1),
        ("statement", 0),
    ];
    for (bare, label) in [(false, "app-shaped"), (true, "bare single-row")] {
        let mut ratios: HashMap<&str, Vec<f64>> = HashMap::new();
        let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
        for round in 0..b.sizes.write_rounds {
            // Balanced order (A B C, then C B A): a steady drift of the machine adds as much to
            // each mode as it takes, and the triggered runs stay next to their baseline.
            let mut order = MODES;
            if round % 2 == 1 {
                order.reverse();
            }
            let mut round_rates: HashMap<&str, f64> = HashMap::new();
            for (mode, throttle_ms) in order {
                let kind = mode.split(' ').next().unwrap_or(mode);
                b.set_notify_with(kind, throttle_ms.max(1)).await?;
                b.fresh_write_tables().await?;
                let commits = hammer(&b.db_url, 16, b.sizes.write_secs, bare).await?;
                let rate = commits as f64 / b.sizes.write_secs;
                round_rates.insert(mode, rate);
                rates.entry(mode).or_default().push(rate);
            }
            for (mode, _) in &MODES[1..] {
                ratios
                    .entry(mode)
                    .or_default()
                    .push(round_rates[mode] / round_rates["none"]);
            }
            eprintln!(
                "  write path, {label}, round {}: {}",
                round + 1,
                MODES
                    .iter()
                    .map(|(m, _)| format!("{m} {:.0}/s", round_rates[m]))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for (mode, _) in MODES {
            out.push(Figure::new(
                format!("write path, {label}, notify={mode}: commits/s"),
                median(rates[mode].clone()),
                "/s",
            ));
        }
        for (mode, throttle_ms) in &MODES[1..] {
            let f = Figure::new(
                format!("write path, {label}, notify={mode}: ratio to no trigger"),
                median(ratios[mode].clone()),
                "x",
            );
            // Issue 16: the default setting keeps the app-shaped write path within 2 %.
            out.push(if !bare && *throttle_ms == b.args.notify_throttle_ms {
                f.at_least(0.98)
            } else {
                f
            });
        }
    }
    b.set_notify("throttled").await?;
    Ok(())
}

async fn backlog_drain(
    b: &Bench,
    out: &mut Vec<Figure>,
    footprint: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    for endpoints in [1usize, 4] {
        b.reset_database().await?;
        b.set_notify("throttled").await?;
        b.insert_backlog(b.sizes.backlog).await?;
        let total = b.sizes.backlog as u64 * endpoints as u64;
        b.sink.expect(total);
        let (config, admin) = b.config(endpoints, None);
        let running = b.start_postern(&config, admin).await?;
        let done = b.sink.wait(Duration::from_secs(600)).await;
        let secs = running.started.elapsed().as_secs_f64();
        if !done {
            bail!(
                "drain to {endpoints} endpoint(s) did not finish: {} of {total}",
                b.sink.count.load(Ordering::SeqCst)
            );
        }
        let rate = total as f64 / secs;
        let f = Figure::new(
            format!("backlog drain, {endpoints} endpoint(s), {total} deliveries: deliveries/s"),
            rate,
            "/s",
        );
        out.push(if endpoints == 1 {
            f.at_least(5000.0)
        } else {
            f.at_least(8000.0)
        });
        if endpoints == 4 {
            footprint.push(
                Figure::new(
                    "peak RSS, backlog drain (4 endpoints)",
                    running.rss_kib("VmHWM:") / 1024.0,
                    "MiB",
                )
                .at_most(200.0),
            );
        }
        running.stop();
    }
    // The same backlog with ordering keys (per-key FIFO): each key's deliveries go one at a time.
    b.reset_database().await?;
    b.set_notify("throttled").await?;
    b.insert_keyed_backlog(b.sizes.backlog).await?;
    let total = b.sizes.backlog as u64;
    b.sink.expect(total);
    let (config, admin) = b.config(1, None);
    let running = b.start_postern(&config, admin).await?;
    let done = b.sink.wait(Duration::from_secs(600)).await;
    let secs = running.started.elapsed().as_secs_f64();
    if !done {
        bail!(
            "ordered drain did not finish: {} of {total}",
            b.sink.count.load(Ordering::SeqCst)
        );
    }
    out.push(Figure::new(
        format!("backlog drain with ordering keys (1,000 keys + 1 hot key of {}), 1 endpoint: deliveries/s", total / 100),
        total as f64 / secs,
        "/s",
    ));
    running.stop();
    Ok(())
}

async fn live(b: &Bench, out: &mut Vec<Figure>) -> anyhow::Result<()> {
    b.reset_database().await?;
    b.set_notify("throttled").await?;
    let (config, admin) = b.config(1, None);
    let running = b.start_postern(&config, admin).await?;
    b.sink.expect(u64::MAX);
    let commits = hammer(&b.db_url, 16, b.sizes.live_secs, false).await?;
    let delivered = b.sink.count.load(Ordering::SeqCst);
    let client = connect(&b.db_url).await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM postern.outbox WHERE dispatched_at IS NULL),
                    (SELECT count(*) FROM postern.deliveries WHERE status IN ('pending', 'delivering'))",
            &[],
        )
        .await?;
    let (undispatched, undelivered): (i64, i64) = (row.get(0), row.get(1));
    let backlog = undispatched + undelivered;
    running.stop();
    let secs = b.sizes.live_secs;
    out.push(Figure::new(
        "live: app commits/s (16 writers)",
        commits as f64 / secs,
        "/s",
    ));
    out.push(Figure::new(
        "live: deliveries/s",
        delivered as f64 / secs,
        "/s",
    ));
    out.push(
        Figure::new(
            "live: deliveries / commits",
            delivered as f64 / commits.max(1) as f64,
            "x",
        )
        .at_least(0.95),
    );
    out.push(Figure::new(
        "live: backlog at the end",
        backlog as f64,
        "events",
    ));
    out.push(Figure::new(
        "live: of which not yet fanned out",
        undispatched as f64,
        "events",
    ));
    Ok(())
}

/// 64 keep-alive connections posting `body` with `headers` to `url` for `secs`; the latency of
/// every request, in ms.
async fn load(
    url: &str,
    headers: &[(String, String)],
    body: &Bytes,
    secs: f64,
) -> anyhow::Result<Vec<f64>> {
    let (headers, body) = (headers.to_vec(), body.clone());
    load_with(url, secs, move |_| (body.clone(), headers.clone())).await
}

/// 64 keep-alive connections posting, as fast as answers come, for `secs`: request `n` (counted
/// over all connections) carries `request(n)`'s body and headers. The latency of every request,
/// in ms; any failure fails the run.
async fn load_with(
    url: &str,
    secs: f64,
    request: impl Fn(u64) -> (Bytes, Vec<(String, String)>) + Send + Sync + 'static,
) -> anyhow::Result<Vec<f64>> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let counter = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, url, counter, request) = (
            client.clone(),
            url.to_string(),
            counter.clone(),
            request.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let (body, headers) = request(counter.fetch_add(1, Ordering::Relaxed));
                let t = Instant::now();
                let mut req = client.post(&url).body(body);
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await?;
        all.extend(lat);
        errors += e;
    }
    if errors > 0 {
        bail!("{errors} requests to {url} failed");
    }
    Ok(all)
}

async fn inbound(
    b: &Bench,
    out: &mut Vec<Figure>,
    footprint: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    b.reset_database().await?;
    let port = free_port();
    let (config, admin) = b.config(0, Some(port));
    let running = b.start_postern(&config, admin).await?;
    let body = Bytes::from(format!(
        "{{\"id\":\"evt_bench\",\"pad\":\"{}\"}}",
        "x".repeat(1000)
    ));
    let t = chrono::Utc::now().timestamp();
    let sig = hex::encode(postern::signing::hmac_sha256(
        b"whsec_bench",
        &[t.to_string().as_bytes(), b".", &body],
    ));
    let headers = vec![
        ("stripe-signature".to_string(), format!("t={t},v1={sig}")),
        ("content-type".into(), "application/json".into()),
    ];
    // Balanced rounds (direct, Postern, nginx; then the reverse; ...), the load time split
    // between them: drift of a shared machine falls on every path alike. Each path is idle while
    // another is loaded, so CPU measured over the run is CPU spent on its own requests.
    let nginx = match &b.args.reference_proxy {
        Some(path) => Some(Nginx::start(b, path).await?),
        None => None,
    };
    let mut paths = vec![
        Via::Direct(format!("http://127.0.0.1:{}/up", b.sink_port)),
        Via::Postern(format!("http://127.0.0.1:{port}/stripe")),
    ];
    if let Some(nginx) = &nginx {
        paths.push(Via::Nginx(format!(
            "http://127.0.0.1:{}/stripe",
            nginx.port
        )));
    }
    let rounds = b.sizes.inbound_rounds;
    let phase_secs = b.sizes.inbound_secs / rounds as f64;
    let pid = running.child.id().to_string();
    let (mut direct, mut proxied, mut through_nginx) = (Vec::new(), Vec::new(), Vec::new());
    let (mut own_cpu, mut postern_cpu) = (0.0, 0.0);
    for round in 0..rounds {
        let mut order: Vec<&Via> = paths.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for path in order {
            let (url, cpu_of, latencies, cpu) = match path {
                Via::Direct(url) => (url, "self", &mut direct, Some(&mut own_cpu)),
                Via::Postern(url) => (url, pid.as_str(), &mut proxied, Some(&mut postern_cpu)),
                Via::Nginx(url) => (url, "self", &mut through_nginx, None),
            };
            let before = cpu_seconds(cpu_of, false);
            latencies.extend(load(url, &headers, &body, phase_secs).await?);
            if let Some(cpu) = cpu {
                *cpu += cpu_seconds(cpu_of, false) - before;
            }
        }
    }
    let total_secs = phase_secs * rounds as f64;
    let summary = |mut latencies: Vec<f64>| {
        latencies.sort_by(|a, b| a.total_cmp(b));
        (latencies.len() as f64 / total_secs, latencies)
    };
    let (direct, proxied) = (summary(direct), summary(proxied));
    let requests = |r: &(f64, Vec<f64>)| r.1.len().max(1) as f64;
    let reference = nginx.map(|nginx| (summary(through_nginx), nginx.stop()));
    footprint.push(
        Figure::new(
            "peak RSS, inbound load",
            running.rss_kib("VmHWM:") / 1024.0,
            "MiB",
        )
        .at_most(200.0),
    );
    running.stop();
    out.push(Figure::new(
        "inbound direct to upstream: requests/s",
        direct.0,
        "/s",
    ));
    out.push(Figure::new(
        "inbound through postern: requests/s",
        proxied.0,
        "/s",
    ));
    out.push(
        Figure::new(
            "inbound throughput ratio (postern / direct)",
            proxied.0 / direct.0,
            "x",
        )
        .at_least(0.7),
    );
    out.push(Figure::new(
        "inbound direct p50",
        percentile(&direct.1, 50.0),
        "ms",
    ));
    out.push(Figure::new(
        "inbound direct p99",
        percentile(&direct.1, 99.0),
        "ms",
    ));
    out.push(Figure::new(
        "inbound through postern p50",
        percentile(&proxied.1, 50.0),
        "ms",
    ));
    out.push(Figure::new(
        "inbound through postern p99",
        percentile(&proxied.1, 99.0),
        "ms",
    ));
    out.push(
        Figure::new(
            "inbound added latency p50",
            percentile(&proxied.1, 50.0) - percentile(&direct.1, 50.0),
            "ms",
        )
        .at_most(1.0),
    );
    out.push(Figure::new(
        "CPU per request: load generator + upstream, direct",
        own_cpu / requests(&direct) * 1e6,
        "us",
    ));
    out.push(Figure::new(
        "CPU per request: postern",
        postern_cpu / requests(&proxied) * 1e6,
        "us",
    ));
    if let Some((nginx, nginx_cpu)) = reference {
        out.push(Figure::new(
            "reference: CPU per request: nginx",
            nginx_cpu / requests(&nginx) * 1e6,
            "us",
        ));
        out.push(Figure::new(
            "reference: through nginx (no verification): requests/s",
            nginx.0,
            "/s",
        ));
        out.push(Figure::new(
            "reference: nginx throughput ratio (nginx / direct)",
            nginx.0 / direct.0,
            "x",
        ));
        out.push(Figure::new(
            "reference: nginx added latency p50",
            percentile(&nginx.1, 50.0) - percentile(&direct.1, 50.0),
            "ms",
        ));
    }
    Ok(())
}

/// One way the inbound load can go to the upstream.
enum Via {
    Direct(String),
    Postern(String),
    Nginx(String),
}

/// nginx proxying to the same upstream: as many workers as cores, 64 pooled upstream connections,
/// the body read whole before forwarding (nginx's default, as Postern does), no access log.
struct Nginx {
    child: std::process::Child,
    port: u16,
}

impl Nginx {
    async fn start(b: &Bench, nginx: &Path) -> anyhow::Result<Self> {
        let port = free_port();
        let dir = b.dir.join("nginx");
        std::fs::create_dir_all(&dir)?;
        let conf = format!(
            "daemon off;\nworker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {dir}/body;\n proxy_temp_path {dir}/proxy;\n\
              fastcgi_temp_path {dir}/fastcgi;\n uwsgi_temp_path {dir}/uwsgi;\n scgi_temp_path {dir}/scgi;\n\
              upstream app {{ server 127.0.0.1:{sink}; keepalive 64; }}\n\
              server {{\n  listen 127.0.0.1:{port};\n  location = /stripe {{\n   proxy_pass http://app/up;\n\
                proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n  }}\n }}\n}}\n",
            dir = dir.display(),
            sink = b.sink_port,
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut child = Command::new(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", nginx.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("nginx did not start listening; its error log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, port })
    }

    /// Stops nginx and returns the CPU seconds it spent, workers included.
    fn stop(mut self) -> f64 {
        // The workers' CPU reaches the master when it reaps them, and ours when we reap the
        // master. Nothing else of ours may be reaped meanwhile.
        let reaped_before = cpu_seconds("self", true);
        self.quit();
        cpu_seconds("self", true) - reaped_before
    }

    /// A graceful stop, so the master takes its workers with it.
    fn quit(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-QUIT", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Nginx {
    /// A run that fails half-way leaves no nginx behind.
    fn drop(&mut self) {
        self.quit();
    }
}

/// User + system CPU seconds of `/proc/<pid>` (or of its reaped children), from `/proc/<pid>/stat`.
pub(crate) fn cpu_seconds(pid: &str, children: bool) -> f64 {
    // USER_HZ: the unit of these fields, fixed at 100 on Linux whatever the kernel's HZ.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name, which may itself hold spaces: state is the
    // first, so utime (field 14 of proc(5)) is the 12th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let first = if children { 13 } else { 11 };
    let ticks: u64 = fields
        .iter()
        .skip(first)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / TICKS_PER_SECOND
}

async fn idle_footprint(b: &Bench, out: &mut Vec<Figure>) -> anyhow::Result<()> {
    b.reset_database().await?;
    let (config, admin) = b.config(1, None);
    let running = b.start_postern(&config, admin).await?;
    out.push(
        Figure::new(
            "start to /readyz 200 (database up)",
            running.ready_after.as_secs_f64() * 1000.0,
            "ms",
        )
        .at_most(1000.0),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    out.push(
        Figure::new(
            "idle RSS after start",
            running.rss_kib("VmRSS:") / 1024.0,
            "MiB",
        )
        .at_most(30.0),
    );
    running.stop();
    let size = std::fs::metadata(&b.args.postern)?.len() as f64 / (1024.0 * 1024.0);
    out.push(Figure::new(
        format!("binary size ({})", b.args.postern.display()),
        size,
        "MiB",
    ));
    Ok(())
}

async fn postgres_settings(url: &str) -> anyhow::Result<Value> {
    let client = connect(url).await?;
    let mut settings = serde_json::Map::new();
    for name in [
        "server_version",
        "shared_buffers",
        "synchronous_commit",
        "fsync",
        "max_connections",
        "wal_level",
    ] {
        let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
        settings.insert(name.to_string(), Value::String(row.get(0)));
    }
    Ok(Value::Object(settings))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.postern.exists(),
        "{} does not exist; build it first",
        args.postern.display()
    );
    let (sink, sink_port) = start_sink().await?;
    let mut db_url = url::Url::parse(&args.database_url).context("--database-url")?;
    db_url.set_path("/postern_bench");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pg = postgres_settings(&args.database_url).await?;
    println!(
        "postern-bench{}: {cores} cores; Postgres {pg}",
        if args.quick { " --quick" } else { "" }
    );
    let bench = Bench {
        sizes: Sizes::new(args.quick),
        admin_url: args.database_url.clone(),
        db_url: db_url.to_string(),
        sink,
        sink_port,
        dir: {
            let dir = std::env::temp_dir().join(format!("postern-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            dir
        },
        args: args.clone(),
    };
    let wanted = |n: u32| args.only.is_empty() || args.only.contains(&n);
    let mut sections: Vec<(&str, Vec<Figure>)> = Vec::new();
    let mut footprint = Vec::new();
    let started = Instant::now();
    bench.reset_database().await?;
    if wanted(1) {
        let mut f = Vec::new();
        write_path(&bench, &mut f).await?;
        sections.push(("1. app write-path cost", f));
    }
    if wanted(2) {
        let mut f = Vec::new();
        backlog_drain(&bench, &mut f, &mut footprint).await?;
        sections.push(("2. backlog drain", f));
    }
    if wanted(3) {
        let mut f = Vec::new();
        live(&bench, &mut f).await?;
        sections.push(("3. live", f));
    }
    if wanted(4) {
        let mut f = Vec::new();
        latency::latency(&bench, &mut f).await?;
        sections.push(("4. latency", f));
    }
    if wanted(8) {
        let mut f = Vec::new();
        floor::floor(&bench, &mut f).await?;
        let title = if bench.args.floor_postern_shape {
            "8. floor: Postern's first round trip after each commit, no Postern"
        } else {
            "8. floor: one statement after each commit, no Postern"
        };
        sections.push((title, f));
    }
    if wanted(5) {
        let mut f = Vec::new();
        inbound(&bench, &mut f, &mut footprint).await?;
        sections.push(("5. inbound", f));
    }
    if wanted(7) {
        let mut f = Vec::new();
        inbox::inbox(&bench, &mut f).await?;
        sections.push(("7. inbox", f));
    }
    if wanted(6) {
        idle_footprint(&bench, &mut footprint).await?;
    }
    if !footprint.is_empty() {
        sections.push(("6. footprint", footprint));
    }
    if !bench.args.keep_database {
        let admin = connect(&bench.admin_url).await?;
        admin
            .batch_execute("DROP DATABASE IF EXISTS postern_bench WITH (FORCE)")
            .await?;
    }

    let mut json_sections = serde_json::Map::new();
    for (title, figures) in &sections {
        println!("\n{title}");
        for f in figures {
            let target = f
                .target
                .map(|(op, t)| format!("{op} {t}"))
                .unwrap_or_default();
            println!(
                "  {:<70} {:>12.3} {:<6} {:<10} {}",
                f.name,
                f.value,
                f.unit,
                target,
                f.verdict()
            );
        }
        json_sections.insert(
            title.to_string(),
            Value::Array(figures.iter().map(Figure::json).collect()),
        );
    }
    let results = json!({
        "quick": args.quick,
        "postern": args.postern.display().to_string(),
        "cores": cores,
        "postgres": pg,
        "seconds": started.elapsed().as_secs_f64(),
        "scenarios": json_sections,
    });
    if let Some(dir) = Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    println!(
        "\nwritten to {} in {:.1} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
