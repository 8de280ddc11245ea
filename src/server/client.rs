//! The client side of a relay: the connection a WebSocket arrived on, whichever way it came.
//!
//! An HTTP/1.1 upgrade read directly ([`super::http1`]) hands over its socket (or TLS stream)
//! with the bytes read past the request head in front; one that went through hyper (a later
//! request of a keep-alive connection, an HTTP/2 stream) hands over hyper's upgraded stream.
//! One type for all of them, so that the relay is compiled once and no box is added on the
//! common path.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::prefixed::Prefixed;

pub(crate) enum ClientIo {
    Tcp(Prefixed<TcpStream>),
    /// Boxed: a rustls session is large, and plain connections should not carry its size.
    Tls(Box<Prefixed<TlsStream<Prefixed<TcpStream>>>>),
    Upgraded(TokioIo<Upgraded>),
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
        ClientIo::Tcp(self)
    }
}

impl ClientStream for TlsStream<Prefixed<TcpStream>> {
    fn into_client(self, unread: Vec<u8>) -> ClientIo {
        ClientIo::Tls(Box::new(Prefixed::new(unread, self)))
    }
}

macro_rules! each {
    ($self:ident, $io:ident => $body:expr) => {
        match $self.get_mut() {
            ClientIo::Tcp($io) => $body,
            ClientIo::Tls($io) => $body,
            ClientIo::Upgraded($io) => $body,
        }
    };
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Tcp(io) => io.is_write_vectored(),
            ClientIo::Tls(io) => io.is_write_vectored(),
            ClientIo::Upgraded(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_shutdown(cx))
    }
}
