//! Client WebSocket ↔ byte-stream upstream (tcp://, unix:), the websockify use case.
//!
//! Client → upstream: the payload of every data message, in order, nothing added.
//! Upstream → client: each read becomes one binary message.
//! Half-close (SPEC §4): a client Close shuts down the upstream's write side; what the
//! upstream still sends is delivered, and its EOF completes the close with the client's
//! own code echoed. An upstream EOF is delivered as Close 1000 after all of its data.
//! Shutdown: what the upstream has already sent (readable now) is delivered, then Close 1001.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::halves::{Half, Halves};

use super::buffers::{self, Chunk};
use super::codec::{Head, MAX_CONTROL, MAX_HEAD, OpCode, Output};
use super::forward::{Forward, Reframe, Stop};
use super::frames::{self, Incoming};
use super::{
    Coalescing, Peer, RelaySettings, ShutdownSignals, Side, State, Summary, drive, read_or_flush,
};
use crate::compression::{InflateError, Inflating};
use crate::telemetry::metrics::Flow;
use crate::upstream::{UpstreamReader, UpstreamStream, UpstreamWriter};

type ClientPeer<'s, 'h, C> = Peer<'s, Half<'h, C>>;

pub fn relay_stream<C>(
    client: C,
    upstream: UpstreamStream,
    settings: Arc<RelaySettings>,
    shutdown: ShutdownSignals,
    flow: Flow,
) -> impl Future<Output = Summary>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Built before the future starts: an async fn keeps its arguments in its state for its
    // whole life next to what is made of them, and a held connection's memory is mostly
    // that state.
    // The pumps borrow the halves from the future's captures rather than taking them: moved
    // into a pump, each would take room twice in the connection's state (the capture's
    // place is not reused).
    let client = Halves::new(client);
    let state = State::new(&settings, flow);
    let (upstream_rx, upstream_tx) = upstream.into_split();
    let mut upstream_tx = Coalescing::new(upstream_tx);
    async move {
        // Made here, not before: they borrow the captures.
        let (mut client_rx, client_tx) = client.halves();
        let client = Peer::new(client_tx, false, &state);
        {
            let pumps = async {
                tokio::join!(
                    client_to_upstream(
                        &mut client_rx,
                        &mut upstream_tx,
                        &client,
                        &state,
                        &settings
                    ),
                    upstream_to_client(&upstream_rx, &client, &state, settings.compressed),
                );
                client.settle().await;
            };
            // Pinned here and lent to `drive`: passed by value, the pumps' state would be
            // stored twice in the connection's task (once as an argument, once in the select).
            let pumps = std::pin::pin!(pumps);
            drive(&state, &settings, &shutdown, &client, pumps, false).await;
        }
        if !shutdown.force.is_cancelled() {
            Box::pin(super::linger(&mut client_rx, &client)).await;
        }
        state.summary()
    }
}

/// How the client → upstream pump ended.
enum Exit {
    /// The client sent Close first; the upstream's write side is shut down.
    Closed,
    /// The client answered our Close.
    Answered,
    Vanished(String),
    Protocol(frames::Failure),
}

async fn client_to_upstream<C: AsyncRead + AsyncWrite + Unpin>(
    client_rx: &mut Half<'_, C>,
    upstream: &mut Coalescing<UpstreamWriter>,
    client: &ClientPeer<'_, '_, C>,
    state: &State,
    settings: &RelaySettings,
) {
    let exit = forward_client(client_rx, upstream, client, state, settings).await;
    if !matches!(exit, Exit::Closed) {
        // Deliver what the client sent before it left (it may still sit in the batch), but
        // do not wait longer than a close may take: the upstream might not be reading.
        let _ = Box::pin(tokio::time::timeout(
            settings.close_timeout,
            upstream.flush(),
        ))
        .await;
    }
    match exit {
        Exit::Closed => {}
        Exit::Answered => {
            // The handshake is complete once our Close is out.
            client.settle().await;
            state.abort().fire();
        }
        Exit::Vanished(detail) => state.fail(Side::Client, None, detail),
        Exit::Protocol(f) => {
            // In order (SPEC §4): the client is no longer read, the upstream reads EOF, and
            // what it still sends reaches the client before its error Close, which
            // `upstream_finished` sends (or the close deadline, if the upstream never ends).
            state.record(
                Side::Gateway,
                Some(f.code),
                Some(format!("client: {}", f.reason)),
            );
            client.owe_failure(f);
            let _ = Box::pin(tokio::time::timeout(
                settings.close_timeout,
                upstream.shutdown(),
            ))
            .await;
        }
    }
}

/// Client → upstream: the payload of every data message, unmasked in the read buffer and
/// written on in one write per read.
async fn forward_client<C: AsyncRead + AsyncWrite + Unpin>(
    client_rx: &mut Half<'_, C>,
    upstream: &mut Coalescing<UpstreamWriter>,
    client: &ClientPeer<'_, '_, C>,
    state: &State,
    settings: &RelaySettings,
) -> Exit {
    // With compression the gateway terminates permessage-deflate: RSV1 is allowed, and
    // compressed messages are stopped at to be inflated.
    let frames = Incoming::new(
        true,
        true,
        settings.compressed,
        settings.max_frame_size,
        settings.max_message_size,
    );
    let reframe = if settings.compressed {
        Reframe::Inflated
    } else {
        Reframe::Payload
    };
    let mut forward = Forward::new(frames, reframe);
    let mut upstream_open = true;
    // The compressed message being inflated, if any: zlib's state exists only meanwhile.
    let mut inflating: Option<Box<Inflating>> = None;
    loop {
        let read = std::pin::pin!(buffers::read(client_rx));
        let flushed = read_or_flush!(
            read,
            state,
            0,
            {
                let _backlog = state.writing_upstream();
                // A failure shows again at the next write, or in the other pump's read.
                let _ = upstream.flush().await;
            },
            None
        );
        let mut chunk = match flushed {
            Ok(chunk) => chunk,
            Err(e) => return Exit::Vanished(e.to_string()),
        };
        if chunk.data_start() == chunk.data_end() {
            return Exit::Vanished("connection closed without a Close frame".into());
        }
        state.client_frame_seen();
        let mut pos = chunk.data_start();
        // The read's frames, up to its end or a compressed piece, which waits for the data
        // before it and is then inflated; the read goes on after it.
        loop {
            let next = {
                let mut out = Output::default();
                // The latest Ping of this run: one Pong answers them all (RFC 6455 §5.5.3
                // allows answering only the most recent), so a ping flood costs one write
                // per read.
                let mut ping: Option<([u8; MAX_CONTROL], usize)> = None;
                // What to do once the data before it is written. Control frames stay here,
                // so the data of the whole read goes upstream in one write.
                let mut next = loop {
                    let count = |len, fin| state.count_from_client(len, fin);
                    let head =
                        match forward.data(&mut chunk, &mut pos, &mut out, upstream_open, count) {
                            Stop::End => break Next::Read,
                            Stop::Violated(f, _) => break Next::Exit(Exit::Protocol(f)),
                            Stop::Compressed { range, fin } => break Next::Inflate(range, fin),
                            Stop::Control(head) => head,
                        };
                    let payload = forward.frames.decoder.control(&head);
                    match head.opcode {
                        OpCode::Close => {
                            client.close_read();
                            break Next::Exit(match frames::check_close(payload) {
                                Err(f) => Exit::Protocol(f),
                                Ok(_) if client.close_sent() => Exit::Answered,
                                Ok(code) => {
                                    client.remember_close(payload);
                                    state.record(
                                        Side::Client,
                                        Some(code.unwrap_or(frames::NO_STATUS)),
                                        None,
                                    );
                                    Exit::Closed
                                }
                            });
                        }
                        OpCode::Ping => {
                            let mut copy = [0u8; MAX_CONTROL];
                            copy[..payload.len()].copy_from_slice(payload);
                            ping = Some((copy, payload.len()));
                        }
                        // Pongs only show liveness (recorded above).
                        _ => {}
                    }
                };
                // The Ping's payload moves into the boxed write: kept here across the wait,
                // its 125 bytes would be part of every held connection's state.
                if let Some((payload, len)) = ping
                    && let Err(e) =
                        Box::pin(
                            async move { client.send_now(OpCode::Pong, &payload[..len]).await },
                        )
                        .await
                    && !matches!(next, Next::Exit(_))
                {
                    next = Next::Exit(Exit::Vanished(format!("write to client failed: {e}")));
                }
                let data = out.take();
                if !data.is_empty() {
                    let written = {
                        let _backlog = state.writing_upstream();
                        upstream.write_all(&chunk[data]).await
                    };
                    if let Err(e) = written {
                        // The upstream is broken; its reader will see the same. Tell the
                        // client and keep reading until it answers the Close.
                        upstream_open = false;
                        Box::pin(upstream_failed(client, state, e)).await;
                    }
                }
                next
            };
            match next {
                Next::Read => break,
                Next::Inflate(range, fin) => {
                    let text = forward.frames.message.compressed() == Some(true);
                    // Boxed: only connections with compression ever wait here.
                    let inflated = Box::pin(inflate(
                        upstream,
                        client,
                        state,
                        &chunk[range],
                        (fin, text),
                        &mut inflating,
                        settings.max_message_size,
                    ))
                    .await;
                    match inflated {
                        Inflated::Passed => {}
                        Inflated::UpstreamFailed => upstream_open = false,
                        Inflated::Refused(f) => return Exit::Protocol(f),
                    }
                }
                Next::Exit(Exit::Closed) => {
                    // Half-close: the upstream reads EOF, and may still answer before
                    // closing.
                    let _ = upstream.shutdown().await;
                    return Exit::Closed;
                }
                Next::Exit(exit) => return exit,
            }
        }
    }
}

/// Where a run through a read's frames stopped.
enum Next {
    /// The read is used up.
    Read,
    /// At a piece of a compressed message (`buf[range]`; true when it ends the message).
    Inflate(std::ops::Range<usize>, bool),
    Exit(Exit),
}

/// What became of a piece of a compressed message.
enum Inflated {
    Passed,
    /// Writing to the upstream failed; the client has been told.
    UpstreamFailed,
    /// The client broke the protocol (not deflate, not UTF-8, too big once inflated).
    Refused(frames::Failure),
}

/// Writes what `piece` inflates to upstream, counted as the client's; `fin` ends the message
/// (and drops its zlib state), `text` says what it is.
async fn inflate<C: AsyncRead + AsyncWrite + Unpin>(
    upstream: &mut Coalescing<UpstreamWriter>,
    client: &ClientPeer<'_, '_, C>,
    state: &State,
    piece: &[u8],
    (fin, text): (bool, bool),
    inflating: &mut Option<Box<Inflating>>,
    max_message_size: usize,
) -> Inflated {
    let message = inflating.get_or_insert_with(|| Inflating::new(text));
    let before = message.written();
    let result = {
        let _backlog = state.writing_upstream();
        message.piece(piece, fin, max_message_size, upstream).await
    };
    // What went upstream counts, also of a message that failed on the way.
    let written = (message.written() - before) as usize;
    state.count_from_client(written, fin && result.is_ok());
    if fin {
        *inflating = None;
    }
    match result {
        Ok(()) => Inflated::Passed,
        Err(InflateError::Protocol(f)) => Inflated::Refused(f),
        Err(InflateError::Write(e)) => {
            upstream_failed(client, state, e).await;
            Inflated::UpstreamFailed
        }
    }
}

/// Upstream → client: each read becomes one binary message, its header written into the
/// headroom in front of the data so that frame and payload go out in one write (with
/// `deflate`, the message is compressed first: permessage-deflate terminated here).
async fn upstream_to_client<C: AsyncWrite + Unpin>(
    upstream: &UpstreamReader,
    client: &ClientPeer<'_, '_, C>,
    state: &State,
    deflate: bool,
) {
    loop {
        // Wait for data holding no buffer: an idle connection costs no read memory.
        // (An abort needs no branch here: `drive` ends the whole relay on it.)
        tokio::select! {
            biased;
            _ = state.drain().fired(), if !state.closing().is_fired() => {
                return Box::pin(drain_and_close(upstream, client, state, deflate)).await;
            }
            ready = upstream.readable() => {
                if let Err(e) = ready {
                    return Box::pin(upstream_failed(client, state, e)).await;
                }
            }
        }
        // Data is ready: read all that is there, forward it as a batch, and give the buffer
        // back before waiting again.
        let mut chunk = Chunk::take();
        loop {
            if state.drain().is_fired() && !state.closing().is_fired() {
                // A source that never pauses must not delay the drain.
                return Box::pin(drain_and_close(upstream, client, state, deflate)).await;
            }
            match upstream.try_read(chunk.space()) {
                Ok(0) => return Box::pin(upstream_finished(client, state)).await,
                Ok(n) => {
                    chunk.filled(n);
                    if !forward(&mut chunk, client, state, deflate).await {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Box::pin(upstream_failed(client, state, e)).await,
            }
        }
        drop(chunk);
        let _ = client.flush().await;
    }
}

/// Everything the upstream sent has been delivered; now the Close (echoing the client's
/// own when it closed first, its error when it broke the protocol).
async fn upstream_finished<C: AsyncWrite + Unpin>(client: &ClientPeer<'_, '_, C>, state: &State) {
    let payload = client.close_reply();
    if client.close_with(&payload).await {
        let code = frames::check_close(&payload).ok().flatten();
        state.record(
            Side::Upstream,
            Some(code.unwrap_or(frames::NO_STATUS)),
            None,
        );
    }
}

async fn upstream_failed<C: AsyncWrite + Unpin>(
    client: &ClientPeer<'_, '_, C>,
    state: &State,
    e: std::io::Error,
) {
    let reason = "upstream connection failed";
    client
        .close_recording(
            state,
            Side::Upstream,
            frames::INTERNAL_ERROR,
            reason,
            e.to_string(),
        )
        .await
}

/// Sends the data of one read as a binary message; false when the relay should stop
/// forwarding.
async fn forward<C: AsyncWrite + Unpin>(
    chunk: &mut Chunk,
    client: &ClientPeer<'_, '_, C>,
    state: &State,
    deflate: bool,
) -> bool {
    let data = chunk.data_start()..chunk.data_end();
    let len = data.len();
    if deflate {
        let (frame, start) = compressed_message(&chunk[data]);
        return Box::pin(send(client, state, &frame[start..], len)).await;
    }
    let mut head = [0u8; MAX_HEAD];
    let n = Head::new(true, OpCode::Binary, None, len).encode(&mut head);
    let mut out = Output::default();
    out.push(chunk, &head[..n], data);
    let frame = out.take();
    send(client, state, &chunk[frame], len).await
}

/// One binary message of `data`, deflated (RSV1 set on its frame): the frame is
/// `buffer[start..]`, its header written in front of the compressed bytes.
fn compressed_message(data: &[u8]) -> (Vec<u8>, usize) {
    let mut frame = crate::compression::deflate(data, MAX_HEAD);
    let mut head = Head::new(true, OpCode::Binary, None, frame.len() - MAX_HEAD);
    head.rsv1 = true;
    let mut bytes = [0u8; MAX_HEAD];
    let n = head.encode(&mut bytes);
    let start = MAX_HEAD - n;
    frame[start..MAX_HEAD].copy_from_slice(&bytes[..n]);
    (frame, start)
}

/// Writes one message's frame, which carries `len` bytes of the upstream's data.
async fn send<C: AsyncWrite + Unpin>(
    client: &ClientPeer<'_, '_, C>,
    state: &State,
    frame: &[u8],
    len: usize,
) -> bool {
    match client.lock().await.write_frames(frame).await {
        Ok(true) => {
            state.count_to_client(len, true);
            true
        }
        // RFC 6455 §5.5.1: no data frames after our Close.
        Ok(false) => false,
        Err(e) => {
            if !client.close_sent() {
                state.fail(Side::Client, None, format!("write to client failed: {e}"));
            }
            false
        }
    }
}

/// Graceful shutdown: deliver what the upstream has already sent (what is readable without
/// waiting), then Close 1001. The client's answer is read by the other pump.
async fn drain_and_close<C: AsyncWrite + Unpin>(
    upstream: &UpstreamReader,
    client: &ClientPeer<'_, '_, C>,
    state: &State,
    deflate: bool,
) {
    // At most this much: an upstream that never pauses must not hold the drain open until
    // shutdown_timeout cuts the connection without a Close.
    const DRAIN_LIMIT: usize = 1 << 20;
    let mut chunk = Chunk::take();
    let mut drained = 0;
    while drained < DRAIN_LIMIT
        && let Ok(n) = upstream.try_read(chunk.space())
    {
        chunk.filled(n);
        drained += n;
        if n == 0 || !forward(&mut chunk, client, state, deflate).await {
            break;
        }
    }
    client.going_away(state, "gateway shutting down").await
}
