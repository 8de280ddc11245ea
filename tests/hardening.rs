//! Round-2 hardening (SPEC §3, §4): what the gateway tells an upstream is its own, a route's
//! policy cannot be side-stepped by spelling its path differently, and an upgrade request
//! cannot carry a body that would swallow its first frames.

mod support;

use futures_util::SinkExt;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// An mTLS listener that sets `X-Client-Identity` and a plain one, both reaching one ws
/// route.
fn two_listeners(server: &TestPki, clients: &TestPki, upstream: &WsUpstream) -> String {
    format!(
        "[[listener]]\nname = \"mtls\"\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\", identity_header = \"X-Client-Identity\" }}\n\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\n",
        server.cert.display(),
        server.key.display(),
        clients.ca_cert.display(),
        upstream.addr,
    )
}

#[tokio::test]
async fn an_identity_header_cannot_be_forged_through_another_listener() {
    let server = make_pki(&["localhost"]);
    let clients = make_pki(&["alice.example"]);
    let upstream = ws_echo().await;
    let gw = start_gateway(&two_listeners(&server, &clients, &upstream)).await;
    let plain = gw.addrs()[1];
    let (mut ws, _) = connect_with(
        &format!("ws://{plain}/"),
        &[
            ("X-Client-Identity", "subject=\"CN=admin\""),
            // CGI-style backends read this spelling as the same header.
            ("X_Client_Identity", "subject=\"CN=admin\""),
        ],
    )
    .await
    .expect("plain listener");
    ws.send(Message::text("hi")).await.unwrap();
    next_data(&mut ws).await;
    ws.close(None).await.unwrap();
    let seen = upstream.seen.lock().unwrap().requests[0].clone();
    let forged: Vec<_> = seen
        .iter()
        .filter(|(name, _)| name.replace('_', "-") == "x-client-identity")
        .collect();
    assert!(
        forged.is_empty(),
        "a client on the plain listener named itself admin: {forged:?}"
    );
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_route_bound_to_listeners_does_not_exist_on_the_others() {
    let upstream = ws_echo().await;
    let internal = tcp_echo().await;
    let config = format!(
        "[[listener]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"internal\"\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/admin\"\nlisteners = [\"internal\"]\nupstream = \"tcp://{internal}\"\n\n[[route]]\npath = \"/app\"\nupstream = \"ws://{}\"\n",
        upstream.addr
    );
    let gw = start_gateway(&config).await;
    let (public, internal) = (gw.addrs()[0], gw.addrs()[1]);
    let status = |addr, path: &'static str| async move {
        raw_request(addr, &upgrade_request(path, "")).await.status
    };
    assert_eq!(status(public, "/admin").await, 404);
    assert_eq!(status(internal, "/admin").await, 101);
    assert_eq!(status(public, "/app").await, 101, "unbound: every listener");
    assert_eq!(status(internal, "/app").await, 101);
    gw.wait_idle().await;
    gw.stop().await;
}

#[test]
fn an_unknown_listener_name_is_a_config_error_with_its_line() {
    let text = "[[listener]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nlisteners = [\"publik\"]\nupstream = \"tcp://127.0.0.1:1\"\n";
    let error = wsgate::config::Config::parse(text, "gw.toml")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("gw.toml:7:") && error.contains("route[0].listeners"),
        "{error}"
    );
    assert!(
        error.contains("`publik`") && error.contains("public"),
        "{error}"
    );
}

#[tokio::test]
async fn unnormalised_paths_meet_the_policy_of_the_route_they_name() {
    // /admin allows one Origin; / allows any. Spelled differently, /admin must still be
    // /admin, and the upstream must be asked for /admin, not for what the client typed.
    let upstream = ws_echo().await;
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/admin\"\nupstream = \"ws://{0}\"\nallowed_origins = [\"https://admin.example\"]\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{0}\"\n",
        upstream.addr
    );
    let gw = start_gateway(&config).await;
    let evil = "Origin: https://evil.example\r\n";
    for path in [
        "//admin",
        "/%61dmin",
        "/%61dmin/x",
        "///admin//x",
        "/ADMIN/../admin",
    ] {
        let answer = raw_request(gw.addr(), &upgrade_request(path, evil)).await;
        let expected = if path.contains("..") { 400 } else { 403 };
        assert_eq!(answer.status, expected, "{path}: {}", answer.body);
    }
    let good = "Origin: https://admin.example\r\n";
    let stream = raw_upgrade_with(gw.addr(), "//%61dmin//a%2fb%7e?q=%61//x", good).await;
    assert_eq!(
        upstream_paths(&upstream, 1).await,
        ["/admin/a%2Fb~?q=%61//x"],
        "normalised path, query as it came"
    );
    drop(stream);
    let bad = raw_request(gw.addr(), &upgrade_request("/a%zz", "")).await;
    assert_eq!(bad.status, 400);
    let hidden_dots = raw_request(gw.addr(), &upgrade_request("/x/..%2Fadmin", evil)).await;
    assert_eq!(hidden_dots.status, 400, "a backend may decode %2F");
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_path_in_utf8_is_one_path_however_it_is_written() {
    let upstream = ws_echo().await;
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/café\"\nupstream = \"ws://{0}\"\nallowed_origins = [\"https://cafe.example\"]\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{0}\"\n",
        upstream.addr
    );
    let gw = start_gateway(&config).await;
    let evil = "Origin: https://evil.example\r\n";
    for path in ["/café", "/caf%C3%A9", "/caf%c3%a9/x"] {
        let answer = raw_request(gw.addr(), &upgrade_request(path, evil)).await;
        assert_eq!(answer.status, 403, "{path}: {}", answer.body);
    }
    let good = "Origin: https://cafe.example\r\n";
    let stream = raw_upgrade_with(gw.addr(), "/café/menü", good).await;
    assert_eq!(upstream_paths(&upstream, 1).await, ["/caf%C3%A9/men%C3%BC"]);
    drop(stream);
    gw.wait_idle().await;
    gw.stop().await;
}

/// A listener behind a trusted proxy at 127.0.0.1 that writes `which`.
async fn behind_proxy_writing(which: &str) -> (TestGateway, WsUpstream) {
    let upstream = ws_echo().await;
    let config = format!(
        "[gateway]\nmax_connections_per_ip = 1\n\n[[listener]]\nbind = \"127.0.0.1:0\"\ntrusted = [\"127.0.0.1\"]\ntrusted_header = \"{which}\"\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\nx_real_ip = true\n",
        upstream.addr
    );
    (start_gateway(&config).await, upstream)
}

#[tokio::test]
async fn only_the_header_the_proxy_writes_names_the_client() {
    let (gw, upstream) = behind_proxy_writing("forwarded").await;
    // The proxy wrote Forwarded; the X-Forwarded-For is the client's, passed on by it.
    let extra = |xff: &str| format!("Forwarded: for=203.0.113.5\r\nX-Forwarded-For: {xff}\r\n");
    let first = raw_upgrade_with(gw.addr(), "/", &extra("6.6.6.1")).await;
    {
        let seen = upstream.seen.lock().unwrap();
        assert_eq!(seen.header(0, "x-real-ip"), ["203.0.113.5"]);
        assert_eq!(
            seen.header(0, "x-forwarded-for"),
            ["127.0.0.1"],
            "the client's X-Forwarded-For is not continued"
        );
    }
    // The per-IP limit counts 203.0.113.5 whatever X-Forwarded-For says.
    let second = raw_request(gw.addr(), &upgrade_request("/", &extra("6.6.6.2"))).await;
    assert_eq!(second.status, 503);
    drop(first);
    gw.wait_idle().await;
    gw.stop().await;

    let (gw, upstream) = behind_proxy_writing("x-real-ip").await;
    let stream = raw_upgrade_with(
        gw.addr(),
        "/",
        "X-Real-IP: 198.51.100.7\r\nX-Forwarded-For: 6.6.6.6\r\n",
    )
    .await;
    assert_eq!(
        upstream.seen.lock().unwrap().header(0, "x-real-ip"),
        ["198.51.100.7"]
    );
    drop(stream);
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_proxy_header_that_names_nobody_still_ends_the_chain_of_trust() {
    let upstream = ws_echo().await;
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\naccept_proxy_protocol = true\ntrusted = [\"127.0.0.1\"]\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\nx_real_ip = true\n",
        upstream.addr
    );
    let gw = start_gateway(&config).await;
    // v1 UNKNOWN, v2 LOCAL, v2 PROXY with the unix family: none names a client.
    let v2 = |command: u8, family: u8, addresses: &[u8]| {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.extend_from_slice(&[0x20 | command, family]);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    };
    let headers = [
        b"PROXY UNKNOWN\r\n".to_vec(),
        v2(0, 0x00, &[]),
        v2(1, 0x31, &[0u8; 216]),
    ];
    for (n, header) in headers.iter().enumerate() {
        let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(upgrade_request("/", "X-Forwarded-For: 6.6.6.6\r\n").as_bytes());
        stream.write_all(&bytes).await.unwrap();
        assert_eq!(read_response(&mut stream).await.status, 101, "header {n}");
        let seen = upstream.seen.lock().unwrap();
        assert_eq!(
            seen.header(n, "x-real-ip"),
            ["127.0.0.1"],
            "header {n}: the client's X-Forwarded-For was believed"
        );
        assert_eq!(
            seen.header(n, "x-forwarded-for"),
            ["127.0.0.1"],
            "header {n}"
        );
    }
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn an_upgrade_with_a_body_is_400_and_nothing_reaches_the_upstream() {
    let (upstream, mut received) = recording_upstream().await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let frame = client_frame(true, 2, b"data");
    for extra in [
        format!("Content-Length: {}\r\n", frame.len()),
        "Transfer-Encoding: chunked\r\n".to_string(),
    ] {
        let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
        let mut bytes = upgrade_request("/", &extra).into_bytes();
        bytes.extend_from_slice(&frame);
        stream.write_all(&bytes).await.unwrap();
        let answer = read_response(&mut stream).await;
        assert_eq!(answer.status, 400, "{extra}");
        assert!(answer.body.contains("no body"), "{}", answer.body);
    }
    // Content-Length: 0 is no body.
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    let mut bytes = upgrade_request("/", "Content-Length: 0\r\n").into_bytes();
    bytes.extend_from_slice(&frame);
    stream.write_all(&bytes).await.unwrap();
    assert_eq!(read_response(&mut stream).await.status, 101);
    drop(stream);
    // The recording upstream reports at its EOF: the frame behind the head arrived whole,
    // and no refused request reached it.
    let got = within("the frame upstream", received.recv()).await;
    assert_eq!(got.as_deref(), Some(&b"data"[..]));
    gw.wait_idle().await;
    gw.stop().await;
    assert!(received.try_recv().is_err());
}
