//! The forwarding step both relays share: the data frames of one read, checked and rewritten
//! in place for the side they go to, up to the next control frame.
//!
//! A pump reads, then calls [`Forward::data`] until the read is used up; at each control
//! frame it stops so that the pump can write the data gathered before it and then handle the
//! frame (what a control frame means differs: a ws upstream gets it passed on, a tcp upstream
//! never sees one). Synchronous on purpose: it holds nothing across a wait, so it adds nothing
//! to a held connection's state.

use super::codec::{Head, MAX_HEAD, Output, Piece, apply_mask};
use super::frames::{Failure, Incoming};

/// What the side written to receives.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reframe {
    /// Frames, each with its header (ws upstreams): masked afresh toward an upstream,
    /// unmasked toward a client.
    Frames { mask: bool },
    /// The payload bytes only (tcp and unix upstreams).
    Payload,
    /// The payload bytes, and compressed messages (permessage-deflate terminated by the
    /// gateway) stopped at for the pump to inflate (tcp and unix routes with `compression`).
    Inflated,
}

/// Where a run of data pieces stopped.
pub(super) enum Stop {
    /// A control frame, whole; the data before it is in the output, its payload is
    /// `frames.decoder.control(&head)`.
    Control(Head),
    /// A piece of a compressed message (`Reframe::Inflated`), unmasked and checked as a
    /// frame but not counted, at `buf[range]`; `fin` when it ends its message. The data
    /// before it is in the output.
    Compressed {
        range: std::ops::Range<usize>,
        fin: bool,
    },
    /// The read is used up.
    End,
    /// The side read from broke the protocol. `cut` when the offending frame is partly out
    /// already (with an earlier read): the side written to is then in the middle of a frame.
    Violated(Failure, bool),
}

/// One direction's frames: their decoder and message checks, and how they are passed on.
pub(super) struct Forward {
    pub(super) frames: Incoming,
    reframe: Reframe,
    /// The masking key of the frame being passed on toward an upstream.
    remask: [u8; 4],
}

impl Forward {
    pub(super) fn new(frames: Incoming, reframe: Reframe) -> Self {
        Self {
            frames,
            reframe,
            remask: [0; 4],
        }
    }

    /// Runs through the data pieces of `buf[*pos..]`: each is unmasked, checked (UTF-8 of
    /// text, RFC 6455 §8.1), counted (`count(bytes, message_done)`) and, when `deliver`,
    /// rewritten for the other side and appended to `out`. Undelivered data (the other side
    /// was sent a Close, or is gone) is still checked and counted: it is what this side sent.
    pub(super) fn data(
        &mut self,
        buf: &mut [u8],
        pos: &mut usize,
        out: &mut Output,
        deliver: bool,
        mut count: impl FnMut(usize, bool),
    ) -> Stop {
        loop {
            let (head, offset, range, end, head_here) = match self.frames.next(buf, pos) {
                Ok(Some(Piece::Data {
                    head,
                    offset,
                    range,
                    end,
                    head_here,
                })) => (head, offset, range, end, head_here),
                Ok(Some(Piece::Control(head))) => return Stop::Control(head),
                Ok(None) => return Stop::End,
                Err(f) => return Stop::Violated(f, false),
            };
            let fin = end && head.fin;
            let payload = &mut buf[range.clone()];
            if self.reframe == Reframe::Inflated && self.frames.message.compressed().is_some() {
                // Its text, its size and its count are the inflated message's: the pump's.
                if let Some(key) = head.mask {
                    apply_mask(payload, key, offset);
                }
                if deliver {
                    return Stop::Compressed { range, fin };
                }
                count(range.len(), fin);
                continue;
            }
            let checked = match (self.reframe, head.mask) {
                // Re-masked in one pass, the peer's key and ours combined; text must be
                // checked unmasked, so it takes two.
                (Reframe::Frames { mask: true }, Some(key)) => {
                    if offset == 0 {
                        // A fresh key per frame: reusing the client's would let it choose
                        // the exact bytes on the gateway→upstream link (RFC 6455 §10.3).
                        // One draw of four bytes (an array would take four draws).
                        self.remask = rand::random::<u32>().to_ne_bytes();
                    }
                    if self.frames.message.checks_text() {
                        apply_mask(payload, key, offset);
                        let checked = self.frames.message.payload(payload, fin);
                        apply_mask(payload, self.remask, offset);
                        checked
                    } else {
                        let both = std::array::from_fn(|i| key[i] ^ self.remask[i]);
                        apply_mask(payload, both, offset);
                        Ok(())
                    }
                }
                (_, key) => {
                    if let Some(key) = key {
                        apply_mask(payload, key, offset);
                    }
                    self.frames.message.payload(payload, fin)
                }
            };
            if let Err(f) = checked {
                // A read yields one piece per frame, so a bad piece at offset 0 is a frame
                // none of which went out; past 0, its beginning went with earlier reads.
                return Stop::Violated(f, offset > 0);
            }
            count(range.len(), fin);
            if !deliver {
                continue;
            }
            match self.reframe {
                Reframe::Payload | Reframe::Inflated => out.push(buf, &[], range),
                Reframe::Frames { mask } => {
                    if offset > 0 {
                        out.push(buf, &[], range);
                        continue;
                    }
                    // The header travels with the frame's first piece. It goes out as it
                    // came but for the masking key (which side masks does not change on
                    // the way through), so where it still lies in the buffer, in the
                    // shortest encoding, it is reused in place: a read of whole frames is
                    // then forwarded without moving a byte.
                    let out_head = Head {
                        mask: mask.then_some(self.remask),
                        ..head
                    };
                    if head_here == out_head.encoded_len() {
                        if mask {
                            buf[range.start - 4..range.start].copy_from_slice(&self.remask);
                        }
                        out.push(buf, &[], range.start - head_here..range.end);
                    } else {
                        let mut h = [0u8; MAX_HEAD];
                        let n = out_head.encode(&mut h);
                        out.push(buf, &h[..n], range);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::codec::OpCode;

    /// A frame as a peer puts it on the wire, with its length in `ext` extra bytes (0, 2 or
    /// 8: RFC 6455 asks for the shortest, a careless peer may not use it).
    fn frame(payload: &[u8], ext: usize, key: Option<[u8; 4]>) -> Vec<u8> {
        let mut wire = vec![0x82];
        let m = if key.is_some() { 0x80 } else { 0 };
        match ext {
            0 => wire.push(m | payload.len() as u8),
            2 => {
                wire.push(m | 126);
                wire.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                wire.push(m | 127);
                wire.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        let mut body = payload.to_vec();
        if let Some(key) = key {
            wire.extend_from_slice(&key);
            apply_mask(&mut body, key, 0);
        }
        wire.extend_from_slice(&body);
        wire
    }

    /// Forwards `wire` (read whole, after `MAX_HEAD` bytes of headroom) and returns what
    /// goes out.
    fn forward(wire: &[u8], from_client: bool) -> Vec<u8> {
        forward_reads(&[wire], from_client)
    }

    /// Forwards `reads`, one after the other as a pump reads them, and returns what goes out.
    fn forward_reads(reads: &[&[u8]], from_client: bool) -> Vec<u8> {
        let frames = Incoming::new(from_client, false, false, 1 << 20, 1 << 20);
        let mut fwd = Forward::new(frames, Reframe::Frames { mask: from_client });
        let mut sent = Vec::new();
        for read in reads {
            let mut buf = vec![0u8; MAX_HEAD];
            buf.extend_from_slice(read);
            let (mut pos, mut out) = (MAX_HEAD, Output::default());
            assert!(matches!(
                fwd.data(&mut buf, &mut pos, &mut out, true, |_, _| {}),
                Stop::End
            ));
            sent.extend_from_slice(&buf[out.take()]);
        }
        sent
    }

    /// Splits what went out into (header, payload unmasked) per frame.
    fn read_back(mut wire: &[u8]) -> Vec<(Head, Vec<u8>)> {
        let mut frames = Vec::new();
        while let Some((head, n)) = Head::parse(wire).unwrap() {
            let mut body = wire[n..n + head.len as usize].to_vec();
            if let Some(key) = head.mask {
                apply_mask(&mut body, key, 0);
            }
            frames.push((head, body));
            wire = &wire[n + head.len as usize..];
        }
        assert!(wire.is_empty());
        frames
    }

    #[test]
    fn whole_frames_toward_a_client_go_out_as_they_came() {
        let wire = [frame(b"one", 0, None), frame(&[5; 300], 2, None)].concat();
        assert_eq!(forward(&wire, false), wire);
    }

    #[test]
    fn a_length_in_more_bytes_than_needed_is_written_the_short_way() {
        let wire = [
            frame(b"five!", 2, None),
            frame(b"tiny", 8, None),
            frame(b"ok", 0, None),
        ]
        .concat();
        let out = forward(&wire, false);
        assert_eq!(
            out,
            [
                frame(b"five!", 0, None),
                frame(b"tiny", 0, None),
                frame(b"ok", 0, None)
            ]
            .concat()
        );
    }

    #[test]
    fn a_header_split_across_reads_is_written_whole() {
        let key = Some([1, 2, 3, 4]);
        let wire = [frame(b"first", 0, key), frame(&[3; 300], 2, key)].concat();
        // The second header ends three bytes into the next read: it is carried over, so it
        // cannot be reused where it lies and is written afresh.
        let cut = 6 + 5 + 5;
        let sent = forward_reads(&[&wire[..cut], &wire[cut..]], true);
        let out = read_back(&sent);
        let payloads: Vec<&[u8]> = out.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(payloads, [&b"first"[..], &[3; 300][..]]);
        assert_eq!(sent.len(), (6 + 5) + (8 + 300));
    }

    #[test]
    fn frames_toward_an_upstream_get_a_fresh_key_each() {
        let key = Some([1, 2, 3, 4]);
        let wire = [
            frame(b"hello", 0, key),
            frame(&[7; 200], 2, key),
            frame(b"x", 2, key),
        ]
        .concat();
        let sent = forward(&wire, true);
        // The third had a long-form length; it went out in the short form.
        assert_eq!(sent.len(), (6 + 5) + (8 + 200) + (6 + 1));
        let out = read_back(&sent);
        let payloads: Vec<&[u8]> = out.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(payloads, [&b"hello"[..], &[7; 200][..], &b"x"[..]]);
        for (head, _) in &out {
            assert_eq!(head.opcode, OpCode::Binary);
            assert!(head.mask.is_some_and(|k| k != [1, 2, 3, 4]), "{head:?}");
        }
        assert_ne!(out[0].0.mask, out[1].0.mask, "a key per frame");
    }
}
