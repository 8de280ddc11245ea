//! Moving data between an upgraded client and its upstream until both sides are closed.
//!
//! Each connection runs two pumps, one per direction, joined in one task. fastwebsockets'
//! `read_frame` is not cancel-safe (a frame half read is lost if its future is dropped), so a
//! pump's read is never raced against anything that could cancel it and then be retried:
//! reads are only dropped when the whole connection is being torn down. Shutdown, the close
//! deadline and aborts act from outside the pumps:
//!
//! - a pump that sees the end of its side records who closed and why in [`State`];
//! - the first Close frame (in either direction) starts `close_timeout`, after which whatever
//!   is still open is dropped;
//! - `abort` ends the connection at once (peer vanished, protocol error).
//!
//! Memory per connection is bounded by the largest frame a route accepts plus one read
//! buffer; a slow reader on one side stops the pump that writes to it, which stops reading
//! the other side (backpressure through the kernel's socket buffers, nothing queued here).

pub mod frames;
mod ws_stream;
mod ws_ws;

use std::future::Future;
use std::sync::Mutex as StdMutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fastwebsockets::{Frame, WebSocketError, WebSocketWrite};
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

pub use ws_stream::relay_stream;
pub use ws_ws::relay_ws;

/// Limits that apply to one relayed connection.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    pub max_message_size: usize,
    pub close_timeout: Duration,
}

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
    /// The close code of the first Close frame, or `None` when a side vanished without one.
    pub close_code: Option<u16>,
    pub closed_by: Side,
    /// Why, in words, when it was not a plain close.
    pub detail: Option<String>,
}

/// What the two pumps of one connection share.
struct State {
    first_close: OnceLock<(Side, Option<u16>, Option<String>)>,
    /// Fires at the first Close frame in either direction: the close deadline starts.
    closing: CancellationToken,
    /// Fires when the connection must end now.
    abort: CancellationToken,
    bytes_from_client: AtomicU64,
    bytes_to_client: AtomicU64,
    messages_from_client: AtomicU64,
    messages_to_client: AtomicU64,
}

impl State {
    fn new() -> Self {
        Self {
            first_close: OnceLock::new(),
            closing: CancellationToken::new(),
            abort: CancellationToken::new(),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            messages_from_client: AtomicU64::new(0),
            messages_to_client: AtomicU64::new(0),
        }
    }

    /// Records who ended the connection; only the first record counts.
    fn record(&self, side: Side, code: Option<u16>, detail: Option<String>) {
        let _ = self.first_close.set((side, code, detail));
        self.closing.cancel();
    }

    fn fail(&self, side: Side, code: Option<u16>, detail: String) {
        self.record(side, code, Some(detail));
        self.abort.cancel();
    }

    fn count_from_client(&self, bytes: usize, fin: bool) {
        self.bytes_from_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_from_client
            .fetch_add(fin as u64, Ordering::Relaxed);
    }

    fn count_to_client(&self, bytes: usize, fin: bool) {
        self.bytes_to_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_to_client
            .fetch_add(fin as u64, Ordering::Relaxed);
    }

    fn summary(&self) -> Summary {
        let (closed_by, close_code, detail) = self.first_close.get().cloned().unwrap_or((
            Side::Gateway,
            None,
            Some("ended without a close".into()),
        ));
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

/// The write half of one WebSocket peer, shared by the two pumps (data from one, control
/// replies from the other). A `tokio::sync::Mutex` because a frame write is held across
/// awaits; it is uncontended except when a pong or Close crosses a data frame.
struct Peer<W> {
    writer: tokio::sync::Mutex<WebSocketWrite<W>>,
    close_sent: AtomicBool,
    /// The payload of the Close this peer sent us, echoed when we answer it.
    close_received: StdMutex<Option<Vec<u8>>>,
}

impl<W: AsyncWrite + Unpin> Peer<W> {
    fn new(writer: WebSocketWrite<W>) -> Self {
        Self {
            writer: tokio::sync::Mutex::new(writer),
            close_sent: AtomicBool::new(false),
            close_received: StdMutex::new(None),
        }
    }

    fn close_sent(&self) -> bool {
        self.close_sent.load(Ordering::Acquire)
    }

    /// Writes and flushes one frame (the flush matters for TLS, which buffers records).
    async fn send(&self, frame: Frame<'_>) -> Result<(), WebSocketError> {
        let mut writer = self.writer.lock().await;
        writer.write_frame(frame).await?;
        writer.flush().await
    }

    /// Sends the frames fastwebsockets must answer with (pongs), unless the close is already
    /// under way, when RFC 6455 §5.5.1 allows no more frames from us.
    async fn send_obligated(&self, frame: Frame<'_>) -> Result<(), WebSocketError> {
        if self.close_sent() {
            return Ok(());
        }
        self.send(frame).await
    }

    /// Sends a Close frame with this payload, once. False when one was already sent or the
    /// write failed.
    async fn close_with(&self, payload: &[u8]) -> bool {
        if self.close_sent.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.send(Frame::close_raw(payload.to_vec().into()))
            .await
            .is_ok()
    }

    async fn close(&self, code: u16, reason: &str) -> bool {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        self.close_with(&payload).await
    }

    fn remember_close(&self, payload: &[u8]) {
        if let Ok(mut slot) = self.close_received.lock() {
            *slot = Some(payload.to_vec());
        }
    }

    /// The reply to a Close this peer sent: its own code echoed (RFC 6455 §5.5.1), or a
    /// normal close when it sent none.
    fn close_reply(&self) -> Vec<u8> {
        self.close_received
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
            .unwrap_or_else(|| frames::NORMAL.to_be_bytes().to_vec())
    }
}

/// Runs the pumps until they finish, the connection is aborted, or the close deadline
/// passes; then everything is dropped, which closes both sockets.
async fn drive(
    state: &State,
    close_timeout: Duration,
    pumps: impl Future<Output = ()>,
    on_shutdown: impl Future<Output = ()>,
) {
    let close_deadline = async {
        state.closing.cancelled().await;
        tokio::time::sleep(close_timeout).await;
    };
    tokio::select! {
        _ = pumps => {}
        _ = on_shutdown => {}
        _ = state.abort.cancelled() => {}
        _ = close_deadline => {
            state.record(Side::Gateway, None, Some(format!("close handshake not finished within {close_timeout:?} (close_timeout)")));
        }
    }
}

/// Waits for shutdown, lets `act` send the Close frames, and then stays pending so that the
/// pumps can read the peers' replies.
async fn on_shutdown(shutdown: &CancellationToken, act: impl Future<Output = ()>) {
    shutdown.cancelled().await;
    act.await;
    std::future::pending::<()>().await
}
