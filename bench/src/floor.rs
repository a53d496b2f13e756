//! Scenario 8: the floor under scenario 4. The least any design that reads the event from the
//! database after the app's commit can do on this machine: no Postern, but a relay inside the
//! harness that LISTENs, and on each notification (every commit announced: the `statement`
//! trigger) takes the waiting events in one statement on the connection that was woken
//! (`FOR UPDATE SKIP LOCKED`, marked dispatched, no transaction of its own, no endpoints, no
//! attempt log) and posts each to the same receiver with the same client library. Same writers,
//! same pacing, same receiver, same clock as scenario 4; figures are the reference for its
//! targets, not a product. The relay runs inside the harness's process, beside the receiver, so
//! it is if anything optimistic: Postern is a process of its own that the commit must wake.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::latency::{paced, receipts, start_recording};
use crate::{percentile, Bench, Figure};

const TAKE: &str = "UPDATE postern.outbox SET dispatched_at = now()
    WHERE id IN (SELECT id FROM postern.outbox WHERE dispatched_at IS NULL
                 ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
    RETURNING event_id::text, payload::text";

pub async fn floor(b: &Bench, out: &mut Vec<Figure>) -> anyhow::Result<()> {
    b.reset_database().await?;
    b.set_notify("statement").await?;
    let mut config: tokio_postgres::Config = b.db_url.parse()?;
    // As Postern's pipeline sessions: commits not waiting for the WAL flush, the take planned over
    // the undispatched-rows index.
    config.options("-c synchronous_commit=off -c enable_seqscan=off -c enable_bitmapscan=off");
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message {
                if tx.send(()).is_err() {
                    break;
                }
            }
        }
    });
    client.batch_execute("LISTEN postern_outbox").await?;
    let take = client.prepare(TAKE).await?;
    // With `--floor-postern-shape`, the relay's round trip has the shape of Postern's first one:
    // a transaction with its planner setting and a shared lock, the take, the setting back, an
    // endpoint read (committed after the requests are sent, as Postern's second round trip is).
    let postern_shape = b.args.floor_postern_shape;
    let endpoints = client
        .prepare(
            "SELECT e.id, e.url, ARRAY(SELECT s.secret FROM postern.endpoint_secrets s
                                       WHERE s.endpoint_id = e.id)
             FROM postern.endpoints e",
        )
        .await?;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/hook/0", b.sink_port);
    let relay = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // One take answers every notification that came before it.
            while rx.try_recv().is_ok() {}
            loop {
                let rows = if postern_shape {
                    let (_, rows, _, _) = futures_util::join!(
                        client.batch_execute(
                            "BEGIN; SET LOCAL enable_seqscan = off;
                             SELECT pg_advisory_xact_lock_shared(1)"
                        ),
                        client.query(&take, &[]),
                        client.batch_execute("SET LOCAL enable_seqscan = on"),
                        client.query(&endpoints, &[]),
                    );
                    rows
                } else {
                    client.query(&take, &[]).await
                };
                let Ok(rows) = rows else {
                    return;
                };
                for r in &rows {
                    let (id, body): (String, String) = (r.get(0), r.get(1));
                    let request = http.post(&url).header("webhook-id", id).body(body);
                    tokio::spawn(request.send());
                }
                if postern_shape {
                    let _ = client.batch_execute("COMMIT").await;
                }
                if rows.len() < 100 {
                    break;
                }
            }
        }
    });
    for &rate in &b.sizes.rates {
        let commits = start_recording(b);
        paced(b, rate, commits.clone()).await?;
        let ms = receipts(b, &commits).await;
        let n = commits.lock().unwrap().len();
        let name = |what: &str| format!("floor at {rate}/s: {what}");
        out.push(Figure::new(name("p50"), percentile(&ms, 50.0), "ms"));
        out.push(Figure::new(name("p99"), percentile(&ms, 99.0), "ms"));
        let within = ms.iter().take_while(|&&v| v <= 1.0).count();
        out.push(Figure::new(
            name("share within 1 ms"),
            within as f64 / ms.len().max(1) as f64,
            "x",
        ));
        out.push(Figure::new(
            name("received / committed"),
            ms.len() as f64 / n.max(1) as f64,
            "x",
        ));
    }
    relay.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}
