//! Twilio: `X-Twilio-Signature`, base64 HMAC-SHA1 of the URL Twilio requested followed by the
//! form parameters sorted by name (`name` + `value` each), or of that URL alone when it carries
//! `bodySHA256` (JSON bodies), whose value must then be the hex SHA-256 of the body. Route key
//! `public_url` is that URL without its query; the query received is appended to it.
//! A `X-Twilio-Webhooks-Signature-Settings` header naming `HMAC_SHA256` switches the hash (a
//! Webhooks Rule's SharedKey signs; list it in `secrets`); the URL is tried with and without its
//! default port, and repeated parameters count each distinct value once, as Twilio's libraries do.
//! Invariant: every body byte let through is covered: a form body is part of the signed string,
//! any other body needs `bodySHA256`; a signature over the URL alone passes only an empty body; a
//! form parameter with no name (Twilio sends none) is refused, as its value would read as the URL's.

use sha2::{Digest, Sha256};

use super::{Incoming, Verifier, VerifyError};
use crate::signing::{self, HmacAlgorithm};

pub struct Twilio {
    secrets: Vec<Vec<u8>>,
    public_url: String,
}

impl Twilio {
    pub fn new(secrets: &[&str], public_url: Option<&str>) -> Result<Self, Vec<String>> {
        match public_url {
            Some(url) if url.contains('?') => Err(vec!["public_url: must not carry a query (the received one is appended)".into()]),
            Some(url) if !url.is_empty() => Ok(Self {
                secrets: super::key_bytes(secrets),
                public_url: url.to_string(),
            }),
            _ => Err(vec!["public_url: required for provider \"twilio\" (the URL Twilio requests, without its query)".into()]),
        }
    }
}

impl Twilio {
    /// The URL Twilio requested, as configured and with the default port added or removed:
    /// Twilio signs whichever form it used, and its own libraries try both.
    fn url_variants(&self, query: &str) -> Vec<String> {
        let with_query = |base: &str| {
            if query.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{query}")
            }
        };
        let mut urls = vec![with_query(&self.public_url)];
        if let Some(other) = other_port_form(&self.public_url) {
            urls.push(with_query(&other));
        }
        urls
    }
}

/// `https://h/p` <-> `https://h:443/p` (and `:80` for http); `None` for another port or scheme.
fn other_port_form(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    // A port is what follows the last ':' outside an IPv6 literal's brackets.
    let port_at = authority
        .rfind(':')
        .filter(|i| !authority[*i..].contains(']'));
    let host = match port_at {
        Some(i) if &authority[i..] == default => &authority[..i],
        Some(_) => return None,
        None => return Some(format!("{scheme}://{authority}{default}{path}")),
    };
    Some(format!("{scheme}://{host}{path}"))
}

/// The hash announced by `X-Twilio-Webhooks-Signature-Settings` (`key=...,algorithm=...`): none
/// or `HMAC_SHA1` is the Auth Token's SHA-1; `HMAC_SHA256` a Webhooks Rule's SharedKey. An
/// algorithm this build does not know is refused, never guessed.
fn algorithm(settings: Option<&str>) -> Result<HmacAlgorithm, VerifyError> {
    let named = settings
        .unwrap_or("")
        .split(',')
        .filter_map(|part| part.split_once('='))
        .find(|(k, _)| k.trim() == "algorithm")
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty());
    match named.map(str::to_ascii_uppercase).as_deref() {
        None | Some("HMAC_SHA1") => Ok(HmacAlgorithm::Sha1),
        Some("HMAC_SHA256") => Ok(HmacAlgorithm::Sha256),
        Some(_) => Err(VerifyError::MalformedHeader),
    }
}

impl Verifier for Twilio {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let sig = super::decode_b64(r.required("x-twilio-signature")?)
            .ok_or(VerifyError::MalformedHeader)?;
        let algorithm = algorithm(r.header("x-twilio-webhooks-signature-settings")?)?;
        let query = r.query.unwrap_or("");
        let body_hash = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "bodySHA256")
            .map(|(_, v)| v.into_owned());
        let mut params = Vec::new();
        match body_hash {
            Some(claimed) => {
                let actual = hex::encode(Sha256::digest(r.body));
                if !signing::constant_time_eq(
                    actual.as_bytes(),
                    claimed.to_ascii_lowercase().as_bytes(),
                ) {
                    return Err(VerifyError::SignatureMismatch);
                }
            }
            None => {
                let is_form = r.header("content-type")?.is_some_and(|ct| {
                    ct.to_ascii_lowercase()
                        .starts_with("application/x-www-form-urlencoded")
                });
                if is_form {
                    // As Twilio's libraries sign: names sorted, and under each name its distinct
                    // values sorted (a parameter repeated with one value counts once).
                    let mut by_name: std::collections::BTreeMap<
                        String,
                        std::collections::BTreeSet<String>,
                    > = Default::default();
                    for (k, v) in form_urlencoded::parse(r.body) {
                        // A nameless parameter's value would join the URL in the signed string
                        // (it sorts first), letting the query's tail move into the form.
                        if k.is_empty() {
                            return Err(VerifyError::SignatureMismatch);
                        }
                        by_name
                            .entry(k.into_owned())
                            .or_default()
                            .insert(v.into_owned());
                    }
                    for (k, values) in by_name {
                        for v in values {
                            params.extend_from_slice(k.as_bytes());
                            params.extend_from_slice(v.as_bytes());
                        }
                    }
                } else if !r.body.is_empty() {
                    // Neither a form (part of the signed string) nor covered by `bodySHA256`: the
                    // signature says nothing about these bytes, so they are not let through.
                    return Err(VerifyError::SignatureMismatch);
                }
            }
        }
        let expected: Vec<Vec<u8>> = self
            .url_variants(query)
            .iter()
            .flat_map(|url| {
                self.secrets
                    .iter()
                    .map(|k| signing::hmac_with(algorithm, k, &[url.as_bytes(), &params]))
                    .collect::<Vec<_>>()
            })
            .collect();
        super::any_match(&expected, &[sig])
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

    #[test]
    fn official_vectors() {
        for v in vectors::all("twilio") {
            let headers = vectors::headers(&v);
            let secret = v["secret"].as_str().unwrap();
            let body = if v["body_hex"].is_string() {
                vectors::body(&v)
            } else {
                Vec::new()
            };
            let (base, query) = v["public_url"].as_str().unwrap().split_once('?').unwrap();
            let twilio = Twilio::new(&[secret], Some(base)).unwrap();
            let check = |t: &Twilio, body: &[u8], q: &str| {
                t.verify(&Incoming {
                    headers: &headers,
                    body,
                    query: Some(q),
                    now: 0,
                })
            };
            assert_eq!(check(&twilio, &body, query), Ok(()), "{v}");
            let mut tampered = body.clone();
            tampered.extend_from_slice(b"&x=1");
            assert_eq!(
                check(&twilio, &tampered, query),
                Err(VerifyError::SignatureMismatch)
            );
            assert_eq!(
                check(&twilio, &body, &format!("{query}&extra=1")),
                Err(VerifyError::SignatureMismatch)
            );
            assert_eq!(
                check(&Twilio::new(&["x"], Some(base)).unwrap(), &body, query),
                Err(VerifyError::SignatureMismatch)
            );
            assert_eq!(
                check(
                    &Twilio::new(&["x", secret], Some(base)).unwrap(),
                    &body,
                    query
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn a_body_no_signature_covers_is_refused() {
        let t = Twilio::new(&["k"], Some("https://x/in/twilio")).unwrap();
        let url = "https://x/in/twilio?pn=1";
        let sig = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            signing::hmac_with(HmacAlgorithm::Sha1, b"k", &[url.as_bytes()]),
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("x-twilio-signature", sig.parse().unwrap());
        let check = |body: &[u8]| {
            t.verify(&Incoming {
                headers: &headers,
                body,
                query: Some("pn=1"),
                now: 0,
            })
        };
        assert_eq!(check(b""), Ok(()));
        assert_eq!(
            check(br#"{"admin":true}"#),
            Err(VerifyError::SignatureMismatch)
        );
    }

    /// A parameter with no name sorts first and its value joins the URL in the signed string, so
    /// the tail of a signed query could move into the form and the app receive a URL the
    /// signature never covered (`?account=acme` signed, `?account=ac` + `=me&...` sent). Twilio
    /// sends no such parameter: a form carrying one is refused.
    #[test]
    fn a_form_parameter_without_a_name_cannot_carry_the_querys_tail() {
        let t = Twilio::new(&["k"], Some("https://x/tw")).unwrap();
        let signed_url = "https://x/tw?account=acme";
        let sig = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            signing::hmac_with(
                HmacAlgorithm::Sha1,
                b"k",
                &[signed_url.as_bytes(), b"Bodyhi"],
            ),
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("x-twilio-signature", sig.parse().unwrap());
        headers.insert(
            "content-type",
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        let check = |query: &str, body: &[u8]| {
            t.verify(&Incoming {
                headers: &headers,
                body,
                query: Some(query),
                now: 0,
            })
        };
        assert_eq!(check("account=acme", b"Body=hi"), Ok(()));
        assert_eq!(
            check("account=ac", b"=me&Body=hi"),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn the_default_port_form_is_the_other_one() {
        assert_eq!(
            other_port_form("https://h.test/in").as_deref(),
            Some("https://h.test:443/in")
        );
        assert_eq!(
            other_port_form("https://h.test:443/in").as_deref(),
            Some("https://h.test/in")
        );
        assert_eq!(
            other_port_form("http://h.test").as_deref(),
            Some("http://h.test:80")
        );
        assert_eq!(other_port_form("https://h.test:8443/in"), None);
        assert_eq!(
            other_port_form("https://[::1]/in").as_deref(),
            Some("https://[::1]:443/in")
        );
        assert_eq!(algorithm(None), Ok(HmacAlgorithm::Sha1));
        assert_eq!(
            algorithm(Some("key=k1,algorithm=HMAC_SHA256")),
            Ok(HmacAlgorithm::Sha256)
        );
        assert_eq!(
            algorithm(Some("key=k1,algorithm=HMAC_MD5")),
            Err(VerifyError::MalformedHeader)
        );
    }

    #[test]
    fn route_key_is_checked() {
        assert!(Twilio::new(&["k"], None).is_err());
        assert!(Twilio::new(&["k"], Some("https://x/y?z=1")).is_err());
    }
}
