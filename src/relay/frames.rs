//! Checks the relay makes on frames beyond their headers (SPEC §4, RFC 6455 §5, §7): close
//! codes and reasons must be valid; continuation frames must follow an unfinished message; a
//! message may not exceed the route's limit across its fragments; text must be UTF-8, in
//! both directions and on every route (SPEC §4, round 2), even when split over fragments at
//! any byte.

use super::codec::{Decoder, Head, OpCode, Piece};

/// A close code and reason the gateway sends when it fails a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub code: u16,
    pub reason: &'static str,
}

impl Failure {
    pub const fn protocol(reason: &'static str) -> Self {
        failure(PROTOCOL_ERROR, reason)
    }
}

pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const TOO_BIG: u16 = 1009;
pub const INTERNAL_ERROR: u16 = 1011;
pub const GOING_AWAY: u16 = 1001;
pub const NORMAL: u16 = 1000;
/// Logged for a Close frame that carried no code (RFC 6455 §7.4.1); never sent.
pub const NO_STATUS: u16 = 1005;

/// Text that is not UTF-8 (RFC 6455 §8.1), seen in passing or once inflated.
pub const NOT_UTF8: Failure = failure(INVALID_PAYLOAD, "text is not valid UTF-8");

const fn failure(code: u16, reason: &'static str) -> Failure {
    Failure { code, reason }
}

/// Validates a Close payload (RFC 6455 §5.5.1, §7.4) and returns its code, if any.
pub fn check_close(payload: &[u8]) -> Result<Option<u16>, Failure> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(failure(
            PROTOCOL_ERROR,
            "close frame with a one-byte payload",
        )),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_close_code(code) {
                return Err(failure(PROTOCOL_ERROR, "invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(failure(INVALID_PAYLOAD, "close reason is not valid UTF-8"));
            }
            Ok(Some(code))
        }
    }
}

/// Codes a peer may put on the wire: the registered ones that are not reserved for local
/// use (1005, 1006, 1015), and the 3000–4999 ranges for libraries and applications.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A side's incoming frames: the decoder, and the message checks every data frame's header
/// goes through before any of its payload is passed on.
pub struct Incoming {
    pub decoder: Decoder,
    pub message: MessageCheck,
}

impl Incoming {
    /// `expect_masked` for frames from a client; `validate_utf8` to check text messages;
    /// `compressed` when permessage-deflate was negotiated (RSV1 allowed, compressed text
    /// passes unchecked: its UTF-8 can only be seen after inflating, which a pass-through
    /// relay does not do).
    pub fn new(
        expect_masked: bool,
        validate_utf8: bool,
        compressed: bool,
        max_frame: usize,
        max_message: usize,
    ) -> Self {
        Self {
            decoder: Decoder::new(expect_masked, max_frame).compressed(compressed),
            message: MessageCheck::new(max_message, validate_utf8),
        }
    }

    /// The next piece in `buf[*pos..]`, checked; see [`Decoder::next`].
    #[inline(always)]
    pub fn next(&mut self, buf: &[u8], pos: &mut usize) -> Result<Option<Piece>, Failure> {
        let piece = self.decoder.next(buf, pos);
        if let Ok(Some(Piece::Data {
            head, offset: 0, ..
        })) = &piece
        {
            self.message.start(head)?;
        }
        piece
    }
}

/// Tracks the message a sequence of data frames belongs to.
pub struct MessageCheck {
    max_message_size: u64,
    current: Option<OpCode>,
    size: u64,
    /// The frame being received belongs to a text message.
    text: bool,
    /// `Some` when text is checked (RFC 6455 §8.1).
    utf8: Option<Utf8Stream>,
    /// The message is compressed (RSV1 on its first frame): `Some(true)` for text.
    compressed: Option<bool>,
}

impl MessageCheck {
    pub fn new(max_message_size: usize, validate_utf8: bool) -> Self {
        Self {
            max_message_size: max_message_size as u64,
            current: None,
            size: 0,
            text: false,
            utf8: validate_utf8.then(Utf8Stream::default),
            compressed: None,
        }
    }

    /// Checks the header of a data frame (Text, Binary or Continuation) against the message
    /// so far, before any of its payload is passed on.
    #[inline(always)]
    pub fn start(&mut self, head: &Head) -> Result<(), Failure> {
        let opcode = match (head.opcode, self.current) {
            (OpCode::Continuation, Some(op)) => op,
            (OpCode::Continuation, None) => {
                return Err(failure(
                    PROTOCOL_ERROR,
                    "continuation frame without a message",
                ));
            }
            (op, None) => {
                self.size = 0;
                op
            }
            (_, Some(_)) => {
                return Err(failure(
                    PROTOCOL_ERROR,
                    "new message before the last one finished",
                ));
            }
        };
        self.size = self.size.saturating_add(head.len);
        if self.size > self.max_message_size {
            return Err(failure(TOO_BIG, "message too big"));
        }
        if head.opcode != OpCode::Continuation {
            // A compressed message's text is checked by whoever inflates it.
            self.text = opcode == OpCode::Text && !head.rsv1;
            self.compressed = head.rsv1.then_some(opcode == OpCode::Text);
        }
        self.current = if head.fin { None } else { Some(opcode) };
        Ok(())
    }

    /// The frame being received belongs to a text message that is checked: its pieces must
    /// be passed to [`MessageCheck::payload`] unmasked.
    pub fn checks_text(&self) -> bool {
        self.text && self.utf8.is_some()
    }

    /// The message being received is compressed (permessage-deflate): `Some(true)` when it
    /// is text, whose UTF-8 is then checked by whoever inflates it.
    pub fn compressed(&self) -> Option<bool> {
        self.compressed
    }

    /// Checks a piece of payload, unmasked; `last` when it ends the message.
    pub fn payload(&mut self, piece: &[u8], last: bool) -> Result<(), Failure> {
        if let (true, Some(utf8)) = (self.text, self.utf8.as_mut())
            && !utf8.feed(piece, last)
        {
            return Err(NOT_UTF8);
        }
        Ok(())
    }
}

/// Incremental UTF-8 validation for text split over frames at arbitrary byte positions.
#[derive(Default)]
pub struct Utf8Stream {
    pending: [u8; 4],
    pending_len: usize,
}

impl Utf8Stream {
    /// Feeds the next piece; `last` marks the end of the message. False when invalid.
    pub fn feed(&mut self, mut data: &[u8], last: bool) -> bool {
        if self.pending_len > 0 {
            let width = match self.pending[0] {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => return false,
            };
            let take = (width - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < width {
                // Still incomplete; only fine if more is coming. Check the prefix so far.
                return !last && prefix_is_valid(&self.pending[..self.pending_len]);
            }
            if std::str::from_utf8(&self.pending[..width]).is_err() {
                return false;
            }
            self.pending_len = 0;
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                let tail = &data[e.valid_up_to()..];
                if last {
                    return false;
                }
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len();
                true
            }
            Err(_) => false,
        }
    }
}

/// True when `bytes` can still begin a valid UTF-8 sequence.
fn prefix_is_valid(bytes: &[u8]) -> bool {
    match std::str::from_utf8(bytes) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_anywhere() {
        let text = "héllo ✓ 𝄞 end".as_bytes();
        for a in 0..text.len() {
            for b in a..text.len() {
                let mut s = Utf8Stream::default();
                assert!(s.feed(&text[..a], false), "{a}");
                assert!(s.feed(&text[a..b], false), "{a} {b}");
                assert!(s.feed(&text[b..], true), "{a} {b}");
            }
        }
    }

    #[test]
    fn utf8_invalid_detected() {
        let mut s = Utf8Stream::default();
        assert!(!s.feed(&[0xff], false));
        let mut s = Utf8Stream::default();
        assert!(s.feed(&[0xe2, 0x9c], false));
        assert!(!s.feed(&[], true), "truncated sequence at the end");
        let mut s = Utf8Stream::default();
        assert!(s.feed(&[0xe2], false));
        assert!(!s.feed(&[0x28, 0xa1], false), "bad continuation byte");
        let mut s = Utf8Stream::default();
        assert!(!s.feed(&[0xed, 0xa0, 0x80], true), "surrogate");
    }

    #[test]
    fn close_codes() {
        assert_eq!(check_close(&[]), Ok(None));
        assert_eq!(check_close(&[0x03, 0xe8]), Ok(Some(1000)));
        assert_eq!(check_close(&[0x0f, 0xa0, b'o', b'k']), Ok(Some(4000)));
        assert!(check_close(&[0x03]).is_err());
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(check_close(&code.to_be_bytes()).is_err(), "{code}");
        }
        assert_eq!(
            check_close(&[0x03, 0xe8, 0xff]).unwrap_err().code,
            INVALID_PAYLOAD
        );
    }

    /// Checks a whole frame as the relay does: header, then its payload in one piece.
    fn check(
        m: &mut MessageCheck,
        fin: bool,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<(), Failure> {
        m.start(&Head::new(fin, opcode, None, payload.len()))?;
        m.payload(payload, fin)
    }

    #[test]
    fn message_sequence_and_size() {
        let mut m = MessageCheck::new(10, true);
        assert!(check(&mut m, false, OpCode::Text, b"12345").is_ok());
        assert!(check(&mut m, false, OpCode::Continuation, b"678").is_ok());
        assert_eq!(
            check(&mut m, true, OpCode::Continuation, b"901")
                .unwrap_err()
                .code,
            TOO_BIG
        );

        let mut m = MessageCheck::new(10, true);
        assert_eq!(
            check(&mut m, true, OpCode::Continuation, b"x")
                .unwrap_err()
                .code,
            PROTOCOL_ERROR
        );
        assert!(check(&mut m, false, OpCode::Binary, b"x").is_ok());
        assert_eq!(
            check(&mut m, true, OpCode::Binary, b"x").unwrap_err().code,
            PROTOCOL_ERROR
        );

        let mut m = MessageCheck::new(100, true);
        assert!(check(&mut m, false, OpCode::Text, &[0xe2, 0x9c]).is_ok());
        assert!(check(&mut m, true, OpCode::Continuation, &[0x93]).is_ok());
        assert!(check(&mut m, false, OpCode::Text, &[0xe2]).is_ok());
        assert_eq!(
            check(&mut m, true, OpCode::Continuation, &[])
                .unwrap_err()
                .code,
            INVALID_PAYLOAD
        );
        // Binary is never checked; text only where asked.
        assert!(check(&mut m, true, OpCode::Binary, &[0xff]).is_ok());
        let mut m = MessageCheck::new(100, false);
        assert!(check(&mut m, true, OpCode::Text, &[0xff]).is_ok());
    }
}
