//! SPEC §3, row by row, checked on the wire with raw HTTP.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncReadExt;

async fn gateway_with_origin() -> TestGateway {
    let upstream = tcp_echo().await;
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/vnc\"\nupstream = \"tcp://{upstream}\"\nsubprotocols = [\"binary\", \"base64\"]\nallowed_origins = [\"https://app.example.com\"]\n"
    );
    start_gateway(&config).await
}

const KEY_LINE: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn valid_upgrade_gets_101_with_accept() {
    let gw = gateway_with_origin().await;
    let r = raw_request(gw.addr(), &upgrade_request("/vnc", "")).await;
    assert_eq!(r.status, 101);
    assert_eq!(
        r.header("upgrade").map(str::to_ascii_lowercase).as_deref(),
        Some("websocket")
    );
    assert_eq!(
        r.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("upgrade")
    );
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(
        r.header("sec-websocket-protocol"),
        None,
        "none offered, none chosen"
    );
    gw.stop().await;
}

#[tokio::test]
async fn firefox_connection_token_list_and_header_case_are_accepted() {
    let gw = gateway_with_origin().await;
    let request = "GET /vnc/display?x=1 HTTP/1.1\r\nhost: localhost\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\nsec-websocket-key: 2SCVXUeP9cTjV+0mWB8J6A==\r\nsec-websocket-version: 13\r\norigin: https://app.example.com\r\n\r\n";
    let r = raw_request(gw.addr(), request).await;
    assert_eq!(r.status, 101, "{r:?}");
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("mLDKNeBNWz6T9SxU+o0Fy/HgeSw=")
    );
    gw.stop().await;
}

#[tokio::test]
async fn subprotocol_is_chosen_by_route_preference() {
    let gw = gateway_with_origin().await;
    let r = raw_request(
        gw.addr(),
        &upgrade_request("/vnc", "Sec-WebSocket-Protocol: base64, binary\r\n"),
    )
    .await;
    assert_eq!(r.status, 101);
    assert_eq!(r.header("sec-websocket-protocol"), Some("binary"));
    // Offered protocols the route does not speak: 101 without the header (RFC 6455 §4.2.2).
    let r = raw_request(
        gw.addr(),
        &upgrade_request("/vnc", "Sec-WebSocket-Protocol: chat\r\n"),
    )
    .await;
    assert_eq!(r.status, 101);
    assert_eq!(r.header("sec-websocket-protocol"), None);
    gw.stop().await;
}

#[tokio::test]
async fn no_route_is_404() {
    let gw = gateway_with_origin().await;
    for path in ["/", "/other", "/vncx"] {
        let r = raw_request(gw.addr(), &upgrade_request(path, "")).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(r.body.contains("no route"), "{}", r.body);
    }
    gw.stop().await;
}

#[tokio::test]
async fn plain_get_is_426_with_upgrade_header() {
    let gw = gateway_with_origin().await;
    let r = raw_request(gw.addr(), "GET /vnc HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(r.status, 426);
    assert_eq!(r.header("upgrade"), Some("websocket"));
    assert!(!r.body.is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn other_method_is_405_with_allow_get() {
    let gw = gateway_with_origin().await;
    let request = upgrade_request("/vnc", "").replacen("GET", "POST", 1);
    let r = raw_request(gw.addr(), &request).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    gw.stop().await;
}

#[tokio::test]
async fn bad_requests_are_400() {
    let gw = gateway_with_origin().await;
    let without_key = upgrade_request("/vnc", "").replace(KEY_LINE, "");
    let short_key = upgrade_request("/vnc", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=");
    let not_base64 =
        upgrade_request("/vnc", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!!not base64!!!!!!!!==");
    let without_host = upgrade_request("/vnc", "").replace("Host: localhost\r\n", "");
    let without_connection = upgrade_request("/vnc", "").replace("Connection: Upgrade\r\n", "");
    let dot_segments = upgrade_request("/vnc/../admin", "");
    for (what, request) in [
        ("missing key", without_key),
        ("short key", short_key),
        ("key not base64", not_base64),
        ("missing Host", without_host),
        ("Connection without upgrade", without_connection),
        ("dot segments", dot_segments),
    ] {
        let r = raw_request(gw.addr(), &request).await;
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert!(!r.body.is_empty(), "{what}: the body says why");
    }
    gw.stop().await;
}

#[tokio::test]
async fn wrong_version_is_426_with_version_13() {
    let gw = gateway_with_origin().await;
    for version in ["8", "14", ""] {
        let request =
            upgrade_request("/vnc", "").replace("Version: 13", &format!("Version: {version}"));
        let r = raw_request(gw.addr(), &request).await;
        assert_eq!(r.status, 426, "version {version:?}");
        assert_eq!(r.header("sec-websocket-version"), Some("13"));
    }
    gw.stop().await;
}

#[tokio::test]
async fn disallowed_origin_is_403() {
    let gw = gateway_with_origin().await;
    let r = raw_request(
        gw.addr(),
        &upgrade_request("/vnc", "Origin: https://evil.example\r\n"),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = raw_request(
        gw.addr(),
        &upgrade_request("/vnc", "Origin: https://app.example.com\r\n"),
    )
    .await;
    assert_eq!(r.status, 101);
    gw.stop().await;
}

#[tokio::test]
async fn refused_upstream_is_502() {
    // A port that was just free: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = start_gateway(&simple_config(&format!("tcp://127.0.0.1:{port}"), "")).await;
    let r = gw.upgrade().await;
    assert_eq!(r.status, 502);
    let gw2 = start_gateway(&simple_config(&format!("ws://127.0.0.1:{port}/x"), "")).await;
    let r = raw_request(gw2.addr(), &upgrade_request("/", "")).await;
    assert_eq!(r.status, 502);
    gw.stop().await;
    gw2.stop().await;
}

#[tokio::test]
async fn silent_ws_upstream_is_504() {
    // Accepts TCP, reads the handshake, never answers.
    let upstream = tcp_upstream(|mut stream| async move {
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("ws://{upstream}/"),
        "connect_timeout = \"300ms\"",
    ))
    .await;
    let started = tokio::time::Instant::now();
    let r = gw.upgrade().await;
    assert_eq!(r.status, 504);
    assert!(started.elapsed() >= Duration::from_millis(300));
    gw.stop().await;
}

#[tokio::test]
async fn ws_upstream_non_101_is_502() {
    let upstream = tcp_upstream(|mut stream| async move {
        use tokio::io::AsyncWriteExt;
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            .await;
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("ws://{upstream}/"), "")).await;
    let r = gw.upgrade().await;
    assert_eq!(r.status, 502);
    gw.stop().await;
}

#[tokio::test]
async fn ws_upstream_with_wrong_accept_is_502() {
    let upstream = tcp_upstream(|mut stream| async move {
        use tokio::io::AsyncWriteExt;
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
            .await;
        let _ = stream.read(&mut buf).await;
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("ws://{upstream}/"), "")).await;
    let r = gw.upgrade().await;
    assert_eq!(
        r.status, 502,
        "an accept computed for another key must be refused"
    );
    gw.stop().await;
}

#[tokio::test]
async fn rejections_keep_the_gateway_serving() {
    let gw = gateway_with_origin().await;
    for _ in 0..20 {
        let r = raw_request(gw.addr(), "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(r.status, 404);
        let r = raw_request(gw.addr(), "BLAH\r\n\r\n").await;
        assert_eq!(r.status, 400);
    }
    let r = raw_request(gw.addr(), &upgrade_request("/vnc", "")).await;
    assert_eq!(r.status, 101);
    gw.stop().await;
}

/// Frames a client sends in the same write as its upgrade request (pipelined, as a client in
/// a hurry may) are the relay's first bytes: over plain TCP and over TLS.
#[tokio::test]
async fn frames_behind_the_request_head_in_one_write_are_relayed() {
    let echo = tcp_echo().await;
    let upstream = format!("tcp://{echo}");
    let mut request = upgrade_request("/", "").into_bytes();
    request.extend(client_frame(true, 2, b"first"));
    request.extend(client_frame(true, 2, b"second"));

    let plain = start_gateway(&simple_config(&upstream, "")).await;
    let mut stream = tokio::net::TcpStream::connect(plain.addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &request)
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.status, 101);
    let mut echoed = Vec::new();
    while echoed.len() < b"firstsecond".len() {
        echoed.extend(read_raw_frame(&mut stream).await.2);
    }
    assert_eq!(echoed, b"firstsecond");
    plain.stop().await;

    let tls = TestGateway::builder()
        .route("/", &upstream)
        .self_signed()
        .start()
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.rustls_client_config().unwrap());
    let mut stream = tls_connect(&connector, tls.addr(), "localhost")
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &request)
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.status, 101);
    let mut echoed = Vec::new();
    while echoed.len() < b"firstsecond".len() {
        echoed.extend(read_raw_frame(&mut stream).await.2);
    }
    assert_eq!(echoed, b"firstsecond");
    tls.stop().await;
}

/// A refusal of a first request is written whole (length, Date) and ends the connection.
#[tokio::test]
async fn a_refused_first_upgrade_is_answered_and_the_connection_closed() {
    let gw = gateway_with_origin().await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let request = upgrade_request("/vnc", "Origin: https://evil.example\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.header("date").is_some(), "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
    let mut rest = Vec::new();
    within("the end of the connection", stream.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    gw.stop().await;
}

/// A client that leaves while its upstream is still being reached cancels that work (as
/// hyper did): the upstream's connection ends at once, not at `connect_timeout`.
#[tokio::test]
async fn a_client_that_leaves_during_its_handshake_cancels_the_upstreams() {
    let (ended, mut ends) = tokio::sync::mpsc::unbounded_channel();
    let upstream = tcp_upstream(move |mut stream| {
        let ended = ended.clone();
        async move {
            // Reads the handshake and never answers it; reports when it came and when the
            // gateway lets go.
            let _ = ended.send("open");
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
            let _ = ended.send("closed");
        }
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("ws://{upstream}"),
        "connect_timeout = \"60s\"",
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    // The gateway is at the upstream's handshake when the client goes.
    assert_eq!(
        within("the upstream is reached", ends.recv()).await,
        Some("open")
    );
    drop(stream);
    assert_eq!(
        within("the upstream's connection ends", ends.recv()).await,
        Some("closed")
    );
    gw.stop().await;
}
