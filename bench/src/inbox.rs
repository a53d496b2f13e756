//! Scenario 7: the durable inbox. 1 KiB Stripe-signed requests, each a distinct event, over 64
//! connections, to a forward route and to an inbox route (durable commit before each answer;
//! `consume = "sql"`, so only accepting is measured), alternating; then the inbox route paced at
//! 500 requests/s for its accept latency.

use std::time::{Duration, Instant};

use anyhow::bail;
use axum::body::Bytes;

use crate::{free_port, percentile, Bench, Figure};

const SECRET: &[u8] = b"whsec_bench";

/// A distinct, signed ~1 KiB Stripe event.
fn event(n: u64, tag: &str) -> (Bytes, String) {
    let body = Bytes::from(format!(
        "{{\"id\":\"evt_{tag}_{n}\",\"object\":\"event\",\"pad\":\"{}\"}}",
        "x".repeat(980)
    ));
    let t = chrono::Utc::now().timestamp().to_string();
    let sig = hex::encode(postern::signing::hmac_sha256(
        SECRET,
        &[t.as_bytes(), b".", &body],
    ));
    (body, format!("t={t},v1={sig}"))
}

/// 64 connections sending distinct events as fast as answers come, for `secs`.
async fn closed_loop(url: &str, tag: &str, secs: f64) -> anyhow::Result<Vec<f64>> {
    let tag = tag.to_string();
    crate::load_with(url, secs, move |n| {
        let (body, sig) = event(n, &tag);
        let headers = vec![
            ("stripe-signature".to_string(), sig),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        (body, headers)
    })
    .await
}

/// Requests started at `rate`/s whatever the answers do (open loop), for `secs`.
async fn paced(url: &str, rate: u32, secs: f64) -> anyhow::Result<Vec<f64>> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()?;
    let total = (rate as f64 * secs) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        tokio::time::sleep_until(start + interval * n as u32).await;
        let (client, url) = (client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let (body, sig) = event(n, "paced");
            let t = Instant::now();
            let r = client
                .post(&url)
                .header("stripe-signature", sig)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .ok()?;
            r.status()
                .is_success()
                .then(|| t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await? {
            Some(ms) => lat.push(ms),
            None => bail!("a paced inbox request failed"),
        }
    }
    Ok(lat)
}

pub async fn inbox(b: &Bench, out: &mut Vec<Figure>) -> anyhow::Result<()> {
    b.reset_database().await?;
    let port = free_port();
    let (mut config, admin) = b.config(0, Some(port));
    config.push_str(
        "[[inbound.routes]]\npath = \"/stripe-inbox\"\nname = \"stripe\"\nprovider = \"stripe\"\n\
         secrets = [\"whsec_bench\"]\nmode = \"inbox\"\nconsume = \"sql\"\n",
    );
    let running = b.start_postern(&config, admin).await?;
    let forward_url = format!("http://127.0.0.1:{port}/stripe");
    let inbox_url = format!("http://127.0.0.1:{port}/stripe-inbox");
    let rounds = b.sizes.inbound_rounds;
    let phase = b.sizes.inbound_secs / rounds as f64;
    let (mut forwarded, mut stored) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let tag = format!("r{round}");
        if round % 2 == 0 {
            forwarded.extend(closed_loop(&forward_url, &tag, phase).await?);
            stored.extend(closed_loop(&inbox_url, &tag, phase).await?);
        } else {
            stored.extend(closed_loop(&inbox_url, &tag, phase).await?);
            forwarded.extend(closed_loop(&forward_url, &tag, phase).await?);
        }
    }
    let secs = phase * rounds as f64;
    let paced_secs = if b.sizes.inbound_rounds > 1 {
        10.0
    } else {
        2.0
    };
    let mut accept = paced(&inbox_url, 500, paced_secs).await?;
    running.stop();
    let client = crate::connect(&b.db_url).await?;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM postern.inbox", &[])
        .await?
        .get(0);
    let answered = stored.len() + accept.len();
    if rows as usize != answered {
        bail!("{answered} inbox requests were acknowledged but {rows} rows are stored");
    }
    for v in [&mut forwarded, &mut stored, &mut accept] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let (fwd_rate, inbox_rate) = (forwarded.len() as f64 / secs, stored.len() as f64 / secs);
    out.push(Figure::new(
        "forward route, 64 connections: requests/s",
        fwd_rate,
        "/s",
    ));
    out.push(Figure::new(
        "inbox route (durable commit), 64 connections: requests/s",
        inbox_rate,
        "/s",
    ));
    out.push(Figure::new("inbox / forward throughput", inbox_rate / fwd_rate, "x").at_least(0.5));
    out.push(Figure::new(
        "inbox p50 under 64 connections",
        percentile(&stored, 50.0),
        "ms",
    ));
    out.push(
        Figure::new(
            "inbox accept p50 at 500 requests/s",
            percentile(&accept, 50.0),
            "ms",
        )
        .at_most(5.0),
    );
    out.push(Figure::new(
        "inbox accept p99 at 500 requests/s",
        percentile(&accept, 99.0),
        "ms",
    ));
    Ok(())
}
