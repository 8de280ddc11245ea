//! The configuration files in config/ run, `wsgate check` answers 0 or 1, and every error
//! names the file, the line and column, and the key.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;
use wsgate::config::{Config, ListenerTls};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn example_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_file("config"))
        .expect("config/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "config/ holds the examples: {files:?}");
    files
}

/// Every example parses, validates, and really serves: binds moved to port 0 and the
/// certificate paths pointed at certificates made here, it answers a request.
#[tokio::test]
async fn every_example_config_runs() {
    let pki = make_pki(&["localhost", "127.0.0.1"]);
    for path in example_configs() {
        let mut config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        for listener in &mut config.listeners {
            listener.bind.set_port(0);
            if listener.tls.is_some() {
                listener.tls = Some(ListenerTls::single(pki.cert.clone(), pki.key.clone()));
            }
        }
        if let Some(admin) = &mut config.admin {
            admin.bind.set_port(0);
        }
        for route in &mut config.routes {
            if route.ca.is_some() {
                route.ca = Some(pki.ca_cert.clone());
            }
        }
        let plain = config.listeners.iter().position(|l| l.tls.is_none());
        let gw = start_config(config).await;
        if let Some(i) = plain {
            let r = raw_request(
                gw.addrs()[i],
                "GET /definitely/not/routed HTTP/1.1\r\nHost: nowhere.invalid\r\n\r\n",
            )
            .await;
            assert!(
                r.status == 404 || r.status == 426,
                "{}: {r:?}",
                path.display()
            );
        }
        gw.stop().await;
    }
}

fn wsgate(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(args)
        .output()
        .expect("run wsgate");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn check_accepts_the_examples_without_tls() {
    for path in example_configs() {
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("tls =") || text.contains("ca =") {
            continue;
        }
        let (code, stdout, stderr) = wsgate(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {stderr}", path.display());
        assert!(stdout.contains("ok"), "{stdout}");
    }
}

#[test]
fn check_loads_certificates_and_keys() {
    let pki = make_pki(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let config = |cert: &Path, key: &Path| {
        format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n",
            cert.display(),
            key.display()
        )
    };
    let good = write_config(dir.path(), "good.toml", &config(&pki.cert, &pki.key));
    let (code, _, stderr) = wsgate(&["check", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");

    let other = make_pki(&["localhost"]);
    let mismatch = write_config(dir.path(), "mismatch.toml", &config(&pki.cert, &other.key));
    let (code, _, stderr) = wsgate(&["check", "--config", mismatch.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("does not belong to the certificate"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let missing = write_config(
        dir.path(),
        "missing.toml",
        &config(Path::new("/nonexistent/cert.pem"), &pki.key),
    );
    let (code, _, stderr) = wsgate(&["check", "--config", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/cert.pem"), "{stderr}");
}

#[test]
fn config_errors_name_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.toml",
            "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstrem = \"tcp://127.0.0.1:1\"\n",
            ":5:1: ",
            "upstrem",
        ),
        (
            "address.toml",
            "[[listener]]\nbind = \"127.0.0.1\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n",
            ":2:8: ",
            "listener[0].bind",
        ),
        (
            "upstream.toml",
            "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:1\"\n",
            ":5:12: ",
            "route[0].upstream",
        ),
        (
            // Passed `check` once and then panicked on every connection (Instant overflow).
            "forever.toml",
            "[gateway]\nhandshake_timeout = \"300000000000y\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n",
            ":2:21: ",
            "gateway.handshake_timeout",
        ),
        (
            "idle.toml",
            "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\nidle_timeout = \"400d\"\n",
            ":6:16: ",
            "route[0].idle_timeout",
        ),
        (
            "upgrade.toml",
            "[gateway]\nupgrade_drain_timeout = \"soon\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n",
            ":2:25: ",
            "gateway.upgrade_drain_timeout",
        ),
        (
            "delay.toml",
            "[gateway]\ndrain_delay = \"later\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n",
            ":2:15: ",
            "gateway.drain_delay",
        ),
        (
            "watch.toml",
            "[gateway]\nwatch_config = \"yes\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n",
            ":2:16: ",
            "watch_config",
        ),
    ];
    for (name, text, position, key) in cases {
        let path = write_config(dir.path(), name, text);
        let (code, _, stderr) = wsgate(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{name}");
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "{name}: one line: {stderr}");
        assert!(
            line.starts_with(&format!("{}{position}", path.display())),
            "{name}: {line}"
        );
        assert!(line.contains(key), "{name}: {line}");
        // Running with it fails the same way, before binding anything.
        let (code, _, run_stderr) = wsgate(&["--config", path.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert_eq!(run_stderr.trim(), line);
    }
}

#[test]
fn missing_file_is_named() {
    let (code, _, stderr) = wsgate(&["check", "--config", "/nonexistent/gateway.toml"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("/nonexistent/gateway.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn address_in_use_is_one_line_and_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "busy.toml",
        &format!(
            "[[listener]]\nbind = \"{}\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n",
            taken.local_addr().unwrap()
        ),
    );
    let (code, _, stderr) = wsgate(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot listen on") && stderr.contains("another process"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn version_and_help() {
    let (code, stdout, _) = wsgate(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("wsgate "), "{stdout}");
    let (code, stdout, _) = wsgate(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("--config") && stdout.contains("check"),
        "{stdout}"
    );
}

/// The README's configuration reference states the defaults the code uses.
#[test]
fn readme_lists_the_defaults() {
    use wsgate::config::defaults;
    let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
    let secs = |d: std::time::Duration| format!("`\"{}s\"`", d.as_secs());
    let rows = [
        ("`shutdown_timeout`", secs(defaults::SHUTDOWN_TIMEOUT)),
        (
            "`upgrade_drain_timeout`",
            secs(defaults::UPGRADE_DRAIN_TIMEOUT),
        ),
        ("`handshake_timeout`", secs(defaults::HANDSHAKE_TIMEOUT)),
        ("`close_timeout`", secs(defaults::CLOSE_TIMEOUT)),
        ("`connect_timeout`", secs(defaults::CONNECT_TIMEOUT)),
        (
            "`max_connections`",
            format!("`{}`", defaults::MAX_CONNECTIONS),
        ),
        (
            "`max_message_size`",
            format!("`\"{}MiB\"`", defaults::MAX_MESSAGE_SIZE >> 20),
        ),
        (
            "`max_request_head_size`",
            format!("`\"{}KiB\"`", defaults::MAX_REQUEST_HEAD_SIZE >> 10),
        ),
    ];
    for (key, default) in rows {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {key} |")))
            .unwrap_or_else(|| panic!("README has no row for {key}"));
        assert!(
            row.contains(&default),
            "README row for {key} should say {default}: {row}"
        );
    }
}
