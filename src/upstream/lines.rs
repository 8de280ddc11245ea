//! `framing = "lines"` (websocketd's model, websocat's line mode): a byte-stream upstream seen
//! as a WebSocket server. Each line it writes becomes one text message without its `\n` (a
//! line that is not UTF-8 goes as binary; a line longer than `max_message_size` closes with
//! 1009), and each client message is written to it followed by `\n`.
//!
//! The adapter speaks WebSocket on one end of an in-memory pipe, the ordinary ws↔ws relay
//! holds the other end, so limits, keepalive, close codes and half-close are the relay's as
//! for any ws upstream: when the client closes, the upstream's write side is shut and what it
//! still writes is delivered before the Close is answered; when the upstream ends, the rest
//! of its last line goes out, then Close 1000.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use super::UpstreamStream;
use crate::relay::close_payload;
use crate::relay::codec::{Head, MAX_HEAD, OpCode, apply_mask};
use crate::relay::whole::FrameReader;

/// Relays between `upstream` (lines) and `pipe` (WebSocket frames from the relay) until both
/// are done.
pub async fn adapt(upstream: UpstreamStream, pipe: DuplexStream, max_message_size: usize) {
    match upstream {
        UpstreamStream::Tcp(stream) => adapt_io(stream, pipe, max_message_size).await,
        UpstreamStream::Unix(stream) => adapt_io(stream, pipe, max_message_size).await,
    }
}

async fn adapt_io<S: AsyncRead + AsyncWrite + Unpin>(
    upstream: S,
    pipe: DuplexStream,
    max_message_size: usize,
) {
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let (mut pipe_read, pipe_write) = tokio::io::split(pipe);
    let pipe_write = tokio::sync::Mutex::new(pipe_write);
    // Lines → messages, until the upstream's end.
    let to_client = async {
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(end + 1);
                if send_line(&pipe_write, &line[..end]).await.is_err() {
                    return Some(());
                }
            }
            if buf.len() > max_message_size {
                return None;
            }
            buf.reserve(4096);
            match up_read.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => {
                    if !buf.is_empty() {
                        let _ = send_line(&pipe_write, &buf).await;
                    }
                    return Some(());
                }
            }
        }
    };
    tokio::pin!(to_client);
    let mut frames = FrameReader::default();
    let mut message = Vec::new();
    // The client's Close, once it came; whether the upstream has ended and Close was sent.
    let mut client_close: Option<Vec<u8>> = None;
    let mut closed_by_upstream = false;
    loop {
        tokio::select! {
            frame = frames.next(&mut pipe_read) => {
                // The relay is gone (its close is over, or it was cut): so is the connection.
                let Some((head, mut payload)) = frame else { return };
                if let Some(key) = head.mask {
                    apply_mask(&mut payload, key, 0);
                }
                match head.opcode {
                    OpCode::Ping => {
                        let _ = send(&pipe_write, OpCode::Pong, &payload).await;
                    }
                    OpCode::Pong => {}
                    OpCode::Close if closed_by_upstream => break,
                    OpCode::Close => {
                        // Nothing more goes upstream; what it still writes is delivered,
                        // then the Close is answered (below, when it has ended).
                        let _ = up_write.shutdown().await;
                        client_close = Some(payload);
                    }
                    _ if client_close.is_some() => {}
                    _ => {
                        message.extend_from_slice(&payload);
                        if head.fin {
                            message.push(b'\n');
                            if up_write.write_all(&message).await.is_err() {
                                return;
                            }
                            message.clear();
                        }
                    }
                }
            }
            ended = &mut to_client, if !closed_by_upstream => {
                closed_by_upstream = true;
                let payload = match (ended, &client_close) {
                    (None, _) => close_payload(1009, "line too long"),
                    // Answer the client's Close with its own code.
                    (Some(()), Some(payload)) => payload.clone(),
                    (Some(()), None) => close_payload(1000, ""),
                };
                let _ = send(&pipe_write, OpCode::Close, &payload).await;
                if client_close.is_some() {
                    break;
                }
            }
        }
    }
    let _ = pipe_write.lock().await.shutdown().await;
}

async fn send_line<W: AsyncWrite + Unpin>(
    pipe: &tokio::sync::Mutex<W>,
    line: &[u8],
) -> std::io::Result<()> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let opcode = if std::str::from_utf8(line).is_ok() {
        OpCode::Text
    } else {
        OpCode::Binary
    };
    send(pipe, opcode, line).await
}

/// One unmasked frame, as a server sends it.
async fn send<W: AsyncWrite + Unpin>(
    pipe: &tokio::sync::Mutex<W>,
    opcode: OpCode,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; MAX_HEAD];
    let n = Head::new(true, opcode, None, payload.len()).encode(&mut head);
    let mut pipe = pipe.lock().await;
    pipe.write_all(&head[..n]).await?;
    pipe.write_all(payload).await?;
    pipe.flush().await
}
