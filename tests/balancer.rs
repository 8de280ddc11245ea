//! Behind a real balancer: HAProxy (Debian's) at layer 4 in front of three wsgate processes,
//! with PROXY protocol v2 and health checks on `/readyz`, as deploy/haproxy/haproxy.cfg
//! sets it up. One wsgate is stopped under load: HAProxy stops choosing it once its
//! `/readyz` says 503 (`drain_delay`), no new handshake fails, its clients get 1001 and
//! reconnect through HAProxy to the others, and every message sent before the close reached
//! the upstream.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::child::Gateway;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo upstream that records every text message it received.
async fn recording_echo() -> (SocketAddr, Arc<Mutex<HashSet<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Text(text) = &message {
                        record.lock().unwrap().insert(text.to_string());
                        if ws.send(message).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// HAProxy in the foreground; stopped with the test.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The status HAProxy's stats socket reports for each server of backend `wsgate`.
async fn server_states(socket: &Path) -> Vec<(String, String)> {
    let Ok(mut stream) = tokio::net::UnixStream::connect(socket).await else {
        return Vec::new();
    };
    if stream.write_all(b"show stat\n").await.is_err() {
        return Vec::new();
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text.lines()
        .filter(|l| l.starts_with("wsgate,") && !l.starts_with("wsgate,BACKEND"))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(',').collect();
            Some((fields.get(1)?.to_string(), fields.get(17)?.to_string()))
        })
        .collect()
}

async fn wait_for_states(socket: &Path, want: &[(&str, &str)]) {
    within("HAProxy's view of the servers", async {
        loop {
            let states = server_states(socket).await;
            let matches = want.iter().all(|(name, status)| {
                states
                    .iter()
                    .any(|(n, s)| n == name && s.starts_with(status))
            });
            if matches {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// What the clients through HAProxy saw.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    /// Every message a client sent (each also awaited as its echo, or ended by a Close).
    sent: Mutex<HashSet<String>>,
    failures: Mutex<Vec<String>>,
    handshakes: AtomicUsize,
    /// Closes with 1001, after which the client reconnected.
    reconnects: AtomicUsize,
    echoes: AtomicUsize,
}

/// A long-lived client: messages one after another, each echoed; on Close 1001 it
/// reconnects (through HAProxy) and goes on. `id` names its messages.
async fn held_client(url: String, id: usize, load: Arc<Load>) {
    let mut seq = 0;
    'connection: while !load.stop.load(Ordering::Relaxed) {
        let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                load.failures
                    .lock()
                    .unwrap()
                    .push(format!("held {id}: {e}"));
                return;
            }
        };
        load.handshakes.fetch_add(1, Ordering::Relaxed);
        while !load.stop.load(Ordering::Relaxed) {
            seq += 1;
            let text = format!("held {id} #{seq}");
            // Sent is sent: a message the gateway's Close crossed must still reach the
            // upstream (checked at the end). One the client refused to send (it had read
            // the Close already) was not sent.
            if ws.send(Message::text(text.clone())).await.is_ok() {
                load.sent.lock().unwrap().insert(text.clone());
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Text(echo)))) if echo.as_str() == text => {
                        load.echoes.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        let code = frame.map(|f| u16::from(f.code));
                        if code != Some(1001) {
                            load.failures
                                .lock()
                                .unwrap()
                                .push(format!("held {id}: closed with {code:?}"));
                        }
                        let _ = ws.flush().await;
                        load.reconnects.fetch_add(1, Ordering::Relaxed);
                        continue 'connection;
                    }
                    Ok(Some(Ok(_))) => {}
                    other => {
                        load.failures
                            .lock()
                            .unwrap()
                            .push(format!("held {id}: {other:?}"));
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = ws.close(None).await;
    }
}

/// New connections without pause: handshake, one echo, close.
async fn handshake_loop(url: String, load: Arc<Load>) {
    let mut n = 0;
    while !load.stop.load(Ordering::Relaxed) {
        n += 1;
        let text = format!("short #{n}");
        let attempt = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            ws.send(Message::text(text.clone()))
                .await
                .map_err(|e| format!("send: {e}"))?;
            load.sent.lock().unwrap().insert(text.clone());
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == text => {}
                // A drain may close it after the handshake: then 1001, and the message
                // must have reached the upstream.
                Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1001 => {}
                other => return Err(format!("echo: {other:?}")),
            }
            let _ = ws.close(None).await;
            Ok::<(), String>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => {
                load.handshakes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => load.failures.lock().unwrap().push(e),
            Err(_) => load
                .failures
                .lock()
                .unwrap()
                .push("no answer within 5s".into()),
        }
    }
}

#[tokio::test]
async fn haproxy_moves_clients_off_a_stopping_wsgate() {
    let (upstream, seen) = recording_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gateways = Vec::new();
    let mut servers = Vec::new();
    for i in 0..3 {
        let config = dir.path().join(format!("gw{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[gateway]\ndrain_delay = \"1500ms\"\nshutdown_timeout = \"5s\"\nclose_timeout = \"1s\"\n\
                 [admin]\nbind = \"127.0.0.1:0\"\n\
                 [[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\naccept_proxy_protocol = true\ntrusted = [\"127.0.0.1\"]\n\
                 [[route]]\npath = \"/\"\nupstream = \"ws://{upstream}/\"\n"
            ),
        )
        .unwrap();
        let ready = dir.path().join(format!("gw{i}.ready.json"));
        let gw = Gateway::start(&config, "", &["--ready-file", ready.to_str().unwrap()]);
        wait_until("the ready file", || ready.exists()).await;
        let facts: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
        let addr = facts["listeners"][0]["addr"].as_str().unwrap().to_string();
        let admin: SocketAddr = facts["admin"].as_str().unwrap().parse().unwrap();
        servers.push(format!(
            "    server gw{i} {addr} check port {}\n",
            admin.port()
        ));
        gateways.push(gw);
    }

    // deploy/haproxy/haproxy.cfg with test timings: checks every 100 ms, one failure is down.
    let port = free_port();
    let stats = dir.path().join("haproxy.sock");
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    stats socket {stats} level admin\n\
             defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n    retries 3\n    option redispatch\n\
             frontend websockets\n    bind 127.0.0.1:{port}\n    default_backend wsgate\n\
             backend wsgate\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n\
             \x20   default-server send-proxy-v2 inter 100ms fall 1 rise 1\n{}",
            servers.concat(),
            stats = stats.display(),
        ),
    )
    .unwrap();
    let _haproxy = Haproxy(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("CI must install haproxy (.ci/run does)"),
    );
    wait_for_states(&stats, &[("gw0", "UP"), ("gw1", "UP"), ("gw2", "UP")]).await;

    let url = format!("ws://127.0.0.1:{port}/");
    let load = Arc::new(Load::default());
    let mut tasks = Vec::new();
    for id in 0..9 {
        tasks.push(tokio::spawn(held_client(url.clone(), id, load.clone())));
    }
    for _ in 0..2 {
        tasks.push(tokio::spawn(handshake_loop(url.clone(), load.clone())));
    }
    wait_until("traffic through every gateway", || {
        load.echoes.load(Ordering::Relaxed) > 100
    })
    .await;

    // Stop one: /readyz says 503 at once, HAProxy marks it down, then its drain closes its
    // clients with 1001 and they come back through HAProxy to the others.
    gateways[0].signal("TERM");
    wait_for_states(&stats, &[("gw0", "DOWN"), ("gw1", "UP"), ("gw2", "UP")]).await;
    let stopped = gateways.remove(0);
    assert_eq!(stopped.exit_code().await, Some(0));
    let echoes = load.echoes.load(Ordering::Relaxed);
    wait_until("traffic after the stop", || {
        load.echoes.load(Ordering::Relaxed) > echoes + 100
    })
    .await;

    load.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        within("a client ends", task).await.unwrap();
    }
    let failures = load.failures.lock().unwrap().clone();
    let handshakes = load.handshakes.load(Ordering::Relaxed);
    let reconnects = load.reconnects.load(Ordering::Relaxed);
    eprintln!("{handshakes} handshakes, {reconnects} reconnects after 1001");
    assert!(failures.is_empty(), "{failures:?}");
    assert!(reconnects >= 1, "the stopped gateway's clients reconnected");
    // Every message a client sent reached the upstream, also those the Close crossed.
    let seen = seen.lock().unwrap();
    let lost: Vec<_> = load
        .sent
        .lock()
        .unwrap()
        .iter()
        .filter(|m| !seen.contains(*m))
        .cloned()
        .collect();
    assert!(lost.is_empty(), "{} messages lost: {lost:?}", lost.len());
}
