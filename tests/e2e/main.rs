//! Black-box tests: the real `postern` binary against a real Postgres (a database of its own per
//! test) and real HTTP receivers on 127.0.0.1 ports chosen by the OS. One test binary, so the
//! suite links once.

mod api;
mod api_contract;
mod cli;
mod common;
mod crowd;
mod dashboard;
mod deliveries;
mod deploy;
mod fast_path;
mod flow;
mod hardening;
mod hostile_events;
mod inbound;
mod inbound_budget;
mod inbound_framing;
mod inbox;
mod inbox_consumers;
mod inbox_dedupe;
mod isolation;
mod ordering;
mod outage;
mod outbound;
mod pgbouncer;
mod probes;
mod races;
mod resilience;
mod rotation;
mod secrets;
