//! TLS configurations from PEM files: rustls with the ring provider, chosen explicitly. For the
//! cloud link, the broker is authenticated against a pinned CA (no system roots unless
//! configured), the gateway by its client certificate. For the bundled broker, the converse:
//! every client must present a certificate from the pinned CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use thiserror::Error;

/// Why the TLS configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A PEM file holds no certificate or key.
    #[error("{path}: no {what} found (expected PEM)")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
    /// A certificate was refused as a trust anchor.
    #[error("{path}: not a usable CA certificate: {source}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The largest certificate or key file read: a CA, a chain or a key is a few KiB; more is the
/// wrong file (and a device would never end).
pub const MAX_PEM_BYTES: usize = 64 * 1024;

fn read_pem(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, TlsError> {
    crate::bounded_file::read(path, MAX_PEM_BYTES).map_err(|source| TlsError::Io { path: path.to_owned(), source })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Io { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { path: path.to_owned(), what: "certificate" });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Io { path: path.to_owned(), source })?
        .ok_or_else(|| TlsError::Empty { path: path.to_owned(), what: "private key" })
}

/// The trust anchors: the certificates in `ca`, nothing else.
fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certificates(ca)? {
        roots.add(c).map_err(|source| TlsError::BadCa { path: ca.to_owned(), source })?;
    }
    Ok(roots)
}

fn client_builder(ca: &Path) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?))
}

/// Builds the client configuration: trust only `ca`, present `cert` with `key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(Arc::new(client_builder(ca)?.with_client_auth_cert(certificates(cert)?, private_key(key)?)?))
}

/// Builds a client configuration that trusts only `ca` and presents no certificate (the
/// local broker, which authenticates by user name and password).
pub fn server_auth_config(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(Arc::new(client_builder(ca)?.with_no_client_auth()))
}

/// Builds a broker's configuration: present `cert` with `key`, and require a client
/// certificate signed by `ca` (no anonymous clients, no other CA).
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(cert)?, private_key(key)?)?;
    Ok(Arc::new(config))
}
