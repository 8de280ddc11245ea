//! Checks on frames that fastwebsockets 0.10 leaves to its user (SPEC §4, RFC 6455 §5):
//! client frames must be masked and upstream frames must not be; Close and Pong frames are
//! limited to 125 bytes like Ping; continuation frames must follow an unfinished message;
//! a message may not exceed the route's limit across its fragments; close codes and reasons
//! must be valid; text split over fragments must still be UTF-8.

use fastwebsockets::{Frame, OpCode, WebSocketError};

/// A close code and reason the gateway sends when it fails a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub code: u16,
    pub reason: &'static str,
}

pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const TOO_BIG: u16 = 1009;
pub const INTERNAL_ERROR: u16 = 1011;
pub const GOING_AWAY: u16 = 1001;
pub const NORMAL: u16 = 1000;
/// Logged for a Close frame that carried no code (RFC 6455 §7.4.1); never sent.
pub const NO_STATUS: u16 = 1005;

const fn failure(code: u16, reason: &'static str) -> Failure {
    Failure { code, reason }
}

/// What a failed `read_frame` means for the connection.
pub enum ReadError {
    /// The peer is gone: EOF or an I/O error without a Close frame.
    Vanished(String),
    /// The peer broke the protocol; fail the connection with this code.
    Protocol(Failure),
}

pub fn classify(error: WebSocketError) -> ReadError {
    use WebSocketError as E;
    match error {
        E::UnexpectedEOF => ReadError::Vanished("connection closed without a Close frame".into()),
        E::IoError(e) => ReadError::Vanished(e.to_string()),
        E::SendError(e) => ReadError::Vanished(e.to_string()),
        E::ConnectionClosed => ReadError::Vanished("connection closed".into()),
        E::FrameTooLarge => ReadError::Protocol(failure(TOO_BIG, "message too big")),
        E::InvalidUTF8 => ReadError::Protocol(failure(INVALID_PAYLOAD, "text is not valid UTF-8")),
        E::ReservedBitsNotZero => ReadError::Protocol(failure(PROTOCOL_ERROR, "reserved bits set")),
        E::ControlFrameFragmented => {
            ReadError::Protocol(failure(PROTOCOL_ERROR, "fragmented control frame"))
        }
        E::PingFrameTooLarge => {
            ReadError::Protocol(failure(PROTOCOL_ERROR, "control frame too long"))
        }
        E::InvalidValue => ReadError::Protocol(failure(PROTOCOL_ERROR, "unknown opcode")),
        _ => ReadError::Protocol(failure(PROTOCOL_ERROR, "protocol error")),
    }
}

/// Whether the frame arrived with a masking key. fastwebsockets keeps the key private but
/// writes it into the header it would format, so the header is the way to ask.
pub fn is_masked(frame: &mut Frame<'_>) -> bool {
    let mut head = [0u8; 16];
    frame.fmt_head(&mut head);
    head[1] & 0x80 != 0
}

/// RFC 6455 §5.5: every control frame, not only Ping, carries at most 125 bytes.
pub fn check_control(frame: &Frame<'_>) -> Result<(), Failure> {
    if matches!(frame.opcode, OpCode::Close | OpCode::Ping | OpCode::Pong)
        && frame.payload.len() > 125
    {
        return Err(failure(PROTOCOL_ERROR, "control frame too long"));
    }
    Ok(())
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

/// Tracks the message a sequence of data frames belongs to.
pub struct MessageCheck {
    max_message_size: usize,
    current: Option<OpCode>,
    size: usize,
    /// `Some` when text must be checked across fragments (tcp upstreams, where the gateway
    /// is the endpoint that RFC 6455 §8.1 asks to validate).
    utf8: Option<Utf8Stream>,
}

impl MessageCheck {
    pub fn new(max_message_size: usize, validate_utf8: bool) -> Self {
        Self {
            max_message_size,
            current: None,
            size: 0,
            utf8: validate_utf8.then(Utf8Stream::default),
        }
    }

    /// Checks one data frame (Text, Binary or Continuation) against the message so far.
    pub fn check(&mut self, frame: &Frame<'_>) -> Result<(), Failure> {
        let opcode = match (frame.opcode, self.current) {
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
        self.size = self.size.saturating_add(frame.payload.len());
        if self.size > self.max_message_size {
            return Err(failure(TOO_BIG, "message too big"));
        }
        // fastwebsockets already validated a Text frame that is a whole message.
        let whole_text = frame.opcode == OpCode::Text && frame.fin;
        if let (OpCode::Text, false, Some(utf8)) = (opcode, whole_text, self.utf8.as_mut())
            && !utf8.feed(&frame.payload, frame.fin)
        {
            return Err(failure(INVALID_PAYLOAD, "text is not valid UTF-8"));
        }
        self.current = if frame.fin { None } else { Some(opcode) };
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

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame<'static> {
        Frame::new(fin, opcode, None, payload.to_vec().into())
    }

    #[test]
    fn message_sequence_and_size() {
        let mut m = MessageCheck::new(10, true);
        assert!(m.check(&frame(false, OpCode::Text, b"12345")).is_ok());
        assert!(m.check(&frame(false, OpCode::Continuation, b"678")).is_ok());
        assert_eq!(
            m.check(&frame(true, OpCode::Continuation, b"901"))
                .unwrap_err()
                .code,
            TOO_BIG
        );

        let mut m = MessageCheck::new(10, true);
        assert_eq!(
            m.check(&frame(true, OpCode::Continuation, b"x"))
                .unwrap_err()
                .code,
            PROTOCOL_ERROR
        );
        assert!(m.check(&frame(false, OpCode::Binary, b"x")).is_ok());
        assert_eq!(
            m.check(&frame(true, OpCode::Binary, b"x"))
                .unwrap_err()
                .code,
            PROTOCOL_ERROR
        );

        let mut m = MessageCheck::new(100, true);
        assert!(m.check(&frame(false, OpCode::Text, &[0xe2, 0x9c])).is_ok());
        assert!(m.check(&frame(true, OpCode::Continuation, &[0x93])).is_ok());
        assert!(m.check(&frame(false, OpCode::Text, &[0xe2])).is_ok());
        assert_eq!(
            m.check(&frame(true, OpCode::Continuation, &[]))
                .unwrap_err()
                .code,
            INVALID_PAYLOAD
        );
    }

    #[test]
    fn mask_bit_is_visible() {
        let mut masked = Frame::new(
            true,
            OpCode::Binary,
            Some([1, 2, 3, 4]),
            vec![0u8; 3].into(),
        );
        assert!(is_masked(&mut masked));
        let mut plain = frame(true, OpCode::Binary, b"abc");
        assert!(!is_masked(&mut plain));
    }
}
