//! What an upstream is told about the client, and nothing the client could forge: the PROXY
//! header toward byte-stream upstreams, and toward ws upstreams the forwarded headers and
//! the verified identity header that replace the client's own copies (SPEC §4, round 2).

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName};

use super::{ClientHandshake, UpstreamError};
use crate::config::{RouteConfig, TrustedHeader};
use crate::forwarded::{self, ClientAddr};
use crate::proxy_protocol;

/// Who the client is, as far as the gateway could verify it.
pub struct Introduction<'a> {
    /// The connection's peer (or the client a PROXY header named).
    pub peer: ClientAddr,
    /// The real client: `peer`, or whom a trusted proxy forwarded for.
    pub client: ClientAddr,
    /// The header `peer` writes, when it is a trusted proxy whose word is believed.
    pub trusted: Option<TrustedHeader>,
    pub tls: bool,
    /// The TLS server name the client asked for (SNI).
    pub server_name: Option<&'a str>,
    /// The gateway address the client reached (or, behind a PROXY-speaking balancer, the
    /// one it named).
    pub local: SocketAddr,
    /// This listener's identity header and the verified certificate identity, if any.
    pub identity: Option<(&'a HeaderName, Option<String>)>,
    /// Every identity header any listener sets: a client's copy of any of them is dropped
    /// on every listener, so that none can be forged through a listener without mTLS.
    pub identity_headers: &'a [HeaderName],
}

impl Introduction<'_> {
    /// The handshake toward a ws upstream for the client's request: its (normalised) target,
    /// offered subprotocols and end-to-end headers, with the forwarding and identity headers
    /// the gateway vouches for in place of the client's.
    pub fn handshake<'h>(
        &'h self,
        route: &RouteConfig,
        path_and_query: String,
        protocols: &'h [String],
        headers: &'h HeaderMap,
    ) -> ClientHandshake<'h> {
        let forwarding = forwarded::for_upstream(
            headers,
            self.peer,
            self.client,
            self.trusted,
            self.tls,
            forwarded::Policy {
                forwarded_headers: route.forwarded_headers,
                x_real_ip: route.x_real_ip,
            },
        );
        ClientHandshake {
            path_and_query,
            map_path: true,
            protocols,
            headers,
            identity: self
                .identity
                .as_ref()
                .and_then(|(name, value)| Some((*name, value.as_deref()?))),
            drop_headers: self.identity_headers,
            forwarding,
            extensions: super::deflate_offers(headers),
        }
    }

    /// The PROXY protocol header for a byte-stream upstream, naming the real client and
    /// the gateway address it reached. An upstream that expects one must never get the
    /// client's bytes without it, so failing to build it fails the request.
    pub fn proxy_header(&self, route: &RouteConfig) -> Result<Option<Vec<u8>>, UpstreamError> {
        let Some(version) = route.proxy_protocol else {
            return Ok(None);
        };
        let source = SocketAddr::new(self.client.ip, self.client.port.unwrap_or(0));
        proxy_protocol::encode(version, source, self.local, self.server_name)
            .map(Some)
            .map_err(|source| UpstreamError::ProxyHeader {
                target: route.upstream_names(),
                source,
            })
    }
}
