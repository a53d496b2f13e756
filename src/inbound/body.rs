//! Reading a request body: bounded by `max_body`, by `read_timeout` (the caller's) and by the
//! buffered-body budget shared by every request, of which one route holds at most its share.
//! Invariant: bytes are charged to the budget as they arrive, and the charge lives until the
//! request is done.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora::protocols::http::ServerSession as Session;

use super::refusal::{too_large, Refusal};

/// A request's share of the buffered-body budget, in KiB, taken from the whole budget and from
/// its route's share of it (see [`route_share_kib`]); given back when dropped.
pub(super) struct BodyBudget {
    pool: Arc<tokio::sync::Semaphore>,
    route: Arc<tokio::sync::Semaphore>,
    held: Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )>,
    bytes: usize,
}

impl BodyBudget {
    pub(super) fn new(
        pool: &Arc<tokio::sync::Semaphore>,
        route: &Arc<tokio::sync::Semaphore>,
    ) -> Self {
        Self {
            pool: pool.clone(),
            route: route.clone(),
            held: None,
            bytes: 0,
        }
    }

    /// Covers `total` bytes, taking more of the budget when needed; never waits.
    fn grow(&mut self, total: usize) -> Result<(), Refusal> {
        let have = self.bytes.div_ceil(1024);
        let want = total.div_ceil(1024);
        if want > have {
            let more = u32::try_from(want - have).map_err(|_| Refusal::overloaded())?;
            let take = |s: &Arc<tokio::sync::Semaphore>| {
                s.clone()
                    .try_acquire_many_owned(more)
                    .map_err(|_| Refusal::overloaded())
            };
            // The route's share first: a route at its share takes nothing from the others.
            let (route, pool) = (take(&self.route)?, take(&self.pool)?);
            match &mut self.held {
                Some((r, p)) => {
                    r.merge(route);
                    p.merge(pool);
                }
                None => self.held = Some((route, pool)),
            }
        }
        self.bytes = self.bytes.max(total);
        Ok(())
    }
}

/// How much of the budget (`max_buffered`, in KiB) one route's requests may hold together: all of
/// it when there is one route, else half (but at least one body of `max_body`), so senders to one
/// route (anyone can reach a provider's path; the signature is checked only once the body is in)
/// cannot make every other route answer 503.
pub(super) fn route_share_kib(
    max_buffered_kib: usize,
    max_body_kib: usize,
    routes: usize,
) -> usize {
    if routes <= 1 {
        max_buffered_kib
    } else {
        (max_buffered_kib / 2)
            .max(max_body_kib)
            .min(max_buffered_kib)
    }
}

/// Reads the whole body, counting as it goes (chunked bodies declare no length) and charging the
/// budget as bytes arrive. A body that arrives in one chunk, as small webhooks do, is kept as it
/// came, without a copy; later chunks are copied into one buffer as they come, never kept one by
/// one: a sender's 1-byte chunks would otherwise each hold an allocation many times their size,
/// outside the budget. The budget is charged for the buffer's capacity, not only its bytes.
pub(super) async fn read_body(
    session: &mut Session,
    limit: usize,
    budget: &mut BodyBudget,
) -> Result<Bytes, Refusal> {
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut seen = 0;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                seen += chunk.len();
                if seen > limit {
                    return Err(too_large(limit));
                }
                if first.is_none() && joined.is_empty() {
                    budget.grow(seen)?;
                    first = Some(chunk);
                    continue;
                }
                if let Some(head) = first.take() {
                    room_for(&mut joined, head.len() + chunk.len(), limit, budget)?;
                    joined.extend_from_slice(&head);
                }
                room_for(&mut joined, chunk.len(), limit, budget)?;
                joined.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(first.unwrap_or_else(|| joined.freeze())),
            Err(e) => {
                return Err(Refusal::new(
                    400,
                    "bad_request",
                    format!("cannot read the request body: {}", e.etype().as_str()),
                ))
            }
        }
    }
}

/// Makes room in `joined` for `more` bytes: a new buffer of twice the capacity (at least what is
/// needed, at most `limit`), charged to the budget before it is allocated.
fn room_for(
    joined: &mut BytesMut,
    more: usize,
    limit: usize,
    budget: &mut BodyBudget,
) -> Result<(), Refusal> {
    if joined.capacity() - joined.len() >= more {
        return Ok(());
    }
    let want = (joined.len() + more)
        .max(joined.capacity() * 2)
        .min(limit.max(joined.len() + more));
    budget.grow(want)?;
    let mut bigger = BytesMut::with_capacity(want);
    bigger.extend_from_slice(joined);
    *joined = bigger;
    Ok(())
}

/// After refusing a request whose body is still arriving, read and discard a bounded amount of it
/// before closing: closing with unread data makes the kernel reset the connection, and the
/// sender would lose the answer already sent (a "lingering close", as nginx does).
pub(super) async fn linger(session: &mut Session) {
    const LINGER_BYTES: usize = 16 << 20;
    let drain = async {
        let mut seen = 0;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            seen += chunk.len();
            if seen > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
}

#[cfg(test)]
mod tests {
    use super::route_share_kib;

    #[test]
    fn a_route_holds_half_the_budget_but_always_one_whole_body() {
        // One route: all of it.
        assert_eq!(route_share_kib(32 * 1024, 5 * 1024, 1), 32 * 1024);
        // Several: half.
        assert_eq!(route_share_kib(32 * 1024, 5 * 1024, 3), 16 * 1024);
        // Never less than one body of max_body, never more than the budget.
        assert_eq!(route_share_kib(6 * 1024, 5 * 1024, 2), 5 * 1024);
        assert_eq!(route_share_kib(5 * 1024, 5 * 1024, 2), 5 * 1024);
    }
}
