//! `/endpoints`: create, list, read, change, delete, rotate the secret, send a test event.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::endpoint_checks::{
    check_breaker, check_events, check_headers, check_retry, check_tenant, check_url,
};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody, OptionalJson};
use super::paging::{decode_cursor, encode_cursor, next_page, page_limit};
use super::ApiState;
use crate::config::{
    BreakerConfig, Dur, OnFailure, OrderingConfig, RateLimit, RetryConfig, SignatureScheme,
    REDACTED,
};

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_endpoint, list_endpoints))
        .routes(routes!(get_endpoint, patch_endpoint, delete_endpoint))
        .routes(routes!(rotate_secret))
}

/// An endpoint as the API shows it. `secret` appears only in the create and rotate responses;
/// header values are never shown (they often carry credentials).
#[derive(Serialize, ToSchema)]
pub struct Endpoint {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub tenant: Option<String>,
    pub description: Option<String>,
    /// Header names, each value shown as `<redacted>`.
    pub headers: BTreeMap<String, String>,
    /// The endpoint's own retry policy, when it has one.
    #[schema(value_type = Option<Object>)]
    pub retry: Option<serde_json::Value>,
    pub active: bool,
    pub disabled_reason: Option<String>,
    /// `standard` or `legacy`.
    pub signature: String,
    /// `config` or `api`.
    pub source: String,
    /// `{"on_failure": "skip" | "block"}`: what a failed delivery does to the deliveries of its
    /// ordering key behind it; `null`: the configured default (`outbound.ordering`).
    #[schema(value_type = Option<Object>)]
    pub ordering: Option<OrderingConfig>,
    /// `"50/s"`, `"300/m"`, `"1000/h"`; `null`: the configured default (`outbound.rate_limit`).
    #[schema(value_type = Option<String>)]
    pub rate_limit: Option<RateLimit>,
    /// The endpoint's own breaker settings (unset keys: `[outbound.breaker]`'s).
    #[schema(value_type = Option<Object>)]
    pub breaker: Option<BreakerConfig>,
    pub circuit: Circuit,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// An endpoint's circuit as the breaker last left it.
#[derive(Serialize, ToSchema)]
pub struct Circuit {
    /// `closed` or `open`.
    pub state: &'static str,
    pub consecutive_failures: i32,
    pub opened_at: Option<DateTime<Utc>>,
    /// While open: when the next probe may go.
    pub next_probe_at: Option<DateTime<Utc>>,
    /// A `Retry-After` the receiver asked for, holding every delivery until then.
    pub paused_until: Option<DateTime<Utc>>,
}

/// Columns of `endpoints` and, joined as `f`, its flow row.
const COLUMNS: &str =
    "id, url, events, tenant, description, headers, retry, active, disabled_reason, signature, source, created_at, updated_at, ordering_on_failure,
     rate_limit, breaker,
     (SELECT f.opened_at FROM __SCHEMA__.endpoint_flow f WHERE f.endpoint_id = endpoints.id),
     COALESCE((SELECT f.consecutive_failures FROM __SCHEMA__.endpoint_flow f WHERE f.endpoint_id = endpoints.id), 0),
     (SELECT f.probe_at FROM __SCHEMA__.endpoint_flow f WHERE f.endpoint_id = endpoints.id),
     (SELECT f.paused_until FROM __SCHEMA__.endpoint_flow f WHERE f.endpoint_id = endpoints.id AND f.paused_until > now())";

fn from_row(r: &tokio_postgres::Row) -> Endpoint {
    let headers: serde_json::Value = r.get(5);
    Endpoint {
        id: r.get(0),
        url: r.get(1),
        events: r.get(2),
        tenant: r.get(3),
        description: r.get(4),
        headers: headers
            .as_object()
            .map(|m| {
                m.keys()
                    .map(|k| (k.clone(), REDACTED.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        retry: r.get(6),
        active: r.get(7),
        disabled_reason: r.get(8),
        signature: r.get(9),
        source: r.get(10),
        created_at: r.get(11),
        updated_at: r.get(12),
        ordering: r
            .get::<_, Option<&str>>(13)
            .and_then(|v| v.parse::<OnFailure>().ok())
            .map(|on_failure| OrderingConfig { on_failure }),
        rate_limit: r.get::<_, Option<&str>>(14).and_then(|v| v.parse().ok()),
        breaker: r
            .get::<_, Option<serde_json::Value>>(15)
            .map(|v| BreakerConfig::from_stored(&v)),
        circuit: {
            let opened_at: Option<DateTime<Utc>> = r.get(16);
            Circuit {
                state: if opened_at.is_some() {
                    "open"
                } else {
                    "closed"
                },
                consecutive_failures: r.get(17),
                opened_at,
                next_probe_at: if opened_at.is_some() { r.get(18) } else { None },
                paused_until: r.get(19),
            }
        },
        secret: None,
    }
}

/// A field that may be absent (leave it), `null` (clear it) or a value (set it).
fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    /// http(s) URL the deliveries are POSTed to; must be allowed by the SSRF policy.
    url: String,
    /// Event types or patterns: `*` is one segment, a trailing `*` one or more.
    events: Vec<String>,
    /// `T`: tenant T's events only; absent: events without a tenant; `*`: all.
    tenant: Option<String>,
    description: Option<String>,
    /// Extra headers sent with every delivery (stored encrypted when a key is set).
    headers: Option<BTreeMap<String, String>>,
    /// `{"schedule": ["5s", "1m"], "jitter": 0.2}` or `{"max_attempts": 6, "initial_delay": "1s", ...}`.
    #[schema(value_type = Option<Object>)]
    retry: Option<RetryConfig>,
    active: Option<bool>,
    #[schema(value_type = Option<String>)]
    signature: Option<SignatureScheme>,
    /// `{"on_failure": "skip" | "block"}`; absent: the configured default.
    #[schema(value_type = Option<Object>)]
    ordering: Option<OrderingConfig>,
    /// `"50/s"`, `"300/m"` or `"1000/h"`; absent: the configured default.
    #[schema(value_type = Option<String>)]
    rate_limit: Option<RateLimit>,
    /// `{"failures": 20, "window": "5m", "failure_rate": 0.7, "min_attempts": 10,
    /// "probe_interval": "30s", "disable_after": "5d"}`, any subset.
    #[schema(value_type = Option<Object>)]
    breaker: Option<BreakerConfig>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchEndpoint {
    url: Option<String>,
    events: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    tenant: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    description: Option<Option<String>>,
    headers: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Object>)]
    retry: Option<Option<RetryConfig>>,
    /// false pauses the endpoint's deliveries; true resumes them.
    active: Option<bool>,
    #[schema(value_type = Option<String>)]
    signature: Option<SignatureScheme>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Object>)]
    ordering: Option<Option<OrderingConfig>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    rate_limit: Option<Option<RateLimit>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Object>)]
    breaker: Option<Option<BreakerConfig>>,
}

async fn load(state: &ApiState, id: &str) -> Result<Endpoint, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &state.schema.sql(&format!(
                "SELECT {COLUMNS} FROM __SCHEMA__.endpoints WHERE id = $1 AND deleted_at IS NULL"
            )),
            &[&id],
        )
        .await?;
    row.as_ref()
        .map(from_row)
        .ok_or_else(|| ApiError::not_found(format!("no endpoint {id}")))
}

/// Create an endpoint; the response carries its generated secret, the only time it is shown.
#[utoipa::path(post, path = "/endpoints", tag = "endpoints", request_body = CreateEndpoint,
    responses((status = 201, body = Endpoint), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_endpoint(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateEndpoint>,
) -> Result<(StatusCode, Json<Endpoint>), ApiError> {
    check_url(&state, &body.url)?;
    check_events(&body.events)?;
    check_tenant(body.tenant.as_deref())?;
    let id = format!("ep_{}", uuid::Uuid::new_v4().simple());
    let headers = check_headers(&state, &id, &body.headers.unwrap_or_default())?;
    let retry = check_retry(body.retry.as_ref())?;
    check_breaker(body.breaker.as_ref())?;
    let secret = crate::signing::generate_secret();
    let signature = body.signature.unwrap_or_default();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            &state.schema.sql(&format!(
                "INSERT INTO __SCHEMA__.endpoints (id, url, events, tenant, description, headers, retry, signature, active, source,
                                                   ordering_on_failure, rate_limit, breaker)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'api', $10, $11, $12) RETURNING {COLUMNS}"
            )),
            &[
                &id,
                &body.url,
                &body.events,
                &body.tenant,
                &body.description,
                &headers,
                &retry,
                &signature.as_str(),
                &body.active.unwrap_or(true),
                &body.ordering.map(|o| o.on_failure.as_str()),
                &body.rate_limit.map(|r| r.to_string()),
                &body.breaker.map(|b| b.to_stored()),
            ],
        )
        .await?;
    crate::endpoints::add_secret(&tx, &state.schema, &state.vault, &id, &secret, None).await?;
    crate::endpoints::ensure_flow_row(&tx, &state.schema, &id).await?;
    tx.commit().await?;
    let mut endpoint = from_row(&row);
    endpoint.secret = Some(secret);
    tracing::info!(endpoint.id = %id, "endpoint created");
    Ok((StatusCode::CREATED, Json(endpoint)))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ListEndpoints {
    tenant: Option<String>,
    active: Option<bool>,
    /// 1 to 250, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct EndpointList {
    endpoints: Vec<Endpoint>,
    next_cursor: Option<String>,
}

/// List endpoints, oldest first, with keyset pagination (stable under concurrent inserts).
#[utoipa::path(get, path = "/endpoints", tag = "endpoints", params(ListEndpoints),
    responses((status = 200, body = EndpointList), (status = 400, body = ErrorBody)))]
async fn list_endpoints(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ListEndpoints>,
) -> Result<Json<EndpointList>, ApiError> {
    let limit = page_limit(q.limit)?;
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let (after_at, after_id) = match &after {
        Some((at, id)) => (Some(*at), Some(id.as_str())),
        None => (None, None),
    };
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &state.schema.sql(&format!(
                "SELECT {COLUMNS} FROM __SCHEMA__.endpoints
                 WHERE deleted_at IS NULL
                   AND ($1::text IS NULL OR tenant = $1)
                   AND ($2::bool IS NULL OR active = $2)
                   AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4::text))
                 ORDER BY created_at, id LIMIT $5"
            )),
            &[&q.tenant, &q.active, &after_at, &after_id, &(limit + 1)],
        )
        .await?;
    let mut endpoints: Vec<Endpoint> = rows.iter().map(from_row).collect();
    let next_cursor = next_page(&mut endpoints, limit, |e| {
        encode_cursor(e.created_at, &e.id)
    });
    Ok(Json(EndpointList {
        endpoints,
        next_cursor,
    }))
}

/// Read one endpoint (never its secret).
#[utoipa::path(get, path = "/endpoints/{id}", tag = "endpoints",
    responses((status = 200, body = Endpoint), (status = 404, body = ErrorBody)))]
async fn get_endpoint(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Endpoint>, ApiError> {
    load(&state, &id).await.map(Json)
}

/// Change an endpoint. Endpoints from the config file accept only `active` (runtime state).
#[utoipa::path(patch, path = "/endpoints/{id}", tag = "endpoints", request_body = PatchEndpoint,
    responses((status = 200, body = Endpoint), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn patch_endpoint(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PatchEndpoint>,
) -> Result<Json<Endpoint>, ApiError> {
    let current = load(&state, &id).await?;
    let changes_fields = body.url.is_some()
        || body.events.is_some()
        || body.tenant.is_some()
        || body.description.is_some()
        || body.headers.is_some()
        || body.retry.is_some()
        || body.signature.is_some()
        || body.ordering.is_some()
        || body.rate_limit.is_some()
        || body.breaker.is_some();
    if current.source == "config" && changes_fields {
        return Err(ApiError::conflict(
            "config_managed",
            format!("endpoint {id} is defined in the config file; only `active` can change here"),
        ));
    }
    if let Some(url) = &body.url {
        check_url(&state, url)?;
    }
    if let Some(events) = &body.events {
        check_events(events)?;
    }
    if let Some(tenant) = &body.tenant {
        check_tenant(tenant.as_deref())?;
    }
    let headers = body
        .headers
        .as_ref()
        .map(|h| check_headers(&state, &id, h))
        .transpose()?;
    let retry = match &body.retry {
        Some(r) => Some(check_retry(r.as_ref())?),
        None => None,
    };
    check_breaker(body.breaker.flatten().as_ref())?;
    if changes_fields {
        // A re-tenant cancels rows a replica may be settling at that moment: should Postgres
        // choose this transaction as a deadlock's victim, it is simply run again.
        for attempt in 1.. {
            match apply_patch(&state, &id, &body, headers.as_ref(), retry.as_ref()).await {
                Ok(()) => break,
                Err(e) if attempt < 3 && is_transient(&e) => {
                    tracing::info!(endpoint.id = %id, error = %format!("{e:#}"), "endpoint change retried");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if let Some(active) = body.active {
        if active != current.active {
            crate::endpoints::set_active(
                &state.pool,
                &state.schema,
                &id,
                active,
                Some("paused through the API"),
            )
            .await?;
        }
    }
    load(&state, &id).await.map(Json)
}

/// Whether a transaction failed only for its timing (a deadlock or a serialization failure), so
/// running it again is right.
fn is_transient(e: &anyhow::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.chain().any(|c| {
        c.downcast_ref::<tokio_postgres::Error>()
            .and_then(|pg| pg.code())
            .is_some_and(|code| {
                *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
            })
    })
}

/// The field changes of a PATCH, in one transaction.
async fn apply_patch(
    state: &ApiState,
    id: &str,
    body: &PatchEndpoint,
    headers: Option<&serde_json::Value>,
    retry: Option<&Option<serde_json::Value>>,
) -> anyhow::Result<()> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // A new tenant voids deliveries of events the endpoint may no longer see: no fan-out pass
    // may straddle the change, and those not yet delivered are cancelled.
    let retenanted = body.tenant.is_some();
    if retenanted {
        crate::endpoints::exclude_fan_out(&tx, &state.schema).await?;
    }
    // An endpoint an older release created has no flow row yet; a limit set now needs one.
    crate::endpoints::ensure_flow_row(&tx, &state.schema, id).await?;
    tx.execute(
        &state.schema.sql(
            "UPDATE __SCHEMA__.endpoints SET
                    url = COALESCE($2, url),
                    events = COALESCE($3, events),
                    tenant = CASE WHEN $4 THEN $5 ELSE tenant END,
                    description = CASE WHEN $6 THEN $7 ELSE description END,
                    headers = COALESCE($8, headers),
                    retry = CASE WHEN $9 THEN $10 ELSE retry END,
                    signature = COALESCE($11, signature),
                    ordering_on_failure = CASE WHEN $12 THEN $13 ELSE ordering_on_failure END,
                    rate_limit = CASE WHEN $14 THEN $15 ELSE rate_limit END,
                    breaker = CASE WHEN $16 THEN $17 ELSE breaker END,
                    updated_at = now()
                 WHERE id = $1 AND deleted_at IS NULL",
        ),
        &[
            &id,
            &body.url,
            &body.events,
            &body.tenant.is_some(),
            &body.tenant.clone().flatten(),
            &body.description.is_some(),
            &body.description.clone().flatten(),
            &headers,
            &retry.is_some(),
            &retry.cloned().flatten(),
            &body.signature.map(|s| s.as_str()),
            &body.ordering.is_some(),
            &body.ordering.flatten().map(|o| o.on_failure.as_str()),
            &body.rate_limit.is_some(),
            &body.rate_limit.flatten().map(|r| r.to_string()),
            &body.breaker.is_some(),
            &body.breaker.flatten().map(|b| b.to_stored()),
        ],
    )
    .await?;
    if retenanted {
        let cancelled = crate::delivery::state::cancel_ineligible(&tx, &state.schema, id).await?;
        crate::endpoints::announce(
            &tx,
            &state.schema,
            &[id.to_string()],
            crate::endpoints::Announce::Revoke,
        )
        .await?;
        if cancelled > 0 {
            tracing::info!(endpoint.id = %id, cancelled, "endpoint re-tenanted; deliveries of events it may no longer see were cancelled");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Delete an endpoint (soft): its unfinished deliveries become `cancelled`, still listed.
#[utoipa::path(delete, path = "/endpoints/{id}", tag = "endpoints",
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_endpoint(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let current = load(&state, &id).await?;
    if current.source == "config" {
        return Err(ApiError::conflict(
            "config_managed",
            format!("endpoint {id} is defined in the config file; remove it there"),
        ));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    crate::endpoints::exclude_fan_out(&tx, &state.schema).await?;
    tx.execute(
        &state
            .schema
            .sql("UPDATE __SCHEMA__.endpoints SET deleted_at = now(), updated_at = now() WHERE id = $1 AND deleted_at IS NULL"),
        &[&id],
    )
    .await?;
    let ids = std::slice::from_ref(&id);
    let cancelled = crate::delivery::state::cancel_unfinished(&tx, &state.schema, ids).await?;
    crate::endpoints::announce(&tx, &state.schema, ids, crate::endpoints::Announce::Stop).await?;
    tx.commit().await?;
    tracing::info!(endpoint.id = %id, cancelled, "endpoint deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RotateSecret {
    /// How long the old secret keeps signing beside the new one (default 24h, at most 30d).
    #[schema(value_type = Option<String>, example = "24h")]
    grace: Option<Dur>,
}

/// A new secret. The old one keeps signing alongside it until the grace ends, so receivers
/// switch without a gap.
#[utoipa::path(post, path = "/endpoints/{id}/rotate-secret", tag = "endpoints", request_body(content = Option<RotateSecret>),
    responses((status = 200, body = Endpoint), (status = 404, body = ErrorBody),
        (status = 409, description = "config_managed, or too_many_secrets: already five signing", body = ErrorBody)))]
async fn rotate_secret(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    OptionalJson(request): OptionalJson<RotateSecret>,
) -> Result<Json<Endpoint>, ApiError> {
    let request = request.unwrap_or(RotateSecret { grace: None });
    let grace = request
        .grace
        .map_or(Duration::from_secs(24 * 3600), |d| d.0);
    if grace > Duration::from_secs(30 * 86_400) {
        return Err(ApiError::invalid("invalid_body", "grace: at most 30d"));
    }
    let current = load(&state, &id).await?;
    if current.source == "config" {
        return Err(ApiError::conflict(
            "config_managed",
            format!("endpoint {id} takes its secret from the config file; change it there"),
        ));
    }
    let secret = crate::signing::generate_secret();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // The endpoint's row first: two rotations of one endpoint count its secrets in turn.
    tx.execute(
        &state
            .schema
            .sql("UPDATE __SCHEMA__.endpoints SET updated_at = now() WHERE id = $1"),
        &[&id],
    )
    .await?;
    if !grace.is_zero() {
        let (signing, first_retired) =
            crate::endpoints::signing_secrets(&tx, &state.schema, &id).await?;
        if signing >= crate::endpoints::MAX_SIGNING_SECRETS {
            let after = first_retired.map_or(String::new(), |at| format!(" after {at} or"));
            return Err(ApiError::conflict(
                "too_many_secrets",
                format!(
                    "endpoint {id} already signs with {signing} secrets (at most {} at once); \
                     rotate again{after} with \"grace\": \"0s\", which retires the others at once",
                    crate::endpoints::MAX_SIGNING_SECRETS
                ),
            ));
        }
    }
    crate::endpoints::add_secret(&tx, &state.schema, &state.vault, &id, &secret, Some(grace))
        .await?;
    tx.commit().await?;
    // Back to the pool before `load` takes one: holding two at once, rotations could take a
    // small pool between them and each wait for the other (the new secret then never shown).
    drop(client);
    tracing::info!(endpoint.id = %id, grace_s = grace.as_secs(), "endpoint secret rotated");
    let mut endpoint = load(&state, &id).await?;
    endpoint.secret = Some(secret);
    Ok(Json(endpoint))
}
