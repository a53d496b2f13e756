//! Secrets at rest: endpoint secrets and custom header values are sealed with ChaCha20-Poly1305
//! under `database.encryption_key`. Invariant: with a key, nothing secret is written to Postgres
//! in the clear; every sealed value names the key that sealed it and is bound to its row (endpoint
//! id and column as associated data), so a value copied to another endpoint or column does not
//! open. Older keys (`database.encryption_keys`) keep opening what they sealed while a rotation
//! is under way; `postern migrate` re-seals everything with the current key.
//!
//! Formats: `enc:v2:<key id>:<base64(nonce || ciphertext)>` (this build), `enc:v1:<base64>`
//! (earlier builds: no key id, no associated data; still opened), anything else is plain text
//! written before a key was set.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

const V1: &str = "enc:v1:";
const V2: &str = "enc:v2:";
const NONCE_LEN: usize = 12;

/// Where a sealed value lives: it is bound to exactly this row and column.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Secret { endpoint: &'a str },
    Header { endpoint: &'a str, name: &'a str },
}

impl Field<'_> {
    fn associated_data(&self) -> Vec<u8> {
        match self {
            Field::Secret { endpoint } => format!("postern\0{endpoint}\0secret").into_bytes(),
            Field::Header { endpoint, name } => {
                format!("postern\0{endpoint}\0header\0{}", name.to_ascii_lowercase()).into_bytes()
            }
        }
    }
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Secret { endpoint } => write!(f, "endpoint {endpoint}'s secret"),
            Field::Header { endpoint, name } => write!(f, "endpoint {endpoint}'s header {name}"),
        }
    }
}

struct SealingKey {
    id: String,
    cipher: ChaCha20Poly1305,
}

/// Seals and opens stored secrets; without a key it passes values through.
#[derive(Clone, Default)]
pub struct SecretBox {
    /// The first key seals; every key opens what it sealed.
    keys: std::sync::Arc<Vec<SealingKey>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)")]
    BadKey,
    #[error("a stored secret is encrypted but database.encryption_key is not set")]
    NoKey,
    #[error("a stored secret was sealed with key {0}, which is neither database.encryption_key nor in database.encryption_keys")]
    UnknownKey(String),
    #[error("a stored secret cannot be decrypted with the configured keys (wrong key, damaged value, or a value moved from another endpoint)")]
    Undecryptable,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBox(keys: {})", self.keys.len())
    }
}

/// A short public name for a key: the first 4 bytes of its SHA-256, in hex. It says which key
/// sealed a value without saying anything useful about the key.
fn key_id(key: &[u8]) -> String {
    hex::encode(&Sha256::digest(key)[..4])
}

fn parse_key(key: &str) -> Result<SealingKey, CryptoError> {
    let bytes = B64.decode(key.trim()).map_err(|_| CryptoError::BadKey)?;
    if bytes.len() != 32 {
        return Err(CryptoError::BadKey);
    }
    Ok(SealingKey {
        id: key_id(&bytes),
        cipher: ChaCha20Poly1305::new(Key::from_slice(&bytes)),
    })
}

impl SecretBox {
    pub fn plaintext() -> Self {
        Self::default()
    }

    pub fn from_base64(key: &str) -> Result<Self, CryptoError> {
        Self::with_keys(key, &[])
    }

    /// `current` seals; `old` keys only open (a rotation in progress).
    pub fn with_keys(current: &str, old: &[&str]) -> Result<Self, CryptoError> {
        let mut keys = vec![parse_key(current)?];
        for k in old {
            keys.push(parse_key(k)?);
        }
        Ok(Self {
            keys: std::sync::Arc::new(keys),
        })
    }

    /// From the config: the current key and any older ones, when set.
    pub fn from_config(config: &crate::config::Config) -> anyhow::Result<Self> {
        let db = &config.database;
        match &db.encryption_key {
            Some(k) => {
                let old: Vec<&str> = db.encryption_keys.iter().map(|k| k.expose()).collect();
                Ok(Self::with_keys(k.expose(), &old)?)
            }
            None => Ok(Self::plaintext()),
        }
    }

    pub fn encrypting(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The id of the key that seals new values.
    pub fn current_key_id(&self) -> Option<&str> {
        self.keys.first().map(|k| k.id.as_str())
    }

    pub fn seal(&self, plain: &str, field: Field<'_>) -> String {
        match self.keys.first() {
            None => plain.to_string(),
            Some(key) => {
                let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
                let aad = field.associated_data();
                let sealed = key
                    .cipher
                    .encrypt(
                        &nonce,
                        Payload {
                            msg: plain.as_bytes(),
                            aad: &aad,
                        },
                    )
                    .expect("ChaCha20-Poly1305 encryption of an in-memory value cannot fail");
                let mut out = nonce.to_vec();
                out.extend_from_slice(&sealed);
                format!("{V2}{}:{}", key.id, B64.encode(out))
            }
        }
    }

    pub fn open(&self, stored: &str, field: Field<'_>) -> Result<String, CryptoError> {
        if let Some(rest) = stored.strip_prefix(V2) {
            let (id, encoded) = rest.split_once(':').ok_or(CryptoError::Undecryptable)?;
            if self.keys.is_empty() {
                return Err(CryptoError::NoKey);
            }
            let key = self
                .keys
                .iter()
                .find(|k| k.id == id)
                .ok_or_else(|| CryptoError::UnknownKey(id.to_string()))?;
            return decrypt(&key.cipher, encoded, &field.associated_data());
        }
        if let Some(encoded) = stored.strip_prefix(V1) {
            if self.keys.is_empty() {
                return Err(CryptoError::NoKey);
            }
            // No key id: whichever configured key opens it.
            return self
                .keys
                .iter()
                .find_map(|k| decrypt(&k.cipher, encoded, b"").ok())
                .ok_or(CryptoError::Undecryptable);
        }
        Ok(stored.to_string())
    }

    /// Whether `stored` should be sealed again: plain text while a key is set, or sealed by an
    /// older format or key. `postern migrate` re-seals these.
    pub fn needs_reseal(&self, stored: &str) -> bool {
        match self.current_key_id() {
            None => false,
            Some(id) => stored
                .strip_prefix(V2)
                .and_then(|rest| rest.split_once(':'))
                .is_none_or(|(k, _)| k != id),
        }
    }
}

/// Whether a stored value is sealed (by any key, any format).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(V2) || stored.starts_with(V1)
}

fn decrypt(cipher: &ChaCha20Poly1305, encoded: &str, aad: &[u8]) -> Result<String, CryptoError> {
    let raw = B64
        .decode(encoded)
        .map_err(|_| CryptoError::Undecryptable)?;
    if raw.len() < NONCE_LEN {
        return Err(CryptoError::Undecryptable);
    }
    let (nonce, sealed) = raw.split_at(NONCE_LEN);
    let plain = cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map_err(|_| CryptoError::Undecryptable)?;
    String::from_utf8(plain).map_err(|_| CryptoError::Undecryptable)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const OTHER: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    const A: Field = Field::Secret { endpoint: "a" };

    #[test]
    fn seals_and_opens() {
        let b = SecretBox::from_base64(KEY).unwrap();
        let sealed = b.seal("whsec_abc", A);
        assert!(sealed.starts_with(V2));
        assert!(sealed.contains(b.current_key_id().unwrap()));
        assert!(!sealed.contains("whsec_abc"));
        assert_ne!(sealed, b.seal("whsec_abc", A), "a fresh nonce each time");
        assert_eq!(b.open(&sealed, A).unwrap(), "whsec_abc");
        // Values stored before the key existed still read.
        assert_eq!(b.open("whsec_plain", A).unwrap(), "whsec_plain");
        assert!(!b.needs_reseal(&sealed));
        assert!(b.needs_reseal("whsec_plain"));
    }

    #[test]
    fn a_value_is_bound_to_its_endpoint_and_column() {
        let b = SecretBox::from_base64(KEY).unwrap();
        let sealed = b.seal("whsec_abc", A);
        assert_eq!(
            b.open(&sealed, Field::Secret { endpoint: "b" }),
            Err(CryptoError::Undecryptable)
        );
        let header = b.seal(
            "token",
            Field::Header {
                endpoint: "a",
                name: "authorization",
            },
        );
        assert_eq!(b.open(&header, A), Err(CryptoError::Undecryptable));
        let as_x = Field::Header {
            endpoint: "a",
            name: "x-other",
        };
        assert_eq!(b.open(&header, as_x), Err(CryptoError::Undecryptable));
    }

    #[test]
    fn rotation_keeps_old_values_open_and_reseals_them() {
        let old = SecretBox::from_base64(OTHER).unwrap();
        let sealed_old = old.seal("whsec_abc", A);
        let rotated = SecretBox::with_keys(KEY, &[OTHER]).unwrap();
        assert_eq!(rotated.open(&sealed_old, A).unwrap(), "whsec_abc");
        assert!(rotated.needs_reseal(&sealed_old));
        let resealed = rotated.seal("whsec_abc", A);
        assert!(!rotated.needs_reseal(&resealed));
        // Without the old key, the value names the key it needs.
        let new_only = SecretBox::from_base64(KEY).unwrap();
        assert_eq!(
            new_only.open(&sealed_old, A),
            Err(CryptoError::UnknownKey(
                old.current_key_id().unwrap().into()
            ))
        );
    }

    #[test]
    fn earlier_builds_values_still_open() {
        // enc:v1 as earlier builds wrote it: nonce || ciphertext, no associated data.
        let key = parse_key(KEY).unwrap();
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut raw = nonce.to_vec();
        raw.extend(key.cipher.encrypt(&nonce, b"whsec_v1".as_ref()).unwrap());
        let v1 = format!("{V1}{}", B64.encode(raw));
        let b = SecretBox::with_keys(OTHER, &[KEY]).unwrap();
        assert_eq!(b.open(&v1, A).unwrap(), "whsec_v1");
        assert!(b.needs_reseal(&v1));
        assert_eq!(
            SecretBox::from_base64(OTHER).unwrap().open(&v1, A),
            Err(CryptoError::Undecryptable)
        );
    }

    #[test]
    fn wrong_or_missing_key_fails_loudly() {
        let sealed = SecretBox::from_base64(KEY).unwrap().seal("x", A);
        assert!(matches!(
            SecretBox::from_base64(OTHER).unwrap().open(&sealed, A),
            Err(CryptoError::UnknownKey(_))
        ));
        assert_eq!(
            SecretBox::plaintext().open(&sealed, A),
            Err(CryptoError::NoKey)
        );
        assert_eq!(
            SecretBox::from_base64("c2hvcnQ=").err(),
            Some(CryptoError::BadKey)
        );
        assert_eq!(SecretBox::plaintext().seal("x", A), "x");
        let mut damaged = sealed.clone();
        damaged.pop();
        damaged.push('A');
        assert!(SecretBox::from_base64(KEY)
            .unwrap()
            .open(&damaged, A)
            .is_err());
    }
}
