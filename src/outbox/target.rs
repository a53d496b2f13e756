//! Who gets an event: the endpoints as the fan-out reads and keeps them, and the routing rules
//! (an explicit target, then tenant, then event patterns). Invariants: an event naming a target
//! goes to that endpoint alone; otherwise an endpoint gets only its own tenant's events (`*`:
//! all); endpoints kept from an earlier pass are used only while their version has not moved and
//! no secret kept with them has expired.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::cells::Cells;
use super::dispatcher::KEYED_WAITING;
use super::glob::Subscription;
use crate::db::Schema;

/// What every pass needs besides the events, in one row: whether the endpoints must be read
/// (their version, moved by every committed change to them (migration 9), differs from the one
/// known, `$1`, NULL: none known; or a secret in use has expired since, `$2`), whether keyed
/// events wait, and the endpoints whose back pressure, pause or open circuit is in force (so a
/// policy that starts while no event comes is seen within a poll interval). The endpoints
/// themselves are a statement of their own ([`read_sql`]): planned into this one, never run,
/// their tables, indexes and sub-plans were still opened and locked on every pass, a third of
/// the first round trip's server time. Every column is text (see `cells`).
pub(super) fn head_sql(schema: &Schema) -> String {
    schema.sql(&format!(
        "SELECT (v.version IS DISTINCT FROM $1::uuid OR v.version IS NULL
                 OR coalesce($2::timestamptz <= now(), false))::text AS read,
                ({KEYED_WAITING})::text AS keyed,
                to_json(ARRAY(SELECT f.endpoint_id FROM __SCHEMA__.endpoint_flow f
                              WHERE f.backoff_rate IS NOT NULL OR f.paused_until > now()
                                 OR f.opened_at IS NOT NULL))::text AS hindered
         FROM (SELECT (SELECT version FROM __SCHEMA__.endpoints_version) AS version) v"
    ))
}

/// The endpoints and their version, in one snapshot, so what is kept under a version is what it
/// holds: one row per endpoint, at least one row (the version). Every column is text.
pub(super) fn read_sql(schema: &Schema) -> String {
    schema.sql(
        "SELECT v.version::text AS version,
                e.id, e.tenant, e.active::text AS active, to_json(e.events)::text AS events, e.url,
                e.headers::text AS headers, e.signature, e.retry::text AS retry,
                to_json(e.secrets)::text AS secrets, e.rate_limited::text AS rate_limited,
                extract(epoch FROM e.next_expiry)::text AS next_expiry
         FROM (SELECT (SELECT version FROM __SCHEMA__.endpoints_version) AS version) v
         LEFT JOIN LATERAL (
             SELECT e.id, e.tenant, e.active, e.events, e.url, e.headers, e.signature, e.retry,
                    ARRAY(SELECT s.secret FROM __SCHEMA__.endpoint_secrets s
                          WHERE s.endpoint_id = e.id
                            AND (s.expires_at IS NULL OR s.expires_at > now())
                          ORDER BY s.id DESC) AS secrets,
                    e.rate_limit IS NOT NULL AS rate_limited,
                    (SELECT min(s.expires_at) FROM __SCHEMA__.endpoint_secrets s
                     WHERE s.endpoint_id = e.id AND s.expires_at > now()) AS next_expiry
             FROM __SCHEMA__.endpoints e WHERE e.deleted_at IS NULL) e ON true",
    )
}

/// The endpoints as a pass last read them, kept for the passes after it.
#[derive(Default)]
pub(super) struct Known(Mutex<Option<Kept>>);

struct Kept {
    version: Uuid,
    /// The earliest expiry among the secrets in use (a secret's grace ends by the clock alone).
    next_expiry: Option<DateTime<Utc>>,
    targets: Arc<[Target]>,
}

/// The head's parameters: the version known and the earliest expiry kept.
pub(super) type KnownParams = (Option<Uuid>, Option<DateTime<Utc>>);

impl Known {
    /// What is kept now, and what the pass's head ([`head_sql`]) is told about it.
    pub(super) fn current(&self) -> (Option<Arc<[Target]>>, KnownParams) {
        match &*self.0.lock().expect("never poisoned") {
            Some(k) => (Some(k.targets.clone()), (Some(k.version), k.next_expiry)),
            None => (None, (None, None)),
        }
    }

    /// The endpoints from [`read_sql`]'s rows, kept for the passes after this one.
    pub(super) fn store(&self, rows: &[impl Cells]) -> anyhow::Result<Arc<[Target]>> {
        let first = rows.first().context("the endpoint read returned no row")?;
        let mut targets = Vec::with_capacity(rows.len());
        let mut next_expiry: Option<DateTime<Utc>> = None;
        for r in rows {
            if r.cell("id")?.is_some() {
                targets.push(Target::from_cells(r)?);
                next_expiry = match (next_expiry, r.epoch("next_expiry")?) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let targets: Arc<[Target]> = targets.into();
        // Without a version row (removed by hand) nothing is kept: every pass reads.
        *self.0.lock().expect("never poisoned") = first.uuid("version")?.map(|version| Kept {
            version,
            next_expiry,
            targets: targets.clone(),
        });
        Ok(targets)
    }
}

/// What [`head_sql`] says of every pass.
pub(super) struct Head {
    /// The endpoints kept are out of date (or none are kept): read them.
    pub(super) read: bool,
    /// Keyed events wait to be fanned out.
    pub(super) keyed: bool,
    /// The endpoints whose back pressure, pause or open circuit is in force.
    pub(super) hindered: Vec<String>,
}

impl Head {
    /// What [`head_sql`]'s row says.
    pub(super) fn from_rows(rows: &[impl Cells]) -> anyhow::Result<Head> {
        let first = rows.first().context("the pass's head returned no row")?;
        Ok(Head {
            read: first.flag("read")?,
            keyed: first.flag("keyed")?,
            hindered: first.json("hindered")?.unwrap_or_default(),
        })
    }
}

/// An endpoint as the matcher sees it, with what a fast-path delivery to it needs.
pub(super) struct Target {
    pub(super) id: String,
    pub(super) tenant: Option<String>,
    pub(super) active: bool,
    /// Its own rate limit is set: every claim of its deliveries takes the gated statement.
    pub(super) rate_limited: bool,
    pub(super) subscription: Subscription,
    pub(super) url: String,
    pub(super) headers: serde_json::Value,
    pub(super) signature: String,
    pub(super) retry: Option<serde_json::Value>,
    pub(super) secrets: Vec<String>,
}

impl Target {
    /// From a row of the fan-out's endpoint read (`read_sql`), by column name.
    pub(super) fn from_cells(r: &impl Cells) -> anyhow::Result<Self> {
        Ok(Self {
            id: r.text("id")?.to_owned(),
            tenant: r.cell("tenant")?.map(str::to_owned),
            active: r.flag("active")?,
            subscription: Subscription::new(&r.json::<Vec<String>>("events")?.unwrap_or_default()),
            url: r.text("url")?.to_owned(),
            headers: r.json("headers")?.unwrap_or_default(),
            signature: r.text("signature")?.to_owned(),
            retry: r.json("retry")?,
            secrets: r.json("secrets")?.unwrap_or_default(),
            rate_limited: r.flag("rate_limited")?,
        })
    }

    /// An event naming a target goes to that endpoint alone, whatever its subscription (that is
    /// how a test event reaches it). Otherwise the tenant rules (`T` gets tenant T only; no
    /// tenant gets untenanted events only; `*` gets all) and the event patterns decide.
    pub(super) fn wants(
        &self,
        event_type: &str,
        tenant: Option<&str>,
        target: Option<&str>,
    ) -> bool {
        if let Some(target) = target {
            return target == self.id;
        }
        let tenant_ok = match self.tenant.as_deref() {
            Some("*") => true,
            mine => mine == tenant,
        };
        tenant_ok && self.subscription.matches(event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str, tenant: Option<&str>, events: &[&str]) -> Target {
        Target {
            id: id.into(),
            tenant: tenant.map(Into::into),
            active: true,
            rate_limited: false,
            subscription: Subscription::new(events),
            url: format!("http://127.0.0.1/{id}"),
            headers: serde_json::json!({}),
            signature: "standard".into(),
            retry: None,
            secrets: Vec::new(),
        }
    }

    #[test]
    fn tenant_rules() {
        let acme = target("a", Some("acme"), &["*"]);
        let none = target("n", None, &["*"]);
        let all = target("s", Some("*"), &["*"]);
        assert!(acme.wants("x", Some("acme"), None));
        assert!(!acme.wants("x", Some("other"), None));
        assert!(!acme.wants("x", None, None));
        assert!(none.wants("x", None, None));
        assert!(!none.wants("x", Some("acme"), None));
        assert!(all.wants("x", Some("acme"), None));
        assert!(all.wants("x", None, None));
    }

    #[test]
    fn target_endpoint_narrows() {
        let a = target("a", None, &["order.*"]);
        assert!(a.wants("order.created", None, Some("a")));
        assert!(!a.wants("order.created", None, Some("b")));
        // A targeted event bypasses the subscription and tenant filters.
        assert!(a.wants("postern.test", Some("acme"), Some("a")));
    }
}
