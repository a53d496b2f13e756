//! Postern: reliable webhooks in both directions, with the application's own Postgres as the only
//! infrastructure. The modules follow the data flow.

pub mod api; // management REST API, probes, metrics endpoint
pub mod app; // the process: startup, the task tree, graceful shutdown
pub mod checks; // a parsed config validated as a whole, each module checking its own section
pub mod config; // figment layers parsed into typed values, one file per section; secrets resolved and redacted
pub mod crypto; // secrets at rest (ChaCha20-Poly1305)
pub mod db; // pool, embedded migrations, the notify trigger
pub mod delivery; // claim under a lease, sign, POST, settle; retry policy; SSRF guard
pub mod demo; // `postern demo`: a self-contained first run
pub mod endpoints; // endpoint rows and their secrets
pub mod inbound; // the verifying reverse proxy for provider webhooks (pingora)
pub mod inbox; // the durable inbox: verified requests committed before they are acknowledged, then forwarded or taken
pub mod outbox; // LISTEN/NOTIFY + polling, fan-out of outbox rows into deliveries
pub mod retention; // pruning old rows, reaping lapsed leases
pub mod signing; // Standard Webhooks and other schemes, shared by both directions
pub mod telemetry; // tracing subscriber
