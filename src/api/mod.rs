//! The management REST API (`/api/v1`, bearer tokens) and the admin listener (probes, metrics).
//! Invariant: every `/api/*` route is behind a constant-time token check when tokens are set; every
//! error is `{"error": "<code>", "message": "..."}`, the same shape the inbound proxy uses; the
//! OpenAPI document is generated from the handlers, so it cannot drift from them.

pub mod admin;
mod dashboard;
mod deliveries;
mod endpoint_checks;
mod endpoints;
mod error;
mod events;
mod inbox;
mod ordering;
mod paging;
pub mod server;
mod views;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::crypto::SecretBox;
use crate::db::Schema;
use crate::delivery::ssrf::Guard;
pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    pub pool: Pool,
    pub schema: Schema,
    pub vault: SecretBox,
    pub guard: Arc<Guard>,
    pub ordering: Arc<crate::delivery::state::ordering::Ordering>,
    pub metrics: Arc<crate::telemetry::Metrics>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Postern management API", description = "Endpoints, deliveries, retries, replays, stats and the inbox."),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The `/api/v1` routes and the OpenAPI document they generate.
pub fn routes() -> (axum::Router<ApiState>, utoipa::openapi::OpenApi) {
    let v1 = OpenApiRouter::new()
        .merge(endpoints::routes())
        .merge(deliveries::routes())
        .merge(events::routes())
        .merge(ordering::routes())
        .merge(inbox::routes())
        .merge(views::routes());
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", v1)
        .split_for_parts()
}

/// Why a request to the token-less API comes from elsewhere than this machine: a `Host` that
/// is not a loopback name, or an `Origin` (a browser's) that is not one.
fn foreign_caller(headers: &http::HeaderMap) -> Option<&'static str> {
    let loopback_host = |authority: &str| {
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_loopback())
    };
    let header = |name| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    match header(http::header::HOST) {
        Some(host) if !loopback_host(host) => {
            return Some("the API has no token: only a loopback Host is accepted")
        }
        _ => {}
    }
    match header(http::header::ORIGIN) {
        Some(origin) => {
            let authority = origin.split_once("://").map_or("", |(_, a)| a);
            (!loopback_host(authority))
                .then_some("the API has no token: a request from a foreign page is refused")
        }
        None => None,
    }
}

/// Accepts the request when no tokens are configured (loopback only, enforced by the config) or
/// when `Authorization: Bearer <token>` matches one of them in constant time.
async fn require_token(
    State(tokens): State<Arc<Vec<Vec<u8>>>>,
    request: Request,
    next: Next,
) -> Response {
    if tokens.is_empty() {
        // Without a token only this machine's own callers may call: a web page the operator
        // visits could otherwise send simple requests (no preflight) to the loopback API, or
        // reach it by DNS rebinding (a foreign Host).
        return match foreign_caller(request.headers()) {
            Some(why) => {
                ApiError::new(http::StatusCode::FORBIDDEN, "forbidden", why).into_response()
            }
            None => next.run(request).await,
        };
    }
    let presented = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::as_bytes);
    let Some(presented) = presented else {
        return ApiError::unauthorized("missing bearer token").into_response();
    };
    let mut ok = false;
    for t in tokens.iter() {
        ok |= crate::signing::constant_time_eq(t, presented);
    }
    if ok {
        next.run(request).await
    } else {
        ApiError::unauthorized("invalid bearer token").into_response()
    }
}

/// The largest request body the API reads: 2 MiB, or an event of `outbound.max_payload` with
/// room for the rest of `POST /events`'s body when that is larger.
pub fn body_limit(max_payload: u64) -> usize {
    usize::try_from(max_payload)
        .unwrap_or(usize::MAX)
        .saturating_add(64 << 10)
        .max(2 << 20)
}

/// The complete API router: routes, the OpenAPI document, the token layer, JSON 404s.
/// `body_limit`: see [`body_limit`].
pub fn router(state: ApiState, tokens: Vec<String>, body_limit: usize) -> axum::Router {
    let (routes, openapi) = routes();
    let routes = routes.layer(axum::extract::DefaultBodyLimit::max(body_limit));
    let openapi = Arc::new(openapi);
    let token_required = !tokens.is_empty();
    let tokens = Arc::new(
        tokens
            .into_iter()
            .map(String::into_bytes)
            .collect::<Vec<_>>(),
    );
    routes
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let doc = openapi.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(tokens, require_token))
        .merge(
            // Outside the token layer: whether a token is needed at all (the dashboard asks, so
            // a page without a token never draws a 401), and the dashboard's pages. Their own
            // 405 is set here: a method fallback reaches only routes registered before it.
            axum::Router::new()
                .route(
                    "/api/v1/auth",
                    axum::routing::get(move || async move {
                        axum::Json(serde_json::json!({"token_required": token_required}))
                    }),
                )
                .merge(dashboard::routes())
                .method_not_allowed_fallback(method_not_allowed),
        )
        .with_state(state)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "the route does not take this method",
    )
}

/// Serves the API until `shutdown`, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
) {
    server::serve(listener, app, async move { shutdown.cancelled().await }).await;
}
