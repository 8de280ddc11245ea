//! `framing = "lines"` (websocketd's model, websocat's line mode): a byte-stream upstream seen
//! as a WebSocket server. Each line it writes becomes one text message without its `\n` (a
//! line that is not UTF-8 goes as binary; a line longer than `max_message_size` closes with
//! 1009), and each client message is written to it followed by `\n`.
//!
//! The adapter speaks WebSocket on one end of an in-memory pipe, the ordinary ws↔ws relay
//! holds the other end, so limits, keepalive, close codes and half-close are the relay's as
//! for any ws upstream: when the client closes, the upstream's write side is shut and what it
//! still writes is delivered before the Close is answered; when the upstream ends, the rest
//! of its last line goes out, then Close 1000 (1011 when it failed: a reset).

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

/// What the half that reads the relay tells the half that writes to it.
enum Control {
    /// A Ping to answer.
    Pong(Vec<u8>),
    /// A Close from the relay: the client's, or its answer to the upstream's.
    Close(Vec<u8>),
}

/// The two directions run on their own, so that neither waits for the other: the half that
/// writes to the relay (upstream lines, Pongs, the Close) owns the pipe's write side; the
/// half that reads the relay writes client messages upstream and hands it what it must
/// answer.
async fn adapt_io<S: AsyncRead + AsyncWrite + Unpin>(
    upstream: S,
    pipe: DuplexStream,
    max_message_size: usize,
) {
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let (mut pipe_read, mut pipe_write) = tokio::io::split(pipe);
    let (control, mut controls) = tokio::sync::mpsc::channel::<Control>(4);
    // Messages → lines, until the relay is gone.
    let from_client = async move {
        let mut frames = FrameReader::default();
        let mut message = Vec::new();
        let mut closed = false;
        while let Some((head, mut payload)) = frames.next(&mut pipe_read).await {
            if let Some(key) = head.mask {
                apply_mask(&mut payload, key, 0);
            }
            match head.opcode {
                OpCode::Ping => {
                    if control.send(Control::Pong(payload)).await.is_err() {
                        return;
                    }
                }
                OpCode::Pong => {}
                OpCode::Close => {
                    // Nothing more goes upstream; what it still writes is delivered, then
                    // the Close is answered (by the other half, once the upstream ended).
                    closed = true;
                    let _ = up_write.shutdown().await;
                    if control.send(Control::Close(payload)).await.is_err() {
                        return;
                    }
                }
                _ if closed => {}
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
    };
    // Lines → messages, until the upstream's end; then the Close.
    let to_client = async move {
        let mut buf = BytesMut::with_capacity(4096);
        // How far `buf` is known to hold no `\n`: a long line is scanned once.
        let mut scanned = 0;
        let mut client_close: Option<Vec<u8>> = None;
        let mut close_sent = false;
        loop {
            while let Some(at) = memchr::memchr(b'\n', &buf[scanned..]) {
                let end = scanned + at;
                scanned = 0;
                if end > max_message_size {
                    break;
                }
                let line = buf.split_to(end + 1);
                if send_line(&mut pipe_write, &line[..end]).await.is_err() {
                    return;
                }
            }
            scanned = buf.len();
            let ended = if close_sent {
                None
            } else if buf.len() > max_message_size
                || memchr::memchr(b'\n', &buf).is_some_and(|end| end > max_message_size)
            {
                Some(close_payload(1009, "line too long"))
            } else {
                None
            };
            let ended = match ended {
                Some(payload) => Some(payload),
                None => {
                    buf.reserve(4096);
                    tokio::select! {
                        read = up_read.read_buf(&mut buf), if !close_sent => match read {
                            Ok(n) if n > 0 => None,
                            // The upstream ended: the rest of its last line goes out; the
                            // client's own Close is answered with its code.
                            Ok(_) => {
                                if !buf.is_empty() && send_line(&mut pipe_write, &buf).await.is_err() {
                                    return;
                                }
                                buf.clear();
                                Some(client_close.clone().unwrap_or_else(|| close_payload(1000, "")))
                            }
                            // SPEC §4: an upstream that fails is 1011.
                            Err(_) => Some(close_payload(1011, "upstream failed")),
                        },
                        got = controls.recv() => match got {
                            // The relay is gone: so is the connection.
                            None => return,
                            Some(Control::Pong(payload)) => {
                                if send(&mut pipe_write, OpCode::Pong, &payload).await.is_err() {
                                    return;
                                }
                                None
                            }
                            // The relay answered the upstream's Close: both are done.
                            Some(Control::Close(_)) if close_sent => break,
                            Some(Control::Close(payload)) => {
                                client_close = Some(payload);
                                None
                            }
                        },
                    }
                }
            };
            if let Some(payload) = ended {
                close_sent = true;
                if send(&mut pipe_write, OpCode::Close, &payload)
                    .await
                    .is_err()
                {
                    return;
                }
                if client_close.is_some() {
                    break;
                }
            }
        }
        let _ = pipe_write.shutdown().await;
    };
    tokio::join!(from_client, to_client);
}

async fn send_line<W: AsyncWrite + Unpin>(pipe: &mut W, line: &[u8]) -> std::io::Result<()> {
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
    pipe: &mut W,
    opcode: OpCode,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; MAX_HEAD];
    let n = Head::new(true, opcode, None, payload.len()).encode(&mut head);
    pipe.write_all(&head[..n]).await?;
    pipe.write_all(payload).await?;
    pipe.flush().await
}
