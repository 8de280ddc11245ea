//! Client WebSocket ↔ upstream WebSocket, the reverse-proxy use case.
//!
//! Frames pass through one by one in the pieces that reads deliver, so fragmentation,
//! message types, pings, pongs and Close codes with their reasons pass through unchanged,
//! and no message or frame is ever assembled in memory. Frames from the upstream are
//! forwarded byte for byte; frames toward it get a fresh masking key, applied in the same
//! pass that removes the client's.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::halves::{Half, Halves};

use super::buffers;
use super::codec::{OpCode, Output};
use super::forward::{Forward, Reframe, Stop};
use super::frames::{self, Failure, Incoming};
use super::{
    Peer, PeerWriter, RelaySettings, ShutdownSignals, Side, State, Summary, drive, read_or_flush,
};
use crate::telemetry::metrics::Flow;

type WsPeer<'s, 'h, S> = Peer<'s, Half<'h, S>>;

/// Which way a pump forwards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

pub fn relay_ws<C, U>(
    client: C,
    upstream: U,
    settings: Arc<RelaySettings>,
    shutdown: ShutdownSignals,
    flow: Flow,
) -> impl Future<Output = Summary>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Built before the future starts, as in relay_stream: arguments of an async fn stay in
    // its state next to what is made of them.
    // The streams stay in the future's captures and the pumps borrow their halves (see
    // `halves`).
    let (client, upstream) = (Halves::new(client), Halves::new(upstream));
    let state = State::new(&settings, flow);
    async move {
        // Made here, not before: they borrow the captures.
        let (mut client_rx, client_tx) = client.halves();
        let (mut upstream_rx, upstream_tx) = upstream.halves();
        let client = Peer::new(client_tx, false, &state);
        let upstream = Peer::new(upstream_tx, true, &state);
        {
            let pumps = async {
                tokio::join!(
                    pump(
                        Direction::ClientToUpstream,
                        &mut client_rx,
                        &client,
                        &upstream,
                        &state,
                        &settings
                    ),
                    pump(
                        Direction::UpstreamToClient,
                        &mut upstream_rx,
                        &upstream,
                        &client,
                        &state,
                        &settings
                    ),
                );
                client.settle().await;
                upstream.settle().await;
            };
            // Pinned here and lent to `drive`: passed by value, the pumps' state would be
            // stored twice in the connection's task (once as an argument, once in the select).
            let pumps = std::pin::pin!(pumps);
            drive(&state, &settings, &shutdown, &client, pumps, true).await;
        }
        if !shutdown.force.is_cancelled() {
            Box::pin(async {
                tokio::join!(
                    super::linger(&mut client_rx, &client),
                    super::linger(&mut upstream_rx, &upstream),
                )
            })
            .await;
        }
        state.summary()
    }
}

/// What a pump does after writing out the frames it read before this.
enum Then {
    Close(Vec<u8>),
    /// The side read from broke the protocol; `true` when the peer written to was left in
    /// the middle of a frame (it can no longer be sent a Close).
    Violated(Failure, bool),
    Broken(String),
}

/// Forwards frames read from `from_rx` (the peer `from`) to the peer `to`.
async fn pump<F: AsyncRead + AsyncWrite + Unpin, T: AsyncWrite + Unpin>(
    direction: Direction,
    from_rx: &mut Half<'_, F>,
    from: &WsPeer<'_, '_, F>,
    to: &Peer<'_, T>,
    state: &State,
    settings: &RelaySettings,
) {
    let to_upstream = direction == Direction::ClientToUpstream;
    let source = source_of(direction);
    // RFC 6455 §5.1: clients mask every frame, servers none.
    let frames = Incoming::new(
        to_upstream,
        true,
        settings.compressed,
        settings.max_frame_size,
        settings.max_message_size,
    );
    let mut forward = Forward::new(frames, Reframe::Frames { mask: to_upstream });
    // The writer of `to`, kept while a frame is half through: nothing may come between the
    // pieces of a frame, not even a control frame.
    let mut held = None;
    loop {
        let read = std::pin::pin!(buffers::read(from_rx));
        let read = read_or_flush!(
            read,
            state,
            usize::from(to_upstream),
            {
                // Toward the upstream, the wait counts as its backlog (see keepalive).
                let _backlog = to_upstream.then(|| state.writing_upstream());
                // A failure shows again at the next write.
                let _ = match held.as_mut() {
                    Some(w) => PeerWriter::flush(w).await,
                    None => to.flush().await,
                };
            },
            // Holding the writer in the middle of a frame, the wait is for this side's data,
            // not for the peer's reading (see keepalive).
            held.is_some().then_some(&to.awaiting_frame_rest)
        );
        let mid_frame = forward.frames.decoder.in_data_frame();
        let mut chunk = match read {
            Ok(chunk) if chunk.data_start() < chunk.data_end() => chunk,
            Ok(_) => {
                drop(held);
                let detail = "connection closed without a Close frame".to_string();
                return Box::pin(vanished(direction, from, to, state, detail, mid_frame)).await;
            }
            Err(e) => {
                drop(held);
                return Box::pin(vanished(
                    direction,
                    from,
                    to,
                    state,
                    e.to_string(),
                    mid_frame,
                ))
                .await;
            }
        };
        if to_upstream {
            state.client_frame_seen();
        }
        // The client's pump blocked on a slow upstream reads no pongs: keepalive must not
        // judge the client while it is (SPEC §4 backpressure).
        let backlog = to_upstream.then(|| state.writing_upstream());
        let mut w = match held.take() {
            Some(w) => w,
            None => to.lock().await,
        };
        let mut pos = chunk.data_start();
        let mut out = Output::default();
        let mut then = loop {
            let count = |len, fin| match direction {
                Direction::ClientToUpstream => state.count_from_client(len, fin),
                Direction::UpstreamToClient => state.count_to_client(len, fin),
            };
            // Once the other side was sent a Close, RFC 6455 §5.5.1 allows no more data to it.
            let deliver = !w.close_sent();
            let head = match forward.data(&mut chunk, &mut pos, &mut out, deliver, count) {
                // (`Compressed` is the stream relay's: it comes only with `Reframe::Inflated`.)
                Stop::End | Stop::Compressed { .. } => break None,
                Stop::Violated(f, cut) => break Some(Then::Violated(f, cut)),
                Stop::Control(head) => head,
            };
            // What came before it goes first.
            let data = out.take();
            if let Err(e) = w.write_frames(&chunk[data]).await {
                break Some(Then::Broken(e.to_string()));
            }
            let payload = forward.frames.decoder.control(&head);
            match head.opcode {
                OpCode::Close => {
                    from.close_read();
                    break Some(match frames::check_close(payload) {
                        Err(f) => Then::Violated(f, false),
                        Ok(code) => {
                            if !from.close_sent() {
                                // This side starts the close (rather than answering ours).
                                state.record(source, Some(code.unwrap_or(frames::NO_STATUS)), None);
                                from.remember_close(payload);
                            }
                            Then::Close(payload.to_vec())
                        }
                    });
                }
                OpCode::Pong if to_upstream && super::is_keepalive_pong(payload) => {
                    // The answer to the gateway's own keepalive: not the upstream's business.
                }
                opcode => {
                    if let Err(e) = Box::pin(w.send(opcode, payload)).await {
                        break Some(Then::Broken(e.to_string()));
                    }
                }
            }
        };
        let data = out.take();
        if !data.is_empty()
            && !matches!(then, Some(Then::Broken(_)))
            && let Err(e) = w.write_frames(&chunk[data]).await
        {
            then = Some(Then::Broken(e.to_string()));
        }
        drop(chunk);
        drop(backlog);
        match then {
            None if forward.frames.decoder.in_data_frame() => held = Some(w),
            None => drop(w),
            Some(Then::Close(payload)) => {
                // Forward it (a no-op when `to` was already sent a Close), unless `to` broke
                // the protocol: then this Close, the other side's last word, is what it was
                // waiting for, and `to` gets its error now. Nothing more comes from this
                // side; the relay ends when the other side has closed too.
                let payload = to.failure_owed().unwrap_or(payload);
                Box::pin(w.close_with(&payload)).await;
                return;
            }
            Some(Then::Violated(f, cut)) => {
                drop(w);
                return Box::pin(violated(direction, from, to, state, f, cut)).await;
            }
            Some(Then::Broken(detail)) => {
                drop(w);
                return Box::pin(broken(direction, from, state, detail)).await;
            }
        }
    }
}

/// The side we read from went away without a Close.
async fn vanished<F: AsyncWrite + Unpin, T: AsyncWrite + Unpin>(
    direction: Direction,
    from: &WsPeer<'_, '_, F>,
    to: &Peer<'_, T>,
    state: &State,
    detail: String,
    mid_frame: bool,
) {
    if mid_frame {
        // Half of a frame went on: a Close now would land inside it. Drop both sides.
        to.abandon();
        return state.fail(
            source_of(direction),
            None,
            format!("{detail}, in the middle of a frame"),
        );
    }
    match direction {
        Direction::ClientToUpstream => {
            state.record(Side::Client, None, Some(detail));
            to.close(frames::GOING_AWAY, "client went away").await;
            state.abort().fire();
        }
        Direction::UpstreamToClient => {
            if from.close_sent() || to.close_sent() {
                // A close was under way and the upstream dropped the connection instead of
                // answering: answer the client ourselves and finish.
                to.close_with(&to.close_reply()).await;
                state.record(Side::Upstream, None, Some(detail));
                state.abort().fire();
            } else {
                // SPEC §4: upstream death mid-stream is 1011 to the client, whose answer the
                // other pump still reads (close_timeout bounds the wait).
                to.close_recording(
                    state,
                    Side::Upstream,
                    frames::INTERNAL_ERROR,
                    "upstream went away",
                    detail,
                )
                .await;
            }
        }
    }
}

/// The side we read from broke the protocol. The connection fails in order (SPEC §4): the
/// offender is no longer read, the other side is told it is going away (the client) or that
/// its upstream failed (1011), and what the other side still sends is delivered until its
/// Close, which the other pump answers by sending the offender its error (see `Then::Close`;
/// `close_timeout` bounds the wait). Invalid UTF-8 is 1001 to the other side either way.
async fn violated<F: AsyncWrite + Unpin, T: AsyncWrite + Unpin>(
    direction: Direction,
    from: &WsPeer<'_, '_, F>,
    to: &Peer<'_, T>,
    state: &State,
    f: Failure,
    cut: bool,
) {
    // Recorded first: the closes below may wait behind a frame the other pump is still
    // forwarding, and whatever happens meanwhile must not be taken for the cause.
    let (code, reason, detail) = match direction {
        Direction::ClientToUpstream => (
            frames::GOING_AWAY,
            "client protocol error",
            format!("client: {}", f.reason),
        ),
        // 1011, not 1014 (Bad Gateway): 1014 is newer than many clients, and some
        // (tungstenite among them) reject it as a protocol violation of their own.
        Direction::UpstreamToClient => (
            frames::INTERNAL_ERROR,
            "upstream protocol error",
            format!("upstream: {}", f.reason),
        ),
    };
    let (code, reason) = if f.code == frames::INVALID_PAYLOAD {
        (frames::GOING_AWAY, "peer sent invalid UTF-8")
    } else {
        (code, reason)
    };
    let logged = match direction {
        Direction::ClientToUpstream => f.code,
        Direction::UpstreamToClient => code,
    };
    state.record(Side::Gateway, Some(logged), Some(detail));
    from.owe_failure(f);
    if cut {
        // Half of a frame went to `to`: a Close now would land inside it, so it is dropped
        // without one, and nothing more is waited for.
        to.abandon();
        from.close_with(&from.close_reply()).await;
        return state.abort().fire();
    }
    if !to.close(code, reason).await && to.close_sent() && from.close_sent() {
        // Both sides were closed already: nothing left to wait for.
        state.abort().fire();
    }
}

/// Writing to the other side failed: it is gone.
async fn broken<F: AsyncWrite + Unpin>(
    direction: Direction,
    from: &WsPeer<'_, '_, F>,
    state: &State,
    detail: String,
) {
    match direction {
        Direction::ClientToUpstream => {
            if from
                .close(frames::INTERNAL_ERROR, "upstream connection failed")
                .await
            {
                state.record(Side::Upstream, Some(frames::INTERNAL_ERROR), Some(detail));
            }
            // Keep nothing else open: the client's answer is not worth waiting for here.
            state.abort().fire();
        }
        Direction::UpstreamToClient => {
            from.close(frames::GOING_AWAY, "client went away").await;
            state.fail(Side::Client, None, detail);
        }
    }
}

fn source_of(direction: Direction) -> Side {
    match direction {
        Direction::ClientToUpstream => Side::Client,
        Direction::UpstreamToClient => Side::Upstream,
    }
}
