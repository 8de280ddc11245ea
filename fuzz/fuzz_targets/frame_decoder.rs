//! Frame decoding as the relay does it (`relay::frames::Incoming` over
//! `relay::codec::Decoder`): bytes from a peer, delivered in arbitrary reads.
//!
//! Checks that no input panics, that every piece keeps the `Decoder::next` contract
//! (ranges inside the read, in order, offsets counting the frame's payload, control
//! payloads of the announced length), and that splitting the same bytes into different
//! reads changes nothing: the same frames (opcode, fin, payload once unmasked), the same
//! control payloads, and the same final failure or none.
//!
//! Input: `[flags, max_frame, max_message, n, len_1 .. len_n, wire ..]`.
//! flags bit 0: client side (frames must be masked); bit 1: validate UTF-8; bit 2: no frame
//! size limit; bit 3: no message size limit; bit 4: permessage-deflate negotiated (RSV1
//! allowed on a message's first frame). `n % 9` read lengths are then cycled to cut
//! `wire` into reads (zero-length reads included); with none, or all zero, the second run
//! feeds one byte per read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::relay::codec::{Head, OpCode, Piece, apply_mask};
use wsgate::relay::frames::{Failure, Incoming, check_close};

#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// A data frame: its opcode, fin bit and the payload that arrived (unmasked); `done`
    /// once its last piece came.
    Data {
        opcode: OpCode,
        fin: bool,
        payload: Vec<u8>,
        done: bool,
    },
    /// A control frame, its payload, and what `check_close` said of a Close.
    Control {
        opcode: OpCode,
        payload: Vec<u8>,
        close: Option<Result<Option<u16>, Failure>>,
    },
}

struct Limits {
    expect_masked: bool,
    validate_utf8: bool,
    compressed: bool,
    max_frame: usize,
    max_message: usize,
}

/// Feeds `reads` one after the other, each as a new buffer, as the relay does.
fn run<'a>(
    limits: &Limits,
    reads: impl Iterator<Item = &'a [u8]>,
) -> (Vec<Event>, Option<Failure>) {
    let mut incoming = Incoming::new(
        limits.expect_masked,
        limits.validate_utf8,
        limits.compressed,
        limits.max_frame,
        limits.max_message,
    );
    let mut events = Vec::new();
    for read in reads {
        let mut buf = read.to_vec();
        let mut pos = 0;
        loop {
            let before = pos;
            let piece = match incoming.next(&buf, &mut pos) {
                Ok(Some(piece)) => piece,
                Ok(None) => {
                    assert!(before <= pos && pos <= buf.len());
                    break;
                }
                Err(failure) => return (events, Some(failure)),
            };
            assert!(
                before <= pos && pos <= buf.len(),
                "pos moved backwards or past the read"
            );
            match piece {
                Piece::Data {
                    head,
                    offset,
                    range,
                    end,
                    head_here,
                } => {
                    assert!(!head.opcode.is_control());
                    if head_here > 0 {
                        // The relay reuses these bytes as the outgoing header: they must be
                        // exactly this frame's header, whole, right before its payload.
                        assert_eq!(offset, 0, "a header before a later piece");
                        let at = range.start - head_here;
                        assert!(at >= before, "a header from an earlier step");
                        assert_eq!(
                            Head::parse(&buf[at..range.start]),
                            Ok(Some((head, head_here))),
                            "the bytes before the payload are not its header"
                        );
                    }
                    assert!(
                        range.start >= before && range.end == pos,
                        "{range:?} {before} {pos}"
                    );
                    assert!(
                        !range.is_empty() || (head.len == 0 && end),
                        "an empty piece of a non-empty frame"
                    );
                    assert!(offset + range.len() as u64 <= head.len);
                    assert_eq!(end, offset + range.len() as u64 == head.len);
                    assert_eq!(incoming.decoder.in_data_frame(), !end);
                    if offset == 0 {
                        events.push(Event::Data {
                            opcode: head.opcode,
                            fin: head.fin,
                            payload: Vec::new(),
                            done: false,
                        });
                    }
                    let Some(Event::Data { payload, done, .. }) = events.last_mut() else {
                        panic!("a continued piece without its frame's first piece");
                    };
                    assert!(!*done);
                    assert_eq!(payload.len() as u64, offset, "pieces out of order");
                    if let Some(key) = head.mask {
                        apply_mask(&mut buf[range.clone()], key, offset);
                    }
                    let checked = incoming
                        .message
                        .payload(&buf[range.clone()], end && head.fin);
                    payload.extend_from_slice(&buf[range]);
                    *done = end;
                    if let Err(failure) = checked {
                        // How much of the failing frame had been seen depends on where the
                        // reads were cut; only the failure itself must agree.
                        events.pop();
                        return (events, Some(failure));
                    }
                }
                Piece::Control(head) => {
                    assert!(head.opcode.is_control() && head.fin && head.len <= 125);
                    assert!(!incoming.decoder.in_data_frame());
                    let payload = incoming.decoder.control(&head).to_vec();
                    assert_eq!(payload.len() as u64, head.len);
                    let close = (head.opcode == OpCode::Close).then(|| check_close(&payload));
                    events.push(Event::Control {
                        opcode: head.opcode,
                        payload,
                        close,
                    });
                }
            }
        }
    }
    (events, None)
}

fuzz_target!(|data: &[u8]| {
    let [flags, max_frame, max_message, n, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*n % 9).min(rest.len());
    let (lens, wire) = rest.split_at(n);
    let limits = Limits {
        expect_masked: flags & 1 != 0,
        validate_utf8: flags & 2 != 0,
        compressed: flags & 16 != 0,
        max_frame: if flags & 4 != 0 {
            usize::MAX
        } else {
            usize::from(*max_frame) * 8
        },
        max_message: if flags & 8 != 0 {
            usize::MAX
        } else {
            usize::from(*max_message) * 16
        },
    };

    let whole = run(&limits, std::iter::once(wire));

    let split: Vec<&[u8]> = if lens.iter().all(|&l| l == 0) {
        wire.chunks(1).collect()
    } else {
        let mut reads = Vec::new();
        let mut at = 0;
        for &len in lens.iter().cycle() {
            if at == wire.len() {
                break;
            }
            let end = (at + usize::from(len)).min(wire.len());
            reads.push(&wire[at..end]);
            at = end;
        }
        reads
    };
    let pieces = run(&limits, split.into_iter());
    assert_eq!(whole, pieces, "splitting the reads changed the outcome");
});
