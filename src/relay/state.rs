//! What the two pumps of one connection share: who closed and why, the counters, the
//! timers' clocks, and the summary for the log line.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use tokio::time::Instant;

use super::RelaySettings;
use crate::telemetry::metrics::Flow;

/// Which party ended the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Gateway,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Gateway => "gateway",
        }
    }
}

/// How a relayed connection went, for the log line and metrics.
#[derive(Debug, Clone)]
pub struct Summary {
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub messages_from_client: u64,
    pub messages_to_client: u64,
    /// The close code of the first Close frame (1005 when it had none), or `None` when a
    /// side vanished without a Close.
    pub close_code: Option<u16>,
    pub closed_by: Side,
    /// Why, in words, when it was not a plain close.
    pub detail: Option<String>,
}

/// What the two pumps of one connection share.
pub(super) struct State {
    pub(super) first_close: OnceLock<(Side, Option<u16>, Option<String>)>,
    /// `closing`, `abort` and `drain` (see their methods).
    signals: Signals,
    pub(super) bytes_from_client: AtomicU64,
    pub(super) bytes_to_client: AtomicU64,
    pub(super) messages_from_client: AtomicU64,
    pub(super) messages_to_client: AtomicU64,
    pub(super) flow: Flow,
    pub(super) started: Instant,
    /// Milliseconds after `started` of the last data message either way (idle_timeout);
    /// only kept when the route has an idle timeout, to spare the clock read per frame.
    pub(super) last_data_ms: Option<AtomicU64>,
    /// Milliseconds after `started` of the last frame of any kind from the client
    /// (keepalive); only kept when the route pings.
    pub(super) last_client_frame_ms: Option<AtomicU64>,
    /// The close handshake did not finish within close_timeout.
    pub(super) timed_out: AtomicBool,
    /// ...and the client was waiting for the rest of the upstream's data: it got 1011.
    pub(super) cut_short: AtomicBool,
    /// The client pump is blocked writing to a slow upstream, so it reads no pongs: the
    /// client may well be alive (keepalive must not judge it then).
    pub(super) upstream_backlog: AtomicBool,
    /// Raised by each pump when it starts a flush, lowered at every poll of the pumps (see
    /// `read_or_flush`).
    flushing: [AtomicBool; 2],
}

impl State {
    pub(super) fn new(settings: &RelaySettings, flow: Flow) -> Self {
        Self {
            first_close: OnceLock::new(),
            signals: Signals::default(),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            messages_from_client: AtomicU64::new(0),
            messages_to_client: AtomicU64::new(0),
            flow,
            started: Instant::now(),
            last_data_ms: settings.idle_timeout.map(|_| AtomicU64::new(0)),
            last_client_frame_ms: settings.ping.map(|_| AtomicU64::new(0)),
            timed_out: AtomicBool::new(false),
            cut_short: AtomicBool::new(false),
            upstream_backlog: AtomicBool::new(false),
            flushing: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }

    /// The pumps are being polled (only the timers call it, once per poll).
    pub(super) fn polling(&self) {
        for flag in &self.flushing {
            flag.store(false, Ordering::Relaxed);
        }
    }

    /// Pump number `pump` starts a flush.
    pub(super) fn flush_starts(&self, pump: usize) {
        self.flushing[pump].store(true, Ordering::Relaxed);
    }

    /// Whether the pumps have not been polled again since pump number `pump` started its
    /// flush.
    pub(super) fn flushed_in_the_same_poll(&self, pump: usize) -> bool {
        self.flushing[pump].load(Ordering::Relaxed)
    }

    /// Fires at the first Close frame in either direction: the close deadline starts.
    pub(super) fn closing(&self) -> Signal<'_> {
        Signal(&self.signals, CLOSING)
    }

    /// Fires when the connection must end now.
    pub(super) fn abort(&self) -> Signal<'_> {
        Signal(&self.signals, ABORT)
    }

    /// Fires when graceful shutdown reaches a relay that closes by itself (the stream relay
    /// drains what the upstream sent first): a per-connection flag, so that its pump does
    /// not wait on the server-wide token at every read.
    pub(super) fn drain(&self) -> Signal<'_> {
        Signal(&self.signals, DRAIN)
    }

    /// Records who ended the connection; only the first record counts.
    pub(super) fn record(&self, side: Side, code: Option<u16>, detail: Option<String>) {
        let _ = self.first_close.set((side, code, detail));
        self.closing().fire();
    }

    pub(super) fn fail(&self, side: Side, code: Option<u16>, detail: String) {
        self.record(side, code, Some(detail));
        self.abort().fire();
    }

    /// Marks the client pump as writing toward the upstream until the guard is dropped.
    /// Only kept when the route pings (nobody reads it otherwise): no stores per frame.
    pub(super) fn writing_upstream(&self) -> BacklogGuard<'_> {
        let tracked = self.last_client_frame_ms.is_some();
        if tracked {
            self.upstream_backlog.store(true, Ordering::Relaxed);
        }
        BacklogGuard(tracked.then_some(self))
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(super) fn client_frame_seen(&self) {
        if let Some(last) = &self.last_client_frame_ms {
            last.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    pub(super) fn data_seen(&self) {
        if let Some(last) = &self.last_data_ms {
            last.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    pub(super) fn count_from_client(&self, bytes: usize, fin: bool) {
        self.bytes_from_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_from_client
            .fetch_add(fin as u64, Ordering::Relaxed);
        self.flow.bytes_from_client.inc_by(bytes as u64);
        if fin {
            self.flow.messages_from_client.inc();
        }
        self.data_seen();
    }

    pub(super) fn count_to_client(&self, bytes: usize, fin: bool) {
        self.bytes_to_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_to_client
            .fetch_add(fin as u64, Ordering::Relaxed);
        self.flow.bytes_to_client.inc_by(bytes as u64);
        if fin {
            self.flow.messages_to_client.inc();
        }
        self.data_seen();
    }

    pub(super) fn summary(&self) -> Summary {
        let (closed_by, close_code, mut detail) = self.first_close.get().cloned().unwrap_or((
            Side::Gateway,
            None,
            Some("ended without a close".into()),
        ));
        if self.timed_out.load(Ordering::Relaxed) {
            let timeout = if self.cut_short.load(Ordering::Relaxed) {
                "close_timeout passed with the upstream's data unfinished: the transfer was cut short (client sent 1011/1001)".to_string()
            } else {
                "close handshake not finished within close_timeout".to_string()
            };
            detail = Some(match detail {
                Some(d) => format!("{d}; {timeout}"),
                None => timeout,
            });
        }
        Summary {
            bytes_from_client: self.bytes_from_client.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
            messages_from_client: self.messages_from_client.load(Ordering::Relaxed),
            messages_to_client: self.messages_to_client.load(Ordering::Relaxed),
            close_code,
            closed_by,
            detail,
        }
    }
}

pub(super) struct BacklogGuard<'a>(Option<&'a State>);

impl Drop for BacklogGuard<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.0 {
            state.upstream_backlog.store(false, Ordering::Relaxed);
        }
    }
}

const CLOSING: u8 = 1;
const ABORT: u8 = 2;
const DRAIN: u8 = 4;

/// One-way flags that can be awaited, kept inline in the connection's state: unlike a
/// `CancellationToken` they allocate nothing (each token is a shared node on the heap), and
/// a wait is a pointer (a `Notify` wait is a 64-byte list node). Everything that waits on
/// them runs in the connection's one task, polled with its one waker, and every poll of that
/// task polls every waiter again: one waker slot serves all three flags.
#[derive(Default)]
struct Signals {
    fired: AtomicU8,
    waker: atomic_waker::AtomicWaker,
}

/// One of the [`Signals`].
#[derive(Clone, Copy)]
pub(super) struct Signal<'a>(&'a Signals, u8);

impl<'a> Signal<'a> {
    pub(super) fn fire(self) {
        if self.0.fired.fetch_or(self.1, Ordering::AcqRel) & self.1 == 0 {
            self.0.waker.wake();
        }
    }

    pub(super) fn is_fired(self) -> bool {
        self.0.fired.load(Ordering::Acquire) & self.1 != 0
    }

    /// Resolves once fired. Only from the connection's task (see [`Signals`]).
    pub(super) fn fired(self) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| self.poll_fired(cx))
    }

    /// `fired` as a poll, for hand-written futures.
    pub(super) fn poll_fired(self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.is_fired() {
            return std::task::Poll::Ready(());
        }
        // Registered before the flag is read again, so a `fire` in between is not missed.
        self.0.waker.register(cx.waker());
        if self.is_fired() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}
