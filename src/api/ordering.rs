//! Ordering keys through the API: the keys blocked at an endpoint (with the delivery that blocks
//! each) and cancelling a delivery, which is how a blocked key is let go without a retry.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::deliveries::{endpoint_exists, from_row, parse_id, reload, Delivery, COLUMNS};
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use super::paging::page_limit;
use super::ApiState;
use crate::delivery::state::{self, DeliveryStatus};

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(blocked_keys))
        .routes(routes!(cancel_delivery))
}

#[derive(Serialize, ToSchema)]
struct BlockedKey {
    ordering_key: String,
    blocked_at: DateTime<Utc>,
    /// The failed delivery the key waits for: retry it or cancel it to let the key go on.
    head: Delivery,
    /// Deliveries of the key waiting behind it.
    queued: i64,
}

#[derive(Serialize, ToSchema)]
struct BlockedKeys {
    data: Vec<BlockedKey>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct BlockedQuery {
    /// At most this many keys, oldest block first (default 50, at most 250, as every page).
    limit: Option<i64>,
}

/// The ordering keys blocked at an endpoint (`ordering.on_failure = "block"`), oldest first.
#[utoipa::path(get, path = "/endpoints/{id}/blocked-keys", tag = "deliveries", params(BlockedQuery),
    responses((status = 200, body = BlockedKeys), (status = 404, body = ErrorBody)))]
async fn blocked_keys(
    State(app): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<BlockedQuery>,
) -> Result<Json<BlockedKeys>, ApiError> {
    let limit = page_limit(q.limit)?;
    if !endpoint_exists(&app, &id, true).await? {
        return Err(ApiError::not_found(format!("no endpoint {id}")));
    }
    let client = app.pool.get().await?;
    let columns = COLUMNS
        .split(',')
        .map(|c| format!("d.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = client
        .query(
            &app.schema.sql(&format!(
                "SELECT {columns}, k.ordering_key, k.blocked_at,
                        (SELECT count(*) FROM __SCHEMA__.deliveries q
                         WHERE q.endpoint_id = k.endpoint_id AND q.ordering_key = k.ordering_key
                           AND q.status = 'queued')
                 FROM __SCHEMA__.ordering_keys k JOIN __SCHEMA__.deliveries d ON d.id = k.blocked_by
                 WHERE k.endpoint_id = $1 AND k.blocked_by IS NOT NULL AND d.status = 'failed'
                 ORDER BY k.blocked_at LIMIT $2"
            )),
            &[&id, &limit],
        )
        .await?;
    let n = COLUMNS.split(',').count();
    Ok(Json(BlockedKeys {
        data: rows
            .iter()
            .map(|r| BlockedKey {
                head: from_row(r),
                ordering_key: r.get(n),
                blocked_at: r.get(n + 1),
                queued: r.get(n + 2),
            })
            .collect(),
    }))
}

/// Give up on a delivery that is waiting or failed: it becomes `cancelled`, and its ordering key
/// (if any) moves on to the next delivery.
#[utoipa::path(post, path = "/deliveries/{id}/cancel", tag = "deliveries",
    responses((status = 200, body = Delivery), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn cancel_delivery(
    State(app): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Delivery>), ApiError> {
    let uuid = parse_id(&id)?;
    let mut client = app.pool.get().await?;
    let status: DeliveryStatus = client
        .query_opt(
            &app.schema
                .sql("SELECT status FROM __SCHEMA__.deliveries WHERE id = $1"),
            &[&uuid],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no delivery {id}")))?
        .get(0);
    match status {
        DeliveryStatus::Delivered => {
            return Err(ApiError::conflict(
                "already_delivered",
                "the delivery was delivered",
            ))
        }
        DeliveryStatus::Delivering => {
            return Err(ApiError::conflict("in_flight", "an attempt is in flight"))
        }
        DeliveryStatus::Cancelled => {
            return Err(ApiError::conflict(
                "already_cancelled",
                "the delivery was cancelled",
            ))
        }
        _ => {}
    }
    if !state::cancel(&mut client, &app.schema, &app.ordering, uuid).await? {
        return Err(ApiError::conflict(
            "changed",
            "the delivery changed meanwhile; look again",
        ));
    }
    let delivery = reload(&client, &app, uuid).await?;
    tracing::info!(delivery.id = %id, "delivery cancelled through the API");
    Ok((StatusCode::OK, Json(delivery)))
}
