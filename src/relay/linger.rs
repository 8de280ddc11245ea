//! Closing a socket so that the peer sees the Close, not a reset.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::buffers;
use super::peer::Peer;

/// How long a socket is drained after the gateway's last frame to it, at most, and for how
/// long it may stay silent before it is closed (nginx's lingering_time and
/// lingering_timeout, shorter: a WebSocket peer has at most a Close frame left to send).
pub(super) const LINGER: Duration = Duration::from_secs(2);
pub(super) const LINGER_QUIET: Duration = Duration::from_millis(250);
/// ...and how much of what it still sends is read and thrown away meanwhile.
pub(super) const LINGER_BYTES: usize = 1 << 20;

/// Closes a peer's socket lingeringly, as nginx's `lingering_close` does: the write side is
/// shut down (after the Close frame: a FIN, or TLS close_notify and FIN), then what the peer
/// still sends is read and discarded until its EOF or a short bound. Dropping a socket with
/// unread bytes in its receive buffer makes the kernel send RST, which can destroy the
/// Close frame still on its way to the peer (SPEC §4). A peer whose Close was read may send
/// nothing more, so after a complete close handshake only the write side is shut down.
pub(super) async fn linger<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut R,
    peer: &Peer<'_, W>,
) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = peer.lock().await.io.shutdown().await;
        if peer.close_read.load(Ordering::Relaxed) {
            return;
        }
        discard(reader).await;
    })
    .await;
}

/// The reading half of a lingering close, for a peer whose write side is already shut down:
/// what it still sends is read and thrown away until its EOF, a quiet moment, `LINGER` or
/// `LINGER_BYTES`.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut chunk = buffers::Chunk::take();
        let mut drained = 0;
        while drained < LINGER_BYTES {
            // Once nothing has come for a while the receive buffer is empty, and closing
            // now sends FIN, not RST.
            match tokio::time::timeout(LINGER_QUIET, reader.read(chunk.space())).await {
                Ok(Ok(0) | Err(_)) | Err(_) => break,
                Ok(Ok(n)) => drained += n,
            }
        }
    })
    .await;
}
