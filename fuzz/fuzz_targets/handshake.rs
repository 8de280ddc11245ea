//! The server side of the opening handshake: `handshake::check_request_line` and
//! `handshake::validate` (HTTP/1.1) or `handshake::validate_h2` (HTTP/2's extended CONNECT,
//! RFC 8441: a CONNECT gets `:protocol = websocket`) on requests built from fuzz bytes, then
//! the 101 (or the 200) for the ones that pass.
//!
//! Checks that nothing panics, and of an accepted upgrade: it is a GET with upgrade and
//! connection tokens, a single Host, and a key that is base64 of 16 bytes; the 101 has
//! the right `Sec-WebSocket-Accept` and echoes a chosen subprotocol when it is a valid
//! header value. Every error has a 4xx status, or 501 for a CONNECT protocol other than
//! websocket.
//!
//! Input, as text lines (`\n`, an optional `\r` dropped): `METHOD TARGET [VERSION]`, then up
//! to 16 `name: value` lines. A name not in the list of relevant headers below picks one of
//! them by its first byte; values are raw bytes, and invalid ones are skipped.
#![no_main]

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use libfuzzer_sys::fuzz_target;
use wsgate::handshake;

const NAMES: [HeaderName; 12] = [
    header::HOST,
    header::UPGRADE,
    header::CONNECTION,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_PROTOCOL,
    header::SEC_WEBSOCKET_EXTENSIONS,
    header::ORIGIN,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::COOKIE,
    header::USER_AGENT,
];

fn line(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

fn build(data: &[u8]) -> Option<Request<()>> {
    let mut lines = data.split(|&b| b == b'\n').map(line);
    let mut first = lines.next()?.splitn(3, |&b| b == b' ');
    let method = Method::from_bytes(first.next()?).ok()?;
    let uri = Uri::try_from(first.next().unwrap_or(b"/")).ok()?;
    let version = match first.next() {
        Some(b"HTTP/0.9") => Version::HTTP_09,
        Some(b"HTTP/1.0") => Version::HTTP_10,
        Some(b"HTTP/2" | b"HTTP/2.0") => Version::HTTP_2,
        Some(b"HTTP/3") => Version::HTTP_3,
        _ => Version::HTTP_11,
    };
    let connect = method == Method::CONNECT;
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .version(version)
        .body(())
        .ok()?;
    if connect && version == Version::HTTP_2 {
        // hyper's `:protocol`; half the CONNECTs ask for another protocol than websocket.
        let protocol = if data.len() % 2 == 0 {
            "websocket"
        } else {
            "webtransport"
        };
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static(protocol));
    }
    for l in lines.take(16) {
        let (name, value) = match l.iter().position(|&b| b == b':') {
            Some(i) => (&l[..i], &l[i + 1..]),
            None => (l, &b""[..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let pick = NAMES
            .iter()
            .position(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name))
            .unwrap_or(usize::from(name.first().copied().unwrap_or(0)) % NAMES.len());
        let name = NAMES[pick].clone();
        if let Ok(value) = HeaderValue::from_bytes(value) {
            req.headers_mut().append(name, value);
        }
    }
    Some(req)
}

fn check_error(e: &handshake::HandshakeError) {
    let unsupported = matches!(e, handshake::HandshakeError::ConnectProtocol(_));
    assert!(
        e.status().is_client_error() || (unsupported && e.status() == StatusCode::NOT_IMPLEMENTED),
        "{e:?}"
    );
    assert!(!e.to_string().is_empty());
    let _ = e.extra_headers();
}

fuzz_target!(|data: &[u8]| {
    let Some(req) = build(data) else {
        return;
    };
    let line_ok = handshake::check_request_line(&req);
    match &line_ok {
        Ok(()) => {
            assert!(matches!(req.version(), Version::HTTP_11 | Version::HTTP_2));
            assert_eq!(req.headers().get_all(header::HOST).iter().count(), 1);
        }
        Err(e) => check_error(e),
    }
    if req.version() == Version::HTTP_2 {
        match handshake::validate_h2(&req) {
            Ok(upgrade) => {
                assert_eq!(req.method(), Method::CONNECT);
                assert_eq!(
                    req.extensions()
                        .get::<hyper::ext::Protocol>()
                        .map(|p| p.as_str()),
                    Some("websocket")
                );
                let response = handshake::connect_accepted::<()>(None);
                assert_eq!(response.status(), StatusCode::OK);
                assert!(
                    !response
                        .headers()
                        .contains_key(header::SEC_WEBSOCKET_ACCEPT)
                );
                assert_eq!(
                    upgrade.protocols,
                    handshake::offered_protocols(req.headers())
                );
            }
            Err(e) => check_error(&e),
        }
        return;
    }
    let upgrade = match handshake::validate(&req) {
        Ok(upgrade) => upgrade,
        Err(e) => return check_error(&e),
    };
    assert_eq!(req.method(), Method::GET);
    assert!(handshake::has_token(
        req.headers(),
        &header::UPGRADE,
        "websocket"
    ));
    assert!(handshake::has_token(
        req.headers(),
        &header::CONNECTION,
        "upgrade"
    ));
    assert_eq!(upgrade.key.len(), 24, "base64 of 16 bytes is 24 characters");
    assert_eq!(
        upgrade.protocols,
        handshake::offered_protocols(req.headers())
    );

    let accept = handshake::accept_key(upgrade.key.as_bytes());
    let response = handshake::switching_protocols::<()>(&upgrade.key, None);
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .map(|v| v.as_bytes()),
        Some(accept.as_bytes())
    );
    assert!(
        !response
            .headers()
            .contains_key(header::SEC_WEBSOCKET_PROTOCOL)
    );

    if let Some(chosen) = handshake::select_protocol(&upgrade.protocols, &upgrade.protocols) {
        let response = handshake::switching_protocols::<()>(&upgrade.key, Some(chosen));
        let echoed = response.headers().get(header::SEC_WEBSOCKET_PROTOCOL);
        match HeaderValue::from_str(chosen) {
            Ok(value) => assert_eq!(echoed, Some(&value)),
            Err(_) => assert_eq!(echoed, None),
        }
    }
});
