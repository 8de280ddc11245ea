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
