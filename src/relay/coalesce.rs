//! Write batching without a standing buffer.
//!
//! A relay that writes every small frame with its own system call spends its time in the
//! kernel: 16 pipelined 64-byte messages cost 16 writes. `Coalescing` gathers small writes
//! in a buffer and the pumps flush it when their source has nothing more ready (see
//! `read_or_flush` in the relay), so a burst goes out in one write. The buffer is taken
//! from the heap when the first byte arrives and given back on flush, so an idle connection
//! holds no buffer at all. Large writes bypass it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;

/// Writes at least this large skip the buffer (after flushing what is in it): copying them
/// would cost more than the system call it saves.
const DIRECT: usize = 8 * 1024;
/// The buffer is flushed when it would grow past this.
const LIMIT: usize = 32 * 1024;

pub struct Coalescing<W> {
    inner: W,
    buf: Vec<u8>,
    /// Bytes of `buf` already written out during a flush in progress.
    written: usize,
}

impl<W> Coalescing<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }
}

impl<W: AsyncWrite + Unpin> Coalescing<W> {
    /// Writes out the buffer; when it is empty, gives its memory back.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Coalescing<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.len() >= DIRECT || this.buf.len() + data.len() > LIMIT {
            ready!(this.poll_drain(cx))?;
            if data.len() >= DIRECT {
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let this = self.get_mut();
        if total >= DIRECT || this.buf.len() + total > LIMIT {
            ready!(this.poll_drain(cx))?;
            if total >= DIRECT {
                return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
            }
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_writes_wait_for_flush_large_ones_pass() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalescing::new(a);
        w.write_all(b"one ").await.unwrap();
        w.write_all(b"two").await.unwrap();
        let mut probe = [0u8; 16];
        let nothing =
            tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut probe)).await;
        assert!(nothing.is_err(), "small writes are held until flush");
        w.flush().await.unwrap();
        assert_eq!(w.buf.capacity(), 0, "the buffer is given back");
        let mut got = vec![0u8; 7];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two");
        // A large write goes out after what is buffered, in order.
        w.write_all(b"head").await.unwrap();
        w.write_all(&vec![9u8; DIRECT]).await.unwrap();
        let mut got = vec![0u8; 4 + DIRECT];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&x| x == 9));
    }
}
