//! Slack: `X-Slack-Signature: v0=<hex>` over `"v0:{timestamp}:{body}"` with
//! `X-Slack-Request-Timestamp`; 5 minutes either way.

use super::{Incoming, Verifier, VerifyError, Window};

pub struct Slack {
    secrets: Vec<Vec<u8>>,
    tolerance: i64,
}

impl Slack {
    pub fn new(secrets: &[&str], tolerance: Option<i64>) -> Self {
        Self {
            secrets: super::key_bytes(secrets),
            tolerance: tolerance.unwrap_or(300),
        }
    }
}

impl Verifier for Slack {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let header = r.required("x-slack-signature")?;
        let ts = super::parse_timestamp(r.required("x-slack-request-timestamp")?)?;
        let sig = header
            .strip_prefix("v0=")
            .and_then(super::decode_hex)
            .ok_or(VerifyError::MalformedHeader)?;
        Window::Symmetric(self.tolerance).check(ts, r.now)?;
        let ts_text = ts.to_string();
        let expected: Vec<Vec<u8>> =
            super::hmac_sha256_each(&self.secrets, &[b"v0:", ts_text.as_bytes(), b":", r.body]);
        super::any_match(&expected, &[sig])
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

    #[test]
    fn official_vector() {
        let v = &vectors::all("slack")[0];
        let headers = vectors::headers(v);
        let body = vectors::body(v);
        let secret = v["secret"].as_str().unwrap();
        let at = v["valid_at_unix"].as_i64().unwrap();
        let check = |s: &Slack, body: &[u8], now| {
            s.verify(&Incoming {
                headers: &headers,
                body,
                query: None,
                now,
            })
        };
        assert_eq!(check(&Slack::new(&[secret], None), &body, at), Ok(()));
        assert_eq!(
            check(&Slack::new(&[secret], None), &body, at + 301),
            Err(VerifyError::TimestampOutOfTolerance)
        );
        assert_eq!(
            check(&Slack::new(&[secret], None), &body, at - 301),
            Err(VerifyError::TimestampOutOfTolerance)
        );
        let mut tampered = body.clone();
        tampered[0] ^= 1;
        assert_eq!(
            check(&Slack::new(&[secret], None), &tampered, at),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            check(&Slack::new(&["nope"], None), &body, at),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            check(&Slack::new(&["nope", secret], None), &body, at),
            Ok(())
        );
    }
}
