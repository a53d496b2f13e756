//! Shopify: `X-Shopify-Hmac-Sha256`, base64 HMAC-SHA256 of the body; no timestamp.

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
        let sig = super::decode_b64(r.required("x-shopify-hmac-sha256")?)
            .ok_or(VerifyError::MalformedHeader)?;
        let expected: Vec<Vec<u8>> = super::hmac_sha256_each(&self.secrets, &[r.body]);
        super::any_match(&expected, &[sig])
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

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
