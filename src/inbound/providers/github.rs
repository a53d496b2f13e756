//! GitHub: `X-Hub-Signature-256: sha256=<hex>` HMAC-SHA256 of the body; no timestamp.

use super::{Incoming, Verifier, VerifyError};

pub struct GitHub {
    secrets: Vec<Vec<u8>>,
}

impl GitHub {
    pub fn new(secrets: &[&str]) -> Self {
        Self {
            secrets: super::key_bytes(secrets),
        }
    }
}

impl Verifier for GitHub {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let header = r.required("x-hub-signature-256")?;
        let sig = header
            .strip_prefix("sha256=")
            .and_then(super::decode_hex)
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
        let v = &vectors::all("github")[0];
        let headers = vectors::headers(v);
        let body = vectors::body(v);
        let secret = v["secret"].as_str().unwrap();
        let check = |g: &GitHub, body: &[u8]| {
            g.verify(&Incoming {
                headers: &headers,
                body,
                query: None,
                now: 0,
            })
        };
        assert_eq!(check(&GitHub::new(&[secret]), &body), Ok(()));
        assert_eq!(
            check(&GitHub::new(&[secret]), b"Hello, World?"),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            check(&GitHub::new(&["wrong"]), &body),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(check(&GitHub::new(&["wrong", secret]), &body), Ok(()));
    }
}
