//! The dashboard: four files embedded in the binary, served at `/` by the API listener. The page
//! holds no data; it reads the REST API with the operator's token. Invariant: every answer carries
//! a Content-Security-Policy that allows only these files (no inline script or style, no other
//! origin), and is never framed.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const APP: &str = include_str!("../../assets/dashboard/app.js");
const STYLE: &str = include_str!("../../assets/dashboard/style.css");
const ICON: &str = include_str!("../../assets/dashboard/icon.svg");

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `/` and its two assets; no token needed (they hold nothing), unlike everything under `/api`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/assets/app.js",
            axum::routing::get(|| async { asset(APP, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/assets/style.css",
            axum::routing::get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        // Browsers ask for an icon on their own; without one they would meet the token layer.
        .route(
            "/assets/icon.svg",
            axum::routing::get(|| async { asset(ICON, "image/svg+xml") }),
        )
        .route(
            "/favicon.ico",
            axum::routing::get(|| async { asset(ICON, "image/svg+xml") }),
        )
}
