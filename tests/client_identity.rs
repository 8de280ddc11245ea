//! The client's real identity: PROXY protocol toward tcp upstreams and from load balancers,
//! forwarded headers toward ws upstreams (never trusted from strangers), and Unix-socket
//! upstreams of both kinds.

mod support;

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Reads a PROXY header the way a legacy service would, with a parser written here from
/// the specification (not the gateway's), and describes it in one line.
async fn read_proxy_header(stream: &mut TcpStream) -> Result<String, String> {
    let mut start = [0u8; 12];
    stream
        .read_exact(&mut start)
        .await
        .map_err(|e| e.to_string())?;
    if start.starts_with(b"PROXY ") {
        let mut line = start.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() > 107 {
                return Err("v1 line too long".into());
            }
            line.push(stream.read_u8().await.map_err(|e| e.to_string())?);
        }
        let line = String::from_utf8(line).map_err(|e| e.to_string())?;
        let parts: Vec<&str> = line.trim_end().split(' ').collect();
        let [_, family, src, dst, sport, dport] = parts[..] else {
            return Err(format!("bad v1 line {line:?}"));
        };
        let join = |ip: &str, port: &str| -> String {
            format!(
                "{}",
                SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap())
            )
        };
        return Ok(format!(
            "v1 {family} src={} dst={}",
            join(src, sport),
            join(dst, dport)
        ));
    }
    if &start != V2_SIGNATURE {
        return Err("no PROXY header".into());
    }
    let ver_cmd = stream.read_u8().await.map_err(|e| e.to_string())?;
    let family = stream.read_u8().await.map_err(|e| e.to_string())?;
    let len = stream.read_u16().await.map_err(|e| e.to_string())? as usize;
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    if ver_cmd != 0x21 {
        return Err(format!("version/command {ver_cmd:#x}"));
    }
    let (src, dst, rest) = match family {
        0x11 => {
            let ip = |b: &[u8]| std::net::IpAddr::from([b[0], b[1], b[2], b[3]]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
                &body[12..],
            )
        }
        0x21 => {
            let ip = |b: &[u8]| std::net::IpAddr::from(<[u8; 16]>::try_from(b).unwrap());
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
                &body[36..],
            )
        }
        other => return Err(format!("family {other:#x}")),
    };
    let mut authority = "-".to_string();
    let mut tlvs = rest;
    while tlvs.len() >= 3 {
        let (kind, n) = (tlvs[0], u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize);
        let value = &tlvs[3..3 + n];
        if kind == 0x02 {
            authority = String::from_utf8_lossy(value).to_string();
        }
        tlvs = &tlvs[3 + n..];
    }
    Ok(format!("v2 src={src} dst={dst} authority={authority}"))
}

/// A tcp upstream that reports the PROXY header it got as its first message, then echoes.
async fn proxy_reading_upstream() -> SocketAddr {
    tcp_upstream(|mut stream| async move {
        let seen = read_proxy_header(&mut stream)
            .await
            .unwrap_or_else(|e| format!("error: {e}"));
        let _ = stream.write_all(seen.as_bytes()).await;
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

async fn first_text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match next_data(ws).await {
        Message::Binary(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("expected binary, got {other:?}"),
    }
}

#[tokio::test]
async fn tcp_upstreams_learn_the_client_address_by_proxy_protocol() {
    let upstream = proxy_reading_upstream().await;
    let pki = make_pki(&["localhost"]);
    let config = format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n\
         [[route]]\npath = \"/v1\"\nupstream = \"tcp://{upstream}\"\nproxy_protocol = \"v1\"\n\n\
         [[route]]\npath = \"/v2\"\nupstream = \"tcp://{upstream}\"\nproxy_protocol = \"v2\"\n",
        pki.cert.display(),
        pki.key.display()
    );
    let gw = start_gateway(&config).await;
    let (plain, tls) = (gw.addrs()[0], gw.addrs()[1]);
    for version in ["v1", "v2"] {
        let stream = TcpStream::connect(plain).await.unwrap();
        let me = stream.local_addr().unwrap();
        let (mut ws, _) =
            tokio_tungstenite::client_async(format!("ws://{plain}/{version}"), stream)
                .await
                .unwrap();
        let seen = first_text(&mut ws).await;
        let expected = match version {
            "v1" => format!("v1 TCP4 src={me} dst={plain}"),
            _ => format!("v2 src={me} dst={plain} authority=-"),
        };
        assert_eq!(seen, expected);
        // The header came first; the data after it is the client's, untouched.
        ws.send(Message::binary(b"after the header".to_vec()))
            .await
            .unwrap();
        assert_eq!(first_text(&mut ws).await, "after the header");
        ws.close(None).await.unwrap();
    }
    // Over TLS, v2 also carries the server name the client asked for.
    let mut ws = connect_tls(
        &pki.connector(),
        tls,
        &format!("wss://localhost:{}/v2", tls.port()),
    )
    .await;
    let seen = first_text(&mut ws).await;
    assert!(
        seen.starts_with("v2 src=127.0.0.1:")
            && seen.ends_with(&format!("dst={tls} authority=localhost")),
        "{seen}"
    );
    ws.close(None).await.unwrap();
    gw.wait_idle().await;
    gw.stop().await;
}

/// A listener behind a load balancer at 127.0.0.1 (the test), routing to a ws upstream
/// that records the handshake headers.
async fn behind_balancer(trusted: &str, gateway_extra: &str) -> (TestGateway, WsUpstream) {
    let upstream = ws_echo().await;
    let config = format!(
        "[gateway]\n{gateway_extra}\n\n[[listener]]\nbind = \"127.0.0.1:0\"\naccept_proxy_protocol = true\ntrusted = [{trusted}]\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\nx_real_ip = true\n",
        upstream.addr
    );
    (start_gateway(&config).await, upstream)
}

/// Sends `header` and an upgrade request; returns the stream and the response status (0
/// when the gateway closed the connection without an answer).
async fn upgrade_after(gw: &TestGateway, header: &[u8]) -> (TcpStream, u16) {
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(upgrade_request("/", "").as_bytes());
    stream.write_all(&bytes).await.unwrap();
    let mut first = [0u8; 12];
    let status = match within("answer", stream.read_exact(&mut first)).await {
        Ok(_) => std::str::from_utf8(&first[9..12]).unwrap().parse().unwrap(),
        // Closed without an answer.
        Err(_) => 0,
    };
    (stream, status)
}

#[tokio::test]
async fn a_trusted_balancer_names_the_client_for_logs_limits_and_headers() {
    let (gw, upstream) = behind_balancer("\"127.0.0.1\"", "max_connections_per_ip = 1").await;
    let v1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 443\r\n";
    let (held, status) = upgrade_after(&gw, v1).await;
    assert_eq!(status, 101);
    {
        let seen = upstream.seen.lock().unwrap();
        assert_eq!(seen.header(0, "x-forwarded-for"), ["203.0.113.9"]);
        assert_eq!(seen.header(0, "x-real-ip"), ["203.0.113.9"]);
        assert_eq!(
            seen.header(0, "forwarded"),
            ["for=203.0.113.9;proto=http;host=\"localhost\""]
        );
    }
    // The per-IP limit counts the named client, not the balancer: the same client again is
    // refused, another one (here in a v2 header) is not.
    let (_, status) = upgrade_after(&gw, v1).await;
    assert_eq!(status, 503);
    let v2 = ppp_v2_header("198.51.100.4:5000", "10.0.0.1:443");
    let (other, status) = upgrade_after(&gw, &v2).await;
    assert_eq!(status, 101);
    assert_eq!(
        upstream.seen.lock().unwrap().header(1, "x-forwarded-for"),
        ["198.51.100.4"]
    );
    drop((held, other));
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn trust_stops_at_the_client_a_proxy_header_names() {
    // The balancer and the client it names are both in `trusted` (an internal client); the
    // client's own X-Forwarded-For is still not believed.
    let (gw, upstream) = behind_balancer("\"127.0.0.0/8\"", "").await;
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    let mut bytes = b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 443\r\n".to_vec();
    bytes.extend_from_slice(upgrade_request("/", "X-Forwarded-For: 6.6.6.6\r\n").as_bytes());
    stream.write_all(&bytes).await.unwrap();
    assert_eq!(read_response(&mut stream).await.status, 101);
    {
        let seen = upstream.seen.lock().unwrap();
        assert_eq!(seen.header(0, "x-forwarded-for"), ["127.0.0.5"]);
        assert_eq!(seen.header(0, "x-real-ip"), ["127.0.0.5"]);
    }
    drop(stream);
    gw.wait_idle().await;
    gw.stop().await;
}

/// A v2 header, built byte by byte for the test.
fn ppp_v2_header(src: &str, dst: &str) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src.parse().unwrap(), dst.parse().unwrap())
    else {
        panic!("v4 only")
    };
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_headers_from_strangers_are_refused() {
    // Only 127.0.0.2 is a balancer; the test connects from 127.0.0.1.
    let (gw, _upstream) = behind_balancer("\"127.0.0.2\"", "").await;
    let (_, status) = upgrade_after(&gw, b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 443\r\n").await;
    assert_eq!(status, 0, "a spoofed PROXY header gets no answer at all");
    let (_, status) = upgrade_after(&gw, &ppp_v2_header("203.0.113.9:1", "10.0.0.1:2")).await;
    assert_eq!(status, 0);
    // A stranger without a header is an ordinary client.
    let (_, status) = upgrade_after(&gw, b"").await;
    assert_eq!(status, 101);
    // And the balancer itself must send one.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(gw.addr()).await.unwrap();
    stream
        .write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = within("refusal", stream.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "a trusted peer without a PROXY header is refused");
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn spoofed_forwarded_headers_are_replaced() {
    let upstream = ws_echo().await;
    let spoof = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
    ];
    // Nobody trusted: the client's own values are dropped and replaced.
    let gw = start_gateway(&simple_config(
        &format!("ws://{}", upstream.addr),
        "x_real_ip = true",
    ))
    .await;
    let (mut ws, _) = connect_with(&gw.ws_url("/"), &spoof).await.unwrap();
    ws.close(None).await.unwrap();
    {
        let seen = upstream.seen.lock().unwrap();
        assert_eq!(seen.header(0, "x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(seen.header(0, "x-real-ip"), ["127.0.0.1"]);
        assert_eq!(seen.header(0, "x-forwarded-proto"), ["http"]);
        assert_eq!(
            seen.header(0, "x-forwarded-host"),
            [format!("{}", gw.addr())]
        );
        assert_eq!(
            seen.header(0, "forwarded"),
            [format!("for=127.0.0.1;proto=http;host=\"{}\"", gw.addr())]
        );
        assert!(
            !seen.requests[0]
                .iter()
                .any(|(_, v)| v.contains("6.6.6.6") || v.contains("evil")),
            "{:?}",
            seen.requests[0]
        );
    }
    gw.wait_idle().await;
    gw.stop().await;

    // With forwarded headers off, a stranger's are still dropped, not passed on.
    let gw = start_gateway(&simple_config(
        &format!("ws://{}", upstream.addr),
        "forwarded_headers = false",
    ))
    .await;
    let (mut ws, _) = connect_with(&gw.ws_url("/"), &spoof).await.unwrap();
    ws.close(None).await.unwrap();
    {
        let seen = upstream.seen.lock().unwrap();
        let names: Vec<&str> = seen.requests[1].iter().map(|(k, _)| k.as_str()).collect();
        for name in [
            "x-forwarded-for",
            "x-real-ip",
            "forwarded",
            "x-forwarded-proto",
            "x-forwarded-host",
        ] {
            assert!(!names.contains(&name), "{name} in {names:?}");
        }
    }
    gw.wait_idle().await;
    gw.stop().await;

    // From a trusted proxy, the chain of the header it writes (X-Forwarded-For, the default
    // trusted_header) is kept and extended, and names the real client; a Forwarded header
    // it passed on is the client's own, so ours replaces it.
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntrusted = [\"127.0.0.0/8\"]\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\nx_real_ip = true\n",
        upstream.addr
    );
    let gw = start_gateway(&config).await;
    let (mut ws, _) = connect_with(&gw.ws_url("/"), &spoof).await.unwrap();
    ws.close(None).await.unwrap();
    {
        let seen = upstream.seen.lock().unwrap();
        assert_eq!(seen.header(2, "x-forwarded-for"), ["6.6.6.6, 127.0.0.1"]);
        assert_eq!(seen.header(2, "x-real-ip"), ["6.6.6.6"]);
        assert_eq!(seen.header(2, "x-forwarded-proto"), ["https"]);
        assert_eq!(seen.header(2, "x-forwarded-host"), ["evil.example"]);
        assert_eq!(
            seen.header(2, "forwarded"),
            [format!("for=127.0.0.1;proto=http;host=\"{}\"", gw.addr())]
        );
    }
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn unix_socket_upstreams_of_both_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let ws_socket = dir.path().join("ws.sock");
    let seen = ws_echo_unix(&ws_socket);
    let tcp_socket = dir.path().join("tcp.sock");
    let listener = tokio::net::UnixListener::bind(&tcp_socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/ws\"\nupstream = \"ws+unix:{}:/app\"\n\n[[route]]\npath = \"/tcp\"\nupstream = \"unix:{}\"\n",
        ws_socket.display(),
        tcp_socket.display()
    );
    let gw = start_gateway(&config).await;
    let mut ws = connect(&gw.ws_url("/ws/room?x=1")).await;
    ws.send(Message::text("over a unix socket")).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::text("over a unix socket")
    );
    ws.close(None).await.unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.paths, ["/app/room?x=1"]);
        assert_eq!(seen.hosts, [Some("localhost".to_string())]);
    }
    let mut ws = connect(&gw.ws_url("/tcp")).await;
    ws.send(Message::binary(b"bytes".to_vec())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(b"bytes".to_vec()));
    ws.close(None).await.unwrap();
    let _ = ws.next().await;
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_tls_listener_behind_a_balancer_reads_the_header_before_the_handshake() {
    let upstream = ws_echo().await;
    let pki = make_pki(&["localhost"]);
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\naccept_proxy_protocol = true\ntrusted = [\"127.0.0.1\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\n",
        pki.cert.display(),
        pki.key.display(),
        upstream.addr
    );
    let gw = start_gateway(&config).await;
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream
        .write_all(&ppp_v2_header("198.51.100.23:6000", "10.0.0.1:443"))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = pki.connector().connect(name, stream).await.unwrap();
    let url = format!("wss://localhost:{}/", gw.addr().port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    ws.send(Message::text("through tls")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("through tls"));
    {
        let seen = upstream.seen.lock().unwrap();
        assert_eq!(seen.header(0, "x-forwarded-for"), ["198.51.100.23"]);
        assert_eq!(seen.header(0, "x-forwarded-proto"), ["https"]);
    }
    ws.close(None).await.unwrap();
    gw.wait_idle().await;
    gw.stop().await;
}
