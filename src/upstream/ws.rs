//! The client side of the WebSocket handshake toward a ws:// or wss:// upstream.
//!
//! Done here with hyper's client connection rather than `fastwebsockets::handshake::client`,
//! because that one does not verify `Sec-WebSocket-Accept`, compares `Connection` as a whole
//! value instead of a token list, and spawns a task that can outlive a timed-out handshake.

use std::pin::pin;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::UpstreamError;
use crate::forwarded::{Forwarding, same_header};
use crate::handshake::{accept_key, has_token};

/// A WebSocket connection to an upstream, after its handshake.
pub type UpstreamWs = TokioIo<Upgraded>;

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
}

pub(super) enum Failure {
    Http(hyper::Error),
    Status(StatusCode),
    Invalid(String),
}

impl From<hyper::Error> for Failure {
    fn from(e: hyper::Error) -> Self {
        Failure::Http(e)
    }
}

impl Failure {
    pub(super) fn into_upstream_error(self, target: &str) -> UpstreamError {
        let target = target.to_string();
        match self {
            Failure::Status(status) => UpstreamError::Status { target, status },
            Failure::Http(e) => UpstreamError::Handshake {
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
    // Extensions (permessage-deflate) change the frames; the relay passes frames through
    // unchanged, so none is negotiated on either side.
    header::SEC_WEBSOCKET_EXTENSIONS,
];

pub(super) async fn handshake<S>(
    stream: S,
    host: &str,
    path_and_query: &str,
    hs: &ClientHandshake<'_>,
) -> Result<(UpstreamWs, Option<String>), Failure>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let key = fastwebsockets::handshake::generate_key();
    let request = build_request(host, path_and_query, &key, hs)?;

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection is driven here, not spawned, so a handshake cut by the deadline leaves
    // nothing running behind it.
    let mut conn = pin!(conn.with_upgrades());
    let mut send = pin!(sender.send_request(request));
    // The connection future finishes as soon as it hands the socket to the upgrade, which
    // can happen in the same poll that delivers the 101; it must not be polled again then.
    let mut conn_done = false;
    let mut response = tokio::select! {
        response = &mut send => response?,
        done = &mut conn => {
            done?;
            conn_done = true;
            send.await?
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(Failure::Status(response.status()));
    }
    let protocol = verify(response.headers(), &key, hs.protocols)?;
    let upgraded = if conn_done {
        hyper::upgrade::on(&mut response).await
    } else {
        tokio::join!(hyper::upgrade::on(&mut response), conn).0
    };
    Ok((TokioIo::new(upgraded?), protocol))
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
fn verify(headers: &HeaderMap, key: &str, offered: &[String]) -> Result<Option<String>, Failure> {
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
    if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Err(Failure::Invalid(
            "the upstream chose an extension, but none was offered".into(),
        ));
    }
    match headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        None => Ok(None),
        Some(chosen) => {
            let chosen = chosen.to_str().unwrap_or_default().trim();
            if offered.iter().any(|p| p == chosen) {
                Ok(Some(chosen.to_string()))
            } else {
                Err(Failure::Invalid(format!(
                    "the upstream chose subprotocol {chosen:?}, which the client did not offer"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(verify(&response_headers("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), key, &[]).is_ok());
        assert!(verify(&response_headers("AAAAAAAAAAAAAAAAAAAAAAAAAAA="), key, &[]).is_err());
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
            verify(&h, key, &["chat".to_string()])
                .ok()
                .flatten()
                .as_deref(),
            Some("chat")
        );
        assert!(verify(&h, key, &["other".to_string()]).is_err());
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
