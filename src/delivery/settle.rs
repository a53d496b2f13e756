//! Writing outcomes: the settler takes every finished attempt, hand-back and deferral, writes them
//! in batches, and only then drops their holds. Invariant: an outcome is retried until written or
//! left to its lease (the reaper makes it due again); a row the database refuses never holds back
//! the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use super::state::{self, Ack, AttemptRecord, DeliveryStore, Settle};
use super::{Done, Report, DEFER_DELAY};

/// The outcome of an attempt the drain deadline cut short.
pub(super) fn cut_short(id: Uuid, attempt: i32, endpoint: &str) -> Ack {
    Ack {
        id,
        attempt,
        endpoint_id: endpoint.to_string(),
        // Due again, so still its key's head: the key does not move.
        ordering_key: None,
        // Says nothing about the receiver: not counted by its breaker.
        judged: false,
        probe: false,
        retry_after: None,
        settle: Settle::Retry { at: Utc::now() },
        record: AttemptRecord {
            started_at: Utc::now(),
            duration_ms: 0,
            status_code: None,
            response_body: None,
            error: Some(
                "cut short at shutdown (the drain deadline passed): outcome unknown".into(),
            ),
            request_headers: None,
        },
    }
}

/// Writes outcomes in batches: whatever has arrived since the last write goes in one transaction.
/// Only then are the deliveries' holds dropped (their slots freed) and the claimer told.
pub(super) async fn settle_loop(
    store: Arc<DeliveryStore>,
    owner: Uuid,
    mut rx: mpsc::UnboundedReceiver<Done>,
    slots_freed: Arc<Notify>,
    sweep_now: Arc<Notify>,
    wake: Arc<Notify>,
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
                Report::Written => {}
            }
        }
        let started = Instant::now();
        let outcomes = acks.len();
        let gone = acks.iter().any(|a| a.settle == Settle::EndpointGone);
        if write_outcomes(&store, owner, acks).await > 0 {
            // The next deliveries of keys whose head just finished are due now.
            wake.notify_one();
        }
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

/// How many times a batch (of outcomes, or of hand-backs) is retried when the database is away
/// (about five minutes when each try fails at once, at [`WRITE_RETRY_MAX`] apart) before it is
/// left to the leases (the reaper then makes the deliveries due again: at-least-once, never lost).
const WRITE_TRIES: u32 = 300;

/// The longest wait between two tries of a batch while the database is away: when it answers
/// again, the outcomes are written well inside [`state::LAPSE_GRACE`], before a lapsed lease makes
/// their deliveries due again (which would send a delivered event twice). Hand-backs use it too, as
/// the settler writes one batch at a time. Best effort: a try stuck on a connection that hangs
/// silently ends only with the pool's and TCP's timeouts.
const WRITE_RETRY_MAX: Duration = Duration::from_secs(1);
const _: () = assert!(WRITE_RETRY_MAX.as_millis() * 2 <= state::LAPSE_GRACE.as_millis());

/// Writes a batch of outcomes. A batch the database refuses as a statement (bad data in one row)
/// is written row by row, so one row can never hold back the others; a row still refused is
/// written without what the receiver sent, with the reason. A batch that fails for want of a
/// database is retried whole, with backoff.
/// Returns how many ordering keys' next deliveries became due.
async fn write_outcomes(store: &DeliveryStore, owner: Uuid, mut acks: Vec<Ack>) -> i32 {
    let mut delay = Duration::from_millis(100);
    let mut promoted = 0;
    for attempt in 1..=WRITE_TRIES {
        if acks.is_empty() {
            return promoted;
        }
        let e = match store.settle(owner, &acks).await {
            Ok(n) => return promoted + n,
            Err(e) => e,
        };
        if state::is_statement_error(&e) {
            tracing::warn!(error = %format!("{e:#}"), batch = acks.len(), "a batch of outcomes was refused; writing them one by one");
            let mut unwritten = Vec::new();
            for ack in acks {
                match store.settle(owner, std::slice::from_ref(&ack)).await {
                    Ok(n) => promoted += n,
                    Err(e) if state::is_statement_error(&e) => {
                        let reason = format!("{e:#}");
                        tracing::error!(delivery.id = %ack.id, error = %reason, "an outcome was refused; recording it without the response");
                        let stripped = ack.without_receiver_data(&reason);
                        match store.settle(owner, std::slice::from_ref(&stripped)).await {
                            Ok(n) => promoted += n,
                            Err(e) if state::is_statement_error(&e) => {
                                tracing::error!(delivery.id = %ack.id, error = %format!("{e:#}"),
                                    "an outcome cannot be recorded at all; its lease will lapse");
                            }
                            Err(_) => unwritten.push(stripped),
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
            return promoted;
        }
        tracing::warn!(error = %format!("{e:#}"), batch = acks.len(), "recording outcomes failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(WRITE_RETRY_MAX);
    }
    promoted
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
                delay = (delay * 2).min(WRITE_RETRY_MAX);
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "handing back deliveries failed for good; their leases will lapse")
            }
        }
    }
}
