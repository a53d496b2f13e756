//! The admin listener: `/healthz`, `/readyz`, `/metrics`, on a runtime of its own so it keeps
//! answering when the delivery pipeline is saturated. Invariant: it reads only in-memory state
//! (atomics and the metrics registry); it never waits on the database or the data path.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

pub use crate::telemetry::Health;

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let health = s.health.clone();
    let verdict = tokio::task::spawn_blocking(move || health.readiness())
        .await
        .unwrap_or_else(|e| Err(format!("readiness check failed: {e}")));
    match verdict {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unready", "reason": reason})),
        ),
    }
}

async fn serve_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Binds now (so a bad address fails startup) and serves on a thread and runtime of its own
/// until `stop` is cancelled.
pub fn spawn(
    listen: &str,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| anyhow::anyhow!("admin.listen: cannot bind {listen}: {e}"))?;
    listener.set_nonblocking(true)?;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(serve_metrics))
        .with_state(AdminState { health, metrics });
    let thread = std::thread::Builder::new()
        .name("postern-admin".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime failed to start");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener failed");
                        return;
                    }
                };
                super::server::serve(listener, app, async move { stop.cancelled().await }).await;
            });
        })?;
    Ok(thread)
}
