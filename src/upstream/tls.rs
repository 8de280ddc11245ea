//! TLS toward wss:// upstreams: rustls with the ring provider named explicitly, verified
//! against the built-in web roots or a route's own CA bundle, optionally presenting a client
//! certificate, optionally with another name for SNI and verification.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::TlsConnector;

use crate::config::RouteConfig;
use crate::tls::{self, TlsError, provider};

/// Builds the connector for one route.
pub fn connector(route: &RouteConfig) -> Result<TlsConnector, TlsError> {
    let provider = provider();
    let roots = match &route.ca {
        Some(path) => tls::root_store(path, "CA certificates")?,
        None => {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            roots
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)
        .map_err(|e| TlsError::Rejected {
            path: Default::default(),
            reason: e.to_string(),
        })?;
    let builder = if route.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider.clone())))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut config = match &route.client_cert {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = tls::load_certs(&files.cert, "client certificates")?;
            let key = tls::load_key(&files.key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Mismatch {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                    reason: e.to_string(),
                })?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name the upstream's certificate must carry: a DNS name or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("`{host}` is not a valid TLS server name"))
}

/// `insecure_skip_verify`: any certificate is accepted, but the handshake signatures are
/// still checked, so the session is at least bound to the key the server presented.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
