//! The fault layer of one upgraded connection: it sits between the client and the relay (the
//! relay's client side is one end of an in-memory pipe) and passes whole frames each way,
//! delayed, fragmented or stopped as the route's `faults` say. The relay behind it is the
//! ordinary one, so every other rule (close codes, limits, half-close) holds as without it.
//!
//! Each direction is a reader and a writer joined by a short queue: the reader stamps each
//! frame with the time it may leave, the writer waits for that time, so `latency` delays
//! every frame by the same amount and keeps their order without slowing a stream down.
//! Thresholds are checked by the writers after each frame they deliver, so `close_after = {
//! messages = 3 }` lets exactly three messages through; time thresholds and the admin's
//! orders are watched beside them.
//!
//! Memory: a frame is held whole here (at most `max_frame_size`, plus a message for
//! `fragment`, at most `max_message_size`): the layer is for tests, not for production.

use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{Mutex, Notify, broadcast, mpsc};
use tokio::time::{Instant, sleep_until};

use super::CloseOrder;
use crate::config::{Faults, Threshold};
use crate::relay::ShutdownSignals;
use crate::relay::codec::{Head, MAX_HEAD, OpCode};

/// What one connection's fault layer needs.
pub(crate) struct Injection {
    pub faults: Faults,
    pub orders: broadcast::Receiver<CloseOrder>,
    pub counters: Counters,
    /// A duplicate of the client socket's descriptor, to reset it (`reset_after`).
    pub socket: Option<OwnedFd>,
    pub max_frame_size: usize,
    pub close_timeout: Duration,
    pub shutdown: ShutdownSignals,
}

/// The route's fault counters (`wsgate_faults_injected`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    pub latency: Counter,
    pub fragment: Counter,
    pub close: Counter,
    pub reset: Counter,
    pub stall: Counter,
}

/// How the layer ended a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No fault ended it: both sides closed as they would have without the layer.
    Passed,
    Closed(u16),
    Reset,
    Stalled,
}

impl Outcome {
    /// For the connection's log line.
    pub fn detail(&self) -> Option<String> {
        match self {
            Outcome::Passed => None,
            Outcome::Closed(code) => Some(format!("fault: closed with {code}")),
            Outcome::Reset => Some("fault: reset".into()),
            Outcome::Stalled => Some("fault: stalled".into()),
        }
    }
}

#[derive(Debug, Clone)]
enum Action {
    Close(CloseOrder),
    Reset,
    Stall,
}

/// What the two directions share.
struct Shared<'a> {
    faults: &'a Faults,
    counters: &'a Counters,
    started: Instant,
    messages_to_client: AtomicU64,
    bytes: AtomicU64,
    /// Set when a fault strikes: writers deliver nothing more.
    stopped: AtomicBool,
    action: OnceLock<Action>,
    struck: Notify,
}

impl Shared<'_> {
    /// After a delivery: the fault whose threshold is now reached, if any, strikes.
    fn check(&self) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        if let Some(action) = self.due() {
            self.strike(action);
        }
    }

    fn strike(&self, action: Action) {
        if self.action.set(action).is_ok() {
            self.stopped.store(true, Ordering::Release);
            self.struck.notify_one();
        }
    }

    fn due(&self) -> Option<Action> {
        let reached = |t: &Threshold| match *t {
            Threshold::Messages(n) => self.messages_to_client.load(Ordering::Relaxed) >= n,
            Threshold::Bytes(n) => self.bytes.load(Ordering::Relaxed) >= n,
            Threshold::After(d) => self.started.elapsed() >= d,
        };
        let f = self.faults;
        if let Some(close) = f.close_after.as_ref().filter(|c| reached(&c.when)) {
            return Some(Action::Close(CloseOrder {
                code: close.code,
                reason: close.reason.clone(),
            }));
        }
        if f.reset_after.as_ref().is_some_and(reached) {
            return Some(Action::Reset);
        }
        if f.stall_after.as_ref().is_some_and(reached) {
            return Some(Action::Stall);
        }
        None
    }

    /// The earliest `after` threshold still ahead.
    fn next_deadline(&self) -> Option<Instant> {
        let f = self.faults;
        [
            f.close_after.as_ref().map(|c| c.when),
            f.reset_after,
            f.stall_after,
        ]
        .into_iter()
        .flatten()
        .filter_map(|t| match t {
            Threshold::After(d) => Some(self.started + d),
            _ => None,
        })
        .min()
    }
}

/// Relays between `client` and `relay` (the relay's end of the pipe) until both are done or
/// a fault ends the connection.
pub(crate) async fn interpose<C>(client: C, relay: DuplexStream, injection: Injection) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Injection {
        faults,
        mut orders,
        counters,
        socket,
        max_frame_size,
        close_timeout,
        shutdown,
    } = injection;
    let shared = Shared {
        faults: &faults,
        counters: &counters,
        started: Instant::now(),
        messages_to_client: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        action: OnceLock::new(),
        struck: Notify::new(),
    };
    let (mut client_read, client_write) = tokio::io::split(client);
    let (mut relay_read, relay_write) = tokio::io::split(relay);
    let (client_write, relay_write) = (Mutex::new(client_write), Mutex::new(relay_write));
    // A threshold of zero strikes before anything moves.
    shared.check();

    let max = max_frame_size as u64;
    let mut pumps = Box::pin(async {
        let (up_tx, up_rx) = mpsc::channel(8);
        let (down_tx, down_rx) = mpsc::channel(8);
        let up = async {
            tokio::join!(
                read_frames(&mut client_read, max, &shared, up_tx, None),
                deliver(up_rx, &relay_write, &shared, Direction::Up),
            )
        };
        let down = async {
            tokio::join!(
                read_frames(&mut relay_read, max, &shared, down_tx, faults.fragment),
                deliver(down_rx, &client_write, &shared, Direction::Down),
            )
        };
        // The relay's end is the connection's end: once it has closed its side of the pipe
        // (after its own close handshake and close_timeout), nothing from the client can be
        // delivered any more, so a silent client is not waited for.
        tokio::pin!(up, down);
        tokio::select! {
            _ = &mut down => {}
            _ = &mut up => { down.await; }
        }
    });
    let struck = async {
        loop {
            if let Some(action) = shared.action.get() {
                return action.clone();
            }
            let deadline = shared.next_deadline();
            tokio::select! {
                _ = shared.struck.notified() => {}
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    shared.check();
                }
                order = orders.recv() => match order {
                    Ok(order) => shared.strike(Action::Close(order)),
                    // Missed orders were close orders too.
                    Err(broadcast::error::RecvError::Lagged(_)) => shared.strike(Action::Close(CloseOrder {
                        code: crate::config::defaults::FAULT_CLOSE_CODE,
                        reason: String::new(),
                    })),
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                },
            }
        }
    };
    let action = tokio::select! {
        _ = &mut pumps => return Outcome::Passed,
        action = struck => action,
        _ = shutdown.force.cancelled() => return Outcome::Passed,
    };
    // Wait for the frames being written to finish (a frame is never cut in two), then stop.
    let mut client_write = client_write.lock().await;
    let mut relay_write = relay_write.lock().await;
    drop(pumps);
    match action {
        Action::Close(order) => {
            counters.close.inc();
            let mut head = [0u8; MAX_HEAD];
            let payload = crate::relay::close_payload(order.code, &order.reason);
            let n = Head::new(true, OpCode::Close, None, payload.len()).encode(&mut head);
            let to_client = [&head[..n], &payload].concat();
            // The relay takes the gateway's end for the client: the Close it gets is masked.
            let key: [u8; 4] = rand::random();
            let mut masked = payload.clone();
            crate::relay::codec::apply_mask(&mut masked, key, 0);
            let n = Head::new(true, OpCode::Close, Some(key), payload.len()).encode(&mut head);
            let to_relay = [&head[..n], &masked].concat();
            let _ = tokio::time::timeout(close_timeout, async {
                let _ = client_write.write_all(&to_client).await;
                let _ = client_write.flush().await;
                let _ = relay_write.write_all(&to_relay).await;
                // The client's answer, and the relay's end, within close_timeout.
                tokio::join!(
                    drain_until_close(&mut client_read),
                    drain_until_close(&mut relay_read)
                );
                let _ = client_write.shutdown().await;
            })
            .await;
            Outcome::Closed(order.code)
        }
        Action::Reset => {
            counters.reset.inc();
            if let Some(socket) = &socket {
                // The last close of a socket with a zero linger time sends RST, not FIN.
                let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
            }
            Outcome::Reset
        }
        Action::Stall => {
            counters.stall.inc();
            // Nothing more either way; the connection stays open until the client leaves or
            // the gateway shuts down. The client is still read (and ignored) to notice that.
            let mut sink = vec![0u8; 4096];
            tokio::select! {
                _ = async { while matches!(client_read.read(&mut sink).await, Ok(n) if n > 0) {} } => {}
                _ = shutdown.graceful.cancelled() => {}
            }
            Outcome::Stalled
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to relay (to the upstream).
    Up,
    /// Relay to client.
    Down,
}

/// What a reader hands its writer.
enum Item {
    Frame(Frame),
    /// Bytes that are not frames the layer understands (a protocol error, a frame over the
    /// limit): passed on as they are, for the relay or the client to judge.
    Raw(Bytes),
    End,
}

struct Frame {
    head: Head,
    /// The whole frame as it goes on the wire.
    wire: Bytes,
}

/// Reads frames from `io` and queues them, stamped with the time they may leave. With
/// `fragment`, each data message is gathered and re-cut into that many frames.
async fn read_frames<R: AsyncRead + Unpin>(
    io: &mut R,
    max: u64,
    shared: &Shared<'_>,
    tx: mpsc::Sender<(Instant, Item)>,
    fragment: Option<usize>,
) {
    let latency = shared.faults.latency.unwrap_or_default();
    let mut buf = BytesMut::with_capacity(4096);
    let mut raw = false;
    let mut message: Option<(OpCode, BytesMut)> = None;
    loop {
        let mut items = Vec::new();
        if !raw {
            match Head::parse(&buf) {
                Ok(Some((head, n))) if head.len <= max => {
                    let total = n + head.len as usize;
                    if buf.len() >= total {
                        let wire = buf.split_to(total).freeze();
                        let frame = Frame { head, wire };
                        match fragment.filter(|&n| n > 1) {
                            Some(pieces) if !head.opcode.is_control() => {
                                let payload = frame.wire.slice(n..);
                                let (opcode, gathered) =
                                    message.get_or_insert_with(|| (head.opcode, BytesMut::new()));
                                gathered.extend_from_slice(&payload);
                                if head.fin {
                                    let opcode = *opcode;
                                    let whole = std::mem::take(gathered).freeze();
                                    message = None;
                                    shared.counters.fragment.inc();
                                    items.extend(cut(opcode, whole, pieces).map(Item::Frame));
                                }
                            }
                            _ => items.push(Item::Frame(frame)),
                        }
                    } else {
                        buf.reserve(total - buf.len());
                    }
                }
                Ok(None) => {}
                // Not for the layer to judge: the relay or the client answers it.
                Ok(Some(_)) | Err(_) => raw = true,
            }
        }
        if raw && !buf.is_empty() {
            items.push(Item::Raw(buf.split().freeze()));
        }
        if items.is_empty() {
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            match io.read_buf(&mut buf).await {
                Ok(n) if n > 0 => continue,
                _ => {
                    if !buf.is_empty() {
                        let _ = tx
                            .send((Instant::now() + latency, Item::Raw(buf.split().freeze())))
                            .await;
                    }
                    let _ = tx.send((Instant::now() + latency, Item::End)).await;
                    return;
                }
            }
        }
        let at = Instant::now() + latency;
        for item in items {
            if tx.send((at, item)).await.is_err() {
                return;
            }
        }
    }
}

/// A data message cut into `pieces` frames (the first keeps the opcode, the rest continue it).
fn cut(opcode: OpCode, whole: Bytes, pieces: usize) -> impl Iterator<Item = Frame> {
    let size = whole.len().div_ceil(pieces);
    (0..pieces).map(move |i| {
        let start = (i * size).min(whole.len());
        let end = ((i + 1) * size).min(whole.len());
        let payload = whole.slice(start..end);
        let op = if i == 0 { opcode } else { OpCode::Continuation };
        let head = Head::new(i + 1 == pieces, op, None, payload.len());
        let mut bytes = [0u8; MAX_HEAD];
        let n = head.encode(&mut bytes);
        let wire = Bytes::from([&bytes[..n], &payload[..]].concat());
        Frame { head, wire }
    })
}

/// Writes what the reader queued, each item at its time, until the end or a fault.
async fn deliver<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<(Instant, Item)>,
    writer: &Mutex<W>,
    shared: &Shared<'_>,
    direction: Direction,
) {
    let delayed = shared.faults.latency.is_some();
    while let Some((at, item)) = rx.recv().await {
        if delayed {
            sleep_until(at).await;
        }
        let mut w = writer.lock().await;
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        match item {
            Item::Frame(frame) => {
                if w.write_all(&frame.wire).await.is_err() || w.flush().await.is_err() {
                    return;
                }
                if delayed {
                    shared.counters.latency.inc();
                }
                if !frame.head.opcode.is_control() {
                    shared.bytes.fetch_add(frame.head.len, Ordering::Relaxed);
                    if direction == Direction::Down && frame.head.fin {
                        shared.messages_to_client.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(w);
                shared.check();
            }
            Item::Raw(bytes) => {
                if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
                    return;
                }
            }
            Item::End => {
                let _ = w.shutdown().await;
                return;
            }
        }
    }
}

/// Reads and drops frames until a Close frame has been read, or the end.
async fn drain_until_close<R: AsyncRead + Unpin>(io: &mut R) {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        while let Ok(Some((head, n))) = Head::parse(&buf) {
            let total = n + head.len as usize;
            if buf.len() < total {
                break;
            }
            if head.opcode == OpCode::Close {
                return;
            }
            let _ = buf.split_to(total);
        }
        if buf.len() > 1 << 20 {
            buf.clear();
        }
        buf.reserve(4096);
        match io.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}
