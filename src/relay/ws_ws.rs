//! Client WebSocket ↔ upstream WebSocket, the reverse-proxy use case.
//!
//! Frames are forwarded one by one as they arrive, so fragmentation, message types, pings,
//! pongs and Close codes with their reasons pass through unchanged, and no message is ever
//! assembled in memory. The client's masking key is reused toward the upstream (the payload
//! is re-masked with it by fastwebsockets), which costs no randomness per frame.

use fastwebsockets::{Frame, OpCode, WebSocketRead};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use super::frames::{self, Failure, MessageCheck, ReadError};
use super::{Peer, RelaySettings, Side, State, Summary, drive, on_shutdown};

type Io = TokioIo<Upgraded>;
type Ws = fastwebsockets::WebSocket<Io>;
type Reader = WebSocketRead<ReadHalf<Io>>;
type WsPeer = Peer<WriteHalf<Io>>;

/// Which way a pump forwards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

pub async fn relay_ws(
    client: Ws,
    upstream: Ws,
    settings: RelaySettings,
    shutdown: CancellationToken,
) -> Summary {
    let (mut client_rx, client_tx) = client.split(tokio::io::split);
    let (mut upstream_rx, upstream_tx) = upstream.split(tokio::io::split);
    for rx in [&mut client_rx, &mut upstream_rx] {
        // Pings, pongs and closes are the endpoints' business: pass them through.
        rx.set_auto_close(false);
        rx.set_auto_pong(false);
        rx.set_max_message_size(settings.max_message_size.saturating_add(1));
    }
    let client = Peer::new(client_tx);
    let upstream = Peer::new(upstream_tx);
    let state = State::new();

    let pumps = async {
        tokio::join!(
            pump(
                Direction::ClientToUpstream,
                &mut client_rx,
                &client,
                &upstream,
                &state,
                settings
            ),
            pump(
                Direction::UpstreamToClient,
                &mut upstream_rx,
                &upstream,
                &client,
                &state,
                settings
            ),
        );
    };
    let shutdown = on_shutdown(&shutdown, async {
        let reason = "gateway shutting down";
        if client.close(frames::GOING_AWAY, reason).await {
            state.record(
                Side::Gateway,
                Some(frames::GOING_AWAY),
                Some("shutdown".into()),
            );
        }
        upstream.close(frames::GOING_AWAY, reason).await;
    });
    drive(&state, settings.close_timeout, pumps, shutdown).await;
    state.summary()
}

/// Forwards frames read from `from_rx` (the peer `from`) to the peer `to`.
async fn pump(
    direction: Direction,
    from_rx: &mut Reader,
    from: &WsPeer,
    to: &WsPeer,
    state: &State,
    settings: RelaySettings,
) {
    let source = match direction {
        Direction::ClientToUpstream => Side::Client,
        Direction::UpstreamToClient => Side::Upstream,
    };
    let mut message = MessageCheck::new(settings.max_message_size, false);
    // With auto_pong and auto_close off, fastwebsockets has nothing to send by itself.
    let mut nothing_to_send = |_frame: Frame<'_>| std::future::ready(Ok::<(), std::io::Error>(()));
    loop {
        let mut frame = match from_rx.read_frame(&mut nothing_to_send).await {
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
                let answers_ours = from.close_sent();
                if !answers_ours {
                    state.record(source, code, None);
                    from.remember_close(&frame.payload);
                }
                to.close_with(&frame.payload).await;
                if answers_ours {
                    // Both directions have seen a Close: the handshake is complete.
                    state.abort.cancel();
                }
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
                if let Err(e) = to.send(frame).await {
                    return broken(direction, from, to, state, e.to_string()).await;
                }
                match direction {
                    Direction::ClientToUpstream => state.count_from_client(len, fin),
                    Direction::UpstreamToClient => state.count_to_client(len, fin),
                }
            }
            OpCode::Ping | OpCode::Pong => {
                if !to.close_sent()
                    && let Err(e) = to.send(frame).await
                {
                    return broken(direction, from, to, state, e.to_string()).await;
                }
            }
        }
    }
}

/// The side we read from went away without a Close.
async fn vanished(direction: Direction, from: &WsPeer, to: &WsPeer, state: &State, detail: String) {
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
            } else if to.close(frames::INTERNAL_ERROR, "upstream went away").await {
                // SPEC §4: upstream death mid-stream is 1011 to the client, whose answer the
                // other pump still reads.
                state.record(Side::Upstream, Some(frames::INTERNAL_ERROR), Some(detail));
            } else {
                state.abort.cancel();
            }
        }
    }
}

/// The side we read from broke the protocol: it gets the failure code; the other side is
/// told it is going away (client) or that its upstream failed (1014, Bad Gateway).
async fn violated(direction: Direction, from: &WsPeer, to: &WsPeer, state: &State, f: Failure) {
    from.close(f.code, f.reason).await;
    match direction {
        Direction::ClientToUpstream => {
            to.close(frames::GOING_AWAY, "client protocol error").await;
            state.fail(Side::Gateway, Some(f.code), format!("client: {}", f.reason));
        }
        Direction::UpstreamToClient => {
            to.close(frames::BAD_GATEWAY, "upstream protocol error")
                .await;
            state.fail(
                Side::Gateway,
                Some(frames::BAD_GATEWAY),
                format!("upstream: {}", f.reason),
            );
        }
    }
}

/// Writing to the other side failed: it is gone.
async fn broken(direction: Direction, from: &WsPeer, _to: &WsPeer, state: &State, detail: String) {
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
