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
            let (head, offset, range, end) = match self.frames.next(buf, pos) {
                Ok(Some(Piece::Data {
                    head,
                    offset,
                    range,
                    end,
                })) => (head, offset, range, end),
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
                        self.remask = rand::random();
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
                    // The header travels with the frame's first piece.
                    let mut h = [0u8; MAX_HEAD];
                    let n = if offset == 0 {
                        let mask = mask.then_some(self.remask);
                        Head { mask, ..head }.encode(&mut h)
                    } else {
                        0
                    };
                    out.push(buf, &h[..n], range);
                }
            }
        }
    }
}
