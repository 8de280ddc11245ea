//! The TLS layer of a client connection: rustls' unbuffered API over the socket, with
//! buffers that exist only while bytes are in them.
//!
//! tokio-rustls keeps rustls' buffered connection, whose 4 KiB read buffer lives as long as
//! the connection: a third of what a held wss:// connection cost. Here the ciphertext
//! buffer is taken when a read begins and given back when the socket has nothing more and no
//! partial record is left, and the outgoing buffer is given back once written; an idle
//! session is rustls' state and the keys. The buffers come from a small per-thread pool
//! (as the relay's read buffers do), so a busy connection neither allocates nor zeroes one
//! per read. Reads take up to two records, where tokio-rustls reads 4 KiB at a time.
//!
//! The server name a client asked for (SNI) is not exposed by rustls' unbuffered server
//! connection, so the ClientHello is also given to rustls' `Acceptor`, used only to parse
//! it.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::{Acceptor, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, ReadTraffic,
    WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::prefixed::PutBack;

/// A pooled buffer: two full records (16 KiB of plaintext each, and their overhead).
const SPARE: usize = 2 * (0x4000 + 256);
/// Spare buffers a thread keeps; more are freed when given back.
const POOL: usize = 16;
/// A record's header: type, version, length.
const RECORD_HEADER: usize = 5;
/// rustls' limit for a handshake message, joined across records (64 KiB), and the record
/// it ends in: no honest peer makes the ciphertext buffer larger.
const MAX_BUFFERED: usize = 0xffff + RECORD_HEADER + 0x4000 + 2048;
/// Plaintext encrypted per write: two full records, so the ciphertext fits one spare buffer.
const MAX_WRITE: usize = 2 * 0x4000;
/// Vectored writes up to this size are joined into one record.
const JOIN: usize = 2048;

thread_local! {
    static SPARES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `SPARE` bytes from the thread's pool (zeroed once, when first made).
fn take_spare() -> Vec<u8> {
    SPARES
        .try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| vec![0; SPARE])
}

/// Back to the pool; one grown past `SPARE` (a long handshake message) is freed.
fn give_spare(buf: Vec<u8>) {
    if buf.len() != SPARE {
        return;
    }
    let _ = SPARES.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < POOL {
            spares.push(buf);
        }
    });
}

/// A server-side TLS stream over `io`.
pub struct TlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet consumed by rustls: at most a partial record between reads.
    incoming: Incoming,
    /// Ciphertext encoded and not yet written to the socket.
    outgoing: Outgoing,
    /// Plaintext decrypted and not yet read (it did not fit the reader's buffer, or it came
    /// while writing), or put back with [`TlsStream::unread`].
    plain: PutBack,
    server_name: Option<Box<str>>,
    /// The peer sent close_notify: reads are at their end.
    read_closed: bool,
    /// close_notify was queued: nothing more is written.
    write_closed: bool,
    /// The session failed (its alert queued): every later read and write fails too, and
    /// nothing more is encrypted (RFC 8446 §6.2).
    failed: bool,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// Runs the server side of a handshake on `io`. On failure the alert rustls chose is
    /// sent (as far as the socket takes it without waiting) before the error returns.
    pub async fn accept(config: Arc<ServerConfig>, io: IO) -> Result<Self, HandshakeError> {
        let mut stream = TlsStream {
            io,
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Incoming::default(),
            outgoing: Outgoing::default(),
            plain: PutBack::default(),
            server_name: None,
            read_closed: false,
            write_closed: false,
            failed: false,
        };
        let mut hello = Some(Acceptor::default());
        match std::future::poll_fn(|cx| stream.poll_handshake(cx, &mut hello)).await {
            Ok(()) => Ok(stream),
            Err(e) => {
                // The alert is a courtesy: a peer that does not read it loses nothing.
                let _ = std::future::poll_fn(|cx| match stream.poll_send(cx) {
                    Poll::Pending => Poll::Ready(Ok(())),
                    done => done,
                })
                .await;
                Err(e)
            }
        }
    }

    fn poll_handshake(
        &mut self,
        cx: &mut Context<'_>,
        hello: &mut Option<Acceptor>,
    ) -> Poll<Result<(), HandshakeError>> {
        loop {
            let next = self.process(None, None)?;
            // This flight (or the session tickets after the last) goes out before reading.
            ready!(self.poll_send(cx))?;
            match next {
                Next::Input if !self.conn.is_handshaking() => {
                    self.incoming.release_if_empty();
                    self.incoming.pooled = true;
                    self.outgoing.pooled = true;
                    return Poll::Ready(Ok(()));
                }
                Next::Input => {}
                Next::Data | Next::Wrote(_) => continue,
                Next::Eof => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection during the TLS handshake",
                    )
                    .into()));
                }
            }
            let read = ready!(self.poll_fill(cx))?;
            if read == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )
                .into()));
            }
            let fresh = &self.incoming.buf[self.incoming.end - read..self.incoming.end];
            if let Some(name) = hello.as_mut().and_then(|acceptor| sni(acceptor, fresh)) {
                self.server_name = name;
                *hello = None;
            }
        }
    }

    /// Puts `bytes` in front of what is still unread.
    pub fn unread(&mut self, bytes: Vec<u8>) {
        self.plain.unread(bytes);
    }

    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Runs rustls over the ciphertext at hand until it has plaintext for `read`, has taken
    /// `write`, has reached the end, or needs more ciphertext. What rustls wants sent is
    /// left in `outgoing`; plaintext with nowhere to go is kept in `plain`.
    fn process(
        &mut self,
        mut read: Option<&mut ReadBuf<'_>>,
        write: Option<Outbound<'_>>,
    ) -> Result<Next, rustls::Error> {
        if self.failed {
            return Err(rustls::Error::General(
                "the TLS session failed earlier".into(),
            ));
        }
        loop {
            let status = self.conn.process_tls_records(self.incoming.filled_mut());
            let mut discard = status.discard;
            let next = match status.state {
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    deliver(&mut records, read.as_deref_mut(), &mut self.plain).map(
                        |(copied, consumed)| {
                            discard += consumed;
                            copied.then_some(Next::Data)
                        },
                    )
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut data, &mut self.outgoing).map(|()| None)
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    // `outgoing` holds it now; every path writes `outgoing` out first.
                    data.done();
                    Ok(None)
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.read_closed = true;
                    Ok(read.is_some().then_some(Next::Eof))
                }
                Ok(ConnectionState::Closed) => {
                    self.read_closed = true;
                    Ok(Some(Next::Eof))
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match write {
                    Some(outbound) => encrypt(&mut traffic, outbound, &mut self.outgoing)
                        .map(|n| Some(Next::Wrote(n))),
                    None => Ok(Some(Next::Input)),
                },
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Next::Input)),
                // Early data is off (rustls' default), and later states are not known.
                Ok(_) => Err(rustls::Error::General("unexpected TLS state".into())),
                Err(e) => Err(e),
            };
            self.incoming.discard(discard);
            match next {
                Ok(Some(next)) => return Ok(next),
                Ok(None) => {}
                Err(e) => {
                    self.failed = true;
                    self.queue_alert();
                    return Err(e);
                }
            }
        }
    }

    /// After an error rustls has the alert queued: into `outgoing` with it. One call, given
    /// the same buffer as before: what rustls' handshake deframer still holds points into
    /// it (an empty slice makes it panic), and a second call would deframe the failed
    /// record again and raise a second fatal alert. (Had the failing message queued
    /// something before its alert, that goes out instead, and the connection closes all
    /// the same.)
    fn queue_alert(&mut self) {
        let status = self.conn.process_tls_records(self.incoming.filled_mut());
        let discard = status.discard;
        if let Ok(ConnectionState::EncodeTlsData(mut data)) = status.state {
            let _ = encode(&mut data, &mut self.outgoing);
        }
        self.incoming.discard(discard);
    }

    /// Writes `outgoing` to the socket; ready once all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.outgoing.unsent()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.sent(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads ciphertext from the socket; `Ok(0)` is its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let space = self.incoming.space()?;
        let mut buf = ReadBuf::new(space);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.incoming.end += n;
        Poll::Ready(Ok(n))
    }
}

/// What [`TlsStream::process`] stopped for.
enum Next {
    /// rustls needs more ciphertext (or, not handshaking, is ready to write).
    Input,
    /// Plaintext was copied to the reader.
    Data,
    /// The write was encrypted into `outgoing`: this many bytes of it.
    Wrote(usize),
    /// The peer sent close_notify.
    Eof,
}

/// What a caller gives rustls to send.
#[derive(Clone, Copy)]
enum Outbound<'a> {
    /// Up to `MAX_WRITE` bytes of these, a record (or two) per slice.
    Data(&'a [io::IoSlice<'a>]),
    CloseNotify,
}

/// Feeds the ClientHello's bytes to rustls' `Acceptor`: `Some` once it is parsed, with the
/// server name it asked for. A ClientHello the Acceptor rejects is the connection's own
/// concern (it fails the same way there); it is taken as naming no server.
fn sni(acceptor: &mut Acceptor, mut bytes: &[u8]) -> Option<Option<Box<str>>> {
    while !bytes.is_empty() {
        if acceptor.read_tls(&mut bytes).is_err() {
            return Some(None);
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Some(accepted.client_hello().server_name().map(Box::from));
            }
            Ok(None) => {}
            Err(_) => return Some(None),
        }
    }
    None
}

/// Copies the decrypted records to `read` as far as it has room; the rest to `plain`.
/// Whether some reached `read`, and the ciphertext the records let go of.
fn deliver(
    records: &mut ReadTraffic<'_, '_, rustls::server::ServerConnectionData>,
    mut read: Option<&mut ReadBuf<'_>>,
    plain: &mut PutBack,
) -> Result<(bool, usize), rustls::Error> {
    let mut copied = false;
    let mut consumed = 0;
    while let Some(record) = records.next_record() {
        let record = record?;
        // 0 in rustls 0.23 (it copies records out); in-place decryption would set it.
        consumed += record.discard;
        let mut payload = record.payload;
        if let Some(read) = read.as_deref_mut() {
            let n = payload.len().min(read.remaining());
            read.put_slice(&payload[..n]);
            copied |= n > 0;
            payload = &payload[n..];
        }
        plain.push(payload);
    }
    Ok((copied, consumed))
}

fn encode(
    data: &mut EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    outgoing: &mut Outgoing,
) -> Result<(), rustls::Error> {
    loop {
        match data.encode(outgoing.tail()) {
            Ok(n) => {
                outgoing.filled(n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                outgoing.reserve(required_size);
            }
            Err(EncodeError::AlreadyEncoded) => return Ok(()),
        }
    }
}

/// Encrypts `outbound` into `outgoing`; how many bytes of plaintext it took.
fn encrypt(
    traffic: &mut WriteTraffic<'_, rustls::server::ServerConnectionData>,
    outbound: Outbound<'_>,
    outgoing: &mut Outgoing,
) -> Result<usize, rustls::Error> {
    let Outbound::Data(slices) = outbound else {
        seal(outgoing, |out| traffic.queue_close_notify(out))?;
        return Ok(0);
    };
    let mut taken = 0;
    for slice in slices {
        let part = &slice[..slice.len().min(MAX_WRITE - taken)];
        if part.is_empty() {
            continue;
        }
        seal(outgoing, |out| traffic.encrypt(part, out))?;
        taken += part.len();
    }
    Ok(taken)
}

/// Runs `write` into `outgoing`'s free space, growing it as rustls asks.
fn seal(
    outgoing: &mut Outgoing,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), rustls::Error> {
    loop {
        match write(outgoing.tail()) {
            Ok(n) => {
                outgoing.filled(n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                outgoing.reserve(required_size);
            }
            Err(EncryptError::EncryptExhausted) => return Err(rustls::Error::EncryptError),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // No room: nothing to read into (and decrypting would only pile up in `plain`).
        if buf.remaining() == 0 || this.plain.take(buf) || this.read_closed {
            return Poll::Ready(Ok(()));
        }
        loop {
            let next = this.process(Some(buf), None);
            // What rustls wants sent (a key update's answer, an alert) goes out from here
            // too: the write side may be idle. A full socket is the write side's wait; a
            // failing one is told after the plaintext already read is handed over.
            let sent = this.poll_send(cx);
            match next.map_err(invalid_data)? {
                Next::Data | Next::Eof => {
                    this.incoming.release_if_empty();
                    return Poll::Ready(Ok(()));
                }
                Next::Input | Next::Wrote(_) => {}
            }
            if let Poll::Ready(Err(e)) = sent {
                return Poll::Ready(Err(e));
            }
            match this.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed connection without sending TLS close_notify",
                    )));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    this.incoming.release_if_empty();
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// Encrypts up to `MAX_WRITE` bytes of `data` and starts writing them.
    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Backpressure: what was taken before is on the socket before more is taken.
        ready!(self.poll_send(cx))?;
        if data.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let next = self.process(None, Some(Outbound::Data(data)));
        if next.is_err() {
            // The alert goes out if the socket takes it now.
            let _ = self.poll_send(cx);
        }
        let taken = match next.map_err(invalid_data)? {
            Next::Wrote(taken) => taken,
            Next::Eof => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Next::Input | Next::Data => {
                return Poll::Ready(Err(io::Error::other("TLS session cannot send data")));
            }
        };
        // Taken: the socket being full now is the next write's wait.
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_slices(cx, &[io::IoSlice::new(data)])
    }

    /// Small slices are joined into one record; larger ones get records of their own, as
    /// copying them would cost more than a record's 22 bytes.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total > JOIN || bufs.iter().filter(|b| !b.is_empty()).count() < 2 {
            return this.poll_write_slices(cx, bufs);
        }
        let mut joined = [0; JOIN];
        let mut len = 0;
        for b in bufs {
            joined[len..len + b.len()].copy_from_slice(b);
            len += b.len();
        }
        this.poll_write_slices(cx, &[io::IoSlice::new(&joined[..len])])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            // A session that failed or has closed has no close_notify to send.
            let _ = this.process(None, Some(Outbound::CloseNotify));
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

fn invalid_data(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The ciphertext buffer: `buf[start..end]` is unconsumed; no allocation when empty and
/// idle. Consumed records move `start` rather than the bytes behind them: a read of many
/// small records would otherwise copy the rest of the buffer once per record.
#[derive(Default)]
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Once the handshake is done: buffers from the pool. A handshake's flights are small,
    /// and many at once (a burst of new connections) would each hold a spare.
    pooled: bool,
}

impl Incoming {
    fn filled_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    fn discard(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for the next read: a spare buffer's worth, or the rest of the record (or joined
    /// handshake message) at the front. What is left moves to the front first.
    fn space(&mut self) -> io::Result<&mut [u8]> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end >= MAX_BUFFERED {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message larger than 64 KiB",
            ));
        }
        let record = match self.buf.get(3..RECORD_HEADER) {
            Some(len) if self.end >= RECORD_HEADER => {
                RECORD_HEADER + usize::from(u16::from_be_bytes([len[0], len[1]]))
            }
            _ => 0,
        };
        if self.buf.is_empty() && self.pooled {
            self.buf = take_spare();
        }
        // Only a handshake message longer than a spare (a long certificate chain) grows it.
        let want = (self.end + 4096).max(record).min(MAX_BUFFERED);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        Ok(&mut self.buf[self.end..])
    }

    fn release_if_empty(&mut self) {
        if self.end == 0 && !self.buf.is_empty() {
            give_spare(std::mem::take(&mut self.buf));
        }
    }
}

/// Ciphertext to send: `buf[sent..len]`; freed once all of it is written.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    len: usize,
    sent: usize,
    /// As `Incoming::pooled`.
    pooled: bool,
}

impl Outgoing {
    fn is_empty(&self) -> bool {
        self.sent == self.len
    }

    fn unsent(&self) -> &[u8] {
        &self.buf[self.sent..self.len]
    }

    fn sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.len {
            give_spare(std::mem::take(&mut self.buf));
            self.len = 0;
            self.sent = 0;
        }
    }

    fn tail(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    fn reserve(&mut self, n: usize) {
        if self.buf.is_empty() && self.pooled {
            self.buf = take_spare();
        }
        if self.buf.len() < self.len + n {
            self.buf.resize(self.len + n, 0);
        }
    }

    fn filled(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::client::TlsStream as ClientTls;

    use super::*;

    /// A server and a client configuration, with a certificate for `localhost` made here.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let provider = crate::tls::provider();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A server on a loopback socket and a tokio-rustls client, handshake done.
    async fn pair() -> (TlsStream<TcpStream>, ClientTls<TcpStream>) {
        let (server, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        handshake(&listener, addr, server, client).await
    }

    /// The server's handshake on the next connection `listener` accepts, and a client's
    /// that connects to `to` (the listener, or something in between).
    async fn handshake(
        listener: &TcpListener,
        to: std::net::SocketAddr,
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (TlsStream<TcpStream>, ClientTls<TcpStream>) {
        let connector = tokio_rustls::TlsConnector::from(client);
        let (server, client) = tokio::join!(
            async {
                let (socket, _) = listener.accept().await.expect("accept");
                TlsStream::accept(server, socket).await
            },
            async {
                let socket = TcpStream::connect(to).await.expect("connect");
                let name = ServerName::try_from("localhost").expect("name");
                connector.connect(name, socket).await
            }
        );
        (
            server.expect("server handshake"),
            client.expect("client handshake"),
        )
    }

    fn holds_no_buffers<IO>(stream: &TlsStream<IO>) -> bool {
        stream.incoming.buf.capacity() == 0
            && stream.outgoing.buf.capacity() == 0
            && stream.plain.capacity() == 0
    }

    #[tokio::test]
    async fn an_idle_session_holds_no_buffers() {
        let (mut server, mut client) = pair().await;
        assert_eq!(server.server_name(), Some("localhost"));
        assert!(holds_no_buffers(&server), "after the handshake");
        client.write_all(b"ping").await.expect("client write");
        client.flush().await.expect("client flush");
        let mut got = [0; 4];
        server.read_exact(&mut got).await.expect("server read");
        assert_eq!(&got, b"ping");
        // The record was used up by the read that returned it: its buffer went back then,
        // not at the next read that finds nothing.
        assert!(
            holds_no_buffers(&server),
            "after a read that used up its record"
        );
        // Small slices go out joined into one record.
        let parts = [io::IoSlice::new(b"po"), io::IoSlice::new(b"ng")];
        let written = server.write_vectored(&parts).await.expect("server write");
        assert_eq!(written, 4);
        client.read_exact(&mut got).await.expect("client read");
        assert_eq!(&got, b"pong");
        // The server's next read finds nothing: its buffer goes back before it waits.
        let waiting = tokio::time::timeout(Duration::from_millis(20), server.read(&mut got)).await;
        assert!(waiting.is_err(), "nothing was sent");
        assert!(holds_no_buffers(&server), "after a round trip");
    }

    #[tokio::test]
    async fn a_handshake_trickled_a_byte_at_a_time_completes_and_names_the_server() {
        let (server_config, client_config) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let front_addr = front.local_addr().expect("front addr");
        // Between client and server: the client's bytes go on one per write, so the
        // ClientHello (and the rest of the client's flights) reach the server in pieces.
        let trickler = tokio::spawn(async move {
            let (from_client, _) = front.accept().await.expect("accept");
            let to_server = TcpStream::connect(addr).await.expect("connect");
            to_server.set_nodelay(true).expect("nodelay");
            let (mut client_read, mut client_write) = from_client.into_split();
            let (mut server_read, mut server_write) = to_server.into_split();
            let up = async move {
                let mut byte = [0; 1];
                while client_read.read(&mut byte).await.is_ok_and(|n| n == 1) {
                    if server_write.write_all(&byte).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = server_write.shutdown().await;
            };
            let down = tokio::io::copy(&mut server_read, &mut client_write);
            let _ = tokio::join!(up, down);
        });
        let (mut server, mut client) =
            handshake(&listener, front_addr, server_config, client_config).await;
        assert_eq!(server.server_name(), Some("localhost"));
        client.write_all(b"slowly").await.expect("client write");
        client.flush().await.expect("client flush");
        let mut got = [0; 6];
        server.read_exact(&mut got).await.expect("server read");
        assert_eq!(&got, b"slowly");
        trickler.abort();
    }

    #[tokio::test]
    async fn a_bad_flight_gets_an_alert_not_a_panic() {
        let (server_config, client_config) = configs();
        // A real ClientHello with four more bytes in its record: an empty handshake message
        // rustls refuses while it still holds it (the alert path must not panic there).
        let name = ServerName::try_from("localhost").expect("name");
        let mut hello = rustls::ClientConnection::new(client_config, name).expect("client");
        let mut flight = Vec::new();
        hello.write_tls(&mut flight).expect("ClientHello");
        assert_eq!(flight[0], 22, "a handshake record");
        let len = u16::from_be_bytes([flight[3], flight[4]]) + 4;
        flight[3..5].copy_from_slice(&len.to_be_bytes());
        flight.extend_from_slice(&[0, 0, 0, 0]);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            TlsStream::accept(server_config, socket).await.map(|_| ())
        });
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(&flight).await.expect("flight");
        let outcome = server.await.expect("the handshake ends without a panic");
        assert!(outcome.is_err(), "the flight is refused");
        let mut record = [0; 1];
        client.read_exact(&mut record).await.expect("an alert");
        assert_eq!(record[0], 21, "an alert record");
    }

    #[tokio::test]
    async fn a_read_with_no_room_returns_at_once() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"x").await.expect("client write");
        client.flush().await.expect("client flush");
        // Wait for the record, then ask with no room: the answer comes on the first poll.
        tokio::time::timeout(Duration::from_secs(5), server.io.readable())
            .await
            .expect("the record came")
            .expect("readable");
        let empty = futures_util::FutureExt::now_or_never(server.read(&mut []));
        assert_eq!(empty.expect("not left waiting").expect("no error"), 0);
        let mut got = [0; 1];
        server.read_exact(&mut got).await.expect("server read");
        assert_eq!(&got, b"x");
    }

    #[tokio::test]
    async fn streams_survive_records_split_across_reads_and_vectored_writes() {
        let (server, client) = pair().await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let sent = data.clone();
        let echo = async move {
            // Odd-sized reads, written back as a header and a body in one vectored write.
            let mut buf = vec![0; 7919];
            loop {
                let n = server_read.read(&mut buf).await.expect("server read");
                if n == 0 {
                    break;
                }
                let (head, body) = buf[..n].split_at(n.min(3));
                let mut parts = [io::IoSlice::new(head), io::IoSlice::new(body)];
                let mut parts = &mut parts[..];
                while !parts.is_empty() {
                    let written = server_write
                        .write_vectored(parts)
                        .await
                        .expect("server write");
                    io::IoSlice::advance_slices(&mut parts, written);
                }
            }
            server_write.shutdown().await.expect("server shutdown");
        };
        let send = async move {
            client_write.write_all(&sent).await.expect("client write");
            client_write.shutdown().await.expect("client shutdown");
        };
        let receive = async move {
            let mut got = Vec::new();
            client_read
                .read_to_end(&mut got)
                .await
                .expect("client read");
            got
        };
        let ((), (), got) = tokio::join!(echo, send, receive);
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the bytes came back in order");
    }

    #[tokio::test]
    async fn close_notify_is_the_end_and_a_bare_close_is_an_error() {
        let (mut server, mut client) = pair().await;
        client.shutdown().await.expect("client close_notify");
        let mut buf = [0; 16];
        assert_eq!(server.read(&mut buf).await.expect("clean end"), 0);
        assert_eq!(server.read(&mut buf).await.expect("still the end"), 0);

        let (mut server, client) = pair().await;
        let (mut socket, _) = client.into_inner();
        socket.shutdown().await.expect("FIN");
        let err = server.read(&mut buf).await.expect_err("no close_notify");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_client_key_update_is_taken_and_traffic_goes_on() {
        let (mut server, mut client) = pair().await;
        client
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("TLS 1.3 key update");
        client.write_all(b"after").await.expect("client write");
        client.flush().await.expect("client flush");
        let mut got = [0; 5];
        server.read_exact(&mut got).await.expect("server read");
        assert_eq!(&got, b"after");
        server.write_all(b"reply").await.expect("server write");
        client.read_exact(&mut got).await.expect("client read");
        assert_eq!(&got, b"reply");
    }

    #[tokio::test]
    async fn garbage_after_the_handshake_is_invalid_data_with_an_alert() {
        let (mut server, mut client) = pair().await;
        // An application-data record that no key decrypts, under the client's session.
        let mut garbage = vec![23, 3, 3, 0, 20];
        garbage.extend(1..=20u8);
        let socket = client.get_ref().0;
        let mut rest = &garbage[..];
        while !rest.is_empty() {
            socket.writable().await.expect("writable");
            if let Ok(n) = socket.try_write(rest) {
                rest = &rest[n..];
            }
        }
        let mut buf = [0; 16];
        let err = server
            .read(&mut buf)
            .await
            .expect_err("undecryptable record");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Nothing is encrypted after a fatal alert.
        server
            .write_all(b"late")
            .await
            .expect_err("the session failed");
        // The client is told why.
        let err = client.read(&mut buf).await.expect_err("an alert");
        let alert = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(alert, Some(rustls::Error::AlertReceived(_))),
            "{err:?}"
        );
    }
}
