//! Accepting messages: the proxy's requests are committed in groups. Invariant: a caller hears
//! `Ok` only after the transaction holding its row (or the earlier row with its dedupe key) has
//! committed with `synchronous_commit = on`; any failure, or no answer within the caller's wait,
//! is an error the proxy turns into `503`, so the provider retries (and the dedupe key makes that
//! retry harmless if the commit did happen).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::future::try_join_all;
use tokio::sync::{mpsc, oneshot, Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::{Accepted, Message};
use crate::db::Schema;
use crate::telemetry::{Metrics, RouteLabel};

/// Requests waiting for a committer, over every connection; past it the proxy answers 503.
const QUEUE: usize = 4096;
/// At most this many messages, or this many body bytes, go into one transaction.
const BATCH: usize = 256;
const BATCH_BYTES: usize = 16 << 20;
/// Committer tasks (and connections): while one waits for its flush, the next fills a batch.
pub const COMMITTERS: usize = 3;

/// Why a message was not stored. Every variant means "not acknowledged": the provider retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the inbox cannot store the request now (database unavailable)")]
    Unavailable,
    #[error("the inbox could not confirm the write within {0:?}")]
    Timeout(Duration),
    #[error("too many requests are waiting to be stored")]
    Busy,
}

struct Job {
    message: Message,
    reply: oneshot::Sender<Result<Accepted, StoreError>>,
}

/// The proxy's handle: cheap to clone, usable from any runtime.
#[derive(Clone)]
pub struct InboxWriter {
    tx: mpsc::Sender<Job>,
}

/// The committers' end, handed to [`run`].
pub struct Queue(mpsc::Receiver<Job>);

pub fn channel() -> (InboxWriter, Queue) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (InboxWriter { tx }, Queue(rx))
}

impl InboxWriter {
    /// Stores `message`, waiting at most `wait` for its commit.
    pub async fn store(&self, message: Message, wait: Duration) -> Result<Accepted, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Job { message, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Busy,
                mpsc::error::TrySendError::Closed(_) => StoreError::Unavailable,
            })?;
        match tokio::time::timeout(wait, answer).await {
            Ok(Ok(result)) => result,
            // The committer is gone (shutting down) without answering.
            Ok(Err(_)) => Err(StoreError::Unavailable),
            Err(_) => Err(StoreError::Timeout(wait)),
        }
    }
}

/// Runs the committers until every [`InboxWriter`] is dropped (the proxy has stopped) and the
/// queue is empty, so requests the proxy takes while it drains are still committed and answered;
/// `drain` after `shutdown` at the latest (what is queued then is answered 503).
pub async fn run(
    queue: Queue,
    pool: Pool,
    schema: Schema,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let insert = schema.sql(
        "INSERT INTO __SCHEMA__.inbox
            (route, provider, dedupe_key, method, path, query, header_names, header_values, body,
             consume)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (route, dedupe_key) DO NOTHING
         RETURNING id",
    );
    let find = schema.sql(
        "SELECT k.n, m.id FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(route, key, n)
         JOIN __SCHEMA__.inbox m ON m.route = k.route AND m.dedupe_key = k.key",
    );
    let queue = Arc::new(Mutex::new(queue.0));
    let committers: Vec<_> = (0..COMMITTERS)
        .map(|_| {
            let (queue, pool, metrics, wake) =
                (queue.clone(), pool.clone(), metrics.clone(), wake.clone());
            let (insert, find) = (insert.clone(), find.clone());
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let stop = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep(drain).await;
                };
                tokio::pin!(stop);
                loop {
                    let batch = tokio::select! {
                        batch = next_batch(&queue) => batch,
                        _ = &mut stop => break,
                    };
                    let Some(batch) = batch else { break };
                    let result = commit(&pool, &insert, &find, &batch).await;
                    answer(batch, result, &metrics, &wake);
                }
            })
        })
        .collect();
    for c in committers {
        let _ = c.await;
    }
}

/// Everything queued now (bounded), after waiting for the first; `None` once the queue closed.
async fn next_batch(queue: &Mutex<mpsc::Receiver<Job>>) -> Option<Vec<Job>> {
    let mut rx = queue.lock().await;
    let first = rx.recv().await?;
    let mut bytes = first.message.body.len();
    let mut batch = vec![first];
    while batch.len() < BATCH && bytes < BATCH_BYTES {
        match rx.try_recv() {
            Ok(job) => {
                bytes += job.message.body.len();
                batch.push(job);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// One transaction for the batch: the inserts pipelined in one round trip (in key order, so two
/// transactions inserting the same keys wait on each other instead of deadlocking), then the ids
/// of the duplicates in one query (visible once the conflicting insert, here or elsewhere, has
/// committed). Answers come back in the batch's order.
async fn commit(
    pool: &Pool,
    insert: &str,
    find: &str,
    batch: &[Job],
) -> anyhow::Result<Vec<Accepted>> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&batch[a].message, &batch[b].message);
        (&a.route, &a.dedupe_key).cmp(&(&b.route, &b.dedupe_key))
    });
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(insert).await?;
    let (txr, stmt) = (&tx, &stmt);
    // Durable whatever the session's default (a pooler may hand out any server session).
    let durable = txr.batch_execute("SET LOCAL synchronous_commit = on");
    let inserts = try_join_all(order.iter().map(|&i| async move {
        let m = &batch[i].message;
        let body: &[u8] = &m.body;
        txr.query_opt(
            stmt,
            &[
                &m.route,
                &m.provider,
                &m.dedupe_key,
                &m.method,
                &m.path,
                &m.query,
                &m.header_names,
                &m.header_values,
                &body,
                &m.consume,
            ],
        )
        .await
    }));
    let (durable, inserted) = tokio::join!(durable, inserts);
    durable?;
    let mut accepted = vec![
        Accepted {
            id: 0,
            duplicate: true
        };
        batch.len()
    ];
    let (mut routes, mut keys, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    for (&i, row) in order.iter().zip(inserted?) {
        match row {
            Some(row) => {
                accepted[i] = Accepted {
                    id: row.get(0),
                    duplicate: false,
                }
            }
            None => {
                routes.push(batch[i].message.route.as_str());
                keys.push(batch[i].message.dedupe_key.as_str());
                slots.push(i);
            }
        }
    }
    if !slots.is_empty() {
        for row in tx.query(find, &[&routes, &keys]).await? {
            let n: i64 = row.get(0);
            accepted[slots[n as usize - 1]].id = row.get(1);
        }
    }
    tx.commit().await?;
    Ok(accepted)
}

fn answer(
    batch: Vec<Job>,
    result: anyhow::Result<Vec<Accepted>>,
    metrics: &Metrics,
    wake: &Notify,
) {
    match result {
        Ok(accepted) => {
            for (job, a) in batch.into_iter().zip(accepted) {
                let label = RouteLabel {
                    route: job.message.route.clone(),
                };
                if a.duplicate {
                    metrics.inbox_duplicates.get_or_create(&label).inc();
                } else {
                    metrics.inbox_accepted.get_or_create(&label).inc();
                }
                let _ = job.reply.send(Ok(a));
            }
            wake.notify_one();
        }
        Err(e) => {
            tracing::warn!(
                error = %format!("{e:#}"),
                requests = batch.len(),
                "inbox commit failed; the providers are answered 503 and retry"
            );
            for job in batch {
                let _ = job.reply.send(Err(StoreError::Unavailable));
            }
        }
    }
}
