//! Scenario 5: the inbound proxy's throughput and added latency against the upstream direct
//! (and, given `--reference-proxy`, against nginx on the same load).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;

use crate::harness::{free_port, percentile, Bench};
use crate::{cpu_seconds, Figure};

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
pub(crate) async fn load_with(
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

pub(crate) async fn inbound(
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
