//! The delivery state machine: the [`DeliveryStatus`] type and every transition between statuses,
//! each a named statement here (other modules call these, none writes `status` itself).
//! Invariant: every write on a claimed row is fenced by (owner, attempt, `delivering`), so a
//! replica whose lease lapsed can never overwrite a newer claim; no transaction waits on an HTTP
//! call, but a fan-out's for at most its fold wait (2 ms, `outbox::fold`); nothing waits
//! forever for an endpoint that no longer takes it (the sweeper).
//!
//! ```text
//!            fan-out ─┬─> pending ──claim──> delivering ──2xx──────────> delivered
//!                     │     ^  │                │ ├──failure, retries left──> pending (due later)
//!   (fast path) ──────┼─────┼──┼─> delivering   │ ├──failure, none left────> failed
//!                     │     │  │                │ ├──410────────────────────> paused (endpoint off)
//!                     │     │  │                │ ├──hand back / defer──────> pending | paused | cancelled
//!                     │     │  │                │ └──lease lapsed───────────> pending (or failed after
//!                     │     │  │                                              max_lease_lapses)
//!                     └─> paused <──pause / sweep──┘  ──resume──> pending
//!   pending | paused ──delete / sweep / re-tenant──> cancelled;  failed | cancelled ──retry──> pending
//!
//!   keyed (ordering_key): fan-out / retry ──> queued ──advance (the key has no head)──> pending | paused
//!   queued ──delete / re-tenant / cancel──> cancelled
//!
//!   fast path, its 2xx in before the fan-out commits ──> delivered (inserted so by the fan-out)
//! ```
//!
//! A keyed delivery is its key's *head* while `pending`, `delivering` or `paused`; `ordering`
//! keeps one head per (endpoint, key).

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use uuid::Uuid;

mod changes;
pub mod flow;
pub mod ordering;
mod store;
pub use changes::*;
pub use store::{DeliveryStore, Room};

/// How long after its lease lapsed a delivery becomes due again. The replica that made the
/// attempt may still run and hold its outcome: cut off from the database for longer than the
/// lease (a failover), its settler retries at least once a second, and when the database is back
/// its outcome must be written before another attempt is made (`ack_late`), or a delivered event
/// is sent twice. A replica that died costs its deliveries this much more than their lease.
pub const LAPSE_GRACE: Duration = Duration::from_secs(3);

/// `postern.deliveries.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (due at `next_attempt_at`).
    Pending,
    /// Claimed by a replica under a lease, for one attempt.
    Delivering,
    /// A receiver answered 2xx.
    Delivered,
    /// Attempts exhausted, or a failure no retry can fix: the dead letter, kept and visible.
    Failed,
    /// Its endpoint is inactive; back to `Pending` when it is active again.
    Paused,
    /// Its endpoint was deleted, or no longer may see the event.
    Cancelled,
    /// Behind an earlier delivery of its ordering key to the same endpoint.
    Queued,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 7] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Delivering,
        DeliveryStatus::Delivered,
        DeliveryStatus::Failed,
        DeliveryStatus::Paused,
        DeliveryStatus::Cancelled,
        DeliveryStatus::Queued,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivering => "delivering",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Paused => "paused",
            DeliveryStatus::Cancelled => "cancelled",
            DeliveryStatus::Queued => "queued",
        }
    }

    /// Waiting for its endpoint in one way or another: not finished.
    pub fn is_unfinished(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Pending
                | DeliveryStatus::Delivering
                | DeliveryStatus::Paused
                | DeliveryStatus::Queued
        )
    }
}

impl std::fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeliveryStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown delivery status {s:?}"))
    }
}

impl ToSql for DeliveryStatus {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.as_str().to_sql(ty, out)
    }
    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }
    tokio_postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for DeliveryStatus {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(<&str as FromSql>::from_sql(ty, raw)?.parse()?)
    }
    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

/// An event's `created_at` as its deliveries carry it: the app's value, unless no envelope
/// timestamp can spell it (infinite, unreadable, or outside the years 1-9999); then the time it is
/// read. The app writes the column, and no value of it may stop a delivery.
pub fn event_time(at: Option<DateTime<Utc>>) -> DateTime<Utc> {
    at.filter(|t| (1..=9999).contains(&t.year()))
        .unwrap_or_else(Utc::now)
}

/// SQL reading one member of the W3C trace context from the event's `metadata` (in scope
/// unqualified), when it is a string. Postgres reads it, not Postern: the app may store any JSON
/// there, numbers no double holds and nesting deeper than a parser follows included, and no
/// event may fail the statement that takes it (or every later one would fail with it).
macro_rules! trace_member {
    ($name:literal) => {
        concat!(
            "CASE WHEN jsonb_typeof(metadata -> '",
            $name,
            "') = 'string' THEN metadata ->> '",
            $name,
            "' END"
        )
    };
}
pub(crate) use trace_member;

/// The W3C trace context an event carries in its metadata, if any.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    pub parent: Option<String>,
    pub state: Option<String>,
}

impl Trace {
    /// From `ARRAY[traceparent, tracestate]` as the claims read it.
    pub fn from_pair(pair: Vec<Option<String>>) -> Self {
        let mut it = pair.into_iter();
        Self {
            parent: it.next().flatten(),
            state: it.next().flatten(),
        }
    }
}

/// One delivery claimed for one attempt, with everything needed to make it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    /// The attempt number this claim is for (1-based); the fence of every later write.
    pub attempt: i32,
    pub endpoint_id: String,
    pub event_id: Uuid,
    pub event_type: String,
    /// The event payload as JSON text (jsonb's normal form), shared by the fan-out's copies.
    pub payload: std::sync::Arc<str>,
    pub created_at: DateTime<Utc>,
    pub url: String,
    pub headers: serde_json::Value,
    pub signature: String,
    pub retry: Option<serde_json::Value>,
    /// The trace context the event's metadata carries (sent along as headers).
    pub trace: Trace,
    /// Unexpired secrets, newest first.
    pub secrets: Vec<String>,
    /// Its event's ordering key: at most one delivery of it per endpoint is ever in flight.
    pub ordering_key: Option<String>,
    /// Claimed as the probe of an open circuit.
    pub probe: bool,
}

#[cfg(test)]
impl Claimed {
    /// For tests: a first attempt of a fresh event to `endpoint` (a loopback URL, Standard
    /// Webhooks, no secret, no key), with `event_type` and `payload`.
    pub(crate) fn for_test(endpoint: &str, event_type: &str, payload: &str) -> Self {
        Self {
            id: Uuid::now_v7(),
            attempt: 1,
            endpoint_id: endpoint.into(),
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            payload: payload.into(),
            created_at: Utc::now(),
            url: "http://127.0.0.1:1/".into(),
            headers: serde_json::Value::Null,
            signature: "standard".into(),
            retry: None,
            trace: Trace::default(),
            secrets: Vec::new(),
            ordering_key: None,
            probe: false,
        }
    }
}

/// How an attempt settles its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Delivered,
    Retry {
        at: DateTime<Utc>,
    },
    /// Attempts exhausted, or a failure no retry can fix: the dead letter.
    Failed,
    /// `410 Gone`: the endpoint is disabled and its deliveries paused, this one included.
    EndpointGone,
}

/// The record of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    /// The head of the response body, the receiver's exact bytes (stored as `bytea`).
    pub response_body: Option<bytes::Bytes>,
    pub error: Option<String>,
    /// The headers the request carried (custom header values redacted), one per line.
    pub request_headers: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Ack {
    pub id: Uuid,
    pub attempt: i32,
    pub endpoint_id: String,
    pub ordering_key: Option<String>,
    pub settle: Settle,
    pub record: AttemptRecord,
    /// Whether the outcome says something about the receiver (counts for its breaker): not an
    /// attempt cut short at shutdown.
    pub judged: bool,
    /// The attempt was an open circuit's probe.
    pub probe: bool,
    /// A `Retry-After` the receiver sent (with a 429 or 503 it pauses the whole endpoint).
    pub retry_after: Option<Duration>,
}

impl Ack {
    /// The same outcome without anything the receiver sent, and with the reason its full record
    /// could not be written: what is kept when the database refused the row as it was.
    pub fn without_receiver_data(&self, reason: &str) -> Ack {
        let mut ack = self.clone();
        ack.record.response_body = None;
        ack.record.error = Some(match &self.record.error {
            Some(e) => format!("{e}; the response could not be recorded: {reason}"),
            None => format!("the response could not be recorded: {reason}"),
        });
        ack
    }
}

/// Postgres `text` cannot hold NUL: an error text (which may quote what a receiver or resolver
/// said) is stored with each NUL replaced, never refused.
pub fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Whether the database refused the rows themselves (a data exception, class 22, or an integrity
/// violation, class 23): retrying the same rows cannot help, writing them one by one finds the
/// bad one. Anything else (a statement timeout or cancel, a deadlock, a lock timeout, a shutdown,
/// a lost connection) says nothing about the rows and is worth retrying as it is.
pub fn is_statement_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tokio_postgres::Error>()
            .and_then(|pg| pg.code())
            .is_some_and(|code| matches!(&code.code()[..2], "22" | "23"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_match_the_column_check() {
        // The CHECK in migration 4 lists exactly these.
        let check = include_str!("../../db/migrations/0004_ordering.sql");
        for s in DeliveryStatus::ALL {
            assert_eq!(s.as_str().parse::<DeliveryStatus>(), Ok(s));
            assert!(check.contains(&format!("'{s}'")), "{s}");
        }
        assert!("sent".parse::<DeliveryStatus>().is_err());
        let unfinished: Vec<_> = DeliveryStatus::ALL
            .into_iter()
            .filter(|s| s.is_unfinished())
            .collect();
        assert_eq!(
            unfinished,
            [
                DeliveryStatus::Pending,
                DeliveryStatus::Delivering,
                DeliveryStatus::Paused,
                DeliveryStatus::Queued
            ]
        );
    }
}
