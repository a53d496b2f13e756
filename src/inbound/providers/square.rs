//! Square: `x-square-hmacsha256-signature`, base64 HMAC-SHA256 of `notification_url + body`, where
//! the URL is the one registered with Square (route key `notification_url`); no timestamp.

use super::{Incoming, Verifier, VerifyError};

pub struct Square {
    secrets: Vec<Vec<u8>>,
    notification_url: String,
}

impl Square {
    pub fn new(secrets: &[&str], notification_url: Option<&str>) -> Result<Self, Vec<String>> {
        match notification_url {
            Some(url) if !url.is_empty() => Ok(Self {
                secrets: super::key_bytes(secrets),
                notification_url: url.to_string(),
            }),
            _ => Err(vec!["notification_url: required for provider \"square\" (the URL registered with Square)".into()]),
        }
    }
}

impl Verifier for Square {
    fn verify(&self, r: &Incoming<'_>) -> Result<(), VerifyError> {
        let sig = super::decode_b64(r.required("x-square-hmacsha256-signature")?)
            .ok_or(VerifyError::MalformedHeader)?;
        let expected: Vec<Vec<u8>> =
            super::hmac_sha256_each(&self.secrets, &[self.notification_url.as_bytes(), r.body]);
        super::any_match(&expected, &[sig])
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectors;
    use super::*;

    #[test]
    fn official_vector() {
        let v = &vectors::all("square")[0];
        let headers = vectors::headers(v);
        let body = vectors::body(v);
        let secret = v["secret"].as_str().unwrap();
        let url = v["notification_url"].as_str().unwrap();
        let check = |s: &Square, body: &[u8]| {
            s.verify(&Incoming {
                headers: &headers,
                body,
                query: None,
                now: 0,
            })
        };
        assert_eq!(
            check(&Square::new(&[secret], Some(url)).unwrap(), &body),
            Ok(())
        );
        assert_eq!(
            check(
                &Square::new(&[secret], Some("https://example.com/other")).unwrap(),
                &body
            ),
            Err(VerifyError::SignatureMismatch)
        );
        let mut tampered = body.clone();
        tampered[0] ^= 1;
        assert_eq!(
            check(&Square::new(&[secret], Some(url)).unwrap(), &tampered),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            check(&Square::new(&["x", secret], Some(url)).unwrap(), &body),
            Ok(())
        );
        assert!(Square::new(&[secret], None).is_err());
    }
}
