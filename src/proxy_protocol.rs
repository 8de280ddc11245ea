//! The PROXY protocol (HAProxy's, versions 1 and 2): read from load balancers in front of
//! a listener, written to byte-stream upstreams behind a route. The header formats are the
//! `ppp` crate's; this module decides who may send one and what is done with it.

use std::io;
use std::net::SocketAddr;

use ppp::PartialResult;
use ppp::v2;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyProtocol;
use crate::prefixed::Prefixed;

/// A v1 header is at most 107 bytes; v2 headers carry TLVs, and load balancers add a few
/// (AWS, Azure, GCP ids). 4 KiB is far above any of them and bounds what a peer can make
/// the gateway read before it has said anything else.
const MAX_HEADER: usize = 4096;

/// The v2 signature and the start of a v1 line.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line the specification allows, CRLF included.
const V1_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the peer is not in the listener's `trusted` list but sent a PROXY protocol header")]
    Untrusted,
    #[error("no PROXY protocol header from a trusted peer (accept_proxy_protocol is on)")]
    Missing,
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

/// Whether `bytes` start a PROXY header: `None` while too few bytes have arrived to tell.
fn looks_like_header(bytes: &[u8]) -> Option<bool> {
    let agrees = |sig: &[u8]| sig.starts_with(&bytes[..bytes.len().min(sig.len())]);
    let complete = |sig: &[u8]| agrees(sig) && bytes.len() >= sig.len();
    if complete(V1_PREFIX) || complete(V2_SIGNATURE) {
        Some(true)
    } else if agrees(V1_PREFIX) || agrees(V2_SIGNATURE) {
        None
    } else {
        Some(false)
    }
}

/// The connection a PROXY header describes: the client, and the address it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Reads the start of a connection on a listener with `accept_proxy_protocol`. A trusted
/// peer must begin with a PROXY header: `Some` of the connection it names is returned
/// (`Some(None)` for a header that names none: v2 LOCAL, v1 UNKNOWN, unix or unspecified
/// families). An untrusted peer must not send one (`None`). Whatever was read past the
/// header stays in the returned stream.
pub async fn accept<S: AsyncRead + Unpin>(
    mut stream: S,
    trusted: bool,
) -> Result<(Option<Option<Proxied>>, Prefixed<S>), ProxyHeaderError> {
    let mut buf = Vec::with_capacity(256);
    loop {
        let decided = looks_like_header(&buf);
        match decided {
            Some(false) if trusted => return Err(ProxyHeaderError::Missing),
            Some(false) => return Ok((None, Prefixed::new(buf, stream))),
            Some(true) if !trusted => return Err(ProxyHeaderError::Untrusted),
            Some(true) => {
                // A v1 line is parsed only once its CRLF (or its longest possible length) is
                // here: ppp calls some prefixes of a valid line invalid (`PROXY TCP4 a b 1 `,
                // a read that ends after the source port's space; found by the
                // proxy_protocol fuzz target), so a header split there would be refused.
                let v1 = buf.starts_with(V1_PREFIX);
                let v1_done = buf.windows(2).any(|w| w == b"\r\n") || buf.len() > V1_MAX;
                let result = (!v1 || v1_done).then(|| ppp::HeaderResult::parse(&buf));
                if let Some(result) = result.filter(|r| r.is_complete()) {
                    let (source, used) = source_of(result)?;
                    let rest = buf.split_off(used);
                    return Ok((Some(source), Prefixed::new(rest, stream)));
                }
                // ppp reports a v1 line with missing fields as "incomplete"; once its CRLF
                // (or its longest possible length) is here, nothing more can complete it.
                if v1 && v1_done {
                    let line = String::from_utf8_lossy(&buf[..buf.len().min(V1_MAX)]);
                    return Err(ProxyHeaderError::Invalid(format!(
                        "malformed v1 line {:?}",
                        line.trim_end()
                    )));
                }
            }
            None => {}
        }
        if buf.len() >= MAX_HEADER {
            return Err(ProxyHeaderError::TooLong);
        }
        let mut chunk = [0u8; 512];
        let want = chunk.len().min(MAX_HEADER - buf.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The connection a complete header names, and the header's length.
fn source_of(result: ppp::HeaderResult<'_>) -> Result<(Option<Proxied>, usize), ProxyHeaderError> {
    let invalid = |e: &dyn std::fmt::Display| ProxyHeaderError::Invalid(e.to_string());
    let pair = |source: (std::net::IpAddr, u16), destination: (std::net::IpAddr, u16)| {
        Some(Proxied {
            source: source.into(),
            destination: destination.into(),
        })
    };
    match result {
        ppp::HeaderResult::V1(Ok(header)) => {
            let proxied = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => pair(
                    (a.source_address.into(), a.source_port),
                    (a.destination_address.into(), a.destination_port),
                ),
                ppp::v1::Addresses::Tcp6(a) => pair(
                    (a.source_address.into(), a.source_port),
                    (a.destination_address.into(), a.destination_port),
                ),
                ppp::v1::Addresses::Unknown => None,
            };
            Ok((proxied, header.header.len()))
        }
        ppp::HeaderResult::V2(Ok(header)) => {
            let proxied = match (header.command, header.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => pair(
                    (a.source_address.into(), a.source_port),
                    (a.destination_address.into(), a.destination_port),
                ),
                (_, v2::Addresses::IPv6(a)) => pair(
                    (a.source_address.into(), a.source_port),
                    (a.destination_address.into(), a.destination_port),
                ),
                (_, _) => None,
            };
            Ok((proxied, header.len()))
        }
        ppp::HeaderResult::V1(Err(e)) => Err(invalid(&e)),
        ppp::HeaderResult::V2(Err(e)) => Err(invalid(&e)),
    }
}

/// The header a route sends first to its byte-stream upstream: who the client is
/// (`source`), which gateway address it reached (`destination`) and, in v2, the TLS server
/// name it asked for.
pub fn encode(
    version: ProxyProtocol,
    source: SocketAddr,
    destination: SocketAddr,
    server_name: Option<&str>,
) -> io::Result<Vec<u8>> {
    // Both addresses must be of one family; a v4 client on a v6 socket arrives v4-mapped.
    let (source, destination) = same_family(source, destination);
    match version {
        ProxyProtocol::V1 => Ok(ppp::v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes()),
        ProxyProtocol::V2 => {
            let mut builder = v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                (source, destination),
            );
            if let Some(name) = server_name {
                builder = builder.write_tlv(v2::Type::Authority, name.as_bytes())?;
            }
            builder.build()
        }
    }
}

/// The header of a connection the gateway makes for itself (health checks): v2 LOCAL or
/// v1 UNKNOWN, which tell the upstream to use the connection's own addresses.
pub fn encode_local(version: ProxyProtocol) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyProtocol::V2 => {
            let mut header = V2_SIGNATURE.to_vec();
            // Version 2, command LOCAL; family and protocol unspecified; no addresses.
            header.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            header
        }
    }
}

fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canonical(source), canonical(destination));
    match (s, d) {
        (SocketAddr::V4(_), SocketAddr::V6(_)) | (SocketAddr::V6(_), SocketAddr::V4(_)) => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
                v6 => v6,
            };
            (v6(s), v6(d))
        }
        same => same,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accept_bytes(
        bytes: &[u8],
        trusted: bool,
    ) -> Result<(Option<Option<SocketAddr>>, Vec<u8>), ProxyHeaderError> {
        let (proxied, mut rest) = accept(bytes, trusted).await?;
        let mut after = Vec::new();
        rest.read_to_end(&mut after).await?;
        Ok((proxied.map(|p| p.map(|p| p.source)), after))
    }

    #[tokio::test]
    async fn both_versions_round_trip_and_keep_what_follows() {
        let client: SocketAddr = "203.0.113.7:51234".parse().unwrap();
        let gateway: SocketAddr = "10.0.0.2:443".parse().unwrap();
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut wire = encode(version, client, gateway, Some("app.example.com")).unwrap();
            wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (source, after) = accept_bytes(&wire, true).await.unwrap();
            assert_eq!(source, Some(Some(client)), "{version:?}");
            assert_eq!(after, b"GET / HTTP/1.1\r\n", "{version:?}");
        }
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let wire = encode(ProxyProtocol::V1, v6, gateway, None).unwrap();
        assert!(wire.starts_with(b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.2 4000 443\r\n"));
        assert_eq!(accept_bytes(&wire, true).await.unwrap().0, Some(Some(v6)));
    }

    /// A header that arrives in two reads, split at every byte, is the same header.
    #[tokio::test]
    async fn a_header_split_across_reads_is_still_read() {
        let client: SocketAddr = "203.0.113.7:51234".parse().unwrap();
        let gateway: SocketAddr = "10.0.0.2:443".parse().unwrap();
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut wire = encode(version, client, gateway, None).unwrap();
            wire.extend_from_slice(b"GET");
            for split in 1..wire.len() {
                let (first, second) = wire.split_at(split);
                let stream = tokio_test_reader(first, second);
                let (proxied, mut rest) = accept(stream, true)
                    .await
                    .unwrap_or_else(|e| panic!("{version:?} split at {split}: {e}"));
                assert_eq!(
                    proxied,
                    Some(Some(Proxied {
                        source: client,
                        destination: gateway
                    }))
                );
                let mut after = Vec::new();
                rest.read_to_end(&mut after).await.unwrap();
                assert_eq!(after, b"GET", "{version:?} split at {split}");
            }
        }
    }

    /// A reader that returns `first`, then `second`, in two reads.
    fn tokio_test_reader(first: &[u8], second: &[u8]) -> impl AsyncRead + Unpin {
        AsyncReadExt::chain(
            std::io::Cursor::new(first.to_vec()),
            std::io::Cursor::new(second.to_vec()),
        )
    }

    #[tokio::test]
    async fn local_headers_name_nobody() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut wire = encode_local(version);
            wire.extend_from_slice(b"rest");
            let (source, after) = accept_bytes(&wire, true).await.unwrap();
            assert_eq!(
                (source, after.as_slice()),
                (Some(None), &b"rest"[..]),
                "{version:?}: a header that names nobody is still a header"
            );
        }
    }

    #[tokio::test]
    async fn who_may_send_a_header() {
        let header = encode(
            ProxyProtocol::V1,
            "192.0.2.1:1".parse().unwrap(),
            "192.0.2.2:2".parse().unwrap(),
            None,
        )
        .unwrap();
        assert!(matches!(
            accept_bytes(&header, false).await,
            Err(ProxyHeaderError::Untrusted)
        ));
        assert!(matches!(
            accept_bytes(b"GET / HTTP/1.1\r\n", true).await,
            Err(ProxyHeaderError::Missing)
        ));
        let (source, after) = accept_bytes(b"GET / HTTP/1.1\r\n", false).await.unwrap();
        assert_eq!(
            (source, after.as_slice()),
            (None, &b"GET / HTTP/1.1\r\n"[..])
        );
        assert!(matches!(
            accept_bytes(b"PROXY TCP4 nonsense\r\n", true).await,
            Err(ProxyHeaderError::Invalid(_))
        ));
    }
}
