//! What the dashboard reads beyond the resources themselves: deliveries per interval by outcome,
//! an event and every delivery of it, recently seen event types, and inbound decisions per route.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::deliveries::{from_row, Delivery, COLUMNS};
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use super::ApiState;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(timeseries))
        .routes(routes!(get_event))
        .routes(routes!(event_types))
        .routes(routes!(inbound_stats))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct SeriesQuery {
    /// Start (RFC 3339); default 24 hours ago, at most 31 days ago.
    since: Option<DateTime<Utc>>,
    /// Bucket width in seconds, 60 to 86400; default 3600.
    bucket: Option<i64>,
    /// One endpoint's attempts only.
    endpoint_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct Bucket {
    start: DateTime<Utc>,
    /// Attempts answered 2xx.
    delivered: i64,
    /// Failed attempts after which another was due.
    retried: i64,
    /// Failed attempts that were a delivery's last (dead-lettered).
    failed: i64,
}

#[derive(Serialize, ToSchema)]
struct Series {
    bucket_seconds: i64,
    /// Every bucket from `since` to now, empty ones included.
    buckets: Vec<Bucket>,
}

/// Delivery attempts per interval by outcome, for all endpoints or one.
#[utoipa::path(get, path = "/stats/timeseries", tag = "stats", params(SeriesQuery),
    responses((status = 200, body = Series), (status = 400, body = ErrorBody)))]
async fn timeseries(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<SeriesQuery>,
) -> Result<Json<Series>, ApiError> {
    let bucket = q.bucket.unwrap_or(3600);
    if !(60..=86_400).contains(&bucket) {
        return Err(ApiError::bad_request("bucket: must be 60 to 86400 seconds"));
    }
    let now = Utc::now();
    let since = q.since.unwrap_or(now - chrono::Duration::hours(24));
    if since < now - chrono::Duration::days(31) || since > now {
        return Err(ApiError::bad_request(
            "since: must be within the last 31 days",
        ));
    }
    if (now - since).num_seconds() / bucket > 2000 {
        return Err(ApiError::bad_request(
            "bucket: too small for the window (at most 2000 buckets)",
        ));
    }
    // Three reads on three connections at once (the window's rows are a table scan each, so two
    // cores share them): the attempts by outcome in each half of the window (joined to the
    // deliveries only for one endpoint), and the dead letters (the failed deliveries settled in
    // the window, through the retention index, each with its last attempt).
    let attempts_sql = state.schema.sql(
        "SELECT floor(date_part('epoch', a.started_at - $1::timestamptz) / $2::float8)::bigint,
                count(*) FILTER (WHERE a.status_code BETWEEN 200 AND 299),
                count(*) FILTER (WHERE a.status_code IS NULL OR a.status_code NOT BETWEEN 200 AND 299)
         FROM __SCHEMA__.attempts a
         WHERE a.started_at >= $4 AND a.started_at < $5
           AND ($3::text IS NULL OR a.delivery_id IN (
                SELECT id FROM __SCHEMA__.deliveries WHERE endpoint_id = $3 AND updated_at >= $4))
         GROUP BY 1",
    );
    let failed_sql = state.schema.sql(
        "SELECT floor(date_part('epoch', a.started_at - $1::timestamptz) / $2::float8)::bigint,
                count(*)
         FROM __SCHEMA__.deliveries d
         JOIN __SCHEMA__.attempts a ON a.delivery_id = d.id AND a.attempt = d.attempts
         WHERE d.status = 'failed' AND d.updated_at >= $1 AND a.started_at >= $1
           AND ($3::text IS NULL OR d.endpoint_id = $3)
           AND (a.status_code IS NULL OR a.status_code NOT BETWEEN 200 AND 299)
         GROUP BY 1",
    );
    let width = bucket as f64;
    let mid = since + (now - since) / 2;
    let end = now + chrono::Duration::days(1);
    // Three statements side by side on as many connections as are free at once (the first is
    // waited for; waiting for all three, two such requests could take a small pool between
    // them and each wait for the other). Without spare ones they queue on the first.
    let c1 = state.pool.get().await?;
    let spare = || async {
        // The pool's own create and recycle bounds, without the wait.
        let mut now = state.pool.timeouts();
        now.wait = Some(std::time::Duration::ZERO);
        state.pool.timeout_get(&now).await.ok()
    };
    let (c2, c3) = (spare().await, spare().await);
    let first: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&since, &width, &q.endpoint_id, &since, &mid];
    let second: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&since, &width, &q.endpoint_id, &mid, &end];
    let third: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&since, &width, &q.endpoint_id];
    let (early, late, failed) = tokio::try_join!(
        c1.query(&attempts_sql, &first),
        c2.as_ref().unwrap_or(&c1).query(&attempts_sql, &second),
        c3.as_ref().unwrap_or(&c1).query(&failed_sql, &third),
    )?;
    let outcomes = early.into_iter().chain(late);
    let count = ((now - since).num_seconds() / bucket + 1) as usize;
    let mut buckets: Vec<Bucket> = (0..count)
        .map(|i| Bucket {
            start: since + chrono::Duration::seconds(i as i64 * bucket),
            delivered: 0,
            retried: 0,
            failed: 0,
        })
        .collect();
    let slot = |n: i64| usize::try_from(n).ok().filter(|&n| n < count);
    for r in outcomes {
        if let Some(i) = slot(r.get(0)) {
            buckets[i].delivered += r.get::<_, i64>(1);
            buckets[i].retried += r.get::<_, i64>(2);
        }
    }
    // A dead letter's last attempt is counted failed, not retried.
    for r in failed {
        if let Some(i) = slot(r.get(0)) {
            let n: i64 = r.get(1);
            buckets[i].failed = n;
            buckets[i].retried = (buckets[i].retried - n).max(0);
        }
    }
    Ok(Json(Series {
        bucket_seconds: bucket,
        buckets,
    }))
}

#[derive(Serialize, ToSchema)]
struct Event {
    /// The event id (receivers see it as `webhook-id`).
    id: uuid::Uuid,
    #[serde(rename = "type")]
    event_type: String,
    tenant: Option<String>,
    ordering_key: Option<String>,
    /// As Postgres keeps it, unparsed: the app may store JSON (numbers beyond a double, deep
    /// nesting) that a parser here would refuse.
    #[schema(value_type = Object)]
    payload: Box<serde_json::value::RawValue>,
    created_at: DateTime<Utc>,
    dispatched_at: Option<DateTime<Utc>>,
    deliveries: Vec<Delivery>,
}

/// An event by its id (the `webhook-id` a receiver logged), with every delivery of it.
#[utoipa::path(get, path = "/events/{id}", tag = "events",
    responses((status = 200, body = Event), (status = 404, body = ErrorBody)))]
async fn get_event(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Event>, ApiError> {
    let not_found = || ApiError::not_found(format!("no event {id}"));
    let uuid: uuid::Uuid = id.trim().parse().map_err(|_| not_found())?;
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &state.schema.sql(
                "SELECT id, event_type, tenant, ordering_key, payload::text, created_at, dispatched_at
                 FROM __SCHEMA__.outbox WHERE event_id = $1",
            ),
            &[&uuid],
        )
        .await?
        .ok_or_else(not_found)?;
    let outbox_id: i64 = row.get(0);
    let deliveries = client
        .query(
            &state.schema.sql(&format!(
                "SELECT {COLUMNS} FROM __SCHEMA__.deliveries WHERE outbox_id = $1
                 ORDER BY endpoint_id LIMIT 1000"
            )),
            &[&outbox_id],
        )
        .await?
        .iter()
        .map(from_row)
        .collect();
    Ok(Json(Event {
        id: uuid,
        event_type: row.get(1),
        tenant: row.get(2),
        ordering_key: row.get(3),
        // jsonb's text is JSON; the check only scans it (no number is converted, nesting is
        // followed without recursion).
        payload: serde_json::value::RawValue::from_string(row.get(4))
            .map_err(|e| anyhow::anyhow!("event {uuid}: its payload is not JSON: {e}"))?,
        // As the event's deliveries carry it (an app may write any value the column holds).
        created_at: crate::delivery::state::event_time(row.try_get(5).ok()),
        dispatched_at: row.get(6),
        deliveries,
    }))
}

#[derive(Serialize, ToSchema)]
struct EventTypes {
    /// Types of the most recent 10,000 events, most frequent first (at most 200).
    event_types: Vec<String>,
}

/// Event types seen recently, for the endpoint form's picker.
#[utoipa::path(get, path = "/event-types", tag = "events",
    responses((status = 200, body = EventTypes)))]
async fn event_types(State(state): State<ApiState>) -> Result<Json<EventTypes>, ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &state.schema.sql(
                "SELECT event_type FROM (SELECT event_type FROM __SCHEMA__.outbox
                                          ORDER BY id DESC LIMIT 10000) recent
                 GROUP BY event_type ORDER BY count(*) DESC, event_type LIMIT 200",
            ),
            &[],
        )
        .await?;
    Ok(Json(EventTypes {
        event_types: rows.iter().map(|r| r.get(0)).collect(),
    }))
}

#[derive(Serialize, ToSchema)]
struct RouteDecisions {
    /// The route's path ("-": requests that matched no route).
    route: String,
    /// forwarded | refused | upstream_error | stored | duplicate | unstored: counts.
    #[schema(value_type = Object)]
    outcomes: std::collections::BTreeMap<&'static str, u64>,
    /// Refusals and failures by error code (signature_mismatch, ...): counts.
    #[schema(value_type = Object)]
    reasons: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Serialize, ToSchema)]
struct InboundStats {
    /// Counts cover the last 24 hours of this replica's proxy (each replica proxies its own pod).
    window_hours: u32,
    routes: Vec<RouteDecisions>,
}

/// Inbound decisions per route over the last 24 hours, on this replica.
#[utoipa::path(get, path = "/inbound/stats", tag = "inbound",
    responses((status = 200, body = InboundStats)))]
async fn inbound_stats(State(state): State<ApiState>) -> Json<InboundStats> {
    let routes = state
        .metrics
        .inbound_tally
        .routes()
        .into_iter()
        .map(|(route, tally)| {
            let (outcomes, reasons) = tally.last_day();
            RouteDecisions {
                route,
                outcomes,
                reasons,
            }
        })
        .collect();
    Json(InboundStats {
        window_hours: 24,
        routes,
    })
}
