//! Inbox routes in the proxy: a verified request becomes a [`Message`] holding exactly what the
//! app would have received, is committed, and only then answered. Invariant: the provider hears
//! 2xx only for a request whose row (or its earlier delivery's row) is committed; anything else
//! is a `503` it retries. A refused request never gets here, so it is never stored.

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession as Session;

use super::providers::Incoming;
use super::proxy::VERIFIED_HEADER;
use super::refusal::{Refusal, WRITE_TIMEOUT};
use super::upstream::HOP_BY_HOP;
use super::{dedupe, InboxRoute, Route, INBOX_WAIT};
use crate::inbox::writer::{InboxWriter, StoreError};
use crate::inbox::{Accepted, Message};

/// What the app would have received, as a row: the same method, path (`upstream_path` applied),
/// query and headers as the forward path sends (hop-by-hop, `expect`, `content-length` and any
/// sender's `x-postern-*` left out), plus the verified mark.
pub(super) fn message(
    req: &RequestHeader,
    route: &Route,
    inbox: &InboxRoute,
    body: &Bytes,
) -> Message {
    let mut header_names = Vec::with_capacity(req.headers.len() + 1);
    let mut header_values = Vec::with_capacity(req.headers.len() + 1);
    for (name, value) in &req.headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || n == "expect"
            || n == "content-length"
            || n.starts_with("x-postern-")
            // GitLab's "signature" is the shared secret itself: never stored, never shown.
            || (n == "x-gitlab-token" && route.provider == "gitlab")
        {
            continue;
        }
        header_names.push(n.to_string());
        header_values.push(value.as_bytes().to_vec());
    }
    header_names.push(VERIFIED_HEADER.to_string());
    header_values.push(route.provider.as_bytes().to_vec());
    let incoming = Incoming {
        headers: &req.headers,
        body,
        query: req.uri.query(),
        now: 0,
    };
    Message {
        route: route.name.clone(),
        provider: route.provider.clone(),
        dedupe_key: dedupe::key(&inbox.dedupe, &incoming),
        method: req.method.as_str().to_string(),
        path: route
            .upstream_path
            .clone()
            .unwrap_or_else(|| req.uri.path().to_string()),
        query: req.uri.query().map(str::to_string),
        header_names,
        header_values,
        body: body.clone(),
        consume: match inbox.consume {
            super::Consume::Forward => "forward",
            super::Consume::Sql => "sql",
        },
    }
}

/// Commits the message; a failure is the `503` the provider retries on.
pub(super) async fn store(
    writer: Option<&InboxWriter>,
    message: Message,
) -> Result<Accepted, Refusal> {
    let Some(writer) = writer else {
        return Err(unavailable("the inbox is not running".into()));
    };
    writer.store(message, INBOX_WAIT).await.map_err(|e| {
        let refusal = unavailable(e.to_string());
        match e {
            StoreError::Busy => Refusal {
                retry_after: Some(1),
                ..refusal
            },
            _ => refusal,
        }
    })
}

fn unavailable(message: String) -> Refusal {
    Refusal {
        retry_after: Some(5),
        ..Refusal::new(503, "inbox_unavailable", message)
    }
}

/// The provider's answer for a stored request: the route's `respond_with`, or
/// `{"received": true, "id": N, "duplicate": false}`.
pub(super) async fn acknowledge(
    session: &mut Session,
    inbox: &InboxRoute,
    accepted: Accepted,
) -> pingora::Result<u16> {
    let (status, content_type, configured) = &inbox.respond;
    let body = if inbox.respond_configured {
        configured.clone()
    } else {
        Bytes::from(
            serde_json::json!({"received": true, "id": accepted.id, "duplicate": accepted.duplicate})
                .to_string(),
        )
    };
    let mut header = ResponseHeader::build(*status, Some(3))?;
    header.insert_header(http::header::CONTENT_TYPE, content_type.as_str())?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    let write = async {
        session.write_response_header(Box::new(header)).await?;
        session.write_response_body(body, true).await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(sent) => sent.map(|()| *status),
        Err(_) => pingora::Error::e_explain(
            pingora::ErrorType::WriteTimedout,
            "writing the inbox acknowledgement timed out",
        ),
    }
}
