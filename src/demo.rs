//! `postern demo`: a newcomer's first run. Against a real Postgres it migrates a scratch schema,
//! starts a local receiver that verifies every signature, publishes sample events in one app
//! transaction, shows delivery progress and ends with a summary line. Invariant: it leaves nothing
//! behind (the scratch schema is dropped) and touches no schema but its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, Schema};
use crate::signing;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The Postgres to use (default: $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/postgres).
    #[arg(long)]
    pub database_url: Option<String>,
    /// How many events to publish in the one transaction.
    #[arg(long, default_value_t = 50)]
    pub events: usize,
    /// The scratch schema (dropped before and after).
    #[arg(long, default_value = "postern_demo")]
    pub schema: String,
}

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

struct Receiver {
    key: Vec<u8>,
    /// `x-postern-verified` of every request the "app" got through the inbound proxy.
    app_saw: Mutex<Vec<String>>,
    /// event id -> (receipt time, signature verified)
    seen: Mutex<HashMap<String, (Instant, bool)>>,
    rejected: Mutex<u32>,
}

async fn receive(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    let verified = signing::verify_standard(
        std::slice::from_ref(&rx.key),
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
        &body,
        now,
        300,
    )
    .is_ok();
    if !verified {
        *rx.rejected.lock().expect("demo lock") += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let id = h("webhook-id").unwrap_or_default().to_string();
    rx.seen
        .lock()
        .expect("demo lock")
        .entry(id)
        .or_insert((at, verified));
    StatusCode::NO_CONTENT
}

/// The app behind the inbound proxy: it only ever sees verified requests.
async fn app_endpoint(State(rx): State<Arc<Receiver>>, headers: HeaderMap) -> StatusCode {
    let mark = headers
        .get("x-postern-verified")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    rx.app_saw.lock().expect("demo lock").push(mark);
    StatusCode::OK
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let url = args
        .database_url
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    anyhow::ensure!(
        args.events > 0 && args.events <= 100_000,
        "--events must be 1 to 100000"
    );
    let schema = Schema::new(&args.schema).context("--schema")?;

    // The receiver: what a customer's webhook handler would be.
    let secret = signing::generate_secret();
    let receiver = Arc::new(Receiver {
        key: signing::standard_key(&secret)?,
        app_saw: Mutex::new(Vec::new()),
        seen: Mutex::new(HashMap::new()),
        rejected: Mutex::new(0),
    });
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new()
        .route("/webhooks", axum::routing::post(receive))
        .with_state(receiver.clone());
    let stop = CancellationToken::new();
    let server_stop = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await;
    });

    let inbound_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    // The app behind the inbound proxy, on a port of its own so the demo can stop and restart it.
    let app_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let stripe_secret = format!("whsec_demo_{}", uuid::Uuid::new_v4().simple());
    let toml = format!(
        r#"
        shutdown_grace = "5s"
        [database]
        url = {url}
        schema = "{schema}"
        [log]
        level = "warn"
        [outbound]
        request_timeout = "3s"
        allow_private_networks = ["127.0.0.0/8"]
        [[endpoints]]
        id = "demo-receiver"
        url = "http://127.0.0.1:{port}/webhooks"
        events = ["order.*"]
        secret = "{secret}"
        [inbound]
        listen = "127.0.0.1:{inbound_port}"
        upstream = "http://127.0.0.1:{app_port}"
        [[inbound.routes]]
        path = "/webhooks/stripe"
        provider = "stripe"
        secrets = ["{stripe_secret}"]
        upstream_path = "/app/stripe"
        [[inbound.routes]]
        path = "/webhooks/stripe-inbox"
        name = "stripe"
        provider = "stripe"
        secrets = ["{stripe_secret}"]
        upstream_path = "/app/stripe"
        mode = "inbox"
        "#,
        url = toml::Value::String(url.clone()),
        schema = schema.name(),
    );
    let config =
        crate::checks::from_toml_str(&toml).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    crate::telemetry::init(&config.log);

    println!(
        "postern demo: database {}",
        crate::config::mask_url_password(&url)
    );
    let pool = db::pool(&url, 4, &db::tls::unverified())?;
    let client = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "timed out connecting to {}",
                crate::config::mask_url_password(&url)
            )
        })?
        .with_context(|| {
            format!(
                "cannot connect to {} (set DATABASE_URL)",
                crate::config::mask_url_password(&url)
            )
        })?;
    client
        .batch_execute(&schema.sql("DROP SCHEMA IF EXISTS __SCHEMA__ CASCADE"))
        .await?;
    drop(client);
    let mut result = demo_body(&config, &pool, &schema, &receiver, args.events, port).await;
    if result.is_ok() {
        let ports = (inbound_port, app_port);
        result = demo_inbound(&config, &pool, &schema, &receiver, ports, &stripe_secret).await;
    }
    stop.cancel();
    let cleanup = pool.get().await.map(|c| async move {
        c.batch_execute(&schema.sql("DROP SCHEMA IF EXISTS __SCHEMA__ CASCADE"))
            .await
    });
    if let Ok(fut) = cleanup {
        let _ = fut.await;
    }
    result
}

async fn demo_body(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    schema: &Schema,
    receiver: &Arc<Receiver>,
    events: usize,
    port: u16,
) -> anyhow::Result<()> {
    let vault = crate::crypto::SecretBox::plaintext();
    crate::app::prepare(config, pool, schema, &vault).await?;
    println!(
        "  migrated scratch schema {}; receiver listening on 127.0.0.1:{port}",
        schema.name()
    );
    let shutdown = CancellationToken::new();
    let metrics = std::sync::Arc::new(crate::telemetry::Metrics::new());
    let tasks = crate::app::start(
        config,
        schema,
        shutdown.clone(),
        metrics,
        std::sync::Arc::new(crate::telemetry::Health::new(None)),
        vault,
        db::tls::unverified(),
    )?;

    // The app's side: a business row and its event, committed together.
    let mut client = pool.get().await?;
    client
        .batch_execute(&schema.sql(
            "CREATE TABLE __SCHEMA__.orders (id bigint PRIMARY KEY, total_cents bigint NOT NULL)",
        ))
        .await?;
    let tx = client.transaction().await?;
    let insert_order = tx
        .prepare(&schema.sql("INSERT INTO __SCHEMA__.orders (id, total_cents) VALUES ($1, $2)"))
        .await?;
    let insert_event = tx
        .prepare(&schema.sql(
            "INSERT INTO __SCHEMA__.outbox (event_type, payload) VALUES ('order.created', $1)",
        ))
        .await?;
    for i in 0..events as i64 {
        tx.execute(&insert_order, &[&i, &(1000 + i)]).await?;
        tx.execute(
            &insert_event,
            &[&serde_json::json!({"order_id": i, "total_cents": 1000 + i})],
        )
        .await?;
    }
    tx.commit().await?;
    let committed = Instant::now();
    println!("  committed {events} orders and their order.created events in one transaction");

    let deadline = committed + Duration::from_secs(30);
    let mut last_shown = usize::MAX;
    loop {
        let n = receiver.seen.lock().expect("demo lock").len();
        if n != last_shown {
            println!("  delivered {n}/{events}");
            last_shown = n;
        }
        if n >= events || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    let mut tasks = tasks;
    while tasks.tasks.join_next().await.is_some() {}

    let seen = receiver.seen.lock().expect("demo lock").clone();
    let rejected = *receiver.rejected.lock().expect("demo lock");
    let mut latencies: Vec<Duration> = seen
        .values()
        .map(|(at, _)| at.saturating_duration_since(committed))
        .collect();
    latencies.sort();
    let verified = seen.values().filter(|(_, v)| *v).count();
    anyhow::ensure!(
        !latencies.is_empty(),
        "no event arrived within 30 s; run with RUST_LOG=postern=debug to see why"
    );
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "delivered {}/{} events, {} signatures verified, {} rejected; commit-to-receipt latency p50 {:.1} ms, max {:.1} ms",
        seen.len(),
        events,
        verified,
        rejected,
        ms(pct(0.5)),
        ms(*latencies.last().expect("non-empty"))
    );
    anyhow::ensure!(
        seen.len() == events,
        "only {} of {events} events arrived",
        seen.len()
    );
    Ok(())
}

/// Serves the app's `/app/stripe` on `port` until `stop` is cancelled.
async fn start_app(
    receiver: &Arc<Receiver>,
    port: u16,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let app = axum::Router::new()
        .route("/app/stripe", axum::routing::post(app_endpoint))
        .with_state(receiver.clone());
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    }))
}

/// A Stripe-signed request for `body` (a zero signature when `forge`).
fn stripe_request(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    body: &str,
    forge: bool,
) -> reqwest::RequestBuilder {
    let t = chrono::Utc::now().timestamp();
    let sig = if forge {
        "0".repeat(64)
    } else {
        hex::encode(signing::hmac_sha256(
            secret.as_bytes(),
            &[t.to_string().as_bytes(), b".", body.as_bytes()],
        ))
    };
    http.post(url)
        .header("stripe-signature", format!("t={t},v1={sig}"))
        .body(body.to_string())
}

/// The inbound half: a Stripe-signed request goes through the proxy, a forged one is refused;
/// then the app goes down, the inbox route acknowledges what arrives meanwhile, and the app gets
/// all of it once it is back.
async fn demo_inbound(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    schema: &Schema,
    receiver: &Arc<Receiver>,
    (port, app_port): (u16, u16),
    secret: &str,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let metrics = std::sync::Arc::new(crate::telemetry::Metrics::new());
    let queued = config
        .inbound
        .as_ref()
        .map_or(32 << 20, |i| i.max_buffered.0);
    let (writer, queue) = crate::inbox::writer::channel(queued);
    let thread = crate::inbound::spawn(config, stop.clone(), metrics.clone(), Some(writer))?
        .context("inbound is configured")?;
    let wake = Arc::new(tokio::sync::Notify::new());
    let tls = db::tls::unverified();
    let committers = crate::app::inbox::spawn_writer(
        config,
        queue,
        schema,
        &tls,
        metrics.clone(),
        wake.clone(),
        stop.clone(),
    )?;
    let forwarder = crate::app::inbox::forwarder(config, pool.clone(), schema, metrics, wake)?
        .context("the inbox route is forwarded")?;
    let forwarder = tokio::spawn(forwarder.run(stop.child_token()));
    let app_stop = CancellationToken::new();
    let app = start_app(receiver, app_port, app_stop.clone()).await?;
    let url = format!("http://127.0.0.1:{port}/webhooks/stripe");
    let http = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "the inbound proxy did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = r#"{"id":"evt_demo","type":"payment_intent.succeeded"}"#;
    let signed = stripe_request(&http, &url, secret, body, false)
        .send()
        .await?;
    let forged = stripe_request(&http, &url, secret, body, true)
        .send()
        .await?;
    let signed_status = signed.status().as_u16();
    let forged_status = forged.status().as_u16();
    let forged_body: serde_json::Value =
        serde_json::from_str(&forged.text().await?).unwrap_or_default();
    let app_saw = receiver.app_saw.lock().expect("demo lock").clone();
    println!(
        "inbound: a Stripe-signed request went through the proxy ({signed_status}, the app saw x-postern-verified: {}); a forged one was refused ({forged_status} {})",
        app_saw.first().map_or("nothing", String::as_str),
        forged_body["error"].as_str().unwrap_or("?")
    );
    anyhow::ensure!(
        signed_status == 200 && forged_status == 401 && app_saw.len() == 1,
        "the inbound demo did not behave as expected"
    );

    // The app restarts: the forward route can only say 502, the inbox route keeps what comes.
    app_stop.cancel();
    let _ = app.await;
    let down = stripe_request(&http, &url, secret, body, false)
        .send()
        .await?;
    let inbox_url = format!("http://127.0.0.1:{port}/webhooks/stripe-inbox");
    let mut stored = Vec::new();
    for i in 0..3 {
        let body = format!(r#"{{"id":"evt_demo_inbox_{i}","type":"invoice.paid"}}"#);
        let r = stripe_request(&http, &inbox_url, secret, &body, false)
            .send()
            .await?;
        stored.push(r.status().as_u16());
    }
    println!(
        "inbox: with the app down the forward route answered {}; the inbox route stored 3 requests and answered {stored:?}",
        down.status().as_u16()
    );
    let app_stop = CancellationToken::new();
    let restarted = start_app(receiver, app_port, app_stop.clone()).await?;
    // The forwarder marks a row done once the app has answered it, so the app can have all
    // three a moment before the last row says so: wait for both.
    let deadline = Instant::now() + Duration::from_secs(15);
    let count_done = schema.sql("SELECT count(*) FROM __SCHEMA__.inbox WHERE status = 'done'");
    let (handed, done) = loop {
        let handed = receiver.app_saw.lock().expect("demo lock").len() - 1;
        let done: i64 = pool.get().await?.query_one(&count_done, &[]).await?.get(0);
        if (handed >= 3 && done >= 3) || Instant::now() >= deadline {
            break (handed, done);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("inbox: the app restarted and got all {handed} (inbox rows done: {done})");
    stop.cancel();
    app_stop.cancel();
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    let _ = forwarder.await;
    let _ = committers.await;
    let _ = restarted.await;
    anyhow::ensure!(
        stored == [200, 200, 200] && handed == 3 && done == 3,
        "the inbox demo did not behave as expected"
    );
    Ok(())
}
