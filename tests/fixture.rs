//! wsgate as the `wss://` fixture of a test suite: `self_signed` certificates from an
//! in-memory CA, port 0 with `--ready-file`, `--exit-on-eof`, SIGTERM during start-up, and the
//! `wsgate::testing` API.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use futures_util::SinkExt;
use rustls_pki_types::pem::PemObject;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use wsgate::testing::TestGateway;

/// A wss:// client that trusts exactly `config`'s roots.
async fn wss_echo(addr: std::net::SocketAddr, url: &str, config: Arc<rustls::ClientConfig>) {
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut ws = connect_tls(&connector, addr, url).await;
    ws.send(Message::binary(b"through the fixture".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::binary(b"through the fixture".to_vec())
    );
}

#[tokio::test]
async fn self_signed_listener_is_trusted_by_its_ca_only() {
    let echo = tcp_echo().await;
    let gw = TestGateway::builder()
        .route("/echo", &format!("tcp://{echo}"))
        .self_signed()
        .start()
        .await
        .expect("start");
    let url = gw.url("/echo");
    assert_eq!(url, format!("wss://localhost:{}/echo", gw.addr().port()));
    let pem = gw.ca_pem().expect("a CA");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    wss_echo(gw.addr(), &url, gw.rustls_client_config().unwrap()).await;

    // A client trusting another CA refuses the certificate.
    let other = make_pki(&["localhost"]);
    let refused = tls_connect(&other.connector(), gw.addr(), "localhost").await;
    let error = refused
        .expect_err("an unknown CA must not verify")
        .to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");

    // The key the ready facts name is the key the server presents.
    let ready = gw.ready();
    let stream = tls_connect(&accept_any_connector(), gw.addr(), "localhost")
        .await
        .unwrap();
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(
        ready.listeners[0].spki_sha256.as_deref(),
        wsgate::tls::spki_sha256(&presented).as_deref()
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_the_ca_and_the_certificate() {
    let echo = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_out = dir.path().join("ca.pem");
    let config = dir.path().join("gateway.toml");
    let text = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ self_signed = true, names = [\"fixture.test\", \"127.0.0.1\"], ca_out = \"{}\" }}\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://{echo}\"\n",
        ca_out.display()
    );
    std::fs::write(&config, &text).unwrap();
    let gw = TestGateway::from_config(wsgate::config::Config::load(&config).unwrap())
        .await
        .expect("start");
    let written = std::fs::read_to_string(&ca_out).expect("ca_out written at start");
    assert_eq!(Some(written.clone()), gw.ca_pem());
    let url = gw.url("/");
    assert_eq!(url, format!("wss://fixture.test:{}/", gw.addr().port()));
    let trusted = gw.rustls_client_config().unwrap();
    let spki = gw.ready().listeners[0].spki_sha256.clone();

    // A reload (a route added) keeps the CA a client already trusts, and the certificate.
    std::fs::write(
        &config,
        format!("{text}\n[[route]]\npath = \"/more\"\nupstream = \"tcp://{echo}\"\n"),
    )
    .unwrap();
    gw.server().reload_from(&config).await.expect("reload");
    assert_eq!(std::fs::read_to_string(&ca_out).unwrap(), written);
    assert_eq!(gw.ready().listeners[0].spki_sha256, spki);
    let connector = tokio_rustls::TlsConnector::from(trusted);
    let stream = tls_connect(&connector, gw.addr(), "fixture.test").await;
    assert!(stream.is_ok(), "{:?}", stream.err());
    gw.stop().await;
}

#[test]
fn self_signed_configuration_errors_name_the_key() {
    let cases = [
        (
            "tls = { self_signed = true, cert = \"a.crt\", key = \"a.key\" }",
            "listener[0].tls: self_signed = true makes its own certificate",
        ),
        (
            "tls = { ca_out = \"ca.pem\", cert = \"a.crt\", key = \"a.key\" }",
            "listener[0].tls.ca_out: applies to self_signed = true only",
        ),
        (
            "tls = { self_signed = true, names = [\"not a name!\"] }",
            "listener[0].tls.names: `not a name!` is not a DNS name or IP address",
        ),
    ];
    for (tls, expected) in cases {
        let text = format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\n{tls}\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n"
        );
        let error = wsgate::config::Config::parse(&text, "t.toml")
            .expect_err(tls)
            .to_string();
        assert!(error.contains(expected), "{tls}: {error}");
        assert!(error.starts_with("t.toml:3:"), "{error}");
    }
}

// ---------------------------------------------------------------------------------------
// The binary as a test runner starts it

/// A wsgate child with a pipe on its standard input; killed if the test ends early.
struct Fixture {
    child: Option<Child>,
}

impl Fixture {
    fn start(config: &Path, args: &[&str]) -> Fixture {
        let child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .spawn()
            .expect("start wsgate");
        Fixture { child: Some(child) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn close_stdin(&mut self) {
        drop(self.child.as_mut().unwrap().stdin.take());
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// Waits for the exit; the status.
    async fn exit(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        within(
            "wsgate exits",
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await
        .unwrap()
        .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls for the ready file and parses it.
async fn read_ready(path: &Path) -> serde_json::Value {
    let path = path.to_path_buf();
    let probe = path.clone();
    wait_until("the ready file", move || probe.exists()).await;
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn fixture_config(dir: &Path, echo: std::net::SocketAddr) -> std::path::PathBuf {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\ntls = {{ self_signed = true, ca_out = \"{}\" }}\n\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/echo\"\nupstream = \"tcp://{echo}\"\n",
            dir.join("ca.pem").display()
        ),
    )
    .unwrap();
    config
}

#[tokio::test]
async fn ready_file_names_ports_urls_key_and_ca() {
    let echo = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), echo);
    let ready_file = dir.path().join("ready.json");
    let child = Fixture::start(&config, &["--ready-file", ready_file.to_str().unwrap()]);
    let ready = read_ready(&ready_file).await;

    assert_eq!(ready["pid"], child.pid());
    let ca = ready["ca"].as_str().expect("ca path");
    assert!(Path::new(ca).is_absolute(), "{ca}");
    let listeners = ready["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 2);
    let (public, plain) = (&listeners[0], &listeners[1]);
    assert_eq!(public["name"], "public");
    let addr: std::net::SocketAddr = public["addr"].as_str().unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0);
    assert_eq!(public["url"], format!("wss://localhost:{}", addr.port()));
    let plain_addr = plain["addr"].as_str().unwrap();
    assert_eq!(plain["url"], format!("ws://{plain_addr}"));
    assert!(plain["spki_sha256"].is_null());

    // The CA file verifies the listener, and the key named is the key presented.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let url = format!("{}/echo", public["url"].as_str().unwrap());
    wss_echo(addr, &url, Arc::new(client)).await;
    let stream = tls_connect(&accept_any_connector(), addr, "localhost")
        .await
        .unwrap();
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(
        public["spki_sha256"].as_str(),
        wsgate::tls::spki_sha256(&presented).as_deref()
    );

    // The admin listener bound port 0 too.
    let admin: std::net::SocketAddr = ready["admin"].as_str().unwrap().parse().unwrap();
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);

    child.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(child.exit().await.success());
    assert!(!ready_file.exists(), "the ready file is removed at exit");
}

#[tokio::test]
async fn exit_on_eof_drains_when_standard_input_closes() {
    let echo = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), echo);
    let ready_file = dir.path().join("ready.json");
    let mut child = Fixture::start(
        &config,
        &[
            "--exit-on-eof",
            "--ready-file",
            ready_file.to_str().unwrap(),
        ],
    );
    let ready = read_ready(&ready_file).await;
    let plain = ready["listeners"][1]["url"].as_str().unwrap().to_string();
    let mut ws = connect(&format!("{plain}/echo")).await;

    // The test runner goes away: the open connection is closed with 1001 and wsgate exits 0.
    child.close_stdin();
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(1001));
    assert!(child.exit().await.success());
    assert!(!ready_file.exists());
}

/// Whether a thread of `pid` holds SIGTERM blocked (bit 15 of SigBlk in /proc): what wsgate
/// does before anything else, so that the signal waits for its handler instead of killing
/// the process. The runtime's workers keep the mask they were started with, so this stays
/// true once it is.
fn holds_sigterm(pid: u32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.flatten().any(|thread| {
        let status = std::fs::read_to_string(thread.path().join("status")).unwrap_or_default();
        status.lines().any(|line| {
            line.strip_prefix("SigBlk:")
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .is_some_and(|m| m & (1 << 14) != 0)
        })
    })
}

#[tokio::test]
async fn sigterm_during_start_up_exits_cleanly() {
    let echo = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), echo);
    let ready_file = dir.path().join("ready.json");
    let child = Fixture::start(&config, &["--ready-file", ready_file.to_str().unwrap()]);
    // As soon as the process holds SIGTERM (the first thing it does), while it still makes
    // its CA and binds: the signal must stop it cleanly, not kill it.
    let pid = child.pid();
    wait_until("wsgate holds SIGTERM", move || holds_sigterm(pid)).await;
    child.signal(nix::sys::signal::Signal::SIGTERM);
    let status = child.exit().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!ready_file.exists(), "no ready file is left behind");
}

#[test]
fn check_accepts_a_self_signed_listener() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = { self_signed = true }\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:5900\"\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
