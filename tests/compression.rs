//! permessage-deflate (RFC 7692) end to end through ws routes: a Python `websockets` client
//! and upstream that both compress; the offer goes upstream, the answer comes back, the
//! compressed (RSV1) frames pass unchanged, and RSV1 stays a protocol error where nothing
//! was negotiated. Needs Python `websockets` (installed by .ci/run); outside CI a machine
//! without it skips with a message.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::*;
use tokio::io::AsyncWriteExt;

/// The header a client offers permessage-deflate with.
const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate\r\n";

/// A gateway whose route `/` goes to a tcp echo with `compression = true` and `extra`.
async fn compressing_gateway(extra: &str) -> TestGateway {
    let echo = tcp_echo().await;
    let keys = format!("compression = true\n{extra}");
    start_gateway(&simple_config(&format!("tcp://{echo}"), &keys)).await
}

/// A client frame with RSV1 set: a compressed message's first frame.
fn compressed_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = client_frame(fin, opcode, payload);
    frame[0] |= 0x40;
    frame
}

/// The bytes the gateway passed on to the upstream of route `/`.
fn bytes_to_upstream(gw: &TestGateway) -> f64 {
    metric(
        &gw.metrics().encode(),
        "wsgate_bytes_total{route=\"/\",direction=\"client_to_upstream\"}",
    )
}

fn peers() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

fn have_websockets() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import websockets"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install Python websockets (.ci/run does)"
        );
        eprintln!("SKIPPED: python3 -m pip install websockets");
    }
    ok
}

/// The compressing Python upstream; killed when dropped.
struct Upstream {
    child: Child,
    port: u16,
}

impl Upstream {
    fn start() -> Upstream {
        let mut child = Command::new("python3")
            .arg(peers().join("deflate_echo.py"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the upstream's port");
        Upstream { child, port }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn python_client(url: &str) -> serde_json::Value {
    let url = url.to_string();
    let output = within(
        "the Python client",
        tokio::task::spawn_blocking(move || {
            Command::new("python3")
                .arg(peers().join("deflate_client.py"))
                .arg(url)
                .output()
                .unwrap()
        }),
    )
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn permessage_deflate_is_negotiated_end_to_end() {
    if !have_websockets() {
        return;
    }
    let upstream = Upstream::start();
    // max_message_size limits the wire size: the compressed 24 KB text is far smaller.
    let gw = start_gateway(&simple_config(
        &format!("ws://127.0.0.1:{}", upstream.port),
        "max_message_size = \"4KiB\"",
    ))
    .await;
    let result = python_client(&gw.ws_url("/")).await;
    let extensions = result["extensions"].as_str().unwrap_or_default();
    assert!(extensions.starts_with("permessage-deflate"), "{result}");
    assert_eq!(result["text_exact"], true, "{result}");
    assert_eq!(result["binary_exact"], true, "{result}");
    let wire = bytes_to_upstream(&gw);
    assert!(
        wire > 0.0 && wire < 4096.0,
        "compressed on the wire: {wire} bytes"
    );
    gw.stop().await;
}

#[tokio::test]
async fn rsv1_without_negotiation_is_a_protocol_error() {
    let upstream = ws_echo().await;
    let gw = start_gateway(&simple_config(&format!("ws://{}", upstream.addr), "")).await;
    // The client offers deflate; the (tungstenite) upstream does not take it.
    let mut stream = raw_upgrade_with(
        gw.addr(),
        "/",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    let frame = compressed_frame(true, 0x1, b"x");
    stream.write_all(&frame).await.unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1002);
    gw.stop().await;
}

#[tokio::test]
async fn tcp_routes_terminate_permessage_deflate() {
    if !have_websockets() {
        return;
    }
    let gw = compressing_gateway("").await;
    let result = python_client(&gw.ws_url("/")).await;
    assert_eq!(
        result["extensions"],
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "{result}"
    );
    assert_eq!(result["text_exact"], true, "{result}");
    assert_eq!(result["binary_exact"], true, "{result}");
    // The upstream got the inflated bytes: as much as the client sent, uncompressed.
    let plain = bytes_to_upstream(&gw);
    assert!(plain >= 24_000.0 + 16_384.0, "{plain}");
    gw.stop().await;
}

/// A raw-deflated message without its tail (RFC 7692 §7.2.1), as a client sends it.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut state = flate2::Compress::new(flate2::Compression::best(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    state
        .compress_vec(data, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

#[tokio::test]
async fn compressed_frames_both_ways_and_a_bomb_meets_1009() {
    let gw = compressing_gateway("max_message_size = \"64KiB\"").await;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let mut stream = raw_upgrade_with(gw.addr(), "/", offer).await;
    let message = b"hello hello hello hello".to_vec();
    let frame = compressed_frame(true, 0x2, &deflate(&message));
    stream.write_all(&frame).await.unwrap();
    // The echo comes back compressed (RSV1), and inflates to what was sent.
    let (first, inflated) = read_deflated(&mut stream).await;
    assert_eq!(first, 0x80 | 0x40 | 0x2, "fin, RSV1, binary");
    assert_eq!(inflated, message);

    // 10 MB of zeros in a few KB: closed with 1009 after at most the limit was produced.
    let bomb = deflate(&vec![0u8; 10 << 20]);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let frame = compressed_frame(true, 0x2, &bomb);
    stream.write_all(&frame).await.unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1009);
    let produced = bytes_to_upstream(&gw);
    // What the bomb inflated to before the limit went upstream, and counts.
    assert!(
        (32_768.0..=65_536.0 + 100.0).contains(&produced),
        "{produced}"
    );
    gw.stop().await;
}

/// Text is checked on what it inflates to (RFC 6455 §8.1: 1007), and data that is not
/// deflate is refused the same way; neither reaches the upstream.
#[tokio::test]
async fn compressed_text_that_is_not_utf8_and_data_that_is_not_deflate_are_1007() {
    let gw = compressing_gateway("").await;
    let cases: [(&str, Vec<u8>); 2] = [
        ("text that is not UTF-8", deflate(b"caf\xc3\x28 au lait")),
        ("not deflate", vec![0xff; 16]),
    ];
    for (what, payload) in cases {
        let mut stream = raw_upgrade_with(gw.addr(), "/", OFFER).await;
        stream
            .write_all(&compressed_frame(true, 0x1, &payload))
            .await
            .unwrap();
        assert_eq!(read_raw_close(&mut stream).await, 1007, "{what}");
    }
    let passed = bytes_to_upstream(&gw);
    assert_eq!(passed, 0.0);
    gw.stop().await;
}

/// One short frame from the gateway: its first byte and its payload, inflated when RSV1
/// says it is compressed.
async fn read_deflated(stream: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    within("a compressed frame", async {
        let mut head = [0u8; 2];
        tokio::io::AsyncReadExt::read_exact(stream, &mut head)
            .await
            .unwrap();
        assert!(head[1] & 0x7f < 126, "a short frame: {head:?}");
        let mut payload = vec![0u8; (head[1] & 0x7f) as usize];
        tokio::io::AsyncReadExt::read_exact(stream, &mut payload)
            .await
            .unwrap();
        if head[0] & 0x40 == 0 {
            return (head[0], payload);
        }
        payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut inflated = Vec::with_capacity(1024);
        flate2::Decompress::new(false)
            .decompress_vec(&payload, &mut inflated, flate2::FlushDecompress::Sync)
            .unwrap();
        (head[0], inflated)
    })
    .await
}

/// RFC 6455 §5.4: a Ping may come between the fragments of a message, also of a compressed
/// one, and is not part of it: answered with its Pong, and the message arrives whole. A
/// first fragment that inflates to nothing still gives the message its opcode.
#[tokio::test]
async fn a_ping_between_compressed_fragments_is_answered_and_the_message_kept() {
    let gw = compressing_gateway("ping_interval = \"off\"").await;
    let mut stream = raw_upgrade_with(gw.addr(), "/", OFFER).await;
    let message = b"fragmented and compressed".to_vec();
    // The first fragment is empty: it inflates to nothing.
    stream
        .write_all(&compressed_frame(false, 0x1, &[]))
        .await
        .unwrap();
    stream
        .write_all(&client_frame(true, 0x9, b"between"))
        .await
        .unwrap();
    stream
        .write_all(&client_frame(true, 0x0, &deflate(&message)))
        .await
        .unwrap();
    // The Pong, and the tcp upstream's echo as compressed binary messages (a 1002 instead
    // would mean the message lost its opcode or the Ping was taken into it).
    let (mut pong, mut echoed) = (None, Vec::new());
    while pong.is_none() || echoed.len() < message.len() {
        let (first, payload) = read_deflated(&mut stream).await;
        match first & 0x0f {
            0xA => pong = Some(payload),
            0x2 => echoed.extend(payload),
            other => panic!("unexpected frame {first:#x} (opcode {other:#x}): {payload:?}"),
        }
    }
    assert_eq!(echoed, message);
    gw.stop().await;
}

/// With compression on, the frame checks still hold: an unmasked
/// compressed frame, RSV1 on a continuation frame (RFC 7692 §6.1): 1002 each.
#[tokio::test]
async fn misplaced_rsv1_and_unmasked_frames_with_compression_are_1002() {
    let gw = compressing_gateway("").await;
    let mut stream = raw_upgrade_with(gw.addr(), "/", OFFER).await;
    let mut unmasked = frame(true, 0x2, &deflate(b"no mask"), None);
    unmasked[0] |= 0x40;
    stream.write_all(&unmasked).await.unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1002);

    let mut stream = raw_upgrade_with(gw.addr(), "/", OFFER).await;
    let deflated = deflate(b"two fragments");
    let (one, two) = deflated.split_at(4);
    let first = compressed_frame(false, 0x2, one);
    let second = compressed_frame(true, 0x0, two);
    stream.write_all(&first).await.unwrap();
    stream.write_all(&second).await.unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1002);
    gw.stop().await;
}

/// SPEC §4: nothing outlives its connection. The upstream ends at once; the relay closes
/// the client with 1000, and a client that never answers nor leaves does not keep the
/// connection (and its slots) alive with compression on either.
#[tokio::test]
async fn a_silent_client_does_not_keep_a_compressed_connection_alive() {
    let upstream = tcp_upstream(|stream| async move { drop(stream) }).await;
    let gw = TestGateway::builder()
        .route_with("/", &format!("tcp://{upstream}"), "compression = true")
        .gateway("close_timeout = \"500ms\"")
        .start()
        .await
        .unwrap();
    let mut stream = raw_upgrade_with(gw.addr(), "/", OFFER).await;
    assert_eq!(read_raw_close(&mut stream).await, 1000);
    // The client holds its socket open and sends nothing.
    gw.wait_idle().await;
    drop(stream);
    gw.stop().await;
}

/// The same through Node's `ws` (installed by .ci/run with `npm ci --prefix tests/peers`).
#[tokio::test]
async fn node_ws_with_compression_through_ws_and_tcp_routes() {
    if !peers().join("node_modules/ws").exists() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run npm ci --prefix tests/peers"
        );
        eprintln!("SKIPPED: npm ci --prefix tests/peers");
        return;
    }
    if !have_websockets() {
        return;
    }
    let upstream = Upstream::start();
    let echo = tcp_echo().await;
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/ws\"\nupstream = \"ws://127.0.0.1:{}\"\n\n[[route]]\npath = \"/tcp\"\nupstream = \"tcp://{echo}\"\ncompression = true\n",
        upstream.port
    ))
    .await;
    for path in ["/ws", "/tcp"] {
        let url = gw.ws_url(path);
        let output = within(
            "the Node client",
            tokio::task::spawn_blocking(move || {
                Command::new("node")
                    .arg(peers().join("deflate_client.mjs"))
                    .arg(url)
                    .output()
                    .unwrap()
            }),
        )
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(
            result["extensions"]
                .as_str()
                .unwrap_or_default()
                .starts_with("permessage-deflate"),
            "{path}: {result}"
        );
        assert_eq!(result["text_exact"], true, "{path}: {result}");
        assert_eq!(result["binary_exact"], true, "{path}: {result}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn an_oversized_compressed_route_frame_is_1009() {
    let gw = compressing_gateway("max_frame_size = \"1KiB\"").await;
    let mut stream = raw_upgrade_with(gw.addr(), "/", OFFER).await;
    // The header of a 64 KiB frame, and a little of its payload: the relay's limit answers.
    let frame = client_frame(true, 0x2, &vec![7u8; 64 << 10]);
    stream.write_all(&frame[..200]).await.unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1009);
    gw.stop().await;
}
