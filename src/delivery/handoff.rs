//! What the fan-out hands the worker: a delivery it inserted already claimed ([`Handoff`]), the
//! answer of its commit ([`FanOutCommit`]), and the 2xx it may write itself ([`Folded`]).
//! Invariant: an outcome is written only by a commit known to have happened, by the fan-out's own
//! or by the settler's after it.

use tokio::sync::mpsc;

use super::state::{Ack, Claimed, Settle};
use super::{Done, Hold, Report};

/// A delivery the dispatcher inserted already claimed by this replica (attempt 1, leased), with
/// its hold: the fan-out fast path, which saves the claim's round trip and row version.
pub struct Handoff {
    pub delivery: Claimed,
    pub hold: Hold,
    /// The fan-out's commit, still on the wire when the delivery is handed over.
    pub commit: FanOutCommit,
    /// Where a 2xx outcome goes when the fan-out waits to write it in its own commit (see
    /// [`Folded`]); dropped unsent when the outcome is anything else.
    pub fold: Option<tokio::sync::oneshot::Sender<Folded>>,
}

/// A fast-path delivery's 2xx outcome, offered to the fan-out that made the delivery while that
/// fan-out has not committed: it inserts the delivery `delivered` with its attempt, so the
/// delivery costs one row version and no transaction of the settler's. The fan-out says what
/// became of it once its commit is known; dropped (a failed fan-out), the delivery never existed
/// and the hold is freed.
pub struct Folded {
    pub ack: Ack,
    pub(super) hold: Hold,
    pub(super) reports: mpsc::UnboundedSender<Done>,
}

impl Folded {
    /// Written by the fan-out's commit: only the hold is left, freed through the settler.
    pub fn written(self) {
        let _ = self.reports.send(Done {
            report: Report::Written,
            _hold: Some(self.hold),
            _failing: None,
        });
    }

    /// The fan-out committed the delivery without the outcome (`delivering`, under its lease):
    /// the settler writes it as any other.
    pub fn settle(self) {
        let _ = self.reports.send(Done {
            report: Report::Settled(self.ack),
            _hold: Some(self.hold),
            _failing: None,
        });
    }
}

/// Whether the fan-out that inserted a handed-off delivery committed. The dispatcher hands its
/// deliveries over as soon as it has taken their events and sent its commit, so the request
/// starts without waiting for the commit's answer; the outcome is written only once the commit is
/// known. When it is not (the commit failed, or its answer was lost), the outcome is dropped: the
/// event is fanned out again (rolled back) or the lease lapses (committed after all), and the
/// receiver gets the event again under the same `webhook-id`, as after any crash.
#[derive(Clone)]
pub struct FanOutCommit(futures_util::future::Shared<tokio::sync::oneshot::Receiver<bool>>);

/// The dispatcher's end of a [`FanOutCommit`]; dropped unsent means not committed.
pub struct FanOutCommitted(tokio::sync::oneshot::Sender<bool>);

impl FanOutCommit {
    pub fn new() -> (FanOutCommitted, Self) {
        use futures_util::FutureExt;
        let (tx, rx) = tokio::sync::oneshot::channel();
        (FanOutCommitted(tx), Self(rx.shared()))
    }

    /// Already known not to have committed: the delivery does not exist, so it is not sent.
    /// (Polled once, without waiting: `Shared::peek` alone sees only an answer some clone has
    /// already polled out of the channel.)
    pub(super) fn failed(&self) -> bool {
        use futures_util::FutureExt;
        matches!(self.0.clone().now_or_never(), Some(Ok(false) | Err(_)))
    }

    /// Waits for the commit's answer.
    pub(super) async fn committed(self) -> bool {
        self.0.await.unwrap_or(false)
    }
}

impl FanOutCommitted {
    pub fn settle(self, committed: bool) {
        let _ = self.0.send(committed);
    }
}

/// Whether the fan-out may write this outcome in its commit: a 2xx of an unkeyed delivery that
/// was no circuit's probe (those move their key or their breaker: the settler's work), whose
/// record the database takes as it is (text cannot hold NUL; the settler strips such a record,
/// a fan-out's statement refused would be tried again with the event).
pub(super) fn foldable(ack: &Ack) -> bool {
    ack.settle == Settle::Delivered
        && ack.ordering_key.is_none()
        && !ack.probe
        && ack.record.error.is_none()
        && !ack
            .record
            .request_headers
            .as_deref()
            .is_some_and(|h| h.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::FanOutCommit;

    #[test]
    fn a_fan_out_commit_is_known_failed_once_answered_so_or_abandoned() {
        let (pending_tx, pending) = FanOutCommit::new();
        assert!(!pending.failed(), "no answer yet: not known to have failed");
        pending_tx.settle(false);
        assert!(pending.failed());

        let (ok_tx, ok) = FanOutCommit::new();
        ok_tx.settle(true);
        assert!(!ok.failed());

        let (dropped_tx, dropped) = FanOutCommit::new();
        drop(dropped_tx);
        assert!(
            dropped.failed(),
            "a dispatcher gone without an answer did not commit"
        );
    }
}
