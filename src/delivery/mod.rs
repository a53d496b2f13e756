//! Delivery: claims due deliveries under a lease, makes each attempt (sign, POST, read), and
//! settles the outcomes in batches. Invariant: at most `concurrency` requests in flight per replica
//! and `per_endpoint_concurrency` per endpoint; every claimed delivery ends settled, handed back,
//! or (if this process dies) reaped when its lease lapses: none is ever dropped.

pub mod client;
pub mod retry;
pub mod ssrf;
pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{Config, RetryConfig, SignatureScheme};
use crate::crypto::{Field, SecretBox};
use crate::signing;
use crate::telemetry::{Health, Metrics, OutcomeLabel};
use client::{SendError, WebhookClient};
use retry::RetryPolicy;
use state::{Ack, AttemptRecord, Claimed, DeliveryStore, Settle};

/// What the worker needs from the configuration.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub per_endpoint_concurrency: usize,
    pub request_timeout: Duration,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub max_payload: u64,
    /// Bytes of payload the replica may hold in memory (claimed or handed over, not settled).
    pub memory_budget: u64,
    pub default_retry: RetryPolicy,
    /// How long in-flight requests may run after shutdown starts before being handed back.
    pub drain: Duration,
}

impl WorkerSettings {
    pub fn from_config(config: &Config) -> Self {
        let o = &config.outbound;
        let grace = config.shutdown_grace.0;
        Self {
            concurrency: o.concurrency,
            per_endpoint_concurrency: o.per_endpoint_concurrency,
            request_timeout: o.request_timeout.0,
            lease: config.lease(),
            poll_interval: o.poll_interval.0,
            max_payload: o.max_payload.0,
            memory_budget: o.memory_budget.0,
            default_retry: RetryPolicy::from_config(&o.retry).expect("validated"),
            // Leave time after the drain to settle outcomes and hand back the rest.
            drain: grace.saturating_sub(Duration::from_secs(2).min(grace / 4)),
        }
    }
}

/// The per-replica delivery engine.
pub struct Worker {
    store: Arc<DeliveryStore>,
    client: WebhookClient,
    settings: WorkerSettings,
    secrets: SecretBox,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    owner: Uuid,
    capacity: Arc<Capacity>,
    /// Rung by the dispatcher (deliveries it inserted `pending`) and by the reaper (due again).
    wake: Arc<Notify>,
    /// Rung when an endpoint answered 410, so its backlog is paused now.
    sweep_now: Arc<Notify>,
}

/// How many deliveries a replica holds (claimed or handed over, not yet settled) per request it
/// may have in flight to one endpoint: claims, fan-outs and settles are round trips to a database
/// the app is keeping busy, so the window of held deliveries must cover their latency, while
/// requests stay bounded by `per_endpoint_concurrency`. Measured with the live benchmark
/// (BENCHMARKS.md): a window of 4 kept 0.64-0.66 of the app's commits/s to one endpoint, 16 kept
/// 0.81-0.84 (before the fan-out fast path existed).
const HOLDS_PER_ENDPOINT_REQUEST: usize = 16;

/// The same for the whole replica, per request of `concurrency`. Every held delivery has its
/// payload in memory, so this also bounds memory: 1,024 held deliveries with the defaults.
const HOLDS_PER_REQUEST: usize = 4;

/// What holding a delivery costs the memory budget, in KiB: its payload twice (the shared
/// payload, and the request body built from it while the attempt is in flight) plus a KiB for
/// the rest, so the budget bounds what the replica really keeps.
fn charge_kib(payload_len: usize) -> u32 {
    u32::try_from(payload_len.saturating_mul(2) / 1024 + 1).unwrap_or(u32::MAX >> 4)
}

/// Time kept free at the end of a lease for recording the outcome.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// This replica's delivery capacity, shared by the worker (claims) and the dispatcher (fresh
/// deliveries it claims as it fans them out). A hold is taken per delivery from claim (or
/// fan-out) to written outcome; requests are bounded separately, globally and per endpoint.
pub struct Capacity {
    holds: Arc<Semaphore>,
    /// The memory budget in KiB: each held delivery takes its charge (see [`charge_kib`]).
    bytes: Arc<Semaphore>,
    /// The charge of the largest payload allowed: a claim waits until this much is free.
    max_charge: u32,
    memory_budget: u64,
    /// The largest payload seen lately (decaying): a claim asks for no more rows than the
    /// budget's room holds at that size, so the database does not size rows it cannot keep.
    recent_payload: std::sync::atomic::AtomicUsize,
    requests: Arc<Semaphore>,
    per_endpoint_requests: usize,
    per_endpoint_held: i32,
    /// Held deliveries per endpoint and the endpoint's request semaphore (present while any are held).
    per_endpoint: Mutex<HashMap<String, (i32, Arc<Semaphore>)>>,
    /// Endpoints this replica must not send to (an answer of 410, or paused or deleted through the
    /// API), until when: held deliveries to them go back instead of out, claims and the fast path
    /// skip them. After `stop_for` the database's state (inactive, deleted) is what counts.
    stopped: Mutex<HashMap<String, std::time::Instant>>,
    /// When each endpoint last changed in a way that voids what replicas hold for it (its tenant,
    /// say): holds taken before then are handed back, not sent.
    revoked: Mutex<HashMap<String, std::time::Instant>>,
    revoked_all: Mutex<Option<std::time::Instant>>,
    stop_for: Duration,
}

/// One delivery's hold on its replica's capacity; dropping it gives the hold back. It lives until
/// the delivery's outcome is written, so claims and fan-outs never outrun settling.
pub struct Hold {
    _hold: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    endpoint: String,
    taken: std::time::Instant,
    endpoint_requests: Arc<Semaphore>,
    capacity: Arc<Capacity>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut map = self.capacity.per_endpoint.lock().expect("capacity map");
        if let Some(entry) = map.get_mut(&self.endpoint) {
            entry.0 -= 1;
            if entry.0 <= 0 {
                map.remove(&self.endpoint);
            }
        }
    }
}

impl Capacity {
    pub fn new(settings: &WorkerSettings) -> Arc<Self> {
        // Half the budget for held deliveries; the other half covers what claims and fan-out
        // passes bring into memory transiently (see `payload_room` and `app::start`).
        let budget_kib = (settings.memory_budget / 2 / 1024).clamp(1, u64::from(u32::MAX >> 4));
        Arc::new(Self {
            holds: Arc::new(Semaphore::new(settings.concurrency * HOLDS_PER_REQUEST)),
            bytes: Arc::new(Semaphore::new(budget_kib as usize)),
            max_charge: charge_kib(settings.max_payload as usize).min(budget_kib as u32),
            memory_budget: settings.memory_budget,
            recent_payload: std::sync::atomic::AtomicUsize::new(0),
            requests: Arc::new(Semaphore::new(settings.concurrency)),
            per_endpoint_requests: settings.per_endpoint_concurrency,
            per_endpoint_held: (settings.per_endpoint_concurrency * HOLDS_PER_ENDPOINT_REQUEST)
                as i32,
            per_endpoint: Mutex::default(),
            stopped: Mutex::default(),
            revoked: Mutex::default(),
            revoked_all: Mutex::default(),
            stop_for: settings.lease,
        })
    }

    /// Stops sending to `endpoint` at once: what this replica holds for it is handed back as its
    /// attempts reach their turn (requests already in flight finish).
    pub fn stop(&self, endpoint: &str) {
        let until = std::time::Instant::now() + self.stop_for;
        self.stopped
            .lock()
            .expect("stopped endpoints")
            .insert(endpoint.to_string(), until);
        self.revoke(endpoint);
    }

    /// Voids the holds taken for `endpoint` until now: they are handed back (the database then
    /// decides again what becomes of them) instead of being sent.
    pub fn revoke(&self, endpoint: &str) {
        let now = std::time::Instant::now();
        let mut revoked = self.revoked.lock().expect("revoked endpoints");
        // Holds never outlive a lease, so older revocations void nothing any more.
        revoked.retain(|_, at| now.duration_since(*at) < self.stop_for);
        revoked.insert(endpoint.to_string(), now);
    }

    /// Voids every hold taken until now (the listener reconnected: announcements made while it
    /// was away are lost, so nothing held may be trusted).
    pub fn revoke_all(&self) {
        *self.revoked_all.lock().expect("revoked all") = Some(std::time::Instant::now());
    }

    fn is_revoked(&self, hold: &Hold) -> bool {
        if self
            .revoked_all
            .lock()
            .expect("revoked all")
            .is_some_and(|at| at >= hold.taken)
        {
            return true;
        }
        self.revoked
            .lock()
            .expect("revoked endpoints")
            .get(&hold.endpoint)
            .is_some_and(|at| *at >= hold.taken)
    }

    /// Lifts a stop (the endpoint was resumed).
    /// Held deliveries stay revoked: they went back to the database, which decides again.
    pub fn resume(&self, endpoint: &str) {
        self.stopped
            .lock()
            .expect("stopped endpoints")
            .remove(endpoint);
    }

    pub fn is_stopped(&self, endpoint: &str) -> bool {
        let mut stopped = self.stopped.lock().expect("stopped endpoints");
        match stopped.get(endpoint) {
            Some(until) if *until > std::time::Instant::now() => true,
            Some(_) => {
                stopped.remove(endpoint);
                false
            }
            None => false,
        }
    }

    /// A hold for a fresh delivery to `endpoint`, if one is free and the endpoint is under its
    /// limit of held deliveries.
    pub fn try_hold(self: &Arc<Self>, endpoint: &str, payload_len: usize) -> Option<Hold> {
        if self.is_stopped(endpoint) {
            return None;
        }
        let mut map = self.per_endpoint.lock().expect("capacity map");
        if map
            .get(endpoint)
            .is_some_and(|e| e.0 >= self.per_endpoint_held)
        {
            return None;
        }
        let bytes = self.take_bytes(payload_len)?;
        let permit = self.holds.clone().try_acquire_owned().ok()?;
        Some(self.count(&mut map, endpoint, permit, bytes))
    }

    /// Counts a delivery the worker claimed with `permit` (the claim query applied the limit), if
    /// its payload fits the memory budget; `None` means hand it back.
    /// `claimed_at` is when the claim was sent: a revocation announced after it voids the hold.
    fn hold_claimed(
        self: &Arc<Self>,
        endpoint: &str,
        permit: OwnedSemaphorePermit,
        payload_len: usize,
        claimed_at: std::time::Instant,
    ) -> Option<Hold> {
        let bytes = self.take_bytes(payload_len)?;
        let mut map = self.per_endpoint.lock().expect("capacity map");
        let mut hold = self.count(&mut map, endpoint, permit, bytes);
        hold.taken = claimed_at;
        Some(hold)
    }

    fn take_bytes(&self, payload_len: usize) -> Option<OwnedSemaphorePermit> {
        let _ = self.recent_payload.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |seen| Some((seen - seen / 64).max(payload_len)),
        );
        let charge = charge_kib(payload_len).min(self.max_charge.max(1));
        self.bytes.clone().try_acquire_many_owned(charge).ok()
    }

    /// Payload bytes a claim may bring into memory now: what the held deliveries' share has room
    /// for, and at most an eighth of the budget (the query's result and the copies made from it
    /// exist together for a moment: a quarter).
    fn payload_room(&self) -> i64 {
        let room = self.bytes.available_permits() as i64 * 1024 / 2;
        room.min(self.memory_budget as i64 / 8)
    }

    /// How many rows a claim should ask for at most, given the room and the payloads seen lately.
    fn rows_for_room(&self) -> usize {
        let seen = self
            .recent_payload
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(512);
        (self.payload_room() as usize / seen).max(1)
    }

    /// Whether the largest allowed payload would fit now: claims wait for that much room, so what
    /// they take can be held.
    fn has_room_for_a_claim(&self) -> bool {
        self.bytes.available_permits() >= self.max_charge as usize
    }

    fn count(
        self: &Arc<Self>,
        map: &mut HashMap<String, (i32, Arc<Semaphore>)>,
        endpoint: &str,
        permit: OwnedSemaphorePermit,
        bytes: OwnedSemaphorePermit,
    ) -> Hold {
        let entry = map
            .entry(endpoint.to_string())
            .or_insert_with(|| (0, Arc::new(Semaphore::new(self.per_endpoint_requests))));
        entry.0 += 1;
        Hold {
            _hold: permit,
            _bytes: bytes,
            endpoint: endpoint.to_string(),
            taken: std::time::Instant::now(),
            endpoint_requests: entry.1.clone(),
            capacity: self.clone(),
        }
    }

    /// Takes free holds for a claim of that many: three quarters of them, so the dispatcher's
    /// fresh deliveries still find room while the claim is out (with every hold taken they would
    /// go to `pending` and wait for a later claim).
    fn take_free(&self) -> Vec<OwnedSemaphorePermit> {
        let n = self.holds.available_permits();
        let n = if n > 1 { n - n / 4 } else { n };
        std::iter::from_fn(|| self.holds.clone().try_acquire_owned().ok())
            .take(n)
            .collect()
    }

    fn requests_in_flight(&self, concurrency: usize) -> usize {
        concurrency - self.requests.available_permits()
    }

    /// Held deliveries per endpoint, for the claim to subtract; a stopped endpoint counts as full.
    fn held_per_endpoint(&self) -> Vec<(String, i32)> {
        let mut held: HashMap<String, i32> = self
            .per_endpoint
            .lock()
            .expect("capacity map")
            .iter()
            .map(|(k, v)| (k.clone(), v.0))
            .collect();
        let now = std::time::Instant::now();
        for (endpoint, until) in self.stopped.lock().expect("stopped endpoints").iter() {
            if *until > now {
                held.insert(endpoint.clone(), self.per_endpoint_held);
            }
        }
        held.into_iter().collect()
    }

    /// Waits for a request slot of the hold's endpoint, then one of the replica's.
    async fn request_slot(
        &self,
        hold: &Hold,
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let endpoint = hold.endpoint_requests.clone().acquire_owned().await.ok()?;
        let replica = self.requests.clone().acquire_owned().await.ok()?;
        Some((endpoint, replica))
    }
}

/// A delivery the dispatcher inserted already claimed by this replica (attempt 1, leased), with
/// its hold: the fan-out fast path, which saves the claim's round trip and row version.
pub struct Handoff {
    pub delivery: Claimed,
    pub hold: Hold,
}

/// A finished (or handed back) delivery on its way to the database, with the hold it releases
/// once its outcome is written (none for one handed back before it was held).
struct Done {
    report: Report,
    _hold: Option<Hold>,
}

/// What an attempt task reports.
enum Report {
    Settled(Ack),
    /// Not finished before the shutdown deadline: back to `pending` at once.
    HandBack(Uuid, i32),
    /// Not attempted, for a fault of this replica (a secret it cannot open): back to `pending`,
    /// due again after [`DEFER_DELAY`], with the reason. Never `failed`: the event is fine.
    Defer(Deferral),
}

/// A delivery this replica could not prepare, through no fault of the event.
#[derive(Debug, Clone)]
pub struct Deferral {
    pub id: Uuid,
    pub attempt: i32,
    pub reason: String,
}

/// How long a deferred delivery waits before any replica tries it again (one with the right key
/// may take it meanwhile... after this delay; the operator has been told through `/readyz`).
const DEFER_DELAY: Duration = Duration::from_secs(30);

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<DeliveryStore>,
        client: WebhookClient,
        settings: WorkerSettings,
        secrets: SecretBox,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        owner: Uuid,
        capacity: Arc<Capacity>,
        wake: Arc<Notify>,
        sweep_now: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            client,
            settings,
            secrets,
            metrics,
            health,
            owner,
            capacity,
            wake,
            sweep_now,
        }
    }

    /// Runs until `shutdown` is cancelled, then drains: in-flight attempts get until the drain
    /// deadline, what is left (and whatever the dispatcher still hands over) is handed back, and
    /// every outcome is written before returning.
    pub async fn run(
        self,
        mut handoffs: mpsc::UnboundedReceiver<Vec<Handoff>>,
        shutdown: CancellationToken,
    ) {
        let (report_tx, report_rx) = mpsc::unbounded_channel::<Done>();
        let slots_freed = Arc::new(Notify::new());
        let settler = tokio::spawn(settle_loop(
            self.store.clone(),
            self.owner,
            report_rx,
            slots_freed.clone(),
            self.sweep_now.clone(),
        ));
        let attempts = Attempts {
            context: Arc::new(AttemptContext {
                client: self.client.clone(),
                settings: self.settings.clone(),
                secrets: self.secrets.clone(),
                metrics: self.metrics.clone(),
                health: self.health.clone(),
            }),
            tracker: TaskTracker::new(),
            reports: report_tx.clone(),
            abort: CancellationToken::new(),
            shutdown: shutdown.clone(),
        };

        let mut claim_failures = 0u32;
        let mut handoffs_open = true;
        // Whether due deliveries may be waiting in the table. Fresh ones usually arrive as
        // handoffs, so a freed hold is a reason to claim only while the last claim found work or
        // was cut short by an endpoint's limit.
        let mut backlog = true;
        let mut claim_now = true;
        // Retries fall due without anyone ringing: claim at least once per poll interval, however
        // busy the handoffs keep this loop.
        let mut next_poll = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            if claim_now {
                let slots = if self.capacity.has_room_for_a_claim() {
                    self.capacity.take_free()
                } else {
                    Vec::new()
                };
                if !slots.is_empty() {
                    let claimed_at = std::time::Instant::now();
                    let busy = self.capacity.held_per_endpoint();
                    let claim = self.store.claim(
                        self.owner,
                        slots.len().min(self.capacity.rows_for_room()) as i64,
                        self.capacity.per_endpoint_held,
                        &busy,
                        self.settings.lease,
                        self.capacity.payload_room(),
                    );
                    tokio::pin!(claim);
                    // Fresh deliveries handed over meanwhile start now, not after the claim.
                    let claimed = loop {
                        tokio::select! {
                            claimed = &mut claim => break claimed,
                            batch = handoffs.recv(), if handoffs_open => match batch {
                                Some(batch) => attempts.start_handoffs(batch),
                                None => handoffs_open = false,
                            },
                        }
                    };
                    match claimed {
                        Ok(batch) => {
                            claim_failures = 0;
                            // An endpoint at its limit of held deliveries may have more waiting:
                            // the next freed hold is a reason to look again.
                            let limited = busy
                                .iter()
                                .any(|(_, n)| *n >= self.capacity.per_endpoint_held);
                            backlog = !batch.is_empty() || limited;
                            let full = batch.len() == slots.len()
                                || batch.len() == self.capacity.rows_for_room();
                            let mut slots = slots.into_iter();
                            for (delivery, slot) in batch.into_iter().zip(&mut slots) {
                                let len = delivery.payload.len();
                                match self.capacity.hold_claimed(
                                    &delivery.endpoint_id,
                                    slot,
                                    len,
                                    claimed_at,
                                ) {
                                    Some(hold) => attempts.start(delivery, hold),
                                    // Over the memory budget: back for later (or another replica).
                                    None => attempts.hand_back(&delivery),
                                }
                            }
                            // Holds the claim did not use go back as `slots` is dropped.
                            if full {
                                continue;
                            }
                        }
                        Err(e) => {
                            claim_failures += 1;
                            tracing::warn!(error = %format!("{e:#}"), "claiming deliveries failed; retrying");
                        }
                    }
                }
            }
            if claim_now {
                next_poll = tokio::time::Instant::now()
                    + if claim_failures > 0 {
                        Duration::from_millis(100 * 2u64.pow(claim_failures.min(6)))
                    } else {
                        self.settings.poll_interval
                    };
            }
            claim_now = tokio::select! {
                _ = shutdown.cancelled() => false,
                // New pending deliveries (the dispatcher found no free slot) or reaped ones.
                _ = self.wake.notified(), if claim_failures == 0 => true,
                _ = slots_freed.notified(), if claim_failures == 0 && backlog => true,
                batch = handoffs.recv(), if handoffs_open => {
                    match batch {
                        Some(batch) => attempts.start_handoffs(batch),
                        None => handoffs_open = false,
                    }
                    false
                },
                _ = tokio::time::sleep_until(next_poll) => true,
            };
        }

        attempts.tracker.close();
        let in_flight = self.capacity.requests_in_flight(self.settings.concurrency);
        tracing::info!(in_flight, "delivery worker draining");
        // The dispatcher may still be finishing a pass: what it hands over now goes straight back.
        let return_handoffs = async {
            while let Some(batch) = handoffs.recv().await {
                for h in batch {
                    let report = Report::HandBack(h.delivery.id, h.delivery.attempt);
                    let _ = report_tx.send(Done {
                        report,
                        _hold: Some(h.hold),
                    });
                }
            }
        };
        let drained = tokio::time::timeout(
            self.settings.drain,
            futures_util::future::join(attempts.tracker.wait(), return_handoffs),
        )
        .await;
        if drained.is_err() {
            tracing::warn!("drain deadline reached; handing back unfinished deliveries");
            attempts.abort.cancel();
            attempts.tracker.wait().await;
        }
        drop(attempts);
        drop(report_tx);
        if let Err(e) = settler.await {
            tracing::error!(error = %e, "settling task failed");
        }
    }
}

/// Starts attempts as tasks and routes their reports to the settler.
struct Attempts {
    context: Arc<AttemptContext>,
    tracker: TaskTracker,
    reports: mpsc::UnboundedSender<Done>,
    /// Cancelled when the drain deadline passes: unfinished attempts are handed back.
    abort: CancellationToken,
    shutdown: CancellationToken,
}

impl Attempts {
    fn start_handoffs(&self, batch: Vec<Handoff>) {
        batch
            .into_iter()
            .for_each(|h| self.start(h.delivery, h.hold));
    }

    fn start(&self, delivery: Claimed, hold: Hold) {
        let (context, reports, abort, stop) = (
            self.context.clone(),
            self.reports.clone(),
            self.abort.clone(),
            self.shutdown.clone(),
        );
        let lease = context.settings.lease;
        let timeout = context.settings.request_timeout;
        let claimed_at = Instant::now();
        self.tracker.spawn(async move {
            let (id, attempt) = (delivery.id, delivery.attempt);
            // Waiting for a request slot is not starting: on shutdown such a delivery goes
            // straight back to the others.
            let capacity = hold.capacity.clone();
            let request = tokio::select! {
                permits = capacity.request_slot(&hold) => permits,
                _ = stop.cancelled() => None,
            };
            // An attempt must end well inside the lease it was claimed under; one that waited
            // too long for its slot is handed back instead.
            let wait_budget = lease
                .saturating_sub(timeout + LEASE_MARGIN)
                .max(Duration::from_millis(250));
            let request = request.filter(|_| claimed_at.elapsed() <= wait_budget);
            // An endpoint stopped while this delivery waited (410, paused, deleted): not sent.
            let request = request
                .filter(|_| !capacity.is_stopped(&hold.endpoint) && !capacity.is_revoked(&hold));
            let report = match request {
                None => Report::HandBack(id, attempt),
                Some(_request) => tokio::select! {
                    outcome = context.attempt(delivery) => match outcome {
                        Ok(ack) => {
                            // Stopped before this request's slot is freed, so no delivery held
                            // here starts after the first 410.
                            if ack.settle == Settle::EndpointGone {
                                capacity.stop(&hold.endpoint);
                            }
                            Report::Settled(ack)
                        }
                        Err(deferral) => Report::Defer(deferral),
                    },
                    // The request may have reached the receiver: the attempt counts, with its outcome
                    // unknown (as when a lease lapses), and the delivery is due again at once.
                    _ = abort.cancelled() => Report::Settled(cut_short(id, attempt, &hold.endpoint)),
                },
            };
            let _ = reports.send(Done {
                report,
                _hold: Some(hold),
            });
        });
    }

    /// Returns a claimed delivery this replica cannot hold.
    fn hand_back(&self, delivery: &Claimed) {
        let _ = self.reports.send(Done {
            report: Report::HandBack(delivery.id, delivery.attempt),
            _hold: None,
        });
    }
}

/// The outcome of an attempt the drain deadline cut short.
fn cut_short(id: Uuid, attempt: i32, endpoint: &str) -> Ack {
    Ack {
        id,
        attempt,
        endpoint_id: endpoint.to_string(),
        settle: Settle::Retry { at: Utc::now() },
        record: AttemptRecord {
            started_at: Utc::now(),
            duration_ms: 0,
            status_code: None,
            response_body: None,
            error: Some(
                "cut short at shutdown (the drain deadline passed): outcome unknown".into(),
            ),
        },
    }
}

/// Writes outcomes in batches: whatever has arrived since the last write goes in one transaction.
/// Only then are the deliveries' holds dropped (their slots freed) and the claimer told.
async fn settle_loop(
    store: Arc<DeliveryStore>,
    owner: Uuid,
    mut rx: mpsc::UnboundedReceiver<Done>,
    slots_freed: Arc<Notify>,
    sweep_now: Arc<Notify>,
) {
    let mut buf: Vec<Done> = Vec::with_capacity(512);
    while rx.recv_many(&mut buf, 512).await > 0 {
        let mut acks = Vec::with_capacity(buf.len());
        let mut back = Vec::new();
        let mut deferred = Vec::new();
        for done in &buf {
            match &done.report {
                Report::Settled(a) => acks.push(a.clone()),
                Report::HandBack(id, attempt) => back.push((*id, *attempt)),
                Report::Defer(d) => deferred.push(d.clone()),
            }
        }
        let started = Instant::now();
        let outcomes = acks.len();
        let gone = acks.iter().any(|a| a.settle == Settle::EndpointGone);
        write_outcomes(&store, owner, acks).await;
        if gone {
            sweep_now.notify_one();
        }
        hand_back_all(&store, owner, &back).await;
        if !deferred.is_empty() {
            if let Err(e) = store.defer(owner, &deferred, DEFER_DELAY).await {
                tracing::error!(error = %format!("{e:#}"), "deferring deliveries failed; their leases will lapse");
            }
        }
        tracing::debug!(
            outcomes,
            handed_back = back.len(),
            took_ms = started.elapsed().as_secs_f64() * 1000.0,
            "outcomes written"
        );
        // Dropping the holds frees the slots.
        buf.clear();
        slots_freed.notify_one();
    }
}

/// How many times a batch is retried when the database is away before the outcomes are left to
/// their leases (the reaper then makes the deliveries due again: at-least-once, never lost).
const WRITE_TRIES: u32 = 50;

/// Writes a batch of outcomes. A batch the database refuses as a statement (bad data in one row)
/// is written row by row, so one row can never hold back the others; a row still refused is
/// written without what the receiver sent, with the reason. A batch that fails for want of a
/// database is retried whole, with backoff.
async fn write_outcomes(store: &DeliveryStore, owner: Uuid, mut acks: Vec<Ack>) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=WRITE_TRIES {
        if acks.is_empty() {
            return;
        }
        let e = match store.settle(owner, &acks).await {
            Ok(()) => return,
            Err(e) => e,
        };
        if state::is_statement_error(&e) {
            tracing::warn!(error = %format!("{e:#}"), batch = acks.len(), "a batch of outcomes was refused; writing them one by one");
            let mut unwritten = Vec::new();
            for ack in acks {
                match store.settle(owner, std::slice::from_ref(&ack)).await {
                    Ok(()) => {}
                    Err(e) if state::is_statement_error(&e) => {
                        let reason = format!("{e:#}");
                        tracing::error!(delivery.id = %ack.id, error = %reason, "an outcome was refused; recording it without the response");
                        let stripped = ack.without_receiver_data(&reason);
                        if let Err(e) = store.settle(owner, std::slice::from_ref(&stripped)).await {
                            if state::is_statement_error(&e) {
                                tracing::error!(delivery.id = %ack.id, error = %format!("{e:#}"),
                                    "an outcome cannot be recorded at all; its lease will lapse");
                            } else {
                                unwritten.push(stripped);
                            }
                        }
                    }
                    Err(_) => unwritten.push(ack),
                }
            }
            acks = unwritten;
            continue;
        }
        if attempt == WRITE_TRIES {
            tracing::error!(error = %format!("{e:#}"), batch = acks.len(),
                "recording outcomes failed for good; their leases will lapse and they will be retried");
            return;
        }
        tracing::warn!(error = %format!("{e:#}"), batch = acks.len(), "recording outcomes failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Hands back unfinished deliveries, retrying while the database is away.
async fn hand_back_all(store: &DeliveryStore, owner: Uuid, back: &[(Uuid, i32)]) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=WRITE_TRIES {
        match store.hand_back(owner, back).await {
            Ok(0) => return,
            Ok(n) => {
                tracing::info!(handed_back = n, "deliveries handed back for other replicas");
                return;
            }
            Err(e) if attempt < WRITE_TRIES => {
                tracing::warn!(error = %format!("{e:#}"), "handing back deliveries failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "handing back deliveries failed for good; their leases will lapse")
            }
        }
    }
}

struct AttemptContext {
    client: WebhookClient,
    settings: WorkerSettings,
    secrets: SecretBox,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl AttemptContext {
    /// Makes one attempt and decides how it settles: every path returns an `Ack`, except a
    /// delivery this replica cannot prepare (its fault, not the event's), which is deferred.
    async fn attempt(&self, d: Claimed) -> Result<Ack, Deferral> {
        let span = tracing::info_span!("attempt", delivery.id = %d.id, endpoint.id = %d.endpoint_id, attempt = d.attempt);
        let ack = self.attempt_in_span(d).instrument(span).await?;
        let outcome = match ack.settle {
            Settle::Delivered => "delivered",
            Settle::Retry { .. } => "retry",
            Settle::Failed => "failed",
            Settle::EndpointGone => "gone",
        };
        self.metrics
            .deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        self.metrics
            .attempt_duration
            .observe(f64::from(ack.record.duration_ms.max(0)) / 1000.0);
        Ok(ack)
    }

    async fn attempt_in_span(&self, d: Claimed) -> Result<Ack, Deferral> {
        let started_at = Utc::now();
        let clock = Instant::now();
        let policy = endpoint_policy(d.retry.as_ref())
            .unwrap_or_else(|| self.settings.default_retry.clone());
        let body = envelope(&d);

        let finish = |settle: Settle,
                      code: Option<u16>,
                      response_body: Option<Bytes>,
                      error: Option<String>| Ack {
            id: d.id,
            attempt: d.attempt,
            endpoint_id: d.endpoint_id.clone(),
            settle,
            record: AttemptRecord {
                started_at,
                duration_ms: clock.elapsed().as_millis().min(i32::MAX as u128) as i32,
                status_code: code.map(i32::from),
                response_body,
                error,
            },
        };

        let url = match reqwest::Url::parse(&d.url) {
            Ok(u) => u,
            Err(e) => {
                return Ok(finish(
                    Settle::Failed,
                    None,
                    None,
                    Some(format!("invalid endpoint URL: {e}")),
                ))
            }
        };
        let headers = match build_headers(&d, &body, &self.secrets) {
            Ok(h) => h,
            Err(e) => {
                let reason = format!(
                    "this replica cannot prepare deliveries to endpoint {}: {e}",
                    d.endpoint_id
                );
                tracing::error!(error = %reason, "delivery deferred; the replica is marked unready");
                self.health.set_fault(reason.clone());
                return Err(Deferral {
                    id: d.id,
                    attempt: d.attempt,
                    reason,
                });
            }
        };

        let retry_at = |retry_after: Option<Duration>| {
            policy
                .next_delay(d.attempt as u32, retry_after)
                .map(|delay| Settle::Retry {
                    // Validated policies stay under 30 days; the bound also holds for anything
                    // else (a policy stored by an older build, a jitter rounding up).
                    at: Utc::now()
                        + chrono::Duration::from_std(delay.min(retry::MAX_RETRY_DELAY))
                            .expect("30 days fits"),
                })
                .unwrap_or(Settle::Failed)
        };

        let ack = match self
            .client
            .post(&url, headers, body, self.settings.request_timeout)
            .await
        {
            Ok(resp) if (200..300).contains(&resp.status) => {
                tracing::debug!(status = resp.status, "delivered");
                finish(Settle::Delivered, Some(resp.status), Some(resp.body), None)
            }
            Ok(resp) if resp.status == 410 => {
                tracing::warn!(
                    "endpoint answered 410 Gone; disabling it and pausing its deliveries"
                );
                finish(
                    Settle::EndpointGone,
                    Some(410),
                    Some(resp.body),
                    Some("410 Gone: endpoint disabled".into()),
                )
            }
            Ok(resp) => {
                let retry_after = resp
                    .headers
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry::parse_retry_after(v, std::time::SystemTime::now()));
                let settle = retry_at(retry_after);
                let error = if (300..400).contains(&resp.status) {
                    format!("HTTP {} (redirects are not followed)", resp.status)
                } else {
                    format!("HTTP {}", resp.status)
                };
                tracing::info!(
                    status = resp.status,
                    final_attempt = settle == Settle::Failed,
                    "attempt failed"
                );
                finish(settle, Some(resp.status), Some(resp.body), Some(error))
            }
            Err(e) => {
                let settle = retry_at(None);
                let kind = match &e {
                    SendError::Blocked(_) => "blocked",
                    SendError::Timeout(_) => "timeout",
                    SendError::Connect(_) => "connect",
                    SendError::Other(_) => "other",
                };
                tracing::info!(error = %e, kind, final_attempt = settle == Settle::Failed, "attempt failed");
                finish(settle, None, None, Some(e.to_string()))
            }
        };
        Ok(ack)
    }
}

/// An endpoint's own retry policy, when it has a valid one.
fn endpoint_policy(retry: Option<&serde_json::Value>) -> Option<RetryPolicy> {
    let value = retry?;
    if value.is_null() {
        return None;
    }
    let config: RetryConfig = serde_json::from_value(value.clone()).ok()?;
    RetryPolicy::from_config(&config).ok()
}

/// The body receivers get: `{"id", "type", "timestamp", "data"}` (the seed's envelope). The
/// payload is spliced in as the JSON text Postgres returned, without a parse.
pub fn envelope(d: &Claimed) -> Bytes {
    let timestamp = d.created_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let event_type = serde_json::to_string(&d.event_type).expect("a string serializes");
    Bytes::from(format!(
        r#"{{"id":"{}","type":{},"timestamp":"{}","data":{}}}"#,
        d.event_id, event_type, timestamp, d.payload
    ))
}

/// Content type, the endpoint's custom headers, then the signature headers (last, so a custom
/// header can never replace them).
fn build_headers(d: &Claimed, body: &[u8], vault: &SecretBox) -> Result<HeaderMap, String> {
    let endpoint = d.endpoint_id.as_str();
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(custom) = d.headers.as_object() {
        for (name, value) in custom {
            let opened = value.as_str().map(|v| {
                vault
                    .open(v, Field::Header { endpoint, name })
                    .map_err(|e| format!("custom header {name:?}: {e}"))
            });
            let value = match opened {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => return Err(e),
                None => None,
            };
            let (Ok(name), Some(Ok(value))) = (
                HeaderName::from_bytes(name.as_bytes()),
                value.as_deref().map(HeaderValue::from_str),
            ) else {
                return Err(format!("custom header {name:?} is not a valid header"));
            };
            h.insert(name, value);
        }
    }
    // W3C trace context the app attached to the event travels with it.
    if let Some(meta) = d.metadata.as_ref().and_then(|m| m.as_object()) {
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = meta
                .get(name)
                .and_then(|v| v.as_str())
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                h.insert(name, value);
            }
        }
    }
    let now = Utc::now().timestamp();
    let scheme: SignatureScheme = d.signature.parse().map_err(|e: String| e)?;
    let secrets: Vec<String> = d
        .secrets
        .iter()
        .map(|s| vault.open(s, Field::Secret { endpoint }))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let ts = HeaderValue::from(now);
    match scheme {
        SignatureScheme::Standard => {
            let keys: Vec<Vec<u8>> = secrets
                .iter()
                .filter_map(|s| signing::standard_key(s).ok())
                .collect();
            if keys.is_empty() {
                return Err("endpoint has no valid unexpired secret to sign with".into());
            }
            let id = d.event_id.to_string();
            let sig = signing::standard_header(&keys, &id, now, body);
            h.insert(
                "webhook-id",
                HeaderValue::from_str(&id).expect("uuid is ASCII"),
            );
            h.insert("webhook-timestamp", ts);
            h.insert(
                "webhook-signature",
                HeaderValue::from_str(&sig).expect("base64 is ASCII"),
            );
        }
        SignatureScheme::Legacy => {
            let secret = secrets
                .first()
                .ok_or("endpoint has no unexpired secret to sign with")?;
            let sig = signing::legacy_signature(secret, now, body);
            h.insert(
                "x-webhook-signature",
                HeaderValue::from_str(&sig).expect("hex is ASCII"),
            );
            h.insert("x-webhook-timestamp", ts);
            h.insert(
                "x-webhook-delivery-id",
                HeaderValue::from_str(&d.id.to_string()).expect("uuid is ASCII"),
            );
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(concurrency: usize, per_endpoint: usize) -> Arc<Capacity> {
        let config = Config::from_toml_str(&format!(
            "[database]\nurl = \"postgres://127.0.0.1/app\"\n[outbound]\n\
             concurrency = {concurrency}\nper_endpoint_concurrency = {per_endpoint}\n"
        ))
        .expect("valid config");
        Capacity::new(&WorkerSettings::from_config(&config))
    }

    #[test]
    fn holds_are_bounded_per_endpoint_and_per_replica_and_given_back_on_drop() {
        // 2 requests -> 8 holds per replica; 1 request per endpoint -> 16 holds per endpoint.
        let cap = capacity(2, 1);
        let a: Vec<Hold> = std::iter::from_fn(|| cap.try_hold("a", 10)).collect();
        assert_eq!(a.len(), 8, "the replica-wide bound applies first");
        assert!(cap.try_hold("b", 10).is_none());
        drop(a);
        assert_eq!(cap.holds.available_permits(), 8);
        assert!(cap.held_per_endpoint().is_empty());

        // 8 requests -> 32 holds per replica; 1 per endpoint -> 16 holds per endpoint.
        let cap = capacity(8, 1);
        let a: Vec<Hold> = std::iter::from_fn(|| cap.try_hold("a", 10)).collect();
        assert_eq!(a.len(), 16, "one endpoint cannot take every hold");
        assert!(cap.try_hold("b", 10).is_some());
        assert_eq!(cap.held_per_endpoint(), vec![("a".to_string(), 16)]);
    }

    #[test]
    fn a_revocation_voids_holds_claimed_before_it_even_if_counted_after() {
        let cap = capacity(8, 4);
        let claim_sent = std::time::Instant::now();
        cap.revoke("a");
        // The claim's result is handled after the revocation arrived: still void.
        let slot = cap.take_free().into_iter().next().unwrap();
        let late = cap.hold_claimed("a", slot, 10, claim_sent).unwrap();
        assert!(cap.is_revoked(&late));
        let fresh = cap.try_hold("a", 10).unwrap();
        assert!(!cap.is_revoked(&fresh), "taken after the revocation");
        let other = cap.try_hold("b", 10).unwrap();
        assert!(!cap.is_revoked(&other));
        cap.revoke_all();
        assert!(cap.is_revoked(&fresh) && cap.is_revoked(&other));
        assert!(!cap.is_revoked(&cap.try_hold("b", 10).unwrap()));
        // A stop also refuses new holds until it is lifted.
        cap.stop("c");
        assert!(cap.try_hold("c", 10).is_none());
        cap.resume("c");
        assert!(cap.try_hold("c", 10).is_some());
    }

    #[test]
    fn holds_are_bounded_by_the_memory_budget() {
        let config = Config::from_toml_str(
            "[database]\nurl = \"postgres://127.0.0.1/app\"\n[outbound]\n\
             max_payload = \"256KiB\"\nmemory_budget = \"8MiB\"\n",
        )
        .expect("valid config");
        let cap = Capacity::new(&WorkerSettings::from_config(&config));
        // Holds get half of 8 MiB; each 256 KiB payload is charged 513 KiB: seven fit.
        let held: Vec<Hold> = std::iter::from_fn(|| cap.try_hold("a", 256 << 10))
            .take(20)
            .collect();
        assert_eq!(held.len(), 7);
        assert!(!cap.has_room_for_a_claim());
        // Small payloads still fit in what is left.
        assert!(cap.try_hold("b", 100).is_some());
        drop(held);
        assert!(cap.has_room_for_a_claim());
        assert!(Config::from_toml_str(
            "[database]\nurl = \"postgres://127.0.0.1/app\"\n[outbound]\n\
             max_payload = \"1MiB\"\nmemory_budget = \"1MiB\"\n",
        )
        .is_err());
    }

    #[tokio::test]
    async fn a_claim_keeps_only_the_holds_it_used_and_requests_are_bounded() {
        let cap = capacity(1, 1);
        let taken = cap.take_free();
        assert_eq!(taken.len(), 3, "a quarter stays free for fresh deliveries");
        assert_eq!(cap.holds.available_permits(), 1);
        let mut taken = taken.into_iter();
        let hold = cap
            .hold_claimed("a", taken.next().unwrap(), 10, std::time::Instant::now())
            .unwrap();
        drop(taken);
        assert_eq!(cap.holds.available_permits(), 3);
        // A request slot of the endpoint and of the replica, then none until it is returned.
        let slot = cap.request_slot(&hold).await.expect("a request slot");
        assert_eq!(cap.requests_in_flight(1), 1);
        let second = cap.try_hold("a", 10).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), cap.request_slot(&second))
                .await
                .is_err(),
            "the endpoint's one request slot is taken"
        );
        drop(slot);
        assert_eq!(cap.requests_in_flight(1), 0);
        drop(hold);
        assert_eq!(cap.held_per_endpoint(), vec![("a".to_string(), 1)]);
    }
}
