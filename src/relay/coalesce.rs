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
/// With nothing buffered, writes at least this large go straight to the socket. A pump
/// writes the frames of one read as one slice and, nearly always, its next read either finds
/// nothing (tokio clears readiness after a short read, and the flush follows) or fills a
/// whole read buffer (past `DIRECT`): no later write would have joined the batch before the
/// flush, so copying it in, allocating for it and freeing it were waste (a tenth of the ws
/// relay's instructions per small message). When a few more bytes do follow at once, or a
/// control frame splits a read's frames, this costs a system call more, nothing else.
/// Smaller writes (control frames, a lone small message) still wait for company.
const PASS: usize = 512;
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

impl<W: AsyncWrite + Unpin> Coalescing<W> {
    /// Takes a write of `len` bytes: `write` sends them to the inner writer, `copy` appends
    /// them to the buffer. Bytes go straight out only with nothing buffered before them, so
    /// order holds; the inner writer is polled at most once per drained buffer.
    fn poll_put(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        write: impl FnOnce(Pin<&mut W>, &mut Context<'_>) -> Poll<io::Result<usize>>,
        copy: impl FnOnce(&mut Vec<u8>),
    ) -> Poll<io::Result<usize>> {
        if !self.buf.is_empty() && (len >= DIRECT || self.buf.len() + len > LIMIT) {
            ready!(self.poll_drain(cx))?;
        }
        if self.buf.is_empty() && len >= PASS {
            match write(Pin::new(&mut self.inner), cx) {
                // A short write: `write_all` comes back with the rest.
                Poll::Ready(done) => return Poll::Ready(done),
                // The socket is full: a large write waits for it; a smaller one waits in the
                // buffer like any other.
                Poll::Pending if len >= DIRECT => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        copy(&mut self.buf);
        Poll::Ready(Ok(len))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Coalescing<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_put(
            cx,
            data.len(),
            |inner, cx| inner.poll_write(cx, data),
            |buf| buf.extend_from_slice(data),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().map(|b| b.len()).sum();
        self.get_mut().poll_put(
            cx,
            total,
            |inner, cx| inner.poll_write_vectored(cx, bufs),
            |buf| bufs.iter().for_each(|b| buf.extend_from_slice(b)),
        )
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

    #[tokio::test]
    async fn a_batch_with_nothing_before_it_goes_out_uncopied() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalescing::new(a);
        let batch = vec![7u8; PASS];
        w.write_all(&batch).await.unwrap();
        assert_eq!(w.buf.capacity(), 0, "never copied into the buffer");
        let mut got = vec![0u8; PASS];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, batch, "readable before any flush");
        // Behind a small write it waits, in order.
        w.write_all(b"x").await.unwrap();
        w.write_all(&batch).await.unwrap();
        w.flush().await.unwrap();
        let mut got = vec![0u8; 1 + PASS];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], b'x');
        assert_eq!(&got[1..], &batch[..]);
    }

    #[tokio::test]
    async fn a_batch_meeting_a_full_socket_waits_in_the_buffer() {
        let (a, mut b) = tokio::io::duplex(PASS);
        let mut w = Coalescing::new(a);
        let first = vec![1u8; PASS];
        w.write_all(&first).await.unwrap();
        // The pipe is full: this one is taken into the buffer, not refused.
        let second = vec![2u8; PASS];
        w.write_all(&second).await.unwrap();
        assert!(!w.buf.is_empty());
        let reader = async {
            let mut got = vec![0u8; 2 * PASS];
            b.read_exact(&mut got).await.unwrap();
            got
        };
        let (flushed, got) = tokio::join!(w.flush(), reader);
        flushed.unwrap();
        assert_eq!(&got[..PASS], &first[..]);
        assert_eq!(&got[PASS..], &second[..]);
    }
}
