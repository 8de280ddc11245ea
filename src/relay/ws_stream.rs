//! Client WebSocket ↔ byte-stream upstream (tcp://, unix:), the websockify use case.
//!
//! Client → upstream: the payload of every data message, in order, nothing added.
//! Upstream → client: each read becomes one binary message.
//! Half-close (SPEC §4): a client Close shuts down the upstream's write side; what the
//! upstream still sends is delivered, and its EOF completes the close with the client's
//! own code echoed. An upstream EOF is delivered as Close 1000 after all of its data.
//! Shutdown: what the upstream has already sent (readable now) is delivered, then Close 1001.

use fastwebsockets::{Frame, OpCode, Payload, WebSocketRead};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::frames::{self, MessageCheck, ReadError};
use super::{
    Coalescing, Peer, RelaySettings, ShutdownSignals, Side, State, Summary, drive, read_or_flush,
    split_coalescing,
};
use crate::telemetry::metrics::Flow;
use crate::upstream::{UpstreamReader, UpstreamStream, UpstreamWriter};

type ClientPeer<C> = Peer<Coalescing<WriteHalf<C>>>;

/// Upstream reads are this large at most. 16 KiB matches a TLS record, so one read becomes
/// one record toward a wss:// client, and keeps the per-connection buffer small.
const READ_CHUNK: usize = 16 * 1024;

pub async fn relay_stream<C>(
    client: fastwebsockets::WebSocket<C>,
    upstream: UpstreamStream,
    settings: RelaySettings,
    shutdown: ShutdownSignals,
    flow: Flow,
) -> Summary
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, client_tx) = split_coalescing(client);
    client_rx.set_auto_close(false);
    // Pings are answered here, after the checks: an unmasked Ping is a protocol error.
    client_rx.set_auto_pong(false);
    // fastwebsockets rejects frames of `max` bytes or more; the route's limit is inclusive.
    client_rx.set_max_message_size(settings.max_frame_size.saturating_add(1));
    let state = State::new(&settings, flow);
    let client = Peer::new(client_tx, &state);
    let (upstream_rx, upstream_tx) = upstream.into_split();
    let upstream_tx = Coalescing::new(upstream_tx);

    let pumps = async {
        tokio::join!(
            client_to_upstream(&mut client_rx, upstream_tx, &client, &state, &settings),
            upstream_to_client(upstream_rx, &client, &state, &shutdown),
        );
        client.settle().await;
    };
    drive(&state, &settings, &shutdown, &client, pumps, false).await;
    state.summary()
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
    client_rx: &mut WebSocketRead<ReadHalf<C>>,
    mut upstream: Coalescing<UpstreamWriter>,
    client: &ClientPeer<C>,
    state: &State,
    settings: &RelaySettings,
) {
    let exit = forward_client(client_rx, &mut upstream, client, state, settings).await;
    if !matches!(exit, Exit::Closed) {
        // Deliver what the client sent before it left (it may still sit in the batch), but
        // do not wait longer than a close may take: the upstream might not be reading.
        let _ = tokio::time::timeout(settings.close_timeout, upstream.flush()).await;
    }
    match exit {
        Exit::Closed => {}
        Exit::Answered => {
            // The handshake is complete once our Close is out.
            client.settle().await;
            state.abort.cancel();
        }
        Exit::Vanished(detail) => state.fail(Side::Client, None, detail),
        Exit::Protocol(f) => fail_client(client, state, f).await,
    }
}

async fn forward_client<C: AsyncRead + AsyncWrite + Unpin>(
    client_rx: &mut WebSocketRead<ReadHalf<C>>,
    upstream: &mut Coalescing<UpstreamWriter>,
    client: &ClientPeer<C>,
    state: &State,
    settings: &RelaySettings,
) -> Exit {
    let mut message = MessageCheck::new(settings.max_message_size, true);
    let mut upstream_open = true;
    loop {
        let mut no_send = super::nothing_to_send;
        let read = client_rx.read_frame(&mut no_send);
        let flush = async {
            let _backlog = state.writing_upstream();
            // A failure shows again at the next write, or in the other pump's read.
            let _ = upstream.flush().await;
        };
        let mut frame = match read_or_flush(read, flush).await {
            Ok(frame) => frame,
            Err(e) => match frames::classify(e) {
                ReadError::Vanished(detail) => return Exit::Vanished(detail),
                ReadError::Protocol(f) => return Exit::Protocol(f),
            },
        };
        state.client_frame_seen();
        if !frames::is_masked(&mut frame) {
            let f = frames::Failure {
                code: frames::PROTOCOL_ERROR,
                reason: "client frames must be masked",
            };
            return Exit::Protocol(f);
        }
        if let Err(f) = frames::check_control(&frame) {
            return Exit::Protocol(f);
        }
        match frame.opcode {
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                if let Err(f) = message.check(&frame) {
                    return Exit::Protocol(f);
                }
                if !upstream_open {
                    continue;
                }
                let written = {
                    let _backlog = state.writing_upstream();
                    upstream.write_all(&frame.payload).await
                };
                match written {
                    Ok(()) => state.count_from_client(frame.payload.len(), frame.fin),
                    Err(e) => {
                        // The upstream is broken; its reader will see the same. Tell the
                        // client and keep reading until it answers the Close.
                        upstream_open = false;
                        upstream_failed(client, state, e).await;
                    }
                }
            }
            OpCode::Close => {
                let code = match frames::check_close(&frame.payload) {
                    Ok(code) => code,
                    Err(f) => return Exit::Protocol(f),
                };
                if client.close_sent() {
                    return Exit::Answered;
                }
                client.remember_close(&frame.payload);
                state.record(Side::Client, Some(code.unwrap_or(frames::NO_STATUS)), None);
                // Half-close: the upstream reads EOF, and may still answer before closing.
                let _ = upstream.shutdown().await;
                return Exit::Closed;
            }
            OpCode::Ping => {
                if let Err(e) = client.send_now(Frame::pong(frame.payload)).await {
                    return Exit::Vanished(format!("write to client failed: {e}"));
                }
            }
            // Pongs only show liveness (recorded above).
            OpCode::Pong => {}
        }
    }
}

async fn upstream_to_client<C: AsyncWrite + Unpin>(
    upstream: UpstreamReader,
    client: &ClientPeer<C>,
    state: &State,
    shutdown: &ShutdownSignals,
) {
    loop {
        // Wait for data holding no buffer: an idle connection costs no read memory.
        tokio::select! {
            biased;
            _ = state.abort.cancelled() => return,
            _ = shutdown.graceful.cancelled(), if !state.closing.is_cancelled() => {
                return drain_and_close(&upstream, client, state).await;
            }
            ready = upstream.readable() => {
                if let Err(e) = ready {
                    return upstream_failed(client, state, e).await;
                }
            }
        }
        // Data is ready: read all that is there into one buffer, forward it as a batch, and
        // give the buffer back before waiting again.
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            if shutdown.graceful.is_cancelled() && !state.closing.is_cancelled() {
                // A source that never pauses must not delay the drain.
                return drain_and_close(&upstream, client, state).await;
            }
            match upstream.try_read(&mut buf) {
                Ok(0) => return upstream_finished(client, state).await,
                Ok(n) => {
                    if !forward(&buf[..n], client, state).await {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return upstream_failed(client, state, e).await,
            }
        }
        drop(buf);
        let _ = client.flush().await;
    }
}

/// Everything the upstream sent has been delivered; now the Close (echoing the client's
/// own when it closed first).
async fn upstream_finished<C: AsyncWrite + Unpin>(client: &ClientPeer<C>, state: &State) {
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
    client: &ClientPeer<C>,
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

/// Sends one chunk as a binary message; false when the relay should stop forwarding.
async fn forward<C: AsyncWrite + Unpin>(
    data: &[u8],
    client: &ClientPeer<C>,
    state: &State,
) -> bool {
    if client.close_sent() {
        // RFC 6455 §5.5.1: no data frames after our Close.
        return false;
    }
    match client.send(Frame::binary(Payload::Borrowed(data))).await {
        Ok(true) => {
            state.count_to_client(data.len(), true);
            true
        }
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
    client: &ClientPeer<C>,
    state: &State,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    while let Ok(n) = upstream.try_read(&mut buf) {
        if n == 0 || !forward(&buf[..n], client, state).await {
            break;
        }
    }
    let reason = "gateway shutting down";
    client
        .close_recording(
            state,
            Side::Gateway,
            frames::GOING_AWAY,
            reason,
            reason.into(),
        )
        .await
}

/// Fails the connection because of the client (RFC 6455 §7.1.7): Close with the reason,
/// then drop both sides without waiting for an answer.
async fn fail_client<C: AsyncWrite + Unpin>(
    client: &ClientPeer<C>,
    state: &State,
    failure: frames::Failure,
) {
    client.close(failure.code, failure.reason).await;
    state.fail(
        Side::Gateway,
        Some(failure.code),
        failure.reason.to_string(),
    );
}
