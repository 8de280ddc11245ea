//! Client WebSocket ↔ upstream WebSocket, the reverse-proxy use case.
//!
//! Frames are forwarded one by one as they arrive, so fragmentation, message types, pings,
//! pongs and Close codes with their reasons pass through unchanged, and no message is ever
//! assembled in memory.

use fastwebsockets::{Frame, OpCode, WebSocketRead};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

use super::frames::{self, Failure, MessageCheck, ReadError};
use super::{
    Coalescing, Peer, RelaySettings, ShutdownSignals, Side, State, Summary, drive, read_or_flush,
    split_coalescing,
};
use crate::telemetry::metrics::Flow;

type Reader<S> = WebSocketRead<ReadHalf<S>>;
type WsPeer<S> = Peer<Coalescing<WriteHalf<S>>>;

/// Which way a pump forwards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

pub async fn relay_ws<C, U>(
    client: fastwebsockets::WebSocket<C>,
    upstream: fastwebsockets::WebSocket<U>,
    settings: RelaySettings,
    shutdown: ShutdownSignals,
    flow: Flow,
) -> Summary
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, client_tx) = split_coalescing(client);
    let (mut upstream_rx, upstream_tx) = split_coalescing(upstream);
    // Pings, pongs and closes are the endpoints' business: pass them through.
    client_rx.set_auto_close(false);
    client_rx.set_auto_pong(false);
    client_rx.set_max_message_size(settings.max_frame_size.saturating_add(1));
    upstream_rx.set_auto_close(false);
    upstream_rx.set_auto_pong(false);
    upstream_rx.set_max_message_size(settings.max_frame_size.saturating_add(1));
    let state = State::new(&settings, flow);
    let client = Peer::new(client_tx, &state);
    let upstream = Peer::new(upstream_tx, &state);

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
    drive(&state, &settings, &shutdown, &client, pumps, true).await;
    state.summary()
}

/// Forwards frames read from `from_rx` (the peer `from`) to the peer `to`.
async fn pump<F: AsyncRead + AsyncWrite + Unpin, T: AsyncWrite + Unpin>(
    direction: Direction,
    from_rx: &mut Reader<F>,
    from: &WsPeer<F>,
    to: &WsPeer<T>,
    state: &State,
    settings: &RelaySettings,
) {
    let source = match direction {
        Direction::ClientToUpstream => Side::Client,
        Direction::UpstreamToClient => Side::Upstream,
    };
    let mut message = MessageCheck::new(settings.max_message_size, false);
    loop {
        let mut no_send = super::nothing_to_send;
        let read = from_rx.read_frame(&mut no_send);
        let flush = async {
            let _backlog =
                (direction == Direction::ClientToUpstream).then(|| state.writing_upstream());
            // A failure shows again at the next write.
            let _ = to.flush().await;
        };
        let mut frame = match read_or_flush(read, flush).await {
            Ok(frame) => frame,
            Err(e) => {
                return match frames::classify(e) {
                    ReadError::Vanished(detail) => {
                        vanished(direction, from, to, state, detail).await
                    }
                    ReadError::Protocol(f) => violated(direction, from, to, state, f).await,
                };
            }
        };
        if direction == Direction::ClientToUpstream {
            state.client_frame_seen();
        }
        // RFC 6455 §5.1: clients mask every frame, servers none.
        if frames::is_masked(&mut frame) != (direction == Direction::ClientToUpstream) {
            let reason = match direction {
                Direction::ClientToUpstream => "client frames must be masked",
                Direction::UpstreamToClient => "server frames must not be masked",
            };
            let f = Failure {
                code: frames::PROTOCOL_ERROR,
                reason,
            };
            return violated(direction, from, to, state, f).await;
        }
        if let Err(f) = frames::check_control(&frame) {
            return violated(direction, from, to, state, f).await;
        }
        match frame.opcode {
            OpCode::Close => {
                let code = match frames::check_close(&frame.payload) {
                    Ok(code) => code,
                    Err(f) => return violated(direction, from, to, state, f).await,
                };
                if !from.close_sent() {
                    // This side starts the close (rather than answering ours).
                    state.record(source, Some(code.unwrap_or(frames::NO_STATUS)), None);
                    from.remember_close(&frame.payload);
                }
                // Forward it (a no-op when `to` was already sent a Close). Nothing more comes
                // from this side; the relay ends when the other side has closed too.
                to.close_with(&frame.payload).await;
                return;
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                if let Err(f) = message.check(&frame) {
                    return violated(direction, from, to, state, f).await;
                }
                if to.close_sent() {
                    // The other side is closing; RFC 6455 §5.5.1 allows no more data to it.
                    continue;
                }
                let (len, fin) = (frame.payload.len(), frame.fin);
                let sent = {
                    let _backlog = (direction == Direction::ClientToUpstream)
                        .then(|| state.writing_upstream());
                    to.send(fresh_mask(direction, frame)).await
                };
                match sent {
                    Ok(true) => match direction {
                        Direction::ClientToUpstream => state.count_from_client(len, fin),
                        Direction::UpstreamToClient => state.count_to_client(len, fin),
                    },
                    Ok(false) => {}
                    Err(e) => return broken(direction, from, to, state, e.to_string()).await,
                }
            }
            OpCode::Pong
                if direction == Direction::ClientToUpstream
                    && super::is_keepalive_pong(&frame.payload) =>
            {
                // The answer to the gateway's own keepalive: not the upstream's business.
            }
            OpCode::Ping | OpCode::Pong => {
                if let Err(e) = to.send(fresh_mask(direction, frame)).await {
                    return broken(direction, from, to, state, e.to_string()).await;
                }
            }
        }
    }
}

/// Toward the upstream every frame gets a new masking key (fastwebsockets draws one when the
/// frame has none). Reusing the client's key would let a client choose the exact bytes on the
/// gateway→upstream link, which masking exists to prevent (RFC 6455 §10.3).
fn fresh_mask(direction: Direction, frame: Frame<'_>) -> Frame<'_> {
    match direction {
        Direction::ClientToUpstream => Frame::new(frame.fin, frame.opcode, None, frame.payload),
        Direction::UpstreamToClient => frame,
    }
}

/// The side we read from went away without a Close.
async fn vanished<F: AsyncWrite + Unpin, T: AsyncWrite + Unpin>(
    direction: Direction,
    from: &WsPeer<F>,
    to: &WsPeer<T>,
    state: &State,
    detail: String,
) {
    match direction {
        Direction::ClientToUpstream => {
            state.record(Side::Client, None, Some(detail));
            to.close(frames::GOING_AWAY, "client went away").await;
            state.abort.cancel();
        }
        Direction::UpstreamToClient => {
            if from.close_sent() || to.close_sent() {
                // A close was under way and the upstream dropped the connection instead of
                // answering: answer the client ourselves and finish.
                to.close_with(&to.close_reply()).await;
                state.record(Side::Upstream, None, Some(detail));
                state.abort.cancel();
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

/// The side we read from broke the protocol: it gets the failure code; the other side is
/// told it is going away (client) or that its upstream failed (1011).
async fn violated<F: AsyncWrite + Unpin, T: AsyncWrite + Unpin>(
    direction: Direction,
    from: &WsPeer<F>,
    to: &WsPeer<T>,
    state: &State,
    f: Failure,
) {
    from.close(f.code, f.reason).await;
    match direction {
        Direction::ClientToUpstream => {
            to.close(frames::GOING_AWAY, "client protocol error").await;
            state.fail(Side::Gateway, Some(f.code), format!("client: {}", f.reason));
        }
        Direction::UpstreamToClient => {
            // 1011, not 1014 (Bad Gateway): 1014 is newer than many clients, and some
            // (tungstenite among them) reject it as a protocol violation of their own.
            to.close(frames::INTERNAL_ERROR, "upstream protocol error")
                .await;
            state.fail(
                Side::Gateway,
                Some(frames::INTERNAL_ERROR),
                format!("upstream: {}", f.reason),
            );
        }
    }
}

/// Writing to the other side failed: it is gone.
async fn broken<F: AsyncWrite + Unpin, T: AsyncWrite + Unpin>(
    direction: Direction,
    from: &WsPeer<F>,
    _to: &WsPeer<T>,
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
            state.abort.cancel();
        }
        Direction::UpstreamToClient => {
            from.close(frames::GOING_AWAY, "client went away").await;
            state.fail(Side::Client, None, detail);
        }
    }
}
