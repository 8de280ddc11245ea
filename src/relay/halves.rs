//! A stream split into a read half and a write half for the two pumps of one connection,
//! kept in the relay's own state.
//!
//! `tokio::io::split` moves the stream to the heap behind an `Arc` (96 bytes a stream, two
//! streams a ws connection) so that the halves can go to different tasks. The pumps of one
//! connection run in one task and borrow the halves from the relay's state, so the stream
//! can stay there: each half locks it only inside one poll, never across an await, and the
//! two are polled one after the other, so the lock is never contended.

use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The stream both halves lend.
pub(super) struct Halves<S>(Mutex<S>);

/// One half: reads through one, writes through the other (both are the same handle; the
/// pumps are what keeps them apart).
pub(super) struct Half<'a, S>(&'a Mutex<S>);

impl<S> Halves<S> {
    pub(super) fn new(stream: S) -> Self {
        Self(Mutex::new(stream))
    }

    pub(super) fn halves(&self) -> (Half<'_, S>, Half<'_, S>) {
        (Half(&self.0), Half(&self.0))
    }
}

impl<S> Half<'_, S> {
    fn stream(&self) -> MutexGuard<'_, S> {
        // A pump that panicked mid-poll ends the task: nobody is left to see a torn stream.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Half<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both halves in use at once in one task, as the pumps use them: a read waiting for
    /// data does not keep the write from going out (the lock is held only inside a poll).
    #[tokio::test]
    async fn a_pending_read_does_not_block_the_write() {
        let (near, mut far) = tokio::io::duplex(64);
        let stream = Halves::new(near);
        let (mut rx, mut tx) = stream.halves();
        let mut got = [0u8; 5];
        let read = rx.read_exact(&mut got);
        let write_then_answer = async {
            tx.write_all(b"ping?").await.unwrap();
            let mut asked = [0u8; 5];
            far.read_exact(&mut asked).await.unwrap();
            assert_eq!(&asked, b"ping?");
            far.write_all(b"pong!").await.unwrap();
        };
        let (read, ()) = tokio::join!(read, write_then_answer);
        read.unwrap();
        assert_eq!(&got, b"pong!");
    }
}
