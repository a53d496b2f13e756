//! The hop to the app: what is never forwarded, and sending a verified request. Invariant: a
//! request with a body goes out whole, head and body in one write, so the app never waits on a
//! head without its body.

use bytes::{Buf, Bytes};
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::{http_req_header_to_wire, HttpSession as Http1Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, OrErr};
use tokio::io::AsyncWriteExt;

/// Headers that describe one hop, not the message: never forwarded either way.
pub(super) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Sends the request and reads the response head. Over HTTP/1 a request with a body goes out as
/// one vectored write of head and body: pingora's session flushes the head by itself first, which
/// costs a second send and makes the app wake for a head without its body.
pub(super) async fn send_request(
    up: HttpSession,
    request: Box<RequestHeader>,
    body: &Bytes,
    peer: &HttpPeer,
) -> pingora::Result<HttpSession> {
    let mut up = match up {
        // A response to HEAD has no body whatever its headers say; only pingora's own writer
        // records the method that tells its reader so.
        HttpSession::H1(h1) if !body.is_empty() && request.method != http::Method::HEAD => {
            let head = http_req_header_to_wire(&request).ok_or_else(|| {
                Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "the request line holds a forbidden byte",
                )
            })?;
            let mut stream = h1.into_inner();
            let mut wire = head.freeze().chain(body.clone());
            stream
                .write_all_buf(&mut wire)
                .await
                .or_err(ErrorType::WriteError, "writing the request")?;
            stream
                .flush()
                .await
                .or_err(ErrorType::WriteError, "flushing the request")?;
            HttpSession::H1(Http1Session::new_with_options(stream, peer))
        }
        mut up => {
            up.write_request_header(request).await?;
            up.write_request_body(body.clone(), true).await?;
            up.finish_request_body().await?;
            up
        }
    };
    // Informational answers (100, 102, 103) come before the real one and are not relayed: the
    // sender's head is already answered. Switching protocols is not something a webhook does.
    loop {
        up.read_response_header().await?;
        match up.response_header().map(|h| h.status.as_u16()) {
            Some(101) => {
                return Error::e_explain(
                    ErrorType::InvalidHTTPHeader,
                    "the app answered 101 Switching Protocols",
                )
            }
            Some(100..=199) => continue,
            _ => return Ok(up),
        }
    }
}
