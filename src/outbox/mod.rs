//! The outbox side: noticing committed events (LISTEN/NOTIFY as a hint, polling as the truth) and
//! fanning them out. Invariant: the table is the truth. A wake-up only makes a pass happen sooner;
//! a lost notification, a dead listener or `notify = "none"` delays a pass by at most one poll
//! interval, and every (re)connect does LISTEN first and then a catch-up pass.

mod cells;
pub mod dispatcher;
mod fold;
pub mod glob;
mod opening;
mod target;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_postgres::AsyncMessage;

use crate::db::tls::Tls;
use tokio_util::sync::CancellationToken;

use crate::delivery::Capacity;
use crate::endpoints::Announce;
use crate::telemetry::{Health, Metrics, PassLabel, ProbeLabel};
use dispatcher::Dispatcher;

/// Shared between the listener, the dispatcher and the worker of one replica.
#[derive(Default)]
pub struct Signals {
    /// Rung by the listener: something was committed to the outbox.
    pub outbox_changed: Notify,
    /// The window the last wake-up opened, in microseconds, as its payload said (0: none, the
    /// stream is sparse and every commit is announced; `u64::MAX`: not said, an earlier build's
    /// trigger or a reconnect's catch-up, so the configured throttle).
    pub outbox_window_us: AtomicU64,
    /// Rung by the dispatcher: new deliveries wait in the table to be claimed.
    pub deliveries_ready: Arc<Notify>,
    /// Rung by the worker when an endpoint answered 410: the housekeeper pauses its backlog now.
    pub sweep_now: Arc<Notify>,
}

/// Keeps one LISTEN connection up, reconnecting with backoff, and rings `outbox_changed` for every
/// notification and after every (re)connect.
/// Endpoint changes announced on `channels.endpoints` reach `capacity` (stop, resume, revoke)
/// and `health` (a changed or stopped endpoint's fault is cleared).
#[allow(clippy::too_many_arguments)]
pub async fn listen(
    url: String,
    tls: Tls,
    mode: crate::db::SessionMode,
    channels: Channels,
    signals: Arc<Signals>,
    capacity: Arc<Capacity>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut delay: Option<Duration> = None;
    while !cancel.is_cancelled() {
        let started = std::time::Instant::now();
        let result = listen_once(
            &url, &tls, mode, &channels, &signals, &capacity, &health, &metrics, &cancel,
        )
        .await;
        let wait = next_listen_delay(delay, result.is_ok(), started.elapsed());
        delay = Some(wait);
        if let Err(e) = result {
            tracing::warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "outbox listener disconnected");
        }
        metrics.listener_connected.set(0);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

const LISTEN_RETRY_FIRST: Duration = Duration::from_millis(100);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// The wait before the listener's next connection: doubling while connections fail at once, from
/// the first again after one that held a while (a database restart days after the last should
/// not wait out the backoff of that one).
fn next_listen_delay(last: Option<Duration>, ended_cleanly: bool, lasted: Duration) -> Duration {
    match last {
        Some(last) if !ended_cleanly && lasted < Duration::from_secs(30) => {
            (last * 2).min(LISTEN_RETRY_MAX)
        }
        _ => LISTEN_RETRY_FIRST,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_backs_off_while_connections_fail_and_starts_over_after_one_that_held() {
        let quick = Duration::from_millis(20);
        let mut waits = Vec::new();
        let mut last = None;
        for _ in 0..8 {
            let w = next_listen_delay(last, false, quick);
            waits.push(w.as_millis());
            last = Some(w);
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // A connection that held for an hour, then dropped: retried at once, not after 5 s.
        assert_eq!(
            next_listen_delay(last, false, Duration::from_secs(3600)),
            LISTEN_RETRY_FIRST
        );
    }
}

/// The channels a replica listens on.
#[derive(Debug, Clone)]
pub struct Channels {
    /// The outbox trigger's wake-ups.
    pub outbox: String,
    /// Endpoint changes (`endpoints::Announce`).
    pub endpoints: String,
}

/// One connection's life: returns when it ends (error) or on cancellation (Ok).
#[allow(clippy::too_many_arguments)]
async fn listen_once(
    url: &str,
    tls: &Tls,
    mode: crate::db::SessionMode,
    channels: &Channels,
    signals: &Arc<Signals>,
    capacity: &Capacity,
    health: &Health,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let mut config = crate::db::parse_url(url)?;
    config
        .application_name("postern-listener")
        .connect_timeout(Duration::from_secs(5));
    let set = crate::db::bound_session(&mut config, crate::db::SESSION_SETTINGS, mode);
    let (client, mut connection) = config.connect(tls.clone()).await?;
    // The connection's plain Future drops notifications; poll_message hands them to us. An outbox
    // wake-up rings the dispatcher from here, the task that read it: it is the hot path from the
    // app's commit to a delivery, and every task it passes through is one more wake-up.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outbox_channel = channels.outbox.clone();
    let wake = signals.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) if n.channel() == outbox_channel => {
                    let window = n.payload().parse().unwrap_or(u64::MAX);
                    wake.outbox_window_us.store(window, Ordering::Relaxed);
                    wake.outbox_changed.notify_one();
                }
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let result = async {
        client
            .batch_execute(&format!(
                "{set} LISTEN {}; LISTEN {}",
                channels.outbox, channels.endpoints
            ))
            .await?;
        metrics.listener_connected.set(1);
        tracing::info!(channel = %channels.outbox, "listening for outbox notifications");
        // Notifications sent while we were away are lost: scan once now (with full takes: a
        // backlog may wait), and distrust what is held (an endpoint may have been paused or
        // re-tenanted meanwhile).
        signals.outbox_window_us.store(u64::MAX, Ordering::Relaxed);
        signals.outbox_changed.notify_one();
        capacity.revoke_all();
        let mut keepalive = tokio::time::interval(Duration::from_secs(15));
        keepalive.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                message = rx.recv() => match message {
                    Some(n) => endpoint_changed(capacity, health, &signals.sweep_now, n.payload()),
                    None => anyhow::bail!("listener connection closed"),
                },
                // A silently dead connection would never deliver another notification.
                _ = keepalive.tick() => { client.simple_query("SELECT 1").await?; }
            }
        }
    }
    .await;
    driver.abort();
    result
}

fn endpoint_changed(capacity: &Capacity, health: &Health, sweep_now: &Notify, payload: &str) {
    let Some((what, endpoint)) = Announce::parse(payload) else {
        tracing::warn!(
            payload,
            "ignoring an endpoint notification this build does not know"
        );
        return;
    };
    tracing::info!(
        endpoint.id = endpoint,
        change = what.as_str(),
        "endpoint changed"
    );
    match what {
        Announce::Stop => capacity.stop(endpoint),
        Announce::Resume => capacity.resume(endpoint),
        Announce::Revoke => capacity.revoke(endpoint),
    }
    // Stopped, nothing more goes to it here; changed (its secrets rotated, say), a fault it
    // raised may be gone: the next delivery to it raises the fault again if not. A revocation
    // alone (its circuit opened) changes nothing the fault is about.
    if what != Announce::Revoke {
        health.clear_endpoint_fault(endpoint);
    }
    // What the change left to the sweeper (a large backlog) is moved now, not at the next tick.
    sweep_now.notify_one();
}

/// While events flow (a notification's throttle window is open, or the last pass found events),
/// the outbox is probed this often, and a pass runs when the probe finds an event: commits inside
/// a window are not announced, and a probe (one index lookup) costs a fraction of a pass.
const PROBE_EVERY: Duration = Duration::from_micros(500);

/// How long probing goes on past the window a notification names: the last probes come after
/// the window a commit could have gone unannounced in.
const WINDOW_MARGIN: Duration = Duration::from_millis(2);

/// Waits until `deadline`. Tokio's timer has millisecond ticks and rounds a deadline up to the
/// next one, so a probe interval under a millisecond would come every 1-2 ms on it: a wait under
/// [`PRECISE_BELOW`] sleeps a thread of the blocking pool instead (precise to tens of
/// microseconds on Linux). Only the probes wait so little, and only while events flow.
async fn sleep_until(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    if left >= PRECISE_BELOW {
        return tokio::time::sleep_until(deadline).await;
    }
    // Dropped (a notification came first), the thread finishes its short sleep alone.
    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(left)).await;
}

const PRECISE_BELOW: Duration = Duration::from_millis(2);

/// How soon a pass that left keyed events for another replica's pass looks again.
const HELD_BACK_RETRY: Duration = Duration::from_millis(20);

/// Runs dispatcher passes on wake-ups and on the poll timer until cancelled.
pub async fn dispatch_loop(
    dispatcher: Dispatcher,
    signals: Arc<Signals>,
    metrics: Arc<Metrics>,
    poll_interval: Duration,
    throttle: Duration,
    cancel: CancellationToken,
) {
    // Three reasons for a pass: a notification (at once); the poll timer (the backstop); and,
    // while events flow, a probe that found one. Events flow from a notification until the end
    // of its throttle window (commits inside it were not announced), and for as long as passes
    // or probes keep finding events.
    let mut poll_at = Instant::now();
    let mut window_end: Option<Instant> = None;
    let mut flowing = false;
    let mut probe_at: Option<Instant> = None;
    // A probe answers "some event waits", not "one this replica can take": rows locked by
    // another pass, keyed events held back. When a pass a probe started took nothing, probing
    // stops until the next notification (`probe_misled`).
    let mut probe_misled = false;
    let mut failures = 0u32;
    loop {
        let mut probed = false;
        // Woken by a notification (a reconnect's catch-up included) or a probe: a commit or two
        // wait, taken without the byte count and marked dispatched after the take
        // (`Dispatcher::small_batch`, `opening`); full takes follow if it fills. The poll timer
        // (the backstop) takes full batches.
        let mut small = false;
        // What started the pass, for `postern_outbox_passes_total`.
        let mut reason = "notification";
        let next = probe_at.map_or(poll_at, |p| p.min(poll_at));
        let pass_now = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = signals.outbox_changed.notified() => {
                let said = signals.outbox_window_us.load(Ordering::Relaxed);
                let window = Duration::from_micros(said).min(throttle);
                window_end = Some(Instant::now() + window + WINDOW_MARGIN);
                probe_misled = false;
                small = true;
                true
            }
            _ = sleep_until(next) => {
                let now = Instant::now();
                if poll_at <= now {
                    poll_at = now + poll_interval;
                    reason = "poll";
                    true
                } else {
                    let open = window_end.is_some_and(|t| t > now) && !probe_misled;
                    if !open && !flowing {
                        probe_at = None;
                        false
                    } else {
                        let answer = dispatcher.waiting().await;
                        let said = match &answer {
                            Ok(true) => "waiting",
                            Ok(false) => "none",
                            Err(_) => "failed",
                        };
                        metrics.outbox_probes.get_or_create(&ProbeLabel { answer: said }).inc();
                        match answer {
                            Ok(true) => {
                                (probed, small, reason) = (true, true, "probe");
                                true
                            }
                            answer => {
                                // After a failed probe too, probing goes on to the window's
                                // end; the poll timer covers the rest.
                                if let Err(e) = answer {
                                    tracing::debug!(error = %format!("{e:#}"), "outbox probe failed");
                                }
                                flowing = false;
                                probe_at = open.then(|| Instant::now() + PROBE_EVERY);
                                false
                            }
                        }
                    }
                }
            }
        };
        if !pass_now {
            continue;
        }
        let mut found = false;
        // Where the next pass starts: past a batch that was held back whole (see `take`).
        let mut after = 0;
        while !cancel.is_cancelled() {
            let started = Instant::now();
            metrics
                .outbox_passes
                .get_or_create(&PassLabel { reason })
                .inc();
            reason = "more";
            match dispatcher.dispatch_once(after, small).await {
                Ok(done) => {
                    failures = 0;
                    if done.pending > 0 {
                        signals.deliveries_ready.notify_one();
                    }
                    metrics.outbox_folded.inc_by(done.folded as u64);
                    for lag in &done.lags {
                        metrics.dispatch_lag.observe(*lag);
                    }
                    if done.events > 0 {
                        let max_lag = done.lags.iter().copied().fold(0.0, f64::max);
                        tracing::debug!(
                            events = done.events,
                            deliveries = done.deliveries,
                            pending = done.pending,
                            took_ms = started.elapsed().as_secs_f64() * 1000.0,
                            max_lag_s = max_lag,
                            "dispatched"
                        );
                    }
                    found |= done.events > 0;
                    if done.held_back > 0 && done.scanned == dispatcher.batch() {
                        after = done.last_id;
                        continue;
                    }
                    after = 0;
                    if done.held_back > 0 {
                        // Another replica's pass holds earlier events of their keys: look again
                        // once it has had time to commit.
                        poll_at = poll_at.min(Instant::now() + HELD_BACK_RETRY);
                    }
                    let full = if small {
                        dispatcher.small_batch()
                    } else {
                        dispatcher.batch()
                    };
                    if done.events < full {
                        break;
                    }
                    small = false;
                }
                Err(e) => {
                    failures += 1;
                    let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "dispatch failed");
                    poll_at = Instant::now() + backoff;
                    (window_end, found) = (None, false);
                    break;
                }
            }
        }
        flowing = found;
        probe_misled |= probed && !found;
        let open = window_end.is_some_and(|t| t > Instant::now()) && !probe_misled;
        probe_at = (flowing || open).then(|| Instant::now() + PROBE_EVERY);
    }
}
