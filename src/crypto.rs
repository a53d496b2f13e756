//! Secrets at rest: endpoint secrets and custom header values are sealed with ChaCha20-Poly1305
//! under `database.encryption_key`. Invariant: with a key, nothing secret is written to Postgres
//! in the clear; values written before a key was set (plain text) still read, so a key can be
//! introduced without a migration step.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

const PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 12;

/// Seals and opens stored secrets; without a key it passes values through.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Option<ChaCha20Poly1305>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)")]
    BadKey,
    #[error("a stored secret is encrypted but database.encryption_key is not set")]
    NoKey,
    #[error("a stored secret cannot be decrypted with database.encryption_key (wrong key or damaged value)")]
    Undecryptable,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBox(encrypting: {})", self.cipher.is_some())
    }
}

impl SecretBox {
    pub fn plaintext() -> Self {
        Self { cipher: None }
    }

    pub fn from_base64(key: &str) -> Result<Self, CryptoError> {
        let bytes = B64.decode(key.trim()).map_err(|_| CryptoError::BadKey)?;
        if bytes.len() != 32 {
            return Err(CryptoError::BadKey);
        }
        Ok(Self {
            cipher: Some(ChaCha20Poly1305::new(Key::from_slice(&bytes))),
        })
    }

    /// From the config: a key when one is set.
    pub fn from_config(config: &crate::config::Config) -> anyhow::Result<Self> {
        match &config.database.encryption_key {
            Some(k) => Ok(Self::from_base64(k.expose())?),
            None => Ok(Self::plaintext()),
        }
    }

    pub fn encrypting(&self) -> bool {
        self.cipher.is_some()
    }

    pub fn seal(&self, plain: &str) -> String {
        match &self.cipher {
            None => plain.to_string(),
            Some(cipher) => {
                let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
                let sealed = cipher
                    .encrypt(&nonce, plain.as_bytes())
                    .expect("ChaCha20-Poly1305 encryption of an in-memory value cannot fail");
                let mut out = nonce.to_vec();
                out.extend_from_slice(&sealed);
                format!("{PREFIX}{}", B64.encode(out))
            }
        }
    }

    pub fn open(&self, stored: &str) -> Result<String, CryptoError> {
        let Some(encoded) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_string());
        };
        let cipher = self.cipher.as_ref().ok_or(CryptoError::NoKey)?;
        let raw = B64
            .decode(encoded)
            .map_err(|_| CryptoError::Undecryptable)?;
        if raw.len() < NONCE_LEN {
            return Err(CryptoError::Undecryptable);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let plain = cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| CryptoError::Undecryptable)?;
        String::from_utf8(plain).map_err(|_| CryptoError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    #[test]
    fn seals_and_opens() {
        let b = SecretBox::from_base64(KEY).unwrap();
        let sealed = b.seal("whsec_abc");
        assert!(sealed.starts_with(PREFIX));
        assert!(!sealed.contains("whsec_abc"));
        assert_ne!(sealed, b.seal("whsec_abc"), "a fresh nonce each time");
        assert_eq!(b.open(&sealed).unwrap(), "whsec_abc");
        // Values stored before the key existed still read.
        assert_eq!(b.open("whsec_plain").unwrap(), "whsec_plain");
    }

    #[test]
    fn wrong_or_missing_key_fails_loudly() {
        let sealed = SecretBox::from_base64(KEY).unwrap().seal("x");
        let other = SecretBox::from_base64("ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=").unwrap();
        assert_eq!(other.open(&sealed), Err(CryptoError::Undecryptable));
        assert_eq!(
            SecretBox::plaintext().open(&sealed),
            Err(CryptoError::NoKey)
        );
        assert_eq!(
            SecretBox::from_base64("c2hvcnQ=").err(),
            Some(CryptoError::BadKey)
        );
        assert_eq!(SecretBox::plaintext().seal("x"), "x");
    }
}
