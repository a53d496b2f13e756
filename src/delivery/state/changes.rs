//! The transitions that endpoint changes and operators make (pause, resume, cancel, retry,
//! replay), beside the pipeline's in the parent module: together, every way a delivery's status
//! changes.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::DeliveryStatus;
use crate::db::Schema;

// Transitions an endpoint's change makes. Each takes the caller's transaction, which holds the
// fan-out lock (`endpoints::exclude_fan_out`), so no fan-out pass straddles it. Each moves at most
// 10,000 deliveries, so the change commits quickly however large the backlog; the sweeper moves
// the rest within moments (the change's announcement rings it).

/// Moves up to 10,000 of the endpoints' deliveries in one of `from` to `to` (due at once when
/// `to` is pending).
async fn move_waiting(
    tx: &Transaction<'_>,
    schema: &Schema,
    endpoint_ids: &[String],
    from: &[DeliveryStatus],
    to: DeliveryStatus,
) -> anyhow::Result<u64> {
    Ok(tx
        .execute(
            &schema.sql(
                "UPDATE __SCHEMA__.deliveries
                 SET status = $3, updated_at = now(),
                     next_attempt_at = CASE WHEN $3 = 'pending' THEN now() ELSE next_attempt_at END
                 WHERE id IN (SELECT id FROM __SCHEMA__.deliveries
                              WHERE endpoint_id = ANY($1) AND status = ANY($2) LIMIT 10000)",
            ),
            &[&endpoint_ids, &from, &to],
        )
        .await?)
}

/// Pending -> paused: the endpoint became inactive.
pub async fn pause_waiting(
    tx: &Transaction<'_>,
    schema: &Schema,
    endpoint_ids: &[String],
) -> anyhow::Result<u64> {
    use DeliveryStatus::*;
    move_waiting(tx, schema, endpoint_ids, &[Pending], Paused).await
}

/// Paused -> pending, due at once: the endpoint is active again.
pub async fn resume_paused(
    tx: &Transaction<'_>,
    schema: &Schema,
    endpoint_ids: &[String],
) -> anyhow::Result<u64> {
    use DeliveryStatus::*;
    move_waiting(tx, schema, endpoint_ids, &[Paused], Pending).await
}

/// Pending | paused -> cancelled: the endpoint was deleted (in-flight ones settle as cancelled
/// when their attempt ends).
pub async fn cancel_unfinished(
    tx: &Transaction<'_>,
    schema: &Schema,
    endpoint_ids: &[String],
) -> anyhow::Result<u64> {
    use DeliveryStatus::*;
    move_waiting(tx, schema, endpoint_ids, &[Pending, Paused], Cancelled).await
}

/// Pending | paused | delivering -> cancelled, after an endpoint's tenant changed, for events the
/// tenant rules no longer give it (a replica holding one finds its outcome fenced off). Targeted
/// events (a test event) stay.
pub async fn cancel_ineligible(
    tx: &Transaction<'_>,
    schema: &Schema,
    endpoint_id: &str,
) -> anyhow::Result<u64> {
    Ok(tx
        .execute(
            &schema.sql(
                "UPDATE __SCHEMA__.deliveries d
                 SET status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL,
                     last_error = 'cancelled: the endpoint''s tenant changed and this event is not for it',
                     updated_at = now()
                 FROM __SCHEMA__.endpoints e, __SCHEMA__.outbox o
                 WHERE e.id = $1 AND d.endpoint_id = e.id AND o.id = d.outbox_id
                   AND d.status IN ('pending', 'paused', 'delivering')
                   AND o.target_endpoint IS DISTINCT FROM e.id
                   AND e.tenant IS DISTINCT FROM '*' AND e.tenant IS DISTINCT FROM o.tenant",
            ),
            &[&endpoint_id],
        )
        .await?)
}

// Transitions an operator asks for through the API.

/// Failed | cancelled | pending -> pending (or paused, for an inactive endpoint), due now: one
/// more attempt. Only from `from`, so a delivery that changed meanwhile is left alone; returns
/// whether it moved.
pub async fn retry_now(
    client: &deadpool_postgres::Client,
    schema: &Schema,
    id: Uuid,
    from: DeliveryStatus,
) -> anyhow::Result<bool> {
    Ok(client
        .execute(
            &schema.sql(
                "UPDATE __SCHEMA__.deliveries d
                 SET status = CASE WHEN e.active THEN 'pending' ELSE 'paused' END,
                     next_attempt_at = now(), updated_at = now()
                 FROM __SCHEMA__.endpoints e
                 WHERE d.id = $1 AND d.status = $2 AND e.id = d.endpoint_id",
            ),
            &[&id, &from],
        )
        .await?
        > 0)
}

/// Failed -> pending (or paused) for every delivery of the endpoint created in the window.
pub async fn replay_failed(
    client: &deadpool_postgres::Client,
    schema: &Schema,
    endpoint_id: &str,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
) -> anyhow::Result<u64> {
    Ok(client
        .execute(
            &schema.sql(
                "UPDATE __SCHEMA__.deliveries d
                 SET status = CASE WHEN e.active THEN 'pending' ELSE 'paused' END, next_attempt_at = now(), updated_at = now()
                 FROM __SCHEMA__.endpoints e
                 WHERE e.id = d.endpoint_id AND d.endpoint_id = $1 AND d.status = 'failed'
                   AND d.created_at >= $2 AND ($3::timestamptz IS NULL OR d.created_at < $3)",
            ),
            &[&endpoint_id, &since, &until],
        )
        .await?)
}
