//! Process signals: SIGHUP reloads the configuration, SIGTERM and SIGINT start the drain,
//! SIGUSR2 replaces the binary (`handover`); and `--exit-on-eof`, which treats the end of
//! standard input as SIGTERM.
//!
//! The four signals are blocked from the first line of `main` until the runtime's handlers
//! are installed ([`block`], [`Signals::install`]): one that arrives while the gateway starts
//! waits, pending, instead of killing the process with its default action, and then stops it
//! cleanly.

use std::io::Read as _;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use tokio::signal::unix::{SignalKind, signal};

const HANDLED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR2,
];

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in HANDLED {
        set.add(signal);
    }
    set
}

/// Holds SIGTERM, SIGINT, SIGHUP and SIGUSR2 pending on this thread and the threads it starts.
/// Call before the runtime starts its workers, which inherit the mask.
pub fn block() {
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None);
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Reload,
    /// SIGUSR2: start the binary anew and hand it the listening sockets.
    Upgrade,
    /// SIGTERM or SIGINT, by name.
    Stop(&'static str),
}

/// The runtime's handlers of the four signals.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers, then lets the signals through on this thread (which must be
    /// the one that called [`block`] and runs the runtime's `block_on`): a signal that came
    /// in between is delivered now.
    pub fn install() -> std::io::Result<Signals> {
        let signals = Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        };
        let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&handled()), None);
        Ok(signals)
    }

    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Stop("SIGTERM"),
            _ = self.int.recv() => Event::Stop("SIGINT"),
            _ = self.hup.recv() => Event::Reload,
            _ = self.usr2.recv() => Event::Upgrade,
        }
    }
}

/// Resolves when standard input reaches its end (or fails): the test runner that started
/// the gateway with a pipe on its standard input finished or died. Read on a thread of its
/// own, which the process's exit ends; tokio's stdin would hold the runtime's shutdown until
/// the read returns.
pub fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("stdin-eof".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 512];
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!("--exit-on-eof: cannot start the thread that reads standard input: {e}");
    }
    rx
}
