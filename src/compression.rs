//! permessage-deflate (RFC 7692) terminated by the gateway, for tcp and unix routes with
//! `compression = true`: client messages are inflated before the relay sees them, messages
//! to the client are deflated. (ws routes pass the extension through end to end instead.)
//!
//! A layer between the client and the ordinary relay, on an in-memory pipe, as the fault
//! layer is: the relay checks UTF-8 and `max_message_size` on the inflated messages, so a
//! compression bomb meets 1009 once that many bytes were produced (the layer itself stops
//! inflating a message there too, and the pipe's backpressure stops it earlier).
//!
//! Memory: both sides agree to no context takeover (`server_no_context_takeover`,
//! `client_no_context_takeover`), so each message is compressed on its own and zlib state is
//! made for a message in flight and dropped at its end: an idle connection holds none.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use crate::relay::codec::{Head, MAX_HEAD, OpCode, apply_mask};
use crate::relay::whole::FrameReader;

/// What the gateway answers to an acceptable offer.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// RFC 7692 §7.2.1: a message's compressed data ends with an empty stored block's tail,
/// which the sender removes and the receiver puts back.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Output is produced in pieces of this size, each one frame toward the relay.
const PIECE: usize = 16 << 10;

/// Whether one of the client's offers can be accepted: permessage-deflate with parameters
/// this end can honour (the server's window is zlib's 15 bits, so an offer that limits it
/// is declined and the next one tried).
pub fn acceptable(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|offer| {
            let mut parts = offer.split(';').map(str::trim);
            parts
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
                && parts.all(|p| {
                    let name = p.split('=').next().unwrap_or("").trim();
                    matches!(
                        name.to_ascii_lowercase().as_str(),
                        "server_no_context_takeover"
                            | "client_no_context_takeover"
                            | "client_max_window_bits"
                    ) || (name.eq_ignore_ascii_case("server_max_window_bits")
                        && p.split('=').nth(1).map(|v| v.trim().trim_matches('"')) == Some("15"))
                })
        })
}

/// Relays between `client` (compressed) and `relay` (the relay's end of the pipe, plain).
pub async fn terminate<C>(client: C, relay: DuplexStream, max_message_size: usize, max_frame: usize)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut relay_read, mut relay_write) = tokio::io::split(relay);
    // The relay's end is the connection's end. When the relay finishes first, the client was
    // sent its Close and then FIN: what it still sends is drained for a moment (lingering
    // close) and the layer ends with it, instead of waiting on a client that stays silent.
    let relay_finished = {
        // Built in place: a half made first and pinned after would be held twice in the
        // layer's future (a moved-from future keeps its space).
        let mut inflate = std::pin::pin!(inflate(
            &mut client_read,
            &mut relay_write,
            max_message_size,
            max_frame
        ));
        let mut deflate = std::pin::pin!(deflate(&mut relay_read, &mut client_write));
        tokio::select! {
            () = inflate.as_mut() => {
                deflate.await;
                false
            }
            () = deflate.as_mut() => true,
        }
    };
    if relay_finished {
        crate::relay::discard(&mut client_read).await;
    }
}

/// Client to relay: compressed messages inflated, everything else passed on as it came.
async fn inflate<C: AsyncRead + Unpin>(
    mut client_read: &mut C,
    mut relay_write: &mut WriteHalf<DuplexStream>,
    max_message_size: usize,
    max_frame: usize,
) {
    let mut frames = FrameReader::default();
    // The message being inflated: its state, how much it has produced, and its opcode
    // until a first frame of it went out (a first frame may inflate to nothing).
    let mut message: Option<(Decompress, u64, Option<OpCode>)> = None;
    while let Some((head, mut payload)) =
        frames.next_within(&mut client_read, max_frame as u64).await
    {
        // Frames the layer must not judge go to the relay as they came, and its checks
        // answer them as without the layer: unmasked frames (1002), RSV1 on a control or
        // continuation frame (RFC 7692 §6.1: 1002), a new message inside one (1002).
        // Control frames may come between the
        // fragments of a compressed message and are never compressed themselves.
        let raw = head.mask.is_none()
            || head.opcode.is_control()
            || (head.rsv1 && head.opcode == OpCode::Continuation)
            || (message.is_some() && head.opcode != OpCode::Continuation);
        let compressed = !raw && (message.is_some() || head.rsv1);
        if !compressed {
            if write_frame(&mut relay_write, head, &payload).await.is_err() {
                break;
            }
            continue;
        }
        if let Some(key) = head.mask {
            apply_mask(&mut payload, key, 0);
        }
        let (state, produced, opcode) =
            message.get_or_insert_with(|| (Decompress::new(false), 0, Some(head.opcode)));
        if head.fin {
            payload.extend_from_slice(&TAIL);
        }
        let mut input = &payload[..];
        loop {
            let mut out = Vec::with_capacity(PIECE);
            let before = state.total_in();
            let status = state.decompress_vec(input, &mut out, FlushDecompress::Sync);
            input = &input[(state.total_in() - before) as usize..];
            *produced += out.len() as u64;
            // A sender may end a message with a final deflate block (RFC 7692 §7.2.3.3):
            // then the stream ends before the tail appended above is read.
            let ended = matches!(status, Ok(Status::StreamEnd));
            let done = ended || (input.is_empty() && out.len() < PIECE);
            let fin = head.fin && done;
            // More than the limit: the relay answers 1009 when it sees one byte too
            // many; nothing more is inflated.
            let over = *produced > max_message_size as u64;
            if (!out.is_empty() || fin) || over {
                // The message's first piece carries its opcode; the rest continue it.
                let opcode = opcode.take().unwrap_or(OpCode::Continuation);
                // Masked, as the relay expects of a client.
                let key: [u8; 4] = rand::random();
                apply_mask(&mut out, key, 0);
                let plain = Head::new(fin || over, opcode, Some(key), out.len());
                if write_frame(&mut relay_write, plain, &out).await.is_err() {
                    return;
                }
            }
            if status.is_err() || over {
                // Not deflate data: the relay cannot judge it; end the connection.
                let _ = relay_write.shutdown().await;
                return;
            }
            if done {
                break;
            }
        }
        if head.fin {
            message = None; // the zlib state goes with the message
        }
    }
    // A frame over max_frame_size (or a malformed one) is not read whole here: its start
    // goes to the relay, whose checks answer the client (1009, 1002) as without the layer.
    if !frames.pending().is_empty() {
        let _ = relay_write.write_all(frames.pending()).await;
    }
    let _ = relay_write.shutdown().await;
}

/// Relay to client: data messages deflated, control frames passed on.
async fn deflate<C: AsyncWrite + Unpin>(
    mut relay_read: &mut ReadHalf<DuplexStream>,
    mut client_write: &mut C,
) {
    let mut frames = FrameReader::default();
    let mut message: Option<Compress> = None;
    while let Some((head, payload)) = frames.next(&mut relay_read).await {
        if head.opcode.is_control() {
            if write_frame(&mut client_write, head, &payload)
                .await
                .is_err()
            {
                break;
            }
            continue;
        }
        let first = message.is_none();
        let state = message.get_or_insert_with(|| Compress::new(Compression::fast(), false));
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let mut input = &payload[..];
        loop {
            out.reserve(PIECE);
            let before = state.total_in();
            let _ = state.compress_vec(input, &mut out, FlushCompress::Sync);
            input = &input[(state.total_in() - before) as usize..];
            if input.is_empty() && out.capacity() > out.len() {
                break;
            }
        }
        if head.fin {
            if out.ends_with(&TAIL) {
                out.truncate(out.len() - TAIL.len());
            }
            message = None;
        }
        let mut deflated = Head::new(head.fin, head.opcode, None, out.len());
        deflated.rsv1 = first;
        if write_frame(&mut client_write, deflated, &out)
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = client_write.shutdown().await;
}

/// Writes one frame; `payload` is unmasked and masked here when `head.mask` says so (toward
/// the relay, which takes the layer for the client), unless it came masked (passed on).
async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    head: Head,
    payload: &[u8],
) -> std::io::Result<()> {
    // Built before the first await, so the head's scratch bytes are not part of the
    // suspended future (each half holds one of these across its writes).
    let frame = encode(head, payload);
    io.write_all(&frame).await?;
    io.flush().await
}

fn encode(head: Head, payload: &[u8]) -> Vec<u8> {
    let mut bytes = [0u8; MAX_HEAD];
    let n = head.encode(&mut bytes);
    let mut frame = Vec::with_capacity(n + payload.len());
    frame.extend_from_slice(&bytes[..n]);
    frame.extend_from_slice(payload);
    frame
}

#[cfg(test)]
mod tests {
    /// What the layer's own state costs a connection (the relay's is pinned in relay/mod.rs).
    #[tokio::test]
    async fn layer_state_size() {
        let (client, _far) = tokio::io::duplex(1);
        let (relay, _far_relay) = tokio::io::duplex(1);
        let layer = super::terminate(client, relay, 1 << 20, 1 << 20);
        let size = std::mem::size_of_val(&layer);
        eprintln!("compression layer state: {size} bytes");
        // 1,112 bytes: the two halves (400 and 288) run side by side, with the split
        // streams and the lingering close after them.
        assert!(size <= 1152, "{size}");
    }
}
