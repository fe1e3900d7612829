//! The bundled cloud's development PKI: a CA, a broker certificate for the local machine, and
//! one client certificate per identity (each gateway, the relay) whose common name is that
//! identity. Brokers map the common name to the MQTT username (`use_identity_as_username`),
//! which is what confines a gateway to its own topics.
//!
//! Layout of the PKI directory (private keys mode 0600):
//!
//! ```text
//! ca.pem  ca.key                    the CA
//! broker.pem  broker.key            server certificate: localhost, 127.0.0.1, ::1
//! clients/<name>.pem  <name>.key    client certificates, CN = <name>
//! ```
//!
//! For development and integration runs only: a fleet uses its own CA, HSM-backed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use thiserror::Error;

/// The relay's identity: it may reach every gateway's subtree.
pub const RELAY_IDENTITY: &str = "lockhub-relay";

const CA_NAME: &str = "lockhub development CA";

/// Why the PKI could not be made or used.
#[derive(Debug, Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A client name is not usable as an MQTT username and topic level.
    #[error("{0:?} is not a valid identity: 1-64 characters of letters, digits, '.', '_' or '-'")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_owned(), source }
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mode = if private { 0o600 } else { 0o644 };
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// A PKI directory.
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Creates the CA and the broker certificate in `dir`, unless they exist; then makes sure
    /// each of `clients` (and the relay) has a client certificate.
    pub fn init(dir: &Path, clients: &[&str]) -> Result<Self, PkiError> {
        let pki = Pki { dir: dir.to_owned() };
        if !pki.ca_cert().exists() {
            let ca_key = KeyPair::generate()?;
            let ca = ca_params()?.self_signed(&ca_key)?;
            write(&pki.dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
            write(&pki.ca_cert(), &ca.pem(), false)?;
        }
        if !pki.broker_cert().exists() {
            let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, "localhost");
            params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            params.subject_alt_names.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            pki.issue(params, &pki.broker_cert(), &pki.broker_key())?;
        }
        for name in clients.iter().copied().chain([RELAY_IDENTITY]) {
            if !pki.client_cert(name).exists() {
                pki.issue_client(name)?;
            }
        }
        Ok(pki)
    }

    /// Opens an existing PKI directory.
    pub fn open(dir: &Path) -> Self {
        Pki { dir: dir.to_owned() }
    }

    /// The PKI's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues (or reissues) a client certificate whose common name is `name`.
    pub fn issue_client(&self, name: &str) -> Result<(), PkiError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !ok {
            return Err(PkiError::BadName(name.to_owned()));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, &self.client_cert(name), &self.client_key(name))
    }

    fn issue(&self, mut params: CertificateParams, cert: &Path, key: &Path) -> Result<(), PkiError> {
        let ca_key_pem = std::fs::read_to_string(self.dir.join("ca.key")).map_err(io(&self.dir.join("ca.key")))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key_pair = KeyPair::generate()?;
        let signed = params.signed_by(&key_pair, &issuer)?;
        write(key, &key_pair.serialize_pem(), true)?;
        write(cert, &signed.pem(), false)
    }

    /// The CA certificate (PEM).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The broker's certificate (PEM).
    pub fn broker_cert(&self) -> PathBuf {
        self.dir.join("broker.pem")
    }

    /// The broker's private key (PEM).
    pub fn broker_key(&self) -> PathBuf {
        self.dir.join("broker.key")
    }

    /// A client's certificate (PEM).
    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{name}.pem"))
    }

    /// A client's private key (PEM).
    pub fn client_key(&self, name: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{name}.key"))
    }

    /// The `[cloud]` section of gateway `name` (a client of this PKI) reaching `brokers`.
    pub fn cloud_section(&self, name: &str, brokers: Vec<String>) -> crate::config::CloudSection {
        crate::config::CloudSection::new(brokers, self.ca_cert(), self.client_cert(name), self.client_key(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_makes_private_keys_and_refuses_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), &["gw-1"]).unwrap();
        for key in [dir.path().join("ca.key"), pki.broker_key(), pki.client_key("gw-1"), pki.client_key(RELAY_IDENTITY)]
        {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let ca = std::fs::read(pki.ca_cert()).unwrap();
        Pki::init(dir.path(), &["gw-2"]).unwrap();
        assert_eq!(std::fs::read(pki.ca_cert()).unwrap(), ca, "an existing CA is kept");
        assert!(pki.client_cert("gw-2").exists());
        assert!(matches!(pki.issue_client("a/b"), Err(PkiError::BadName(_))));
        assert!(matches!(pki.issue_client("+"), Err(PkiError::BadName(_))));
    }
}
