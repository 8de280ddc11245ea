//! TLS toward wss:// upstreams: rustls with the ring provider named explicitly, verified
//! against the built-in web roots or a route's own CA bundle.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

use crate::tls::{TlsError, provider};

/// Builds the connector for one route: `ca` replaces the web roots when given.
pub fn connector(ca: Option<&Path>) -> Result<TlsConnector, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::pem(path, "CA certificates", e))?;
            if certs.is_empty() {
                return Err(TlsError::Empty {
                    path: path.to_path_buf(),
                    what: "CA certificates",
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| TlsError::Rejected {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(crate::tls::PROTOCOL_VERSIONS)
        .map_err(|e| TlsError::Rejected {
            path: Default::default(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name the upstream's certificate must carry: a DNS name or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("`{host}` is not a valid TLS server name"))
}
