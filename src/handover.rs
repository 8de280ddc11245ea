//! Zero-downtime binary upgrade (SIGUSR2, `wsgate upgrade`): the running process starts the
//! binary at the path it was started from, with the same arguments, and hands it the
//! listening sockets; once the new process says it serves, the old one stops accepting and
//! drains (see `main.rs`). Established connections are not moved: they end in the process
//! that accepted them, as with nginx's USR2 and HAProxy's `-x`.
//!
//! The sockets go the way systemd passes them (descriptors from 3 on, `LISTEN_FDS`,
//! `LISTEN_FDNAMES` with each listener's name, and [`ADMIN_SOCKET`] for the admin listener),
//! so the new process takes them with the code of socket activation (`systemd::Activated`).
//! [`NOTIFY_ENV`] names a datagram socket of the old process; the new one sends `READY=1`
//! there once every listener serves, as it would to systemd. A queued connection is never
//! lost: the listening socket is one, with one backlog, and both processes accept from it
//! until the old one stops.
//!
//! `wsgate upgrade` hears the outcome on a datagram socket named after the old process's
//! PID ([`status_socket`]).

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};

/// Set in the new process's environment: where to send `READY=1`.
pub const NOTIFY_ENV: &str = "WSGATE_UPGRADE_NOTIFY";

/// The name under which the admin listener's socket is passed (no listener can be named so:
/// it is not an address, and brackets make it unlike any name an operator would write).
pub const ADMIN_SOCKET: &str = "[admin]";

/// How long the new process may take to bind, load its certificates and report ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an upgrade did not happen; the old process keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "cannot start {binary}: {source}; put the new binary at that path (install or rename it over the old one, which a running process keeps open)"
    )]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error(
        "the new process (pid {pid}) exited ({status}) before it was ready; its own log lines say why"
    )]
    Exited {
        pid: u32,
        status: std::process::ExitStatus,
    },
    #[error("the new process (pid {pid}) was not ready within {timeout:?}; it was stopped")]
    Timeout { pid: u32, timeout: Duration },
    #[error("cannot pass the listening sockets: {0}")]
    Sockets(std::io::Error),
    #[error("an upgrade is already under way")]
    Busy,
    #[error("draining: there is nothing left to hand over")]
    Draining,
}

/// A listener name as an entry of `LISTEN_FDNAMES`, whose separator is ':' (listener names
/// default to their address): '%' and ':' percent-encoded.
fn escape_name(name: &str) -> String {
    name.replace('%', "%25").replace(':', "%3A")
}

/// The listener name an entry of `LISTEN_FDNAMES` stands for (see [`escape_name`]).
pub fn unescape_name(entry: &str) -> String {
    entry.replace("%3A", ":").replace("%25", "%")
}

/// How this process was started: what an upgrade runs again.
#[derive(Debug, Clone)]
pub struct Invocation {
    binary: PathBuf,
    args: Vec<OsString>,
}

impl Invocation {
    /// Read at start-up, before the binary can be replaced: the path is what the new binary
    /// is installed at, whatever the running one's file became.
    pub fn current() -> std::io::Result<Invocation> {
        let mut binary = std::env::current_exe()?;
        // Linux names a binary replaced under a running process "<path> (deleted)".
        if let Some(name) = binary.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            binary = PathBuf::from(name);
        }
        Ok(Invocation {
            binary,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// Starts the new process with `sockets` (listener name, socket) and waits until it reports
/// ready, exits, or [`START_TIMEOUT`] passes (then it is sent SIGTERM). Returns its PID.
pub async fn start_new(
    invocation: &Invocation,
    sockets: Vec<(String, OwnedFd)>,
) -> Result<u32, UpgradeError> {
    let (ready, name) = ready_socket().map_err(UpgradeError::Sockets)?;
    let names: Vec<String> = sockets.iter().map(|(n, _)| escape_name(n)).collect();
    let mut command = tokio::process::Command::new(&invocation.binary);
    command
        .args(&invocation.args)
        .env("LISTEN_FDS", sockets.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .env(NOTIFY_ENV, format!("@{name}"));
    let mappings = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (_, fd))| FdMapping {
            parent_fd: fd,
            child_fd: 3 + i as i32,
        })
        .collect();
    command
        .fd_mappings(mappings)
        .map_err(|e| UpgradeError::Sockets(std::io::Error::other(e.to_string())))?;
    let mut child = command.spawn().map_err(|source| UpgradeError::Spawn {
        binary: invocation.binary.display().to_string(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    let mut buf = [0u8; 512];
    let deadline = tokio::time::sleep(START_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            received = ready.recv(&mut buf) => {
                let n = received.map_err(UpgradeError::Sockets)?;
                let message = String::from_utf8_lossy(&buf[..n]);
                if message.lines().any(|l| l == "READY=1") {
                    return Ok(pid);
                }
            }
            status = child.wait() => {
                return Err(match status {
                    Ok(status) => UpgradeError::Exited { pid, status },
                    Err(e) => UpgradeError::Sockets(e),
                });
            }
            () = &mut deadline => {
                // SIGTERM, not SIGKILL: it may already serve connections, which then drain.
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                return Err(UpgradeError::Timeout { pid, timeout: START_TIMEOUT });
            }
        }
    }
}

/// A datagram socket under an abstract name nobody can guess (anyone in the network
/// namespace could send to a known one), and that name.
fn ready_socket() -> std::io::Result<(tokio::net::UnixDatagram, String)> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "wsgate-ready-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
    socket.set_nonblocking(true)?;
    Ok((tokio::net::UnixDatagram::from_std(socket)?, name))
}

/// The abstract socket name `wsgate upgrade` waits on for the outcome of upgrading `pid`.
pub fn status_socket(pid: u32) -> String {
    format!("wsgate-upgrade-{pid}")
}

/// Tells a waiting `wsgate upgrade`, if there is one, how the upgrade went: `ok <new pid>`
/// or `failed: <reason>`.
pub fn report(outcome: &Result<u32, UpgradeError>) {
    use std::os::linux::net::SocketAddrExt;
    let message = match outcome {
        Ok(pid) => format!("ok {pid}"),
        Err(e) => format!("failed: {e}"),
    };
    let name = status_socket(std::process::id());
    let sent =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).and_then(|addr| {
            let socket = std::os::unix::net::UnixDatagram::unbound()?;
            socket.set_nonblocking(true)?;
            socket.send_to_addr(message.as_bytes(), &addr)
        });
    if let Err(e) = sent {
        tracing::debug!(error = %e, "no `wsgate upgrade` heard the outcome");
    }
}

/// The outcome as `wsgate upgrade` reads it: the new PID, or the reason.
pub fn parse_report(message: &str) -> Result<u32, String> {
    if let Some(pid) = message.strip_prefix("ok ") {
        return pid
            .trim()
            .parse()
            .map_err(|_| format!("garbled report: {message}"));
    }
    Err(message
        .strip_prefix("failed: ")
        .unwrap_or(message)
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_names_survive_the_separator() {
        for name in ["main", "127.0.0.1:8080", "[::1]:443", "100%:odd%3A"] {
            let entry = escape_name(name);
            assert!(!entry.contains(':'), "{entry}");
            assert_eq!(unescape_name(&entry), name);
        }
    }

    #[test]
    fn a_report_reads_back_as_sent() {
        assert_eq!(parse_report("ok 4242"), Ok(4242));
        let failed = UpgradeError::Timeout {
            pid: 7,
            timeout: START_TIMEOUT,
        };
        let text = format!("failed: {failed}");
        assert_eq!(parse_report(&text), Err(failed.to_string()));
    }
}
