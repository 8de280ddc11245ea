//! The server side of the opening handshake (RFC 6455 §4.2): validation of the client's
//! request, the `Sec-WebSocket-Accept` value and the 101 response.
//!
//! fastwebsockets' own `upgrade()` checks only the key and the version, so the whole of
//! §4.2.1 is checked here; every failed check has its own variant and HTTP status.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use sha1::{Digest, Sha1};

/// RFC 6455 §1.3. ASCII hyphens: a widely copied tutorial prints U+2010 here instead.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What the gateway needs from a valid upgrade request.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// The `Sec-WebSocket-Key` as sent (base64 of 16 bytes).
    pub key: HeaderValue,
    /// Offered subprotocols, in the client's order of preference.
    pub protocols: Vec<String>,
    pub origin: Option<String>,
}

/// A request that is not a valid upgrade, with the status it earns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("WebSocket upgrades need HTTP/1.1 or HTTP/2")]
    NotHttp11,
    /// RFC 8441 §4: an extended CONNECT for another protocol than `websocket`.
    #[error("the CONNECT protocol {0:?} is not supported here; only websocket is")]
    ConnectProtocol(String),
    #[error("the request has no Host header")]
    MissingHost,
    #[error("the request has more than one {0} header")]
    Duplicate(&'static str),
    #[error("method {0} is not allowed; WebSocket upgrades use GET")]
    Method(Method),
    #[error("this path serves WebSocket connections only; send an upgrade request")]
    NotUpgrade,
    #[error("the Connection header must contain the token \"upgrade\"")]
    ConnectionNotUpgrade,
    #[error("Sec-WebSocket-Key is missing")]
    MissingKey,
    #[error("Sec-WebSocket-Key must be base64 of 16 bytes")]
    BadKey,
    #[error("Sec-WebSocket-Version must be 13")]
    UnsupportedVersion,
    /// The bytes after the head are WebSocket frames; read as a body they would be lost.
    #[error("an upgrade request has no body (Content-Length must be 0, no Transfer-Encoding)")]
    Body,
}

impl HandshakeError {
    pub fn status(&self) -> StatusCode {
        match self {
            HandshakeError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            HandshakeError::ConnectProtocol(_) => StatusCode::NOT_IMPLEMENTED,
            HandshakeError::NotUpgrade | HandshakeError::UnsupportedVersion => {
                StatusCode::UPGRADE_REQUIRED
            }
            HandshakeError::NotHttp11
            | HandshakeError::MissingHost
            | HandshakeError::Duplicate(_)
            | HandshakeError::ConnectionNotUpgrade
            | HandshakeError::MissingKey
            | HandshakeError::BadKey
            | HandshakeError::Body => StatusCode::BAD_REQUEST,
        }
    }

    /// Headers that tell the client how to do better (RFC 6455 §4.2.2, RFC 9110 §15.5.6).
    pub fn extra_headers(&self) -> &'static [(HeaderName, &'static str)] {
        const UPGRADE: &[(HeaderName, &str)] = &[(header::UPGRADE, "websocket")];
        const ALLOW: &[(HeaderName, &str)] = &[(header::ALLOW, "GET")];
        const VERSION: &[(HeaderName, &str)] = &[(header::SEC_WEBSOCKET_VERSION, "13")];
        match self {
            HandshakeError::NotUpgrade => UPGRADE,
            HandshakeError::Method(_) => ALLOW,
            HandshakeError::UnsupportedVersion => VERSION,
            _ => &[],
        }
    }
}

/// Checks what every request needs before routing: HTTP/1.1 (or HTTP/2, whose `:authority`
/// the caller has put in Host) and exactly one Host.
pub fn check_request_line<B>(req: &Request<B>) -> Result<(), HandshakeError> {
    if req.version() != Version::HTTP_11 && req.version() != Version::HTTP_2 {
        return Err(HandshakeError::NotHttp11);
    }
    match req.headers().get_all(header::HOST).iter().count() {
        0 => Err(HandshakeError::MissingHost),
        1 => Ok(()),
        _ => Err(HandshakeError::Duplicate("Host")),
    }
}

/// Whether the request asks for a WebSocket at all (`Upgrade: websocket`, or an HTTP/2
/// extended CONNECT); a plain GET under a `web_root` does not, and is answered with a file.
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    if req.version() == Version::HTTP_2 {
        return req.method() == Method::CONNECT;
    }
    has_token(req.headers(), &header::UPGRADE, "websocket")
}

/// RFC 8441 §4–5: a WebSocket over HTTP/2 is an extended CONNECT with `:protocol =
/// websocket` and `sec-websocket-version: 13`; there is no key and no Accept. Everything else
/// (Origin, subprotocols) is as over HTTP/1.1.
pub fn validate_h2<B>(req: &Request<B>) -> Result<UpgradeRequest, HandshakeError> {
    let headers = req.headers();
    if req.method() != Method::CONNECT {
        return Err(if req.method() == Method::GET {
            HandshakeError::NotUpgrade
        } else {
            HandshakeError::Method(req.method().clone())
        });
    }
    match req.extensions().get::<hyper::ext::Protocol>() {
        Some(protocol) if protocol.as_str().eq_ignore_ascii_case("websocket") => {}
        Some(protocol) => {
            return Err(HandshakeError::ConnectProtocol(
                protocol.as_str().to_string(),
            ));
        }
        // A plain CONNECT asks for a TCP tunnel, which this gateway does not offer.
        None => return Err(HandshakeError::ConnectProtocol(String::new())),
    }
    check_version(headers)?;
    Ok(UpgradeRequest {
        key: HeaderValue::from_static(""),
        protocols: offered_protocols(headers),
        origin: origin(headers)?,
    })
}

/// `Sec-WebSocket-Version: 13`, once (RFC 6455 §4.2.1 item 6, RFC 8441 §5).
fn check_version(headers: &HeaderMap) -> Result<(), HandshakeError> {
    let version = single(
        headers,
        &header::SEC_WEBSOCKET_VERSION,
        "Sec-WebSocket-Version",
    )?;
    if version.map(|v| v.as_bytes()) != Some(b"13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    Ok(())
}

/// Lossy, not `to_str().ok()`: an Origin that is present but not ASCII must still be
/// compared (and fail), not be treated as absent.
fn origin(headers: &HeaderMap) -> Result<Option<String>, HandshakeError> {
    Ok(single(headers, &header::ORIGIN, "Origin")?
        .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned()))
}

/// The 200 that accepts an extended CONNECT (RFC 8441 §5): no Upgrade, no Accept.
pub fn connect_accepted<B: Default>(protocol: Option<&str>) -> Response<B> {
    let mut response = Response::new(B::default());
    if let Some(value) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    response
}

/// Validates a routed request as a WebSocket upgrade (RFC 6455 §4.2.1).
pub fn validate<B>(req: &Request<B>) -> Result<UpgradeRequest, HandshakeError> {
    let headers = req.headers();
    if req.method() != Method::GET {
        return Err(HandshakeError::Method(req.method().clone()));
    }
    if !has_token(headers, &header::UPGRADE, "websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    // Firefox sends `Connection: keep-alive, Upgrade`: a token list, not a single value.
    if !has_token(headers, &header::CONNECTION, "upgrade") {
        return Err(HandshakeError::ConnectionNotUpgrade);
    }
    check_version(headers)?;
    let key = single(headers, &header::SEC_WEBSOCKET_KEY, "Sec-WebSocket-Key")?
        .ok_or(HandshakeError::MissingKey)?;
    match BASE64.decode(key.as_bytes()) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    let empty_length = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .all(|v| v.as_bytes() == b"0");
    if !empty_length || headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(HandshakeError::Body);
    }
    Ok(UpgradeRequest {
        key: key.clone(),
        protocols: offered_protocols(headers),
        origin: origin(headers)?,
    })
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2 item 5.4).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(ACCEPT_GUID);
    BASE64.encode(sha1.finalize())
}

/// The 101 response that completes the handshake.
pub fn switching_protocols<B: Default>(key: &HeaderValue, protocol: Option<&str>) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(value) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    response
}

/// Subprotocols from every `Sec-WebSocket-Protocol` line, in order.
pub fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    tokens(headers, &header::SEC_WEBSOCKET_PROTOCOL)
        .map(str::to_string)
        .collect()
}

/// The first of the route's protocols (its order of preference) that the client offered.
pub fn select_protocol<'a>(route_protocols: &'a [String], offered: &[String]) -> Option<&'a str> {
    route_protocols
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
        .map(String::as_str)
}

/// True when a comma-separated header contains `token`, ignoring ASCII case.
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    display: &'static str,
) -> Result<Option<&'a HeaderValue>, HandshakeError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(HandshakeError::Duplicate(display));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn accept_key_matches_second_vector() {
        assert_eq!(
            accept_key(b"2SCVXUeP9cTjV+0mWB8J6A=="),
            "mLDKNeBNWz6T9SxU+o0Fy/HgeSw="
        );
    }

    fn upgrade() -> http::request::Builder {
        Request::builder()
            .method("GET")
            .uri("/chat")
            .header("Host", "example.com")
            .header("Upgrade", "websocket")
            .header("Connection", "Upgrade")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("Sec-WebSocket-Version", "13")
    }

    fn check(builder: http::request::Builder) -> Result<UpgradeRequest, HandshakeError> {
        let req = builder.body(()).unwrap();
        check_request_line(&req)?;
        validate(&req)
    }

    #[test]
    fn valid_request_passes() {
        let up = check(upgrade().header("Sec-WebSocket-Protocol", "chat, superchat")).unwrap();
        assert_eq!(up.protocols, vec!["chat", "superchat"]);
    }

    #[test]
    fn token_lists_and_case_are_accepted() {
        let req = Request::builder()
            .uri("/")
            .header("host", "x")
            .header("upgrade", "WebSocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-key", "2SCVXUeP9cTjV+0mWB8J6A==")
            .header("sec-websocket-version", "13");
        assert!(check(req).is_ok());
    }

    #[test]
    fn each_failure_has_its_status() {
        let cases: Vec<(http::request::Builder, StatusCode)> = vec![
            (upgrade().method("POST"), StatusCode::METHOD_NOT_ALLOWED),
            (
                Request::builder().uri("/").header("Host", "x"),
                StatusCode::UPGRADE_REQUIRED,
            ),
            (
                // A second key header is malformed, even when equal to the first.
                upgrade().header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                StatusCode::BAD_REQUEST,
            ),
            (upgrade().version(Version::HTTP_10), StatusCode::BAD_REQUEST),
            (upgrade().header("Content-Length", "0"), StatusCode::OK),
            (
                upgrade().header("Content-Length", "5"),
                StatusCode::BAD_REQUEST,
            ),
            (
                upgrade().header("Transfer-Encoding", "chunked"),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (builder, status) in cases {
            match check(builder) {
                Ok(_) => assert_eq!(status, StatusCode::OK),
                Err(e) => assert_eq!(e.status(), status, "{e}"),
            }
        }
    }

    #[test]
    fn bad_keys_are_rejected() {
        for key in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZSEh",
        ] {
            let mut req = upgrade().body(()).unwrap();
            req.headers_mut()
                .insert("sec-websocket-key", HeaderValue::from_str(key).unwrap());
            assert_eq!(validate(&req).unwrap_err(), HandshakeError::BadKey, "{key}");
        }
    }

    #[test]
    fn wrong_version_is_426() {
        let mut req = upgrade().body(()).unwrap();
        req.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        let err = validate(&req).unwrap_err();
        assert_eq!(err.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(err.extra_headers()[0].1, "13");
    }

    #[test]
    fn protocol_selection_uses_route_preference() {
        let route = vec!["binary".to_string(), "base64".to_string()];
        let offered = vec!["base64".to_string(), "binary".to_string()];
        assert_eq!(select_protocol(&route, &offered), Some("binary"));
        assert_eq!(select_protocol(&route, &["chat".to_string()]), None);
    }
}
