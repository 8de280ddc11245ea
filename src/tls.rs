//! TLS material shared by both sides: the crypto provider, the protocol versions, and the
//! server configuration of a TLS listener (PEM chain + PKCS#8, SEC1 or PKCS#1 key).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::version::{TLS12, TLS13};
use rustls::{ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// TLS 1.2 and 1.3 only; rustls does not implement anything older.
pub const PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

/// The crypto provider, named explicitly so that no process-wide default is needed and a
/// second provider pulled in by a dependency cannot make rustls panic at start-up.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read {what}: {reason}; check the path and that it holds PEM", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{}: no {what} found; the file must hold PEM blocks", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("{}: {reason}", path.display())]
    Rejected { path: PathBuf, reason: String },
    #[error("{} and {}: the key does not belong to the certificate ({reason}); use the key the certificate was issued for", cert.display(), key.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

impl TlsError {
    pub(crate) fn pem(path: &Path, what: &'static str, e: pem::Error) -> Self {
        let reason = match e {
            pem::Error::Io(io) => io.to_string(),
            other => format!("{other:?}"),
        };
        TlsError::Pem {
            path: path.to_path_buf(),
            what,
            reason,
        }
    }
}

/// Loads a listener's certificate chain and key and builds its server configuration.
/// Fails when either file is unreadable or the key does not match the certificate.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::pem(&files.cert, "certificates", e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: files.cert.clone(),
            what: "certificates",
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Empty {
            path: files.key.clone(),
            what: "private key",
        },
        other => TlsError::pem(&files.key, "the private key", other),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| TlsError::Rejected {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        })?;
    // WebSocket upgrades exist in HTTP/1.1 only (RFC 8441 for h2 is not supported), so
    // advertise exactly that and let clients that insist on h2 fail the handshake clearly.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
