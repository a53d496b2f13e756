//! Fan-out: turns undispatched outbox rows into one delivery per matching endpoint.
//! Invariant: claiming the rows, inserting their deliveries and marking them dispatched happen in
//! one transaction, so an event is fanned out exactly once even with several replicas (rows are
//! taken with `FOR UPDATE SKIP LOCKED`, never by a high-water mark: `id` order is not commit order).

use deadpool_postgres::Pool;
use uuid::Uuid;

use super::glob::Subscription;
use crate::db::Schema;

/// An endpoint as the matcher sees it.
struct Target {
    id: String,
    tenant: Option<String>,
    active: bool,
    subscription: Subscription,
}

impl Target {
    /// An event naming a target goes to that endpoint alone, whatever its subscription (that is
    /// how a test event reaches it). Otherwise the tenant rules (`T` gets tenant T only; no
    /// tenant gets untenanted events only; `*` gets all) and the event patterns decide.
    fn wants(&self, event_type: &str, tenant: Option<&str>, target: Option<&str>) -> bool {
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

/// What one dispatcher pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dispatched {
    pub events: usize,
    pub deliveries: usize,
    /// Seconds from each event's insert to its dispatch (for the lag metric).
    pub lags: Vec<f64>,
}

pub struct Dispatcher {
    pool: Pool,
    batch: i64,
    take: String,
    endpoints: String,
    insert: String,
    mark: String,
}

impl Dispatcher {
    pub fn new(pool: Pool, schema: &Schema, batch: usize) -> Self {
        Self {
            pool,
            batch: batch as i64,
            take: schema.sql(
                "SELECT id, event_id, event_type, tenant, target_endpoint,
                        extract(epoch FROM clock_timestamp() - created_at)::float8
                 FROM __SCHEMA__.outbox WHERE dispatched_at IS NULL
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            ),
            endpoints: schema.sql(
                "SELECT id, tenant, active, events FROM __SCHEMA__.endpoints WHERE deleted_at IS NULL",
            ),
            insert: schema.sql(
                "INSERT INTO __SCHEMA__.deliveries (outbox_id, event_id, event_type, endpoint_id, status)
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[])",
            ),
            mark: schema.sql("UPDATE __SCHEMA__.outbox SET dispatched_at = now() WHERE id = ANY($1)"),
        }
    }

    /// Fans out one batch. Call again while it returns a full batch.
    pub async fn dispatch_once(&self) -> anyhow::Result<Dispatched> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let take = tx.prepare_cached(&self.take).await?;
        let rows = tx.query(&take, &[&self.batch]).await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Dispatched::default());
        }
        // Read inside the transaction, so an endpoint created before the event committed is seen.
        let endpoints = tx.prepare_cached(&self.endpoints).await?;
        let targets: Vec<Target> = tx
            .query(&endpoints, &[])
            .await?
            .iter()
            .map(|r| Target {
                id: r.get(0),
                tenant: r.get(1),
                active: r.get(2),
                subscription: Subscription::new(&r.get::<_, Vec<String>>(3)),
            })
            .collect();

        let mut outbox_ids = Vec::with_capacity(rows.len());
        let (mut d_outbox, mut d_event, mut d_type, mut d_endpoint, mut d_status) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut lags = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.get(0);
            let event_id: Uuid = r.get(1);
            let event_type: String = r.get(2);
            let tenant: Option<String> = r.get(3);
            let target: Option<String> = r.get(4);
            lags.push(r.get::<_, f64>(5));
            outbox_ids.push(id);
            for t in &targets {
                if t.wants(&event_type, tenant.as_deref(), target.as_deref()) {
                    d_outbox.push(id);
                    d_event.push(event_id);
                    d_type.push(event_type.clone());
                    d_endpoint.push(t.id.as_str());
                    // Inactive endpoints still get their deliveries, paused, so re-activating
                    // one loses nothing.
                    d_status.push(if t.active { "pending" } else { "paused" });
                }
            }
        }
        if !d_outbox.is_empty() {
            let insert = tx.prepare_cached(&self.insert).await?;
            tx.execute(
                &insert,
                &[&d_outbox, &d_event, &d_type, &d_endpoint, &d_status],
            )
            .await?;
        }
        let mark = tx.prepare_cached(&self.mark).await?;
        tx.execute(&mark, &[&outbox_ids]).await?;
        tx.commit().await?;
        Ok(Dispatched {
            events: rows.len(),
            deliveries: d_outbox.len(),
            lags,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch as usize
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
            subscription: Subscription::new(events),
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
