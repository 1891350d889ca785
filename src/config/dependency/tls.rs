//! TLS settings shared by every dependency type, and reading the PEM files
//! they name (at load, so a missing file is a config error, and again at
//! every connect, so a rotated certificate is picked up).

use std::path::{Path, PathBuf};

use tokio_rustls::rustls::RootCertStore;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::node::Map;
use crate::config::problem::Problems;

/// The TLS keys every dependency type accepts.
pub const KEYS: &[&str] = &["tls", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name"];

/// Why a PEM file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The file is unreadable or not PEM.
    #[error("cannot read PEM certificates from {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    /// The file holds no certificate.
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    /// No certificate of the file is usable as a CA.
    #[error("{} holds no usable CA certificate", .0.display())]
    NoCa(PathBuf),
    /// The key file holds no usable private key.
    #[error("{}: cannot read a PEM private key: {source}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
}

/// TLS settings of one dependency.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// PEM file of the CA certificates to trust instead of the bundled Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to servers that ask for a client certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name sent as SNI and verified in the certificate (default: the host checked).
    pub server_name: Option<String>,
}

/// Reads the TLS keys. `by_scheme` is true when the URL already asks for TLS
/// (`https://`, `rediss://`, `amqps://`). `None` when the dependency does not
/// use TLS or a problem was recorded.
pub fn parse(d: &Map<'_>, by_scheme: bool, p: &mut Problems) -> Option<TlsSettings> {
    let before = p.count();
    let enabled = match d.bool("tls", p) {
        Some(t) if by_scheme && !t.value => {
            p.at(t.pos, d.key("tls"), "the URL scheme asks for TLS; remove `tls: false`");
            return None;
        }
        Some(t) => t.value,
        None => by_scheme,
    };
    let ca = d.str("tls_ca_file", p);
    let cert = d.str("tls_cert_file", p);
    let key = d.str("tls_key_file", p);
    let server_name = d.str("tls_server_name", p);
    if !enabled {
        let extra =
            [(&ca, "tls_ca_file"), (&cert, "tls_cert_file"), (&key, "tls_key_file"), (&server_name, "tls_server_name")];
        if let Some((Some(s), k)) = extra.into_iter().find(|(v, _)| v.is_some()) {
            p.at(s.pos, d.key(k), "only has an effect with TLS: set `tls: true` (or use the TLS URL scheme)");
        }
        return None;
    }
    // Everything that can be checked before the first connect is checked
    // now, each problem at its own key.
    if let Some(s) = &server_name
        && ServerName::try_from(s.value.as_str()).is_err()
    {
        p.at(s.pos, d.key("tls_server_name"), "not a valid DNS name or IP address");
    }
    if let Some(s) = &ca
        && let Err(e) = load_roots(Path::new(&s.value))
    {
        p.at(s.pos, d.key("tls_ca_file"), e.to_string());
    }
    match (&cert, &key) {
        (Some(c), None) => p.at(c.pos, d.key("tls_cert_file"), "a client certificate needs `tls_key_file` too"),
        (None, Some(k)) => p.at(k.pos, d.key("tls_key_file"), "a client key needs `tls_cert_file` too"),
        (Some(c), Some(k)) => {
            if let Err(e) = load_chain(Path::new(&c.value)) {
                p.at(c.pos, d.key("tls_cert_file"), e.to_string());
            }
            if let Err(PemError::Key { source, .. }) = load_key(Path::new(&k.value)) {
                p.at(k.pos, d.key("tls_key_file"), format!("cannot read a PEM private key: {source}"));
            }
        }
        (None, None) => {}
    }
    let path = |v: Option<crate::config::At<String>>| v.map(|s| PathBuf::from(s.value));
    (p.count() == before).then(|| TlsSettings {
        ca_file: path(ca),
        cert_file: path(cert),
        key_file: path(key),
        server_name: server_name.map(|s| s.value),
    })
}

/// Reads a PEM certificate chain (at least one certificate).
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| PemError::Read { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// Reads a PEM file of CA certificates to trust.
pub fn load_roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(load_chain(path)?);
    if added == 0 {
        return Err(PemError::NoCa(path.to_path_buf()));
    }
    Ok(roots)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| PemError::Key { path: path.to_path_buf(), source })
}
