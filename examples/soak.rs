//! Soak: 100,000 connection cycles through one gateway, then proof that nothing stayed
//! behind. Not part of `cargo test` (it takes a while); run it with
//!
//!     cargo run --release --example soak [-- CYCLES]
//!
//! The gateway runs in this process with two routes, `/tcp` (a TCP echo) and `/ws` (a
//! WebSocket echo), plus `/reset` (a TCP upstream that resets its connections). Each cycle
//! is one client on loopback, chosen in turn: a clean echo and close on `/tcp` or `/ws`, a
//! client that vanishes in the middle of a frame, or a client whose upstream resets. After
//! the last cycle, open file descriptors, live tokio tasks and live relays must be back at
//! the idle level measured before the first; RSS is printed beside them (the allocator may
//! keep freed pages). Exits 1 when something is left.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONCURRENCY: usize = 64;

fn main() {
    let cycles: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ok = runtime.block_on(soak(cycles));
    std::process::exit(if ok { 0 } else { 1 });
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    TcpEcho,
    WsEcho,
    VanishMidFrame,
    UpstreamReset,
}

const KINDS: [Kind; 4] = [
    Kind::TcpEcho,
    Kind::WsEcho,
    Kind::VanishMidFrame,
    Kind::UpstreamReset,
];

async fn soak(cycles: usize) -> bool {
    let tcp = spawn_upstream(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let reset = spawn_upstream(|mut s| async move {
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        // SO_LINGER 0: close sends RST.
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    })
    .await;
    let ws = spawn_upstream(|s| async move {
        if let Ok(mut ws) = tokio_tungstenite::accept_async(s).await {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
    let text = format!(
        "[gateway]\nclose_timeout = \"2s\"\nmax_connections = 100000\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/tcp\"\nupstream = \"tcp://{tcp}\"\n\n[[route]]\npath = \"/reset\"\nupstream = \"tcp://{reset}\"\n\n[[route]]\npath = \"/ws\"\nupstream = \"ws://{ws}\"\n"
    );
    let config = wsgate::config::Config::parse(&text, "soak.toml").expect("config");
    let gateway = wsgate::gateway::Gateway::prepare(config).expect("prepare");
    let metrics = Arc::new(wsgate::telemetry::Metrics::new());
    let server = wsgate::server::Server::start(gateway, metrics.clone())
        .await
        .expect("start");
    let addr = server.local_addrs()[0];
    let running = tokio::spawn(server.clone().run());

    // Warm up (buffer pools, allocator arenas), then take the idle level.
    run_cycles(addr, 2_000).await;
    settle(&metrics).await;
    let idle = Level::now(&metrics);
    let started = Instant::now();
    let failed = run_cycles(addr, cycles).await;
    let elapsed = started.elapsed();
    settle(&metrics).await;
    let after = Level::now(&metrics);

    println!(
        "{cycles} cycles in {:.1}s ({:.0}/s), {failed} with an unexpected outcome",
        elapsed.as_secs_f64(),
        cycles as f64 / elapsed.as_secs_f64()
    );
    println!("              idle     after");
    println!("open fds      {:>8}  {:>8}", idle.fds, after.fds);
    println!("live tasks    {:>8}  {:>8}", idle.tasks, after.tasks);
    println!("live relays   {:>8}  {:>8}", idle.relays, after.relays);
    println!("RSS kB        {:>8}  {:>8}", idle.rss_kb, after.rss_kb);
    server.shutdown();
    let _ = running.await;
    let leaked = after.fds > idle.fds || after.tasks > idle.tasks || after.relays > 0;
    if leaked {
        println!("LEAK: something outlived its connection");
    }
    !leaked && failed == 0
}

struct Level {
    fds: usize,
    tasks: usize,
    relays: usize,
    rss_kb: u64,
}

impl Level {
    fn now(metrics: &wsgate::telemetry::Metrics) -> Level {
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Level {
            fds,
            tasks: tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            relays: metrics.active_relays(),
            rss_kb: pages * 4,
        }
    }
}

/// Waits (bounded) until every relay has ended and lingering closes are over.
async fn settle(metrics: &wsgate::telemetry::Metrics) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics.active_relays() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Connection tasks finish their lingering close after the relay count drops.
    let mut last = usize::MAX;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        if now == last {
            break;
        }
        last = now;
    }
}

/// Runs `n` cycles, CONCURRENCY at a time; returns how many went unexpectedly.
async fn run_cycles(addr: SocketAddr, n: usize) -> usize {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, failed) = (next.clone(), failed.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let kind = KINDS[i % KINDS.len()];
                    let outcome =
                        tokio::time::timeout(Duration::from_secs(10), cycle(addr, kind, i)).await;
                    if !matches!(outcome, Ok(Ok(())))
                        && failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5
                    {
                        eprintln!("cycle {i} ({kind:?}): {outcome:?}");
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    failed.load(std::sync::atomic::Ordering::Relaxed)
}

async fn cycle(addr: SocketAddr, kind: Kind, i: usize) -> std::io::Result<()> {
    let path = match kind {
        Kind::TcpEcho | Kind::VanishMidFrame => "/tcp",
        Kind::WsEcho => "/ws",
        Kind::UpstreamReset => "/reset",
    };
    let mut s = TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let head = read_head(&mut s).await?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(std::io::Error::other(format!("no 101: {head}")));
    }
    let payload = format!("cycle {i}");
    match kind {
        Kind::TcpEcho | Kind::WsEcho => {
            let opcode = if matches!(kind, Kind::WsEcho) { 1 } else { 2 };
            s.write_all(&masked(opcode, payload.as_bytes())).await?;
            let (op, echo) = read_frame(&mut s).await?;
            if op != opcode || echo != payload.as_bytes() {
                return Err(std::io::Error::other("bad echo"));
            }
            s.write_all(&masked(8, &1000u16.to_be_bytes())).await?;
            loop {
                let (op, _) = read_frame(&mut s).await?;
                if op == 8 {
                    return Ok(());
                }
            }
        }
        Kind::VanishMidFrame => {
            // A 1000-byte frame of which 10 bytes arrive; then the client is gone.
            let frame = masked(2, &[9u8; 1000]);
            s.write_all(&frame[..18]).await?;
            Ok(())
        }
        Kind::UpstreamReset => {
            s.write_all(&masked(2, payload.as_bytes())).await?;
            let (op, close) = read_frame(&mut s).await?;
            match (op, close.get(..2)) {
                (8, Some(&[0x03, 0xf3])) => Ok(()), // 1011
                other => Err(std::io::Error::other(format!(
                    "expected 1011, got {other:?}"
                ))),
            }
        }
    }
}

fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

async fn read_head(s: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await?;
    let len = match h[1] & 0x7f {
        126 => s.read_u16().await? as usize,
        127 => s.read_u64().await? as usize,
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    Ok((h[0] & 0x0f, payload))
}

async fn spawn_upstream<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move { handler(s).await });
        }
    });
    addr
}
