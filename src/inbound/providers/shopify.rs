//! Shopify: `X-Shopify-Hmac-Sha256` (or `Shopify-Hmac-Sha256`, the name Shopify's newer event
//! webhooks use), base64 HMAC-SHA256 of the body; no timestamp. Both names at once are refused:
//! one would be verified while the app saw the other.

use super::{Incoming, Verifier, VerifyError};

pub struct Shopify {
    secrets: Vec<Vec<u8>>,
}

impl Shopify {
    pub fn new(secrets: &[&str]) -> Self {
        Self {
            secrets: super::key_bytes(secrets),
        }
    }
}

impl Verifier for Shopify {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let header = match (
            r.header("x-shopify-hmac-sha256")?,
            r.header("shopify-hmac-sha256")?,
        ) {
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => return Err(VerifyError::MissingHeader),
            (Some(_), Some(_)) => return Err(VerifyError::MalformedHeader),
        };
        let sig = super::decode_b64(header).ok_or(VerifyError::MalformedHeader)?;
        let expected: Vec<Vec<u8>> = super::hmac_sha256_each(&self.secrets, &[r.body]);
        super::any_match(&expected, &[sig])
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

    #[test]
    fn the_newer_header_name_is_accepted_and_both_at_once_refused() {
        let body = br#"{"id":1}"#;
        let mac = super::super::hmac_sha256_each(&super::super::key_bytes(&["k"]), &[body]);
        let sig = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &mac[0]);
        let s = Shopify::new(&["k"]);
        let verify = |names: &[&'static str]| {
            let mut headers = http::HeaderMap::new();
            for n in names {
                headers.insert(*n, sig.parse().unwrap());
            }
            s.verify(&Incoming {
                headers: &headers,
                body,
                query: None,
                now: 0,
            })
        };
        assert_eq!(verify(&["shopify-hmac-sha256"]), Ok(()));
        assert_eq!(verify(&["x-shopify-hmac-sha256"]), Ok(()));
        assert_eq!(
            verify(&["x-shopify-hmac-sha256", "shopify-hmac-sha256"]),
            Err(VerifyError::MalformedHeader)
        );
        assert_eq!(verify(&[]), Err(VerifyError::MissingHeader));
    }

    #[test]
    fn official_vector() {
        let v = &vectors::all("shopify")[0];
        let headers = vectors::headers(v);
        let body = vectors::body(v);
        let secret = v["secret"].as_str().unwrap();
        let check = |s: &Shopify, body: &[u8]| {
            s.verify(&Incoming {
                headers: &headers,
                body,
                query: None,
                now: 0,
            })
        };
        assert_eq!(check(&Shopify::new(&[secret]), &body), Ok(()));
        let mut tampered = body.clone();
        tampered[0] ^= 1;
        assert_eq!(
            check(&Shopify::new(&[secret]), &tampered),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            check(&Shopify::new(&["x"]), &body),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(check(&Shopify::new(&["x", secret]), &body), Ok(()));
    }
}
