//! Twilio: `X-Twilio-Signature`, base64 HMAC-SHA1 of the URL Twilio requested followed by the
//! form parameters sorted by name (`name` + `value` each), or of that URL alone when it carries
//! `bodySHA256` (JSON bodies), whose value must then be the hex SHA-256 of the body. Route key
//! `public_url` is that URL without its query; the query received is appended to it.
//! Invariant: every body byte let through is covered: a form body is part of the signed string,
//! any other body needs `bodySHA256`; a signature over the URL alone passes only an empty body.

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

impl Verifier for Twilio {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let sig = super::decode_b64(r.required("x-twilio-signature")?)
            .ok_or(VerifyError::MalformedHeader)?;
        let query = r.query.unwrap_or("");
        let url = if query.is_empty() {
            self.public_url.clone()
        } else {
            format!("{}?{query}", self.public_url)
        };
        let body_hash = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "bodySHA256")
            .map(|(_, v)| v.into_owned());
        let mut signed = url.into_bytes();
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
                    let mut params: Vec<(String, String)> = form_urlencoded::parse(r.body)
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .collect();
                    params.sort();
                    for (k, v) in params {
                        signed.extend_from_slice(k.as_bytes());
                        signed.extend_from_slice(v.as_bytes());
                    }
                } else if !r.body.is_empty() {
                    // Neither a form (part of the signed string) nor covered by `bodySHA256`: the
                    // signature says nothing about these bytes, so they are not let through.
                    return Err(VerifyError::SignatureMismatch);
                }
            }
        }
        let expected: Vec<Vec<u8>> = self
            .secrets
            .iter()
            .map(|k| signing::hmac_with(HmacAlgorithm::Sha1, k, &[&signed]))
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

    #[test]
    fn route_key_is_checked() {
        assert!(Twilio::new(&["k"], None).is_err());
        assert!(Twilio::new(&["k"], Some("https://x/y?z=1")).is_err());
    }
}
