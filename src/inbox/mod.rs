//! The durable inbox: verified provider requests committed to `inbox` before the provider gets
//! its answer, then handed to the app by Postern (`consume = "forward"`) or taken by the app in
//! its own transaction (`consume = "sql"`, `inbox_take` / `inbox_done`).
//! Invariant: a request is acknowledged only after its row (or the row of an earlier delivery
//! with the same dedupe key) is committed durably; a stored message is never deleted before it is
//! handled, and only the status transitions named in [`InboxStatus`] move it.
//!
//! Design:
//! - **Accept.** The proxy hands each verified request to the [`writer`]: a few committer tasks,
//!   each taking every request queued while the previous commit was flushing and inserting them
//!   in one transaction (`synchronous_commit = on`), so a burst costs a handful of WAL flushes,
//!   not one per request. Duplicates (`UNIQUE (route, dedupe_key)`, `ON CONFLICT DO NOTHING`,
//!   which never waits on a row a consumer holds) are answered like the original.
//! - **Forward.** The [`forward`] loop claims due messages of forward routes under a lease, sends
//!   each to the app as the proxy would have (plus `x-postern-inbox-id`), and settles it fenced by
//!   (attempt, lease owner), with the outbound retry policy and an attempt log. An app that
//!   refuses connections is down, not failing: the message goes back without an attempt counted
//!   and the loop waits (at most 5 s) before it looks again, so a restart of the app costs no
//!   retries and its backlog flows as soon as it listens.
//! - **Order** is not promised across messages: they are forwarded concurrently and retried
//!   independently (providers do not promise it either).

pub mod forward;
pub mod store;
pub mod writer;

use serde::Serialize;

/// Where a message is. Transitions (each one statement in `store` or the migration's functions):
/// - `accept`: (new) -> `Pending`
/// - `claim`: `Pending` -> `Delivering` (forward routes, leased)
/// - `delivered`: `Delivering` -> `Done` (the app answered 2xx)
/// - `retry`: `Delivering` -> `Pending` (later), `give_up`: `Delivering` -> `Failed`
/// - `hand_back` / `reap`: `Delivering` -> `Pending` (app down, shutdown, or a lapsed lease)
/// - `inbox_take`: `Pending` | `Taken` (expired) -> `Taken`; `inbox_done`: `Taken` -> `Done`
/// - `replay` (API): `Done` | `Failed` | `Pending` -> `Pending`, due now
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboxStatus {
    Pending,
    Delivering,
    Taken,
    Done,
    Failed,
}

impl InboxStatus {
    pub const ALL: [InboxStatus; 5] = [
        InboxStatus::Pending,
        InboxStatus::Delivering,
        InboxStatus::Taken,
        InboxStatus::Done,
        InboxStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InboxStatus::Pending => "pending",
            InboxStatus::Delivering => "delivering",
            InboxStatus::Taken => "taken",
            InboxStatus::Done => "done",
            InboxStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A verified request as the app would receive it, ready to store.
#[derive(Debug, Clone)]
pub struct Message {
    pub route: String,
    pub provider: String,
    pub dedupe_key: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lower-case names, values as received.
    pub header_names: Vec<String>,
    pub header_values: Vec<Vec<u8>>,
    pub body: bytes::Bytes,
    /// `forward` or `sql`: who hands it to the app.
    pub consume: &'static str,
}

/// What the provider is told about its request once it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub id: i64,
    /// An earlier delivery with the same dedupe key was stored already.
    pub duplicate: bool,
}
