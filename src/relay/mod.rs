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

mod coalesce;
pub mod frames;
mod ws_stream;
mod ws_ws;

use std::future::Future;
use std::sync::Mutex as StdMutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, WebSocketError, WebSocketWrite};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::config::PingConfig;
use crate::telemetry::metrics::Flow;
pub(crate) use coalesce::Coalescing;
pub use ws_stream::relay_stream;
pub use ws_ws::relay_ws;

/// Limits and timers of one relayed connection, from its route and the gateway.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub max_message_size: usize,
    pub max_frame_size: usize,
    pub close_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub ping: Option<PingConfig>,
}

/// The two stages of shutdown a relay listens to: `graceful` asks it to close with 1001 and
/// finish the close handshake; `force` (after `shutdown_timeout`) drops it at once.
#[derive(Debug, Clone, Default)]
pub struct ShutdownSignals {
    pub graceful: CancellationToken,
    pub force: CancellationToken,
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
    /// The close code of the first Close frame (1005 when it had none), or `None` when a
    /// side vanished without a Close.
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
    flow: Flow,
    started: Instant,
    /// Milliseconds after `started` of the last data message either way (idle_timeout);
    /// only kept when the route has an idle timeout, to spare the clock read per frame.
    last_data_ms: Option<AtomicU64>,
    /// Milliseconds after `started` of the last frame of any kind from the client
    /// (keepalive); only kept when the route pings.
    last_client_frame_ms: Option<AtomicU64>,
    /// The close handshake did not finish within close_timeout.
    timed_out: AtomicBool,
    /// The client pump is blocked writing to a slow upstream, so it reads no pongs: the
    /// client may well be alive (keepalive must not judge it then).
    upstream_backlog: AtomicBool,
}

impl State {
    fn new(settings: &RelaySettings, flow: Flow) -> Self {
        Self {
            first_close: OnceLock::new(),
            closing: CancellationToken::new(),
            abort: CancellationToken::new(),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            messages_from_client: AtomicU64::new(0),
            messages_to_client: AtomicU64::new(0),
            flow,
            started: Instant::now(),
            last_data_ms: settings.idle_timeout.map(|_| AtomicU64::new(0)),
            last_client_frame_ms: settings.ping.map(|_| AtomicU64::new(0)),
            timed_out: AtomicBool::new(false),
            upstream_backlog: AtomicBool::new(false),
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

    /// Marks the client pump as writing toward the upstream until the guard is dropped.
    /// Only kept when the route pings (nobody reads it otherwise): no stores per frame.
    fn writing_upstream(&self) -> BacklogGuard<'_> {
        let tracked = self.last_client_frame_ms.is_some();
        if tracked {
            self.upstream_backlog.store(true, Ordering::Relaxed);
        }
        BacklogGuard(tracked.then_some(self))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn client_frame_seen(&self) {
        if let Some(last) = &self.last_client_frame_ms {
            last.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn data_seen(&self) {
        if let Some(last) = &self.last_data_ms {
            last.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn count_from_client(&self, bytes: usize, fin: bool) {
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

    fn count_to_client(&self, bytes: usize, fin: bool) {
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

    fn summary(&self) -> Summary {
        let (closed_by, close_code, mut detail) = self.first_close.get().cloned().unwrap_or((
            Side::Gateway,
            None,
            Some("ended without a close".into()),
        ));
        if self.timed_out.load(Ordering::Relaxed) {
            let timeout = "close handshake not finished within close_timeout".to_string();
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

struct BacklogGuard<'a>(Option<&'a State>);

impl Drop for BacklogGuard<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.0 {
            state.upstream_backlog.store(false, Ordering::Relaxed);
        }
    }
}

/// The write half of one WebSocket peer, shared by the two pumps (data from one, control
/// replies from the other). A `tokio::sync::Mutex` because a frame write is held across
/// awaits; it is uncontended except when a pong or Close crosses a data frame.
///
/// `close_sent` is set and checked under the writer lock, so no frame can slip in after the
/// Close (fastwebsockets would refuse it with an error that looks like a broken peer).
struct Peer<W> {
    writer: tokio::sync::Mutex<WebSocketWrite<W>>,
    close_sent: AtomicBool,
    /// The payload of the Close this peer sent us, echoed when we answer it.
    close_received: StdMutex<Option<Vec<u8>>>,
    /// The connection's close deadline starts when a Close is first attempted, not when it
    /// has been written: a peer that stopped reading would otherwise block that write forever.
    closing: CancellationToken,
}

impl<W: AsyncWrite + Unpin> Peer<W> {
    fn new(writer: WebSocketWrite<W>, state: &State) -> Self {
        Self {
            writer: tokio::sync::Mutex::new(writer),
            close_sent: AtomicBool::new(false),
            close_received: StdMutex::new(None),
            closing: state.closing.clone(),
        }
    }

    fn close_sent(&self) -> bool {
        self.close_sent.load(Ordering::Acquire)
    }

    /// Writes one frame; small frames wait in the coalescing buffer until `flush`, which
    /// the pumps call when their source has nothing more ready.
    /// `Ok(false)`: not sent, because a Close went out first (RFC 6455 §5.5.1).
    async fn send(&self, frame: Frame<'_>) -> Result<bool, WebSocketError> {
        let mut writer = self.writer.lock().await;
        if self.close_sent() {
            return Ok(false);
        }
        writer.write_frame(frame).await?;
        Ok(true)
    }

    /// Writes one frame and flushes (control frames the peer is waiting for).
    async fn send_now(&self, frame: Frame<'_>) -> Result<bool, WebSocketError> {
        let mut writer = self.writer.lock().await;
        if self.close_sent() {
            return Ok(false);
        }
        writer.write_frame(frame).await?;
        writer.flush().await?;
        Ok(true)
    }

    /// Sends what is buffered (and, for TLS, the records rustls holds).
    async fn flush(&self) -> Result<(), WebSocketError> {
        self.writer.lock().await.flush().await
    }

    /// Sends a Close frame with this payload, once. False when one was already sent or the
    /// write failed.
    async fn close_with(&self, payload: &[u8]) -> bool {
        self.closing.cancel();
        let mut writer = self.writer.lock().await;
        if self.close_sent.swap(true, Ordering::AcqRel) {
            return false;
        }
        let frame = Frame::close_raw(payload.to_vec().into());
        writer.write_frame(frame).await.is_ok() && writer.flush().await.is_ok()
    }

    /// Sends Close with `code` and `reason` and, if this was the first Close to this peer,
    /// records who ended the connection and why.
    async fn close_recording(
        &self,
        state: &State,
        side: Side,
        code: u16,
        reason: &str,
        detail: String,
    ) {
        if self.close(code, reason).await {
            state.record(side, Some(code), Some(detail));
        }
    }

    async fn close(&self, code: u16, reason: &str) -> bool {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        self.close_with(&payload).await
    }

    /// Waits until no write is in flight, so that dropping the connection does not cut a
    /// Close frame in half.
    async fn settle(&self) {
        drop(self.writer.lock().await);
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

/// Awaits `read`, but first, if it cannot finish at once, runs `flush`: a burst of frames
/// is read from the socket buffer and written to the coalescing buffer without a system call
/// each, and goes out in one write when the source pauses. The read future is only ever
/// polled, never dropped and restarted, so this is safe for fastwebsockets' `read_frame`.
async fn read_or_flush<T>(read: impl Future<Output = T>, flush: impl Future<Output = ()>) -> T {
    let mut read = std::pin::pin!(read);
    if let std::task::Poll::Ready(value) = poll_once(read.as_mut()).await {
        return value;
    }
    flush.await;
    read.await
}

/// Polls a future once, without dropping it: `Pending` leaves it ready to be awaited on.
async fn poll_once<F: Future>(mut future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await
}

/// Splits a WebSocket's stream into its read half and a coalescing write half.
#[allow(clippy::type_complexity)]
fn split_coalescing<S: AsyncRead + AsyncWrite + Unpin>(
    ws: fastwebsockets::WebSocket<S>,
) -> (
    fastwebsockets::WebSocketRead<tokio::io::ReadHalf<S>>,
    WebSocketWrite<coalesce::Coalescing<tokio::io::WriteHalf<S>>>,
) {
    ws.split(|stream| {
        let (read, write) = tokio::io::split(stream);
        (read, coalesce::Coalescing::new(write))
    })
}

/// The `send_fn` for `read_frame` when auto_pong and auto_close are off: fastwebsockets then
/// has nothing to send by itself, and control frames are answered after our own checks.
fn nothing_to_send(_frame: Frame<'_>) -> std::future::Ready<Result<(), std::io::Error>> {
    std::future::ready(Ok(()))
}

/// Payloads of the gateway's own keepalive pings start with this, so that their pongs are
/// recognised and not passed on to a ws upstream that never sent them.
const KEEPALIVE_MARK: &[u8] = b"wsgate-keepalive:";

fn is_keepalive_pong(payload: &[u8]) -> bool {
    payload.starts_with(KEEPALIVE_MARK)
}

/// Runs the pumps until they finish, the connection is aborted, the close deadline passes or
/// shutdown is forced; then everything is dropped, which closes both sockets. Meanwhile it
/// watches the timers: `idle_timeout` and the keepalive pings.
///
/// Idle timeout and graceful shutdown send Close 1001 to the client; its answer completes
/// the close (and, for ws upstreams, is passed on, so the upstream closes after the client).
/// Without `close_on_shutdown` a pump handles shutdown itself (the stream relay, which first
/// drains what the upstream already sent).
async fn drive<W: AsyncWrite + Unpin>(
    state: &State,
    settings: &RelaySettings,
    shutdown: &ShutdownSignals,
    client: &Peer<W>,
    pumps: impl Future<Output = ()>,
    close_on_shutdown: bool,
) {
    let going_away = async |reason: &'static str| {
        client
            .close_recording(
                state,
                Side::Gateway,
                frames::GOING_AWAY,
                reason,
                reason.into(),
            )
            .await
    };
    let close_timeout = settings.close_timeout;
    let close_deadline = async {
        state.closing.cancelled().await;
        tokio::time::sleep(close_timeout).await;
    };
    let graceful = async {
        if close_on_shutdown {
            shutdown.graceful.cancelled().await;
            going_away("gateway shutting down").await;
        }
        std::future::pending::<()>().await
    };
    let idle = async {
        if let (Some(idle), Some(last)) = (settings.idle_timeout, &state.last_data_ms) {
            loop {
                let last = state.started + Duration::from_millis(last.load(Ordering::Relaxed));
                if last.elapsed() >= idle {
                    going_away("idle timeout").await;
                    break;
                }
                tokio::time::sleep_until((last + idle).into()).await;
            }
        }
        std::future::pending::<()>().await
    };
    let keepalive = async {
        if let Some(ping) = settings.ping {
            keepalive(state, client, ping).await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = pumps => {}
        _ = graceful => {}
        _ = idle => {}
        _ = keepalive => {}
        _ = state.abort.cancelled() => {}
        _ = shutdown.force.cancelled() => {
            state.record(Side::Gateway, None, Some("shutdown_timeout passed".into()));
        }
        _ = close_deadline => {
            state.timed_out.store(true, Ordering::Relaxed);
            // A client whose Close is still unanswered (its upstream never finished) gets
            // its answer now, if its socket takes it at once.
            let reply = client.close_reply();
            let _ = tokio::time::timeout(Duration::from_millis(100), client.close_with(&reply)).await;
        }
    }
}

/// Pings the client every interval; returns (after recording why) when the client did not
/// answer within the timeout, or when the ping could not even be written in that time (a
/// peer that stopped reading fills its socket buffer and blocks our writes).
async fn keepalive<W: AsyncWrite + Unpin>(state: &State, client: &Peer<W>, ping: PingConfig) {
    let Some(last_frame) = &state.last_client_frame_ms else {
        return std::future::pending().await;
    };
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ping.interval) => {}
            // Once closing, close_timeout bounds the rest; a pong may never come (a client
            // that has sent its Close is no longer read).
            _ = state.closing.cancelled() => return std::future::pending().await,
        }
        n += 1;
        let sent_at = state.now_ms();
        let mut payload = KEEPALIVE_MARK.to_vec();
        payload.extend_from_slice(n.to_string().as_bytes());
        let frame = Frame::new(true, OpCode::Ping, None, payload.into());
        match tokio::time::timeout(ping.timeout, client.send_now(frame)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return std::future::pending().await,
            Ok(Err(e)) => {
                return state.fail(Side::Client, None, format!("keepalive ping failed: {e}"));
            }
            Err(_) => {
                return state.fail(
                    Side::Gateway,
                    None,
                    format!("client stopped reading: keepalive ping not written within {:?} (ping_timeout)", ping.timeout),
                );
            }
        }
        tokio::time::sleep_until(
            (state.started + Duration::from_millis(sent_at) + ping.timeout).into(),
        )
        .await;
        if last_frame.load(Ordering::Relaxed) < sent_at
            && !state.upstream_backlog.load(Ordering::Relaxed)
        {
            return state.fail(
                Side::Gateway,
                None,
                format!(
                    "no answer to a keepalive ping within {:?} (ping_timeout)",
                    ping.timeout
                ),
            );
        }
    }
}
