//! Webhook signatures, shared by both directions: the signers outbound deliveries carry and the
//! verifiers the inbound proxy applies. Invariant: comparisons are constant-time, secrets and full
//! signatures never reach a log line, and unknown signature versions never count as a match.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::SignatureScheme;

type HmacSha256 = Hmac<Sha256>;

const WHSEC_PREFIX: &str = "whsec_";

/// Why a secret cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a Standard Webhooks secret must start with whsec_")]
    MissingPrefix,
    #[error("the part after whsec_ must be base64")]
    NotBase64,
    #[error("the key must be 24 to 64 bytes (got {0})")]
    BadLength(usize),
    #[error("must not be empty")]
    Empty,
}

/// The HMAC key of a Standard Webhooks `whsec_` secret: the base64-decoded remainder.
pub fn standard_key(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret
        .strip_prefix(WHSEC_PREFIX)
        .ok_or(SecretError::MissingPrefix)?;
    let key = B64.decode(encoded).map_err(|_| SecretError::NotBase64)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::BadLength(key.len()));
    }
    Ok(key)
}

/// Checks a secret fits the scheme an endpoint uses.
pub fn validate_secret(scheme: SignatureScheme, secret: &str) -> Result<(), SecretError> {
    match scheme {
        SignatureScheme::Standard => standard_key(secret).map(|_| ()),
        SignatureScheme::Legacy if secret.is_empty() => Err(SecretError::Empty),
        SignatureScheme::Legacy => Ok(()),
    }
}

/// A fresh `whsec_` secret with a 32-byte random key.
pub fn generate_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("{WHSEC_PREFIX}{}", B64.encode(key))
}

/// The digests HMAC signatures use across providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlgorithm {
    Sha1,
    Sha256,
    Sha512,
}

fn mac_over<M: Mac>(mut mac: M, parts: &[&[u8]]) -> Vec<u8> {
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// HMAC over the concatenation of `parts`, without building the concatenation.
pub fn hmac_with(algorithm: HmacAlgorithm, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    const ANY_KEY: &str = "HMAC accepts any key length";
    match algorithm {
        HmacAlgorithm::Sha1 => mac_over(
            Hmac::<sha1::Sha1>::new_from_slice(key).expect(ANY_KEY),
            parts,
        ),
        HmacAlgorithm::Sha256 => mac_over(HmacSha256::new_from_slice(key).expect(ANY_KEY), parts),
        HmacAlgorithm::Sha512 => mac_over(
            Hmac::<sha2::Sha512>::new_from_slice(key).expect(ANY_KEY),
            parts,
        ),
    }
}

pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality (length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// `v1,<base64>` for one key over `"{id}.{timestamp}.{body}"`.
pub fn standard_signature(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let mac = hmac_sha256(key, &[msg_id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", B64.encode(mac))
}

/// The `webhook-signature` header value: one space-separated `v1,` entry per key, so a receiver
/// holding either the old or the new secret verifies during a rotation.
pub fn standard_header(keys: &[Vec<u8>], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| standard_signature(k, msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The seed's scheme: `v1=<hex HMAC-SHA256 of "timestamp.body">` keyed with the secret's UTF-8
/// bytes (prefix included).
pub fn legacy_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let mac = hmac_sha256(secret.as_bytes(), &[ts.as_bytes(), b".", body]);
    format!("v1={}", hex::encode(mac))
}

/// Why a signed request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("a required signature header is missing")]
    MissingHeader,
    #[error("a signature header is malformed")]
    MalformedHeader,
    #[error("the timestamp is outside the tolerance")]
    TimestampOutOfTolerance,
    #[error("no signature matches")]
    SignatureMismatch,
}

/// Verifies a Standard Webhooks request: any `v1,` entry matching any key accepts.
pub fn verify_standard(
    keys: &[Vec<u8>],
    msg_id: Option<&str>,
    timestamp: Option<&str>,
    signature_header: Option<&str>,
    body: &[u8],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let (id, ts, header) = match (msg_id, timestamp, signature_header) {
        (Some(i), Some(t), Some(s)) => (i, t, s),
        _ => return Err(VerifyError::MissingHeader),
    };
    let ts: i64 = ts
        .trim()
        .parse()
        .map_err(|_| VerifyError::MalformedHeader)?;
    if (now_unix - ts).abs() > tolerance_secs {
        return Err(VerifyError::TimestampOutOfTolerance);
    }
    let ts_text = ts.to_string();
    let expected: Vec<[u8; 32]> = keys
        .iter()
        .map(|k| hmac_sha256(k, &[id.as_bytes(), b".", ts_text.as_bytes(), b".", body]))
        .collect();
    let mut any_entry = false;
    for entry in header.split(' ').filter(|e| !e.is_empty()) {
        let Some((version, sig)) = entry.split_once(',') else {
            continue;
        };
        if version != "v1" {
            continue;
        }
        any_entry = true;
        let Ok(sig) = B64.decode(sig) else { continue };
        if expected
            .iter()
            .any(|e| bool::from(e.as_slice().ct_eq(&sig)))
        {
            return Ok(());
        }
    }
    if any_entry {
        Err(VerifyError::SignatureMismatch)
    } else {
        Err(VerifyError::MalformedHeader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Vec<Value> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/official-signatures.json"
        );
        let text = std::fs::read_to_string(path).expect("vectors file");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["vectors"].as_array().unwrap().clone()
    }

    fn body(v: &Value) -> Vec<u8> {
        hex::decode(v["body_hex"].as_str().unwrap()).unwrap()
    }

    fn header<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
        v["headers"][name].as_str()
    }

    #[test]
    fn standard_webhooks_vectors_sign_and_verify() {
        let mut checked = 0;
        for v in vectors()
            .iter()
            .filter(|v| v["scheme"] == "standard-webhooks")
        {
            let key = standard_key(v["secret"].as_str().unwrap()).unwrap();
            let prefix = if header(v, "webhook-id").is_some() {
                "webhook"
            } else {
                "svix"
            };
            let id = header(v, &format!("{prefix}-id"));
            let ts = header(v, &format!("{prefix}-timestamp"));
            let sig = header(v, &format!("{prefix}-signature"));
            let at = v["valid_at_unix"].as_i64().unwrap();
            let result =
                verify_standard(std::slice::from_ref(&key), id, ts, sig, &body(v), at, 300);
            if v["expect"] == "reject" {
                assert_eq!(result, Err(VerifyError::SignatureMismatch), "{v}");
            } else {
                assert_eq!(result, Ok(()), "{v}");
                // Outside the tolerance, either way.
                assert_eq!(
                    verify_standard(
                        std::slice::from_ref(&key),
                        id,
                        ts,
                        sig,
                        &body(v),
                        at + 301,
                        300
                    ),
                    Err(VerifyError::TimestampOutOfTolerance)
                );
                assert_eq!(
                    verify_standard(
                        std::slice::from_ref(&key),
                        id,
                        ts,
                        sig,
                        &body(v),
                        at - 301,
                        300
                    ),
                    Err(VerifyError::TimestampOutOfTolerance)
                );
                // One byte of body changed.
                let mut tampered = body(v);
                tampered[0] ^= 1;
                assert_eq!(
                    verify_standard(std::slice::from_ref(&key), id, ts, sig, &tampered, at, 300),
                    Err(VerifyError::SignatureMismatch)
                );
                // Our signer reproduces the vector when the header holds a single entry.
                if !sig.unwrap().contains(' ') {
                    let ours = standard_signature(
                        &key,
                        id.unwrap(),
                        ts.unwrap().parse().unwrap(),
                        &body(v),
                    );
                    assert_eq!(Some(ours.as_str()), sig);
                }
                // A wrong key fails; the right key among several (rotation) passes.
                let other = standard_key(&generate_secret()).unwrap();
                assert_eq!(
                    verify_standard(std::slice::from_ref(&other), id, ts, sig, &body(v), at, 300),
                    Err(VerifyError::SignatureMismatch)
                );
                assert_eq!(
                    verify_standard(&[other, key], id, ts, sig, &body(v), at, 300),
                    Ok(())
                );
            }
            checked += 1;
        }
        assert!(
            checked >= 4,
            "only {checked} standard-webhooks vectors found"
        );
    }

    #[test]
    fn legacy_vector_reproduces() {
        let v = vectors()
            .into_iter()
            .find(|v| v["scheme"].as_str().unwrap().starts_with("legacy"))
            .expect("legacy vector");
        let ts: i64 = header(&v, "x-webhook-timestamp").unwrap().parse().unwrap();
        let sig = legacy_signature(v["secret"].as_str().unwrap(), ts, &body(&v));
        assert_eq!(Some(sig.as_str()), header(&v, "x-webhook-signature"));
    }

    #[test]
    fn multi_key_header_has_one_entry_per_key() {
        let keys = vec![
            standard_key(&generate_secret()).unwrap(),
            standard_key(&generate_secret()).unwrap(),
        ];
        let h = standard_header(&keys, "msg", 1_700_000_000, b"{}");
        assert_eq!(h.split(' ').count(), 2);
        for k in &keys {
            assert_eq!(
                verify_standard(
                    std::slice::from_ref(k),
                    Some("msg"),
                    Some("1700000000"),
                    Some(&h),
                    b"{}",
                    1_700_000_000,
                    300
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn secrets_are_checked() {
        assert_eq!(standard_key("nope"), Err(SecretError::MissingPrefix));
        assert_eq!(standard_key("whsec_!!!"), Err(SecretError::NotBase64));
        assert_eq!(standard_key("whsec_AAAA"), Err(SecretError::BadLength(3)));
        assert!(standard_key(&generate_secret()).is_ok());
        assert_eq!(
            validate_secret(SignatureScheme::Legacy, ""),
            Err(SecretError::Empty)
        );
    }
}
