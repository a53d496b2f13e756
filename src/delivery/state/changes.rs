//! The transitions that endpoint changes and operators make (pause, resume, cancel, retry,
//! replay), beside the pipeline's in the parent module: together, every way a delivery's status
//! changes.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::ordering::{Keys, Ordering};
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

/// Pending | paused | queued -> cancelled: the endpoint was deleted (in-flight ones settle as
/// cancelled when their attempt ends).
pub async fn cancel_unfinished(
    tx: &Transaction<'_>,
    schema: &Schema,
    endpoint_ids: &[String],
) -> anyhow::Result<u64> {
    use DeliveryStatus::*;
    move_waiting(
        tx,
        schema,
        endpoint_ids,
        &[Pending, Paused, Queued],
        Cancelled,
    )
    .await
}

/// Whether the event of delivery `d` (`o`) is one its endpoint (`e`) may get under the tenant
/// rules as they are now: targeted at it, or its tenant's (an endpoint of tenant `*` gets all).
/// Every operator's way to send a delivery again checks it: a re-tenanted endpoint gets nothing
/// of its old tenant's.
pub const FOR_ITS_ENDPOINT: &str = "(o.target_endpoint IS NOT DISTINCT FROM e.id
    OR e.tenant IS NOT DISTINCT FROM '*' OR e.tenant IS NOT DISTINCT FROM o.tenant)";

/// A keyed delivery a tenant change left in flight (see [`cancel_ineligible`]), as it comes
/// back due (an attempt that did not deliver, a hand-back, a deferral, a lapsed lease): it is
/// cancelled instead, never sent to the new tenant. `d` is the delivery, `e` its endpoint; the
/// outbox is read only for a keyed delivery at an endpoint with a tenant.
pub fn keyed_for_another_tenant() -> String {
    format!(
        "(d.ordering_key IS NOT NULL AND e.tenant IS DISTINCT FROM '*'
          AND EXISTS (SELECT 1 FROM __SCHEMA__.outbox o WHERE o.id = d.outbox_id
                      AND NOT {FOR_ITS_ENDPOINT}))"
    )
}

/// Pending | paused | queued | delivering -> cancelled, after an endpoint's tenant changed, for
/// events the tenant rules no longer give it (a replica holding one finds its outcome fenced off).
/// Targeted events (a test event) stay, and so does a keyed delivery in flight (cancelling it
/// would let its key's next one go while it is still being sent): if that attempt does not
/// deliver, its settle cancels it rather than make it due again (the ack statement). Keys whose
/// head this cancels move on by the sweeper.
pub async fn cancel_ineligible(
    tx: &Transaction<'_>,
    schema: &Schema,
    endpoint_id: &str,
) -> anyhow::Result<u64> {
    Ok(tx
        .execute(
            &schema.sql(&format!(
                "UPDATE __SCHEMA__.deliveries d
                 SET status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL,
                     last_error = 'cancelled: the endpoint''s tenant changed and this event is not for it',
                     updated_at = now()
                 FROM __SCHEMA__.endpoints e, __SCHEMA__.outbox o
                 WHERE e.id = $1 AND d.endpoint_id = e.id AND o.id = d.outbox_id
                   AND d.status IN ('pending', 'paused', 'delivering', 'queued')
                   AND NOT (d.status = 'delivering' AND d.ordering_key IS NOT NULL)
                   AND NOT {FOR_ITS_ENDPOINT}"
            )),
            &[&endpoint_id],
        )
        .await?)
}

// Transitions an operator asks for through the API. A keyed delivery changes only under its
// key's lock, and rejoins its key's queue rather than jumping it (`ordering`).

/// Locks an endpoint's row against changes (a tenant change updates it) until the transaction
/// ends, so what a retry or replay reads of it stays true while it moves deliveries.
async fn lock_endpoint(
    tx: &Transaction<'_>,
    schema: &Schema,
    endpoint: &str,
) -> anyhow::Result<()> {
    tx.execute(
        &schema.sql("SELECT 1 FROM __SCHEMA__.endpoints WHERE id = $1 FOR SHARE"),
        &[&endpoint],
    )
    .await?;
    Ok(())
}

/// [`lock_endpoint`] for the endpoint of delivery `id`.
async fn lock_endpoint_of(tx: &Transaction<'_>, schema: &Schema, id: Uuid) -> anyhow::Result<()> {
    tx.execute(
        &schema.sql(
            "SELECT 1 FROM __SCHEMA__.endpoints e JOIN __SCHEMA__.deliveries d ON d.endpoint_id = e.id
             WHERE d.id = $1 FOR SHARE OF e",
        ),
        &[&id],
    )
    .await?;
    Ok(())
}

/// The (endpoint, key) of keyed deliveries among `ids`.
async fn keys_of(tx: &Transaction<'_>, schema: &Schema, ids: &[Uuid]) -> anyhow::Result<Keys> {
    let mut keys = Keys::default();
    for r in tx
        .query(
            &schema.sql(
                "SELECT endpoint_id, ordering_key FROM __SCHEMA__.deliveries
                 WHERE id = ANY($1) AND ordering_key IS NOT NULL",
            ),
            &[&ids],
        )
        .await?
    {
        keys.push(r.get(0), r.get(1));
    }
    Ok(keys)
}

/// Failed | cancelled | pending -> pending (or paused, for an inactive endpoint), due now: one
/// more attempt. A keyed one rejoins its key's queue and goes when its turn comes (at once, if the
/// key has no other head). Only from `from`, so a delivery that changed meanwhile is left alone;
/// returns whether it moved.
pub async fn retry_now(
    client: &mut deadpool_postgres::Client,
    schema: &Schema,
    ordering: &Ordering,
    id: Uuid,
    from: DeliveryStatus,
) -> anyhow::Result<bool> {
    let tx = client.transaction().await?;
    let keys = keys_of(&tx, schema, &[id]).await?;
    ordering.lock(&tx, &keys).await?;
    // Then the endpoint's row, shared (after the key, as a settle that disables it does): a
    // tenant change (which updates it) waits for this retry, or this retry for it and then sees
    // its tenant.
    lock_endpoint_of(&tx, schema, id).await?;
    let moved = tx
        .execute(
            &schema.sql(&format!(
                "UPDATE __SCHEMA__.deliveries d
                 SET status = CASE WHEN d.ordering_key IS NOT NULL AND d.status <> 'pending' THEN 'queued'
                                   WHEN e.active THEN 'pending' ELSE 'paused' END,
                     -- A late outcome of the lapsed attempt must not undo the operator's retry.
                     next_attempt_at = now(), updated_at = now(), lease_lapses = 0
                 FROM __SCHEMA__.endpoints e, __SCHEMA__.outbox o
                 WHERE d.id = $1 AND d.status = $2 AND e.id = d.endpoint_id AND o.id = d.outbox_id
                   AND {FOR_ITS_ENDPOINT}"
            )),
            &[&id, &from],
        )
        .await?
        > 0;
    ordering.advance(&tx, &keys, &[]).await?;
    tx.commit().await?;
    Ok(moved)
}

/// Failed -> pending (or paused) for every delivery of the endpoint created in the window; keyed
/// ones rejoin their keys' queues. In batches of [`REPLAY_BATCH`], oldest first, each its own
/// transaction: a replay of millions holds a batch's keys and the endpoint's row only while it
/// moves that batch, never the whole replay (every settle of a locked key waits, and so does an
/// endpoint change, holding fan-out off meanwhile). Returns how many moved.
pub async fn replay_failed(
    client: &mut deadpool_postgres::Client,
    schema: &Schema,
    ordering: &Ordering,
    endpoint_id: &str,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
) -> anyhow::Result<u64> {
    // The walk goes on past what it looked at (`$4`, `$5`), moved or not (another tenant's).
    let look = schema.sql(
        "SELECT id, created_at, ordering_key FROM __SCHEMA__.deliveries
         WHERE endpoint_id = $1 AND status = 'failed'
           AND created_at >= $2 AND ($3::timestamptz IS NULL OR created_at < $3)
           AND (created_at, id) > ($4, $5)
         ORDER BY created_at, id LIMIT $6",
    );
    let change = schema.sql(&format!(
        "UPDATE __SCHEMA__.deliveries d
         SET status = CASE WHEN d.ordering_key IS NOT NULL THEN 'queued'
                           WHEN e.active THEN 'pending' ELSE 'paused' END,
             next_attempt_at = now(), updated_at = now(), lease_lapses = 0
         FROM __SCHEMA__.endpoints e, __SCHEMA__.outbox o
         WHERE d.id = ANY($2) AND d.status = 'failed' AND e.id = d.endpoint_id AND e.id = $1
           AND o.id = d.outbox_id AND {FOR_ITS_ENDPOINT}
         RETURNING d.ordering_key"
    ));
    let (mut after, mut moved) = ((since - chrono::Duration::microseconds(1), Uuid::nil()), 0);
    loop {
        let tx = client.transaction().await?;
        let batch = tx
            .query(
                &look,
                &[
                    &endpoint_id,
                    &since,
                    &until,
                    &after.0,
                    &after.1,
                    &REPLAY_BATCH,
                ],
            )
            .await?;
        let Some(last) = batch.last() else {
            break;
        };
        after = (last.get(1), last.get(0));
        let ids: Vec<Uuid> = batch.iter().map(|r| r.get(0)).collect();
        let mut keys = Keys::default();
        let mut seen = std::collections::BTreeSet::new();
        for r in &batch {
            if let Some(key) = r.get::<_, Option<&str>>(2) {
                if seen.insert(key) {
                    keys.push(endpoint_id, key);
                }
            }
        }
        ordering.lock(&tx, &keys).await?;
        // As in `retry_now`: the endpoint's row after the keys.
        lock_endpoint(&tx, schema, endpoint_id).await?;
        let rows = tx.query(&change, &[&endpoint_id, &ids]).await?;
        moved += rows.len() as u64;
        ordering.advance(&tx, &keys, &[]).await?;
        tx.commit().await?;
        if (batch.len() as i64) < REPLAY_BATCH {
            break;
        }
    }
    Ok(moved)
}

/// Deliveries a replay moves per transaction.
const REPLAY_BATCH: i64 = 1000;

/// Pending | paused | queued | failed -> cancelled: an operator gives up on a delivery (a blocked
/// key's failed head, say). Its key moves on. Returns whether it moved.
pub async fn cancel(
    client: &mut deadpool_postgres::Client,
    schema: &Schema,
    ordering: &Ordering,
    id: Uuid,
) -> anyhow::Result<bool> {
    let tx = client.transaction().await?;
    let keys = keys_of(&tx, schema, &[id]).await?;
    ordering.lock(&tx, &keys).await?;
    let moved = tx
        .execute(
            &schema.sql(
                "UPDATE __SCHEMA__.deliveries
                 SET status = 'cancelled', last_error = 'cancelled through the API', updated_at = now()
                 WHERE id = $1 AND status IN ('pending', 'paused', 'queued', 'failed')",
            ),
            &[&id],
        )
        .await?
        > 0;
    ordering.advance(&tx, &keys, &[]).await?;
    tx.commit().await?;
    Ok(moved)
}
