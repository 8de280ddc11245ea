//! The write side of one WebSocket peer, shared by both pumps and the timers: frames, control
//! frames, the one Close, and what the peer is owed at the end.

use std::io;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::codec::{Head, MAX_CONTROL, MAX_HEAD, OpCode, apply_mask};
use super::state::{Side, State};
use super::{Coalescing, frames};

/// The write half of one WebSocket peer, shared by the two pumps (data from one, control
/// replies from the other) and the timers. A `tokio::sync::Mutex` because a write is held
/// across awaits; a pump also keeps it across reads while a frame it forwards is only half
/// through, so that nothing is written into the middle of that frame.
///
/// `close_sent` is set and checked under the writer lock, so no frame can slip in after the
/// Close (RFC 6455 §5.5.1).
pub(super) struct Peer<'s, W> {
    pub(super) writer: tokio::sync::Mutex<Coalescing<W>>,
    pub(super) close_sent: AtomicBool,
    /// The gateway is the client on this link (a ws upstream): its frames are masked.
    pub(super) masks: bool,
    /// A pump holds the writer across a read, waiting for the rest of a frame it has begun
    /// to forward: writes to this peer wait on the other side, not on this peer.
    pub(super) awaiting_frame_rest: AtomicBool,
    /// The Close this peer gets once the other side is done (see [`Owed`]). Boxed: only
    /// a closing connection has one, and inline it took 24 more bytes of every one.
    pub(super) owed_close: StdMutex<Option<Box<Owed>>>,
    /// A Close frame was read from this peer: it may send nothing after it, so its socket
    /// needs no draining at the end (see [`linger`]).
    pub(super) close_read: AtomicBool,
    /// The connection's close deadline starts when a Close is first attempted, not when it
    /// has been written: a peer that stopped reading would otherwise block that write forever.
    /// The connection's state: sending a Close starts its closing.
    pub(super) state: &'s State,
}

/// What a peer is owed at the end.
#[derive(Clone)]
pub(super) enum Owed {
    /// It sent a Close with this payload.
    Echo(Vec<u8>),
    /// It broke the protocol. A connection fails in order (SPEC §4): the offender is no
    /// longer read, the other side is closed and what it still sends is delivered, and only
    /// then does the offender get this Close, so nothing the other side had sent is lost.
    Failure(Vec<u8>),
}

/// The locked writer of a [`Peer`].
pub(super) struct PeerWriter<'a, W> {
    pub(super) peer: &'a Peer<'a, W>,
    pub(super) io: tokio::sync::MutexGuard<'a, Coalescing<W>>,
}

impl<'s, W: AsyncWrite + Unpin> Peer<'s, W> {
    pub(super) fn new(writer: W, masks: bool, state: &'s State) -> Self {
        Self {
            writer: tokio::sync::Mutex::new(Coalescing::new(writer)),
            close_sent: AtomicBool::new(false),
            masks,
            awaiting_frame_rest: AtomicBool::new(false),
            owed_close: StdMutex::new(None),
            close_read: AtomicBool::new(false),
            state,
        }
    }

    pub(super) fn close_sent(&self) -> bool {
        self.close_sent.load(Ordering::Acquire)
    }

    /// Nothing more may be written to this peer (a frame to it was cut off midway).
    pub(super) fn abandon(&self) {
        self.close_sent.store(true, Ordering::Release);
    }

    pub(super) async fn lock(&self) -> PeerWriter<'_, W> {
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
    pub(super) async fn send_now(&self, opcode: OpCode, payload: &[u8]) -> io::Result<bool> {
        let mut w = self.lock().await;
        if !w.send(opcode, payload).await? {
            return Ok(false);
        }
        w.flush().await?;
        Ok(true)
    }

    /// Sends what is buffered (and, for TLS, the records rustls holds).
    pub(super) async fn flush(&self) -> io::Result<()> {
        self.lock().await.flush().await
    }

    /// Sends a Close frame with this payload, once. False when one was already sent or the
    /// write failed.
    pub(super) async fn close_with(&self, payload: &[u8]) -> bool {
        self.state.closing().fire();
        self.lock().await.close_with(payload).await
    }

    /// Sends Close with `code` and `reason` and, if this was the first Close to this peer,
    /// records who ended the connection and why.
    pub(super) async fn close_recording(
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
    pub(super) async fn going_away(&self, state: &State, reason: &'static str) {
        self.close_recording(
            state,
            Side::Gateway,
            frames::GOING_AWAY,
            reason,
            reason.into(),
        )
        .await
    }

    pub(super) async fn close(&self, code: u16, reason: &str) -> bool {
        self.close_with(&close_payload(code, reason)).await
    }

    /// Waits until no write is in flight, so that dropping the connection does not cut a
    /// Close frame in half.
    pub(super) async fn settle(&self) {
        drop(self.writer.lock().await);
    }

    /// A Close frame (first, or answering ours) was read from this peer.
    pub(super) fn close_read(&self) {
        self.close_read.store(true, Ordering::Relaxed);
    }

    /// This peer sent a Close with `payload`: it is echoed when we answer.
    pub(super) fn remember_close(&self, payload: &[u8]) {
        if let Ok(mut slot) = self.owed_close.lock()
            && slot.is_none()
        {
            *slot = Some(Box::new(Owed::Echo(payload.to_vec())));
        }
    }

    /// This peer broke the protocol: once the other side has finished, it gets this error.
    pub(super) fn owe_failure(&self, failure: frames::Failure) {
        if let Ok(mut slot) = self.owed_close.lock() {
            *slot = Some(Box::new(Owed::Failure(close_payload(
                failure.code,
                failure.reason,
            ))));
        }
    }

    /// The error Close this peer is owed, if it broke the protocol.
    pub(super) fn failure_owed(&self) -> Option<Vec<u8>> {
        match &**self.owed_close.lock().ok()?.as_ref()? {
            Owed::Failure(payload) => Some(payload.clone()),
            Owed::Echo(_) => None,
        }
    }

    /// The Close this peer gets when the gateway answers or ends the connection: its error
    /// if it broke the protocol, its own code echoed if it closed (RFC 6455 §5.5.1), else a
    /// normal close.
    pub(super) fn close_reply(&self) -> Vec<u8> {
        match self
            .owed_close
            .lock()
            .ok()
            .and_then(|slot| slot.as_deref().cloned())
        {
            Some(Owed::Echo(payload) | Owed::Failure(payload)) => payload,
            None => frames::NORMAL.to_be_bytes().to_vec(),
        }
    }
}

impl<W: AsyncWrite + Unpin> PeerWriter<'_, W> {
    pub(super) fn close_sent(&self) -> bool {
        self.peer.close_sent()
    }

    /// Writes bytes that are already frames. `Ok(false)`: dropped, a Close went out first.
    pub(super) async fn write_frames(&mut self, bytes: &[u8]) -> io::Result<bool> {
        if self.close_sent() {
            return Ok(false);
        }
        self.io.write_all(bytes).await?;
        Ok(true)
    }

    /// Writes one control frame the gateway makes or passes on (masked toward a ws upstream,
    /// with a fresh key). `Ok(false)`: not sent, a Close went out first.
    pub(super) async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<bool> {
        if self.close_sent() {
            return Ok(false);
        }
        self.write_control(opcode, payload).await?;
        Ok(true)
    }

    pub(super) async fn write_control(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        let payload = &payload[..payload.len().min(MAX_CONTROL)];
        // One draw of four bytes (an array would take four draws).
        let mask = self.peer.masks.then(|| rand::random::<u32>().to_ne_bytes());
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

    pub(super) async fn flush(&mut self) -> io::Result<()> {
        self.io.flush().await
    }

    /// Sends a Close frame with this payload, once, and flushes.
    pub(super) async fn close_with(&mut self, payload: &[u8]) -> bool {
        self.peer.state.closing().fire();
        if self.peer.close_sent.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.write_control(OpCode::Close, payload).await.is_ok() && self.io.flush().await.is_ok()
    }
}

/// A Close frame's payload: the code, then the reason cut at a character boundary within the
/// 123 bytes a control frame leaves for it.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}
