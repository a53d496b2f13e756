//! Delivery: the worker claims due deliveries under a lease (or takes the fan-out's handoffs),
//! runs each attempt as a task (`attempt`), and the settler writes the outcomes in batches
//! (`settle`); `capacity` bounds what the replica holds, `state` owns the statuses and their SQL.
//! Invariant: at most `concurrency` requests in flight per replica (and a quarter more, one per
//! endpoint, while every slot is taken: `slots`) and `per_endpoint_concurrency` per endpoint; every claimed delivery ends settled, handed back, deferred or (if this process
//! dies) reaped when its lease lapses: none is ever dropped.

mod attempt;
mod capacity;
pub mod client;
mod handoff;
pub mod retry;
mod settle;
mod slots;
pub mod ssrf;
pub mod state;

pub use capacity::{Capacity, FailureMark, Hold};
use handoff::foldable;
pub use handoff::{FanOutCommit, FanOutCommitted, Folded, Handoff};

pub use attempt::envelope;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::Config;
use crate::crypto::SecretBox;
use crate::telemetry::{Health, Metrics};
use attempt::AttemptContext;
use client::WebhookClient;
use retry::RetryPolicy;
use settle::{cut_short, settle_loop};
use state::{Ack, Claimed, DeliveryStore, Room, Settle};

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

/// How soon a claim that left deliveries waiting for tokens looks again.
const RATE_HELD_RETRY: Duration = Duration::from_millis(50);

/// Time kept free at the end of a lease for recording the outcome.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// A finished (or handed back) delivery on its way to the database, with the hold it releases
/// once its outcome is written (none for one handed back before it was held).
struct Done {
    report: Report,
    _hold: Option<Hold>,
    /// A failure's mark, dropped once it is written (see [`FailureMark`]).
    _failing: Option<FailureMark>,
}

/// What an attempt task reports.
enum Report {
    Settled(Ack),
    /// Written by the fan-out that made the delivery (see [`Folded`]): nothing left to write.
    Written,
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

/// How long a deferred delivery waits before any replica (one with the right key, say) tries it
/// again; meanwhile `/readyz` tells the operator why.
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
            self.wake.clone(),
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
        // The last claim left due deliveries for want of tokens: look again soon (the bucket
        // holds a tenth of a second, so waiting a whole poll interval would waste tokens).
        let mut rate_held = false;
        let mut handoffs_open = true;
        // Whether due deliveries may be waiting in the table. Fresh ones usually arrive as
        // handoffs, so a freed hold is a reason to claim only while the last claim found work or
        // was cut short by an endpoint's limit.
        let mut backlog = true;
        let mut claim_now = true;
        // Retries fall due without anyone ringing: claim at least once per poll interval, however
        // busy the handoffs keep this loop.
        let mut next_poll = tokio::time::Instant::now();
        // When the next claim from the reserve may be made.
        let mut reserve_at = next_poll;
        while !shutdown.is_cancelled() {
            if claim_now {
                // With every hold taken (slow endpoints keep theirs waiting for request slots),
                // the reserve lets endpoints holding fewer than their request slots be claimed:
                // once per poll interval, as a saturated drain would otherwise send a claim that
                // finds nothing each time it is rung.
                // The same when the memory budget is short of the largest payload (a slow
                // endpoint's large payloads keep it): payloads that fit whole may still go.
                let now = tokio::time::Instant::now();
                let room = Room::Bytes(self.capacity.payload_room());
                let (slots, per_endpoint_cap, room) = if !self.capacity.has_room_for_a_claim() {
                    if now >= reserve_at {
                        reserve_at = now + self.settings.poll_interval;
                        let free = self.capacity.take_free();
                        let slots = if free.is_empty() {
                            self.capacity.take_reserve()
                        } else {
                            free
                        };
                        // Less a KiB: a payload that fits the room exactly would be charged
                        // a KiB more than is left (see `charge_kib`) and handed back.
                        let whole = Room::Whole(self.capacity.payload_room() - 1024);
                        (slots, self.capacity.reserve_per_endpoint(), whole)
                    } else {
                        (Vec::new(), 0, room)
                    }
                } else {
                    match self.capacity.take_free() {
                        free if free.is_empty() && now >= reserve_at => {
                            reserve_at = now + self.settings.poll_interval;
                            (
                                self.capacity.take_reserve(),
                                self.capacity.reserve_per_endpoint(),
                                room,
                            )
                        }
                        free => (free, self.capacity.per_endpoint_held, room),
                    }
                };
                if !slots.is_empty() {
                    let claimed_at = std::time::Instant::now();
                    let busy = self.capacity.held_per_endpoint();
                    let claim = self.store.claim(
                        self.capacity.any_hindered(),
                        self.owner,
                        slots.len().min(self.capacity.rows_for_room()) as i64,
                        per_endpoint_cap,
                        &busy,
                        self.settings.lease,
                        room,
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
                        Ok((batch, held)) => {
                            if held > 0 {
                                self.metrics.rate_limited.inc_by(held);
                            }
                            rate_held = held > 0;
                            claim_failures = 0;
                            // An endpoint at its limit of held deliveries may have more waiting:
                            // the next freed hold is a reason to look again.
                            let limited = busy.iter().any(|(_, n)| *n >= per_endpoint_cap);
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
                                    Some(hold) => attempts.start(delivery, hold, None, None),
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
                    } else if rate_held {
                        self.settings.poll_interval.min(RATE_HELD_RETRY)
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
        let in_flight = self.capacity.requests_in_flight();
        tracing::info!(in_flight, "delivery worker draining");
        // The dispatcher may still be finishing a pass: what it hands over now goes straight back.
        let return_handoffs = async {
            while let Some(batch) = handoffs.recv().await {
                for h in batch {
                    // Not waited for: the fan-out writes the delivery `delivering`.
                    drop(h.fold);
                    if !h.commit.committed().await {
                        continue;
                    }
                    let report = Report::HandBack(h.delivery.id, h.delivery.attempt);
                    let _ = report_tx.send(Done {
                        report,
                        _hold: Some(h.hold),
                        _failing: None,
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
            .for_each(|h| self.start(h.delivery, h.hold, Some(h.commit), h.fold));
    }

    /// `commit`: for a handed-off delivery, its fan-out's commit (see [`FanOutCommit`]); `fold`:
    /// where its 2xx outcome goes while that fan-out waits for it (see [`Folded`]).
    fn start(
        &self,
        delivery: Claimed,
        mut hold: Hold,
        commit: Option<FanOutCommit>,
        fold: Option<tokio::sync::oneshot::Sender<Folded>>,
    ) {
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
            if commit.as_ref().is_some_and(FanOutCommit::failed) {
                return;
            }
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
            // Nor is one whose fan-out failed to commit while it waited: it does not exist.
            if commit.as_ref().is_some_and(FanOutCommit::failed) {
                return;
            }
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
            // A failure the breaker counts is marked until written: meanwhile no success of its
            // endpoint goes ahead of it through a fan-out's commit.
            let failing = match &report {
                Report::Settled(a) if a.judged && matches!(a.settle, Settle::Retry { .. } | Settle::Failed) => {
                    Some(capacity.mark_failure(&hold.endpoint))
                }
                _ => None,
            };
            // A 2xx the fan-out still waits for is written in its commit; anything else, or a
            // fan-out that stopped waiting, is settled here once the commit is known.
            let report = match (report, fold) {
                (Report::Settled(ack), Some(fold))
                    if foldable(&ack) && !capacity.failing(&hold.endpoint) =>
                {
                    let reports = reports.clone();
                    match fold.send(Folded { ack, hold, reports }) {
                        Ok(()) => return,
                        Err(back) => {
                            hold = back.hold;
                            Report::Settled(back.ack)
                        }
                    }
                }
                (report, _) => report,
            };
            if let Some(commit) = commit {
                // The commit's answer normally comes within milliseconds; past the drain
                // deadline it gets one second more, so a hung database cannot hold shutdown.
                let committed = tokio::select! {
                    biased;
                    committed = commit.clone().committed() => committed,
                    _ = abort.cancelled() => {
                        tokio::time::timeout(Duration::from_secs(1), commit.committed())
                            .await
                            .unwrap_or(false)
                    }
                };
                if !committed {
                    tracing::warn!(
                        delivery.id = %id,
                        "the fan-out that made this delivery did not commit; its outcome is not recorded and the event is delivered again"
                    );
                    return;
                }
            }
            let _ = reports.send(Done {
                report,
                _hold: Some(hold),
                _failing: failing,
            });
        });
    }

    /// Returns a claimed delivery this replica cannot hold.
    fn hand_back(&self, delivery: &Claimed) {
        let _ = self.reports.send(Done {
            report: Report::HandBack(delivery.id, delivery.attempt),
            _hold: None,
            _failing: None,
        });
    }
}
