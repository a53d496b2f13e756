//! Standard Webhooks (and Svix, which it grew from): `webhook-id`, `webhook-timestamp`,
//! `webhook-signature` (or the `svix-*` names), a space-separated list of `v1,<base64>` over
//! `"{id}.{timestamp}.{body}"`, keyed with the base64 after `whsec_`; 5 minutes either way.

use super::{Incoming, Verifier, VerifyError, Window};
use crate::signing;

pub struct StandardWebhooks {
    keys: Vec<Vec<u8>>,
    tolerance: i64,
}

impl StandardWebhooks {
    pub fn new(secrets: &[&str], tolerance: Option<i64>) -> Result<Self, Vec<String>> {
        let mut keys = Vec::new();
        let mut problems = Vec::new();
        for (i, s) in secrets.iter().enumerate() {
            match signing::standard_key(s) {
                Ok(k) => keys.push(k),
                Err(e) => problems.push(format!("secrets[{i}]: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(Self {
                keys,
                tolerance: tolerance.unwrap_or(300),
            })
        } else {
            Err(problems)
        }
    }
}

impl Verifier for StandardWebhooks {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let prefix =
            if r.header("webhook-id")?.is_some() || r.header("webhook-signature")?.is_some() {
                "webhook"
            } else {
                "svix"
            };
        let id = r.required(&format!("{prefix}-id"))?;
        let ts = super::parse_timestamp(r.required(&format!("{prefix}-timestamp"))?)?;
        let header = r.required(&format!("{prefix}-signature"))?;
        Window::Symmetric(self.tolerance).check(ts, r.now)?;
        let ts_text = ts.to_string();
        let expected: Vec<Vec<u8>> = self
            .keys
            .iter()
            .map(|k| {
                signing::hmac_sha256(k, &[id.as_bytes(), b".", ts_text.as_bytes(), b".", r.body])
                    .to_vec()
            })
            .collect();
        let candidates: Vec<Vec<u8>> = header
            .split(' ')
            .filter_map(|entry| entry.split_once(','))
            .filter(|(version, _)| *version == "v1")
            .filter_map(|(_, sig)| super::decode_b64(sig))
            .collect();
        super::any_match(&expected, &candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

    #[test]
    fn official_vectors() {
        for v in vectors::all("standard-webhooks") {
            let secret = v["secret"].as_str().unwrap();
            let verifier = StandardWebhooks::new(&[secret], None).unwrap();
            let headers = vectors::headers(&v);
            let body = vectors::body(&v);
            let at = v["valid_at_unix"].as_i64().unwrap();
            let req = |body: &[u8], now| {
                verifier.verify(&Incoming {
                    headers: &headers,
                    body,
                    query: None,
                    now,
                })
            };
            if v["expect"] == "reject" {
                assert_eq!(req(&body, at), Err(VerifyError::SignatureMismatch));
                continue;
            }
            assert_eq!(req(&body, at), Ok(()), "{v}");
            assert_eq!(
                req(&body, at + 301),
                Err(VerifyError::TimestampOutOfTolerance)
            );
            assert_eq!(
                req(&body, at - 301),
                Err(VerifyError::TimestampOutOfTolerance)
            );
            let mut tampered = body.clone();
            tampered[0] ^= 1;
            assert_eq!(req(&tampered, at), Err(VerifyError::SignatureMismatch));
            let other = signing::generate_secret();
            let wrong = StandardWebhooks::new(&[&other], None).unwrap();
            assert_eq!(
                wrong.verify(&Incoming {
                    headers: &headers,
                    body: &body,
                    query: None,
                    now: at
                }),
                Err(VerifyError::SignatureMismatch)
            );
            let rotated = StandardWebhooks::new(&[&other, secret], None).unwrap();
            assert_eq!(
                rotated.verify(&Incoming {
                    headers: &headers,
                    body: &body,
                    query: None,
                    now: at
                }),
                Ok(())
            );
        }
    }

    #[test]
    fn missing_and_malformed() {
        let v = StandardWebhooks::new(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"], None).unwrap();
        let mut h = http::HeaderMap::new();
        let check = |h: &http::HeaderMap| {
            v.verify(&Incoming {
                headers: h,
                body: b"{}",
                query: None,
                now: 100,
            })
        };
        assert_eq!(check(&h), Err(VerifyError::MissingHeader));
        h.insert("webhook-id", "msg".parse().unwrap());
        h.insert("webhook-timestamp", "soon".parse().unwrap());
        h.insert("webhook-signature", "v1,xx".parse().unwrap());
        assert_eq!(check(&h), Err(VerifyError::MalformedHeader));
        h.insert("webhook-timestamp", "100".parse().unwrap());
        h.insert("webhook-signature", "v2,abc".parse().unwrap());
        assert_eq!(
            check(&h),
            Err(VerifyError::MalformedHeader),
            "unknown schemes never count"
        );
    }
}
