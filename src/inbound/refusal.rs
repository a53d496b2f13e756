//! Postern's answers to requests it refuses: `{"error": "<code>", "message": "..."}` with the
//! documented status. Invariant: a refusal never echoes raw request bytes, and writing one cannot
//! hang on a sender that does not read.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession as Session;
use pingora::{Error, ErrorType};

use super::providers::VerifyError;

/// A request Postern answers itself.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl Refusal {
    pub(super) fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The buffered-body budget is spent: the sender should come back shortly.
    pub(super) fn overloaded() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                503,
                "overloaded",
                "too many request bodies are being buffered (inbound.max_buffered); retry shortly",
            )
        }
    }

    pub(super) fn from_verify(e: VerifyError) -> Self {
        let code = match e {
            VerifyError::MissingHeader => "missing_header",
            VerifyError::MalformedHeader => "malformed_header",
            VerifyError::TimestampOutOfTolerance => "timestamp_out_of_tolerance",
            VerifyError::SignatureMismatch => "signature_mismatch",
        };
        Self::new(401, code, e.to_string())
    }
}

pub(super) fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        413,
        "body_too_large",
        format!("the body exceeds inbound.max_body ({limit} bytes)"),
    )
}

pub(super) fn timeout_refusal() -> Refusal {
    Refusal::new(
        504,
        "upstream_timeout",
        "the app did not answer within inbound.upstream_timeout",
    )
}

pub(super) fn upstream_failure(e: &Error) -> Refusal {
    match e.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout => {
            timeout_refusal()
        }
        _ => Refusal::new(
            502,
            "upstream_unavailable",
            format!("the app is unreachable: {}", e.etype().as_str()),
        ),
    }
}

/// How long writing an answer to a sender may take: one that does not read cannot hold a task.
pub(super) const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) async fn respond(
    session: &mut Session,
    refusal: &Refusal,
    close: bool,
) -> pingora::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, respond_now(session, refusal, close)).await {
        Ok(sent) => sent,
        Err(_) => Error::e_explain(ErrorType::WriteTimedout, "writing a refusal timed out"),
    }
}

async fn respond_now(session: &mut Session, refusal: &Refusal, close: bool) -> pingora::Result<()> {
    let body = serde_json::json!({"error": refusal.code, "message": refusal.message}).to_string();
    let mut header = ResponseHeader::build(refusal.status, Some(3))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(seconds) = refusal.retry_after {
        header.insert_header(http::header::RETRY_AFTER, seconds.to_string())?;
    }
    if close {
        // The body may be unread: this connection cannot carry another request.
        header.insert_header(http::header::CONNECTION, "close")?;
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(header)).await?;
    session.write_response_body(Bytes::from(body), true).await
}
