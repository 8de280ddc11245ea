//! The byte-stream upstreams: TCP and Unix-domain sockets behind one type.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tokio::net::{TcpStream, UnixStream};

/// A connected tcp:// or unix: upstream.
#[derive(Debug)]
pub enum UpstreamStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Connects and disables Nagle: the relay writes whole messages, so waiting to coalesce them
/// only adds latency to interactive protocols (VNC, terminals).
pub(super) async fn connect_tcp(
    host: &str,
    port: u16,
    keepalive: Option<&crate::config::TcpKeepalive>,
) -> io::Result<TcpStream> {
    let stream = TcpStream::connect((host, port)).await?;
    crate::sockets::prepare(&stream, keepalive, crate::sockets::Side::Upstream);
    Ok(stream)
}

impl UpstreamStream {
    /// Writes bytes before the relay starts (the PROXY protocol header).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            UpstreamStream::Tcp(s) => s.write_all(bytes).await,
            UpstreamStream::Unix(s) => s.write_all(bytes).await,
        }
    }

    /// Owned halves: the read half waits for readiness without a buffer (see
    /// [`UpstreamReader`]); the write half shuts down the write side when asked or dropped.
    pub fn into_split(self) -> (UpstreamReader, UpstreamWriter) {
        match self {
            UpstreamStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (UpstreamReader::Tcp(r), UpstreamWriter::Tcp(w))
            }
            UpstreamStream::Unix(s) => {
                let (r, w) = s.into_split();
                (UpstreamReader::Unix(r), UpstreamWriter::Unix(w))
            }
        }
    }
}

/// The read half of a byte-stream upstream. The relay waits for `readable` holding no
/// buffer, and only then takes one for `try_read`: an idle connection holds none.
#[derive(Debug)]
pub enum UpstreamReader {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Unix(tokio::net::unix::OwnedReadHalf),
}

impl UpstreamReader {
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            UpstreamReader::Tcp(r) => r.readable().await,
            UpstreamReader::Unix(r) => r.readable().await,
        }
    }

    /// Reads what is there now; `WouldBlock` when nothing is.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            UpstreamReader::Tcp(r) => r.try_read(buf),
            UpstreamReader::Unix(r) => r.try_read(buf),
        }
    }
}

#[derive(Debug)]
pub enum UpstreamWriter {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Unix(tokio::net::unix::OwnedWriteHalf),
}

impl AsyncWrite for UpstreamWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamWriter::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamWriter::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamWriter::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamWriter::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamWriter::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamWriter::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamWriter::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamWriter::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
