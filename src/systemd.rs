//! Running under systemd: readiness and state notifications (`Type=notify`, sd_notify(3)),
//! the watchdog, and listening sockets passed by socket activation (sd_listen_fds(3)).
//!
//! Notifications are datagrams to `NOTIFY_SOCKET` (the messages and `WATCHDOG_USEC` as the
//! sd-notify crate reads and writes them, sent here without blocking); the sockets are the
//! listenfd crate's (descriptors from 3 on, `LISTEN_FDS`, `LISTEN_PID`), matched to
//! listeners by the names systemd gives them (`FileDescriptorName=` in the `.socket` unit,
//! `LISTEN_FDNAMES`). Without systemd every call here does nothing.

use std::collections::HashMap;
use std::net::TcpListener;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// A start-up error of socket activation, naming the socket or listener and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(
        "socket activation: socket {index} (named `{name}`) is not a TCP socket: {source}; pass ListenStream= sockets only (with Accept=no)"
    )]
    NotTcp {
        index: usize,
        name: String,
        source: std::io::Error,
    },
    #[error(
        "socket activation passed a socket named `{name}`, but no [[listener]] has name = \"{name}\"; name the listener so, or set FileDescriptorName= in the .socket unit to a listener's name (listeners: {listeners})"
    )]
    NoListener { name: String, listeners: String },
    #[error(
        "listener `{name}` has no socket: socket activation passed {passed}; add FileDescriptorName={name} to a ListenStream= of the .socket unit, or remove the listener"
    )]
    NoSocket { name: String, passed: String },
}

/// Listening sockets passed by the service manager, by name.
#[derive(Debug, Default)]
pub struct Activated {
    sockets: HashMap<String, TcpListener>,
    /// Whether sockets were passed at all: then every listener must have one.
    active: bool,
    /// Passed by the process this one replaces (`handover`): its configuration may differ
    /// from this one's, so a listener without a socket binds its own and a socket without a
    /// listener is closed.
    handed_over: bool,
}

impl Activated {
    /// No socket activation (tests, or a gateway not started by systemd).
    pub fn none() -> Activated {
        Activated::default()
    }

    /// Takes the sockets passed in `LISTEN_FDS` and their `LISTEN_FDNAMES`. Call it first
    /// thing, before any thread exists: listenfd unsets `LISTEN_FDS` and `LISTEN_PID`, so a
    /// child cannot take the sockets for its own (its `LISTEN_FDNAMES` then names none).
    pub fn from_env() -> Result<Activated, ActivationError> {
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let mut activated = Activated {
            sockets: HashMap::new(),
            active: fds.len() > 0,
            handed_over: std::env::var_os(crate::handover::NOTIFY_ENV).is_some(),
        };
        let mut names = names.split(':');
        for index in 0..fds.len() {
            // A socket is named by FileDescriptorName= or after its .socket unit; "unknown"
            // when the variable is missing.
            let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown");
            // A listener's name may hold ':' (by default it is its address); the replaced
            // process escaped it (systemd's names cannot hold one).
            let name = if activated.handed_over {
                crate::handover::unescape_name(name)
            } else {
                name.to_string()
            };
            match fds.take_tcp_listener(index) {
                Ok(Some(listener)) => {
                    activated.sockets.insert(name, listener);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(ActivationError::NotTcp {
                        index,
                        name,
                        source,
                    });
                }
            }
        }
        Ok(activated)
    }

    /// Sockets as a service manager would pass them, by listener name (embedding and tests).
    pub fn from_listeners(sockets: impl IntoIterator<Item = (String, TcpListener)>) -> Activated {
        let sockets: HashMap<_, _> = sockets.into_iter().collect();
        Activated {
            active: !sockets.is_empty(),
            sockets,
            handed_over: false,
        }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Whether the sockets came from the process this one replaces.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over
    }

    /// The admin listener's socket, when one was passed (under [`crate::handover::ADMIN_SOCKET`]).
    pub fn take_admin(&mut self) -> Option<TcpListener> {
        self.sockets.remove(crate::handover::ADMIN_SOCKET)
    }

    /// The socket passed for the listener `name`, if any. With socket activation on, a
    /// listener without one is an error.
    pub fn take(&mut self, name: &str) -> Result<Option<TcpListener>, ActivationError> {
        match self.sockets.remove(name) {
            Some(socket) => Ok(Some(socket)),
            None if self.active && !self.handed_over => Err(ActivationError::NoSocket {
                name: name.to_string(),
                passed: self.passed(),
            }),
            None => Ok(None),
        }
    }

    /// After every listener took its socket: a socket left over names no listener.
    pub fn check_all_taken(&mut self, listeners: &[&str]) -> Result<(), ActivationError> {
        if self.handed_over {
            for name in self.sockets.keys() {
                warn!(socket = %name, "the replaced process passed a socket for a listener this configuration does not have; closing it");
            }
            self.sockets.clear();
            return Ok(());
        }
        match self.sockets.keys().min() {
            Some(name) => Err(ActivationError::NoListener {
                name: name.clone(),
                listeners: listeners.join(", "),
            }),
            None => Ok(()),
        }
    }

    fn passed(&self) -> String {
        if self.sockets.is_empty() {
            return "no socket left for it".into();
        }
        let mut names: Vec<_> = self.sockets.keys().map(|n| format!("`{n}`")).collect();
        names.sort();
        format!("sockets named {}", names.join(", "))
    }
}

/// Sends `states` to `NOTIFY_SOCKET`, if there is one. Never blocks: this runs on the
/// runtime's threads, and a manager that stops reading (a full socket buffer) must not stall
/// the gateway; a notification it cannot take at once is dropped and logged. By hand rather
/// than with `sd_notify::notify`, which sends on a blocking socket (and knows no abstract
/// socket names).
fn send(states: &[NotifyState]) -> std::io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => send_to(&path, states),
        None => Ok(()),
    }
}

/// Sends `states` to the datagram socket at `path` (`@` for an abstract name).
fn send_to(path: &std::ffi::OsStr, states: &[NotifyState]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.connect_addr(&addr)?;
        }
        None => socket.connect(path)?,
    }
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    socket.send(message.as_bytes())?;
    Ok(())
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = send(states) {
        debug!(error = %e, "systemd notification not sent");
    }
}

/// Every listener serves. The first time, the process this one replaces (if any) hears it
/// too, and stops accepting.
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    static TOLD: std::sync::Once = std::sync::Once::new();
    TOLD.call_once(|| {
        if let Some(path) = std::env::var_os(crate::handover::NOTIFY_ENV)
            && let Err(e) = send_to(&path, &[NotifyState::Ready])
        {
            warn!(error = %e, "the process this one replaces could not be told it serves; it keeps serving too");
        }
    });
}

/// The service's main process is now `pid` (the new process of a binary upgrade); systemd
/// accepts this from the main process, which this one stops being.
pub fn main_pid(pid: u32) {
    notify(&[NotifyState::MainPid(pid)]);
}

/// A reload begins (`Type=notify-reload` also wants the monotonic time it began).
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

/// The drain begins: no new connections; open ones get 1001.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Pings the watchdog at half its interval for as long as the runtime answers: a gateway
/// whose runtime is stuck misses its pings and is restarted.
pub async fn watchdog(interval: Duration) {
    let every = (interval / 2).max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One line when pings start failing and one when they work again, not one per ping.
    let mut failing = false;
    loop {
        ticks.tick().await;
        match send(&[NotifyState::Watchdog]) {
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "systemd watchdog pings are not sent");
            }
            Ok(()) if failing => {
                failing = false;
                warn!("systemd watchdog pings are sent again");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(names: &[&str]) -> Activated {
        let sockets = names
            .iter()
            .map(|n| {
                let socket = TcpListener::bind("127.0.0.1:0").unwrap();
                (n.to_string(), socket)
            })
            .collect();
        Activated {
            sockets,
            active: true,
            handed_over: false,
        }
    }

    #[test]
    fn each_listener_takes_the_socket_of_its_name() {
        let mut activated = passed(&["public", "internal"]);
        assert!(activated.take("public").unwrap().is_some());
        assert!(activated.take("internal").unwrap().is_some());
        activated.check_all_taken(&["public", "internal"]).unwrap();
    }

    #[test]
    fn a_listener_without_a_socket_and_a_socket_without_a_listener_are_named() {
        let mut activated = passed(&["public", "extra"]);
        let missing = activated.take("admin").unwrap_err().to_string();
        assert!(
            missing.contains("listener `admin` has no socket")
                && missing.contains("`extra`, `public`")
                && missing.contains("FileDescriptorName=admin"),
            "{missing}"
        );
        activated.take("public").unwrap();
        let left = activated
            .check_all_taken(&["public"])
            .unwrap_err()
            .to_string();
        assert!(
            left.contains("named `extra`") && left.contains("name = \"extra\""),
            "{left}"
        );
        // Without socket activation, listeners bind their own.
        assert!(Activated::none().take("public").unwrap().is_none());
    }
}
