//! Paddle: `Paddle-Signature: ts=<unix>;h1=<hex>[;h1=...]` over `"{ts}:{body}"`; every `h1` is
//! checked, other schemes ignored; 5 seconds past (the provider's SDK rule; future passes).

use super::{Incoming, Verifier, VerifyError, Window};

pub struct Paddle {
    secrets: Vec<Vec<u8>>,
    tolerance: i64,
}

impl Paddle {
    pub fn new(secrets: &[&str], tolerance: Option<i64>) -> Self {
        Self {
            secrets: super::key_bytes(secrets),
            tolerance: tolerance.unwrap_or(5),
        }
    }
}

impl Verifier for Paddle {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let header = r.required("paddle-signature")?;
        let mut ts = None;
        let mut candidates = Vec::new();
        for item in header.split(';') {
            let Some((key, value)) = item.trim().split_once('=') else {
                continue;
            };
            match key {
                "ts" if ts.is_none() => ts = Some(super::parse_timestamp(value)?),
                "h1" => candidates.extend(super::decode_hex(value)),
                _ => {}
            }
        }
        let ts = ts.ok_or(VerifyError::MalformedHeader)?;
        Window::PastOnly(self.tolerance).check(ts, r.now)?;
        let ts_text = ts.to_string();
        let expected: Vec<Vec<u8>> =
            super::hmac_sha256_each(&self.secrets, &[ts_text.as_bytes(), b":", r.body]);
        super::any_match(&expected, &candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

    #[test]
    fn official_vectors() {
        for v in vectors::all("paddle") {
            let headers = vectors::headers(&v);
            let body = vectors::body(&v);
            let secret = v["secret"].as_str().unwrap();
            let at = v["valid_at_unix"].as_i64().unwrap();
            let check = |p: &Paddle, body: &[u8], now| {
                p.verify(&Incoming {
                    headers: &headers,
                    body,
                    query: None,
                    now,
                })
            };
            assert_eq!(
                check(&Paddle::new(&[secret], None), &body, at),
                Ok(()),
                "{v}"
            );
            assert_eq!(
                check(&Paddle::new(&[secret], None), &body, at + 6),
                Err(VerifyError::TimestampOutOfTolerance)
            );
            assert_eq!(
                check(&Paddle::new(&[secret], None), &body, at - 600),
                Ok(()),
                "future timestamps pass"
            );
            let mut tampered = body.clone();
            tampered.push(b' ');
            assert_eq!(
                check(&Paddle::new(&[secret], None), &tampered, at),
                Err(VerifyError::SignatureMismatch)
            );
            assert_eq!(
                check(&Paddle::new(&["x"], None), &body, at),
                Err(VerifyError::SignatureMismatch)
            );
            assert_eq!(check(&Paddle::new(&["x", secret], None), &body, at), Ok(()));
        }
    }
}
