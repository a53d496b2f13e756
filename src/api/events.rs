//! `POST /events` (publish without SQL) and `POST /endpoints/{id}/test`: both go through the outbox,
//! so they take the normal pipeline, signatures and retries included.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::ApiState;
use crate::outbox::glob::is_valid_event_type;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(publish))
        .routes(routes!(test_event))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishEvent {
    /// Dot-separated segments, e.g. `order.created`.
    #[serde(rename = "type")]
    event_type: String,
    /// The payload receivers get as `data`.
    #[schema(value_type = Object)]
    data: serde_json::Value,
    tenant: Option<String>,
    ordering_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct Published {
    /// The event id (receivers see it as `webhook-id`).
    id: uuid::Uuid,
}

async fn insert(
    state: &ApiState,
    event_type: &str,
    data: &serde_json::Value,
    tenant: Option<&str>,
    ordering_key: Option<&str>,
    target: Option<&str>,
) -> Result<uuid::Uuid, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_one(
            &state.schema.sql(
                "INSERT INTO __SCHEMA__.outbox (event_type, payload, tenant, ordering_key, target_endpoint)
                 VALUES ($1, $2, $3, $4, $5) RETURNING event_id",
            ),
            &[&event_type, data, &tenant, &ordering_key, &target],
        )
        .await?;
    Ok(row.get(0))
}

/// Publish an event, for apps that cannot write SQL (the outbox insert in the app's own
/// transaction remains the way to tie an event to a business change).
#[utoipa::path(post, path = "/events", tag = "events", request_body = PublishEvent,
    responses((status = 202, body = Published), (status = 422, body = ErrorBody)))]
async fn publish(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<PublishEvent>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    if !is_valid_event_type(&body.event_type) {
        return Err(ApiError::invalid(
            "invalid_event_type",
            "type: dot-separated segments of A-Z a-z 0-9 _ - (at most 255 characters)",
        ));
    }
    let id = insert(
        &state,
        &body.event_type,
        &body.data,
        body.tenant.as_deref(),
        body.ordering_key.as_deref(),
        None,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(Published { id })))
}

/// Send a `postern.test` event to this endpoint only, through the normal pipeline.
#[utoipa::path(post, path = "/endpoints/{id}/test", tag = "events",
    responses((status = 202, body = Published), (status = 404, body = ErrorBody)))]
async fn test_event(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let client = state.pool.get().await?;
    let exists = client
        .query_opt(
            &state
                .schema
                .sql("SELECT 1 FROM __SCHEMA__.endpoints WHERE id = $1 AND deleted_at IS NULL"),
            &[&id],
        )
        .await?
        .is_some();
    drop(client);
    if !exists {
        return Err(ApiError::not_found(format!("no endpoint {id}")));
    }
    let data = serde_json::json!({"endpoint_id": id, "message": "a test event from Postern"});
    let event = insert(&state, "postern.test", &data, None, None, Some(&id)).await?;
    Ok((StatusCode::ACCEPTED, Json(Published { id: event })))
}
