//! Who gets an event: an endpoint as the fan-out sees it, and the routing rules (an explicit
//! target, then tenant, then event patterns). Invariant: an event naming a target goes to that
//! endpoint alone; otherwise an endpoint gets only its own tenant's events (`*`: all).

use tokio_postgres::Row;

use super::glob::Subscription;

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
    /// From a row of the fan-out's endpoint read (`Dispatcher`'s `endpoints` statement), by
    /// column name.
    pub(super) fn from_row(r: &Row) -> Self {
        Self {
            id: r.get("id"),
            tenant: r.get("tenant"),
            active: r.get("active"),
            subscription: Subscription::new(&r.get::<_, Vec<String>>("events")),
            url: r.get("url"),
            headers: r.get("headers"),
            signature: r.get("signature"),
            retry: r.get("retry"),
            secrets: r.get("secrets"),
            rate_limited: r.get("rate_limited"),
        }
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
