//! Read buffers that exist only while data is there.
//!
//! A connection waits for data holding no buffer. When a read is attempted, a buffer is
//! taken from a small per-thread pool; if the read would block it goes straight back, if
//! data arrived it stays with the data until the relay has written it on, then goes back.
//! So memory follows the connections that are moving data, not the ones that are open: the
//! hold figures in the README are what an idle connection costs.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};

use super::codec::MAX_HEAD;

/// Bytes per read. 32 KiB: large messages move in few system calls (64 KiB messages at
/// 1.2 GiB/s, README), while a busy thread's pool stays small.
pub const SIZE: usize = 32 * 1024;
/// Room kept free before the data, for a header the relay writes in front of it.
pub const HEADROOM: usize = MAX_HEAD;
/// Buffers a thread keeps for reuse; more than this are freed when given back.
const POOL: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A read buffer on loan from the pool: `HEADROOM` bytes, then what was read.
pub struct Chunk {
    /// Always `HEADROOM + SIZE` long (zeroed once, when first allocated).
    buf: Vec<u8>,
    end: usize,
}

impl Chunk {
    pub fn take() -> Self {
        let buf = FREE
            .with(|free| free.borrow_mut().pop())
            .unwrap_or_else(|| vec![0; HEADROOM + SIZE]);
        Self { buf, end: HEADROOM }
    }

    /// Where the read bytes start.
    pub fn data_start(&self) -> usize {
        HEADROOM
    }

    /// One past the last read byte.
    pub fn data_end(&self) -> usize {
        self.end
    }

    /// The buffer after the headroom, for reading into.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf[HEADROOM..]
    }

    /// Marks `n` bytes after the headroom as read.
    pub fn filled(&mut self, n: usize) {
        self.end = HEADROOM + n;
    }
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.end]
    }
}

impl DerefMut for Chunk {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.end]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // A thread that is being torn down has no pool left; the buffer is just freed then.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < POOL {
                free.push(buf);
            }
        });
    }
}

/// Reads what is available from `reader` into a buffer taken for it, waiting for data
/// first. The chunk holds `HEADROOM` unused bytes, then the data; an empty chunk is EOF.
///
/// Cancel-safe: while waiting it holds no buffer and no bytes.
pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Chunk> {
    poll_fn(|cx| {
        let mut chunk = Chunk::take();
        let mut rb = ReadBuf::new(chunk.space());
        match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                chunk.filled(n);
                Poll::Ready(Ok(chunk))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn pooled() -> usize {
        FREE.with(|free| free.borrow().len())
    }

    #[tokio::test]
    async fn a_waiting_read_holds_no_buffer() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let before = pooled();
        let mut reading = Box::pin(read(&mut b));
        let first = futures_poll_once(reading.as_mut()).await;
        assert!(first.is_none(), "nothing to read yet");
        assert_eq!(pooled(), before + 1, "the buffer went back while waiting");
        a.write_all(b"hello").await.unwrap();
        let chunk = reading.await.unwrap();
        assert_eq!(&chunk[chunk.data_start()..], b"hello");
        assert_eq!(pooled(), before, "the data keeps its buffer");
        drop(chunk);
        assert_eq!(pooled(), before + 1, "and gives it back");
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }
}
