//! One attempt: build the envelope and the signed headers, POST, and decide how the delivery
//! settles. Invariant: every path ends in an `Ack` (a response or a typed failure, recorded), except
//! a delivery this replica cannot prepare, which is deferred: never the event's fault.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tracing::Instrument;

use super::client::{SendError, WebhookClient};
use super::retry::{self, RetryPolicy};
use super::state::{Ack, AttemptRecord, Claimed, Settle};
use super::{Deferral, WorkerSettings};
use crate::config::{RetryConfig, SignatureScheme};
use crate::crypto::{Field, SecretBox};
use crate::signing;
use crate::telemetry::{Health, Metrics, OutcomeLabel};

pub(super) struct AttemptContext {
    pub(super) client: WebhookClient,
    pub(super) settings: WorkerSettings,
    pub(super) secrets: SecretBox,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
}

impl AttemptContext {
    /// Makes one attempt and decides how it settles: every path returns an `Ack`, except a
    /// delivery this replica cannot prepare (its fault, not the event's), which is deferred.
    pub(super) async fn attempt(&self, d: Claimed) -> Result<Ack, Deferral> {
        let span = tracing::info_span!("attempt", delivery.id = %d.id, endpoint.id = %d.endpoint_id, attempt = d.attempt);
        let ack = self.attempt_in_span(d).instrument(span).await?;
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
        Ok(ack)
    }

    async fn attempt_in_span(&self, d: Claimed) -> Result<Ack, Deferral> {
        let started_at = Utc::now();
        let clock = Instant::now();
        let policy = endpoint_policy(d.retry.as_ref())
            .unwrap_or_else(|| self.settings.default_retry.clone());
        let body = envelope(&d);

        // What the request carried, for the attempt log (set once the headers are built).
        let sent = std::sync::OnceLock::<String>::new();
        let finish = |settle: Settle,
                      code: Option<u16>,
                      response_body: Option<Bytes>,
                      error: Option<String>| Ack {
            id: d.id,
            attempt: d.attempt,
            endpoint_id: d.endpoint_id.clone(),
            ordering_key: d.ordering_key.clone(),
            judged: true,
            probe: d.probe,
            retry_after: None,
            settle,
            record: AttemptRecord {
                started_at,
                duration_ms: clock.elapsed().as_millis().min(i32::MAX as u128) as i32,
                status_code: code.map(i32::from),
                response_body,
                error,
                request_headers: sent.get().cloned(),
            },
        };

        let url = match reqwest::Url::parse(&d.url) {
            Ok(u) => u,
            Err(e) => {
                return Ok(finish(
                    Settle::Failed,
                    None,
                    None,
                    Some(format!("invalid endpoint URL: {e}")),
                ))
            }
        };
        let headers = match build_headers(&d, &body, &self.secrets) {
            Ok(h) => {
                self.health.clear_endpoint_fault(&d.endpoint_id);
                h
            }
            Err(e) => {
                let reason = format!(
                    "this replica cannot prepare deliveries to endpoint {}: {e}",
                    d.endpoint_id
                );
                tracing::error!(error = %reason, "delivery deferred; the replica is marked unready");
                self.health
                    .set_endpoint_fault(&d.endpoint_id, reason.clone());
                return Err(Deferral {
                    id: d.id,
                    attempt: d.attempt,
                    reason,
                });
            }
        };

        let _ = sent.set(describe(&headers, &d));
        let retry_at = |retry_after: Option<Duration>| {
            policy
                .next_delay(d.attempt as u32, retry_after)
                .map(|delay| Settle::Retry {
                    // Validated policies stay under 30 days; the bound also holds for anything
                    // else (a policy stored by an older build, a jitter rounding up).
                    at: Utc::now()
                        + chrono::Duration::from_std(delay.min(retry::MAX_RETRY_DELAY))
                            .expect("30 days fits"),
                })
                .unwrap_or(Settle::Failed)
        };

        let ack = match self
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
                let mut ack = finish(settle, Some(resp.status), Some(resp.body), Some(error));
                ack.retry_after = retry_after;
                ack
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
        };
        Ok(ack)
    }
}

/// An endpoint's own retry policy, when it has a valid one.
fn endpoint_policy(retry: Option<&serde_json::Value>) -> Option<RetryPolicy> {
    let value = retry?;
    if value.is_null() {
        return None;
    }
    let config: RetryConfig = serde_json::from_value(value.clone()).ok()?;
    RetryPolicy::from_config(&config).ok()
}

/// The body receivers get: `{"id", "type", "timestamp", "data"}` (the seed's envelope). The
/// payload is spliced in as the JSON text Postgres returned, without a parse.
pub fn envelope(d: &Claimed) -> Bytes {
    Bytes::from(envelope_text(d))
}

/// The envelope in one allocation of exactly its length: it lives as long as its request, once
/// per delivery in flight, and the memory budget counts it at the payload's size (a `format!`
/// that grows as it writes ends with twice the payload's capacity).
fn envelope_text(d: &Claimed) -> String {
    let timestamp = d.created_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let event_type = serde_json::to_string(&d.event_type).expect("a string serializes");
    let id = d.event_id.to_string();
    [
        r#"{"id":""#,
        &id,
        r#"","type":"#,
        &event_type,
        r#","timestamp":""#,
        &timestamp,
        r#"","data":"#,
        &d.payload,
        "}",
    ]
    .concat()
}

/// The request's headers as the attempt log keeps them, one `name: value` per line: signature
/// headers as sent (they prove nothing without the secret), the endpoint's custom header values
/// redacted (they often carry credentials).
fn describe(headers: &HeaderMap, d: &Claimed) -> String {
    let custom = d.headers.as_object();
    let mut out = String::with_capacity(256);
    for (name, value) in headers {
        let redacted =
            custom.is_some_and(|c| c.keys().any(|k| k.eq_ignore_ascii_case(name.as_str())));
        let value = if redacted {
            crate::config::REDACTED
        } else {
            value.to_str().unwrap_or("<not text>")
        };
        out.push_str(name.as_str());
        out.push_str(": ");
        out.push_str(value);
        out.push('\n');
    }
    out.push_str("user-agent: ");
    out.push_str(&super::client::user_agent());
    out
}

/// Content type, the endpoint's custom headers, then the signature headers (last, so a custom
/// header can never replace them).
fn build_headers(d: &Claimed, body: &[u8], vault: &SecretBox) -> Result<HeaderMap, String> {
    let endpoint = d.endpoint_id.as_str();
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(custom) = d.headers.as_object() {
        for (name, value) in custom {
            let opened = value.as_str().map(|v| {
                vault
                    .open(v, Field::Header { endpoint, name })
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
    for (name, value) in [
        ("traceparent", &d.trace.parent),
        ("tracestate", &d.trace.state),
    ] {
        if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(name, value);
        }
    }
    let now = Utc::now().timestamp();
    let scheme: SignatureScheme = d.signature.parse().map_err(|e: String| e)?;
    let secrets: Vec<String> = d
        .secrets
        .iter()
        .map(|s| vault.open(s, Field::Secret { endpoint }))
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
            // One signature only, so during a rotation the older secret (the one the receiver
            // has until it switches) signs until its grace ends; secrets come newest first.
            let secret = secrets
                .last()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_takes_its_own_length_in_memory_and_nothing_more() {
        let payload = format!(r#"{{"blob":"{}"}}"#, "x".repeat(1 << 20));
        let mut d = Claimed::for_test("e", "order.\"created\"", &payload);
        d.created_at = chrono::DateTime::from_timestamp(1_700_000_000, 123_000_000).unwrap();
        let text = envelope_text(&d);
        assert_eq!(text.capacity(), text.len());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["id"], d.event_id.to_string());
        assert_eq!(v["type"], "order.\"created\"");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["data"]["blob"].as_str().unwrap().len(), 1 << 20);
        assert_eq!(&envelope(&d)[..], text.as_bytes());
    }
}
