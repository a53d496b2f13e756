//! Stripe: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=...][,v0=...]` over `"{t}.{body}"`, keyed
//! with the whole `whsec_...` string; `v0` is ignored; 5 minutes, past only.

use super::{Incoming, Verifier, VerifyError, Window};

pub struct Stripe {
    secrets: Vec<Vec<u8>>,
    tolerance: i64,
}

impl Stripe {
    pub fn new(secrets: &[&str], tolerance: Option<i64>) -> Self {
        Self {
            secrets: super::key_bytes(secrets),
            tolerance: tolerance.unwrap_or(300),
        }
    }
}

impl Verifier for Stripe {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let header = r.required("stripe-signature")?;
        let mut timestamp = None;
        let mut candidates = Vec::new();
        for item in header.split(',') {
            let Some((key, value)) = item.trim().split_once('=') else {
                continue;
            };
            match key {
                "t" if timestamp.is_none() => timestamp = Some(super::parse_timestamp(value)?),
                "v1" => candidates.extend(super::decode_hex(value)),
                _ => {}
            }
        }
        let ts = timestamp.ok_or(VerifyError::MalformedHeader)?;
        Window::PastOnly(self.tolerance).check(ts, r.now)?;
        let ts_text = ts.to_string();
        let expected: Vec<Vec<u8>> =
            super::hmac_sha256_each(&self.secrets, &[ts_text.as_bytes(), b".", r.body]);
        super::any_match(&expected, &candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

    #[test]
    fn official_vector() {
        for v in vectors::all("stripe") {
            let secret = v["secret"].as_str().unwrap();
            let headers = vectors::headers(&v);
            let body = vectors::body(&v);
            let at = v["valid_at_unix"].as_i64().unwrap();
            let stripe = Stripe::new(&[secret], None);
            let check = |s: &Stripe, body: &[u8], now| {
                s.verify(&Incoming {
                    headers: &headers,
                    body,
                    query: None,
                    now,
                })
            };
            assert_eq!(check(&stripe, &body, at), Ok(()));
            assert_eq!(
                check(&stripe, &body, v["invalid_at_unix"].as_i64().unwrap()),
                Err(VerifyError::TimestampOutOfTolerance)
            );
            // Past only: a timestamp from the future passes.
            assert_eq!(check(&stripe, &body, at - 3600), Ok(()));
            let mut tampered = body.clone();
            tampered[10] ^= 1;
            assert_eq!(
                check(&stripe, &tampered, at),
                Err(VerifyError::SignatureMismatch)
            );
            assert_eq!(
                check(&Stripe::new(&["whsec_other"], None), &body, at),
                Err(VerifyError::SignatureMismatch)
            );
            assert_eq!(
                check(&Stripe::new(&["whsec_other", secret], None), &body, at),
                Ok(())
            );
        }
    }

    #[test]
    fn v0_alone_never_counts() {
        let mut h = http::HeaderMap::new();
        h.insert("stripe-signature", "t=100,v0=00".parse().unwrap());
        let s = Stripe::new(&["k"], None);
        assert_eq!(
            s.verify(&Incoming {
                headers: &h,
                body: b"",
                query: None,
                now: 100
            }),
            Err(VerifyError::MalformedHeader)
        );
        h.insert("stripe-signature", "v1=00".parse().unwrap());
        assert_eq!(
            s.verify(&Incoming {
                headers: &h,
                body: b"",
                query: None,
                now: 100
            }),
            Err(VerifyError::MalformedHeader)
        );
    }
}
