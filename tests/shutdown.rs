//! SPEC §5 shutdown: stop accepting, Close 1001 to every client, exit when all are gone.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn shutdown_sends_1001_to_every_client_and_returns() {
    let tcp = tcp_echo().await;
    let ws_up = ws_echo().await;
    let config = format!(
        "[gateway]\nshutdown_timeout = \"5s\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/tcp\"\nupstream = \"tcp://{tcp}\"\n[[route]]\npath = \"/ws\"\nupstream = \"ws://{}\"\n",
        ws_up.addr
    );
    let gw = start_gateway(&config).await;
    let mut clients = Vec::new();
    for path in ["/tcp", "/ws", "/tcp", "/ws"] {
        let mut ws = connect(&gw.ws_url(path)).await;
        ws.send(Message::text("before shutdown")).await.unwrap();
        next_data(&mut ws).await;
        clients.push(ws);
    }
    gw.begin_shutdown();
    for ws in &mut clients {
        let (_, close) = read_until_close(ws).await;
        assert_eq!(close.map(|c| c.0), Some(1001));
    }
    // The ws upstreams were told too.
    let seen = ws_up.seen.clone();
    wait_until("ws upstreams closed with 1001", move || {
        let s = seen.lock().unwrap();
        s.closes.len() == 2
            && s.closes
                .iter()
                .all(|c| c.as_ref().map(|c| c.0) == Some(1001))
    })
    .await;
    // Clients answered (tungstenite replies to Close), so run returns well before the bound.
    let addr = gw.addr();
    gw.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

/// The real binary: SIGTERM, Close 1001 to the client, exit code 0.
#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let upstream = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!("[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n"),
    )
    .unwrap();
    let mut child = ChildGuard(Some(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["--config", path.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsgate"),
    ));
    // The bound address comes from the "listening" log line (port 0 in the file).
    let stderr = child.get().stderr.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr.to_string());
            }
            lines.push(line);
        }
        lines
    });
    let addr = within("listening line", rx).await.expect("address logged");
    let mut ws = connect(&format!("ws://{addr}/")).await;
    ws.send(Message::text("hi")).await.unwrap();
    next_data(&mut ws).await;

    let status = Command::new("kill")
        .args(["-TERM", &child.get().id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(1001));
    drop(ws);
    let mut process = child.0.take().unwrap();
    let status = within(
        "wsgate exits",
        tokio::task::spawn_blocking(move || process.wait()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status.code(), Some(0));

    // SPEC §5: one line per finished connection, with who closed it and how.
    let lines = reader.join().unwrap();
    let closed: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("connection closed"))
        .collect();
    assert_eq!(closed.len(), 1, "{lines:#?}");
    for field in [
        "client=127.0.0.1:",
        "listener=127.0.0.1:0",
        "route=/",
        &format!("upstream=tcp://{upstream}"),
        "duration_ms=",
        "bytes_from_client=2",
        "bytes_to_client=2",
        "close_code=1001",
        "closed_by=gateway",
    ] {
        assert!(
            closed[0].contains(field),
            "{field} missing in {}",
            closed[0]
        );
    }
}

/// Kills the child if the test fails before it exits on its own.
struct ChildGuard(Option<std::process::Child>);

impl ChildGuard {
    fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
