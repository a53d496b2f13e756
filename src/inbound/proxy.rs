//! The pingora service: read the request head, route, screen, read the whole (bounded) body,
//! verify, forward. Postern is pingora's HTTP application itself (not a `ProxyHttp` behind pingora's
//! proxy), so every request is answered in Postern's contract, malformed framing included, which
//! pingora's proxy refused with a bare 400 before any callback ran.
//! Invariant: every request gets a decision that is answered, logged once and counted; the body is
//! read once and forwarded by Postern itself from that buffer through pingora's upstream
//! connector, so any body up to `max_body` reaches the app intact.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession as Session;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use super::body::{linger, read_body, BodyBudget};
use super::decision::{Decision, Outcome, RouteCounters};
use super::inbox;
use super::providers::{self, Incoming};
use super::refusal::{
    respond, timeout_refusal, too_large, upstream_failure, Refusal, WRITE_TIMEOUT,
};
use super::upstream::{send_request, HOP_BY_HOP};
use super::{Inbound, Route};
use crate::telemetry::Metrics;

/// How long a kept-alive connection may wait for its next request's first byte.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

pub const VERIFIED_HEADER: &str = "x-postern-verified";

/// Idle connections to the app kept for reuse (pingora's default is 128): above that many
/// concurrent requests, every extra connection would be opened and closed per request.
const UPSTREAM_IDLE_CONNECTIONS: usize = 256;

pub struct VerifyingProxy {
    inbound: Arc<Inbound>,
    connector: Connector,
    /// Built once: the pool finds idle connections by the peer's hash.
    peer: HttpPeer,
    metrics: Arc<Metrics>,
    counters: HashMap<String, RouteCounters>,
    unrouted: RouteCounters,
}

impl VerifyingProxy {
    pub fn new(inbound: Arc<Inbound>, metrics: Arc<Metrics>) -> Self {
        let mut peer = HttpPeer::new(inbound.upstream, false, String::new());
        peer.options.connection_timeout = Some(
            inbound
                .upstream_timeout
                .min(std::time::Duration::from_secs(5)),
        );
        peer.options.read_timeout = Some(inbound.upstream_timeout);
        peer.options.write_timeout = Some(inbound.upstream_timeout);
        peer.options.idle_timeout = Some(std::time::Duration::from_secs(60));
        let counters = inbound
            .routes
            .keys()
            .map(|path| (path.clone(), RouteCounters::new(&metrics, path)))
            .collect();
        let unrouted = RouteCounters::new(&metrics, "-");
        Self {
            inbound,
            connector: Connector::new(Some(ConnectorOptions::new(UPSTREAM_IDLE_CONNECTIONS))),
            peer,
            metrics,
            counters,
            unrouted,
        }
    }

    /// Everything up to a verified, buffered body (and its share of the buffered-body budget,
    /// held until the request is done); `Err` is the answer to send instead.
    async fn admit<'r>(
        &'r self,
        session: &mut Session,
        decision: &mut Decision<'r>,
    ) -> Result<(&'r Route, Bytes, BodyBudget), Refusal> {
        let req = session.req_header();
        // pingora accepts any coding list that ends in `chunked` and de-chunks it; the app would
        // get, say, gzip bytes without a Content-Encoding. Only plain `chunked` is taken.
        let mut codings = req.headers.get_all(http::header::TRANSFER_ENCODING).iter();
        if let Some(first) = codings.next() {
            let plain = first
                .to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !plain || codings.next().is_some() {
                return Err(Refusal::new(
                    400,
                    "bad_request",
                    "Transfer-Encoding other than chunked",
                ));
            }
        }
        let path = req.uri.path().to_string();
        let route = self.inbound.routes.get(&path).ok_or_else(|| {
            Refusal::new(
                404,
                "route_not_found",
                format!(
                    "no webhook route at {}",
                    path.chars().take(200).collect::<String>()
                ),
            )
        })?;
        decision.route = Some(route);
        let method = req.method.as_str();
        if !route.methods.iter().any(|m| m == method) {
            return Err(Refusal::new(
                405,
                "method_not_allowed",
                format!(
                    "{method} is not accepted here; use {}",
                    route.methods.join(", ")
                ),
            ));
        }
        if !route.allow_ips.is_empty() {
            let peer = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip())
                .unwrap_or(IpAddr::from([0, 0, 0, 0]));
            // Several lines are one list, in order (RFC 9110 5.3): a proxy may add its own line
            // after the sender's instead of extending it. A line that is not text ends the trust.
            let lines: Option<Vec<&str>> = session
                .req_header()
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.to_str().ok())
                .collect();
            // A list that is not text cannot be walked: the sender is unknown, and not allowed.
            let Some(lines) = lines else {
                return Err(Refusal::new(
                    403,
                    "ip_not_allowed",
                    "the X-Forwarded-For list is not readable text",
                ));
            };
            let xff = lines.join(",");
            let client = self
                .inbound
                .client_ip(peer, Some(xff.as_str()).filter(|x| !x.is_empty()));
            if !route.allow_ips.iter().any(|n| n.contains(&client)) {
                return Err(Refusal::new(
                    403,
                    "ip_not_allowed",
                    format!("sender {client} is not allowed on this route"),
                ));
            }
        }
        let req = session.req_header();
        let declared = match req.headers.get(http::header::CONTENT_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| Refusal::new(400, "bad_request", "invalid Content-Length"))?,
            ),
        };
        if declared.is_some_and(|n| n > self.inbound.max_body as u64) {
            return Err(too_large(self.inbound.max_body));
        }
        // A head that fails the route's checks on its own is refused before any body byte is
        // read: a sender with no signature cannot hold the budget while its body trickles in.
        // One clock for both checks: a timestamp the head passed is judged the same way later.
        let now = chrono::Utc::now().timestamp();
        if let Some(e) =
            providers::refuses_head(route.verifier.as_ref(), &req.headers, req.uri.query(), now)
        {
            return Err(Refusal::from_verify(e));
        }
        // Bytes are charged as they arrive, not as declared: a sender that declares 5 MiB and
        // sends nothing holds nothing.
        let mut budget = BodyBudget::new(&self.inbound.buffered, &route.buffered);
        let expects_continue = req
            .headers
            .get(http::header::EXPECT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue {
            // No upstream exists yet, so pingora would not answer this; the sender waits for it.
            session.write_continue_response().await.map_err(|e| {
                Refusal::new(400, "bad_request", format!("cannot answer Expect: {e}"))
            })?;
        }
        let body = tokio::time::timeout(
            self.inbound.read_timeout,
            read_body(session, self.inbound.max_body, &mut budget),
        )
        .await
        .map_err(|_| {
            Refusal::new(
                408,
                "request_timeout",
                "the request body did not arrive within inbound.read_timeout",
            )
        })??;
        let req = session.req_header();
        let incoming = Incoming {
            headers: &req.headers,
            body: &body,
            query: req.uri.query(),
            now,
        };
        route
            .verifier
            .verify(&incoming)
            .map_err(Refusal::from_verify)?;
        Ok((route, body, budget))
    }

    /// Sends the verified request to the app and relays the answer. Returns the status relayed
    /// and whether the answer went out whole (if not, the connection must end without `finish`,
    /// which would close a chunked body as if it were complete).
    async fn forward(
        &self,
        session: &mut Session,
        route: &Route,
        body: Bytes,
        budget: BodyBudget,
    ) -> Result<(u16, bool), Refusal> {
        let peer = &self.peer;
        // A pooled connection the app closed meanwhile fails on first use: retry once on a new one.
        let mut attempt = 0;
        let (mut upstream, mut response) = loop {
            attempt += 1;
            // Built per attempt (the session takes it) rather than cloned ahead for a rare retry.
            let upstream_req = Box::new(self.upstream_request(session, route, body.len())?);
            let (up, reused) = self
                .connector
                .get_http_session(peer)
                .await
                .map_err(|e| upstream_failure(&e))?;
            let exchange = send_request(up, upstream_req, &body, peer);
            match tokio::time::timeout(self.inbound.upstream_timeout, exchange).await {
                Err(_) => return Err(timeout_refusal()),
                Ok(Ok(up)) => {
                    let resp = up.response_header().cloned().ok_or_else(|| {
                        Refusal::new(
                            502,
                            "upstream_unavailable",
                            "the app sent no response header",
                        )
                    })?;
                    break (up, resp);
                }
                Ok(Err(e)) if reused && attempt == 1 => {
                    tracing::debug!(error = %e, "pooled upstream connection failed; retrying on a new one");
                }
                Ok(Err(e)) => return Err(upstream_failure(&e)),
            }
        };
        // The app has the body and answered: it is not sent again, so its share of the budget
        // goes back now, not after the app's answer has been relayed (a slow answer on a forward
        // route must not keep inbox routes' senders out).
        drop((body, budget));
        let status = response.status.as_u16();
        // Apps rarely send hop-by-hop headers: look once rather than remove each by name.
        if response
            .headers
            .keys()
            .any(|k| HOP_BY_HOP.contains(&k.as_str()) && k != http::header::TRANSFER_ENCODING)
        {
            for name in HOP_BY_HOP.iter().filter(|h| **h != "transfer-encoding") {
                response.remove_header(*name);
            }
        }
        // From here on the sender has a status line: failures can only end the connection.
        let relay = async {
            session.write_response_header(Box::new(response)).await?;
            loop {
                let chunk = upstream.read_response_body().await?;
                let done = chunk.is_none() || upstream.response_done();
                session
                    .write_response_body(chunk.unwrap_or_default(), done)
                    .await?;
                if done {
                    break;
                }
            }
            Ok::<_, Box<Error>>(())
        };
        let whole = match tokio::time::timeout(self.inbound.upstream_timeout, relay).await {
            Ok(Ok(())) => {
                self.connector
                    .release_http_session(upstream, peer, peer.options.idle_timeout)
                    .await;
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "relaying the app's response failed");
                false
            }
            Err(_) => {
                tracing::warn!("relaying the app's response timed out");
                false
            }
        };
        if !whole {
            session.set_keepalive(None);
        }
        Ok((status, whole))
    }

    /// The same method, path (or `upstream_path`), query and headers (their case kept), minus
    /// hop-by-hop headers and any `x-postern-*` the sender supplied, plus the verified mark.
    /// Starts from a copy of the sender's head: cheaper than rebuilding it header by header.
    fn upstream_request(
        &self,
        session: &Session,
        route: &Route,
        body_len: usize,
    ) -> Result<RequestHeader, Refusal> {
        let req = session.req_header();
        let bad = |e: Box<Error>| Refusal::new(400, "bad_request", e.to_string());
        let mut up = req.clone();
        // Keep-alive to the app whatever the sender spoke.
        up.set_version(http::Version::HTTP_11);
        if let Some(path) = &route.upstream_path {
            let target = match req.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            up.set_raw_path(target.as_bytes()).map_err(bad)?;
        }
        // Most senders send none of these: find the ones present rather than remove each name.
        let unwanted: Vec<http::HeaderName> = req
            .headers
            .keys()
            .filter(|name| {
                let n = name.as_str();
                HOP_BY_HOP.contains(&n) || n == "expect" || n.starts_with("x-postern-")
            })
            .cloned()
            .collect();
        for name in &unwanted {
            up.remove_header(name);
        }
        // Inserting replaces: a sender's Content-Length (the body may have come chunked) and a
        // forged verified mark cannot survive.
        up.insert_header(http::header::CONTENT_LENGTH, body_len.to_string())
            .map_err(bad)?;
        up.insert_header(VERIFIED_HEADER, route.provider.as_str())
            .map_err(bad)?;
        Ok(up)
    }
}

impl VerifyingProxy {
    /// One request whose head pingora read: admitted and forwarded, or refused; either way
    /// answered, logged and counted.
    async fn handle(&self, session: &mut Session) -> pingora::Result<()> {
        let started = Instant::now();
        let mut decision = Decision {
            route: None,
            outcome: Outcome::Refused,
            error: None,
            status: 0,
        };
        let result = match self.admit(session, &mut decision).await {
            Ok((route, body, budget)) if route.inbox.is_some() => {
                // The inbox queue charges the body from here (see `keep`): the proxy's share
                // goes back before the wait for the commit, not after it.
                drop(budget);
                self.keep(session, route, body, &mut decision).await
            }
            Ok((route, body, budget)) => match self.forward(session, route, body, budget).await {
                Ok((status, whole)) => {
                    decision.outcome = Outcome::Forwarded;
                    decision.status = status;
                    if whole {
                        Ok(())
                    } else {
                        Error::e_explain(ErrorType::WriteError, "the app's answer was cut short")
                    }
                }
                Err(refusal) => {
                    decision.outcome = Outcome::UpstreamError;
                    decision.error = Some(refusal.code);
                    decision.status = refusal.status;
                    respond(session, &refusal, false).await
                }
            },
            Err(refusal) => {
                decision.error = Some(refusal.code);
                decision.status = refusal.status;
                let body_unread = !session.is_body_done();
                let sent = respond(session, &refusal, body_unread).await;
                if body_unread {
                    linger(session).await;
                }
                sent
            }
        };
        self.record(&decision, started);
        result
    }

    /// An inbox route's verified request: stored, then acknowledged (or `503`, to be retried).
    async fn keep(
        &self,
        session: &mut Session,
        route: &Route,
        body: Bytes,
        decision: &mut Decision<'_>,
    ) -> pingora::Result<()> {
        let settings = route.inbox.as_ref().expect("an inbox route");
        let message = inbox::message(session.req_header(), route, settings, &body);
        // The message holds the body now, charged by the queue only until it is committed: this
        // handle must not keep it in memory, uncharged, while the answer is written.
        drop(body);
        // Queued for the committers, the body counts against the queue's own bound (see
        // `writer::InboxWriter`), not this budget: a stalled database must not keep forward
        // routes' senders out.
        match inbox::store(self.inbound.inbox.as_ref(), message).await {
            Ok(accepted) => {
                decision.outcome = if accepted.duplicate {
                    Outcome::Duplicate
                } else {
                    Outcome::Stored
                };
                decision.status = settings.respond.0;
                inbox::acknowledge(session, settings, accepted)
                    .await
                    .map(|_| ())
            }
            Err(refusal) => {
                decision.outcome = Outcome::Unstored;
                decision.error = Some(refusal.code);
                decision.status = refusal.status;
                respond(session, &refusal, false).await
            }
        }
    }

    /// A request refused before it could be routed (malformed framing, CONNECT): answered in the
    /// contract and the connection closed, since what follows on it cannot be trusted.
    async fn refuse_unread(&self, session: &mut Session, refusal: Refusal) {
        let started = Instant::now();
        session.set_keepalive(None);
        let _ = respond(session, &refusal, true).await;
        self.record(
            &Decision {
                route: None,
                outcome: Outcome::Refused,
                error: Some(refusal.code),
                status: refusal.status,
            },
            started,
        );
    }

    /// The decision's log line and counters.
    fn record(&self, decision: &Decision<'_>, started: Instant) {
        let elapsed = started.elapsed();
        decision
            .route
            .and_then(|r| self.counters.get(&r.path))
            .unwrap_or(&self.unrouted)
            .count(decision.outcome, decision.error);
        self.metrics.inbound_duration.observe(elapsed.as_secs_f64());
        tracing::info!(
            route = decision.route.map_or("-", |r| r.path.as_str()),
            provider = decision.route.map_or("-", |r| r.provider.as_str()),
            outcome = decision.outcome.as_str(),
            error = decision.error.unwrap_or("-"),
            status = decision.status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "inbound request"
        );
    }
}

#[async_trait]
impl HttpServerApp for VerifyingProxy {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        session.set_write_timeout(Some(WRITE_TIMEOUT));
        let mut stop = shutdown.clone();
        // A kept-alive connection may sit idle for KEEPALIVE_IDLE, then the head must arrive within
        // read_timeout like a body: a sender that trickles bytes or says nothing cannot hold the
        // connection (pingora's own read timeout restarts with every byte).
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout(KEEPALIVE_IDLE + self.inbound.read_timeout, session.read_request()) => match read {
                Ok(read) => read,
                Err(_) => return None,
            },
            // Shutting down while a kept-alive connection waits for its next request.
            _ = stop.wait_for(|down| *down) => return None,
        };
        match read {
            Ok(true) => {}
            // The sender closed the connection between requests.
            Ok(false) => return None,
            Err(e) if e.etype == ErrorType::InvalidHTTPHeader => {
                // The head could not be parsed or broke the framing rules (pingora's checks): no
                // header is stored, and the error's context holds raw request bytes, so neither is
                // echoed.
                tracing::debug!(error = %e.etype.as_str(), "malformed request head");
                self.refuse_unread(
                    &mut session,
                    Refusal::new(
                        400,
                        "bad_request",
                        "malformed request framing (request line or headers)",
                    ),
                )
                .await;
                session.shutdown().await;
                return None;
            }
            // A timeout or a connection lost mid-head: nobody left to answer.
            Err(e) => {
                tracing::debug!(error = %e.etype.as_str(), "request head not read");
                return None;
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        // A request pipelined behind this one in the same write is kept for the next round.
        session.set_pipelining_enabled(true);
        if session.req_header().method == http::Method::CONNECT {
            self.refuse_unread(
                &mut session,
                Refusal::new(405, "method_not_allowed", "CONNECT is not accepted"),
            )
            .await;
            session.shutdown().await;
            return None;
        }
        if self.handle(&mut session).await.is_err() {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match tokio::time::timeout(WRITE_TIMEOUT, session.finish()).await {
            Ok(Ok(Some(reusable))) => {
                Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
            }
            _ => None,
        }
    }
}
