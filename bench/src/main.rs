//! `postern-bench`: the measuring instrument. Starts the real `postern` binary against the real
//! Postgres with a fast Rust receiver and upstream, runs the scenarios of BENCHMARKS.md, prints a
//! table and writes `target/bench/results.json`. Every figure that matters is a ratio against a
//! reference measured in the same run; `--quick` runs everything small, to prove the harness works
//! (it asserts nothing about timings).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};

mod floor;
mod harness;
mod inbound;
mod inbox;
mod latency;
mod outbound;

pub(crate) use harness::{app_commit, connect, free_port, percentile, start_sink, Bench};
pub(crate) use inbound::load_with;

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
    /// Scenario 4 also writes each event's commit time and latency as CSV beside its histogram
    /// (`latency-<label>.csv`): where in a run the slow events fall.
    #[arg(long)]
    timeline: bool,
    /// Scenario 4's paced rates (events/s), instead of 20, 200 and 1,000: a focused experiment.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u32>,
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
        sizes: {
            let mut sizes = Sizes::new(args.quick);
            if !args.rates.is_empty() {
                sizes.rates = args.rates.clone();
            }
            sizes
        },
        admin_url: args.database_url.clone(),
        db_url: db_url.to_string(),
        sink,
        sink_port,
        timeline: Default::default(),
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
        outbound::write_path(&bench, &mut f).await?;
        sections.push(("1. app write-path cost", f));
    }
    if wanted(2) {
        let mut f = Vec::new();
        outbound::backlog_drain(&bench, &mut f, &mut footprint).await?;
        sections.push(("2. backlog drain", f));
    }
    if wanted(3) {
        let mut f = Vec::new();
        outbound::live(&bench, &mut f).await?;
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
        inbound::inbound(&bench, &mut f, &mut footprint).await?;
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
