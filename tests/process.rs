//! The real binary as a child process: reload by signal and by `wsgate reload`, JSON logs,
//! and an accept loop that survives running out of file descriptors.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use futures_util::SinkExt;
use support::child::Gateway;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

fn config_text(upstream: &str, gateway_extra: &str) -> String {
    format!(
        "[gateway]\nclose_timeout = \"1s\"\n{gateway_extra}\n[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"{upstream}\"\n"
    )
}

#[tokio::test]
async fn sighup_and_reload_command_switch_routes_and_keep_connections() {
    let up1 = ws_echo().await;
    let up2 = ws_echo().await;
    let up3 = ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    let pid_file = dir.path().join("wsgate.pid");
    std::fs::write(&config, config_text(&format!("ws://{}/", up1.addr), "")).unwrap();
    let gw = Gateway::start(&config, "", &["--pid-file", pid_file.to_str().unwrap()]);
    let addr = gw.addr().await;
    let mut old = connect(&format!("ws://{addr}/")).await;
    old.send(Message::text("one")).await.unwrap();
    next_data(&mut old).await;

    // Real SIGHUP.
    std::fs::write(&config, config_text(&format!("ws://{}/", up2.addr), "")).unwrap();
    gw.signal("HUP");
    gw.wait_for_line("configuration reloaded").await;
    let mut new = connect(&format!("ws://{addr}/")).await;
    new.send(Message::text("two")).await.unwrap();
    next_data(&mut new).await;
    assert_eq!(up2.seen.lock().unwrap().paths.len(), 1);

    // `wsgate reload --pid-file`.
    std::fs::write(&config, config_text(&format!("ws://{}/", up3.addr), "")).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["reload", "--pid-file", pid_file.to_str().unwrap()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let reloaded = gw.clone_count_waiter("configuration reloaded", 2).await;
    assert!(reloaded);
    let mut newest = connect(&format!("ws://{addr}/")).await;
    newest.send(Message::text("three")).await.unwrap();
    next_data(&mut newest).await;
    assert_eq!(up3.seen.lock().unwrap().paths.len(), 1);

    // An invalid file is refused with one line; the old config stays.
    std::fs::write(&config, "[[route]]\npath = 5\n").unwrap();
    gw.signal("HUP");
    gw.wait_for_line("reload refused").await;
    let mut after = connect(&format!("ws://{addr}/")).await;
    after.send(Message::text("four")).await.unwrap();
    next_data(&mut after).await;
    assert_eq!(up3.seen.lock().unwrap().paths.len(), 2);

    // The first connection never noticed.
    old.send(Message::text("still one")).await.unwrap();
    assert_eq!(next_data(&mut old).await, Message::text("still one"));
    assert_eq!(up1.seen.lock().unwrap().paths.len(), 1);

    gw.signal("TERM");
    for ws in [&mut old, &mut new, &mut newest, &mut after] {
        let (_, close) = read_until_close(ws).await;
        assert_eq!(close.map(|c| c.0), Some(1001));
    }
    assert_eq!(gw.exit_code().await, Some(0));
    assert!(!pid_file.exists(), "the PID file is removed at exit");
}

impl Gateway {
    async fn clone_count_waiter(&self, needle: &str, n: usize) -> bool {
        let lines = self.lines.clone();
        let needle = needle.to_string();
        wait_until("reload logged", move || {
            lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(&needle))
                .count()
                >= n
        })
        .await;
        true
    }
}

#[tokio::test]
async fn json_logs() {
    let upstream = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config_text(
            &format!("tcp://{upstream}"),
            "log_format = \"json\"\nworkers = 1",
        ),
    )
    .unwrap();
    let gw = Gateway::start(&config, "", &[]);
    let line = gw.wait_for_line("listening").await;
    let value: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let addr = value["fields"]["addr"]
        .as_str()
        .expect("addr field")
        .to_string();
    let mut ws = connect(&format!("ws://{addr}/")).await;
    ws.send(Message::text("json")).await.unwrap();
    next_data(&mut ws).await;
    ws.close(None).await.unwrap();
    let line = gw.wait_for_line("connection closed").await;
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["fields"]["closed_by"], "client");
    assert_eq!(value["fields"]["bytes_from_client"], 4);
    // The rest of SPEC §5's line: where the connection came in and went.
    assert_eq!(value["fields"]["listener"], "main", "{line}");
    assert_eq!(value["fields"]["route"], "/", "{line}");
    assert_eq!(
        value["fields"]["upstream"],
        format!("tcp://{upstream}"),
        "{line}"
    );
    assert_eq!(value["fields"]["tls"], false, "{line}");
    assert_eq!(value["fields"]["client_cert"], "", "{line}");
    // `close(None)`: a Close without a code, recorded as 1005.
    assert_eq!(value["fields"]["close_code"], 1005, "{line}");
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

/// SPEC §5 on an mTLS listener: the connection line says TLS, and names the verified client
/// certificate.
#[tokio::test]
async fn json_logs_name_the_client_certificate() {
    let upstream = tcp_echo().await;
    let server = make_pki(&["localhost"]);
    let clients = make_pki(&["alice.example"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlog_format = \"json\"\nworkers = 1\n[[listener]]\nname = \"mtls\"\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n",
            server.cert.display(),
            server.key.display(),
            clients.ca_cert.display()
        ),
    )
    .unwrap();
    let gw = Gateway::start(&config, "", &[]);
    let line = gw.wait_for_line("listening").await;
    let value: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let addr: std::net::SocketAddr = value["fields"]["addr"]
        .as_str()
        .expect("addr field")
        .parse()
        .expect("an address");
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = clients
        .client_connector(&server)
        .connect(name, socket)
        .await
        .expect("mTLS handshake");
    let url = format!("wss://localhost:{}/", addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    ws.send(Message::text("who")).await.unwrap();
    next_data(&mut ws).await;
    ws.close(None).await.unwrap();
    let line = gw.wait_for_line("connection closed").await;
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["fields"]["listener"], "mtls", "{line}");
    assert_eq!(value["fields"]["tls"], true, "{line}");
    let cert = value["fields"]["client_cert"].as_str().unwrap_or_default();
    assert!(cert.contains("DNS:alice.example"), "{line}");
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

/// With RLIMIT_NOFILE at 48, holding 80 connections runs the process out of descriptors.
/// The accept loop must log, back off (not spin), and serve again once descriptors are free.
#[tokio::test]
async fn accept_loop_survives_running_out_of_file_descriptors() {
    let upstream = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_text(&format!("tcp://{upstream}"), "")).unwrap();
    let gw = Gateway::start(&config, "ulimit -n 48 &&", &[]);
    let addr: std::net::SocketAddr = gw.addr().await.parse().unwrap();

    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(
            tokio::net::TcpStream::connect(addr)
                .await
                .expect("the kernel backlog accepts"),
        );
    }
    gw.wait_for_line("accept failed").await;
    // Backing off: a one-second window of exhaustion shows a handful of lines (5 ms doubling
    // to 1 s), where a spinning loop would log thousands.
    let before = gw.count("accept failed");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let during = gw.count("accept failed") - before;
    assert!(
        during <= 20,
        "{during} accept errors logged in a second: the loop spins"
    );

    drop(held);
    // Served again: an upgrade through a fresh connection succeeds.
    let mut ws = within("served again", async {
        loop {
            match connect_with(&format!("ws://{addr}/"), &[]).await {
                Ok((ws, _)) => return ws,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    ws.send(Message::text("alive")).await.unwrap();
    assert_eq!(next_data(&mut ws).await.into_data(), b"alive".as_slice());
    gw.signal("TERM");
    drop(ws);
    assert_eq!(gw.exit_code().await, Some(0));
}

#[tokio::test]
async fn the_log_line_names_the_client_a_balancer_reported() {
    let upstream = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlog_format = \"json\"\nworkers = 1\n[[listener]]\nname = \"behind-lb\"\nbind = \"127.0.0.1:0\"\naccept_proxy_protocol = true\ntrusted = [\"127.0.0.1\"]\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start(&config, "", &[]);
    let line = gw.wait_for_line("listening").await;
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr: std::net::SocketAddr = value["fields"]["addr"].as_str().unwrap().parse().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 443\r\n".to_vec();
    request.extend_from_slice(upgrade_request("/", "").as_bytes());
    stream.write_all(&request).await.unwrap();
    assert_eq!(read_response(&mut stream).await.status, 101);
    stream
        .write_all(&client_frame(true, 0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let line = gw.wait_for_line("connection closed").await;
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["fields"]["client"], "203.0.113.9:40000", "{line}");
    drop(stream);
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

/// A refused token is logged, once per request and rate-limited, without the token: neither
/// from the query nor from the path (`token_from = "path"`), nor the credentials of a
/// refused JWT.
#[tokio::test]
async fn refused_tokens_are_logged_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.cfg");
    std::fs::write(&tokens, "known: 127.0.0.1:9\nknown-sekrit: 127.0.0.1:9\n").unwrap();
    let secret = dir.path().join("hs.key");
    std::fs::write(&secret, "a-secret").unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n\n\
             [[route]]\npath = \"/q\"\ntargets = {{ file = \"{t}\" }}\n\n\
             [[route]]\npath = \"/p\"\ntargets = {{ file = \"{t}\" }}\ntoken_from = \"path\"\n\n\
             [[route]]\npath = \"/jwt\"\nupstream = \"tcp://127.0.0.1:9\"\nauth = {{ jwt = {{ secret_file = \"{s}\" }} }}\n",
            t = tokens.display(),
            s = secret.display()
        ),
    )
    .unwrap();
    let gw = Gateway::start(&config, "", &[]);
    let addr: std::net::SocketAddr = gw.addr().await.parse().unwrap();
    for target in [
        "/q?token=sekrit-in-query",
        "/p/sekrit-in-path",
        "/jwt?access_token=sekrit.jwt.value",
    ] {
        let response = raw_request(addr, &upgrade_request(target, "")).await;
        assert!(
            response.status == 404 || response.status == 401,
            "{target}: {response:?}"
        );
    }
    // On a path-token route no refusal shows the path: a known token whose target refuses
    // (502, logged as a failure), a plain GET (426).
    let refused = raw_request(addr, &upgrade_request("/p/known-sekrit", "")).await;
    assert_eq!(refused.status, 502, "{refused:?}");
    let plain = raw_request(
        addr,
        "GET /p/sekrit-in-a-get HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(plain.status, 426, "{plain:?}");
    let lines = gw.lines.clone();
    wait_until("five refusals logged", move || {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("upgrade refused") || l.contains("upgrade failed"))
            .count()
            == 5
    })
    .await;
    let logged = gw.lines.lock().unwrap().join("\n");
    assert!(
        !logged.contains("sekrit"),
        "a token reached the log:\n{logged}"
    );
}

/// Reads notifications a gateway sends to a test-side `NOTIFY_SOCKET` until one contains
/// `state`; returns every message read.
async fn notified(socket: &tokio::net::UnixDatagram, state: &str, seen: &mut Vec<String>) {
    within(&format!("systemd notification {state}"), async {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = socket.recv(&mut buf).await.unwrap();
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = message.lines().any(|l| l == state);
            seen.push(message);
            if done {
                return;
            }
        }
    })
    .await
}

/// `Type=notify`: READY=1 once the listeners serve, RELOADING=1 and READY=1 around a SIGHUP
/// reload, STOPPING=1 at the drain, and WATCHDOG=1 pings while `WATCHDOG_USEC` is set.
#[tokio::test]
async fn systemd_hears_ready_reloading_stopping_and_watchdog_pings() {
    let echo = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_text(&format!("tcp://{echo}"), "")).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let gw = Gateway::start(
        &config,
        &format!(
            "NOTIFY_SOCKET='{}' WATCHDOG_USEC=100000",
            notify_path.display()
        ),
        &[],
    );
    let mut seen = Vec::new();
    notified(&socket, "READY=1", &mut seen).await;
    // READY=1 comes after the listeners are bound: a client is served at once.
    let addr = gw.addr().await;
    let mut ws = connect(&format!("ws://{addr}/")).await;
    ws.send(Message::text("up")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(b"up".to_vec()));
    for _ in 0..2 {
        notified(&socket, "WATCHDOG=1", &mut seen).await;
    }
    gw.signal("HUP");
    notified(&socket, "RELOADING=1", &mut seen).await;
    let reloading = seen.last().unwrap().clone();
    assert!(
        reloading.contains("MONOTONIC_USEC="),
        "Type=notify-reload wants the time: {reloading:?}"
    );
    notified(&socket, "READY=1", &mut seen).await;
    gw.signal("TERM");
    notified(&socket, "STOPPING=1", &mut seen).await;
    // Nobody reads the socket from here on: the watchdog's pings fill its buffer, and the
    // gateway must drain and exit all the same (a blocking send stalled it: checked).
    assert_eq!(gw.exit_code().await, Some(0));
}

/// Socket activation with systemd's own tool: the listener named like the socket serves on
/// it (also the connection that was waiting when the gateway started), and a socket of
/// another name stops the start with a line that names both and the fix.
#[tokio::test]
async fn socket_activation_serves_on_the_passed_socket_of_the_listeners_name() {
    let echo = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    // The listener's own address is port 0: serving on the activated port proves the socket
    // was used, not bound anew.
    std::fs::write(&config, config_text(&format!("tcp://{echo}"), "")).unwrap();

    let port = free_port();
    let launcher = format!("systemd-socket-activate -l 127.0.0.1:{port} --fdname=main");
    let gw = Gateway::start_under(&config, "", &launcher, &[]);
    // systemd-socket-activate listens first and starts the gateway on the first connection.
    let url = format!("ws://127.0.0.1:{port}/");
    let mut ws = within("an activated gateway answers", async {
        loop {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((ws, _)) => return ws,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    ws.send(Message::text("activated")).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::binary(b"activated".to_vec())
    );
    gw.wait_for_line(&format!("addr=127.0.0.1:{port}")).await;
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));

    let port = free_port();
    let launcher = format!("systemd-socket-activate -l 127.0.0.1:{port} --fdname=public");
    let gw = Gateway::start_under(&config, "", &launcher, &[]);
    // The launcher waits for a connection before it starts the gateway.
    let _poke = within("the launcher listens", async {
        loop {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(stream) => return stream,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    let line = gw.wait_for_line("socket activation").await;
    assert!(
        line.contains("listener `main` has no socket")
            && line.contains("named `public`")
            && line.contains("FileDescriptorName=main"),
        "{line}"
    );
    assert_eq!(gw.exit_code().await, Some(1));
}

/// Puts `source` at `path` as a package manager installs a binary: written beside it, then
/// renamed over it (the running process keeps its open file).
fn install_binary(source: &Path, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let staged = path.with_extension("new");
    std::fs::copy(source, &staged).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// `wsgate upgrade --pid-file`: its exit status and what it printed.
async fn run_upgrade(binary: &Path, pid_file: &Path) -> (bool, String) {
    let mut command = Command::new(binary);
    command.args(["upgrade", "--pid-file", pid_file.to_str().unwrap()]);
    let output = within(
        "wsgate upgrade",
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .unwrap()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn pid_in(pid_file: &Path) -> i32 {
    std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether `pid` still runs (a zombie has ended).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Handshakes one after another until `stop`, each with a message echoed; counts what
/// succeeded and describes every failure (a refused, reset or unanswered handshake).
async fn handshake_loop(
    url: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (usize, Vec<String>) {
    use futures_util::StreamExt;
    let (mut done, mut failures) = (0, Vec::new());
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let attempt = async {
            let stream = tokio::net::TcpStream::connect(
                url.trim_start_matches("ws://").trim_end_matches('/'),
            )
            .await
            .map_err(|e| format!("connect: {e}"))?;
            let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), stream)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            ws.send(Message::text("hello"))
                .await
                .map_err(|e| format!("send: {e}"))?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == "hello" => {}
                other => return Err(format!("echo: {other:?}")),
            }
            let _ = ws.close(None).await;
            Ok::<(), String>(())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => done += 1,
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("no answer within 5s".into()),
        }
    }
    (done, failures)
}

/// The binary replaced twice under a loop of handshakes: none is refused or reset; a
/// connection opened before each switch keeps relaying in its old process until
/// `upgrade_drain_timeout`, then gets 1001; the PID file names the newest process. A new
/// binary that cannot start leaves the old one serving, and `wsgate upgrade` says why.
#[tokio::test]
async fn upgrade_replaces_the_binary_without_refusing_a_handshake() {
    let up = ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("wsgate");
    install_binary(Path::new(env!("CARGO_BIN_EXE_wsgate")), &binary);
    let config = dir.path().join("gateway.toml");
    let pid_file = dir.path().join("wsgate.pid");
    std::fs::write(
        &config,
        format!(
            // A second listener without a name: it is named by its address, ':' and all.
            "{}\n[admin]\nbind = \"127.0.0.1:0\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n",
            config_text(
                &format!("ws://{}/", up.addr),
                "upgrade_drain_timeout = \"3s\"\n"
            )
        ),
    )
    .unwrap();
    let gw = Gateway::start_binary(
        &binary,
        &config,
        "",
        "",
        &["--pid-file", pid_file.to_str().unwrap()],
    );
    let addr = gw.addr().await;
    let admin = gw.admin_addr().await;
    let first = gw.pid() as i32;
    let url = format!("ws://{addr}/");
    let unnamed = gw.wait_for_line("listening listener=127.0.0.1:0").await;
    let unnamed = unnamed
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .expect("the second listener's address")
        .to_string();
    // The processes after the first are its children, not the test's: ended here if the
    // test fails before it stops them.
    struct Newest<'a>(&'a Path);
    impl Drop for Newest<'_> {
        fn drop(&mut self) {
            if let Ok(text) = std::fs::read_to_string(self.0)
                && let Ok(pid) = text.trim().parse::<i32>()
                && pid as u32 != std::process::id()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _newest = Newest(&pid_file);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four clients at once, so that handshakes are in flight at every moment of a switch.
    let load: Vec<_> = (0..4)
        .map(|_| tokio::spawn(handshake_loop(url.clone(), stop.clone())))
        .collect();

    // A binary that cannot start: the old process keeps serving and the command says why.
    std::fs::write(dir.path().join("broken"), "#!/bin/sh\nexit 3\n").unwrap();
    install_binary(&dir.path().join("broken"), &binary);
    let (ok, said) = run_upgrade(Path::new(env!("CARGO_BIN_EXE_wsgate")), &pid_file).await;
    assert!(
        !ok && said.contains("exited") && said.contains("before it was ready"),
        "{said}"
    );
    gw.wait_for_line("upgrade failed; this process keeps serving")
        .await;
    assert_eq!(pid_in(&pid_file), first);

    install_binary(Path::new(env!("CARGO_BIN_EXE_wsgate")), &binary);
    let mut held = Vec::new();
    let mut pids = vec![first];
    for round in 0..2 {
        let mut before = connect(&url).await;
        before
            .send(Message::text(format!("before {round}")))
            .await
            .unwrap();
        next_data(&mut before).await;
        let (ok, said) = run_upgrade(&binary, &pid_file).await;
        assert!(ok && said.contains("upgraded"), "{said}");
        let new = pid_in(&pid_file);
        assert!(
            !pids.contains(&new) && alive(new),
            "a new process: {new}, {pids:?}"
        );
        // The old process still relays what it holds.
        before
            .send(Message::text(format!("still {round}")))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut before).await,
            Message::text(format!("still {round}"))
        );
        // And the admin listener moved with the others.
        let (status, _) = admin_get(admin, "/readyz").await;
        assert_eq!(status, 200);
        pids.push(new);
        held.push(before);
    }
    // Handshakes went on for a while after the second switch.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut done, mut failures) = (0, Vec::new());
    for client in load {
        let (ok, failed) = within("the handshake loop", client).await.unwrap();
        done += ok;
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} of {} handshakes failed: {failures:?}",
        failures.len(),
        done + failures.len()
    );
    eprintln!("{done} handshakes during two upgrades, none failed");
    assert!(done > 20, "only {done} handshakes");

    // Each old process closes what it held with 1001 once upgrade_drain_timeout passed,
    // and exits leaving the PID file to the newest.
    for ws in &mut held {
        let (_, close) = read_until_close(ws).await;
        assert_eq!(close.map(|c| c.0), Some(1001));
    }
    assert_eq!(gw.exit_code().await, Some(0));
    let second = pids[1];
    wait_until("the second process exits", || !alive(second)).await;
    let newest = pids[2];
    assert_eq!(pid_in(&pid_file), newest);
    let mut after = connect(&url).await;
    after.send(Message::text("after")).await.unwrap();
    assert_eq!(next_data(&mut after).await, Message::text("after"));
    // The unnamed listener kept its socket through both switches.
    let mut other = connect(&format!("ws://{unnamed}/")).await;
    other.send(Message::text("other")).await.unwrap();
    assert_eq!(next_data(&mut other).await, Message::text("other"));
    drop(other);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(newest),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (_, close) = read_until_close(&mut after).await;
    assert_eq!(close.map(|c| c.0), Some(1001));
    wait_until("the newest process exits", || !alive(newest)).await;
    assert!(
        !pid_file.exists(),
        "the newest process removes the PID file at exit"
    );
}

/// `watch_config = true`: a ConfigMap-style update (the file is a symlink into a data folder
/// whose link is swapped) is applied without a signal; a broken one is refused and the
/// running configuration stays.
#[tokio::test]
async fn watch_config_applies_a_changed_file_without_a_signal() {
    let (up1, up2) = (ws_echo().await, ws_echo().await);
    let dir = tempfile::tempdir().unwrap();
    let text = |up: &WsUpstream| {
        config_text(
            &format!("ws://{}/", up.addr),
            "watch_config = true\ncertificate_check_interval = \"50ms\"\n",
        )
    };
    // As the kubelet lays out a mounted ConfigMap.
    let swap = |version: &str, content: &str| {
        let data = dir.path().join(version);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("gateway.toml"), content).unwrap();
        let staged = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(version, &staged).unwrap();
        std::fs::rename(&staged, dir.path().join("..data")).unwrap();
    };
    swap("v1", &text(&up1));
    let config = dir.path().join("gateway.toml");
    std::os::unix::fs::symlink("..data/gateway.toml", &config).unwrap();
    let gw = Gateway::start(&config, "", &[]);
    let url = format!("ws://{}/", gw.addr().await);
    let mut ws = connect(&url).await;
    ws.send(Message::text("one")).await.unwrap();
    next_data(&mut ws).await;
    assert_eq!(up1.seen.lock().unwrap().paths.len(), 1);

    swap("v2", &text(&up2));
    gw.wait_for_line("configuration reloaded").await;
    let mut ws2 = connect(&url).await;
    ws2.send(Message::text("two")).await.unwrap();
    next_data(&mut ws2).await;
    assert_eq!(up2.seen.lock().unwrap().paths.len(), 1);

    swap("v3", "[[route]]\npath = 5\n");
    gw.wait_for_line("reload refused").await;
    let mut ws3 = connect(&url).await;
    ws3.send(Message::text("three")).await.unwrap();
    next_data(&mut ws3).await;
    assert_eq!(up2.seen.lock().unwrap().paths.len(), 2);
    // The first connection never noticed.
    ws.send(Message::text("still")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("still"));
    assert_eq!(gw.count("configuration file changed"), 2);
}

/// `drain_delay`: after SIGTERM `/readyz` says 503 at once while new handshakes are still
/// served; the drain (1001) begins when the delay has passed, or at a second signal.
#[tokio::test]
async fn drain_delay_turns_readyz_off_before_the_drain() {
    let up = ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[admin]\nbind = \"127.0.0.1:0\"\n",
            config_text(&format!("ws://{}/", up.addr), "drain_delay = \"1h\"\n")
        ),
    )
    .unwrap();
    let gw = Gateway::start(&config, "", &[]);
    let url = format!("ws://{}/", gw.addr().await);
    let admin = gw.admin_addr().await;
    let mut before = connect(&url).await;
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);

    gw.signal("TERM");
    gw.wait_for_line("drain_delay").await;
    assert_eq!(admin_get(admin, "/readyz").await.0, 503);
    // Still served: a new handshake, and the connection from before.
    let mut during = connect(&url).await;
    during.send(Message::text("during")).await.unwrap();
    assert_eq!(next_data(&mut during).await, Message::text("during"));
    before.send(Message::text("before")).await.unwrap();
    assert_eq!(next_data(&mut before).await, Message::text("before"));

    // A second signal does not wait out the hour.
    gw.signal("TERM");
    for ws in [&mut before, &mut during] {
        let (_, close) = read_until_close(ws).await;
        assert_eq!(close.map(|c| c.0), Some(1001));
    }
    assert_eq!(gw.exit_code().await, Some(0));
}
