//! GitLab: `X-Gitlab-Token` equals the configured secret (compared in constant time).

use super::{Incoming, Verifier, VerifyError};

pub struct GitLab {
    secrets: Vec<Vec<u8>>,
}

impl GitLab {
    pub fn new(secrets: &[&str]) -> Self {
        Self {
            secrets: super::key_bytes(secrets),
        }
    }
}

impl Verifier for GitLab {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let token = r.required("x-gitlab-token")?;
        super::any_match(&self.secrets, &[token.as_bytes().to_vec()])
    }

    fn head_decides(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_must_match() {
        let g = GitLab::new(&["old-token", "new-token"]);
        let mut h = http::HeaderMap::new();
        let check = |h: &http::HeaderMap| {
            g.verify(&Incoming {
                headers: h,
                body: b"{}",
                query: None,
                now: 0,
            })
        };
        assert_eq!(check(&h), Err(VerifyError::MissingHeader));
        h.insert("x-gitlab-token", "new-token".parse().unwrap());
        assert_eq!(check(&h), Ok(()));
        h.insert("x-gitlab-token", "new-tokeN".parse().unwrap());
        assert_eq!(check(&h), Err(VerifyError::SignatureMismatch));
    }
}
