//! The client side of the WebSocket handshake toward a ws:// or wss:// upstream.
//!
//! Written here rather than run through hyper's client: a handshake is one request head out
//! and one response head back, and hyper's client connection (its dispatcher, channels and
//! boxed upgrade) cost a third of the gateway's CPU per connection in the handshake
//! benchmark. `fastwebsockets::handshake::client` is no alternative: it does not verify
//! `Sec-WebSocket-Accept`, compares `Connection` as a whole value instead of a token list,
//! and spawns a task that can outlive a timed-out handshake. The response head is parsed with
//! httparse, the parser hyper itself uses.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::Empty;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::UpstreamError;
use crate::forwarded::{Forwarding, same_header};
use crate::handshake::{accept_key, has_token};
use crate::prefixed::Prefixed;

/// A WebSocket connection to an upstream, after its handshake: what the upstream sent after
/// its 101 (frames may follow in the same packet) is read first.
pub type UpstreamWs = Prefixed<WsTransport>;

/// The connections a ws upstream is reached over; one type, so that the relay is not made
/// once per transport and nothing is boxed behind a vtable on the hot path.
pub enum WsTransport {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: a TLS session is large, and most upstreams are plain.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// An in-process WebSocket server: a tcp upstream with `framing = "lines"` (`lines`).
    Pipe(tokio::io::DuplexStream),
}

/// The largest response head accepted from an upstream.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Headers parsed in a response head, at most.
const MAX_RESPONSE_HEADERS: usize = 64;

/// What the upstream handshake forwards from the client's request.
pub struct ClientHandshake<'a> {
    /// The client's request target (path and query).
    pub path_and_query: String,
    /// Map it onto each upstream's path like nginx's proxy_pass (client requests), or send
    /// it as it is (health checks).
    pub map_path: bool,
    /// The client's offered subprotocols, passed on in order.
    pub protocols: &'a [String],
    /// The client's request headers; end-to-end ones are forwarded (Origin, Cookie,
    /// Authorization, User-Agent, …), hop-by-hop and handshake ones are not.
    pub headers: &'a HeaderMap,
    /// mTLS listeners with `identity_header`: the header name and the verified identity of
    /// the client's certificate.
    pub identity: Option<(&'a HeaderName, &'a str)>,
    /// Client headers that never pass: every identity header of every listener.
    pub drop_headers: &'a [HeaderName],
    /// X-Forwarded-For and friends: which of the client's to drop, which to set.
    pub forwarding: Forwarding,
    /// The permessage-deflate offers of the client's `Sec-WebSocket-Extensions`, passed on
    /// (RFC 7692 end to end: the upstream's answer goes back to the client).
    pub extensions: Option<String>,
}

/// The permessage-deflate offers among a client's `Sec-WebSocket-Extensions` headers.
pub fn deflate_offers(headers: &HeaderMap) -> Option<String> {
    let offers: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|offer| is_deflate(offer))
        .collect();
    (!offers.is_empty()).then(|| offers.join(", "))
}

fn is_deflate(extension: &str) -> bool {
    extension
        .split(';')
        .next()
        .is_some_and(|name| name.trim().eq_ignore_ascii_case("permessage-deflate"))
}

pub(super) enum Failure {
    Io(io::Error),
    Status(StatusCode),
    Invalid(String),
}

impl Failure {
    pub(super) fn into_upstream_error(self, target: &str) -> UpstreamError {
        let target = target.to_string();
        match self {
            Failure::Status(status) => UpstreamError::Status { target, status },
            Failure::Io(e) => UpstreamError::Handshake {
                target,
                reason: e.to_string(),
            },
            Failure::Invalid(reason) => UpstreamError::Handshake { target, reason },
        }
    }
}

/// Headers that describe one hop, or that the gateway sets itself for the upstream hop.
const NOT_FORWARDED: &[HeaderName] = &[
    header::HOST,
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_PROTOCOL,
    header::SEC_WEBSOCKET_ACCEPT,
    // Only the permessage-deflate part of the offer goes on (`ClientHandshake::extensions`):
    // the relay passes its RSV1 frames through, and would refuse any other extension's.
    header::SEC_WEBSOCKET_EXTENSIONS,
];

pub(super) async fn handshake(
    mut stream: WsTransport,
    host: &str,
    path_and_query: &str,
    hs: &ClientHandshake<'_>,
) -> Result<(UpstreamWs, Agreed), Failure> {
    let key = fastwebsockets::handshake::generate_key();
    let request = build_request(host, path_and_query, &key, hs)?;
    stream
        .write_all(&request_head(&request))
        .await
        .map_err(Failure::Io)?;
    stream.flush().await.map_err(Failure::Io)?;
    let (status, headers, rest) = read_response(&mut stream).await?;
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(Failure::Status(status));
    }
    let agreed = verify(&headers, &key, hs)?;
    Ok((Prefixed::new(rest, stream), agreed))
}

/// What the upstream agreed to: a subprotocol, and permessage-deflate's parameters.
#[derive(Debug, Default)]
pub struct Agreed {
    pub protocol: Option<String>,
    pub extensions: Option<String>,
}

/// The request head as it goes on the wire: one buffer, one write.
fn request_head(request: &Request<Empty<Bytes>>) -> Vec<u8> {
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Reads the upstream's response head: its status, its headers, and the bytes after it.
async fn read_response(
    stream: &mut WsTransport,
) -> Result<(StatusCode, HeaderMap, Vec<u8>), Failure> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await.map_err(Failure::Io)? == 0 {
            return Err(Failure::Invalid(
                "the connection closed before the response head was complete".into(),
            ));
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut slots);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response
                    .code
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .ok_or_else(|| Failure::Invalid("the response has no valid status".into()))?;
                let mut headers = HeaderMap::with_capacity(response.headers.len());
                for h in response.headers.iter() {
                    let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(h.name.as_bytes()),
                        HeaderValue::from_bytes(h.value),
                    ) else {
                        return Err(Failure::Invalid(format!(
                            "the response has a malformed header {:?}",
                            h.name
                        )));
                    };
                    headers.append(name, value);
                }
                return Ok((status, headers, buf.split_off(len)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(Failure::Invalid(format!(
                    "the response head is larger than {} KiB",
                    MAX_RESPONSE_HEAD / 1024
                )));
            }
            Err(e) => return Err(Failure::Invalid(format!("malformed response head: {e}"))),
        }
    }
}

fn build_request(
    host: &str,
    path_and_query: &str,
    key: &str,
    hs: &ClientHandshake<'_>,
) -> Result<Request<Empty<Bytes>>, Failure> {
    let invalid =
        |e: http::Error| Failure::Invalid(format!("cannot build the upstream request: {e}"));
    let mut request = Request::builder()
        .method("GET")
        .uri(path_and_query)
        .body(Empty::new())
        .map_err(invalid)?;
    let connection_tokens: Vec<String> = hs
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let headers = request.headers_mut();
    for (name, value) in hs.headers {
        let hop_by_hop = NOT_FORWARDED.contains(name)
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection"
            || connection_tokens.iter().any(|t| t == name.as_str());
        let spoofable =
            hs.forwarding.drops(name) || hs.drop_headers.iter().any(|h| same_header(h, name));
        if !hop_by_hop && !spoofable {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some((name, value)) = hs.identity
        && let Ok(value) = HeaderValue::from_str(value)
    {
        headers.insert(name.clone(), value);
    }
    for (name, value) in &hs.forwarding.set {
        headers.insert(name.clone(), value.clone());
    }
    if let Some(offer) = hs
        .extensions
        .as_deref()
        .and_then(|o| HeaderValue::from_str(o).ok())
    {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, offer);
    }
    let value = |s: &str| {
        HeaderValue::from_str(s)
            .map_err(|_| Failure::Invalid(format!("`{s}` is not a valid header value")))
    };
    headers.insert(header::HOST, value(host)?);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::SEC_WEBSOCKET_KEY, value(key)?);
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    if !hs.protocols.is_empty() {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            value(&hs.protocols.join(", "))?,
        );
    }
    Ok(request)
}

/// RFC 6455 §4.1, the client's checks of the server's 101 response.
fn verify(headers: &HeaderMap, key: &str, hs: &ClientHandshake<'_>) -> Result<Agreed, Failure> {
    check_response(headers, key, hs.protocols, hs.extensions.is_some())
}

/// The 101's checks: Upgrade, Connection, Accept, and choices among what was offered.
fn check_response(
    headers: &HeaderMap,
    key: &str,
    offered: &[String],
    extensions_offered: bool,
) -> Result<Agreed, Failure> {
    if !has_token(headers, &header::UPGRADE, "websocket") {
        return Err(Failure::Invalid(
            "the 101 response has no `Upgrade: websocket`".into(),
        ));
    }
    if !has_token(headers, &header::CONNECTION, "upgrade") {
        return Err(Failure::Invalid(
            "the 101 response has no `Connection: upgrade`".into(),
        ));
    }
    let expected = accept_key(key.as_bytes());
    match headers.get(header::SEC_WEBSOCKET_ACCEPT) {
        Some(accept) if accept.as_bytes() == expected.as_bytes() => {}
        Some(accept) => {
            return Err(Failure::Invalid(format!(
                "Sec-WebSocket-Accept is {accept:?}, expected {expected:?}"
            )));
        }
        None => {
            return Err(Failure::Invalid(
                "the 101 response has no Sec-WebSocket-Accept".into(),
            ));
        }
    }
    let extensions = match headers.get(header::SEC_WEBSOCKET_EXTENSIONS) {
        None => None,
        Some(_) if !extensions_offered => {
            return Err(Failure::Invalid(
                "the upstream chose an extension, but none was offered".into(),
            ));
        }
        Some(value) => {
            let value = value.to_str().unwrap_or_default().trim();
            // RFC 7692 §5: one permessage-deflate answer, nothing else.
            if value.contains(',') || !is_deflate(value) {
                return Err(Failure::Invalid(format!(
                    "the upstream chose extensions {value:?}; only permessage-deflate was offered"
                )));
            }
            Some(value.to_string())
        }
    };
    let protocol = match headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        None => None,
        Some(chosen) => {
            let chosen = chosen.to_str().unwrap_or_default().trim();
            if !offered.iter().any(|p| p == chosen) {
                return Err(Failure::Invalid(format!(
                    "the upstream chose subprotocol {chosen:?}, which the client did not offer"
                )));
            }
            Some(chosen.to_string())
        }
    };
    Ok(Agreed {
        protocol,
        extensions,
    })
}

macro_rules! each_transport {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            WsTransport::Tcp($s) => $e,
            WsTransport::Unix($s) => $e,
            WsTransport::Tls($s) => $e,
            WsTransport::Pipe($s) => $e,
        }
    };
}

impl AsyncRead for WsTransport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_transport!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for WsTransport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_transport!(self, s => Pin::new(s).poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_transport!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WsTransport::Tcp(s) => s.is_write_vectored(),
            WsTransport::Unix(s) => s.is_write_vectored(),
            WsTransport::Tls(s) => s.is_write_vectored(),
            WsTransport::Pipe(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_transport!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_transport!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The response head arrives in pieces and frames follow it in the same read: the
    /// head is parsed once complete, and the bytes after it are read first by the relay.
    #[tokio::test]
    async fn the_response_head_is_read_whole_and_what_follows_it_is_kept() {
        let (ours, mut upstream) = UnixStream::pair().unwrap();
        let mut ours = WsTransport::Unix(ours);
        let writer = tokio::spawn(async move {
            upstream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgr")
                .await
                .unwrap();
            tokio::task::yield_now().await;
            upstream
                .write_all(b"ade: websocket\r\nConnection: Upgrade\r\n\r\n\x82\x01x")
                .await
                .unwrap();
            upstream
        });
        let Ok((status, headers, rest)) = read_response(&mut ours).await else {
            panic!("response not read");
        };
        assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(rest, b"\x82\x01x");
        drop(writer.await);
    }

    #[tokio::test]
    async fn a_response_cut_short_or_too_large_is_refused() {
        let (ours, mut upstream) = UnixStream::pair().unwrap();
        let mut ours = WsTransport::Unix(ours);
        upstream.write_all(b"HTTP/1.1 101 Swi").await.unwrap();
        drop(upstream);
        let Err(Failure::Invalid(reason)) = read_response(&mut ours).await else {
            panic!("a cut response was accepted");
        };
        assert!(reason.contains("closed before"), "{reason}");

        let (ours, mut upstream) = UnixStream::pair().unwrap();
        let mut ours = WsTransport::Unix(ours);
        let flood = tokio::spawn(async move {
            // Long lines: the size limit, not the header count, is what stops this one.
            let line = format!("X-Filler: {}\r\n", "a".repeat(400));
            let _ = upstream.write_all(b"HTTP/1.1 101 OK\r\n").await;
            while upstream.write_all(line.as_bytes()).await.is_ok() {}
        });
        let Err(Failure::Invalid(reason)) = read_response(&mut ours).await else {
            panic!("an endless response was accepted");
        };
        assert!(reason.contains("larger than 16 KiB"), "{reason}");
        drop(ours);
        drop(flood.await);
    }

    #[test]
    fn the_request_head_is_what_the_request_says() {
        let mut request = Request::builder()
            .uri("/chat?room=1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("backend:9000"));
        request
            .headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            request_head(&request),
            b"GET /chat?room=1 HTTP/1.1\r\nhost: backend:9000\r\nupgrade: websocket\r\n\r\n"
        );
    }

    fn response_headers(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(accept).unwrap(),
        );
        h
    }

    #[test]
    fn accept_is_verified() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        assert!(
            check_response(
                &response_headers("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                key,
                &[],
                false
            )
            .is_ok()
        );
        assert!(
            check_response(
                &response_headers("AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                key,
                &[],
                false
            )
            .is_err()
        );
    }

    #[test]
    fn chosen_protocol_must_be_offered() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut h = response_headers("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat"),
        );
        assert_eq!(
            check_response(&h, key, &["chat".to_string()], false)
                .ok()
                .and_then(|a| a.protocol)
                .as_deref(),
            Some("chat")
        );
        assert!(check_response(&h, key, &["other".to_string()], false).is_err());
        // An extension answer needs an offer, and only permessage-deflate passes.
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate; server_no_context_takeover"),
        );
        assert!(check_response(&h, key, &["chat".to_string()], false).is_err());
        assert!(check_response(&h, key, &["chat".to_string()], true).is_ok());
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("x-webkit-deflate-frame"),
        );
        assert!(check_response(&h, key, &["chat".to_string()], true).is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut client = HeaderMap::new();
        client.insert(header::HOST, HeaderValue::from_static("public.example"));
        client.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, X-Hop"),
        );
        client.insert("x-hop", HeaderValue::from_static("1"));
        client.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        client.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
        client.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        client.insert("x-client-identity", HeaderValue::from_static("CN=admin"));
        client.insert("x_client_identity", HeaderValue::from_static("CN=admin"));
        let hs = ClientHandshake {
            path_and_query: "/ignored".into(),
            map_path: true,
            protocols: &["a".to_string(), "b".to_string()],
            headers: &client,
            identity: None,
            drop_headers: &[HeaderName::from_static("x-client-identity")],
            extensions: None,
            forwarding: Forwarding {
                keep: Vec::new(),
                set: vec![(
                    crate::forwarded::X_REAL_IP,
                    HeaderValue::from_static("192.0.2.1"),
                )],
            },
        };
        let Ok(req) = build_request("backend:9000", "/x?y=1", "k", &hs) else {
            panic!("request not built")
        };
        let h = req.headers();
        assert_eq!(req.uri(), "/x?y=1");
        assert_eq!(h[header::HOST], "backend:9000");
        assert_eq!(h[header::ORIGIN], "https://app.example");
        assert_eq!(h[header::SEC_WEBSOCKET_PROTOCOL], "a, b");
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key(header::SEC_WEBSOCKET_EXTENSIONS));
        assert!(
            !h.contains_key("x-forwarded-for"),
            "the client's own is dropped"
        );
        assert_eq!(h["x-real-ip"], "192.0.2.1");
        assert!(!h.contains_key("x-client-identity"), "forged identity");
        assert!(!h.contains_key("x_client_identity"), "forged, underscored");
    }
}
