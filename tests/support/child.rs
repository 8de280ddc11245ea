//! The real binary as a child process, its log lines collected.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::{wait_until, within};

/// A wsgate child process whose stderr is collected; killed if the test ends early.
pub struct Gateway {
    pub child: Option<Child>,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    pub fn start(config: &Path, shell_prefix: &str, extra_args: &[&str]) -> Gateway {
        Gateway::start_under(config, shell_prefix, "", extra_args)
    }

    /// Started by `launcher` (a program that execs the gateway, like
    /// `systemd-socket-activate`), with `shell_prefix` before the `exec`.
    pub fn start_under(
        config: &Path,
        shell_prefix: &str,
        launcher: &str,
        extra_args: &[&str],
    ) -> Gateway {
        Gateway::start_binary(
            Path::new(env!("CARGO_BIN_EXE_wsgate")),
            config,
            shell_prefix,
            launcher,
            extra_args,
        )
    }

    /// The same, with the wsgate binary at `binary`.
    pub fn start_binary(
        binary: &Path,
        config: &Path,
        shell_prefix: &str,
        launcher: &str,
        extra_args: &[&str],
    ) -> Gateway {
        let mut args = vec![
            binary.display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{shell_prefix} exec {launcher} {}",
                quoted.join(" ")
            ))
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsgate");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Gateway {
            child: Some(child),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub async fn wait_for_line(&self, needle: &str) -> String {
        let lines = self.lines.clone();
        let needle_owned = needle.to_string();
        wait_until(&format!("log line with {needle:?}"), move || {
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(&needle_owned))
        })
        .await;
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
            .unwrap()
    }

    /// The address from the first listener's `listening` line.
    pub async fn addr(&self) -> String {
        let line = self.wait_for_line("listening listener=").await;
        let after = line.split("addr=").nth(1).expect("addr field");
        after
            .trim_start_matches('"')
            .split(|c: char| c == '"' || c.is_whitespace() || c == ',')
            .next()
            .unwrap()
            .to_string()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The admin listener's address, from its `admin listening` line.
    pub async fn admin_addr(&self) -> std::net::SocketAddr {
        let line = self.wait_for_line("admin listening").await;
        line.split("addr=Some(")
            .nth(1)
            .and_then(|a| a.split(')').next())
            .expect("admin address")
            .parse()
            .unwrap()
    }

    pub async fn exit_code(mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        within(
            "wsgate exits",
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await
        .unwrap()
        .unwrap()
        .code()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
