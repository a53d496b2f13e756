//! Delivery: claims due deliveries under a lease, makes each attempt (sign, POST, read), and
//! settles the outcomes in batches. Invariant: at most `concurrency` requests in flight per replica
//! and `per_endpoint_concurrency` per endpoint; every claimed delivery ends settled, handed back,
//! or (if this process dies) reaped when its lease lapses: none is ever dropped.

pub mod client;
pub mod retry;
pub mod ssrf;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{Config, RetryConfig, SignatureScheme};
use crate::crypto::SecretBox;
use crate::signing;
use crate::telemetry::{Metrics, OutcomeLabel};
use client::{SendError, WebhookClient};
use retry::RetryPolicy;
use store::{Ack, AttemptRecord, Claimed, DeliveryStore, Settle};

/// What the worker needs from the configuration.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub per_endpoint_concurrency: usize,
    pub request_timeout: Duration,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub max_payload: u64,
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
            default_retry: o.retry.policy().expect("validated"),
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
    owner: Uuid,
    /// Rung by the dispatcher (new deliveries) and by finished attempts (free slots).
    wake: Arc<Notify>,
}

/// Claimed-but-unsettled deliveries per endpoint for this replica, and each endpoint's request
/// semaphore (which exists while the endpoint has any).
#[derive(Default)]
struct InFlight {
    per_endpoint: Mutex<HashMap<String, (i32, Arc<Semaphore>)>>,
}

impl InFlight {
    /// Counts one more claimed delivery; returns the endpoint's request semaphore.
    fn add(&self, endpoint: &str, per_endpoint: usize) -> Arc<Semaphore> {
        let mut map = self.per_endpoint.lock().expect("in-flight map");
        let entry = map
            .entry(endpoint.to_string())
            .or_insert_with(|| (0, Arc::new(Semaphore::new(per_endpoint))));
        entry.0 += 1;
        entry.1.clone()
    }

    fn remove(&self, endpoint: &str) {
        let mut map = self.per_endpoint.lock().expect("in-flight map");
        if let Some(entry) = map.get_mut(endpoint) {
            entry.0 -= 1;
            if entry.0 <= 0 {
                map.remove(endpoint);
            }
        }
    }

    fn snapshot(&self) -> Vec<(String, i32)> {
        self.per_endpoint
            .lock()
            .expect("in-flight map")
            .iter()
            .map(|(k, v)| (k.clone(), v.0))
            .collect()
    }
}

/// How many deliveries per endpoint a replica claims ahead of its request slots for that
/// endpoint: larger claims cost the database fewer round trips per delivery, while requests stay
/// bounded by `per_endpoint_concurrency`.
const PREFETCH_FACTOR: usize = 4;

/// Time kept free at the end of a lease for recording the outcome.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// A finished (or handed back) delivery on its way to the database, with what it held: its slot
/// is released only once its outcome is written, so claims never outrun settling.
struct Done {
    report: Report,
    endpoint: String,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// What an attempt task reports.
enum Report {
    Settled(Ack),
    /// Not finished before the shutdown deadline: back to `pending` at once.
    HandBack(Uuid, i32),
}

impl Worker {
    pub fn new(
        store: Arc<DeliveryStore>,
        client: WebhookClient,
        settings: WorkerSettings,
        secrets: SecretBox,
        metrics: Arc<Metrics>,
        owner: Uuid,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            client,
            settings,
            secrets,
            metrics,
            owner,
            wake,
        }
    }

    /// Runs until `shutdown` is cancelled, then drains: in-flight attempts get until the drain
    /// deadline, what is left is handed back, and every outcome is written before returning.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.concurrency));
        let in_flight = Arc::new(InFlight::default());
        let tracker = TaskTracker::new();
        let abort = CancellationToken::new();
        let (report_tx, report_rx) = mpsc::unbounded_channel::<Done>();
        let settler = tokio::spawn(settle_loop(
            self.store.clone(),
            self.owner,
            report_rx,
            in_flight.clone(),
            self.wake.clone(),
        ));
        let per_endpoint = self.settings.per_endpoint_concurrency;
        let context = Arc::new(AttemptContext {
            client: self.client.clone(),
            settings: self.settings.clone(),
            secrets: self.secrets.clone(),
            metrics: self.metrics.clone(),
        });

        let mut claim_failures = 0u32;
        while !shutdown.is_cancelled() {
            let free = slots.available_permits();
            let mut claimed_full = false;
            if free > 0 {
                let busy = in_flight.snapshot();
                match self
                    .store
                    .claim(
                        self.owner,
                        free as i64,
                        (per_endpoint * PREFETCH_FACTOR) as i32,
                        &busy,
                        self.settings.lease,
                    )
                    .await
                {
                    Ok(batch) => {
                        claim_failures = 0;
                        claimed_full = batch.len() == free;
                        for delivery in batch {
                            let slot = slots
                                .clone()
                                .try_acquire_owned()
                                .expect("claimed within free slots");
                            let requests = in_flight.add(&delivery.endpoint_id, per_endpoint);
                            let (context, tx, abort, stop) = (
                                context.clone(),
                                report_tx.clone(),
                                abort.clone(),
                                shutdown.clone(),
                            );
                            let (claimed_at, lease, timeout) = (
                                Instant::now(),
                                self.settings.lease,
                                self.settings.request_timeout,
                            );
                            tracker.spawn(async move {
                                let endpoint = delivery.endpoint_id.clone();
                                let (id, attempt) = (delivery.id, delivery.attempt);
                                // Waiting for a request slot is not starting: on shutdown such a
                                // delivery goes straight back to the others.
                                let request = tokio::select! {
                                    permit = requests.acquire_owned() => permit.ok(),
                                    _ = stop.cancelled() => None,
                                };
                                // An attempt must end well inside the lease it was claimed under;
                                // one that waited too long for its slot is handed back instead.
                                let wait_budget = lease
                                    .saturating_sub(timeout + LEASE_MARGIN)
                                    .max(Duration::from_millis(250));
                                let request =
                                    request.filter(|_| claimed_at.elapsed() <= wait_budget);
                                let report = match request {
                                    None => Report::HandBack(id, attempt),
                                    Some(_request) => tokio::select! {
                                        ack = context.attempt(delivery) => Report::Settled(ack),
                                        _ = abort.cancelled() => Report::HandBack(id, attempt),
                                    },
                                };
                                let _ = tx.send(Done {
                                    report,
                                    endpoint,
                                    _slot: slot,
                                });
                            });
                        }
                    }
                    Err(e) => {
                        claim_failures += 1;
                        tracing::warn!(error = %format!("{e:#}"), "claiming deliveries failed; retrying");
                    }
                }
            }
            if claimed_full {
                continue;
            }
            let backoff = if claim_failures > 0 {
                Duration::from_millis(100 * 2u64.pow(claim_failures.min(6)))
            } else {
                self.settings.poll_interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = self.wake.notified(), if claim_failures == 0 => {}
                _ = tokio::time::sleep(backoff) => {}
            }
        }

        tracker.close();
        let in_flight_now = self.settings.concurrency - slots.available_permits();
        tracing::info!(in_flight = in_flight_now, "delivery worker draining");
        if tokio::time::timeout(self.settings.drain, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain deadline reached; handing back unfinished deliveries");
            abort.cancel();
            tracker.wait().await;
        }
        drop(report_tx);
        if let Err(e) = settler.await {
            tracing::error!(error = %e, "settling task failed");
        }
    }
}

/// Writes outcomes in batches: whatever has arrived since the last write goes in one transaction.
/// Only then are the deliveries' slots released and the claimer woken.
async fn settle_loop(
    store: Arc<DeliveryStore>,
    owner: Uuid,
    mut rx: mpsc::UnboundedReceiver<Done>,
    in_flight: Arc<InFlight>,
    wake: Arc<Notify>,
) {
    let mut buf: Vec<Done> = Vec::with_capacity(512);
    while rx.recv_many(&mut buf, 512).await > 0 {
        let mut acks = Vec::with_capacity(buf.len());
        let mut back = Vec::new();
        for done in &buf {
            match &done.report {
                Report::Settled(a) => acks.push(a.clone()),
                Report::HandBack(id, attempt) => back.push((*id, *attempt)),
            }
        }
        let mut delay = Duration::from_millis(100);
        // Outcomes are retried until written; if the database stays away longer than the lease,
        // the reaper makes the deliveries due again (at-least-once, never lost).
        for attempt in 1.. {
            let result = async {
                store.settle(owner, &acks).await?;
                let n = store.hand_back(owner, &back).await?;
                if n > 0 {
                    tracing::info!(handed_back = n, "deliveries handed back for other replicas");
                }
                anyhow::Ok(())
            }
            .await;
            match result {
                Ok(()) => break,
                Err(e) if attempt < 50 => {
                    tracing::warn!(error = %format!("{e:#}"), batch = acks.len(), "recording outcomes failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), batch = acks.len(),
                        "recording outcomes failed for good; their leases will lapse and they will be retried");
                    break;
                }
            }
        }
        for done in buf.drain(..) {
            in_flight.remove(&done.endpoint);
        }
        wake.notify_one();
    }
}

struct AttemptContext {
    client: WebhookClient,
    settings: WorkerSettings,
    secrets: SecretBox,
    metrics: Arc<Metrics>,
}

impl AttemptContext {
    /// Makes one attempt and decides how it settles. Never fails: every path returns an `Ack`.
    async fn attempt(&self, d: Claimed) -> Ack {
        let span = tracing::info_span!("attempt", delivery.id = %d.id, endpoint.id = %d.endpoint_id, attempt = d.attempt);
        let ack = self.attempt_in_span(d).instrument(span).await;
        let outcome = match ack.settle {
            Settle::Delivered => "delivered",
            Settle::Retry { .. } => "retry",
            Settle::Failed => "failed",
            Settle::EndpointGone => "gone",
        };
        self.metrics
            .deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        self.metrics
            .attempt_duration
            .observe(f64::from(ack.record.duration_ms.max(0)) / 1000.0);
        ack
    }

    async fn attempt_in_span(&self, d: Claimed) -> Ack {
        let started_at = Utc::now();
        let clock = Instant::now();
        let policy = endpoint_policy(d.retry.as_ref())
            .unwrap_or_else(|| self.settings.default_retry.clone());
        let body = envelope(&d);

        let finish = |settle: Settle,
                      code: Option<u16>,
                      response_body: Option<String>,
                      error: Option<String>| Ack {
            id: d.id,
            attempt: d.attempt,
            endpoint_id: d.endpoint_id.clone(),
            settle,
            record: AttemptRecord {
                started_at,
                duration_ms: clock.elapsed().as_millis().min(i32::MAX as u128) as i32,
                status_code: code.map(i32::from),
                response_body,
                error,
            },
        };

        if body.len() as u64 > self.settings.max_payload {
            let error = format!(
                "payload of {} bytes exceeds outbound.max_payload ({} bytes); not retried",
                body.len(),
                self.settings.max_payload
            );
            tracing::warn!(error = %error, "delivery failed");
            return finish(Settle::Failed, None, None, Some(error));
        }
        let url = match reqwest::Url::parse(&d.url) {
            Ok(u) => u,
            Err(e) => {
                return finish(
                    Settle::Failed,
                    None,
                    None,
                    Some(format!("invalid endpoint URL: {e}")),
                )
            }
        };
        let headers = match build_headers(&d, &body, &self.secrets) {
            Ok(h) => h,
            Err(e) => return finish(Settle::Failed, None, None, Some(e)),
        };

        let retry_at = |retry_after: Option<Duration>| {
            policy
                .next_delay(d.attempt as u32, retry_after)
                .map(|delay| Settle::Retry {
                    at: Utc::now()
                        + chrono::Duration::from_std(delay).unwrap_or(chrono::TimeDelta::MAX),
                })
                .unwrap_or(Settle::Failed)
        };

        match self
            .client
            .post(&url, headers, body, self.settings.request_timeout)
            .await
        {
            Ok(resp) if (200..300).contains(&resp.status) => {
                tracing::debug!(status = resp.status, "delivered");
                finish(Settle::Delivered, Some(resp.status), Some(resp.body), None)
            }
            Ok(resp) if resp.status == 410 => {
                tracing::warn!(
                    "endpoint answered 410 Gone; disabling it and pausing its deliveries"
                );
                finish(
                    Settle::EndpointGone,
                    Some(410),
                    Some(resp.body),
                    Some("410 Gone: endpoint disabled".into()),
                )
            }
            Ok(resp) => {
                let retry_after = resp
                    .headers
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry::parse_retry_after(v, std::time::SystemTime::now()));
                let settle = retry_at(retry_after);
                let error = if (300..400).contains(&resp.status) {
                    format!("HTTP {} (redirects are not followed)", resp.status)
                } else {
                    format!("HTTP {}", resp.status)
                };
                tracing::info!(
                    status = resp.status,
                    final_attempt = settle == Settle::Failed,
                    "attempt failed"
                );
                finish(settle, Some(resp.status), Some(resp.body), Some(error))
            }
            Err(e) => {
                let settle = retry_at(None);
                let kind = match &e {
                    SendError::Blocked(_) => "blocked",
                    SendError::Timeout(_) => "timeout",
                    SendError::Connect(_) => "connect",
                    SendError::Other(_) => "other",
                };
                tracing::info!(error = %e, kind, final_attempt = settle == Settle::Failed, "attempt failed");
                finish(settle, None, None, Some(e.to_string()))
            }
        }
    }
}

/// An endpoint's own retry policy, when it has a valid one.
fn endpoint_policy(retry: Option<&serde_json::Value>) -> Option<RetryPolicy> {
    let value = retry?;
    if value.is_null() {
        return None;
    }
    let config: RetryConfig = serde_json::from_value(value.clone()).ok()?;
    config.policy().ok()
}

/// The body receivers get: `{"id", "type", "timestamp", "data"}` (the seed's envelope). The
/// payload is spliced in as the JSON text Postgres returned, without a parse.
pub fn envelope(d: &Claimed) -> Bytes {
    let timestamp = d.created_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let event_type = serde_json::to_string(&d.event_type).expect("a string serializes");
    Bytes::from(format!(
        r#"{{"id":"{}","type":{},"timestamp":"{}","data":{}}}"#,
        d.event_id, event_type, timestamp, d.payload
    ))
}

/// Content type, the endpoint's custom headers, then the signature headers (last, so a custom
/// header can never replace them).
fn build_headers(d: &Claimed, body: &[u8], vault: &SecretBox) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(custom) = d.headers.as_object() {
        for (name, value) in custom {
            let opened = value.as_str().map(|v| {
                vault
                    .open(v)
                    .map_err(|e| format!("custom header {name:?}: {e}"))
            });
            let value = match opened {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => return Err(e),
                None => None,
            };
            let (Ok(name), Some(Ok(value))) = (
                HeaderName::from_bytes(name.as_bytes()),
                value.as_deref().map(HeaderValue::from_str),
            ) else {
                return Err(format!("custom header {name:?} is not a valid header"));
            };
            h.insert(name, value);
        }
    }
    // W3C trace context the app attached to the event travels with it.
    if let Some(meta) = d.metadata.as_ref().and_then(|m| m.as_object()) {
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = meta
                .get(name)
                .and_then(|v| v.as_str())
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                h.insert(name, value);
            }
        }
    }
    let now = Utc::now().timestamp();
    let scheme: SignatureScheme = d.signature.parse().map_err(|e: String| e)?;
    let secrets: Vec<String> = d
        .secrets
        .iter()
        .map(|s| vault.open(s))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let ts = HeaderValue::from(now);
    match scheme {
        SignatureScheme::Standard => {
            let keys: Vec<Vec<u8>> = secrets
                .iter()
                .filter_map(|s| signing::standard_key(s).ok())
                .collect();
            if keys.is_empty() {
                return Err("endpoint has no valid unexpired secret to sign with".into());
            }
            let id = d.event_id.to_string();
            let sig = signing::standard_header(&keys, &id, now, body);
            h.insert(
                "webhook-id",
                HeaderValue::from_str(&id).expect("uuid is ASCII"),
            );
            h.insert("webhook-timestamp", ts);
            h.insert(
                "webhook-signature",
                HeaderValue::from_str(&sig).expect("base64 is ASCII"),
            );
        }
        SignatureScheme::Legacy => {
            let secret = secrets
                .first()
                .ok_or("endpoint has no unexpired secret to sign with")?;
            let sig = signing::legacy_signature(secret, now, body);
            h.insert(
                "x-webhook-signature",
                HeaderValue::from_str(&sig).expect("hex is ASCII"),
            );
            h.insert("x-webhook-timestamp", ts);
            h.insert(
                "x-webhook-delivery-id",
                HeaderValue::from_str(&d.id.to_string()).expect("uuid is ASCII"),
            );
        }
    }
    Ok(h)
}
