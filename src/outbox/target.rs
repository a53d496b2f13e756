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
    /// No rate limit, back pressure or open circuit: the fast path may skip the claim.
    pub(super) unhindered: bool,
    pub(super) subscription: Subscription,
    pub(super) url: String,
    pub(super) headers: serde_json::Value,
    pub(super) signature: String,
    pub(super) retry: Option<serde_json::Value>,
    pub(super) secrets: Vec<String>,
}

impl Target {
    /// From a row of the fan-out's endpoint read (`Dispatcher`'s `endpoints` statement).
    pub(super) fn from_row(r: &Row) -> Self {
        Self {
            id: r.get(0),
            tenant: r.get(1),
            active: r.get(2),
            subscription: Subscription::new(&r.get::<_, Vec<String>>(3)),
            url: r.get(4),
            headers: r.get(5),
            signature: r.get(6),
            retry: r.get(7),
            secrets: r.get(8),
            unhindered: r.get(9),
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
            unhindered: true,
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
