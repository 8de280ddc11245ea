//! The client side of a relay: the connection a WebSocket arrived on, whichever way it came.
//!
//! An HTTP/1.1 upgrade read directly ([`super::http1`]) hands over its socket (or TLS stream)
//! with the bytes read past the request head in front; one that went through hyper (a later
//! request of a keep-alive connection, an HTTP/2 stream) hands over hyper's upgraded stream.
//! One type for all of them, so that the relay is compiled once and no box is added on the
//! common path.

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::tls_stream::TlsStream;
use crate::prefixed::Prefixed;

/// tokio-util's `Either` does the delegation: tcp inline; TLS boxed (a rustls session is
/// large, and plain connections should not carry its size), with the bytes read past the
/// head put back inside it; hyper's upgraded stream.
pub(crate) type ClientIo = Either<Prefixed<TcpStream>, Either<Box<TlsClient>, TokioIo<Upgraded>>>;

type TlsClient = TlsStream<Prefixed<TcpStream>>;

/// hyper's upgraded connection as a relay's client.
pub(crate) fn upgraded(upgraded: Upgraded) -> ClientIo {
    Either::Right(Either::Right(TokioIo::new(upgraded)))
}

/// A connection's stream before its first request: what serves HTTP/1.1 on it.
pub(super) trait ClientStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The stream as a relay's client, with `unread` (bytes that followed the request head
    /// in the same read) put back in front.
    fn into_client(self, unread: Vec<u8>) -> ClientIo;
}

impl ClientStream for Prefixed<TcpStream> {
    fn into_client(mut self, unread: Vec<u8>) -> ClientIo {
        self.unread(unread);
        Either::Left(self)
    }
}

impl ClientStream for TlsStream<Prefixed<TcpStream>> {
    fn into_client(mut self, unread: Vec<u8>) -> ClientIo {
        self.unread(unread);
        Either::Right(Either::Left(Box::new(self)))
    }
}
