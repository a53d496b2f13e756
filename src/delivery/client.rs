//! The outbound HTTP client: one pooled client for every delivery, no redirects, no system proxy,
//! the SSRF guard on every connection. Invariant: an attempt always ends in an [`AttemptResult`]
//! (a response or a typed failure), never in a panic or a silent drop.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;

use super::ssrf::{Blocked, Guard, GuardedResolver};

/// How much of a response body is kept in the attempt record.
pub const RESPONSE_BODY_LIMIT: usize = 4096;

/// How long the body may take once the head is in. The status is the outcome; the body is only
/// kept for the record, so a receiver that trickles it must not hold a request slot (and so
/// everyone else's deliveries) for the rest of the request timeout.
pub const RESPONSE_BODY_WAIT: Duration = Duration::from_secs(1);

pub fn user_agent() -> String {
    format!("postern/{}", env!("CARGO_PKG_VERSION"))
}

#[derive(Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    guard: Arc<Guard>,
}

/// A response, with the body cut to [`RESPONSE_BODY_LIMIT`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    /// The first bytes of the body exactly as received: a receiver's bytes are never decoded.
    pub body: Bytes,
}

/// Why an attempt got no HTTP response. The variants exist so the worker and the record can say
/// whose fault it was; all of them are retried by the policy.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Blocked(#[from] Blocked),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

impl WebhookClient {
    pub fn new(guard: Guard, timeout: Duration, per_host_idle: usize) -> anyhow::Result<Self> {
        let guard = Arc::new(guard);
        let http = reqwest::Client::builder()
            .user_agent(user_agent())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::new(guard.clone())))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(per_host_idle)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self { http, guard })
    }

    /// POSTs `body` with `headers`, reading at most [`RESPONSE_BODY_LIMIT`] bytes of the answer.
    pub async fn post(
        &self,
        url: &reqwest::Url,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, SendError> {
        self.guard.check_url(url)?;
        let result = self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        let mut resp = result.map_err(|e| classify(e, timeout))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut kept = Vec::new();
        // A receiver that streams a huge or endless body must not cost memory or time: keep the
        // start only, read for at most `RESPONSE_BODY_WAIT`, and stop there (the connection is
        // then closed, not pooled).
        let read = async {
            while kept.len() < RESPONSE_BODY_LIMIT {
                match resp.chunk().await {
                    Ok(Some(chunk)) => {
                        let room = RESPONSE_BODY_LIMIT - kept.len();
                        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    Ok(None) => break,
                    // The status already arrived; a broken body does not change the outcome.
                    Err(_) => break,
                }
            }
        };
        let _ = tokio::time::timeout(RESPONSE_BODY_WAIT, read).await;
        Ok(Response {
            status,
            headers,
            body: Bytes::from(kept),
        })
    }
}

fn classify(e: reqwest::Error, timeout: Duration) -> SendError {
    if e.is_timeout() {
        return SendError::Timeout(timeout);
    }
    // The guard's refusal surfaces as the source of a connect error.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<Blocked>() {
            return SendError::Blocked(b.clone());
        }
        source = s.source();
    }
    if e.is_connect() {
        return SendError::Connect(crate::telemetry::error_chain(&e));
    }
    SendError::Other(crate::telemetry::error_chain(&e))
}
