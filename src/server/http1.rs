//! The first request of an HTTP/1.1 connection, read without hyper when it is a WebSocket
//! upgrade.
//!
//! Almost every connection a WebSocket gateway accepts carries one request, the upgrade, and
//! then belongs to the relay. Serving that request through hyper's connection machinery (its
//! dispatcher and buffers, the upgrade's channel and box, a second task) was the largest
//! part of a handshake's instructions after the kernel's. So the first head is read and
//! parsed here with httparse (hyper's own parser, with hyper's limits); a `GET` that asks for
//! `Upgrade: websocket` is answered here, and anything else (a page of the web root, a
//! malformed or oversized head) goes to hyper with the bytes read so far put back in front,
//! so hyper answers it exactly as before, and serves the rest of that connection.

use std::io;

use bytes::Bytes;
use http::{Request, Response, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::handshake;

/// hyper's default limit on request header fields; more is hyper's 431.
const MAX_HEADERS: usize = 100;

/// What a first read of a request head gave.
// Lives for one return: a box would be one more allocation per handshake.
#[allow(clippy::large_enum_variant)]
pub(super) enum Head {
    /// A WebSocket upgrade, and the bytes that followed its head.
    Upgrade { request: Request<()>, rest: Vec<u8> },
    /// Anything else, for hyper: the bytes read so far.
    Other(Vec<u8>),
    /// The client closed before a whole head.
    Gone,
}

/// Reads the first request head (up to `max` bytes). Callers bound it in time.
pub(super) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> io::Result<Head> {
    // Enough for a browser's upgrade with a few cookies; grown up to `max` when it is not.
    let mut buf = Vec::with_capacity(max.min(1024));
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= max {
                return Ok(Head::Other(buf)); // hyper answers 431
            }
            buf.reserve_exact((max - buf.len()).min(buf.capacity().max(1024)));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(Head::Gone);
        }
        match parse(&buf) {
            Parsed::Partial => continue,
            Parsed::Other => return Ok(Head::Other(buf)),
            Parsed::Upgrade(request, len) => {
                let rest = buf.split_off(len);
                return Ok(Head::Upgrade { request, rest });
            }
        }
    }
}

#[allow(clippy::large_enum_variant)] // as `Head`
enum Parsed {
    Partial,
    Other,
    Upgrade(Request<()>, usize),
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if head.method != Some("GET") || head.version != Some(1) {
        return Parsed::Other;
    }
    let Some(Ok(uri)) = head.path.map(str::parse::<Uri>) else {
        return Parsed::Other;
    };
    let mut request = Request::new(());
    *request.uri_mut() = uri;
    let map = request.headers_mut();
    map.reserve(head.headers.len());
    for field in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(field.name.as_bytes()),
            http::HeaderValue::from_bytes(field.value),
        ) else {
            return Parsed::Other;
        };
        map.append(name, value);
    }
    if !handshake::wants_upgrade(&request) {
        return Parsed::Other;
    }
    Parsed::Upgrade(request, len)
}

/// Returns when the client ends its side (EOF or an error) before it was answered; bytes it
/// sends meanwhile are added to `rest`, up to `WATCH_MAX`, and then it is no longer read
/// (its bytes wait in the kernel: backpressure).
pub(super) async fn watch<S: AsyncRead + Unpin>(stream: &mut S, rest: &mut Vec<u8>) {
    const WATCH_MAX: usize = 64 << 10;
    while rest.len() < WATCH_MAX {
        rest.reserve(1024);
        match stream.read_buf(rest).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending().await
}

/// Writes a response whole: the 101, or a refusal with its short body, `Content-Length` and
/// `Date` (RFC 9110 §6.6.1; a 101 may go without, and does: one clock read and format less
/// per handshake). TLS streams are flushed so that the records leave.
pub(super) async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &Response<Bytes>,
) -> io::Result<()> {
    let status = response.status();
    let body = response.body();
    let mut head = Vec::with_capacity(192 + body.len());
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !status.is_informational() {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(body.len().to_string().as_bytes());
        head.extend_from_slice(b"\r\ndate: ");
        head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body);
    stream.write_all(&head).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /chat?x=1 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[tokio::test]
    async fn an_upgrade_split_across_reads_is_read_whole_and_what_follows_is_kept() {
        let (mut client, mut server) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            client.write_all(UPGRADE).await.unwrap();
            client.write_all(b"\x81\x80frame").await.unwrap();
        });
        let head = read_head(&mut server, 8192).await.unwrap();
        writer.await.unwrap();
        let Head::Upgrade { request, mut rest } = head else {
            panic!("not read as an upgrade");
        };
        assert_eq!(request.uri(), "/chat?x=1");
        assert_eq!(request.headers()["sec-websocket-version"], "13");
        assert_eq!(request.headers()["host"], "gw");
        // Whatever the last read brought past the head, the rest is still in the stream.
        let mut more = Vec::new();
        server.read_to_end(&mut more).await.unwrap();
        rest.extend_from_slice(&more);
        assert_eq!(rest, b"\x81\x80frame");
    }

    #[test]
    fn what_is_not_a_websocket_upgrade_is_left_to_hyper() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: gw\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: h2c\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo st: gw\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
        ];
        for case in cases {
            assert!(
                matches!(parse(case), Parsed::Other),
                "{}",
                String::from_utf8_lossy(case)
            );
        }
        assert!(matches!(parse(&UPGRADE[..40]), Parsed::Partial));
        assert!(matches!(parse(UPGRADE), Parsed::Upgrade(_, len) if len == UPGRADE.len()));
    }

    #[tokio::test]
    async fn a_head_over_the_limit_goes_to_hyper_with_every_byte_read() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let mut big = b"GET / HTTP/1.1\r\nHost: gw\r\nX-Pad: ".to_vec();
        big.resize(5000, b'a');
        client.write_all(&big).await.unwrap();
        let Head::Other(read) = read_head(&mut server, 4096).await.unwrap() else {
            panic!("an oversized head must go to hyper");
        };
        assert_eq!(read, big[..4096]);
        drop(client);
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(matches!(
            read_head(&mut server, 4096).await.unwrap(),
            Head::Gone
        ));
    }

    #[tokio::test]
    async fn a_refusal_is_written_with_its_length_and_date() {
        let mut response = Response::new(Bytes::from_static(b"no\n"));
        *response.status_mut() = http::StatusCode::FORBIDDEN;
        response
            .headers_mut()
            .insert("connection", http::HeaderValue::from_static("close"));
        let mut out = Vec::new();
        write_response(&mut out, &response).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "HTTP/1.1 403 Forbidden\r\nconnection: close\r\ncontent-length: 3\r\ndate: "
            ),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\nno\n"), "{text}");
    }
}
