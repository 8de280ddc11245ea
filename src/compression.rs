//! permessage-deflate (RFC 7692) terminated by the gateway, for tcp and unix routes with
//! `compression = true`: the negotiation, and the zlib steps the stream relay takes inside
//! its pumps (client messages are inflated before they go upstream, each read from the
//! upstream is deflated into one message). ws routes pass the extension through end to end
//! instead.
//!
//! Memory: both sides agree to no context takeover (`server_no_context_takeover`,
//! `client_no_context_takeover`), so each message is compressed on its own and zlib state is
//! made for a message in flight and dropped at its end: an idle connection holds none, and
//! costs what a connection without compression costs.
//!
//! Limits: the inflated size counts against `max_message_size` (a compression bomb meets 1009
//! once that many bytes were produced, and no more than that is passed on), and the UTF-8 of
//! text is checked on the inflated bytes as they are produced.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::relay::buffers;
use crate::relay::frames::{self, Failure, Utf8Stream};

/// What the gateway answers to an acceptable offer.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// RFC 7692 §7.2.1: a message's compressed data ends with an empty stored block's tail,
/// which the sender removes and the receiver puts back.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Deflated output grows by this much at a time. (Inflated output is written on a pooled read
/// buffer at a time: a message that inflates to megabytes needs no more memory than that,
/// and the upstream's backpressure paces it.)
const PIECE: usize = 16 << 10;

/// Whether one of the client's offers can be accepted: permessage-deflate with parameters
/// this end can honour (the server's window is zlib's 15 bits, so an offer that limits it
/// is declined and the next one tried).
pub fn acceptable(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|offer| {
            let mut parts = offer.split(';').map(str::trim);
            parts
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
                && parts.all(|p| {
                    let name = p.split('=').next().unwrap_or("").trim();
                    matches!(
                        name.to_ascii_lowercase().as_str(),
                        "server_no_context_takeover"
                            | "client_no_context_takeover"
                            | "client_max_window_bits"
                    ) || (name.eq_ignore_ascii_case("server_max_window_bits")
                        && p.split('=').nth(1).map(|v| v.trim().trim_matches('"')) == Some("15"))
                })
        })
}

/// A compressed message from the client while it is being inflated: zlib's state lives as
/// long as the message does.
pub(crate) struct Inflating {
    zlib: Decompress,
    produced: u64,
    /// Of it, what was written on.
    written: u64,
    /// For a text message: its UTF-8, checked as it is produced.
    utf8: Option<Utf8Stream>,
}

/// Why a compressed message could not be passed on.
pub(crate) enum InflateError {
    /// The client's fault: not deflate data, not UTF-8, or too big once inflated.
    Protocol(Failure),
    /// Writing to the upstream failed.
    Write(std::io::Error),
}

impl Inflating {
    pub(crate) fn new(text: bool) -> Box<Self> {
        Box::new(Self {
            zlib: Decompress::new(false),
            produced: 0,
            written: 0,
            utf8: text.then(Utf8Stream::default),
        })
    }

    /// Inflates one piece of the message (unmasked; `fin` when it is the message's last) and
    /// writes what it produces to `out`, never more than `max_message_size` in all (see
    /// [`Inflating::written`]).
    pub(crate) async fn piece<W: AsyncWrite + Unpin>(
        &mut self,
        mut input: &[u8],
        fin: bool,
        max_message_size: usize,
        out: &mut W,
    ) -> Result<(), InflateError> {
        let mut tail: &[u8] = if fin { &TAIL } else { &[] };
        // Inflated into one of the relay's pooled read buffers, a piece at a time.
        let mut chunk = buffers::Chunk::take();
        loop {
            if input.is_empty() {
                // The tail that the sender removed goes in last (RFC 7692 §7.2.2).
                input = std::mem::take(&mut tail);
            }
            let space = chunk.space();
            let (before_in, before_out) = (self.zlib.total_in(), self.zlib.total_out());
            let status = self
                .zlib
                .decompress(input, space, FlushDecompress::Sync)
                .map_err(|_| {
                    InflateError::Protocol(Failure {
                        code: frames::INVALID_PAYLOAD,
                        reason: "compressed data is not valid deflate",
                    })
                })?;
            input = &input[(self.zlib.total_in() - before_in) as usize..];
            let n = (self.zlib.total_out() - before_out) as usize;
            let full = n == space.len();
            let produced = &space[..n];
            self.produced += n as u64;
            if self.produced > max_message_size as u64 {
                return Err(InflateError::Protocol(Failure {
                    code: frames::TOO_BIG,
                    reason: "message too big once inflated",
                }));
            }
            if let Some(utf8) = self.utf8.as_mut()
                && !utf8.feed(produced, false)
            {
                return Err(InflateError::Protocol(frames::NOT_UTF8));
            }
            if n > 0 {
                out.write_all(produced).await.map_err(InflateError::Write)?;
                self.written += n as u64;
            }
            // A sender may end a message with a final deflate block (RFC 7692 §7.2.3.3):
            // then the stream ends before the tail is read. Output that filled the buffer
            // may have more behind it.
            let ended = matches!(status, Status::StreamEnd);
            if ended || (input.is_empty() && tail.is_empty() && !full) {
                break;
            }
        }
        if fin
            && let Some(utf8) = self.utf8.as_mut()
            && !utf8.feed(&[], true)
        {
            return Err(InflateError::Protocol(frames::NOT_UTF8));
        }
        Ok(())
    }

    /// The inflated bytes of the message written on so far (also when a piece failed).
    pub(crate) fn written(&self) -> u64 {
        self.written
    }
}

/// One message's data compressed on its own (no context takeover), without the tail the
/// receiver puts back: the payload of a frame with RSV1 set, after `headroom` zeroed bytes
/// left for the frame's header (so that the frame goes out of this one buffer).
pub(crate) fn deflate(data: &[u8], headroom: usize) -> Vec<u8> {
    DEFLATER.with(|slot| {
        let mut slot = slot.borrow_mut();
        let zlib = slot.get_or_insert_with(|| Compress::new(Compression::fast(), false));
        zlib.reset();
        deflate_with(zlib, data, headroom)
    })
}

thread_local! {
    /// One deflate state per worker thread, reset for every message: setting up zlib's
    /// state (about 256 KiB) cost a third of the time of compressing a small message.
    /// Messages are compressed whole between two awaits, so a thread's one state serves all
    /// its connections, and an idle connection holds none.
    static DEFLATER: std::cell::RefCell<Option<Compress>> = const { std::cell::RefCell::new(None) };
}

fn deflate_with(zlib: &mut Compress, data: &[u8], headroom: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(headroom + data.len() / 2 + 64);
    out.resize(headroom, 0);
    let mut input = data;
    loop {
        out.reserve(PIECE);
        let before = zlib.total_in();
        // Writing into a Vec with room cannot fail; a stall shows as no progress, and the
        // loop ends only when all input is in and zlib left room unused (it is flushed).
        let _ = zlib.compress_vec(input, &mut out, FlushCompress::Sync);
        input = &input[(zlib.total_in() - before) as usize..];
        if input.is_empty() && out.capacity() > out.len() {
            break;
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, &'static str> {
        let mut out = Vec::new();
        let mut message = Inflating::new(false);
        // In two pieces, cut anywhere: the frames of a message arrive so.
        let (a, b) = data.split_at(data.len() / 3);
        for (piece, fin) in [(a, false), (b, true)] {
            if let Err(e) = message.piece(piece, fin, max, &mut out).await {
                return Err(match e {
                    InflateError::Protocol(f) => f.reason,
                    InflateError::Write(_) => "write",
                });
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_deflated_message_inflates_to_itself() {
        let text: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let deflated = deflate(&text, 0);
        assert!(deflated.len() < text.len() / 2, "{}", deflated.len());
        assert_eq!(
            inflate(&deflated, text.len()).await.as_deref(),
            Ok(&text[..])
        );
        assert_eq!(inflate(&deflate(b"", 0), 0).await.as_deref(), Ok(&b""[..]));
    }

    /// The thread's one deflate state is reset between messages: a message that repeats the
    /// one before is not sent as a reference to it (no context takeover was negotiated), so
    /// it inflates alone, to itself, and compresses exactly as the first did.
    #[tokio::test]
    async fn each_message_is_compressed_on_its_own() {
        let text = b"the same words, the same words, the same words".repeat(20);
        let first = deflate(&text, 0);
        let second = deflate(&text, 0);
        assert_eq!(second, first);
        assert_eq!(inflate(&second, text.len()).await.as_deref(), Ok(&text[..]));
    }

    #[tokio::test]
    async fn no_more_than_the_limit_is_produced() {
        let zeros = deflate(&vec![0u8; 1 << 20], 0);
        let mut out = Vec::new();
        let mut message = Inflating::new(false);
        let r = message.piece(&zeros, true, 40_000, &mut out).await;
        assert!(matches!(r, Err(InflateError::Protocol(f)) if f.code == frames::TOO_BIG));
        // Written on in whole pieces, as long as they stayed within the limit.
        assert!((PIECE..=40_000).contains(&out.len()), "{}", out.len());
        assert_eq!(message.written(), out.len() as u64);
        assert_eq!(
            inflate(b"\xff\xff\xff\xff", 10).await,
            Err("compressed data is not valid deflate")
        );
    }
}
