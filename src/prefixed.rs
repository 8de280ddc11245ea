//! Bytes already read put back in front of a stream: what followed a PROXY header in the
//! same read, what an upstream sent right behind its 101, a client's first request head (for
//! hyper) and what came behind it (for the relay), and the TLS stream's plaintext that did
//! not fit the reader's buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes waiting to be read before anything new: `buf[at..]`. Holds no memory when empty.
#[derive(Default)]
pub struct PutBack {
    buf: Vec<u8>,
    at: usize,
}

impl PutBack {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { buf: bytes, at: 0 }
    }

    /// Adds `bytes` behind what is waiting.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Puts `bytes` in front of what is waiting.
    pub fn unread(&mut self, mut bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        bytes.extend_from_slice(&self.buf[self.at..]);
        self.buf = bytes;
        self.at = 0;
    }

    /// Copies what fits into `read`; true when there was something. The memory goes once
    /// all of it has been read.
    pub fn take(&mut self, read: &mut ReadBuf<'_>) -> bool {
        if self.at == self.buf.len() {
            return false;
        }
        let n = (self.buf.len() - self.at).min(read.remaining());
        read.put_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        if self.at == self.buf.len() {
            *self = PutBack::default();
        }
        true
    }

    /// The memory held (for tests of what an idle connection keeps).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// A stream that yields `prefix` before its own bytes.
pub struct Prefixed<S> {
    prefix: PutBack,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix: PutBack::new(prefix),
            inner,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Puts `bytes` back in front of whatever is still unread: what was read past a request
    /// head comes first, then the rest of the prefix, then the stream.
    pub fn unread(&mut self, bytes: Vec<u8>) {
        self.prefix.unread(bytes);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.take(buf) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn unread_bytes_come_before_the_rest_of_the_prefix_and_the_stream() {
        let (mut far, near) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut far, b" stream")
            .await
            .unwrap();
        drop(far);
        let mut stream = Prefixed::new(b"prefix".to_vec(), near);
        let mut first = [0u8; 3];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"pre");
        stream.unread(b"<back>".to_vec());
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"<back>fix stream");
    }
}
