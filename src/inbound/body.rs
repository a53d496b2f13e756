//! Reading a request body: bounded by `max_body`, by `read_timeout` (the caller's) and by the
//! buffered-body budget shared by every request. Invariant: bytes are charged to the budget as
//! they arrive, and the charge lives until the request is done.

use std::sync::Arc;

use bytes::Bytes;
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
/// came, without a copy.
pub(super) async fn read_body(
    session: &mut Session,
    limit: usize,
    budget: &mut BodyBudget,
) -> Result<Bytes, Refusal> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut seen = 0;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                seen += chunk.len();
                if seen > limit {
                    return Err(too_large(limit));
                }
                budget.grow(seen)?;
                chunks.push(chunk);
            }
            Ok(None) if chunks.len() == 1 => return Ok(chunks.swap_remove(0)),
            Ok(None) => return Ok(Bytes::from(chunks.concat())),
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
