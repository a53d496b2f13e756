//! TLS to Postgres. Whether to encrypt is the connection string's `sslmode` (`disable`, `prefer` -
//! the default - or `require`), as with libpq. Invariant: with `database.tls_verify` or
//! `database.ca_file` the server's certificate and host name are verified (libpq's `verify-full`);
//! without them the connection is encrypted but the certificate is not checked, which is what
//! libpq's `prefer` and `require` do too.

use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseConfig;

/// The TLS connector every Postgres connection of Postern uses.
pub type Tls = MakeRustlsConnect;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Encrypts without checking the certificate (libpq's `prefer` / `require`).
pub fn unverified() -> Tls {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    MakeRustlsConnect::new(config)
}

/// Verifies against the Mozilla roots plus the PEM certificates in `ca_file`, if given.
pub fn verified(ca_file: Option<&str>) -> anyhow::Result<Tls> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("database.ca_file: cannot read {path}"))?
        {
            roots
                .add(cert.with_context(|| {
                    format!("database.ca_file: {path} holds an unreadable certificate")
                })?)
                .with_context(|| {
                    format!("database.ca_file: {path} holds an unusable certificate")
                })?;
            added += 1;
        }
        anyhow::ensure!(
            added > 0,
            "database.ca_file: {path} holds no PEM certificate"
        );
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The connector the configuration asks for.
pub fn from_config(database: &DatabaseConfig) -> anyhow::Result<Tls> {
    match (&database.ca_file, database.tls_verify) {
        (Some(path), _) => verified(Some(path)),
        (None, true) => verified(None),
        (None, false) => Ok(unverified()),
    }
}

/// Accepts any certificate but still checks the handshake signatures, so the session is
/// encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
