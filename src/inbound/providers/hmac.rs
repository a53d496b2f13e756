//! A generic HMAC scheme for providers without a verifier of their own: route keys `header`,
//! `algorithm` (sha256 / sha1 / sha512), `encoding` (hex / base64), `prefix` (e.g. `sha256=`), and
//! optionally `timestamp_header` with `signed_template` (e.g. `"{timestamp}.{body}"`), which then
//! bounds the timestamp by `tolerance` (default 5 minutes either way).

use super::{Incoming, Verifier, VerifyError, Window};
use crate::config::RouteConfig;
use crate::signing::{self, HmacAlgorithm};

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Timestamp,
    Body,
}

pub struct GenericHmac {
    secrets: Vec<Vec<u8>>,
    header: String,
    algorithm: HmacAlgorithm,
    base64: bool,
    prefix: String,
    timestamp_header: Option<String>,
    template: Vec<Piece>,
    tolerance: i64,
}

fn parse_template(t: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_string()));
        }
        let close = rest[open..].find('}').ok_or("unclosed `{`")? + open;
        pieces.push(match &rest[open + 1..close] {
            "timestamp" => Piece::Timestamp,
            "body" => Piece::Body,
            other => {
                return Err(format!(
                    "unknown placeholder {{{other}}}; use {{timestamp}} and {{body}}"
                ))
            }
        });
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    if !pieces.contains(&Piece::Body) {
        return Err("must include {body}".into());
    }
    Ok(pieces)
}

impl GenericHmac {
    pub fn new(secrets: &[&str], route: &RouteConfig) -> Result<Self, Vec<String>> {
        let mut p = Vec::new();
        let header = match route.header.as_deref() {
            Some(h) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => h.to_ascii_lowercase(),
            Some(h) => {
                p.push(format!("header: {h:?} is not a valid header name"));
                String::new()
            }
            None => {
                p.push("header: required for provider \"hmac\"".into());
                String::new()
            }
        };
        let algorithm = match route.algorithm.as_deref().unwrap_or("sha256") {
            "sha256" => HmacAlgorithm::Sha256,
            "sha1" => HmacAlgorithm::Sha1,
            "sha512" => HmacAlgorithm::Sha512,
            other => {
                p.push(format!(
                    "algorithm: {other:?} must be sha256, sha1 or sha512"
                ));
                HmacAlgorithm::Sha256
            }
        };
        let base64 = match route.encoding.as_deref().unwrap_or("hex") {
            "hex" => false,
            "base64" => true,
            other => {
                p.push(format!("encoding: {other:?} must be hex or base64"));
                false
            }
        };
        let default_template = if route.timestamp_header.is_some() {
            "{timestamp}.{body}"
        } else {
            "{body}"
        };
        let template =
            match parse_template(route.signed_template.as_deref().unwrap_or(default_template)) {
                Ok(t) => t,
                Err(e) => {
                    p.push(format!("signed_template: {e}"));
                    Vec::new()
                }
            };
        if template.contains(&Piece::Timestamp) && route.timestamp_header.is_none() {
            p.push("timestamp_header: required when signed_template uses {timestamp}".into());
        }
        // The tolerance would be checked on a header the signature does not cover: anyone
        // replaying a captured request sets it to now.
        if route.timestamp_header.is_some()
            && !template.is_empty()
            && !template.contains(&Piece::Timestamp)
        {
            p.push("signed_template: must include {timestamp} when timestamp_header is set (else the timestamp is not signed and a replay passes the tolerance)".into());
        }
        if !p.is_empty() {
            return Err(p);
        }
        Ok(Self {
            secrets: super::key_bytes(secrets),
            header,
            algorithm,
            base64,
            prefix: route.prefix.clone().unwrap_or_default(),
            timestamp_header: route
                .timestamp_header
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
            template,
            tolerance: route.tolerance.map_or(300, |d| d.0.as_secs() as i64),
        })
    }
}

impl Verifier for GenericHmac {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let value = r.required(&self.header)?;
        let encoded = value
            .strip_prefix(self.prefix.as_str())
            .ok_or(VerifyError::MalformedHeader)?;
        let sig = if self.base64 {
            super::decode_b64(encoded)
        } else {
            super::decode_hex(encoded)
        }
        .ok_or(VerifyError::MalformedHeader)?;
        let timestamp = match &self.timestamp_header {
            Some(h) => {
                let ts = super::parse_timestamp(r.required(h)?)?;
                Window::Symmetric(self.tolerance).check(ts, r.now)?;
                ts.to_string()
            }
            None => String::new(),
        };
        let parts: Vec<&[u8]> = self
            .template
            .iter()
            .map(|piece| match piece {
                Piece::Text(t) => t.as_bytes(),
                Piece::Timestamp => timestamp.as_bytes(),
                Piece::Body => r.body,
            })
            .collect();
        let expected: Vec<Vec<u8>> = self
            .secrets
            .iter()
            .map(|k| signing::hmac_with(self.algorithm, k, &parts))
            .collect();
        super::any_match(&expected, &[sig])
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

    fn route(extra: &str) -> RouteConfig {
        let mut r = vectors::route("hmac", &["It's a Secret to Everybody"]);
        let extra: RouteConfig =
            toml::from_str(&format!("path = \"/p\"\nprovider = \"hmac\"\n{extra}")).unwrap();
        r.header = extra.header;
        r.algorithm = extra.algorithm;
        r.encoding = extra.encoding;
        r.prefix = extra.prefix;
        r.timestamp_header = extra.timestamp_header;
        r.signed_template = extra.signed_template;
        r
    }

    #[test]
    fn reproduces_the_github_vector_when_configured_like_github() {
        let v = &vectors::all("github")[0];
        let headers = vectors::headers(v);
        let body = vectors::body(v);
        let h = GenericHmac::new(
            &[v["secret"].as_str().unwrap()],
            &route("header = \"X-Hub-Signature-256\"\nprefix = \"sha256=\""),
        )
        .unwrap();
        assert_eq!(
            h.verify(&Incoming {
                headers: &headers,
                body: &body,
                query: None,
                now: 0
            }),
            Ok(())
        );
        assert_eq!(
            h.verify(&Incoming {
                headers: &headers,
                body: b"other",
                query: None,
                now: 0
            }),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn reproduces_the_slack_vector_with_a_template() {
        let v = &vectors::all("slack")[0];
        let headers = vectors::headers(v);
        let body = vectors::body(v);
        let at = v["valid_at_unix"].as_i64().unwrap();
        let mut r = route(
            "header = \"x-slack-signature\"\nprefix = \"v0=\"\ntimestamp_header = \"x-slack-request-timestamp\"\nsigned_template = \"v0:{timestamp}:{body}\"",
        );
        r.secrets = vec![crate::config::Secret::new(v["secret"].as_str().unwrap())];
        let h = GenericHmac::new(&[v["secret"].as_str().unwrap()], &r).unwrap();
        assert_eq!(
            h.verify(&Incoming {
                headers: &headers,
                body: &body,
                query: None,
                now: at
            }),
            Ok(())
        );
        assert_eq!(
            h.verify(&Incoming {
                headers: &headers,
                body: &body,
                query: None,
                now: at + 400
            }),
            Err(VerifyError::TimestampOutOfTolerance)
        );
    }

    #[test]
    fn bad_keys_are_named() {
        let e = GenericHmac::new(
            &["k"],
            &route("algorithm = \"md5\"\nencoding = \"b32\"\nsigned_template = \"{ts}\""),
        )
        .err()
        .unwrap();
        let text = e.join("\n");
        assert!(text.contains("header: required"), "{text}");
        assert!(text.contains("algorithm:"), "{text}");
        assert!(text.contains("encoding:"), "{text}");
        assert!(
            text.contains("signed_template: unknown placeholder {ts}"),
            "{text}"
        );
    }
}
