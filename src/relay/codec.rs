//! WebSocket frames as the relay sees them (RFC 6455 §5.2): headers parsed and written here,
//! payloads streamed through in whatever pieces the socket delivers.
//!
//! The relay does not assemble frames. A frame's payload passes through in the pieces that
//! reads return, unmasked (or re-masked) in place, so a connection holds no buffer between
//! reads, whatever the size of the frames. Only what cannot be split is carried over from
//! one read to the next: at most one header (14 bytes) and one control payload (125 bytes).

use std::ops::Range;

use super::frames::{self, Failure};

/// The longest header: 2 bytes, 8 of extended length, 4 of masking key.
pub const MAX_HEAD: usize = 14;
/// Control frames carry at most this much (RFC 6455 §5.5).
pub const MAX_CONTROL: usize = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0 => OpCode::Continuation,
            1 => OpCode::Text,
            2 => OpCode::Binary,
            8 => OpCode::Close,
            9 => OpCode::Ping,
            10 => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0,
            OpCode::Text => 1,
            OpCode::Binary => 2,
            OpCode::Close => 8,
            OpCode::Ping => 9,
            OpCode::Pong => 10,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    /// RSV1: the message is compressed (permessage-deflate, RFC 7692), on its first frame.
    pub rsv1: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
}

impl Head {
    pub fn new(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, len: usize) -> Self {
        Self {
            fin,
            rsv1: false,
            opcode,
            mask,
            len: len as u64,
        }
    }

    /// How many bytes [`Head::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        let ext = if self.len < 126 {
            0
        } else if self.len <= u64::from(u16::MAX) {
            2
        } else {
            8
        };
        2 + ext + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Writes the header with the shortest length encoding (RFC 6455 §5.2 asks for it);
    /// returns how many bytes of `out` it took.
    pub fn encode(&self, out: &mut [u8; MAX_HEAD]) -> usize {
        out[0] = (u8::from(self.fin) << 7) | (u8::from(self.rsv1) << 6) | self.opcode.bits();
        let mut n = if self.len < 126 {
            out[1] = self.len as u8;
            2
        } else if self.len <= u64::from(u16::MAX) {
            out[1] = 126;
            out[2..4].copy_from_slice(&(self.len as u16).to_be_bytes());
            4
        } else {
            out[1] = 127;
            out[2..10].copy_from_slice(&self.len.to_be_bytes());
            10
        };
        if let Some(mask) = self.mask {
            out[1] |= 0x80;
            out[n..n + 4].copy_from_slice(&mask);
            n += 4;
        }
        n
    }

    /// Parses a header at the start of `bytes`: `Ok(None)` when it is not all there yet.
    #[inline(always)]
    pub fn parse(bytes: &[u8]) -> Result<Option<(Head, usize)>, Failure> {
        let [b0, b1, ..] = *bytes else {
            return Ok(None);
        };
        if b0 & 0x30 != 0 {
            // RSV2 and RSV3 belong to no extension the gateway lets through; RSV1 is
            // permessage-deflate's, allowed by the decoder only where it was negotiated.
            return Err(Failure::protocol("reserved bits set"));
        }
        let rsv1 = b0 & 0x40 != 0;
        let opcode = OpCode::from_bits(b0 & 0x0f).ok_or(Failure::protocol("unknown opcode"))?;
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let (len, mut n) = match b1 & 0x7f {
            126 => {
                let Some(ext) = bytes.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4)
            }
            127 => {
                let Some(ext) = bytes.get(2..10) else {
                    return Ok(None);
                };
                let mut be = [0u8; 8];
                be.copy_from_slice(ext);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(Failure::protocol("frame length has its top bit set"));
                }
                (len, 10)
            }
            short => (u64::from(short), 2),
        };
        if opcode.is_control() {
            if !fin {
                return Err(Failure::protocol("fragmented control frame"));
            }
            if len > MAX_CONTROL as u64 {
                return Err(Failure::protocol("control frame too long"));
            }
        }
        let mask = if masked {
            let Some(key) = bytes.get(n..n + 4) else {
                return Ok(None);
            };
            n += 4;
            Some([key[0], key[1], key[2], key[3]])
        } else {
            None
        };
        Ok(Some((
            Head {
                fin,
                rsv1,
                opcode,
                mask,
                len,
            },
            n,
        )))
    }
}

/// XORs `data` with `key` as if `data` started `offset` bytes into a payload.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let mut key = key;
    key.rotate_left((offset % 4) as usize);
    fastwebsockets::unmask(data, key);
}

/// One step of what arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Payload bytes of a data frame, still masked as they came, at `range` of the buffer.
    /// `offset` is where they start within the frame's payload (for the mask). Every piece
    /// has bytes, except the only piece of an empty frame; the first piece of a frame has
    /// offset 0, the last has `end` set.
    Data {
        head: Head,
        offset: u64,
        range: Range<usize>,
        end: bool,
        /// The header's length when it lies, as it arrived, right before `range` in this
        /// buffer (a first piece whose header came whole in this read); else 0.
        head_here: usize,
    },
    /// A whole control frame; its payload, unmasked, is [`Decoder::control`].
    Control(Head),
}

/// Splits incoming bytes into frame pieces. Holds no buffer: only a header split across
/// reads and a control payload being gathered, both of fixed size.
pub struct Decoder {
    /// Whether frames from this side must be masked (clients) or must not be (servers).
    expect_masked: bool,
    /// permessage-deflate was negotiated: RSV1 may mark a message's first frame.
    compressed: bool,
    max_frame_size: u64,
    head: [u8; MAX_HEAD],
    head_len: usize,
    /// The frame whose payload is arriving, and how much of it has.
    frame: Option<(Head, u64)>,
    /// The payload of a control frame being gathered. Allocated at the first control frame
    /// only (at most 125 bytes): most connections never see one, and every byte of a
    /// decoder is held for the life of the connection.
    control: Vec<u8>,
}

impl Decoder {
    pub fn new(expect_masked: bool, max_frame_size: usize) -> Self {
        Self {
            expect_masked,
            compressed: false,
            max_frame_size: max_frame_size as u64,
            head: [0; MAX_HEAD],
            head_len: 0,
            frame: None,
            control: Vec::new(),
        }
    }

    /// permessage-deflate was negotiated (RFC 7692 §6): RSV1 is allowed on the first frame
    /// of a data message, nowhere else.
    pub fn compressed(mut self, compressed: bool) -> Self {
        self.compressed = compressed;
        self
    }

    /// True between the first and the last piece of a data frame: nothing else may be written
    /// to the peer the frame is going to until it ends.
    pub fn in_data_frame(&self) -> bool {
        // Until a first payload byte has gone out, not even the header has (it travels with
        // the first piece), so nothing is in the middle yet.
        self.frame
            .is_some_and(|(head, done)| !head.opcode.is_control() && done > 0)
    }

    /// The payload of the control frame [`Piece::Control`] announced, unmasked.
    pub fn control(&self, head: &Head) -> &[u8] {
        &self.control[..head.len as usize]
    }

    /// The next piece in `buf[*pos..]`, advancing `pos`; `None` when the rest must wait for
    /// more bytes (they are kept here if they are part of a header or control payload).
    #[inline(always)]
    pub fn next(&mut self, buf: &[u8], pos: &mut usize) -> Result<Option<Piece>, Failure> {
        // Taken, not copied: `payload` puts the frame back only while it is unfinished, so
        // a frame that arrived whole (the common case) never touches `self.frame`.
        if let Some((head, done)) = self.frame.take() {
            return Ok(self.payload(head, done, 0, buf, pos));
        }
        if *pos == buf.len() {
            return Ok(None);
        }
        let carried = self.head_len > 0;
        let Some((head, used)) = self.parse_head(buf, pos)? else {
            return Ok(None);
        };
        *pos += used;
        let head_here = if carried { 0 } else { used };
        if head.mask.is_some() != self.expect_masked {
            return Err(Failure::protocol(if self.expect_masked {
                "client frames must be masked"
            } else {
                "server frames must not be masked"
            }));
        }
        if head.rsv1
            && (!self.compressed || head.opcode.is_control() || head.opcode == OpCode::Continuation)
        {
            return Err(Failure::protocol("reserved bits set"));
        }
        if head.len > self.max_frame_size {
            return Err(Failure {
                code: frames::TOO_BIG,
                reason: "message too big",
            });
        }
        if head.len == 0 && !head.opcode.is_control() {
            // An empty data frame has no payload piece to carry its header.
            return Ok(Some(Piece::Data {
                head,
                offset: 0,
                range: *pos..*pos,
                end: true,
                head_here,
            }));
        }
        Ok(self.payload(head, 0, head_here, buf, pos))
    }

    /// Parses a header from the bytes carried over plus `buf[*pos..]`. Returns how many bytes
    /// of `buf` it used.
    #[inline(always)]
    fn parse_head(&mut self, buf: &[u8], pos: &usize) -> Result<Option<(Head, usize)>, Failure> {
        let rest = &buf[*pos..];
        if self.head_len == 0 {
            if let Some(found) = Head::parse(rest)? {
                return Ok(Some(found));
            }
            // Keep the incomplete header; it is at most MAX_HEAD - 1 bytes.
            self.head[..rest.len()].copy_from_slice(rest);
            self.head_len = rest.len();
            return Ok(None);
        }
        let take = (MAX_HEAD - self.head_len).min(rest.len());
        self.head[self.head_len..self.head_len + take].copy_from_slice(&rest[..take]);
        match Head::parse(&self.head[..self.head_len + take])? {
            Some((head, n)) => {
                let used = n - self.head_len;
                self.head_len = 0;
                Ok(Some((head, used)))
            }
            None => {
                self.head_len += take;
                Ok(None)
            }
        }
    }

    /// The next piece of the frame `head`, of which `done` bytes came before (`head_here`:
    /// see [`Piece::Data`]); puts the frame back in `self.frame` (taken by the caller) while
    /// it is unfinished.
    #[inline(always)]
    fn payload(
        &mut self,
        head: Head,
        done: u64,
        head_here: usize,
        buf: &[u8],
        pos: &mut usize,
    ) -> Option<Piece> {
        let available = (buf.len() - *pos) as u64;
        let take = (head.len - done).min(available) as usize;
        let start = *pos;
        *pos += take;
        let now = done + take as u64;
        let end = now == head.len;
        if !end {
            self.frame = Some((head, now));
        }
        if head.opcode.is_control() {
            if done == 0 {
                self.control.clear();
            }
            self.control.extend_from_slice(&buf[start..*pos]);
            if !end {
                return None;
            }
            if let Some(key) = head.mask {
                apply_mask(&mut self.control, key, 0);
            }
            return Some(Piece::Control(head));
        }
        if take == 0 {
            return None;
        }
        Some(Piece::Data {
            head,
            offset: done,
            range: start..*pos,
            end,
            head_here,
        })
    }
}

/// Collects output in the buffer that input was read into, in place. Pieces are written
/// right where they are when they follow each other (the common case: a read of whole
/// frames that are all forwarded costs no copy); otherwise they are moved down to the end of
/// what is collected so far. Output never overtakes input: a written header is never longer
/// than the one it replaces, and reads leave [`MAX_HEAD`] bytes of headroom for a header that
/// arrived in an earlier read.
#[derive(Default)]
pub struct Output {
    range: Option<Range<usize>>,
}

impl Output {
    /// Appends `head` followed by the bytes at `payload`.
    #[inline(always)]
    pub fn push(&mut self, buf: &mut [u8], head: &[u8], payload: Range<usize>) {
        let here = payload.start - head.len();
        let at = match &self.range {
            None => here,
            Some(r) => r.end,
        };
        buf[at..at + head.len()].copy_from_slice(head);
        let body = at + head.len();
        if body != payload.start {
            buf.copy_within(payload.clone(), body);
        }
        let end = body + payload.len();
        let start = self.range.as_ref().map_or(at, |r| r.start);
        self.range = Some(start..end);
    }

    /// What was collected, and a fresh start.
    pub fn take(&mut self) -> Range<usize> {
        self.range.take().unwrap_or(0..0)
    }

    pub fn is_empty(&self) -> bool {
        self.range.as_ref().is_none_or(|r| r.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(head: Head, payload: &[u8]) -> Vec<u8> {
        let mut h = [0u8; MAX_HEAD];
        let n = head.encode(&mut h);
        let mut out = h[..n].to_vec();
        let mut body = payload.to_vec();
        if let Some(key) = head.mask {
            apply_mask(&mut body, key, 0);
        }
        out.extend_from_slice(&body);
        out
    }

    /// Feeds `wire` in pieces of `step` bytes and returns (frames as (head, payload), error).
    fn decode(wire: &[u8], step: usize, masked: bool) -> (Vec<(Head, Vec<u8>)>, Option<Failure>) {
        let mut d = Decoder::new(masked, 1 << 20);
        let mut frames = Vec::new();
        let mut current: Vec<u8> = Vec::new();
        let mut started = false;
        for chunk in wire.chunks(step) {
            let mut buf = chunk.to_vec();
            let mut pos = 0;
            loop {
                match d.next(&buf, &mut pos) {
                    Ok(Some(Piece::Data {
                        head,
                        offset,
                        range,
                        end,
                        ..
                    })) => {
                        assert_eq!(offset as usize, current.len());
                        // Exactly one piece starts each frame (it carries the header out).
                        assert_eq!(offset == 0, !started, "one start per frame");
                        started = !end;
                        if let Some(key) = head.mask {
                            apply_mask(&mut buf[range.clone()], key, offset);
                        }
                        current.extend_from_slice(&buf[range]);
                        if end {
                            frames.push((head, std::mem::take(&mut current)));
                        }
                    }
                    Ok(Some(Piece::Control(head))) => {
                        frames.push((head, d.control(&head).to_vec()));
                    }
                    Ok(None) => break,
                    Err(f) => return (frames, Some(f)),
                }
            }
        }
        (frames, None)
    }

    #[test]
    fn frames_survive_any_split() {
        let key = Some([9, 8, 7, 6]);
        let big: Vec<u8> = (0..70_000).map(|i| (i % 251) as u8).collect();
        let sent = [
            (Head::new(false, OpCode::Text, key, 3), b"hel".to_vec()),
            (Head::new(true, OpCode::Ping, key, 4), b"ping".to_vec()),
            (
                Head::new(true, OpCode::Continuation, key, 2),
                b"lo".to_vec(),
            ),
            (Head::new(true, OpCode::Binary, key, 0), Vec::new()),
            (
                Head::new(true, OpCode::Binary, key, 300),
                big[..300].to_vec(),
            ),
            (Head::new(true, OpCode::Binary, key, big.len()), big.clone()),
            (Head::new(true, OpCode::Close, key, 2), vec![3, 232]),
        ];
        let wire: Vec<u8> = sent.iter().flat_map(|(h, p)| encode(*h, p)).collect();
        for step in [1, 2, 3, 7, 13, 14, 100, 4096, wire.len()] {
            let (got, err) = decode(&wire, step, true);
            assert!(err.is_none(), "step {step}: {err:?}");
            assert_eq!(got, sent.to_vec(), "step {step}");
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let cases: [(&[u8], bool, &str); 6] = [
            (&[0x82, 0x00], true, "client frames must be masked"),
            (
                &[0x82, 0x80, 1, 2, 3, 4],
                false,
                "server frames must not be masked",
            ),
            (&[0xc2, 0x00], false, "reserved bits set"),
            (&[0x83, 0x00], false, "unknown opcode"),
            (&[0x09, 0x00], false, "fragmented control frame"),
            (&[0x89, 0x7e, 0x00, 0x7e], false, "control frame too long"),
        ];
        for (wire, masked, reason) in cases {
            let (_, err) = decode(wire, wire.len(), masked);
            assert_eq!(err.map(|f| f.reason), Some(reason), "{wire:?}");
        }
        // A 64-bit length with its top bit set is not a length (RFC 6455 §5.2).
        let mut d = Decoder::new(false, usize::MAX);
        let huge = [0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            d.next(&huge, &mut 0).unwrap_err().reason,
            "frame length has its top bit set"
        );
        let mut d = Decoder::new(false, 10);
        let err = d.next(&[0x82, 11], &mut 0).unwrap_err();
        assert_eq!(err.code, frames::TOO_BIG);
    }

    #[test]
    fn encoded_len_is_what_encode_writes() {
        for len in [0, 125, 126, 65_535, 65_536] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let head = Head::new(true, OpCode::Binary, mask, len);
                let mut out = [0u8; MAX_HEAD];
                assert_eq!(head.encoded_len(), head.encode(&mut out), "{head:?}");
            }
        }
    }

    #[test]
    fn output_compacts_in_place() {
        let mut buf = *b"..HHabcHHdefxyz";
        let mut out = Output::default();
        out.push(&mut buf, b"hh", 4..7);
        // The next piece's header was dropped: its payload moves down.
        out.push(&mut buf, b"", 9..12);
        out.push(&mut buf, b"k", 12..15);
        let r = out.take();
        assert_eq!(&buf[r], b"hhabcdefkxyz");
    }
}
