//! Faults on purpose (`[gateway] allow_faults = true`), so that a client's reconnect, backoff
//! and timeout logic can be tested against a real `wss://` endpoint: refused handshakes
//! (here, before the upstream is dialled), and on upgraded connections delayed or fragmented
//! messages, closes, resets and stalls ([`layer`]). Routes with no `faults` table still take
//! the admin listener's orders (`POST /faults/close`, `POST /faults/refuse`).
//!
//! The state that must outlive a configuration (how many handshakes a route has seen, the
//! admin's pending orders) is kept by route path in the [`Registry`], which reloads keep.

mod layer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::config::Faults;
pub(crate) use layer::{Counters, Injection, Outcome, interpose};

/// An order to close every live connection of a route, as a server restart would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloseOrder {
    pub code: u16,
    pub reason: String,
}

/// Fault state per route path.
#[derive(Default)]
pub(crate) struct Registry {
    routes: Mutex<HashMap<String, Arc<RouteFaults>>>,
}

impl Registry {
    /// The state of route `path`, made at first use.
    pub fn route(&self, path: &str) -> Arc<RouteFaults> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .entry(path.to_string())
            .or_insert_with(|| Arc::new(RouteFaults::new()))
            .clone()
    }
}

pub(crate) struct RouteFaults {
    /// Handshakes that reached the fault check, for `refuse_first`.
    handshakes: AtomicU64,
    /// Refusals the admin ordered: how many are left, and their status.
    refusals: Mutex<(u64, u16)>,
    close: broadcast::Sender<CloseOrder>,
}

impl RouteFaults {
    fn new() -> Self {
        Self {
            handshakes: AtomicU64::new(0),
            refusals: Mutex::new((0, 0)),
            close: broadcast::channel(4).0,
        }
    }

    /// Counts a handshake; the status to refuse it with, if it is refused.
    pub fn refusal(&self, faults: Option<&Faults>) -> Option<u16> {
        let seen = self.handshakes.fetch_add(1, Ordering::Relaxed);
        {
            let mut ordered = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if ordered.0 > 0 {
                ordered.0 -= 1;
                return Some(ordered.1);
            }
        }
        faults?
            .refuse_first
            .filter(|r| seen < r.count)
            .map(|r| r.status)
    }

    /// `POST /faults/refuse`: the next `count` handshakes get `status`.
    pub fn refuse_next(&self, count: u64, status: u16) {
        *self.refusals.lock().unwrap_or_else(|p| p.into_inner()) = (count, status);
    }

    /// `POST /faults/close`: every live connection of the route closes; how many there were.
    pub fn close_all(&self, order: CloseOrder) -> usize {
        self.close.send(order).unwrap_or(0)
    }

    pub fn orders(&self) -> broadcast::Receiver<CloseOrder> {
        self.close.subscribe()
    }
}
