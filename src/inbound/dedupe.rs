//! Dedupe keys for inbox routes: the id each provider gives a delivery (or event), so a provider's
//! retry of a stored request is recognised and stored once. Invariant: a key is always storable
//! text (UTF-8, no control characters, at most [`MAX_KEY`] bytes; anything else is replaced by its
//! hash) and never empty: a request without the provider's id is keyed by the hash of its query
//! and body. An id only a signature covers is the key alone; an id anyone replaying a captured
//! request could change (a header the provider does not sign) is keyed with the body's hash, so a
//! replay can never take the key a later real event will come with.

use sha2::{Digest, Sha256};

use super::providers::Incoming;

/// Longer ids are stored as their hash.
const MAX_KEY: usize = 200;

/// Where a key is found, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A header the provider's signature does not cover.
    Header(String),
    /// A header the provider's signature covers (Standard Webhooks signs its `webhook-id`).
    SignedHeader(String),
    /// An RFC 6901 pointer into a JSON body; strings and numbers count.
    Json(String),
    /// A field of an `application/x-www-form-urlencoded` body.
    Form(String),
}

/// Each provider's own id, from its documentation:
/// - Standard Webhooks: `webhook-id`, "the same no matter how many times a webhook that has failed
///   is retried" (github.com/standard-webhooks/standard-webhooks, spec); Svix sends it as `svix-id`.
/// - Stripe: the event's `id`; a retry is the same event with a new signature
///   (docs.stripe.com/webhooks, "Handle duplicate events").
/// - GitHub: `X-GitHub-Delivery`, kept by a redelivery (docs.github.com/en/webhooks/using-webhooks/
///   best-practices-for-using-webhooks, "Use the X-GitHub-Delivery header").
/// - Shopify: `X-Shopify-Webhook-Id`, one per delivery (shopify.dev/docs/apps/build/webhooks/
///   verify-deliveries, "Ignoring duplicates"); older pages name `X-Shopify-Event-Id`, the fallback.
/// - Slack: the Events API wrapper's `event_id` (api.slack.com/types/event); slash commands and
///   interactions carry no documented id and are not retried by Slack: their `trigger_id` (one per
///   invocation) or, failing that, the body's hash.
/// - Paddle: `notification_id`, one per notification to this destination (developer.paddle.com/
///   api-reference/notifications); `event_id` if it is missing. A replay made in Paddle's dashboard
///   is a new notification and is stored again, as the operator asked.
/// - Square: `event_id`, "use this value to bypass processing if it's a repeated value"
///   (developer.squareup.com/docs/webhooks/what-it-does).
/// - Twilio: `I-Twilio-Idempotency-Token` (sent on Twilio's retries; not in the reference pages
///   we could find), else the body's hash (Twilio signs URL and form, so equal bodies are one).
/// - GitLab: `Idempotency-Key`, "consistent across webhook retries" (docs.gitlab.com/user/project/
///   integrations/webhooks, "Delivery headers"); `X-Gitlab-Event-UUID` before GitLab sent it.
/// - hmac: none; the route names one with `dedupe`.
pub fn provider_sources(provider: &str) -> Vec<Source> {
    let h = |n: &str| Source::Header(n.to_string());
    let j = |p: &str| Source::Json(p.to_string());
    match provider {
        "standard-webhooks" => vec![
            Source::SignedHeader("webhook-id".into()),
            Source::SignedHeader("svix-id".into()),
        ],
        "stripe" => vec![j("/id")],
        "github" => vec![h("x-github-delivery")],
        "shopify" => vec![h("x-shopify-webhook-id"), h("x-shopify-event-id")],
        "slack" => vec![j("/event_id"), Source::Form("trigger_id".into())],
        "paddle" => vec![j("/notification_id"), j("/event_id")],
        "square" => vec![j("/event_id")],
        "twilio" => vec![h("i-twilio-idempotency-token")],
        "gitlab" => vec![h("idempotency-key"), h("x-gitlab-event-uuid")],
        _ => Vec::new(),
    }
}

/// A route's `dedupe` value: `header:NAME` or `json:/pointer`.
pub fn parse(spec: &str) -> Result<Source, String> {
    if let Some(name) = spec.strip_prefix("header:") {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("{name:?} is not a header name"));
        }
        return Ok(Source::Header(name.to_ascii_lowercase()));
    }
    if let Some(pointer) = spec.strip_prefix("json:") {
        if !pointer.starts_with('/') {
            return Err(format!(
                "{pointer:?} is not a JSON pointer (it starts with /)"
            ));
        }
        return Ok(Source::Json(pointer.to_string()));
    }
    Err(format!("{spec:?} must be header:NAME or json:/pointer"))
}

/// The request's dedupe key: the first source that yields one, else the hash of the query and
/// body.
pub fn key(sources: &[Source], request: &Incoming<'_>) -> String {
    let header = |name: &str| {
        (request.headers.get(name)).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut json: Option<Option<serde_json::Value>> = None;
    for source in sources {
        let found = match source {
            Source::SignedHeader(name) => header(name),
            Source::Header(name) => header(name)
                .filter(|id| !id.trim().is_empty())
                .map(|id| format!("{id}#{}", content_hash(request))),
            Source::Json(pointer) => json
                .get_or_insert_with(|| serde_json::from_slice(request.body).ok())
                .as_ref()
                .and_then(|v| v.pointer(pointer))
                .and_then(|v| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }),
            Source::Form(field) => form_field(request.body, field),
        };
        if let Some(k) = found.filter(|k| !k.trim().is_empty()) {
            return storable(k);
        }
    }
    content_hash(request)
}

/// The hash of what a provider may sign besides headers: `sha256:` of the body alone when there
/// is no query (what it has always been), `sha256q:` of the query, a line break and the body when
/// there is one. The prefixes keep the two apart: a body may hold a line break, so a request with
/// query `x` and body `Y` and one with no query and body `x\nY` hash the same bytes. Two requests
/// with queries cannot run into each other (a request target holds no raw line break).
fn content_hash(request: &Incoming<'_>) -> String {
    let mut digest = Sha256::new();
    let prefix = match request.query.filter(|q| !q.is_empty()) {
        Some(query) => {
            digest.update(query.as_bytes());
            digest.update(b"\n");
            "sha256q"
        }
        None => "sha256",
    };
    digest.update(request.body);
    format!("{prefix}:{}", hex::encode(digest.finalize()))
}

fn form_field(body: &[u8], field: &str) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == field)
        .map(|(_, v)| v.into_owned())
}

/// Keys that could not be stored or indexed as they are become their hash.
fn storable(key: String) -> String {
    if key.len() <= MAX_KEY && !key.chars().any(char::is_control) {
        key
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn incoming<'a>(headers: &'a HeaderMap, body: &'a [u8]) -> Incoming<'a> {
        Incoming {
            headers,
            body,
            query: None,
            now: 0,
        }
    }

    #[test]
    fn each_provider_finds_its_own_id() {
        let mut h = HeaderMap::new();
        h.insert("x-github-delivery", "72d3162e".parse().unwrap());
        h.insert("webhook-id", "msg_1".parse().unwrap());
        h.insert("idempotency-key", "gl-1".parse().unwrap());
        let body = br#"{"id":"evt_1","event_id":"ev-2","notification_id":"ntf_3"}"#;
        let r = incoming(&h, body);
        let k = |p: &str| key(&provider_sources(p), &r);
        let body_hash = hex::encode(Sha256::digest(body));
        assert_eq!(k("github"), format!("72d3162e#sha256:{body_hash}"));
        assert_eq!(k("standard-webhooks"), "msg_1");
        assert_eq!(k("gitlab"), format!("gl-1#sha256:{body_hash}"));
        assert_eq!(k("stripe"), "evt_1");
        assert_eq!(k("slack"), "ev-2");
        assert_eq!(k("square"), "ev-2");
        assert_eq!(k("paddle"), "ntf_3");
        let form = HeaderMap::new();
        let r = incoming(&form, b"command=%2Fdeploy&trigger_id=13345224609.738474920");
        assert_eq!(key(&provider_sources("slack"), &r), "13345224609.738474920");
    }

    #[test]
    fn without_an_id_the_body_hash_is_the_key_and_hostile_ids_are_hashed() {
        let h = HeaderMap::new();
        let a = key(&provider_sources("stripe"), &incoming(&h, b"not json"));
        let b = key(&provider_sources("stripe"), &incoming(&h, b"not json!"));
        assert!(a.starts_with("sha256:") && a.len() == 71, "{a}");
        assert_ne!(a, b);
        let nul = key(
            &[Source::Json("/id".into())],
            &incoming(&h, br#"{"id":"a\u0000b"}"#),
        );
        assert!(nul.starts_with("sha256:"), "{nul}");
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(500));
        let long = key(
            &[Source::Json("/id".into())],
            &incoming(&h, long.as_bytes()),
        );
        assert!(long.starts_with("sha256:"), "{long}");
        let empty = key(
            &[Source::Json("/id".into())],
            &incoming(&h, br#"{"id":" "}"#),
        );
        assert!(empty.starts_with("sha256:"), "{empty}");
    }

    /// An id in a header the provider's signature does not cover can be set by whoever replays
    /// a captured request: alone it would let a replay take a future event's id, and the real
    /// event would be answered "duplicate" and never stored. With the body's hash beside it, a
    /// provider's retry (same id, same body) is still one key, and a replay under another id
    /// takes only a key of its own.
    #[test]
    fn an_unsigned_header_id_cannot_take_another_events_key() {
        let (mut real, mut replay) = (HeaderMap::new(), HeaderMap::new());
        real.insert("x-github-delivery", "d-1001".parse().unwrap());
        replay.insert("x-github-delivery", "d-1001".parse().unwrap());
        let github = provider_sources("github");
        let captured = key(&github, &incoming(&replay, br#"{"action":"old"}"#));
        let genuine = key(&github, &incoming(&real, br#"{"action":"new"}"#));
        assert_ne!(captured, genuine);
        let retry = key(&github, &incoming(&real, br#"{"action":"new"}"#));
        assert_eq!(retry, genuine, "a provider's retry is one key");
        // The same for a route's own header, and for every unsigned provider header.
        let mut h = HeaderMap::new();
        h.insert("x-event-id", "evt_1".parse().unwrap());
        let own = [parse("header:X-Event-Id").unwrap()];
        assert_ne!(
            key(&own, &incoming(&h, b"a")),
            key(&own, &incoming(&h, b"b"))
        );
        // Standard Webhooks signs its id: the id alone is the key.
        h.insert("webhook-id", "msg_1".parse().unwrap());
        assert_eq!(
            key(&provider_sources("standard-webhooks"), &incoming(&h, b"a")),
            "msg_1"
        );
    }

    /// Without an id, requests that differ only in their query (Twilio signs the URL, query
    /// included, and may send a GET with no body) are different requests.
    #[test]
    fn the_body_hash_key_covers_the_query() {
        let h = HeaderMap::new();
        let with = |query| Incoming {
            headers: &h,
            body: b"",
            query,
            now: 0,
        };
        let twilio = provider_sources("twilio");
        // With Twilio's (unsigned) token too: a GET replayed under a chosen token is not the
        // real request that comes with it.
        let mut tokened = HeaderMap::new();
        tokened.insert("i-twilio-idempotency-token", "tok-9".parse().unwrap());
        let get = |query| Incoming {
            headers: &tokened,
            body: b"",
            query,
            now: 0,
        };
        assert_ne!(
            key(&twilio, &get(Some("CallSid=CA1"))),
            key(&twilio, &get(Some("CallSid=CA2")))
        );
        let a = key(&twilio, &with(Some("CallSid=CA1&CallStatus=ringing")));
        let b = key(&twilio, &with(Some("CallSid=CA2&CallStatus=completed")));
        assert_ne!(a, b);
        assert_eq!(
            a,
            key(&twilio, &with(Some("CallSid=CA1&CallStatus=ringing")))
        );
        // A request with a query and one without it whose body begins with that query and a line
        // break are different requests: a replay with a chosen query must not take the key of a
        // later real event and have it answered as a duplicate, never stored.
        let replay = Incoming {
            headers: &h,
            body: b"Y",
            query: Some("x"),
            now: 0,
        };
        let real = Incoming {
            headers: &h,
            body: b"x\nY",
            query: None,
            now: 0,
        };
        assert_ne!(key(&twilio, &replay), key(&twilio, &real));
        assert!(key(&twilio, &real).starts_with("sha256:"));
        assert!(a.starts_with("sha256q:") && a.len() == 72, "{a}");
    }

    #[test]
    fn route_specs_parse_or_say_why_not() {
        assert_eq!(
            parse("header:X-Event-Id"),
            Ok(Source::Header("x-event-id".into()))
        );
        assert_eq!(parse("json:/data/id"), Ok(Source::Json("/data/id".into())));
        assert!(parse("json:data.id").unwrap_err().contains("JSON pointer"));
        assert!(parse("header:bad name").is_err());
        assert!(parse("body").unwrap_err().contains("header:NAME"));
    }
}
