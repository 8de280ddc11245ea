//! Whole frames, for the in-process peers that act on messages rather than stream them (the
//! line adapter): each frame is read whole, so these are for frames whose size the relay has
//! already bounded.

use bytes::BytesMut;
use tokio::io::AsyncRead;

use super::buffers;
use super::codec::Head;

#[derive(Default)]
pub(crate) struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    /// The next frame and its payload (still masked as it came); `None` at the end, on a
    /// malformed header or a frame longer than `max`.
    async fn next_within<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        max: u64,
    ) -> Option<(Head, Vec<u8>)> {
        loop {
            match Head::parse(&self.buf) {
                Ok(Some((head, n))) if head.len <= max => {
                    let total = n + head.len as usize;
                    if self.buf.len() >= total {
                        let frame = self.buf.split_to(total);
                        if self.buf.is_empty() {
                            // Between messages a connection holds no buffer here.
                            self.buf = BytesMut::new();
                        }
                        return Some((head, frame[n..].to_vec()));
                    }
                }
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => return None,
            }
            // A pooled buffer for the read, as the relay's pumps do: waiting, the reader holds
            // none, so an idle connection costs no buffer here.
            match buffers::read(io).await {
                Ok(chunk) if chunk.data_end() > chunk.data_start() => {
                    self.buf
                        .extend_from_slice(&chunk[chunk.data_start()..chunk.data_end()]);
                }
                _ => return None,
            }
        }
    }

    /// As `next_within`, with no bound of its own.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Option<(Head, Vec<u8>)> {
        self.next_within(io, u64::MAX).await
    }
}
