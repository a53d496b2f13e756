//! The fold: a small fan-out pass waits a moment for the 2xx outcomes of the deliveries it handed
//! over and inserts them `delivered`, with their attempts, in its own commit. Invariant: an outcome
//! offered to a pass is either written by its commit, given back to the settler, or (the commit
//! failed) dropped with a delivery that does not exist; never lost between the two.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::delivery::{Folded, Handoff};

/// The fan-out's insert with outcomes it waited for (`$11`-`$16`, column by column): those
/// deliveries go in `delivered` with their attempt, unless their endpoint's breaker is counting
/// failures (its count must see the success: the settler's statement does that, so such an
/// outcome is left to it and its delivery goes in `delivering`, leased). Returns the ids written
/// `delivered`.
pub(super) const INSERT_FOLDED: &str = "WITH marked AS (
         UPDATE __SCHEMA__.outbox SET dispatched_at = now() WHERE id = ANY($10::bigint[])
     ), f AS (
         SELECT * FROM unnest($11::uuid[], $12::int[], $13::timestamptz[], $14::int[], $15::bytea[],
                              $16::text[])
           AS f(id, status_code, started_at, duration_ms, response_excerpt, request_headers)
     ), ins AS (
         INSERT INTO __SCHEMA__.deliveries
            (id, outbox_id, event_id, event_type, endpoint_id, status, attempts, lease_owner,
             lease_expires_at, ordering_key, last_status_code, delivered_at, updated_at)
         SELECT u.id, u.outbox_id, u.event_id, u.event_type, u.endpoint_id, s.status,
                CASE WHEN s.status IN ('delivering', 'delivered') THEN 1 ELSE 0 END,
                CASE WHEN s.status = 'delivering' THEN $7::uuid END,
                CASE WHEN s.status = 'delivering' THEN clock_timestamp() + make_interval(secs => $8) END,
                u.ordering_key,
                CASE WHEN s.status = 'delivered' THEN f.status_code END,
                -- The transaction began before the attempt did.
                CASE WHEN s.status = 'delivered' THEN clock_timestamp() END,
                CASE WHEN s.status = 'delivered' THEN clock_timestamp() ELSE now() END
         FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::text[], $9::text[])
           AS u(id, outbox_id, event_id, event_type, endpoint_id, status, ordering_key)
         LEFT JOIN f ON f.id = u.id
         CROSS JOIN LATERAL (
             SELECT CASE WHEN f.id IS NOT NULL AND u.status = 'delivering' AND NOT EXISTS (
                             SELECT 1 FROM __SCHEMA__.endpoint_flow x
                             WHERE x.endpoint_id = u.endpoint_id
                               AND (x.consecutive_failures > 0 OR x.window_failures > 0
                                    OR x.opened_at IS NOT NULL))
                         THEN 'delivered' ELSE u.status END AS status) s
         RETURNING id, status
     ), recorded AS (
         INSERT INTO __SCHEMA__.attempts
            (delivery_id, attempt, started_at, duration_ms, status_code, response_excerpt, request_headers)
         SELECT f.id, 1, f.started_at, f.duration_ms, f.status_code, f.response_excerpt, f.request_headers
         FROM f JOIN ins ON ins.id = f.id AND ins.status = 'delivered'
     )
     SELECT id FROM ins WHERE status = 'delivered'";

/// How long a small pass waits, its commit unsent, for the 2xx outcomes of the deliveries it
/// handed over, to insert them `delivered` with their attempts (one row version and one
/// transaction per delivery fewer than settling them after: see `delivery::Folded`). The
/// requests are already out, so the wait delays no delivery, only this pass's commit (its loop
/// is busy meanwhile; the other loop takes the next wake-up).
const FOLD_WAIT: Duration = Duration::from_millis(2);

/// After [`FOLD_PATIENCE`] waits in a row ran out for an endpoint (a receiver slower than
/// [`FOLD_WAIT`]), passes do not wait for its outcomes for this long: a slow receiver should not
/// hold every pass for the whole wait.
const FOLD_PAUSE: Duration = Duration::from_millis(250);

/// How many waits in a row (a replica's loops together) must run out for an endpoint before
/// passes stop waiting for it: on a busy machine one runs out now and then by chance, and pausing
/// after each left a quarter to three quarters of the 1,000/s stream's outcomes to the settler
/// (BENCHMARKS.md, "Issue 16, fifteenth session"). Counted per endpoint, so another endpoint's
/// quick answers cannot keep a slow one's count from growing.
const FOLD_PATIENCE: u32 = 3;

/// Small passes wait for outcomes only while they come at least this close together (about 100
/// events/s or more): below that the CPU a fold saves does not matter, and in three alternated
/// pairs the 20/s median was 0.09-0.40 ms higher with every pass waiting (BENCHMARKS.md, "Issue
/// 16, fourteenth session").
const FOLD_BUSY: Duration = Duration::from_millis(10);

/// When a replica's small passes may wait for outcomes, shared by its loops: the last small pass
/// (see [`FOLD_BUSY`]) and, per endpoint, the waits that ran out and the end of a pause
/// ([`FOLD_PAUSE`]).
#[derive(Clone, Default)]
pub struct FoldState(Arc<Mutex<FoldTimes>>);

#[derive(Default)]
struct FoldTimes {
    last_small_pass: Option<Instant>,
    /// Endpoints whose last wait ran out or that are paused; one whose outcomes came leaves.
    slow: HashMap<String, Slow>,
}

impl FoldTimes {
    fn paused(&self, endpoint: &str, now: Instant) -> bool {
        self.slow
            .get(endpoint)
            .and_then(|s| s.paused_until)
            .is_some_and(|until| now < until)
    }
}

struct Slow {
    /// Waits that ran out in a row, each within [`FOLD_PAUSE`] of the one before.
    ran_out: u32,
    last_late: Instant,
    paused_until: Option<Instant>,
}

/// An outcome a pass waits for, with its endpoint.
pub(super) struct Offered {
    endpoint: String,
    rx: Option<oneshot::Receiver<Folded>>,
}

impl FoldState {
    /// Called by every small pass that took events: whether the stream is busy enough for it to
    /// wait for outcomes.
    pub(super) fn small_pass(&self) -> bool {
        let mut t = self.0.lock().expect("fold state");
        // Read under the lock: the other loop's pass may have just stored its own time.
        let now = Instant::now();
        let busy = t
            .last_small_pass
            .is_some_and(|last| now.saturating_duration_since(last) < FOLD_BUSY);
        t.last_small_pass = Some(now);
        busy
    }

    /// Offers the pass the outcomes of the deliveries it hands over, but those of endpoints
    /// paused now (their deliveries are settled as any other).
    pub(super) fn offer(&self, handoffs: &mut [Handoff]) -> Vec<Offered> {
        let t = self.0.lock().expect("fold state");
        let now = Instant::now();
        let mut offered = Vec::with_capacity(handoffs.len());
        for h in handoffs {
            let endpoint = &h.delivery.endpoint_id;
            if t.paused(endpoint, now) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            h.fold = Some(tx);
            offered.push(Offered {
                endpoint: endpoint.clone(),
                rx: Some(rx),
            });
        }
        offered
    }

    /// Whether passes wait for this endpoint's outcomes now.
    #[cfg(test)]
    fn waits_for(&self, endpoint: &str) -> bool {
        !self
            .0
            .lock()
            .expect("fold state")
            .paused(endpoint, Instant::now())
    }

    /// Called after every wait with each endpoint it waited for, once: whether the wait ran out
    /// with some of that endpoint's outcomes still to come. One lock per wait.
    fn waited(&self, endpoints: &[(&str, bool)]) {
        let mut t = self.0.lock().expect("fold state");
        let now = Instant::now();
        // What no longer counts leaves (an endpoint deleted, or gone quiet, after a late wait):
        // the map holds only endpoints late or paused just now.
        t.slow.retain(|_, s| {
            s.paused_until.is_some_and(|until| now < until)
                || now.saturating_duration_since(s.last_late) < FOLD_PAUSE
        });
        for &(endpoint, ran_out) in endpoints {
            if !ran_out {
                t.slow.remove(endpoint);
                continue;
            }
            let slow = t.slow.entry(endpoint.to_string()).or_insert(Slow {
                ran_out: 0,
                last_late: now,
                paused_until: None,
            });
            slow.ran_out += 1;
            slow.last_late = now;
            if slow.ran_out >= FOLD_PATIENCE {
                slow.ran_out = 0;
                slow.paused_until = Some(now + FOLD_PAUSE);
            }
        }
    }
}

/// Waits up to [`FOLD_WAIT`] for the outcomes offered on `offered`: those that came. One that
/// is not foldable closes its channel unsent, so a pass whose outcomes are all in (or all
/// refused) goes on at once.
pub(super) async fn gather(state: &FoldState, mut offered: Vec<Offered>) -> Vec<Folded> {
    use std::future::Future;
    use std::task::Poll;
    let mut got = Vec::new();
    if offered.is_empty() {
        return got;
    }
    let all = std::future::poll_fn(|cx| {
        let mut open = false;
        for slot in offered.iter_mut() {
            if let Some(rx) = &mut slot.rx {
                match std::pin::Pin::new(rx).poll(cx) {
                    Poll::Ready(Ok(f)) => {
                        got.push(f);
                        slot.rx = None;
                    }
                    Poll::Ready(Err(_)) => slot.rx = None,
                    Poll::Pending => open = true,
                }
            }
        }
        if open {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    });
    let ran_out = tokio::time::timeout(FOLD_WAIT, all).await.is_err();
    // Each endpoint once: ran out if any of its outcomes had not come.
    let mut seen: Vec<(&str, bool)> = Vec::new();
    for o in &offered {
        let late = o.rx.is_some();
        match seen.iter_mut().find(|(e, _)| *e == o.endpoint) {
            Some((_, l)) => *l |= late,
            None => seen.push((&o.endpoint, late)),
        }
    }
    state.waited(&seen);
    if ran_out {
        // Closed first, so an outcome sent as the wait ended is either here or back with
        // its sender (who settles it), never dropped in between.
        for mut rx in offered.into_iter().filter_map(|o| o.rx) {
            rx.close();
            if let Ok(f) = rx.try_recv() {
                got.push(f);
            }
        }
    }
    got
}

/// The outcomes a pass waited for, column by column (`INSERT_FOLDED`'s `$11`-`$16`).
#[derive(Default)]
pub(super) struct FoldedColumns<'a> {
    ids: Vec<Uuid>,
    codes: Vec<Option<i32>>,
    started: Vec<chrono::DateTime<chrono::Utc>>,
    durations: Vec<i32>,
    bodies: Vec<Option<&'a [u8]>>,
    sent: Vec<Option<&'a str>>,
}

impl<'a> FoldedColumns<'a> {
    pub(super) fn of(folded: &'a [Folded]) -> Self {
        let mut c = Self::default();
        for f in folded {
            let r = &f.ack.record;
            c.ids.push(f.ack.id);
            c.codes.push(r.status_code);
            c.started.push(r.started_at);
            c.durations.push(r.duration_ms);
            c.bodies.push(r.response_body.as_deref());
            c.sent.push(r.request_headers.as_deref());
        }
        c
    }

    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.ids,
            &self.codes,
            &self.started,
            &self.durations,
            &self.bodies,
            &self.sent,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outcome of `endpoint` offered and never sent: the wait runs out. Its sender is
    /// returned, to be kept or dropped (dropped unsent: refused, an answer).
    fn offered(endpoint: &str) -> (oneshot::Sender<Folded>, Offered) {
        let (tx, rx) = oneshot::channel();
        let endpoint = endpoint.to_string();
        (
            tx,
            Offered {
                endpoint,
                rx: Some(rx),
            },
        )
    }

    async fn silent(state: &FoldState, endpoint: &str) {
        let (_kept, o) = offered(endpoint);
        assert!(gather(state, vec![o]).await.is_empty());
    }

    async fn answered(state: &FoldState, endpoint: &str) {
        let (refused, o) = offered(endpoint);
        drop(refused);
        assert!(gather(state, vec![o]).await.is_empty());
    }

    /// A wait that ran out now and then (a busy machine) pauses nothing; `FOLD_PATIENCE` in a row
    /// (a slow receiver) pause waiting for that endpoint, and a wait whose outcomes all came
    /// starts its count again.
    #[tokio::test]
    async fn an_endpoint_is_paused_only_after_several_waits_in_a_row_ran_out() {
        let state = FoldState::default();
        assert!(state.waits_for("e"));
        silent(&state, "e").await;
        assert!(state.waits_for("e"), "paused after one wait ran out");
        for _ in 1..FOLD_PATIENCE - 1 {
            silent(&state, "e").await;
            assert!(
                state.waits_for("e"),
                "paused after fewer waits than the patience"
            );
        }
        answered(&state, "e").await;
        for _ in 0..FOLD_PATIENCE - 1 {
            silent(&state, "e").await;
            assert!(
                state.waits_for("e"),
                "the answered wait did not start the count again"
            );
        }
        silent(&state, "e").await;
        assert!(
            !state.waits_for("e"),
            "not paused after {FOLD_PATIENCE} waits in a row ran out"
        );
    }

    /// Late waits far apart are not "in a row": after a quiet spell the count starts afresh, and
    /// an endpoint that is no longer late or paused (deleted, or gone quiet) leaves the state.
    #[tokio::test]
    async fn late_waits_far_apart_do_not_add_up_and_are_forgotten() {
        let state = FoldState::default();
        for _ in 0..FOLD_PATIENCE - 1 {
            silent(&state, "e").await;
        }
        silent(&state, "gone").await;
        tokio::time::sleep(FOLD_PAUSE + Duration::from_millis(20)).await;
        silent(&state, "e").await;
        assert!(
            state.waits_for("e"),
            "paused by late waits a quiet spell apart"
        );
        let kept: Vec<String> = state.0.lock().unwrap().slow.keys().cloned().collect();
        assert_eq!(
            kept,
            vec!["e".to_string()],
            "an endpoint no longer late was kept"
        );
    }

    fn handoff(capacity: &Arc<crate::delivery::Capacity>, endpoint: &str) -> Handoff {
        let delivery = crate::delivery::state::Claimed::for_test(endpoint, "t", "{}");
        Handoff {
            hold: capacity.try_hold(endpoint, 2).expect("room"),
            delivery,
            commit: crate::delivery::FanOutCommit::new().1,
            fold: None,
        }
    }

    /// A pass is offered the outcomes of every delivery but a paused endpoint's: those get no
    /// channel (the settler writes them), and a pass whose endpoints are all paused is offered
    /// nothing, so it does not wait.
    #[tokio::test]
    async fn a_paused_endpoints_deliveries_are_not_waited_for() {
        let config = crate::config::Config::from_toml_str(
            "[database]\nurl = \"postgres://127.0.0.1/app\"\n",
        )
        .expect("valid config");
        let capacity =
            crate::delivery::Capacity::new(&crate::delivery::WorkerSettings::from_config(&config));
        let state = FoldState::default();
        for _ in 0..FOLD_PATIENCE {
            silent(&state, "slow").await;
        }
        let mut pass = vec![handoff(&capacity, "slow"), handoff(&capacity, "fast")];
        let offered = state.offer(&mut pass);
        assert_eq!(offered.len(), 1);
        assert_eq!(offered[0].endpoint, "fast");
        assert!(pass[0].fold.is_none() && pass[1].fold.is_some());
        let mut paused_only = vec![handoff(&capacity, "slow")];
        assert!(state.offer(&mut paused_only).is_empty());
        assert!(paused_only[0].fold.is_none());
    }

    /// Another endpoint's quick answers, between a slow endpoint's waits or in the same wait,
    /// neither reset the slow one's count nor get paused with it.
    #[tokio::test]
    async fn a_fast_endpoint_neither_shields_nor_shares_a_slow_ones_pause() {
        let state = FoldState::default();
        for _ in 0..FOLD_PATIENCE - 1 {
            silent(&state, "slow").await;
            answered(&state, "fast").await;
        }
        let (_kept, slow) = offered("slow");
        let (refused, fast) = offered("fast");
        drop(refused);
        gather(&state, vec![slow, fast]).await;
        assert!(
            !state.waits_for("slow"),
            "a fast endpoint's answers kept the slow one waited for"
        );
        assert!(
            state.waits_for("fast"),
            "the fast endpoint was paused with the slow one"
        );
    }
}
