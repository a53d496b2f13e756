//! Provider verifiers, one file each. Invariant: a verifier sees the exact raw body bytes and the
//! headers, compares in constant time, accepts when any listed signature of its expected scheme
//! matches any configured secret (rotation), never counts an unknown scheme, and never panics on
//! arbitrary input.

mod github;
mod gitlab;
mod hmac;
mod paddle;
mod shopify;
mod slack;
mod square;
mod standard;
mod stripe;
mod twilio;

use http::HeaderMap;

use crate::config::RouteConfig;
pub use crate::signing::VerifyError;

/// What a verifier gets to see of a request.
pub struct Incoming<'a> {
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// Unix seconds, now.
    pub now: i64,
}

impl Incoming<'_> {
    /// A header as text; a present but non-UTF-8 value counts as malformed, not missing, and so
    /// does a header sent more than once: a verifier must never check one value while the app
    /// receives another beside it.
    pub fn header(&self, name: &str) -> Result<Option<&str>, VerifyError> {
        let mut values = self.headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(VerifyError::MalformedHeader),
            (Some(v), None) => v
                .to_str()
                .map(Some)
                .map_err(|_| VerifyError::MalformedHeader),
        }
    }

    pub fn required(&self, name: &str) -> Result<&str, VerifyError> {
        self.header(name)?.ok_or(VerifyError::MissingHeader)
    }
}

/// A provider's check of one request. Every verifier decides the errors its headers alone cause
/// (missing, malformed, a timestamp outside the tolerance) before it looks at the body, and
/// answers `SignatureMismatch` for everything the body or query decides: so `refuses_head` can
/// refuse a request on its head, before its body is read or buffered.
pub trait Verifier: Send + Sync {
    fn verify(&self, request: &Incoming<'_>) -> Result<(), VerifyError>;

    /// Nothing but the head is checked (a token compared, no body signed): a mismatch on the head
    /// is final too.
    fn head_decides(&self) -> bool {
        false
    }
}

/// The refusal a request's head alone earns, if any: the verifier run over an empty body, its
/// header errors kept (the same the whole request would get) and a mismatch ignored (the body
/// decides that).
pub fn refuses_head(
    verifier: &dyn Verifier,
    headers: &HeaderMap,
    query: Option<&str>,
    now: i64,
) -> Option<VerifyError> {
    let head = Incoming {
        headers,
        body: &[],
        query,
        now,
    };
    match verifier.verify(&head) {
        Err(
            e @ (VerifyError::MissingHeader
            | VerifyError::MalformedHeader
            | VerifyError::TimestampOutOfTolerance),
        ) => Some(e),
        Err(e @ VerifyError::SignatureMismatch) if verifier.head_decides() => Some(e),
        _ => None,
    }
}

/// Every provider name `provider = "..."` accepts.
pub const PROVIDERS: &[&str] = &[
    "standard-webhooks",
    "stripe",
    "github",
    "slack",
    "shopify",
    "paddle",
    "square",
    "twilio",
    "gitlab",
    "hmac",
];

/// Builds a route's verifier, or says (as `key: message` relative to the route) what is wrong.
pub fn build(route: &RouteConfig) -> Result<Box<dyn Verifier>, Vec<String>> {
    let secrets: Vec<&str> = route.secrets.iter().map(|s| s.expose()).collect();
    let mut problems = Vec::new();
    if secrets.is_empty() {
        problems.push("secrets: at least one secret is required".to_string());
    }
    if let Some(i) = secrets.iter().position(|s| s.trim().is_empty()) {
        problems.push(format!("secrets[{i}]: is empty or blank"));
    }
    // Whole seconds: the providers' timestamps are seconds. The config's durations stop at
    // 3650d, so the cast cannot wrap.
    if route
        .tolerance
        .is_some_and(|d| d.0 < std::time::Duration::from_secs(1))
    {
        problems.push("tolerance: at least 1s (timestamps are whole seconds)".into());
    }
    let timestamped = match route.provider.as_str() {
        "standard-webhooks" | "stripe" | "slack" | "paddle" => true,
        "hmac" => route.timestamp_header.is_some(),
        _ => false,
    };
    if route.tolerance.is_some() && !timestamped && PROVIDERS.contains(&route.provider.as_str()) {
        problems.push(format!(
            "tolerance: provider {:?} sends no timestamp{}, so there is nothing to check it against",
            route.provider,
            if route.provider == "hmac" { " unless timestamp_header is set" } else { "" }
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let tolerance = route.tolerance.map(|d| d.0.as_secs() as i64);
    let verifier: Result<Box<dyn Verifier>, Vec<String>> = match route.provider.as_str() {
        "standard-webhooks" => standard::StandardWebhooks::new(&secrets, tolerance).map(boxed),
        "stripe" => Ok(boxed(stripe::Stripe::new(&secrets, tolerance))),
        "github" => Ok(boxed(github::GitHub::new(&secrets))),
        "slack" => Ok(boxed(slack::Slack::new(&secrets, tolerance))),
        "shopify" => Ok(boxed(shopify::Shopify::new(&secrets))),
        "paddle" => Ok(boxed(paddle::Paddle::new(&secrets, tolerance))),
        "square" => square::Square::new(&secrets, route.notification_url.as_deref()).map(boxed),
        "twilio" => twilio::Twilio::new(&secrets, route.public_url.as_deref()).map(boxed),
        "gitlab" => Ok(boxed(gitlab::GitLab::new(&secrets))),
        "hmac" => hmac::GenericHmac::new(&secrets, route).map(boxed),
        other => Err(vec![format!(
            "provider: unknown provider {other:?}; expected one of {}",
            PROVIDERS.join(", ")
        )]),
    };
    let provider_keys: &[(&str, bool)] = &[
        ("notification_url", route.notification_url.is_some()),
        ("public_url", route.public_url.is_some()),
        ("header", route.header.is_some()),
        ("algorithm", route.algorithm.is_some()),
        ("encoding", route.encoding.is_some()),
        ("prefix", route.prefix.is_some()),
        ("timestamp_header", route.timestamp_header.is_some()),
        ("signed_template", route.signed_template.is_some()),
    ];
    let owner = |key: &str| match key {
        "notification_url" => "square",
        "public_url" => "twilio",
        _ => "hmac",
    };
    let stray: Vec<String> = provider_keys
        .iter()
        .filter(|(key, set)| *set && owner(key) != route.provider)
        .map(|(key, _)| format!("{key}: only used by provider {:?}", owner(key)))
        .collect();
    match verifier {
        Ok(v) if stray.is_empty() => Ok(v),
        Ok(_) => Err(stray),
        Err(mut e) => {
            e.extend(stray);
            Err(e)
        }
    }
}

fn boxed<V: Verifier + 'static>(v: V) -> Box<dyn Verifier> {
    Box::new(v)
}

/// How a provider bounds a signed timestamp.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Window {
    /// |now - ts| <= tolerance.
    Symmetric(i64),
    /// now - ts <= tolerance; future timestamps pass.
    PastOnly(i64),
}

impl Window {
    pub(crate) fn check(self, ts: i64, now: i64) -> Result<(), VerifyError> {
        let ok = match self {
            Window::Symmetric(t) => (now - ts).abs() <= t,
            Window::PastOnly(t) => now - ts <= t,
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::TimestampOutOfTolerance)
        }
    }
}

pub(crate) fn parse_timestamp(text: &str) -> Result<i64, VerifyError> {
    let t = text.trim();
    if t.is_empty() || t.len() > 12 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::MalformedHeader);
    }
    t.parse().map_err(|_| VerifyError::MalformedHeader)
}

/// Accepts when any candidate equals any expected MAC; `candidates` empty means the header had
/// no signature of the expected scheme.
pub(crate) fn any_match(expected: &[Vec<u8>], candidates: &[Vec<u8>]) -> Result<(), VerifyError> {
    if candidates.is_empty() {
        return Err(VerifyError::MalformedHeader);
    }
    // Every comparison runs, so timing does not reveal which secret or entry matched.
    let mut matched = false;
    for c in candidates {
        for e in expected {
            matched |= crate::signing::constant_time_eq(e, c);
        }
    }
    if matched {
        Ok(())
    } else {
        Err(VerifyError::SignatureMismatch)
    }
}

/// Secrets used as raw key bytes (every scheme but Standard Webhooks).
pub(crate) fn key_bytes(secrets: &[&str]) -> Vec<Vec<u8>> {
    secrets.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// HMAC-SHA256 of the concatenated `parts` under each key: the candidates a signature may match.
pub(crate) fn hmac_sha256_each(keys: &[Vec<u8>], parts: &[&[u8]]) -> Vec<Vec<u8>> {
    keys.iter()
        .map(|k| crate::signing::hmac_sha256(k, parts).to_vec())
        .collect()
}

pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s.trim()).ok()
}

pub(crate) fn decode_b64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

#[cfg(test)]
pub(crate) mod vectors {
    use serde_json::Value;

    pub fn all(scheme: &str) -> Vec<Value> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/official-signatures.json"
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let found: Vec<Value> = v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["scheme"] == scheme)
            .cloned()
            .collect();
        assert!(!found.is_empty(), "no {scheme} vectors");
        found
    }

    pub fn body(v: &Value) -> Vec<u8> {
        hex::decode(v["body_hex"].as_str().unwrap()).unwrap()
    }

    pub fn headers(v: &Value) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, val) in v["headers"].as_object().unwrap() {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                val.as_str().unwrap().parse().unwrap(),
            );
        }
        h
    }

    pub fn route(provider: &str, secrets: &[&str]) -> crate::config::RouteConfig {
        let secrets: Vec<String> = secrets.iter().map(|s| format!("{s:?}")).collect();
        toml::from_str(&format!(
            "path = \"/p\"\nprovider = \"{provider}\"\nsecrets = [{}]\n",
            secrets.join(", ")
        ))
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(provider: &str, extra: &str) -> RouteConfig {
        toml::from_str(&format!(
            "path = \"/p\"\nprovider = \"{provider}\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n{extra}"
        ))
        .unwrap()
    }

    fn all_verifiers() -> Vec<Box<dyn Verifier>> {
        [
            ("standard-webhooks", ""),
            ("stripe", ""),
            ("github", ""),
            ("slack", ""),
            ("shopify", ""),
            ("paddle", ""),
            ("square", "notification_url = \"https://example.com/sq\""),
            ("twilio", "public_url = \"https://example.com/tw\""),
            ("gitlab", ""),
            ("hmac", "header = \"x-sig\"\ntimestamp_header = \"x-ts\"\nsigned_template = \"{timestamp}.{body}\""),
        ]
        .iter()
        .map(|(p, extra)| build(&route(p, extra)).unwrap_or_else(|e| panic!("{p}: {e:?}")))
        .collect()
    }

    const NAMES: &[&str] = &[
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "svix-id",
        "svix-timestamp",
        "svix-signature",
        "stripe-signature",
        "x-hub-signature-256",
        "x-slack-signature",
        "x-slack-request-timestamp",
        "x-shopify-hmac-sha256",
        "paddle-signature",
        "x-square-hmacsha256-signature",
        "x-twilio-signature",
        "content-type",
        "x-gitlab-token",
        "x-sig",
        "x-ts",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn header_parsing_never_panics(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), NAMES.len()),
            printable in proptest::collection::vec("[ -~]{0,80}", NAMES.len()),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            query in proptest::option::of("[ -~]{0,40}"),
            now in any::<i64>(),
        ) {
            let verifiers = all_verifiers();
            for use_printable in [false, true] {
                let mut h = HeaderMap::new();
                for (i, name) in NAMES.iter().enumerate() {
                    let raw: &[u8] = if use_printable { printable[i].as_bytes() } else { &values[i] };
                    if let Ok(v) = http::HeaderValue::from_bytes(raw) {
                        h.insert(*name, v);
                    }
                }
                let req = Incoming { headers: &h, body: &body, query: query.as_deref(), now };
                for v in &verifiers {
                    let whole = v.verify(&req);
                    prop_assert!(whole.is_err());
                    // What the head alone refuses, the whole request is refused for too.
                    if let Some(e) = refuses_head(v.as_ref(), &h, query.as_deref(), now) {
                        prop_assert_eq!(whole, Err(e));
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_providers_and_stray_keys_are_named() {
        let e = build(&route("nope", "")).err().unwrap();
        assert!(
            e[0].starts_with("provider: unknown provider \"nope\""),
            "{e:?}"
        );
        let e = build(&route("github", "notification_url = \"https://x\""))
            .err()
            .unwrap();
        assert_eq!(
            e,
            vec!["notification_url: only used by provider \"square\"".to_string()]
        );
        let mut r = route("github", "");
        r.secrets.clear();
        assert!(build(&r).err().unwrap()[0].starts_with("secrets:"));
    }

    #[test]
    fn windows() {
        assert!(Window::Symmetric(300).check(1000, 1300).is_ok());
        assert!(Window::Symmetric(300).check(1000, 1301).is_err());
        assert!(Window::Symmetric(300).check(1301, 1000).is_err());
        assert!(Window::PastOnly(300).check(5000, 1000).is_ok());
        assert!(Window::PastOnly(300).check(1000, 1301).is_err());
    }
}
