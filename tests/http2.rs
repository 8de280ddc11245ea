//! WebSockets over HTTP/2 (RFC 8441) with a raw h2 client (the `h2` crate): SETTINGS with
//! extended CONNECT, the 200, frames in DATA both ways, the error answers, plain GETs over
//! h2, the drain, and `http2 = false`.

mod support;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use support::*;
use tokio::net::TcpStream;
use wsgate::testing::TestGateway;

type H2 = h2::client::SendRequest<Bytes>;

/// A TLS connection with ALPN h2 (trusting the gateway's in-memory CA) and an h2 client on it.
async fn h2_client(gw: &TestGateway, alpn: &[&[u8]]) -> (H2, Option<Vec<u8>>) {
    let mut config = (*gw.rustls_client_config().expect("self_signed")).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = within("TLS", connector.connect(name, tcp)).await.unwrap();
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if negotiated.as_deref() != Some(b"h2") {
        // The caller only wanted to see what was chosen.
        let (client, connection) = h2::client::handshake(tls).await.unwrap();
        drop(connection);
        return (client, negotiated);
    }
    let (client, connection) = within("h2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let client = within("h2 ready", client.ready()).await.unwrap();
    (client, negotiated)
}

fn connect_request(
    gw: &TestGateway,
    path: &str,
    protocol: &str,
    extra: &[(&str, &str)],
) -> Request<()> {
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://localhost:{}{path}", gw.addr().port()))
        .extension(h2::ext::Protocol::from(protocol));
    if !extra.iter().any(|(k, _)| *k == "sec-websocket-version") {
        builder = builder.header("sec-websocket-version", "13");
    }
    for (name, value) in extra {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap()
}

/// Reads one unmasked server frame from the stream's DATA: (opcode, payload).
async fn read_frame(body: &mut h2::RecvStream, buf: &mut BytesMut) -> (u8, Vec<u8>) {
    within("a frame over h2", async {
        loop {
            if buf.len() >= 2 {
                let len = (buf[1] & 0x7f) as usize;
                assert!(len < 126, "test frames are short");
                if buf.len() >= 2 + len {
                    let frame = buf.split_to(2 + len);
                    return (frame[0] & 0x0f, frame[2..].to_vec());
                }
            }
            let data = body.data().await.expect("more DATA").expect("DATA");
            let _ = body.flow_control().release_capacity(data.len());
            buf.extend_from_slice(&data);
        }
    })
    .await
}

async fn gateway() -> (TestGateway, WsUpstream, tempfile::TempDir) {
    init_logs();
    let upstream = ws_echo().await;
    let echo = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "page over h2").unwrap();
    let gw = TestGateway::builder()
        .self_signed()
        .gateway("close_timeout = \"1s\"")
        .route_with(
            "/ws",
            &format!("ws://{}", upstream.addr),
            "allowed_origins = [\"https://localhost\"]",
        )
        .route("/tcp", &format!("tcp://{echo}"))
        .route_with(
            "/",
            &format!("tcp://{echo}"),
            &format!("web_root = \"{}\"", dir.path().display()),
        )
        .start()
        .await
        .expect("start");
    (gw, upstream, dir)
}

#[tokio::test]
async fn websockets_over_http2_extended_connect() {
    let (gw, upstream, _dir) = gateway().await;
    let (mut client, alpn) = h2_client(&gw, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    // To a ws upstream (over HTTP/1.1 there), with a subprotocol.
    let request = connect_request(
        &gw,
        "/ws",
        "websocket",
        &[
            ("origin", "https://localhost"),
            ("sec-websocket-protocol", "chat, superchat"),
        ],
    );
    let (response, mut send) = client.send_request(request, false).unwrap();
    let response = within("the 200", response).await.unwrap();
    assert!(
        client.is_extended_connect_protocol_enabled(),
        "the server's SETTINGS enable extended CONNECT"
    );
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("sec-websocket-accept").is_none());
    assert_eq!(response.headers()["sec-websocket-protocol"], "superchat");
    let mut body = response.into_body();
    let mut buf = BytesMut::new();
    send.send_data(Bytes::from(client_frame(true, 0x1, b"over h2")), false)
        .unwrap();
    assert_eq!(
        read_frame(&mut body, &mut buf).await,
        (0x1, b"over h2".to_vec())
    );
    assert_eq!(
        upstream.seen.lock().unwrap().protocols[0].as_deref(),
        Some("chat, superchat")
    );

    // To a tcp upstream, on a second stream of the same connection.
    let (response, mut tcp_send) = client
        .send_request(connect_request(&gw, "/tcp", "websocket", &[]), false)
        .unwrap();
    let response = within("the 200", response).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut tcp_body = response.into_body();
    let mut tcp_buf = BytesMut::new();
    tcp_send
        .send_data(Bytes::from(client_frame(true, 0x2, b"bytes")), false)
        .unwrap();
    assert_eq!(
        read_frame(&mut tcp_body, &mut tcp_buf).await,
        (0x2, b"bytes".to_vec())
    );

    let metrics = gw.metrics().encode();
    assert_eq!(
        metric(&metrics, "wsgate_upgrades_total{http=\"2\"}"),
        2.0,
        "{metrics}"
    );

    // The drain: each WebSocket stream gets Close 1001.
    gw.begin_shutdown();
    let (opcode, payload) = read_frame(&mut body, &mut buf).await;
    assert_eq!((opcode, &payload[..2]), (0x8, &1001u16.to_be_bytes()[..]));
    let (opcode, payload) = read_frame(&mut tcp_body, &mut tcp_buf).await;
    assert_eq!((opcode, &payload[..2]), (0x8, &1001u16.to_be_bytes()[..]));
    send.send_data(
        Bytes::from(client_frame(true, 0x8, &1001u16.to_be_bytes())),
        true,
    )
    .unwrap();
    tcp_send
        .send_data(
            Bytes::from(client_frame(true, 0x8, &1001u16.to_be_bytes())),
            true,
        )
        .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn http2_error_answers_and_plain_requests() {
    let (gw, _upstream, _dir) = gateway().await;
    let (client, _) = h2_client(&gw, &[b"h2"]).await;
    let status = |request: Request<()>| {
        let mut client = client.clone();
        async move {
            let (response, _send) = client.send_request(request, true).unwrap();
            within("an answer", response).await.unwrap().status()
        }
    };
    // Another protocol than websocket: 501.
    assert_eq!(
        status(connect_request(&gw, "/ws", "webtransport", &[])).await,
        501
    );
    // The same checks as over HTTP/1.1: Origin, version; a CONNECT without :protocol (a
    // tunnel, authority-form: no path to route) is refused too.
    let ws = "/ws";
    let tunnel = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("localhost:{}", gw.addr().port()))
        .body(())
        .unwrap();
    assert_eq!(status(tunnel).await, 400);
    assert_eq!(
        status(connect_request(
            &gw,
            ws,
            "websocket",
            &[("origin", "https://evil.example")]
        ))
        .await,
        403
    );
    assert_eq!(
        status(connect_request(
            &gw,
            ws,
            "websocket",
            &[("sec-websocket-version", "8")]
        ))
        .await,
        426
    );
    // Plain GETs: the web root answers a file, a WebSocket-only route 426.
    let get = |path: &str| {
        Request::get(format!("https://localhost:{}{path}", gw.addr().port()))
            .body(())
            .unwrap()
    };
    let (response, _) = client
        .clone()
        .send_request(get("/index.html"), true)
        .unwrap();
    let response = within("the file", response).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut page = Vec::new();
    while let Some(chunk) = within("file data", body.data()).await {
        page.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(page, b"page over h2");
    assert_eq!(status(get("/ws")).await, 426);
    gw.stop().await;
}

#[tokio::test]
async fn http2_can_be_turned_off() {
    let echo = tcp_echo().await;
    let gw = TestGateway::from_toml(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ self_signed = true }}\nhttp2 = false\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://{echo}\"\n"
    ))
    .await
    .unwrap();
    let mut config = (*gw.rustls_client_config().unwrap()).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = tls_connect(&connector, gw.addr(), "localhost")
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    gw.stop().await;
}

/// hyper's HTTP/2 server has no header-read timeout: a client that negotiates h2 and then
/// sends nothing (no preface, no request) is cut at `handshake_timeout` by the gateway.
#[tokio::test]
async fn a_silent_http2_client_is_cut_at_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let echo = tcp_echo().await;
    let gw = TestGateway::builder()
        .self_signed()
        .gateway("handshake_timeout = \"300ms\"")
        .route("/", &format!("tcp://{echo}"))
        .start()
        .await
        .unwrap();
    let mut config = (*gw.rustls_client_config().unwrap()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = tls_connect(&connector, gw.addr(), "localhost")
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The server's SETTINGS may come first; then the connection ends.
    let mut sink = Vec::new();
    let _ = within(
        "the gateway closes a silent h2 client",
        tls.read_to_end(&mut sink),
    )
    .await;
    gw.stop().await;
}

/// A drain that begins while a WebSocket stream's upstream is still being reached waits for
/// it: the stream gets its 200 and then Close 1001, as one that was open already (the
/// connection was dropped under it before).
#[tokio::test]
async fn a_stream_in_its_handshake_when_the_drain_begins_gets_its_answer_and_1001() {
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let go = Arc::new(tokio::sync::Notify::new());
    let release = go.clone();
    let upstream = tcp_upstream(move |mut stream| {
        let (arrived, go) = (arrived.clone(), go.clone());
        async move {
            let _ = arrived.send(());
            go.notified().await;
            accept_ws_handshake(&mut stream).await;
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink).await;
        }
    })
    .await;
    let gw = TestGateway::builder()
        .self_signed()
        .gateway("close_timeout = \"1s\"")
        .route("/slow", &format!("ws://{upstream}"))
        .start()
        .await
        .expect("start");
    let (mut client, _) = h2_client(&gw, &[b"h2"]).await;
    let (response, _send) = client
        .send_request(connect_request(&gw, "/slow", "websocket", &[]), false)
        .unwrap();
    within("the upstream is reached", arrivals.recv())
        .await
        .unwrap();
    gw.begin_shutdown();
    release.notify_one();
    let response = within("the 200", response)
        .await
        .expect("the stream is answered, not reset");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let (opcode, payload) = read_frame(&mut body, &mut BytesMut::new()).await;
    assert_eq!((opcode, &payload[..2]), (0x8, &1001u16.to_be_bytes()[..]));
    gw.stop().await;
}

/// The refusals SPEC §4 gives an HTTP/1.1 upgrade, over HTTP/2 as a stream's status: no
/// route 404, missing credentials 401 with the challenge, the connection budget 503 with
/// `Retry-After`, an upstream that refuses 502; the connection serves on after each.
#[tokio::test]
async fn http2_refusals_are_the_http1_ones() {
    init_logs();
    let upstream = ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        "alice:$2y$04$abcdefghijklmnopqrstuuJ2u4QgYxO/XQwGvSbY/7zc5gpmQ6y4.\n",
    )
    .unwrap();
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = refused.local_addr().unwrap();
    drop(refused);
    let gw = TestGateway::builder()
        .self_signed()
        .gateway("close_timeout = \"1s\"\nmax_connections = 1")
        .route("/ws", &format!("ws://{}", upstream.addr))
        .route("/down", &format!("tcp://{down}"))
        .route_with(
            "/private",
            &format!("ws://{}", upstream.addr),
            &format!(
                "auth = {{ basic = {{ htpasswd = \"{}\" }} }}",
                users.display()
            ),
        )
        .start()
        .await
        .expect("start");
    let (client, _) = h2_client(&gw, &[b"h2"]).await;
    let answer = |request: Request<()>| {
        let mut client = client.clone();
        async move {
            let (response, send) = client.send_request(request, false).unwrap();
            (within("an answer", response).await.unwrap(), send)
        }
    };
    let (response, _) = answer(connect_request(&gw, "/nowhere", "websocket", &[])).await;
    assert_eq!(response.status(), 404);
    let (response, _) = answer(connect_request(&gw, "/private", "websocket", &[])).await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Basic realm=\"wsgate\", charset=\"UTF-8\""
    );
    let (response, _) = answer(connect_request(&gw, "/down", "websocket", &[])).await;
    assert_eq!(response.status(), 502);
    // One WebSocket stream takes the budget of one; the next stream is 503.
    let (open, _held) = answer(connect_request(&gw, "/ws", "websocket", &[])).await;
    assert_eq!(open.status(), 200);
    let (response, _) = answer(connect_request(&gw, "/ws", "websocket", &[])).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    gw.stop().await;
}
