//! Reading a request body: bounded by `max_body`, by `read_timeout` (the caller's) and by the
//! buffered-body budget shared by every request. Invariant: bytes are charged to the budget as
//! they arrive, and the charge lives until the request is done.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora::protocols::http::ServerSession as Session;

use super::refusal::{too_large, Refusal};

/// A request's share of the buffered-body budget, in KiB; given back when dropped.
pub(super) struct BodyBudget {
    pool: Arc<tokio::sync::Semaphore>,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
    bytes: usize,
}

impl BodyBudget {
    pub(super) fn new(pool: &Arc<tokio::sync::Semaphore>) -> Self {
        Self {
            pool: pool.clone(),
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
            let permit = self
                .pool
                .clone()
                .try_acquire_many_owned(more)
                .map_err(|_| Refusal::overloaded())?;
            match &mut self.held {
                Some(held) => held.merge(permit),
                None => self.held = Some(permit),
            }
        }
        self.bytes = self.bytes.max(total);
        Ok(())
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
