//! Deliveries: lists, one delivery with its attempts, retry, replay, stats.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::paging::{decode_cursor, encode_cursor, next_page, page_limit};
use super::ApiState;
use crate::delivery::state::{self, DeliveryStatus, FOR_ITS_ENDPOINT};

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_deliveries))
        .routes(routes!(get_delivery))
        .routes(routes!(retry_delivery))
        .routes(routes!(replay))
        .routes(routes!(stats))
}

#[derive(Serialize, ToSchema)]
pub(super) struct Delivery {
    id: uuid::Uuid,
    event_id: uuid::Uuid,
    event_type: String,
    endpoint_id: String,
    /// pending | delivering | delivered | failed | paused | cancelled | queued (behind an
    /// earlier delivery of its ordering key)
    status: String,
    /// The event's ordering key, if it has one.
    ordering_key: Option<String>,
    /// How many attempts were made.
    attempts: i32,
    /// When the next attempt is due (pending deliveries only).
    next_attempt_at: Option<DateTime<Utc>>,
    last_status_code: Option<i32>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
}

pub(super) const COLUMNS: &str =
    "id, event_id, event_type, endpoint_id, status, attempts, next_attempt_at, last_status_code,
                       last_error, created_at, delivered_at, ordering_key";

pub(super) fn from_row(r: &tokio_postgres::Row) -> Delivery {
    let status: String = r.get(4);
    Delivery {
        id: r.get(0),
        event_id: r.get(1),
        event_type: r.get(2),
        endpoint_id: r.get(3),
        ordering_key: r.get(11),
        next_attempt_at: if status == "pending" { r.get(6) } else { None },
        status,
        attempts: r.get(5),
        last_status_code: r.get(7),
        last_error: r.get(8),
        created_at: r.get(9),
        delivered_at: r.get(10),
    }
}

#[derive(Serialize, ToSchema)]
struct Attempt {
    attempt: i32,
    started_at: DateTime<Utc>,
    duration_ms: i32,
    status_code: Option<i32>,
    /// The first 4 KiB of the response body as text (invalid UTF-8 shown as U+FFFD).
    response_body: Option<String>,
    /// The same bytes exactly as received, base64-encoded, when they are not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    response_body_base64: Option<String>,
    error: Option<String>,
    /// The headers the request carried (signature headers as sent, custom header values
    /// `<redacted>`); empty for attempts recorded before this was kept.
    request_headers: Vec<RequestHeader>,
}

#[derive(Serialize, ToSchema)]
struct RequestHeader {
    name: String,
    value: String,
}

#[derive(Serialize, ToSchema)]
struct DeliveryWithAttempts {
    #[serde(flatten)]
    delivery: Delivery,
    attempt_log: Vec<Attempt>,
}

#[derive(Serialize, ToSchema)]
struct DeliveryList {
    deliveries: Vec<Delivery>,
    next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ListDeliveries {
    status: Option<String>,
    event_type: Option<String>,
    /// Created at or after (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Created before (RFC 3339).
    until: Option<DateTime<Utc>>,
    limit: Option<i64>,
    cursor: Option<String>,
}

pub(super) async fn endpoint_exists(
    state: &ApiState,
    id: &str,
    include_deleted: bool,
) -> Result<bool, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &state
                .schema
                .sql("SELECT deleted_at IS NULL FROM __SCHEMA__.endpoints WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(row.is_some_and(|r| include_deleted || r.get::<_, bool>(0)))
}

/// An endpoint's deliveries, newest first (a deleted endpoint's too: they stay listed).
#[utoipa::path(get, path = "/endpoints/{id}/deliveries", tag = "deliveries", params(ListDeliveries),
    responses((status = 200, body = DeliveryList), (status = 404, body = ErrorBody)))]
async fn list_deliveries(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListDeliveries>,
) -> Result<Json<DeliveryList>, ApiError> {
    let limit = page_limit(q.limit)?;
    if let Some(s) = &q.status {
        if s.parse::<DeliveryStatus>().is_err() {
            let all: Vec<&str> = DeliveryStatus::ALL.iter().map(|s| s.as_str()).collect();
            return Err(ApiError::bad_request(format!(
                "status: must be one of {}",
                all.join(", ")
            )));
        }
    }
    if !endpoint_exists(&state, &id, true).await? {
        return Err(ApiError::not_found(format!("no endpoint {id}")));
    }
    let before = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let (before_at, before_id) = match &before {
        Some((at, cursor_id)) => {
            let uuid: uuid::Uuid = cursor_id
                .parse()
                .map_err(|_| ApiError::bad_request("cursor: not a cursor this API returned"))?;
            (Some(*at), Some(uuid))
        }
        None => (None, None),
    };
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &state.schema.sql(&format!(
                "SELECT {COLUMNS} FROM __SCHEMA__.deliveries
                 WHERE endpoint_id = $1
                   AND ($2::text IS NULL OR status = $2)
                   AND ($3::text IS NULL OR event_type = $3)
                   AND ($4::timestamptz IS NULL OR created_at >= $4)
                   AND ($5::timestamptz IS NULL OR created_at < $5)
                   AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7::uuid))
                 ORDER BY created_at DESC, id DESC LIMIT $8"
            )),
            &[
                &id,
                &q.status,
                &q.event_type,
                &q.since,
                &q.until,
                &before_at,
                &before_id,
                &(limit + 1),
            ],
        )
        .await?;
    let mut deliveries: Vec<Delivery> = rows.iter().map(from_row).collect();
    let next_cursor = next_page(&mut deliveries, limit, |d| {
        encode_cursor(d.created_at, &d.id.to_string())
    });
    Ok(Json(DeliveryList {
        deliveries,
        next_cursor,
    }))
}

/// A delivery as it is now, after a change the caller made.
pub(super) async fn reload(
    client: &deadpool_postgres::Client,
    app: &ApiState,
    id: uuid::Uuid,
) -> Result<Delivery, ApiError> {
    let row = client
        .query_one(
            &app.schema.sql(&format!(
                "SELECT {COLUMNS} FROM __SCHEMA__.deliveries WHERE id = $1"
            )),
            &[&id],
        )
        .await?;
    Ok(from_row(&row))
}

pub(super) fn parse_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no delivery {id}")))
}

/// One delivery with every attempt.
#[utoipa::path(get, path = "/deliveries/{id}", tag = "deliveries",
    responses((status = 200, body = DeliveryWithAttempts), (status = 404, body = ErrorBody)))]
async fn get_delivery(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeliveryWithAttempts>, ApiError> {
    let uuid = parse_id(&id)?;
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &state.schema.sql(&format!(
                "SELECT {COLUMNS} FROM __SCHEMA__.deliveries WHERE id = $1"
            )),
            &[&uuid],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no delivery {id}")))?;
    let attempts = client
        .query(
            &state.schema.sql(
                "SELECT attempt, started_at, duration_ms, status_code,
                        COALESCE(response_excerpt, convert_to(response_body, 'UTF8')), error,
                        request_headers
                 FROM __SCHEMA__.attempts WHERE delivery_id = $1 ORDER BY attempt",
            ),
            &[&uuid],
        )
        .await?
        .iter()
        .map(|r| {
            let excerpt: Option<Vec<u8>> = r.get(4);
            let base64 = excerpt
                .as_deref()
                .filter(|b| std::str::from_utf8(b).is_err())
                .map(|b| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b));
            Attempt {
                attempt: r.get(0),
                started_at: r.get(1),
                duration_ms: r.get(2),
                status_code: r.get(3),
                response_body: excerpt.map(|b| String::from_utf8_lossy(&b).into_owned()),
                response_body_base64: base64,
                error: r.get(5),
                request_headers: r
                    .get::<_, Option<String>>(6)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.split_once(": "))
                    .map(|(name, value)| RequestHeader {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Json(DeliveryWithAttempts {
        delivery: from_row(&row),
        attempt_log: attempts,
    }))
}

/// Make a `failed` or `cancelled` (or waiting `pending`) delivery due now: one more attempt.
#[utoipa::path(post, path = "/deliveries/{id}/retry", tag = "deliveries",
    responses((status = 202, body = Delivery), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn retry_delivery(
    State(app): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Delivery>), ApiError> {
    let uuid = parse_id(&id)?;
    let mut client = app.pool.get().await?;
    let row = client
        .query_opt(
            &app.schema.sql(&format!(
                "SELECT d.status, e.deleted_at IS NOT NULL, {FOR_ITS_ENDPOINT}
                 FROM __SCHEMA__.deliveries d JOIN __SCHEMA__.endpoints e ON e.id = d.endpoint_id
                 JOIN __SCHEMA__.outbox o ON o.id = d.outbox_id WHERE d.id = $1"
            )),
            &[&uuid],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no delivery {id}")))?;
    let (status, deleted, for_it): (DeliveryStatus, bool, bool) =
        (row.get(0), row.get(1), row.get(2));
    if deleted {
        return Err(ApiError::conflict(
            "endpoint_deleted",
            "the delivery's endpoint was deleted",
        ));
    }
    if !for_it {
        return Err(ApiError::conflict(
            "not_for_tenant",
            "the endpoint's tenant changed and this event is not for it",
        ));
    }
    match status {
        DeliveryStatus::Failed | DeliveryStatus::Cancelled | DeliveryStatus::Pending => {}
        DeliveryStatus::Delivered => {
            return Err(ApiError::conflict(
                "already_delivered",
                "the delivery was delivered",
            ))
        }
        DeliveryStatus::Delivering => {
            return Err(ApiError::conflict("in_flight", "an attempt is in flight"))
        }
        DeliveryStatus::Paused => {
            return Err(ApiError::conflict(
                "endpoint_inactive",
                "the endpoint is inactive; activate it to resume",
            ))
        }
        DeliveryStatus::Queued => {
            return Err(ApiError::conflict(
                "queued",
                "the delivery waits for an earlier delivery of its ordering key",
            ))
        }
    }
    if !state::retry_now(&mut client, &app.schema, &app.ordering, uuid, status).await? {
        return Err(ApiError::conflict(
            "changed",
            "the delivery changed meanwhile; look again",
        ));
    }
    let delivery = reload(&client, &app, uuid).await?;
    tracing::info!(delivery.id = %id, "delivery retried through the API");
    Ok((StatusCode::ACCEPTED, Json(delivery)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Replay {
    /// Deliveries created at or after this (RFC 3339).
    since: DateTime<Utc>,
    /// ...and before this (default: now).
    until: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
struct Requeued {
    requeued: u64,
}

/// Every `failed` delivery of the endpoint created in the window becomes due again.
#[utoipa::path(post, path = "/endpoints/{id}/replay", tag = "deliveries", request_body = Replay,
    responses((status = 202, body = Requeued), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn replay(
    State(app): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<Replay>,
) -> Result<(StatusCode, Json<Requeued>), ApiError> {
    if body.until.is_some_and(|u| u <= body.since) {
        return Err(ApiError::invalid(
            "invalid_window",
            "until must be after since",
        ));
    }
    if !endpoint_exists(&app, &id, false).await? {
        return Err(ApiError::not_found(format!("no endpoint {id}")));
    }
    let mut client = app.pool.get().await?;
    let requeued = state::replay_failed(
        &mut client,
        &app.schema,
        &app.ordering,
        &id,
        body.since,
        body.until,
    )
    .await?;
    tracing::info!(endpoint.id = %id, requeued, "failed deliveries replayed");
    Ok((StatusCode::ACCEPTED, Json(Requeued { requeued })))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    /// Start of the window (RFC 3339); default 24 hours ago.
    since: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
struct Latency {
    mean: f64,
    p50: f64,
    p95: f64,
}

#[derive(Serialize, ToSchema)]
struct Stats {
    /// Deliveries created in the window.
    total: i64,
    delivered: i64,
    failed: i64,
    /// Not finished yet: pending, delivering or paused.
    pending: i64,
    /// delivered / total, in percent (0 when total is 0).
    success_rate: f64,
    /// Over the attempts started in the window; nearest-rank percentiles.
    latency_ms: Latency,
    /// Now, whatever the window: deliveries due and not yet claimed (the backlog), capped at
    /// 100,000, and how long the oldest of them has been due, in seconds (0 when none).
    due: i64,
    oldest_due_s: f64,
}

/// Counts, success rate and attempt latency over a window.
#[utoipa::path(get, path = "/endpoints/{id}/stats", tag = "deliveries", params(StatsQuery),
    responses((status = 200, body = Stats), (status = 404, body = ErrorBody)))]
async fn stats(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<StatsQuery>,
) -> Result<Json<Stats>, ApiError> {
    if !endpoint_exists(&state, &id, true).await? {
        return Err(ApiError::not_found(format!("no endpoint {id}")));
    }
    let since = q
        .since
        .unwrap_or_else(|| Utc::now() - chrono::Duration::hours(24));
    // The counts and the latency percentiles on two connections at once.
    let counts_sql = state.schema.sql(
        "SELECT count(*),
                count(*) FILTER (WHERE status = 'delivered'),
                count(*) FILTER (WHERE status = 'failed'),
                count(*) FILTER (WHERE status IN ('pending', 'delivering', 'paused'))
         FROM __SCHEMA__.deliveries WHERE endpoint_id = $1 AND created_at >= $2",
    );
    // The backlog through the claim's own index: one range of it, capped.
    let due_sql = state.schema.sql(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM __SCHEMA__.deliveries
                  WHERE endpoint_id = $1 AND status = 'pending' AND next_attempt_at <= now()
                  LIMIT 100000) x),
                COALESCE((SELECT date_part('epoch', now() - min(next_attempt_at))
                  FROM __SCHEMA__.deliveries
                  WHERE endpoint_id = $1 AND status = 'pending' AND next_attempt_at <= now()), 0)",
    );
    let latency_sql = state.schema.sql(
        "SELECT COALESCE(avg(a.duration_ms), 0)::float8,
                COALESCE(percentile_disc(0.5) WITHIN GROUP (ORDER BY a.duration_ms), 0),
                COALESCE(percentile_disc(0.95) WITHIN GROUP (ORDER BY a.duration_ms), 0)
         FROM __SCHEMA__.attempts a
         WHERE a.started_at >= $2 AND a.delivery_id IN (
               SELECT id FROM __SCHEMA__.deliveries WHERE endpoint_id = $1 AND updated_at >= $2)",
    );
    let (c1, c2) = tokio::try_join!(state.pool.get(), state.pool.get())?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &since];
    let due_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    // The backlog probe is pipelined behind the counts on the same connection.
    let (counts, latency, due) = tokio::try_join!(
        c1.query_one(&counts_sql, &params),
        c2.query_one(&latency_sql, &params),
        c1.query_one(&due_sql, &due_params),
    )?;
    let (total, delivered): (i64, i64) = (counts.get(0), counts.get(1));
    Ok(Json(Stats {
        total,
        delivered,
        failed: counts.get(2),
        pending: counts.get(3),
        success_rate: if total > 0 {
            delivered as f64 * 100.0 / total as f64
        } else {
            0.0
        },
        latency_ms: Latency {
            mean: latency.get(0),
            p50: f64::from(latency.get::<_, i32>(1)),
            p95: f64::from(latency.get::<_, i32>(2)),
        },
        due: due.get(0),
        oldest_due_s: due.get(1),
    }))
}
