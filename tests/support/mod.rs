//! Shared test harness: the gateway in-process on port 0, real upstreams on port 0, clients
//! (tokio-tungstenite, a different WebSocket implementation from the gateway's), raw HTTP and
//! raw frames for what a well-behaved client would never send, and rcgen certificates.
#![allow(dead_code)]

pub mod child;
pub mod netns;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::config::Config;

/// Every wait in the tests is bounded by this; it is a ceiling, not a pause.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("wsgate=debug")),
        )
        .with_test_writer()
        .try_init();
}

/// A port nothing listens on now (for a program that must be told its port in advance).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails the test when `future` does not finish within `DEADLINE`.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {DEADLINE:?}"),
    }
}

/// Polls `condition` until it holds, failing after `DEADLINE`.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !condition() {
        if start.elapsed() > DEADLINE {
            panic!("{what}: still false after {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The gateway

pub use wsgate::testing::TestGateway;

/// What the tests ask of a gateway beyond the library's testing API.
#[allow(async_fn_in_trait)] // used only by these tests, never as `dyn`
pub trait GatewayExt {
    /// `ws://ADDR/path` on the first listener (also for TLS listeners' plain neighbours).
    fn ws_url(&self, path: &str) -> String;
    /// A plain upgrade request for `/`; the answer (a 101 leaves the connection to close).
    async fn upgrade(&self) -> RawResponse;
    /// Drains and waits for the end, within `DEADLINE`.
    async fn stop(self);
    /// Waits until no relay is left running.
    async fn wait_idle(&self);
}

impl GatewayExt for TestGateway {
    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr())
    }

    async fn upgrade(&self) -> RawResponse {
        raw_request(self.addr(), &upgrade_request("/", "")).await
    }

    async fn stop(self) {
        within("gateway shutdown", self.shutdown())
            .await
            .expect("gateway task panicked");
    }

    async fn wait_idle(&self) {
        let stats = self.metrics().clone();
        wait_until("all relays finished", move || stats.active_relays() == 0).await;
    }
}

/// Starts the gateway from configuration text; listeners should bind port 0.
pub async fn start_gateway(toml: &str) -> TestGateway {
    let config = Config::parse(toml, "test.toml").unwrap_or_else(|e| panic!("test config:\n{e}"));
    start_config(config).await
}

pub async fn start_config(config: Config) -> TestGateway {
    init_logs();
    TestGateway::from_config(config)
        .await
        .unwrap_or_else(|e| panic!("start: {e}"))
}

/// A one-listener, one-route configuration.
pub fn simple_config(upstream: &str, route_extra: &str) -> String {
    format!(
        "[gateway]\nclose_timeout = \"1s\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"{upstream}\"\n{route_extra}\n"
    )
}

// ---------------------------------------------------------------------------------------
// Upstreams

/// A TCP echo server: echoes until EOF, then closes its write side.
pub async fn tcp_echo() -> SocketAddr {
    tcp_upstream(|mut stream| async move {
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A TCP server that runs `handler` for each accepted connection.
pub async fn tcp_upstream<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move { handler(stream).await });
        }
    });
    addr
}

/// What a WebSocket upstream saw of its clients.
#[derive(Default, Debug)]
pub struct Seen {
    /// Request target (path and query) of each handshake.
    pub paths: Vec<String>,
    /// Offered `Sec-WebSocket-Protocol` of each handshake.
    pub protocols: Vec<Option<String>>,
    pub origins: Vec<Option<String>>,
    pub hosts: Vec<Option<String>>,
    /// `X-Client-Identity` of each handshake (mTLS tests).
    pub identities: Vec<Option<String>>,
    pub pings: Vec<Vec<u8>>,
    pub pongs: Vec<Vec<u8>>,
    pub closes: Vec<Option<(u16, String)>>,
    /// Connections that ended, with a Close or without.
    pub ended: usize,
    /// Every request header of each handshake, names in lower case.
    pub requests: Vec<Vec<(String, String)>>,
}

impl Seen {
    /// The values of header `name` in handshake `n`.
    pub fn header(&self, n: usize, name: &str) -> Vec<String> {
        self.requests[n]
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

pub struct WsUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
}

/// A WebSocket echo server (tokio-tungstenite). It picks the last offered subprotocol (so a
/// test can tell it apart from a gateway that picks the first), echoes data messages, and on
/// the text message `close <code> <reason>` closes with that code and reason; on
/// `ping <payload>` it sends a Ping.
pub async fn ws_echo() -> WsUpstream {
    ws_echo_with_tls(None).await
}

pub async fn ws_echo_with_tls(tls: Option<tokio_rustls::TlsAcceptor>) -> WsUpstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = shared.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            serve_ws_echo(stream, seen).await
                        }
                    }
                    None => serve_ws_echo(stream, seen).await,
                }
            });
        }
    });
    WsUpstream { addr, seen }
}

/// Answers a WebSocket handshake by hand on a raw stream, for upstreams that then write
/// frames byte by byte (in pieces, or not at all).
pub async fn accept_ws_handshake(stream: &mut TcpStream) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.expect("request head"));
    }
    let head = String::from_utf8(head).expect("ASCII head");
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("sec-websocket-key: "))
        .expect("key");
    let accept = wsgate::handshake::accept_key(key.trim().as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream
        .write_all(response.as_bytes())
        .await
        .expect("write 101");
}

/// The same WebSocket echo server on a Unix-domain socket (ws+unix: upstreams).
pub fn ws_echo_unix(path: &Path) -> Arc<Mutex<Seen>> {
    let listener = tokio::net::UnixListener::bind(path).expect("bind unix socket");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_ws_echo(stream, shared.clone()));
        }
    });
    seen
}

async fn serve_ws_echo<S: AsyncRead + AsyncWrite + Unpin>(stream: S, seen: Arc<Mutex<Seen>>) {
    let record = seen.clone();
    #[allow(clippy::result_large_err)] // the signature is tungstenite's
    let callback = move |req: &Request, mut resp: Response| {
        let mut s = record.lock().unwrap();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        s.paths.push(req.uri().to_string());
        let offered = header("sec-websocket-protocol");
        if let Some(last) = offered
            .as_deref()
            .and_then(|o| o.split(',').map(str::trim).next_back())
        {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(last).unwrap(),
            );
        }
        s.protocols.push(offered);
        s.origins.push(header("origin"));
        s.hosts.push(header("host"));
        s.identities.push(header("x-client-identity"));
        s.requests.push(
            req.headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
        );
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    echo_messages(&mut ws, &seen).await;
    seen.lock().unwrap().ended += 1;
}

async fn echo_messages<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    seen: &Mutex<Seen>,
) {
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Text(text) if text.starts_with("ping ") => {
                let payload = text.as_bytes()[5..].to_vec();
                let _ = ws.send(Message::Ping(payload.into())).await;
            }
            Message::Pong(payload) => seen.lock().unwrap().pongs.push(payload.to_vec()),
            Message::Text(text) if text.starts_with("close ") => {
                let mut parts = text.splitn(3, ' ').skip(1);
                let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1000);
                let reason = parts.next().unwrap_or("").to_string();
                let _ = ws
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    })))
                    .await;
            }
            Message::Text(_) | Message::Binary(_) => {
                #[allow(clippy::collapsible_match)] // the guard would move the message
                if ws.send(message).await.is_err() {
                    return;
                }
            }
            Message::Ping(payload) => seen.lock().unwrap().pings.push(payload.to_vec()),
            Message::Close(frame) => {
                seen.lock()
                    .unwrap()
                    .closes
                    .push(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients

pub type Client = WebSocketStream<TcpStream>;

/// Connects a tokio-tungstenite client; panics on failure.
pub async fn connect(url: &str) -> Client {
    within("client connect", async {
        let host_port = url.split('/').nth(2).expect("url host");
        let stream = TcpStream::connect(host_port).await.expect("tcp connect");
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("websocket handshake");
        ws
    })
    .await
}

/// Connects with extra request headers (subprotocols, Origin); returns the response too.
pub async fn connect_with(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Client,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let host_port = url.split('/').nth(2).expect("url host").to_string();
    let stream = TcpStream::connect(host_port).await.expect("tcp connect");
    tokio_tungstenite::client_async(request, stream).await
}

/// Next data message, skipping pings and pongs; panics on close or error.
pub async fn next_data<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Message {
    within("next message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return m,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    })
    .await
}

/// Reads until the peer's Close; returns its code and reason. Data before it is returned
/// in order in the first element.
pub async fn read_until_close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> (Vec<Message>, Option<(u16, String)>) {
    within("close", async {
        let mut data = Vec::new();
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    // tungstenite queues its answer to a Close; flushing sends it now.
                    let _ = ws.flush().await;
                    return (
                        data,
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    );
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(m)) => data.push(m),
                other => panic!("expected a Close, got {other:?}"),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Raw HTTP and raw frames

/// A parsed HTTP response head.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as written and reads the response (head, and body by Content-Length).
pub async fn raw_request(addr: SocketAddr, request: &str) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    read_response(&mut stream).await
}

pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> RawResponse {
    within("HTTP response", async {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read response");
            assert!(
                n > 0,
                "connection closed before the response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).expect("utf-8 head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.expect("read body");
        RawResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
}

/// An upgrade request with the given extra header lines (each ending in \r\n).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Opens a raw upgraded connection: the test then writes frames byte by byte.
pub async fn raw_upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    raw_upgrade_with(addr, path, "").await
}

/// The same with extra request header lines (each ending in \r\n).
pub async fn raw_upgrade_with(addr: SocketAddr, path: &str, extra: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(upgrade_request(path, extra).as_bytes())
        .await
        .expect("write upgrade");
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 101, "{response:?}");
    stream
}

/// Encodes one frame. `mask` None sends it unmasked (a protocol error from a client).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(fin as u8) << 7 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n < 65536 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked frame, as a client must send.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, opcode, payload, Some([0x12, 0x34, 0x56, 0x78]))
}

/// One frame as it came: (fin, opcode, masked, payload unmasked). No deadline of its own:
/// see [`read_raw_frame`] and [`read_masked_frame`].
pub async fn read_any_frame<S: AsyncRead + Unpin>(stream: &mut S) -> (bool, u8, bool, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.expect("frame head");
    let len = match head[1] & 0x7f {
        126 => stream.read_u16().await.expect("len16") as usize,
        127 => stream.read_u64().await.expect("len64") as usize,
        n => n as usize,
    };
    let masked = head[1] & 0x80 != 0;
    let mut key = [0u8; 4];
    if masked {
        stream.read_exact(&mut key).await.expect("mask");
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.expect("payload");
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    (head[0] & 0x80 != 0, head[0] & 0x0f, masked, payload)
}

/// Reads one unmasked server frame: (fin, opcode, payload).
pub async fn read_raw_frame<S: AsyncRead + Unpin>(stream: &mut S) -> (bool, u8, Vec<u8>) {
    let (fin, opcode, masked, payload) = within("raw frame", read_any_frame(stream)).await;
    assert!(!masked, "server frames must not be masked");
    (fin, opcode, payload)
}

/// Reads one frame the gateway sent as a client (toward a ws upstream): masked, as RFC
/// 6455 §5.1 asks. Returns (opcode, payload unmasked).
pub async fn read_masked_frame<S: AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
    let (_, opcode, masked, payload) = within("masked frame", read_any_frame(stream)).await;
    assert!(masked, "client frames are masked");
    (opcode, payload)
}

/// Waits until a ws upstream has seen `n` handshakes and returns their request targets.
pub async fn upstream_paths(upstream: &WsUpstream, n: usize) -> Vec<String> {
    wait_until("the upstream handshakes", || {
        upstream.seen.lock().unwrap().paths.len() >= n
    })
    .await;
    upstream.seen.lock().unwrap().paths.clone()
}

/// Reads raw frames until a Close and returns its code.
pub async fn read_raw_close<S: AsyncRead + Unpin>(stream: &mut S) -> u16 {
    loop {
        let (_, opcode, payload) = read_raw_frame(stream).await;
        if opcode == 0x8 {
            assert!(payload.len() >= 2, "close without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Certificates

/// A test CA and a server certificate it signed, written as PEM files.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_der: rustls_pki_types::CertificateDer<'static>,
    pub cert_der: rustls_pki_types::CertificateDer<'static>,
    pub key_der: Vec<u8>,
    /// base64 SHA-256 of the server key's SubjectPublicKeyInfo (Chromium's
    /// `--ignore-certificate-errors-spki-list`).
    pub spki_sha256: String,
}

/// Makes a CA and a certificate for `names` (DNS names or IP addresses).
pub fn make_pki(names: &[&str]) -> TestPki {
    make_pki_with(names, &rcgen::PKCS_ECDSA_P256_SHA256)
}

/// The same with the server key of another algorithm (P-384, Ed25519, …).
pub fn make_pki_with(names: &[&str], algorithm: &'static rcgen::SignatureAlgorithm) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wsgate test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate_for(algorithm).expect("key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let params = CertificateParams::new(names).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let spki_sha256 = {
        use base64::Engine as _;
        use rcgen::PublicKeyData as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(key.subject_public_key_info()))
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, contents: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write pem");
        path
    };
    TestPki {
        ca_cert: write("ca.crt", &ca_cert.pem()),
        cert: write("server.crt", &cert.pem()),
        key: write("server.key", &key.serialize_pem()),
        ca_der: ca_cert.der().clone(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
        spki_sha256,
        dir,
    }
}

impl TestPki {
    /// A TLS acceptor for a test upstream that presents this certificate.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![self.cert_der.clone()], key)
        .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// A TLS connector for test clients that trusts only this CA.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    pub fn path_str(path: &Path) -> String {
        path.display().to_string()
    }
}

/// A wss:// client through `connector`.
pub async fn connect_tls(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    url: &str,
) -> WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    within("wss connect", async {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector
            .connect(name, stream)
            .await
            .expect("TLS handshake");
        let (ws, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("websocket handshake");
        ws
    })
    .await
}

/// Connects a client from a chosen loopback source address (127.0.0.2, …), for per-IP limits.
pub async fn connect_from(
    source: &str,
    url: &str,
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let host_port = url.split('/').nth(2).expect("url host");
    let target: SocketAddr = host_port.parse().expect("numeric address in url");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source address"))
        .expect("bind source");
    let stream = socket.connect(target).await.expect("tcp connect");
    tokio_tungstenite::client_async(url, stream)
        .await
        .map(|(ws, _)| ws)
}

/// GET on the admin listener; returns status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = raw_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
    )
    .await;
    (r.status, r.body)
}

/// The value of one metric sample line (`name{labels} value`), 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Accepts any server certificate (signatures still checked) and remembers nothing: for
/// tests that look at *which* certificate a server presents.
#[derive(Debug)]
pub struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that accepts any server certificate.
pub fn accept_any_connector() -> tokio_rustls::TlsConnector {
    let config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(ring())))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

impl TestPki {
    /// A client trusting `server_ca`, presenting this PKI's certificate as its own.
    pub fn client_connector(&self, server_ca: &TestPki) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_ca.ca_der.clone()).expect("add root");
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let config = rustls::ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![self.cert_der.clone()], key)
            .expect("client auth");
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// An acceptor presenting this PKI's certificate and requiring client certificates
    /// signed by `client_ca`.
    pub fn acceptor_requiring_clients(&self, client_ca: &TestPki) -> tokio_rustls::TlsAcceptor {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(client_ca.ca_der.clone()).expect("add root");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), ring())
                .build()
                .expect("verifier");
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert_der.clone()], key)
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// TLS handshake only; returns the stream (for the certificate it saw, or to go on).
pub async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    let name =
        rustls_pki_types::ServerName::try_from(server_name.to_string()).expect("server name");
    within("TLS handshake", connector.connect(name, stream)).await
}

/// A TCP upstream that reads each connection to its end and reports everything it got.
pub async fn recording_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = tcp_upstream(move |mut stream| {
        let tx = tx.clone();
        async move {
            let mut received = Vec::new();
            let _ = stream.read_to_end(&mut received).await;
            let _ = tx.send(received);
        }
    })
    .await;
    (addr, rx)
}
