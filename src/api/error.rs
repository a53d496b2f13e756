//! The API's error shape and the extractors that produce it for malformed input.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `{"error": "<code>", "message": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable, machine-readable code.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_string(),
            message: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Database and other internal failures: logged with their detail, answered without it. A
/// database error inside an operation's context (a PATCH, a replay) is answered as the same error
/// alone would be: the caller's value (400), a busy or lost database (503).
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        for cause in e.chain() {
            if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
                if let Some(known) = of_postgres(pg) {
                    // Logged whole: inside an operation, a value Postgres refused may also be
                    // one Postern built, and the answer alone would hide that.
                    tracing::warn!(error = %format!("{e:#}"), status = known.status.as_u16(),
                        "a management API request's database error");
                    return known;
                }
            }
            if let Some(pool) = cause.downcast_ref::<deadpool_postgres::PoolError>() {
                return of_pool(pool);
            }
        }
        tracing::error!(error = %format!("{e:#}"), "management API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see Postern's log",
        )
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        of_postgres(&e).unwrap_or_else(|| anyhow::Error::from(e).into())
    }
}

/// The answer a database error calls for when it is not Postern's fault; `None` for the rest.
fn of_postgres(e: &tokio_postgres::Error) -> Option<ApiError> {
    // A data exception (class 22) is the caller's value, not our fault: the extractors refuse
    // NUL up front, and this catches whatever else Postgres cannot store.
    // A CHECK the value broke (the outbox's payload limit, say) is the caller's too: the
    // constraint's name says which.
    if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) {
        let detail = e.as_db_error().map(|d| d.message().to_string());
        return Some(ApiError::invalid(
            "invalid_body",
            detail.unwrap_or_else(|| "a value breaks a constraint".into()),
        ));
    }
    // A statement that ran out of time, or a row another session holds: the database is
    // busy, not the caller wrong and not a bug.
    if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
        || e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
    {
        return Some(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is busy (a statement timed out or a row is held); try again",
        ));
    }
    // The connection ended (a restart, a failover, a terminated backend), the server is
    // short of something, or a transaction lost a conflict: try again, as for an
    // unreachable database.
    let retryable = e.code().is_some_and(|c| {
        let c = c.code();
        ["08", "53", "57P", "40001", "40P01"]
            .iter()
            .any(|p| c.starts_with(p))
    });
    if retryable || e.is_closed() {
        tracing::warn!(error = %e, "a management API request lost its database connection");
        return Some(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database connection was lost; try again",
        ));
    }
    if e.code().is_some_and(|c| c.code().starts_with("22")) {
        let detail = e.as_db_error().map(|d| d.message().to_string());
        return Some(ApiError::bad_request(format!(
            "a value cannot be stored: {}",
            detail.unwrap_or_else(|| "invalid input".into())
        )));
    }
    None
}

/// How long a request body may take to arrive, as the inbound proxy's `read_timeout`.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Postgres text cannot hold NUL. Refused where it enters, with the place named, rather than
/// met as a database error later.
fn nul_refused(place: &str) -> ApiError {
    ApiError::bad_request(format!("{place} must not contain NUL (\\u0000 or %00)"))
}

/// Whether JSON text escapes a NUL (`\u0000` not itself escaped): the only way a NUL can be in a
/// JSON string, since a raw one is a syntax error.
fn json_escapes_nul(body: &[u8]) -> bool {
    body.windows(6).enumerate().any(|(i, w)| {
        w.eq_ignore_ascii_case(b"\\u0000")
            && body[..i].iter().rev().take_while(|b| **b == b'\\').count() % 2 == 0
    })
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        of_pool(&e)
    }
}

fn of_pool(e: &deadpool_postgres::PoolError) -> ApiError {
    tracing::error!(error = %e, "no database connection for a management API request");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
        "the database is unreachable; try again",
    )
}

/// A JSON body: syntax errors are 400 `bad_request`; a body of the wrong shape (unknown field,
/// wrong type, missing field) is 422 `invalid_body`.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !declares_json(req.headers()) {
            return Err(not_json());
        }
        let ApiBody(bytes) = ApiBody::from_request(req, state).await?;
        parse_json(&bytes).map(Self)
    }
}

/// A JSON body that may be left out: no bytes (or only whitespace) is `None`; anything else
/// follows [`ApiJson`]'s rules (the content type, NUL, 400 for syntax, 422 for shape).
pub struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = declares_json(req.headers());
        let ApiBody(bytes) = ApiBody::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        if !json {
            return Err(not_json());
        }
        parse_json(&bytes).map(|v| Self(Some(v)))
    }
}

fn declares_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

fn not_json() -> ApiError {
    ApiError::bad_request("expected Content-Type: application/json")
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if json_escapes_nul(bytes) {
        return Err(nul_refused("a JSON string"));
    }
    match axum::Json::<T>::from_bytes(bytes) {
        Ok(axum::Json(v)) => Ok(v),
        Err(JsonRejection::JsonDataError(e)) => {
            Err(ApiError::invalid("invalid_body", e.body_text()))
        }
        Err(JsonRejection::MissingJsonContentType(_)) => Err(not_json()),
        Err(e) => Err(ApiError::bad_request(e.body_text())),
    }
}

/// A whole request body, in our error shape: 408 `request_timeout` when it does not arrive in
/// time, 413 `body_too_large` past the limit, 400 otherwise.
pub struct ApiBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = tokio::time::timeout(BODY_TIMEOUT, axum::body::Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body did not arrive in time",
                )
            })?
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        e.body_text(),
                    )
                } else {
                    ApiError::bad_request(e.body_text())
                }
            })?;
        Ok(Self(bytes))
    }
}

/// Query parameters with errors in our shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if has_encoded_nul(parts.uri.query().unwrap_or("")) {
            return Err(nul_refused("a query parameter"));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request(e.body_text()))
    }
}

/// Path parameters with errors in our shape.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if has_encoded_nul(parts.uri.path()) {
            return Err(nul_refused("a path segment"));
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| ApiError::bad_request(e.body_text()))
    }
}

/// A percent-encoded NUL in a path or query.
fn has_encoded_nul(s: &str) -> bool {
    s.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_found_where_it_can_hide() {
        assert!(json_escapes_nul(br#"{"a":"x\u0000y"}"#));
        assert!(
            json_escapes_nul(br#"{"a":"\\\u0000"}"#),
            "an escaped backslash, then NUL"
        );
        assert!(
            !json_escapes_nul(br#"{"a":"\\u0000"}"#),
            "a backslash and the text u0000"
        );
        assert!(!json_escapes_nul(br#"{"a":"\u0001"}"#));
        assert!(has_encoded_nul("/endpoints/a%00b"));
        assert!(!has_encoded_nul("/endpoints/a%20b"));
    }
}
