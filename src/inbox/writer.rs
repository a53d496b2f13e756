//! Accepting messages: the proxy's requests are committed in groups. Invariant: a caller hears
//! `Ok` only after the transaction holding its row (or the earlier row with its dedupe key) has
//! committed with `synchronous_commit = on`; any failure, or no answer within the caller's wait,
//! is an error the proxy turns into `503`, so the provider retries (and the dedupe key makes that
//! retry harmless if the commit did happen).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Mutex, Notify, OwnedSemaphorePermit, Semaphore};
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
pub const COMMITTERS: usize = 2;

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
    /// The message's share of the queue's byte bound, held until a committer is done with the
    /// job (not until its sender stops waiting): bodies queued behind a stalled database stay
    /// counted.
    _queued: OwnedSemaphorePermit,
}

/// The proxy's handle: cheap to clone, usable from any runtime.
#[derive(Clone)]
pub struct InboxWriter {
    tx: mpsc::Sender<Job>,
    /// KiB of messages queued or being committed, bounded apart from the proxy's own body
    /// budget: a stalled database fills this, never the budget forward routes read bodies with.
    queued: Arc<Semaphore>,
    queued_kib: u32,
}

/// The committers' end, handed to [`run`].
pub struct Queue(mpsc::Receiver<Job>);

/// `queued_bytes`: how much the queue may hold (the proxy gives `inbound.max_buffered`).
pub fn channel(queued_bytes: u64) -> (InboxWriter, Queue) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let queued_kib = (queued_bytes / 1024).clamp(1, u64::from(u32::MAX >> 4)) as u32;
    let queued = Arc::new(Semaphore::new(queued_kib as usize));
    (
        InboxWriter {
            tx,
            queued,
            queued_kib,
        },
        Queue(rx),
    )
}

impl InboxWriter {
    /// Stores `message`, waiting at most `wait` for its commit.
    pub async fn store(&self, message: Message, wait: Duration) -> Result<Accepted, StoreError> {
        let size = message.body.len()
            + message.header_values.iter().map(Vec::len).sum::<usize>()
            + message.header_names.iter().map(String::len).sum::<usize>();
        // A message larger than the whole bound takes all of it: it goes, alone.
        let kib = u32::try_from(size / 1024 + 1)
            .unwrap_or(u32::MAX)
            .min(self.queued_kib);
        let queued = self
            .queued
            .clone()
            .try_acquire_many_owned(kib)
            .map_err(|_| StoreError::Busy)?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Job {
                message,
                reply,
                _queued: queued,
            })
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
        // One statement for the batch: the headers of every message come as two flat arrays,
        // each message's share sliced out by its bounds.
        "INSERT INTO __SCHEMA__.inbox
            (route, provider, dedupe_key, method, path, query, header_names, header_values, body,
             consume)
         SELECT k.route, k.provider, k.key, k.method, k.path, k.query,
                ($7::text[])[k.first:k.last], ($8::bytea[])[k.first:k.last], k.body, k.consume
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $9::bytea[], $10::text[], $11::int[], $12::int[])
              AS k(route, provider, key, method, path, query, body, consume, first, last)
         ON CONFLICT (route, dedupe_key) DO NOTHING
         RETURNING id, route, dedupe_key",
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

/// One transaction, one insert for the batch (rows in key order, so two transactions inserting
/// the same keys wait on each other instead of deadlocking; a key twice in the batch is inserted
/// once), then the ids of the duplicates in one query (visible once the conflicting insert, here
/// or elsewhere, has committed). Answers come back in the batch's order.
async fn commit(
    pool: &Pool,
    insert: &str,
    find: &str,
    batch: &[Job],
) -> anyhow::Result<Vec<Accepted>> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    let key = |i: usize| (&batch[i].message.route, &batch[i].message.dedupe_key);
    order.sort_by(|&a, &b| key(a).cmp(&key(b)));
    let n = batch.len();
    let mut rows = Rows::with_capacity(n);
    for (pos, &i) in order.iter().enumerate() {
        if pos > 0 && key(order[pos - 1]) == key(i) {
            continue;
        }
        rows.push(&batch[i].message);
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(insert).await?;
    // Durable whatever the session's default (a pooler may hand out any server session).
    let durable = tx.batch_execute("SET LOCAL synchronous_commit = on");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 12] = [
        &rows.route,
        &rows.provider,
        &rows.key,
        &rows.method,
        &rows.path,
        &rows.query,
        &rows.header_names,
        &rows.header_values,
        &rows.body,
        &rows.consume,
        &rows.first,
        &rows.last,
    ];
    let (durable, inserted) = tokio::join!(durable, tx.query(&stmt, &params));
    durable?;
    let mut ids: std::collections::HashMap<(String, String), i64> = inserted?
        .iter()
        .map(|r| ((r.get(1), r.get(2)), r.get(0)))
        .collect();
    let mut accepted = Vec::with_capacity(n);
    let (mut routes, mut keys, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    for (i, job) in batch.iter().enumerate() {
        let m = &job.message;
        // The first job of a key inserted it; any other job of that key is its duplicate.
        match ids.remove(&(m.route.clone(), m.dedupe_key.clone())) {
            Some(id) => accepted.push(Accepted {
                id,
                duplicate: false,
            }),
            None => {
                accepted.push(Accepted {
                    id: 0,
                    duplicate: true,
                });
                routes.push(m.route.as_str());
                keys.push(m.dedupe_key.as_str());
                slots.push(i);
            }
        }
    }
    if !slots.is_empty() {
        for row in tx.query(find, &[&routes, &keys]).await? {
            let k: i64 = row.get(0);
            accepted[slots[k as usize - 1]].id = row.get(1);
        }
    }
    tx.commit().await?;
    Ok(accepted)
}

/// A batch as the insert's column arrays.
struct Rows<'a> {
    route: Vec<&'a str>,
    provider: Vec<&'a str>,
    key: Vec<&'a str>,
    method: Vec<&'a str>,
    path: Vec<&'a str>,
    query: Vec<Option<&'a str>>,
    header_names: Vec<&'a str>,
    header_values: Vec<&'a [u8]>,
    body: Vec<&'a [u8]>,
    consume: Vec<&'a str>,
    /// Each message's headers: 1-based inclusive bounds into the flat arrays.
    first: Vec<i32>,
    last: Vec<i32>,
}

impl<'a> Rows<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            route: Vec::with_capacity(n),
            provider: Vec::with_capacity(n),
            key: Vec::with_capacity(n),
            method: Vec::with_capacity(n),
            path: Vec::with_capacity(n),
            query: Vec::with_capacity(n),
            header_names: Vec::with_capacity(n * 12),
            header_values: Vec::with_capacity(n * 12),
            body: Vec::with_capacity(n),
            consume: Vec::with_capacity(n),
            first: Vec::with_capacity(n),
            last: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, m: &'a Message) {
        self.route.push(&m.route);
        self.provider.push(&m.provider);
        self.key.push(&m.dedupe_key);
        self.method.push(&m.method);
        self.path.push(&m.path);
        self.query.push(m.query.as_deref());
        self.first.push(self.header_names.len() as i32 + 1);
        self.header_names
            .extend(m.header_names.iter().map(String::as_str));
        self.header_values
            .extend(m.header_values.iter().map(Vec::as_slice));
        self.last.push(self.header_names.len() as i32);
        self.body.push(&m.body);
        self.consume.push(m.consume);
    }
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
