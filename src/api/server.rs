//! Serving a router over HTTP/1.1 on the API and admin ports. Invariant: no connection is held
//! by a client that does not finish its request head: the head must arrive within
//! [`HEADER_TIMEOUT`] of the connection's start or of the previous answer (a kept-alive
//! connection's wait included), as a body must within the extractors' own bound. Without it a
//! client could keep connections, and the file descriptors outbound delivery shares, forever.

use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// How long a request head (or a kept-alive connection's next one) may take to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long in-flight requests may finish once `stop` resolves.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stop` resolves, then lets in-flight requests finish (at most
/// [`DRAIN`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: the next accept may work, a busy loop not.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client gone or too slow: nothing to report to anyone.
            let _ = connection.await;
        });
    }
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}
