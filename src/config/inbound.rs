//! The `[inbound]` section and its routes, as written. Values only: `inbound::validate` checks
//! them, provider by provider.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{defaults, ByteSize, Dur, Secret};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    #[serde(default = "defaults::inbound_listen")]
    pub listen: String,
    /// The app, on localhost: `http://host:port`.
    #[serde(default = "defaults::inbound_upstream")]
    pub upstream: String,
    #[serde(default = "defaults::inbound_max_body")]
    pub max_body: ByteSize,
    /// Request bodies buffered at once, over every connection: past it, senders get `503` with
    /// `Retry-After` (their providers retry) instead of the process growing without bound.
    #[serde(default = "defaults::inbound_max_buffered")]
    pub max_buffered: ByteSize,
    /// Slow senders are cut off: the whole request body must arrive within this.
    #[serde(default = "defaults::inbound_read_timeout")]
    pub read_timeout: Dur,
    #[serde(default = "defaults::inbound_upstream_timeout")]
    pub upstream_timeout: Dur,
    /// CIDRs of proxies (e.g. the ingress) whose X-Forwarded-For is believed.
    #[serde(default)]
    pub trust_forwarded_for: Vec<IpNet>,
    /// Worker threads of the proxy's runtime.
    #[serde(default = "defaults::inbound_threads")]
    pub threads: usize,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One provider route. Provider-specific keys are checked by the provider's verifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact path match (the query string is ignored for routing).
    pub path: String,
    /// The route's name in the inbox, its API and metrics; default: the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub provider: String,
    /// `forward` (default): verified requests go to the app while the provider waits. `inbox`:
    /// they are committed to `inbox` first and the provider is answered at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// inbox: `forward` (default, Postern hands each message to the app) or `sql` (the app takes
    /// them with `inbox_take`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consume: Option<String>,
    /// inbox: where the dedupe key is, `header:NAME` or `json:/pointer` (any provider; the
    /// provider's own id by default, else a hash of the body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<String>,
    /// inbox: the answer a stored request gets, for providers that want something specific.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respond_with: Option<RespondWith>,
    #[serde(default)]
    pub secrets: Vec<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_path: Option<String>,
    #[serde(default)]
    pub allow_ips: Vec<IpNet>,
    /// Accepted methods; webhooks are POST unless a route says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// square: the notification URL registered with Square.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_url: Option<String>,
    /// twilio: the URL Twilio requests, without its query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// hmac: the signature header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// hmac: sha256 | sha1 | sha512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// hmac: hex | base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// hmac: text before the signature in the header, e.g. `sha256=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// hmac: the header carrying a unix timestamp, when the sender signs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_header: Option<String>,
    /// hmac: what is signed, from `{timestamp}` and `{body}`; default `{body}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_template: Option<String>,
}

/// inbox: the status, body and content type a stored (or duplicate) request is answered with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondWith {
    #[serde(default = "defaults::respond_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default = "defaults::respond_content_type")]
    pub content_type: String,
}
