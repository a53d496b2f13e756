//! Request slots: how many requests a replica has in flight, in all (`concurrency`) and per
//! endpoint (`per_endpoint_concurrency`), and the reserve that keeps an endpoint's first request
//! from waiting behind endpoints that hang in every slot. Invariant: a request holds its
//! endpoint's slot and one of the replica's or the reserve's from start to end, and a reserve
//! slot only ever goes to an endpoint with no other request out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// One endpoint's requests.
pub(super) struct EndpointRequests {
    slots: Arc<Semaphore>,
    /// Requests out (holding a replica or reserve slot), not those still waiting for one.
    sending: AtomicUsize,
    /// Rung when `sending` falls to zero: a waiting request of this endpoint may now take the
    /// reserve.
    idle: Notify,
}

impl EndpointRequests {
    pub(super) fn new(per_endpoint: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(per_endpoint)),
            sending: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }
}

/// The replica's request slots.
pub(super) struct Slots {
    requests: Arc<Semaphore>,
    /// Beyond `requests`, for an endpoint's only request out: however many endpoints hang in every
    /// slot of `requests` (each up to its `per_endpoint_concurrency`), another endpoint is still
    /// sent to, one request at a time. A quarter of `concurrency` (at least one).
    reserve: Arc<Semaphore>,
    size: usize,
}

impl Slots {
    pub(super) fn new(concurrency: usize) -> Self {
        let reserve = (concurrency / 4).max(1);
        Self {
            requests: Arc::new(Semaphore::new(concurrency)),
            reserve: Arc::new(Semaphore::new(reserve)),
            size: concurrency + reserve,
        }
    }

    /// Requests out now, the reserve's included.
    pub(super) fn in_flight(&self) -> usize {
        self.size - self.requests.available_permits() - self.reserve.available_permits()
    }

    /// Waits for a slot of the endpoint, then one of the replica's, or, while the replica's are
    /// all taken and the endpoint has no other request out, one of the reserve's.
    pub(super) async fn take(&self, endpoint: &Arc<EndpointRequests>) -> Option<RequestSlot> {
        let own = endpoint.slots.clone().acquire_owned().await.ok()?;
        let slot = |replica| {
            endpoint.sending.fetch_add(1, Ordering::AcqRel);
            RequestSlot {
                permits: Some((own, replica)),
                endpoint: endpoint.clone(),
            }
        };
        if let Ok(replica) = self.requests.clone().try_acquire_owned() {
            return Some(slot(replica));
        }
        let replica = self.requests.clone().acquire_owned();
        tokio::pin!(replica);
        loop {
            // Registered before looking, so the endpoint going idle in between still wakes this.
            let idle = endpoint.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let alone = endpoint.sending.load(Ordering::Acquire) == 0;
            if alone {
                if let Ok(reserve) = self.reserve.clone().try_acquire_owned() {
                    return Some(slot(reserve));
                }
            }
            tokio::select! {
                biased;
                replica = &mut replica => return replica.ok().map(slot),
                _ = idle => {}
                // The reserve given back while this endpoint has nothing out.
                reserve = self.reserve.clone().acquire_owned(), if alone => {
                    if let Ok(reserve) = reserve {
                        if endpoint.sending.load(Ordering::Acquire) == 0 {
                            return Some(slot(reserve));
                        }
                    }
                }
            }
        }
    }
}

/// A request's slots: given back when the request ends.
pub(super) struct RequestSlot {
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    endpoint: Arc<EndpointRequests>,
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        drop(self.permits.take());
        if self.endpoint.sending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.endpoint.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Two endpoints hold every replica slot: a busy endpoint's next request waits for the
    /// replica's, a third endpoint's first request takes the reserve, and its second waits until
    /// the first is back, then takes the reserve in turn; of two requests waiting together, one
    /// takes it.
    #[tokio::test]
    async fn an_endpoints_only_request_takes_the_reserve_when_the_replica_is_full() {
        let slots = Arc::new(Slots::new(4));
        let (a, b, c) = (
            EndpointRequests::new(3),
            EndpointRequests::new(2),
            EndpointRequests::new(2),
        );
        let mut out = Vec::new();
        for e in [&a, &a, &b, &b] {
            out.push(slots.take(e).await.unwrap());
        }
        let take = |e: &Arc<EndpointRequests>| {
            let (slots, e) = (slots.clone(), e.clone());
            tokio::spawn(async move { slots.take(&e).await.is_some() })
        };
        let busy = take(&a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !busy.is_finished(),
            "a busy endpoint does not take the reserve"
        );
        assert_eq!(slots.in_flight(), 4);
        let first = slots.take(&c).await.expect("the reserve");
        assert_eq!(slots.in_flight(), 5);
        let second = take(&c);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "one request out already: not alone");
        drop(first);
        let got = tokio::time::timeout(Duration::from_millis(500), second).await;
        assert!(got.expect("woken when its endpoint went idle").unwrap());
        // Two requests of one endpoint that wait together while its first is out: when that one
        // is back, one of them takes the reserve (counting waiting requests as out left both
        // waiting for the replica).
        let d = EndpointRequests::new(3);
        let first = slots.take(&d).await.expect("the reserve");
        let (d1, d2) = (take(&d), take(&d));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!d1.is_finished() && !d2.is_finished());
        drop(first);
        let one = tokio::time::timeout(Duration::from_millis(500), async {
            while !d1.is_finished() && !d2.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            one.is_ok(),
            "neither of two waiting requests took the reserve"
        );
        drop(out);
        assert!(tokio::time::timeout(Duration::from_millis(500), busy)
            .await
            .expect("the replica's slot, once given back")
            .unwrap());
        assert_eq!(slots.in_flight(), 0);
    }
}
