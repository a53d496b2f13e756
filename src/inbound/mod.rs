//! Inbound: the verifying reverse proxy in front of the app. Invariant: a request reaches the app
//! only after its signature verified over the exact raw bytes it carried; every other request is
//! answered by Postern with a JSON error and never forwarded.

mod body;
mod decision;
pub mod dedupe;
mod inbox;
pub mod providers;
mod proxy;
mod refusal;
mod server;
mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use ipnet::IpNet;

use crate::config::{InboundConfig, RouteConfig};
use crate::inbox::writer::InboxWriter;
use providers::Verifier;

pub use server::spawn;

/// A route, ready to serve.
pub struct Route {
    pub path: String,
    /// The route's name in the inbox, API and metrics (default: the path).
    pub name: String,
    pub provider: String,
    /// Set in inbox mode: verified requests are stored, then answered.
    pub inbox: Option<InboxRoute>,
    pub verifier: Box<dyn Verifier>,
    pub upstream_path: Option<String>,
    pub allow_ips: Vec<IpNet>,
    pub methods: Vec<String>,
    /// The route's share of the buffered-body budget, in KiB (`body::route_share_kib`).
    pub buffered: std::sync::Arc<tokio::sync::Semaphore>,
}

/// An inbox route's settings.
pub struct InboxRoute {
    pub dedupe: Vec<dedupe::Source>,
    pub consume: Consume,
    /// The answer to a stored request: status, content type, body.
    pub respond: (u16, String, bytes::Bytes),
    /// The default answer carries the message's id; `respond_with` is sent as written.
    pub respond_configured: bool,
}

/// Who hands an inbox route's messages to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consume {
    /// Postern forwards each message to the upstream until the app answers 2xx.
    Forward,
    /// The app takes them with `inbox_take` / `inbox_done`.
    Sql,
}

/// How long a request waits for its inbox commit before the provider is told to retry (`503`).
pub const INBOX_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Everything the proxy needs, built once from the config.
pub struct Inbound {
    /// Where inbox routes store requests (present when any route is in inbox mode).
    pub inbox: Option<InboxWriter>,
    pub routes: HashMap<String, Route>,
    pub upstream: SocketAddr,
    pub max_body: usize,
    /// The budget of buffered body bytes, in KiB, shared by every request.
    pub buffered: std::sync::Arc<tokio::sync::Semaphore>,
    pub read_timeout: std::time::Duration,
    pub upstream_timeout: std::time::Duration,
    pub trust_forwarded_for: Vec<IpNet>,
}

/// Checks the `[inbound]` section; every problem names its key.
pub fn validate(config: &InboundConfig) -> Vec<String> {
    let mut p = Vec::new();
    if config.listen.parse::<SocketAddr>().is_err() {
        p.push(format!(
            "inbound.listen: {:?} is not an address like 0.0.0.0:8081",
            config.listen
        ));
    }
    if let Err(e) = upstream_addr(&config.upstream) {
        p.push(format!("inbound.upstream: {e}"));
    }
    if config.max_body.0 == 0 || config.max_body.0 > 1 << 30 {
        p.push("inbound.max_body: must be above zero and at most 1GiB".into());
    }
    if config.max_buffered.0 < config.max_body.0 || config.max_buffered.0 > 16 << 30 {
        p.push(format!(
            "inbound.max_buffered: {} must be at least inbound.max_body ({}) and at most 16GiB",
            config.max_buffered, config.max_body
        ));
    }
    if config.read_timeout.0.is_zero() {
        p.push("inbound.read_timeout: must be above zero".into());
    }
    if config.upstream_timeout.0.is_zero() {
        p.push("inbound.upstream_timeout: must be above zero".into());
    }
    if config.threads == 0 || config.threads > 64 {
        p.push("inbound.threads: must be 1 to 64".into());
    }
    let mut paths = HashMap::new();
    let mut names = HashMap::new();
    for (i, route) in config.routes.iter().enumerate() {
        let key = format!("inbound.routes[{i}]");
        if let Err(e) = plain_path(&route.path) {
            p.push(format!("{key}.path: {:?} {e}", route.path));
        } else if let Some(j) = paths.insert(route.path.clone(), i) {
            p.push(format!(
                "{key}.path: {:?} is also inbound.routes[{j}].path",
                route.path
            ));
        }
        if let Some(up) = &route.upstream_path {
            if !up.starts_with('/') || up.contains(['?', '#']) || up.contains(char::is_control) {
                p.push(format!(
                    "{key}.upstream_path: {up:?} must start with / and carry no query, fragment or control character"
                ));
            }
        }
        if route.methods.as_ref().is_some_and(Vec::is_empty) {
            p.push(format!(
                "{key}.methods: is empty, so the route would refuse every request; leave it out for POST"
            ));
        }
        for (j, m) in route.methods.iter().flatten().enumerate() {
            if http::Method::from_bytes(m.as_bytes()).is_err() || m.to_ascii_uppercase() != *m {
                p.push(format!(
                    "{key}.methods[{j}]: {m:?} is not an upper-case HTTP method"
                ));
            }
        }
        if let Err(errs) = providers::build(route) {
            p.extend(errs.into_iter().map(|e| format!("{key}.{e}")));
        }
        if let Some(name) = &route.name {
            if !crate::config::is_identifier(name, &['.', ':', '/', '-']) {
                p.push(format!(
                    "{key}.name: {name:?} must be 1-128 characters of a-z, A-Z, 0-9, _ - . : /"
                ));
            }
        }
        let name = route_name(route);
        if let Some(j) = names.insert(name.clone(), i) {
            p.push(format!(
                "{key}.name: {name:?} is also the name of inbound.routes[{j}]"
            ));
        }
        p.extend(
            validate_inbox(route)
                .into_iter()
                .map(|e| format!("{key}.{e}")),
        );
    }
    p
}

/// A route's path as a request can carry it, compared byte for byte with the request's: `/` and
/// then the characters a URL path carries, a `%` only as an escape of two hex digits. A query or
/// fragment, whitespace or a control byte, a broken escape, and a `.` or `..` segment (clients
/// resolve those before sending) would make a route no request reaches.
fn plain_path(path: &str) -> Result<(), &'static str> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("must start with /");
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/%".contains(c);
    if let Some(c) = rest.chars().find(|&c| !allowed(c)) {
        return Err(match c {
            '?' => "must carry no query",
            '#' => "must carry no fragment",
            _ => "may hold only letters, digits, - . _ ~ ! $ & ' ( ) * + , ; = : @ / and %-escapes",
        });
    }
    let bytes = rest.as_bytes();
    let escapes_whole = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || (i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit())
    });
    if !escapes_whole {
        return Err("has a % that is not followed by two hex digits");
    }
    if rest.split('/').any(|segment| matches!(segment, "." | "..")) {
        return Err("must have no . or .. segment (clients resolve them before sending)");
    }
    Ok(())
}

/// A route's name: `name`, or its path.
pub fn route_name(route: &RouteConfig) -> String {
    route.name.clone().unwrap_or_else(|| route.path.clone())
}

/// Whether any route of the config is in inbox mode.
pub fn has_inbox(config: &crate::config::Config) -> bool {
    config
        .inbound
        .as_ref()
        .is_some_and(|i| i.routes.iter().any(is_inbox))
}

/// `forward` or `sql`: who hands an inbox route's messages to the app.
pub fn consume_of(route: &RouteConfig) -> &'static str {
    match route.consume.as_deref() {
        Some("sql") => "sql",
        _ => "forward",
    }
}

/// Whether a route stores its requests in the inbox.
pub fn is_inbox(route: &RouteConfig) -> bool {
    route.mode.as_deref() == Some("inbox")
}

/// The inbox keys of a route, as `key: message` relative to the route.
fn validate_inbox(route: &RouteConfig) -> Vec<String> {
    let mut p = Vec::new();
    match route.mode.as_deref() {
        None | Some("forward" | "inbox") => {}
        Some(other) => p.push(format!("mode: {other:?} must be \"forward\" or \"inbox\"")),
    }
    let inbox = is_inbox(route);
    let only_inbox = |key: &str, set: bool, p: &mut Vec<String>| {
        if set && !inbox {
            p.push(format!("{key}: only used with mode = \"inbox\""));
        }
    };
    only_inbox("consume", route.consume.is_some(), &mut p);
    only_inbox("dedupe", route.dedupe.is_some(), &mut p);
    only_inbox("respond_with", route.respond_with.is_some(), &mut p);
    match route.consume.as_deref() {
        None | Some("forward" | "sql") => {}
        Some(other) => p.push(format!("consume: {other:?} must be \"forward\" or \"sql\"")),
    }
    if let Some(spec) = &route.dedupe {
        if let Err(e) = dedupe::parse(spec) {
            p.push(format!("dedupe: {e}"));
        }
    } else if inbox && route.provider == "hmac" {
        // A body hash would take two real events with equal bodies for one.
        p.push("dedupe: required for an hmac route in inbox mode (header:NAME or json:/pointer naming the sender's event id)".into());
    }
    if let Some(r) = &route.respond_with {
        if !(200..300).contains(&r.status) {
            p.push(format!(
                "respond_with.status: {} must be 2xx (anything else makes the provider retry)",
                r.status
            ));
        }
        // HTTP forbids a body on them; a Content-Length on one breaks strict clients.
        if matches!(r.status, 204 | 205) && !r.body.is_empty() {
            p.push(format!(
                "respond_with.body: must be empty with status {}",
                r.status
            ));
        }
        if r.body.len() > 64 * 1024 {
            p.push("respond_with.body: must be at most 64KiB".into());
        }
        if http::HeaderValue::from_str(&r.content_type).is_err() {
            p.push(format!(
                "respond_with.content_type: {:?} is not a header value",
                r.content_type
            ));
        }
    }
    p
}

/// The upstream must be plain HTTP on an address this pod reaches (normally loopback).
fn upstream_addr(written: &str) -> Result<SocketAddr, String> {
    // Shown with any password masked: config errors reach the logs.
    let url = crate::config::mask_url_password(written);
    let parsed = url::Url::parse(written).map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    if parsed.scheme() != "http" {
        return Err(format!("{url:?} must be http:// (the app, on localhost)"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "{url:?} must carry no credentials (the proxy would not send them)"
        ));
    }
    if parsed.path() != "/" && !parsed.path().is_empty() {
        return Err(format!(
            "{url:?} must not carry a path; use a route's upstream_path"
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "{url:?} must carry no query or fragment (requests keep their own query)"
        ));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = parsed.port_or_known_default().unwrap_or(80);
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))
}

impl Inbound {
    /// Builds the routes; the config was validated, so failures here are bugs or a changed
    /// environment (DNS), reported as errors all the same.
    pub fn build(config: &InboundConfig, inbox: Option<InboxWriter>) -> anyhow::Result<Self> {
        let problems = validate(config);
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
        let share = body::route_share_kib(
            (config.max_buffered.0 / 1024) as usize,
            (config.max_body.0 as usize).div_ceil(1024),
            config.routes.len(),
        );
        let mut routes = HashMap::new();
        for route in &config.routes {
            routes.insert(route.path.clone(), Self::route(route, share)?);
        }
        Ok(Self {
            inbox,
            routes,
            upstream: upstream_addr(&config.upstream).map_err(anyhow::Error::msg)?,
            max_body: config.max_body.0 as usize,
            buffered: std::sync::Arc::new(tokio::sync::Semaphore::new(
                (config.max_buffered.0 / 1024) as usize,
            )),
            read_timeout: config.read_timeout.0,
            upstream_timeout: config.upstream_timeout.0,
            trust_forwarded_for: config.trust_forwarded_for.clone(),
        })
    }

    fn route(route: &RouteConfig, share_kib: usize) -> anyhow::Result<Route> {
        let verifier = providers::build(route).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
        let inbox = is_inbox(route).then(|| {
            let mut sources: Vec<dedupe::Source> = route
                .dedupe
                .as_deref()
                .and_then(|d| dedupe::parse(d).ok())
                .into_iter()
                .collect();
            sources.extend(dedupe::provider_sources(&route.provider));
            let respond = match &route.respond_with {
                Some(r) => (
                    r.status,
                    r.content_type.clone(),
                    bytes::Bytes::from(r.body.clone()),
                ),
                None => (200, "application/json".into(), bytes::Bytes::new()),
            };
            InboxRoute {
                dedupe: sources,
                consume: match route.consume.as_deref() {
                    Some("sql") => Consume::Sql,
                    _ => Consume::Forward,
                },
                respond,
                respond_configured: route.respond_with.is_some(),
            }
        });
        Ok(Route {
            path: route.path.clone(),
            name: route_name(route),
            provider: route.provider.clone(),
            inbox,
            verifier,
            upstream_path: route.upstream_path.clone(),
            allow_ips: route.allow_ips.clone(),
            methods: route.methods.clone().unwrap_or_else(|| vec!["POST".into()]),
            buffered: std::sync::Arc::new(tokio::sync::Semaphore::new(share_kib)),
        })
    }

    /// The sender's address: the peer, unless the peer is a trusted proxy, in which case the
    /// right-most X-Forwarded-For entry that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trust_forwarded_for.iter().any(|n| n.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let Some(xff) = forwarded_for else {
            return peer;
        };
        let mut client = peer;
        for entry in xff.split(',').rev() {
            match entry.trim().parse::<IpAddr>() {
                Ok(ip) if trusted(&ip) => client = ip,
                Ok(ip) => return ip,
                // An unparsable entry ends the chain of trust.
                Err(_) => return client,
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(trust: &[&str]) -> Inbound {
        Inbound {
            inbox: None,
            routes: HashMap::new(),
            upstream: "127.0.0.1:1".parse().unwrap(),
            max_body: 1,
            buffered: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
            read_timeout: std::time::Duration::from_secs(1),
            upstream_timeout: std::time::Duration::from_secs(1),
            trust_forwarded_for: trust.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let untrusting = inbound(&[]);
        assert_eq!(
            untrusting.client_ip(ip("10.0.0.5"), Some("1.2.3.4")),
            ip("10.0.0.5")
        );
        let trusting = inbound(&["10.0.0.0/8"]);
        assert_eq!(
            trusting.client_ip(ip("10.0.0.5"), Some("1.2.3.4")),
            ip("1.2.3.4")
        );
        assert_eq!(
            trusting.client_ip(ip("10.0.0.5"), Some("6.6.6.6, 1.2.3.4, 10.0.0.9")),
            ip("1.2.3.4")
        );
        assert_eq!(trusting.client_ip(ip("10.0.0.5"), None), ip("10.0.0.5"));
        assert_eq!(
            trusting.client_ip(ip("10.0.0.5"), Some("garbage")),
            ip("10.0.0.5")
        );
        assert_eq!(
            trusting.client_ip(ip("192.168.1.1"), Some("1.2.3.4")),
            ip("192.168.1.1")
        );
    }

    #[test]
    fn inbox_keys_are_checked_with_their_route() {
        let config: InboundConfig = toml::from_str(
            r#"
            [[routes]]
            path = "/a"
            provider = "hmac"
            secrets = ["s"]
            header = "x-sig"
            mode = "inbox"
            [[routes]]
            path = "/b"
            provider = "stripe"
            secrets = ["s"]
            consume = "sql"
            [[routes]]
            path = "/c"
            name = "a b"
            provider = "stripe"
            secrets = ["s"]
            mode = "mailbox"
            [[routes]]
            path = "/d"
            name = "/a"
            provider = "stripe"
            secrets = ["s"]
            mode = "inbox"
            consume = "later"
            dedupe = "body"
            respond_with = { status = 302 }
            "#,
        )
        .unwrap();
        let text = validate(&config).join("\n");
        for want in [
            "inbound.routes[0].dedupe: required for an hmac route in inbox mode",
            "inbound.routes[1].consume: only used with mode = \"inbox\"",
            "inbound.routes[2].name: \"a b\" must be",
            "inbound.routes[2].mode: \"mailbox\" must be",
            "inbound.routes[3].name: \"/a\" is also the name of inbound.routes[0]",
            "inbound.routes[3].consume: \"later\" must be",
            "inbound.routes[3].dedupe: \"body\" must be header:NAME or json:/pointer",
            "inbound.routes[3].respond_with.status: 302 must be 2xx",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn a_timestamp_the_signature_does_not_cover_and_a_body_a_status_forbids_are_refused() {
        let config: InboundConfig = toml::from_str(
            r#"
            [[routes]]
            path = "/a"
            provider = "hmac"
            secrets = ["s"]
            header = "x-sig"
            timestamp_header = "x-ts"
            signed_template = "{body}"
            [[routes]]
            path = "/b"
            provider = "stripe"
            secrets = ["s"]
            mode = "inbox"
            respond_with = { status = 204, body = "ok" }
            [[routes]]
            path = "/c"
            provider = "hmac"
            secrets = ["s"]
            header = "x-sig"
            timestamp_header = "x-ts"
            "#,
        )
        .unwrap();
        let text = validate(&config).join("\n");
        for want in [
            "inbound.routes[0].signed_template: must include {timestamp} when timestamp_header is set",
            "inbound.routes[1].respond_with.body: must be empty with status 204",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("routes[2]"), "{text}");
    }

    #[test]
    fn config_problems_name_their_keys() {
        let config: InboundConfig = toml::from_str(
            r#"
            listen = "nowhere"
            upstream = "https://127.0.0.1:8080"
            [[routes]]
            path = "/a"
            provider = "stripe"
            secrets = ["s"]
            allow_ips = ["10.0.0.0/8"]
            [[routes]]
            path = "/a"
            provider = "square"
            secrets = [""]
            [[routes]]
            path = "b"
            provider = "carrier-pigeon"
            secrets = ["s"]
            "#,
        )
        .unwrap();
        let text = validate(&config).join("\n");
        for want in [
            "inbound.listen:",
            "inbound.upstream:",
            "inbound.routes[1].path: \"/a\" is also inbound.routes[0].path",
            "inbound.routes[1].secrets[0]: is empty",
            "inbound.routes[2].path:",
            "inbound.routes[2].provider: unknown provider \"carrier-pigeon\"",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
