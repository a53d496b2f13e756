//! The fold: a small fan-out pass waits a moment for the 2xx outcomes of the deliveries it handed
//! over and inserts them `delivered`, with their attempts, in its own commit. Invariant: an outcome
//! offered to a pass is either written by its commit, given back to the settler, or (the commit
//! failed) dropped with a delivery that does not exist; never lost between the two.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::delivery::Folded;

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

/// After [`FOLD_PATIENCE`] waits in a row ran out (a receiver slower than [`FOLD_WAIT`]), passes
/// commit at once for this long: a slow receiver should not hold every pass for the whole wait.
const FOLD_PAUSE: Duration = Duration::from_millis(250);

/// How many waits in a row (a replica's loops together) must run out before passes pause: on a
/// busy machine one runs out now and then by chance, and pausing after each left a quarter to
/// three quarters of the 1,000/s stream's outcomes to the settler (BENCHMARKS.md, "Issue 16,
/// fifteenth session").
const FOLD_PATIENCE: u32 = 3;

/// Small passes wait for outcomes only while they come at least this close together (about 100
/// events/s or more): below that the CPU a fold saves does not matter, and in three alternated
/// pairs the 20/s median was 0.09-0.40 ms higher with every pass waiting (BENCHMARKS.md, "Issue
/// 16, fourteenth session").
const FOLD_BUSY: Duration = Duration::from_millis(10);

/// When a replica's small passes may wait for outcomes, shared by its loops: the last small pass
/// (see [`FOLD_BUSY`]) and the end of a pause ([`FOLD_PAUSE`]).
#[derive(Clone, Default)]
pub struct FoldState(Arc<Mutex<FoldTimes>>);

#[derive(Default)]
struct FoldTimes {
    last_small_pass: Option<Instant>,
    paused_until: Option<Instant>,
    /// Waits that ran out since the last one that did not.
    ran_out: u32,
}

impl FoldState {
    /// Called by every small pass that took events: whether it may wait for outcomes.
    pub(super) fn small_pass(&self) -> bool {
        let mut t = self.0.lock().expect("fold state");
        // Read under the lock: the other loop's pass may have just stored its own time.
        let now = Instant::now();
        let busy = t
            .last_small_pass
            .is_some_and(|last| now.saturating_duration_since(last) < FOLD_BUSY);
        t.last_small_pass = Some(now);
        busy && t.paused_until.is_none_or(|until| now >= until)
    }

    /// Called after every wait: whether it ran out.
    fn waited(&self, ran_out: bool) {
        let mut t = self.0.lock().expect("fold state");
        if !ran_out {
            t.ran_out = 0;
            return;
        }
        t.ran_out += 1;
        if t.ran_out >= FOLD_PATIENCE {
            t.ran_out = 0;
            t.paused_until = Some(Instant::now() + FOLD_PAUSE);
        }
    }
}

/// Waits up to [`FOLD_WAIT`] for the outcomes offered on `offered`: those that came. One that
/// is not foldable closes its channel unsent, so a pass whose outcomes are all in (or all
/// refused) goes on at once.
pub(super) async fn gather(
    state: &FoldState,
    mut offered: Vec<Option<tokio::sync::oneshot::Receiver<Folded>>>,
) -> Vec<Folded> {
    use std::future::Future;
    use std::task::Poll;
    let mut got = Vec::new();
    if offered.is_empty() {
        return got;
    }
    let all = std::future::poll_fn(|cx| {
        let mut open = false;
        for slot in offered.iter_mut() {
            if let Some(rx) = slot {
                match std::pin::Pin::new(rx).poll(cx) {
                    Poll::Ready(Ok(f)) => {
                        got.push(f);
                        *slot = None;
                    }
                    Poll::Ready(Err(_)) => *slot = None,
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
    state.waited(ran_out);
    if ran_out {
        // Closed first, so an outcome sent as the wait ended is either here or back with
        // its sender (who settles it), never dropped in between.
        for mut rx in offered.into_iter().flatten() {
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
    use tokio::sync::oneshot;

    /// Whether a small pass may wait now: asked twice at once, so the first call stands for
    /// the pass just before and the busy rule holds whatever the test's own pace.
    fn may_wait(state: &FoldState) -> bool {
        state.small_pass();
        state.small_pass()
    }

    /// An outcome offered and never sent: the wait runs out. Its sender is returned to be kept.
    fn silent() -> (
        oneshot::Sender<Folded>,
        Vec<Option<oneshot::Receiver<Folded>>>,
    ) {
        let (tx, rx) = oneshot::channel();
        (tx, vec![Some(rx)])
    }

    /// A wait that ran out now and then (a busy machine) pauses nothing; `FOLD_PATIENCE` in a row
    /// (a slow receiver) pause the replica's passes, and a wait whose outcomes all came starts
    /// the count again.
    #[tokio::test]
    async fn passes_pause_only_after_several_waits_in_a_row_ran_out() {
        let state = FoldState::default();
        assert!(may_wait(&state));
        let (_kept, offered) = silent();
        assert!(gather(&state, offered).await.is_empty());
        assert!(may_wait(&state), "paused after one wait ran out");
        for _ in 1..FOLD_PATIENCE - 1 {
            let (_kept, offered) = silent();
            gather(&state, offered).await;
            assert!(
                may_wait(&state),
                "paused after fewer waits than the patience"
            );
        }
        // Answered (refused: the sender dropped unsent): not a wait that ran out.
        let (refused, offered) = silent();
        drop(refused);
        assert!(gather(&state, offered).await.is_empty());
        for _ in 0..FOLD_PATIENCE - 1 {
            let (_kept, offered) = silent();
            gather(&state, offered).await;
            assert!(
                may_wait(&state),
                "the answered wait did not start the count again"
            );
        }
        let (_kept, offered) = silent();
        gather(&state, offered).await;
        assert!(
            !may_wait(&state),
            "not paused after {FOLD_PATIENCE} waits in a row ran out"
        );
    }
}
