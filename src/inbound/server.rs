//! Hosting the proxy in a pingora `Server` on its own thread, under Postern's shutdown token.
//! Invariant: pingora never handles a signal itself; the token is its only shutdown signal, and its
//! grace periods are derived from `shutdown_grace` so it finishes well inside the budget.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;
use tokio_util::sync::CancellationToken;

use super::proxy::VerifyingProxy;
use super::Inbound;
use crate::config::Config;
use crate::inbox::writer::InboxWriter;
use crate::telemetry::Metrics;

/// Turns Postern's cancellation into pingora's graceful terminate.
struct TokenSignal(CancellationToken);

#[async_trait]
impl ShutdownSignalWatch for TokenSignal {
    async fn recv(&self) -> ShutdownSignal {
        self.0.cancelled().await;
        ShutdownSignal::GracefulTerminate
    }
}

/// Starts the inbound proxy when `[inbound]` is configured. The returned thread ends after
/// `shutdown` is cancelled and pingora has drained.
pub fn spawn(
    config: &Config,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    inbox: Option<InboxWriter>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let Some(section) = &config.inbound else {
        return Ok(None);
    };
    let inbound = Arc::new(Inbound::build(section, inbox)?);
    // Fail with a clear message now rather than inside pingora's runtime.
    std::net::TcpListener::bind(&section.listen)
        .with_context(|| format!("inbound.listen: cannot bind {}", section.listen))?;

    let grace = config.shutdown_grace.0;
    let conf = ServerConf {
        threads: section.threads,
        // pingora sleeps the grace period (letting in-flight requests finish), then gives its
        // runtimes the shutdown timeout: both are a fifth of Postern's budget, at least 1 s.
        grace_period_seconds: Some(share_of(grace)),
        graceful_shutdown_timeout_seconds: Some(share_of(grace)),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut service = Service::new(
        "postern inbound".to_string(),
        VerifyingProxy::new(inbound.clone(), metrics),
    );
    service.add_tcp(&section.listen);
    server.add_service(service);
    let listen = section.listen.clone();
    let routes = inbound.routes.len();
    let thread = std::thread::Builder::new()
        .name("postern-inbound".into())
        .spawn(move || {
            tracing::info!(listen = %listen, routes, "inbound proxy listening");
            server.run(RunArgs {
                shutdown_signal: Box::new(TokenSignal(shutdown)),
            });
            tracing::info!("inbound proxy stopped");
        })
        .context("starting the inbound proxy thread")?;
    Ok(Some(thread))
}

fn share_of(grace: Duration) -> u64 {
    (grace.as_secs() / 5).max(1)
}
