//! Logging setup and the gateway's live counters.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber: `RUST_LOG` filters (default `info`), lines go to stderr.
/// `json` switches to one JSON object per line.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A subscriber already set (tests start several gateways) keeps its place.
    drop(result);
}

/// Counters shared by all connections; cheap to update (relaxed atomics).
#[derive(Debug, Default)]
pub struct Stats {
    active_relays: AtomicUsize,
    relays_total: AtomicU64,
    rejected_total: AtomicU64,
}

impl Stats {
    /// Relayed connections open right now (after the 101, until both sides are closed).
    pub fn active_relays(&self) -> usize {
        self.active_relays.load(Ordering::Acquire)
    }

    pub fn relays_total(&self) -> u64 {
        self.relays_total.load(Ordering::Relaxed)
    }

    /// Upgrade requests answered with an error status.
    pub fn rejected_total(&self) -> u64 {
        self.rejected_total.load(Ordering::Relaxed)
    }

    pub(crate) fn rejected(&self) {
        self.rejected_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a relay as active until the guard is dropped, however its task ends.
    pub(crate) fn relay_started(&self) -> RelayGuard<'_> {
        self.active_relays.fetch_add(1, Ordering::AcqRel);
        self.relays_total.fetch_add(1, Ordering::Relaxed);
        RelayGuard(self)
    }
}

pub(crate) struct RelayGuard<'a>(&'a Stats);

impl Drop for RelayGuard<'_> {
    fn drop(&mut self) {
        self.0.active_relays.fetch_sub(1, Ordering::AcqRel);
    }
}
