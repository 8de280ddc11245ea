//! TLS material shared by both sides: the crypto provider, the protocol versions, and the
//! server configuration of a TLS listener: certificates chosen by SNI, client certificates
//! (mTLS), session resumption.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use rustls::{ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{ListenerTls, TlsFiles};
use crate::devcert::Ephemeral;

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
    #[error("self_signed: cannot make the certificate: {0}")]
    SelfSigned(String),
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

/// Reads every certificate of a PEM file (a chain, or a CA bundle).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::pem(path, what, e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(certs)
}

/// Reads a private key: PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Empty {
            path: path.to_path_buf(),
            what: "private key",
        },
        other => TlsError::pem(path, "the private key", other),
    })
}

/// A certificate chain with its key, checked to belong together.
pub fn certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(&files.cert, "certificates")?;
    let key = load_key(&files.key)?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(|e| TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        })
}

/// Loads a CA bundle into a root store.
pub fn root_store(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, what)? {
        roots.add(cert).map_err(|e| TlsError::Rejected {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A TLS listener's server configuration, and the key its default certificate holds.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// base64 SHA-256 of the default certificate's SubjectPublicKeyInfo (Chromium's
    /// `--ignore-certificate-errors-spki-list`).
    pub spki_sha256: Option<String>,
}

/// Builds the server configuration of a TLS listener. A `self_signed` one takes its
/// certificate from `ephemeral`, the process's in-memory CA.
pub fn server_config(
    tls: &ListenerTls,
    ephemeral: Option<&Ephemeral>,
) -> Result<ServerTls, TlsError> {
    let provider = provider();
    let mut certs = tls
        .certs
        .iter()
        .map(|files| certified_key(files, &provider))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(self_signed) = &tls.self_signed {
        let made = ephemeral
            .ok_or_else(|| TlsError::SelfSigned("no in-memory CA was made".into()))?
            .cert(&self_signed.names, &provider)
            .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
        certs.insert(0, made.key);
    }
    let spki_sha256 = certs
        .first()
        .and_then(|key| key.end_entity_cert().ok())
        .and_then(spki_sha256);
    let first_path = tls
        .certs
        .first()
        .map(|f| f.cert.clone())
        .unwrap_or_else(|| PathBuf::from("<self_signed>"));
    let verifier: Arc<dyn ClientCertVerifier> = match &tls.client_auth {
        None => WebPkiClientVerifier::no_client_auth(),
        Some(auth) => {
            let roots = Arc::new(root_store(&auth.ca, "client CA certificates")?);
            let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            let builder = if auth.required {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            builder.build().map_err(|e| TlsError::Rejected {
                path: auth.ca.clone(),
                reason: e.to_string(),
            })?
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| TlsError::Rejected {
            path: first_path,
            reason: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SniResolver { certs }));
    // h2 first when on: browsers that get it use RFC 8441 for their WebSockets on the same
    // connection as the page. `http2 = false` keeps a listener on HTTP/1.1.
    config.alpn_protocols = if tls.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    // Resumption: the in-memory session cache (rustls' default) serves TLS 1.2 session IDs
    // and TLS 1.3 stateful tickets; stateless tickets also survive cache eviction.
    if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(ServerTls {
        config: Arc::new(config),
        spki_sha256,
    })
}

/// base64 SHA-256 of a certificate's SubjectPublicKeyInfo.
pub fn spki_sha256(der: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    Some(crate::devcert::spki_sha256(cert.public_key().raw))
}

/// Picks the certificate by SNI: the first that covers the requested name (exact or
/// wildcard, as webpki checks it for clients), else the first one (the default).
#[derive(Debug)]
struct SniResolver {
    certs: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let default = self.certs.first().cloned();
        if self.certs.len() == 1 {
            return default;
        }
        let Some(name) = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok())
        else {
            return default;
        };
        self.certs
            .iter()
            .find(|key| {
                key.end_entity_cert()
                    .ok()
                    .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                    .is_some_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
            })
            .cloned()
            .or(default)
    }
}

/// The verified identity of a client certificate, for logs and the identity header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub subject: String,
    pub sans: Vec<String>,
}

impl ClientIdentity {
    /// Reads subject and subject alternative names from a (verified) certificate.
    pub fn from_certificate(der: &CertificateDer<'_>) -> Option<ClientIdentity> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
        let subject = cert.subject().to_string();
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                    GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                    GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => sans.push(format!(
                            "IP:{}",
                            std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])
                        )),
                        16 => {
                            let mut octets = [0u8; 16];
                            octets.copy_from_slice(ip);
                            sans.push(format!("IP:{}", std::net::Ipv6Addr::from(octets)));
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Some(ClientIdentity { subject, sans })
    }
}

impl fmt::Display for ClientIdentity {
    /// `subject="CN=alice,O=Example"; sans="DNS:alice.example,IP:10.0.0.5"`: each part a
    /// quoted string with `\` and `"` escaped, so that a subject holding `; DNS:…` cannot
    /// pose as a subject alternative name. One header-safe line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn quoted(text: &str) -> String {
            let mut out = String::with_capacity(text.len() + 2);
            out.push('"');
            for c in text.chars() {
                match c {
                    '"' | '\\' => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if c.is_control() => out.push(' '),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        write!(
            f,
            "subject={}; sans={}",
            quoted(&self.subject),
            quoted(&self.sans.join(","))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_parts_cannot_be_forged() {
        let id = ClientIdentity {
            subject: "CN=bob\"; sans=\"DNS:admin.internal".into(),
            sans: vec!["DNS:bob.example".into()],
        };
        assert_eq!(
            id.to_string(),
            "subject=\"CN=bob\\\"; sans=\\\"DNS:admin.internal\"; sans=\"DNS:bob.example\""
        );
    }
}
