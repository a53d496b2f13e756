//! A real HTTP receiver on 127.0.0.1 for the tests: answers as scripted (status, body, headers,
//! delay) and keeps every request it saw, exactly as it came.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

/// One request as a receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Path and query as requested.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub fn event_id(&self) -> String {
        self.header("webhook-id").expect("webhook-id").to_string()
    }
}

/// How a receiver answers its n-th request (0-based).
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
            body: b"ok".to_vec(),
        }
    }
    /// Answers with these exact bytes (any bytes: NUL, invalid UTF-8).
    pub fn with_body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Behaviour = Box<dyn Fn(usize, &Received) -> Reply + Send + Sync>;

struct ReceiverState {
    requests: Mutex<Vec<Received>>,
    behaviour: Behaviour,
    changed: Notify,
}

/// A real HTTP server on 127.0.0.1 that records every request.
pub struct Receiver {
    pub url: String,
    state: Arc<ReceiverState>,
}

async fn handle(State(state): State<Arc<ReceiverState>>, req: Request) -> Response {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let received = Received {
        uri: parts.uri.to_string(),
        headers: parts.headers,
        body,
        at,
    };
    let n = {
        let mut r = state.requests.lock().unwrap();
        r.push(received.clone());
        r.len() - 1
    };
    state.changed.notify_waiters();
    let reply = (state.behaviour)(n, &received);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

impl Receiver {
    pub async fn start(
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, behaviour)
    }

    /// A receiver on a port chosen before (an app that comes up where it was down).
    pub async fn start_at(
        port: u16,
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        Self::start_on(listener, behaviour)
    }

    fn start_on(
        listener: tokio::net::TcpListener,
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let state = Arc::new(ReceiverState {
            requests: Mutex::new(Vec::new()),
            behaviour: Box::new(behaviour),
            changed: Notify::new(),
        });
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        let addr = self.url.trim_end_matches("/hook");
        addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub async fn ok() -> Self {
        Self::start(|_, _| Reply::status(200)).await
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Waits until `cond` holds over the requests so far, or panics after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&[Received]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.state.changed.notified();
            if cond(&self.state.requests.lock().unwrap()) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} waiting for {what}; have {} requests",
                self.count()
            );
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    pub async fn wait_count(&self, n: usize, timeout: Duration) {
        self.wait_for(timeout, &format!("{n} requests"), |r| r.len() >= n)
            .await;
    }

    /// Requests grouped by `webhook-id`.
    pub fn by_event(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.requests() {
            *m.entry(r.event_id()).or_insert(0) += 1;
        }
        m
    }
}
