//! Moving data between an upgraded client and its upstream until both sides are closed.
//!
//! Each connection runs two pumps, one per direction, joined in one task. A pump waits for
//! its source holding no buffer, reads what is there into a pooled buffer ([`buffers`]),
//! splits it into frame pieces ([`codec`]), checks them ([`frames`]), rewrites them in place
//! and writes the result on in one write, then gives the buffer back. Frames are streamed,
//! never assembled: memory per connection does not depend on message sizes, and an idle
//! connection holds no buffer at all. A slow reader on one side stops the pump that writes
//! to it, which stops reading the other side (backpressure through the kernel's socket
//! buffers, nothing queued here).
//!
//! Shutdown, the close deadline and aborts act from outside the pumps:
//!
//! - a pump that sees the end of its side records who closed and why in [`State`];
//! - the first Close frame (in either direction) starts `close_timeout`, after which whatever
//!   is still open is dropped;
//! - `abort` ends the connection at once (peer vanished, protocol error).

mod buffers;
mod coalesce;
pub mod codec;
pub mod frames;
mod ws_stream;
mod ws_ws;

use std::future::Future;
use std::io;
use std::sync::Mutex as StdMutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::config::PingConfig;
use crate::telemetry::metrics::Flow;
pub(crate) use coalesce::Coalescing;
use codec::{Head, MAX_CONTROL, MAX_HEAD, OpCode, apply_mask};
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
    /// ...and the client was waiting for the rest of the upstream's data: it got 1011.
    cut_short: AtomicBool,
    /// The client pump is blocked writing to a slow upstream, so it reads no pongs: the
    /// client may well be alive (keepalive must not judge it then).
    upstream_backlog: AtomicBool,
}

impl State {
    fn new(settings: &RelaySettings, flow: Flow, shutdown: &ShutdownSignals) -> Self {
        Self {
            first_close: OnceLock::new(),
            closing: CancellationToken::new(),
            // A forced shutdown aborts too: one wait in `drive` serves both.
            abort: shutdown.force.child_token(),
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

struct BacklogGuard<'a>(Option<&'a State>);

impl Drop for BacklogGuard<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.0 {
            state.upstream_backlog.store(false, Ordering::Relaxed);
        }
    }
}

/// The write half of one WebSocket peer, shared by the two pumps (data from one, control
/// replies from the other) and the timers. A `tokio::sync::Mutex` because a write is held
/// across awaits; a pump also keeps it across reads while a frame it forwards is only half
/// through, so that nothing is written into the middle of that frame.
///
/// `close_sent` is set and checked under the writer lock, so no frame can slip in after the
/// Close (RFC 6455 §5.5.1).
struct Peer<W> {
    writer: tokio::sync::Mutex<Coalescing<W>>,
    close_sent: AtomicBool,
    /// The gateway is the client on this link (a ws upstream): its frames are masked.
    masks: bool,
    /// A pump holds the writer across a read, waiting for the rest of a frame it has begun
    /// to forward: writes to this peer wait on the other side, not on this peer.
    awaiting_frame_rest: AtomicBool,
    /// The Close this peer gets once the other side is done (see [`Owed`]).
    owed_close: StdMutex<Option<Owed>>,
    /// A Close frame was read from this peer: it may send nothing after it, so its socket
    /// needs no draining at the end (see [`linger`]).
    close_read: AtomicBool,
    /// The connection's close deadline starts when a Close is first attempted, not when it
    /// has been written: a peer that stopped reading would otherwise block that write forever.
    closing: CancellationToken,
}

/// What a peer is owed at the end.
#[derive(Clone)]
enum Owed {
    /// It sent a Close with this payload.
    Echo(Vec<u8>),
    /// It broke the protocol. A connection fails in order (SPEC §4): the offender is no
    /// longer read, the other side is closed and what it still sends is delivered, and only
    /// then does the offender get this Close, so nothing the other side had sent is lost.
    Failure(Vec<u8>),
}

/// The locked writer of a [`Peer`].
struct PeerWriter<'a, W> {
    peer: &'a Peer<W>,
    io: tokio::sync::MutexGuard<'a, Coalescing<W>>,
}

impl<W: AsyncWrite + Unpin> Peer<W> {
    fn new(writer: W, masks: bool, state: &State) -> Self {
        Self {
            writer: tokio::sync::Mutex::new(Coalescing::new(writer)),
            close_sent: AtomicBool::new(false),
            masks,
            awaiting_frame_rest: AtomicBool::new(false),
            owed_close: StdMutex::new(None),
            close_read: AtomicBool::new(false),
            closing: state.closing.clone(),
        }
    }

    fn close_sent(&self) -> bool {
        self.close_sent.load(Ordering::Acquire)
    }

    /// Nothing more may be written to this peer (a frame to it was cut off midway).
    fn abandon(&self) {
        self.close_sent.store(true, Ordering::Release);
    }

    async fn lock(&self) -> PeerWriter<'_, W> {
        // Nearly always free: taken without a wait future, whose ~100 bytes would otherwise
        // be part of every connection's state. Fairness holds: a released lock goes to a
        // queued waiter first, so this never jumps the queue.
        let io = match self.writer.try_lock() {
            Ok(io) => io,
            Err(_) => Box::pin(self.writer.lock()).await,
        };
        PeerWriter { peer: self, io }
    }

    /// Writes one control frame and flushes (frames the peer is waiting for).
    /// `Ok(false)`: not sent, because a Close went out first.
    async fn send_now(&self, opcode: OpCode, payload: &[u8]) -> io::Result<bool> {
        let mut w = self.lock().await;
        if !w.send(opcode, payload).await? {
            return Ok(false);
        }
        w.flush().await?;
        Ok(true)
    }

    /// Sends what is buffered (and, for TLS, the records rustls holds).
    async fn flush(&self) -> io::Result<()> {
        self.lock().await.flush().await
    }

    /// Sends a Close frame with this payload, once. False when one was already sent or the
    /// write failed.
    async fn close_with(&self, payload: &[u8]) -> bool {
        self.closing.cancel();
        self.lock().await.close_with(payload).await
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

    /// The gateway ends the connection (shutdown, idle timeout): Close 1001, recorded as
    /// the gateway's doing with the reason as detail.
    async fn going_away(&self, state: &State, reason: &'static str) {
        self.close_recording(
            state,
            Side::Gateway,
            frames::GOING_AWAY,
            reason,
            reason.into(),
        )
        .await
    }

    async fn close(&self, code: u16, reason: &str) -> bool {
        self.close_with(&close_payload(code, reason)).await
    }

    /// Waits until no write is in flight, so that dropping the connection does not cut a
    /// Close frame in half.
    async fn settle(&self) {
        drop(self.writer.lock().await);
    }

    /// A Close frame (first, or answering ours) was read from this peer.
    fn close_read(&self) {
        self.close_read.store(true, Ordering::Relaxed);
    }

    /// This peer sent a Close with `payload`: it is echoed when we answer.
    fn remember_close(&self, payload: &[u8]) {
        if let Ok(mut slot) = self.owed_close.lock()
            && slot.is_none()
        {
            *slot = Some(Owed::Echo(payload.to_vec()));
        }
    }

    /// This peer broke the protocol: once the other side has finished, it gets this error.
    fn owe_failure(&self, failure: frames::Failure) {
        if let Ok(mut slot) = self.owed_close.lock() {
            *slot = Some(Owed::Failure(close_payload(failure.code, failure.reason)));
        }
    }

    /// The error Close this peer is owed, if it broke the protocol.
    fn failure_owed(&self) -> Option<Vec<u8>> {
        match self.owed_close.lock().ok()?.as_ref()? {
            Owed::Failure(payload) => Some(payload.clone()),
            Owed::Echo(_) => None,
        }
    }

    /// The Close this peer gets when the gateway answers or ends the connection: its error
    /// if it broke the protocol, its own code echoed if it closed (RFC 6455 §5.5.1), else a
    /// normal close.
    fn close_reply(&self) -> Vec<u8> {
        match self.owed_close.lock().ok().and_then(|slot| slot.clone()) {
            Some(Owed::Echo(payload) | Owed::Failure(payload)) => payload,
            None => frames::NORMAL.to_be_bytes().to_vec(),
        }
    }
}

impl<W: AsyncWrite + Unpin> PeerWriter<'_, W> {
    fn close_sent(&self) -> bool {
        self.peer.close_sent()
    }

    /// Writes bytes that are already frames. `Ok(false)`: dropped, a Close went out first.
    async fn write_frames(&mut self, bytes: &[u8]) -> io::Result<bool> {
        if self.close_sent() {
            return Ok(false);
        }
        self.io.write_all(bytes).await?;
        Ok(true)
    }

    /// Writes one control frame the gateway makes or passes on (masked toward a ws upstream,
    /// with a fresh key). `Ok(false)`: not sent, a Close went out first.
    async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<bool> {
        if self.close_sent() {
            return Ok(false);
        }
        self.write_control(opcode, payload).await?;
        Ok(true)
    }

    async fn write_control(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        let payload = &payload[..payload.len().min(MAX_CONTROL)];
        let mask = self.peer.masks.then(rand::random::<[u8; 4]>);
        let mut frame = [0u8; MAX_HEAD + MAX_CONTROL];
        let mut head = [0u8; MAX_HEAD];
        let n = Head::new(true, opcode, mask, payload.len()).encode(&mut head);
        frame[..n].copy_from_slice(&head[..n]);
        frame[n..n + payload.len()].copy_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut frame[n..n + payload.len()], key, 0);
        }
        self.io.write_all(&frame[..n + payload.len()]).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.io.flush().await
    }

    /// Sends a Close frame with this payload, once, and flushes.
    async fn close_with(&mut self, payload: &[u8]) -> bool {
        self.peer.closing.cancel();
        if self.peer.close_sent.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.write_control(OpCode::Close, payload).await.is_ok() && self.io.flush().await.is_ok()
    }
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// Awaits `read`, but first, if it cannot finish at once, runs `flush`: a burst of reads
/// is written to the coalescing buffer without a system call each, and goes out in one
/// write when the source pauses. The read is lent pinned and the flush made only when
/// needed, so neither is stored twice in the connection's state (a held connection's memory
/// is mostly that state).
async fn read_or_flush<T, F: Future<Output = ()>>(
    mut read: std::pin::Pin<&mut impl Future<Output = T>>,
    flush: impl FnOnce() -> F,
) -> T {
    if let std::task::Poll::Ready(value) = poll_once(read.as_mut()).await {
        return value;
    }
    flush().await;
    read.await
}

/// Polls a future once, without dropping it: `Pending` leaves it ready to be awaited on.
async fn poll_once<F: Future>(mut future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await
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
    pumps: std::pin::Pin<&mut impl Future<Output = ()>>,
    close_on_shutdown: bool,
) {
    let close_timeout = settings.close_timeout;
    // Timers that most connections never reach are boxed when they start: their state
    // would otherwise be part of every held connection's.
    // `close_timeout` bounds inactivity once closing (SPEC §4): it restarts while data still
    // moves toward the client (checked once per period, so it fires after one to two
    // periods of silence), but never past CLOSE_CAP periods: a peer that trickles data
    // cannot hold the connection open.
    let close_deadline = async {
        state.closing.cancelled().await;
        Box::pin(async {
            let mut moved = state.bytes_to_client.load(Ordering::Relaxed);
            for _ in 0..CLOSE_CAP {
                tokio::time::sleep(close_timeout).await;
                let now = state.bytes_to_client.load(Ordering::Relaxed);
                if now == moved {
                    break;
                }
                moved = now;
            }
        })
        .await;
    };
    let graceful = async {
        if close_on_shutdown {
            shutdown.graceful.cancelled().await;
            Box::pin(client.going_away(state, "gateway shutting down")).await;
        }
        std::future::pending::<()>().await
    };
    let idle = async {
        if let (Some(idle), Some(last)) = (settings.idle_timeout, &state.last_data_ms) {
            Box::pin(async {
                loop {
                    let last = state.started + Duration::from_millis(last.load(Ordering::Relaxed));
                    if last.elapsed() >= idle {
                        client.going_away(state, "idle timeout").await;
                        break;
                    }
                    tokio::time::sleep_until(last + idle).await;
                }
            })
            .await;
        }
        std::future::pending::<()>().await
    };
    let keepalive = async {
        if let Some(ping) = settings.ping {
            Box::pin(keepalive(state, client, ping)).await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = pumps => {}
        _ = graceful => {}
        _ = idle => {}
        _ = keepalive => {}
        _ = state.abort.cancelled() => {
            if shutdown.force.is_cancelled() {
                state.record(Side::Gateway, None, Some("shutdown_timeout passed".into()));
            }
        }
        _ = close_deadline => {
            state.timed_out.store(true, Ordering::Relaxed);
            // A client whose Close is still unanswered gets its answer now, if its socket
            // takes it at once: its error if it broke the protocol; else the transfer toward
            // it was cut short, which must not look like a complete one (1011, or 1001 when
            // the gateway is shutting down).
            if !client.close_sent() {
                let reply = client.failure_owed().unwrap_or_else(|| {
                    state.cut_short.store(true, Ordering::Relaxed);
                    let code = if shutdown.graceful.is_cancelled() {
                        frames::GOING_AWAY
                    } else {
                        frames::INTERNAL_ERROR
                    };
                    close_payload(code, "close_timeout: the upstream did not finish")
                });
                let _ = Box::pin(tokio::time::timeout(Duration::from_millis(100), client.close_with(&reply))).await;
            }
        }
    }
}

/// A close takes at most this many `close_timeout` periods, however busy.
const CLOSE_CAP: u32 = 4;

/// How long a socket is drained after the gateway's last frame to it, at most, and for how
/// long it may stay silent before it is closed (nginx's lingering_time and
/// lingering_timeout, shorter: a WebSocket peer has at most a Close frame left to send).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_QUIET: Duration = Duration::from_millis(250);
/// ...and how much of what it still sends is read and thrown away meanwhile.
const LINGER_BYTES: usize = 1 << 20;

/// Closes a peer's socket lingeringly, as nginx's `lingering_close` does: the write side is
/// shut down (after the Close frame: a FIN, or TLS close_notify and FIN), then what the peer
/// still sends is read and discarded until its EOF or a short bound. Dropping a socket with
/// unread bytes in its receive buffer makes the kernel send RST, which can destroy the
/// Close frame still on its way to the peer (SPEC §4). A peer whose Close was read may send
/// nothing more, so after a complete close handshake only the write side is shut down.
async fn linger<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(reader: &mut R, peer: &Peer<W>) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = peer.lock().await.io.shutdown().await;
        if peer.close_read.load(Ordering::Relaxed) {
            return;
        }
        let mut chunk = buffers::Chunk::take();
        let mut drained = 0;
        while drained < LINGER_BYTES {
            // Once nothing has come for a while the receive buffer is empty, and closing
            // now sends FIN, not RST.
            match tokio::time::timeout(LINGER_QUIET, reader.read(chunk.space())).await {
                Ok(Ok(0) | Err(_)) | Err(_) => break,
                Ok(Ok(n)) => drained += n,
            }
        }
    })
    .await;
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
        // A frame read from the client after this answers the ping.
        let asked_at = state.now_ms();
        let mut payload = KEEPALIVE_MARK.to_vec();
        payload.extend_from_slice(n.to_string().as_bytes());
        match tokio::time::timeout(ping.timeout, client.send_now(OpCode::Ping, &payload)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return std::future::pending().await,
            Ok(Err(e)) => {
                return state.fail(Side::Client, None, format!("keepalive ping failed: {e}"));
            }
            // The writer is held by a frame from the upstream that is only partly here:
            // the wait is the upstream's, not the client's. Try again next round.
            Err(_) if client.awaiting_frame_rest.load(Ordering::Relaxed) => continue,
            Err(_) => {
                return state.fail(
                    Side::Gateway,
                    None,
                    format!("client stopped reading: keepalive ping not written within {:?} (ping_timeout)", ping.timeout),
                );
            }
        }
        // The client's time to answer runs from when the ping was written, which may have
        // waited behind a frame.
        let sent_at = state.now_ms();
        tokio::time::sleep_until(state.started + Duration::from_millis(sent_at) + ping.timeout)
            .await;
        if last_frame.load(Ordering::Relaxed) < asked_at
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A held connection costs its task's state: the relay future lives in the task for as
    /// long as the connection does. This pins the figure (debug build, where futures are
    /// largest) so that a change that makes it balloon shows here, not in a benchmark weeks
    /// later. It was 7.3 KiB before cold paths and rarely used timers were boxed and the pumps and
    /// reads lent pinned instead of moved, arguments turned into state before the future
    /// starts, the writer lock taken without a wait future when free (2.3 KiB for ws, 2.2 KiB
    /// for tcp in release builds).
    #[tokio::test]
    async fn relay_state_stays_small() {
        let settings = RelaySettings {
            max_message_size: 1,
            max_frame_size: 1,
            close_timeout: Duration::from_secs(1),
            idle_timeout: None,
            ping: None,
        };
        let (client, _far) = tokio::io::duplex(1);
        let (upstream, _far_upstream) = tokio::io::duplex(1);
        let ws = relay_ws(
            client,
            upstream,
            settings.clone(),
            Default::default(),
            Flow::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (client, _far) = tokio::io::duplex(1);
        let upstream = crate::upstream::UpstreamStream::Tcp(tcp);
        let stream = relay_stream(
            client,
            upstream,
            settings,
            Default::default(),
            Flow::default(),
        );
        let (ws, stream) = (std::mem::size_of_val(&ws), std::mem::size_of_val(&stream));
        eprintln!("relay state per connection: ws {ws} bytes, stream {stream} bytes");
        assert!(ws <= 2560 && stream <= 2560, "ws {ws}, stream {stream}");
    }
}
