//! Benchmarks of the hot paths, to show regressions: handshake validation and the accept
//! key (once per connection), and the relay pumps for small and large messages (per message):
//! client side over an in-memory pipe, upstream over loopback TCP (tcp relay: it reads its
//! upstream on readiness, which pipes do not offer) or an in-memory pipe (ws relay). `cargo bench` prints the figures; nothing here asserts timings.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use wsgate::relay::{RelaySettings, ShutdownSignals, relay_stream, relay_ws};
use wsgate::telemetry::metrics::Flow;
use wsgate::upstream::UpstreamStream;

fn handshake(c: &mut Criterion) {
    let request = http::Request::builder()
        .method("GET")
        .uri("/vnc/display?token=abc")
        .header("Host", "gateway.example.com")
        .header("Upgrade", "websocket")
        .header("Connection", "keep-alive, Upgrade")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Protocol", "binary, base64")
        .header("Origin", "https://app.example.com")
        .header("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0")
        .header("Cookie", "session=0123456789abcdef0123456789abcdef")
        .body(())
        .unwrap();
    c.bench_function("handshake/validate", |b| {
        b.iter(|| {
            wsgate::handshake::check_request_line(black_box(&request)).unwrap();
            wsgate::handshake::validate(black_box(&request)).unwrap()
        })
    });
    c.bench_function("handshake/accept_key", |b| {
        b.iter(|| wsgate::handshake::accept_key(black_box(b"dGhlIHNhbXBsZSBub25jZQ==")))
    });
}

fn settings() -> RelaySettings {
    RelaySettings {
        max_message_size: 16 << 20,
        max_frame_size: 16 << 20,
        close_timeout: Duration::from_secs(5),
        idle_timeout: None,
        ping: None,
        compressed: false,
    }
}

/// A loopback TCP upstream that echoes everything (the stream relay reads upstreams on
/// readiness, which in-memory pipes do not offer).
async fn tcp_echo_upstream() -> UpstreamStream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
    let (connected, accepted) = tokio::join!(connect, listener.accept());
    echo(accepted.unwrap().0);
    UpstreamStream::Tcp(connected.unwrap())
}

fn echo(mut stream: tokio::net::TcpStream) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
}

/// A WebSocket upstream (server role) that echoes every frame.
fn ws_echo(stream: DuplexStream) {
    tokio::spawn(async move {
        let mut ws = WebSocket::after_handshake(stream, Role::Server);
        ws.set_auto_close(true);
        while let Ok(frame) = ws.read_frame().await {
            if frame.opcode == OpCode::Close {
                break;
            }
            let echo = Frame::new(true, frame.opcode, None, frame.payload);
            if ws.write_frame(echo).await.is_err() {
                break;
            }
        }
    });
}

/// Sends `count` binary messages of `size` bytes through the relay and reads back the same
/// number of bytes.
async fn round_trips(client: &mut WebSocket<DuplexStream>, count: usize, size: usize) {
    let payload = vec![7u8; size];
    let mut received = 0;
    for _ in 0..count {
        client
            .write_frame(Frame::binary(Payload::Borrowed(&payload)))
            .await
            .unwrap();
    }
    while received < count * size {
        received += client.read_frame().await.unwrap().payload.len();
    }
}

/// Times `count` round trips of `size`-byte messages through a relayed connection.
fn bench_round_trips(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    group: String,
    (size, count): (usize, usize),
    mut client: WebSocket<DuplexStream>,
) {
    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Bytes((size * count) as u64));
    group.bench_function("round_trips", |b| {
        b.iter(|| runtime.block_on(round_trips(&mut client, count, size)))
    });
    group.finish();
}

fn relay(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, size, count) in [("64B", 64usize, 256usize), ("64KiB", 64 * 1024, 16)] {
        // One relayed connection per benchmark; each iteration is `count` messages.
        let (client, gateway) = duplex(256 * 1024);
        let tcp = runtime.block_on(tcp_echo_upstream());
        let relay = relay_stream(
            gateway,
            tcp,
            std::sync::Arc::new(settings()),
            ShutdownSignals::default(),
            Flow::default(),
        );
        runtime.spawn(relay);
        let client = WebSocket::after_handshake(client, Role::Client);
        bench_round_trips(
            c,
            &runtime,
            format!("relay_tcp/{name}"),
            (size, count),
            client,
        );

        let (client, gateway) = duplex(256 * 1024);
        let (upstream, upstream_far) = duplex(256 * 1024);
        {
            let _spawn_context = runtime.enter();
            ws_echo(upstream_far);
        }
        let relay = relay_ws(
            gateway,
            upstream,
            std::sync::Arc::new(settings()),
            ShutdownSignals::default(),
            Flow::default(),
        );
        runtime.spawn(relay);
        let client = WebSocket::after_handshake(client, Role::Client);
        bench_round_trips(
            c,
            &runtime,
            format!("relay_ws/{name}"),
            (size, count),
            client,
        );
    }
}

criterion_group!(benches, handshake, relay);
criterion_main!(benches);
