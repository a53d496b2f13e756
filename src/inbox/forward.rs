//! Handing stored messages to the app (`consume = "forward"`). Invariant: every claimed message
//! ends settled (done, retried later or failed, with its attempt recorded), handed back (the app
//! was not listening, or shutdown came first) or, if this process dies, reaped when its lease
//! lapses; none is dropped, and a down app costs no attempts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::store::{Claimed, InboxStore, Outcome};
use super::InboxStatus;
use crate::delivery::retry::{parse_retry_after, RetryPolicy};
use crate::telemetry::{ForwardLabels, Metrics};

/// Writes the app's answer, retrying while the database is away (at most [`SETTLE_RETRY_MAX`]
/// apart, [`SETTLE_TRIES`] times): a replica cut off for longer than the forward lease writes it
/// inside the grace the reaper gives (`LAPSE_GRACE`), so the message is not forwarded again.
async fn settle(store: &InboxStore, owner: Uuid, m: &Claimed, outcome: &Outcome) {
    let mut delay = Duration::from_millis(100);
    for tried in 1..=SETTLE_TRIES {
        match store.settle(owner, m, outcome).await {
            Ok(true) => return,
            Ok(false) => {
                tracing::warn!(
                    inbox.id = m.id,
                    "inbox outcome dropped: the lease had passed to another replica"
                );
                return;
            }
            Err(e) if tried == SETTLE_TRIES || crate::delivery::state::is_statement_error(&e) => {
                tracing::warn!(inbox.id = m.id, error = %format!("{e:#}"), "inbox outcome not written; the lease will lapse and it is sent again");
                return;
            }
            Err(e) => {
                tracing::warn!(inbox.id = m.id, error = %format!("{e:#}"), "inbox outcome not written yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(SETTLE_RETRY_MAX);
            }
        }
    }
}

/// How often the app's answer is tried while the database is away: about five minutes when each
/// try fails at once.
const SETTLE_TRIES: u32 = 300;
/// The longest wait between two tries (see `delivery::settle`'s own).
const SETTLE_RETRY_MAX: Duration = Duration::from_secs(1);
const _: () =
    assert!(SETTLE_RETRY_MAX.as_millis() * 2 <= crate::delivery::state::LAPSE_GRACE.as_millis());

/// Messages in flight to the app per replica.
pub const CONCURRENCY: usize = 32;
/// Bytes of the app's answer kept in the attempt record.
const EXCERPT: usize = 4096;
/// The longest wait before looking again after the app refused a connection.
const DOWN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longer than a pool checkout may wait (10 s), so a slow settle does not outlive its lease.
const LEASE_MARGIN: Duration = Duration::from_secs(15);

pub struct ForwardSettings {
    /// The app, `http://host:port`.
    pub upstream: String,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub poll_interval: Duration,
    /// How long in-flight requests may run after shutdown starts.
    pub drain: Duration,
    /// Bytes of bodies held in flight at most (`inbound.max_buffered`; one body larger than that
    /// still goes, alone): a claim counts bytes, not only messages, or 32 bodies of `max_body`
    /// each could take more memory than the pod has.
    pub max_held: u64,
}

pub struct Forwarder {
    store: Arc<InboxStore>,
    http: reqwest::Client,
    settings: Arc<ForwardSettings>,
    owner: Uuid,
    metrics: Arc<Metrics>,
    /// Rung by the writer after each commit.
    wake: Arc<Notify>,
}

/// How one attempt went, for the loop.
enum Sent {
    Settled,
    /// The app did not accept the connection: handed back, no attempt counted.
    AppDown,
}

impl Forwarder {
    pub fn new(
        store: Arc<InboxStore>,
        settings: ForwardSettings,
        owner: Uuid,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(crate::delivery::client::user_agent())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(2)))
            .pool_max_idle_per_host(CONCURRENCY)
            .build()?;
        Ok(Self {
            store,
            http,
            settings: Arc::new(settings),
            owner,
            metrics,
            wake,
        })
    }

    pub async fn run(self, cancel: CancellationToken) {
        // An attempt's time and a margin to record it: past that, another replica may take it.
        let lease = self.settings.timeout + LEASE_MARGIN;
        let in_flight: InFlightSet = Arc::default();
        let mut tasks: JoinSet<Sent> = JoinSet::new();
        let mut down_delay = Duration::ZERO;
        let mut resume_at = Instant::now();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            // While the app has been refusing connections, one message probes it at a time.
            let room = if down_delay.is_zero() {
                CONCURRENCY - tasks.len()
            } else {
                usize::from(tasks.is_empty())
            };
            let mut full = false;
            let held: u64 = (in_flight.lock().expect("not poisoned").values())
                .map(|f| f.bytes)
                .sum();
            let bytes = self.settings.max_held.saturating_sub(held);
            if room > 0 && (bytes > 0 || held == 0) && Instant::now() >= resume_at {
                let claim = self
                    .store
                    .claim(self.owner, room as i64, lease, bytes, held == 0);
                match claim.await {
                    Ok(claimed) => {
                        full = claimed.len() == room;
                        for m in claimed {
                            in_flight.lock().expect("not poisoned").insert(
                                m.id,
                                InFlight {
                                    attempt: m.attempt,
                                    bytes: m.body.len() as u64,
                                    answered: false,
                                },
                            );
                            tasks.spawn(self.attempt(m, in_flight.clone()));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "inbox claim failed");
                        resume_at = Instant::now() + Duration::from_secs(1);
                    }
                }
            }
            let now = Instant::now();
            let wait = if now < resume_at {
                resume_at - now
            } else if full {
                Duration::ZERO
            } else {
                self.settings.poll_interval
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified(), if Instant::now() >= resume_at => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done {
                        // One doubling per round of refusals, not per refused message.
                        Ok(Sent::AppDown) if Instant::now() >= resume_at => {
                            down_delay = (down_delay * 2).clamp(Duration::from_millis(250), DOWN_BACKOFF_MAX);
                            resume_at = Instant::now() + down_delay;
                        }
                        Ok(Sent::AppDown) => {}
                        Ok(Sent::Settled) => down_delay = Duration::ZERO,
                        Err(e) => tracing::error!(error = %e, "an inbox attempt task failed"),
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.drain(tasks, in_flight).await;
    }

    /// Lets in-flight requests finish within the drain time, then hands back the rest.
    async fn drain(&self, mut tasks: JoinSet<Sent>, in_flight: InFlightSet) {
        let deadline = tokio::time::sleep(self.settings.drain);
        tokio::pin!(deadline);
        while !tasks.is_empty() {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = &mut deadline => break,
            }
        }
        // What is left is read before the tasks go: an aborted task's guard takes its entry out.
        // A message the app answered (its outcome not written yet, the database away) is not
        // handed back as unattempted: its lease lapses and the reaper records the attempt.
        let left: Vec<(i64, i32)> = in_flight
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, f)| !f.answered)
            .map(|(id, f)| (*id, f.attempt))
            .collect();
        tasks.abort_all();
        if let Err(e) = self.store.hand_back(self.owner, &left).await {
            tracing::warn!(error = %format!("{e:#}"), messages = left.len(), "inbox hand-back failed; the leases will lapse");
        }
    }

    /// One attempt as a task: send, then settle (or hand back).
    fn attempt(
        &self,
        m: Claimed,
        in_flight: InFlightSet,
    ) -> impl std::future::Future<Output = Sent> + Send + 'static {
        let (store, http, settings, owner, metrics) = (
            self.store.clone(),
            self.http.clone(),
            self.settings.clone(),
            self.owner,
            self.metrics.clone(),
        );
        async move {
            // Taken out of the in-flight set however the task ends (a panic too), so its bytes
            // never stay counted against the room of later claims.
            let held = Held {
                set: in_flight,
                id: m.id,
            };
            let started_at = Utc::now();
            let clock = Instant::now();
            let result = send(&http, &settings.upstream, &m).await;
            let duration_ms = clock.elapsed().as_millis().min(i32::MAX as u128) as i32;
            let label = |outcome| ForwardLabels {
                route: m.route.clone(),
                outcome,
            };
            let sent = match result {
                Err(e) if e.is_connect() => {
                    metrics
                        .inbox_forwards
                        .get_or_create(&label("app_unavailable"))
                        .inc();
                    if let Err(e) = store.hand_back(owner, &[(m.id, m.attempt)]).await {
                        tracing::warn!(error = %format!("{e:#}"), "inbox hand-back failed; the lease will lapse");
                    }
                    Sent::AppDown
                }
                result => {
                    // The request may have reached the app: from here it is never handed back.
                    held.answered();
                    let outcome = judge(&settings.retry, &m, result, started_at, duration_ms).await;
                    let kind = match outcome.status {
                        InboxStatus::Done => "delivered",
                        InboxStatus::Failed => "failed",
                        _ => "retry",
                    };
                    metrics.inbox_forwards.get_or_create(&label(kind)).inc();
                    settle(&store, owner, &m, &outcome).await;
                    Sent::Settled
                }
            };
            drop(held);
            sent
        }
    }
}

/// The messages a forwarder holds, by id.
type InFlightSet = Arc<Mutex<HashMap<i64, InFlight>>>;

struct InFlight {
    attempt: i32,
    /// Its body's bytes, counted against the room of later claims.
    bytes: u64,
    /// The request went out and did not fail to connect: the app may have it.
    answered: bool,
}

/// A message's place in the forwarder's in-flight set, given up when its task ends.
struct Held {
    set: InFlightSet,
    id: i64,
}

impl Held {
    fn answered(&self) {
        if let Some(f) = self.set.lock().expect("not poisoned").get_mut(&self.id) {
            f.answered = true;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Never a second panic while unwinding.
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.id);
        }
    }
}

/// The request the proxy would have sent, plus the message's id.
async fn send(
    http: &reqwest::Client,
    upstream: &str,
    m: &Claimed,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut url = format!("{}{}", upstream.trim_end_matches('/'), m.path);
    if let Some(q) = &m.query {
        url.push('?');
        url.push_str(q);
    }
    let method = reqwest::Method::from_bytes(m.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut headers = reqwest::header::HeaderMap::with_capacity(m.header_names.len() + 1);
    for (name, value) in m.header_names.iter().zip(&m.header_values) {
        // Stored from a request that parsed, so these parse; one that does not is left out.
        if let (Ok(n), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(name.as_bytes()),
            reqwest::header::HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    headers.insert("x-postern-inbox-id", m.id.into());
    http.request(method, url)
        .headers(headers)
        .body(m.body.clone()) // a reference count, not a copy
        .send()
        .await
}

/// What an attempt's result means for the message.
async fn judge(
    retry: &RetryPolicy,
    m: &Claimed,
    result: Result<reqwest::Response, reqwest::Error>,
    started_at: chrono::DateTime<Utc>,
    duration_ms: i32,
) -> Outcome {
    let counted = (m.attempt - m.replayed_after).max(1) as u32;
    let retry_at = |after: Option<Duration>| {
        retry
            .next_delay(counted, after)
            .map(|d| Utc::now() + chrono::Duration::from_std(d).unwrap_or_default())
    };
    let mut outcome = Outcome {
        status: InboxStatus::Done,
        next_at: None,
        status_code: None,
        error: None,
        started_at,
        duration_ms,
        response_excerpt: None,
    };
    match result {
        Ok(response) => {
            let code = response.status().as_u16();
            outcome.status_code = Some(code as i32);
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
            outcome.response_excerpt = Some(excerpt(response).await);
            if (200..300).contains(&code) {
                return outcome;
            }
            outcome.error = Some(format!("the app answered {code}"));
            outcome.next_at = retry_at(retry_after);
        }
        Err(e) => {
            outcome.error = Some(if e.is_timeout() {
                "timed out waiting for the app".to_string()
            } else {
                format!("request failed: {e}")
            });
            outcome.next_at = retry_at(None);
        }
    }
    outcome.status = if outcome.next_at.is_some() {
        InboxStatus::Pending
    } else {
        InboxStatus::Failed
    };
    outcome
}

/// The first bytes of the app's answer, read without waiting on the rest.
async fn excerpt(mut response: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < EXCERPT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                out.extend_from_slice(&chunk[..chunk.len().min(EXCERPT - out.len())])
            }
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::scratch::Scratch;

    /// A forward task that panics still gives up its place in the in-flight set: its bytes would
    /// otherwise count against every later claim's room for good.
    #[tokio::test]
    async fn a_panicking_attempt_gives_its_bytes_back() {
        let set: InFlightSet = Arc::default();
        set.lock().unwrap().insert(
            7,
            InFlight {
                attempt: 1,
                bytes: 1 << 20,
                answered: false,
            },
        );
        let held = Held {
            set: set.clone(),
            id: 7,
        };
        let task = tokio::spawn(async move {
            held.answered();
            panic!("a bug in an attempt");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert!(set.lock().unwrap().is_empty());
    }

    /// At the drain deadline a message the app may have (its answer's write still being retried,
    /// the database away) is left to its lease, so the reaper counts the attempt; only one the
    /// app never got is handed back as unattempted and due at once.
    #[tokio::test]
    async fn the_drain_hands_back_only_messages_the_app_never_got() {
        let s = Scratch::new().await;
        let store = Arc::new(InboxStore::new(s.pool.clone(), &s.schema));
        s.run(
            "INSERT INTO __SCHEMA__.inbox
                (route, provider, dedupe_key, method, path, header_names, header_values, body)
             VALUES ('r', 'stripe', 'a', 'POST', '/', '{}', '{}', 'x'),
                    ('r', 'stripe', 'b', 'POST', '/', '{}', '{}', 'y')",
        )
        .await;
        let owner = Uuid::now_v7();
        let claimed = store
            .claim(owner, 32, Duration::from_secs(30), 1024, true)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 2);
        let settings = ForwardSettings {
            upstream: "http://127.0.0.1:9".into(),
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::from_config(&Default::default()).unwrap(),
            poll_interval: Duration::from_secs(1),
            drain: Duration::from_millis(100),
            max_held: 1 << 20,
        };
        let forwarder = Forwarder::new(
            store,
            settings,
            owner,
            Arc::new(Metrics::default()),
            Arc::new(Notify::new()),
        )
        .unwrap();
        let in_flight: InFlightSet = Arc::default();
        for m in &claimed {
            let answered = s
                .pairs::<i64, String>(&format!(
                    "SELECT id, dedupe_key FROM __SCHEMA__.inbox WHERE id = {}",
                    m.id
                ))
                .await[0]
                .1
                == "a";
            in_flight.lock().unwrap().insert(
                m.id,
                InFlight {
                    attempt: m.attempt,
                    bytes: 1,
                    answered,
                },
            );
        }
        // Both tasks still running at the deadline.
        let mut tasks = JoinSet::new();
        tasks.spawn(std::future::pending::<Sent>());
        forwarder.drain(tasks, in_flight).await;
        let seen = s
            .pairs::<String, String>(
                "SELECT dedupe_key, status || ' ' || attempts FROM __SCHEMA__.inbox ORDER BY dedupe_key",
            )
            .await;
        assert_eq!(
            seen,
            [
                ("a".to_string(), "delivering 1".to_string()),
                ("b".to_string(), "pending 0".to_string())
            ]
        );
        s.drop_schema().await;
    }
}
