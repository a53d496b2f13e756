//! The inbox: messages per route with their forward attempts, replay (one or a window), stats.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::paging::{decode_cursor, encode_cursor, next_page, page_limit};
use super::ApiState;
use crate::inbox::InboxStatus;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_messages))
        .routes(routes!(get_message))
        .routes(routes!(replay_message))
        .routes(routes!(replay_window))
        .routes(routes!(inbox_stats))
}

#[derive(Serialize, ToSchema)]
struct InboxMessage {
    id: i64,
    route: String,
    provider: String,
    /// The provider's delivery or event id (or `sha256:` of the body).
    dedupe_key: String,
    method: String,
    /// The path the app receives (`upstream_path` applied).
    path: String,
    /// pending | delivering | taken | done | failed
    status: String,
    /// Forward attempts (or takes, for `consume = "sql"`).
    attempts: i32,
    received_at: DateTime<Utc>,
    handled_at: Option<DateTime<Utc>>,
    /// When the next forward attempt is due (pending messages only).
    next_attempt_at: Option<DateTime<Utc>>,
    last_status_code: Option<i32>,
    last_error: Option<String>,
    body_bytes: i32,
}

const COLUMNS: &str =
    "id, route, provider, dedupe_key, method, path, status, attempts, received_at,
    handled_at, next_attempt_at, last_status_code, last_error, octet_length(body)";

fn from_row(r: &tokio_postgres::Row) -> InboxMessage {
    let status: String = r.get(6);
    InboxMessage {
        id: r.get(0),
        route: r.get(1),
        provider: r.get(2),
        dedupe_key: r.get(3),
        method: r.get(4),
        path: r.get(5),
        next_attempt_at: if status == "pending" { r.get(10) } else { None },
        status,
        attempts: r.get(7),
        received_at: r.get(8),
        handled_at: r.get(9),
        last_status_code: r.get(11),
        last_error: r.get(12),
        body_bytes: r.get(13),
    }
}

#[derive(Serialize, ToSchema)]
struct MessageList {
    messages: Vec<InboxMessage>,
    next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ListMessages {
    route: Option<String>,
    status: Option<String>,
    provider: Option<String>,
    /// Received at or after (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Received before (RFC 3339).
    until: Option<DateTime<Utc>>,
    limit: Option<i64>,
    cursor: Option<String>,
}

fn check_status(status: Option<&str>) -> Result<(), ApiError> {
    match status {
        Some(s) if InboxStatus::parse(s).is_none() => {
            let all: Vec<&str> = InboxStatus::ALL.iter().map(|s| s.as_str()).collect();
            Err(ApiError::bad_request(format!(
                "status: must be one of {}",
                all.join(", ")
            )))
        }
        _ => Ok(()),
    }
}

/// Inbox messages, newest first (by id: the order they were stored).
#[utoipa::path(get, path = "/inbox", tag = "inbox", params(ListMessages),
    responses((status = 200, body = MessageList), (status = 400, body = ErrorBody)))]
async fn list_messages(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ListMessages>,
) -> Result<Json<MessageList>, ApiError> {
    let limit = page_limit(q.limit)?;
    check_status(q.status.as_deref())?;
    let before = match q.cursor.as_deref().map(decode_cursor).transpose()? {
        Some((at, id)) => Some((
            at,
            id.parse::<i64>()
                .map_err(|_| ApiError::bad_request("cursor: not a cursor this API returned"))?,
        )),
        None => None,
    };
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &state.schema.sql(&format!(
                "SELECT {COLUMNS} FROM __SCHEMA__.inbox
                 WHERE ($1::text IS NULL OR route = $1)
                   AND ($2::text IS NULL OR status = $2)
                   AND ($3::text IS NULL OR provider = $3)
                   AND ($4::timestamptz IS NULL OR received_at >= $4)
                   AND ($5::timestamptz IS NULL OR received_at < $5)
                   AND ($6::bigint IS NULL OR id < $6)
                 ORDER BY id DESC LIMIT $7"
            )),
            &[
                &q.route,
                &q.status,
                &q.provider,
                &q.since,
                &q.until,
                &before.map(|b| b.1),
                &(limit + 1),
            ],
        )
        .await?;
    let mut messages: Vec<InboxMessage> = rows.iter().map(from_row).collect();
    let next_cursor = next_page(&mut messages, limit, |m| {
        encode_cursor(m.received_at, &m.id.to_string())
    });
    Ok(Json(MessageList {
        messages,
        next_cursor,
    }))
}

#[derive(Serialize, ToSchema)]
struct Header {
    name: String,
    /// The value as text (invalid UTF-8 shown as U+FFFD).
    value: String,
}

#[derive(Serialize, ToSchema)]
struct ForwardAttempt {
    attempt: i32,
    started_at: DateTime<Utc>,
    duration_ms: i32,
    status_code: Option<i32>,
    /// The first 4 KiB of the app's answer as text (invalid UTF-8 shown as U+FFFD).
    response_body: Option<String>,
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct MessageDetail {
    #[serde(flatten)]
    message: InboxMessage,
    query: Option<String>,
    /// What the app receives, the verified mark included.
    headers: Vec<Header>,
    /// The body as text, when it is UTF-8.
    body: Option<String>,
    /// The exact body bytes, base64-encoded, when they are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    attempt_log: Vec<ForwardAttempt>,
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no inbox message {id}")))
}

/// One message: what the app receives, and every forward attempt.
#[utoipa::path(get, path = "/inbox/{id}", tag = "inbox",
    responses((status = 200, body = MessageDetail), (status = 404, body = ErrorBody)))]
async fn get_message(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MessageDetail>, ApiError> {
    let n = parse_id(&id)?;
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &state.schema.sql(&format!(
                "SELECT {COLUMNS}, query, header_names, header_values, body
                 FROM __SCHEMA__.inbox WHERE id = $1"
            )),
            &[&n],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no inbox message {id}")))?;
    let names: Vec<String> = row.get(15);
    let values: Vec<Vec<u8>> = row.get(16);
    let body: Vec<u8> = row.get(17);
    let attempts = client
        .query(
            &state.schema.sql(
                "SELECT attempt, started_at, duration_ms, status_code, response_excerpt, error
                 FROM __SCHEMA__.inbox_attempts WHERE inbox_id = $1 ORDER BY attempt",
            ),
            &[&n],
        )
        .await?
        .iter()
        .map(|r| ForwardAttempt {
            attempt: r.get(0),
            started_at: r.get(1),
            duration_ms: r.get(2),
            status_code: r.get(3),
            response_body: r
                .get::<_, Option<Vec<u8>>>(4)
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            error: r.get(5),
        })
        .collect();
    let (text, base64) = match String::from_utf8(body) {
        Ok(text) => (Some(text), None),
        Err(e) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(e.as_bytes())),
        ),
    };
    Ok(Json(MessageDetail {
        message: from_row(&row),
        query: row.get(14),
        headers: names
            .into_iter()
            .zip(values)
            .map(|(name, v)| Header {
                name,
                value: String::from_utf8_lossy(&v).into_owned(),
            })
            .collect(),
        body: text,
        body_base64: base64,
        attempt_log: attempts,
    }))
}

/// Back to `pending`, due now, with a fresh retry budget: Postern forwards it again (forward
/// routes) or `inbox_take` returns it again (sql routes).
const REPLAY: &str = "UPDATE __SCHEMA__.inbox
    SET status = 'pending', next_attempt_at = now(), replayed_after = attempts, taken_until = NULL,
        handled_at = NULL, updated_at = now(), lease_lapses = 0";

/// Hand one message to the app again (a `done` or `failed` one, a `pending` one now, or one a
/// consumer took and abandoned).
#[utoipa::path(post, path = "/inbox/{id}/replay", tag = "inbox",
    responses((status = 202, body = InboxMessage), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn replay_message(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<InboxMessage>), ApiError> {
    let n = parse_id(&id)?;
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &state.schema.sql(&format!(
                "WITH r AS ({REPLAY} WHERE id = $1 AND (status IN ('pending', 'done', 'failed')
                    OR (status = 'taken' AND taken_until <= now())) RETURNING id)
                 SELECT (SELECT count(*) FROM r), status FROM __SCHEMA__.inbox WHERE id = $1"
            )),
            &[&n],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no inbox message {id}")))?;
    if row.get::<_, i64>(0) == 0 {
        let status: String = row.get(1);
        return Err(match status.as_str() {
            "delivering" => ApiError::conflict("in_flight", "a forward attempt is in flight"),
            "taken" => ApiError::conflict(
                "taken",
                "a consumer took the message and has not finished it",
            ),
            _ => ApiError::conflict("changed", "the message changed meanwhile; look again"),
        });
    }
    let row = client
        .query_one(
            &state.schema.sql(&format!(
                "SELECT {COLUMNS} FROM __SCHEMA__.inbox WHERE id = $1"
            )),
            &[&n],
        )
        .await?;
    tracing::info!(inbox.id = n, "inbox message replayed through the API");
    Ok((StatusCode::ACCEPTED, Json(from_row(&row))))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ReplayWindow {
    route: String,
    /// Messages received at or after this (RFC 3339).
    since: DateTime<Utc>,
    /// ...and before this (default: now).
    until: Option<DateTime<Utc>>,
    /// `failed` (default) or `done`, or both as "all".
    status: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct Requeued {
    requeued: u64,
}

/// Hand a route's messages received in a window to the app again.
#[utoipa::path(post, path = "/inbox/replay", tag = "inbox", request_body = ReplayWindow,
    responses((status = 202, body = Requeued), (status = 422, body = ErrorBody)))]
async fn replay_window(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<ReplayWindow>,
) -> Result<(StatusCode, Json<Requeued>), ApiError> {
    if body.until.is_some_and(|u| u <= body.since) {
        return Err(ApiError::invalid(
            "invalid_window",
            "until must be after since",
        ));
    }
    let statuses: &[&str] = match body.status.as_deref() {
        None | Some("failed") => &["failed"],
        Some("done") => &["done"],
        Some("all") => &["failed", "done"],
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_status",
                "status: must be failed, done or all",
            ))
        }
    };
    let client = state.pool.get().await?;
    let requeued = client
        .execute(
            &state.schema.sql(&format!(
                "{REPLAY} WHERE route = $1 AND status = ANY($2) AND received_at >= $3
                   AND ($4::timestamptz IS NULL OR received_at < $4)"
            )),
            &[&body.route, &statuses, &body.since, &body.until],
        )
        .await?;
    tracing::info!(route = %body.route, requeued, "inbox messages replayed through the API");
    Ok((StatusCode::ACCEPTED, Json(Requeued { requeued })))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    /// Count messages received since (RFC 3339); default 24 hours ago.
    since: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
struct RouteStats {
    route: String,
    /// Messages received in the window.
    received: i64,
    /// Now, whenever received: not yet handled (pending, delivering or taken), and failed.
    pending: i64,
    failed: i64,
    /// Received in the window and handled.
    done: i64,
    /// Seconds since the oldest message not yet handled arrived (0 when none).
    oldest_pending_s: f64,
}

#[derive(Serialize, ToSchema)]
struct InboxStats {
    routes: Vec<RouteStats>,
}

/// Per route: received and handled in a window, and what waits now.
#[utoipa::path(get, path = "/inbox/stats", tag = "inbox", params(StatsQuery),
    responses((status = 200, body = InboxStats)))]
async fn inbox_stats(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<StatsQuery>,
) -> Result<Json<InboxStats>, ApiError> {
    let since = q
        .since
        .unwrap_or_else(|| Utc::now() - chrono::Duration::hours(24));
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &state.schema.sql(
                "SELECT route,
                        count(*) FILTER (WHERE received_at >= $1),
                        count(*) FILTER (WHERE status IN ('pending', 'delivering', 'taken')),
                        count(*) FILTER (WHERE status = 'failed'),
                        count(*) FILTER (WHERE status = 'done' AND received_at >= $1),
                        COALESCE(extract(epoch FROM now() - min(received_at)
                            FILTER (WHERE status IN ('pending', 'delivering', 'taken'))), 0)::float8
                 FROM __SCHEMA__.inbox
                 WHERE received_at >= $1 OR status IN ('pending', 'delivering', 'taken', 'failed')
                 GROUP BY route ORDER BY route",
            ),
            &[&since],
        )
        .await?;
    Ok(Json(InboxStats {
        routes: rows
            .iter()
            .map(|r| RouteStats {
                route: r.get(0),
                received: r.get(1),
                pending: r.get(2),
                failed: r.get(3),
                done: r.get(4),
                oldest_pending_s: r.get(5),
            })
            .collect(),
    }))
}
