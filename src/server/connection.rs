//! One client connection before its upgrade: the PROXY header (listeners behind a load
//! balancer), TLS, then HTTP: the first HTTP/1.1 request read here (`http1`), anything
//! else with hyper (HTTP/1.1 and HTTP/2).

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::ListenerContext;
use super::client::ClientStream;
use super::http1::{Head, read_head};
use super::tls_stream::TlsStream;
use crate::forwarded::ClientAddr;
use crate::gateway::{Gateway, ListenerRef};
use crate::prefixed::Prefixed;
use crate::proxy_protocol;
use crate::telemetry::ratelimit::Verdict;
use crate::tls::ClientIdentity;

/// Per connection: who it is and on which listener.
pub(super) struct ConnectionContext {
    /// The client as far as the connection tells: the socket's peer, or the client a
    /// trusted load balancer named in a PROXY header.
    pub peer: ClientAddr,
    /// The connection began with a PROXY header from a trusted load balancer (naming `peer`,
    /// or nobody). That is where trust stops: forwarded headers on this connection are not
    /// believed, even when `peer` falls in `trusted` too (nginx and HAProxy stop there too).
    pub proxied: bool,
    /// The gateway address the client connected to (or, behind a PROXY-speaking load
    /// balancer, the one it named).
    pub local: Option<SocketAddr>,
    pub listener: Arc<ListenerContext>,
    /// TLS details, when the listener terminates TLS.
    pub tls: Option<TlsInfo>,
    /// With `allow_faults`: a duplicate of the client socket's descriptor, taken by the
    /// fault layer to reset the connection (`reset_after`).
    pub socket: std::sync::Mutex<Option<OwnedFd>>,
    /// WebSocket streams of an HTTP/2 connection, from their request to their relay's end,
    /// and a wake-up when the last one ends: the drain closes the connection once it has
    /// none. (HTTP/1.1 relays are not counted: nothing waits for them here.)
    pub relays: std::sync::atomic::AtomicUsize,
    pub relays_done: tokio::sync::Notify,
}

/// Counts a relay on its connection for as long as it lives.
pub(super) struct RelayOnConnection(Arc<ConnectionContext>);

impl RelayOnConnection {
    pub fn new(conn: Arc<ConnectionContext>) -> Self {
        conn.relays
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        RelayOnConnection(conn)
    }
}

impl Drop for RelayOnConnection {
    fn drop(&mut self) {
        if self
            .0
            .relays
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.relays_done.notify_waiters();
        }
    }
}

pub(super) struct TlsInfo {
    /// The verified client certificate's identity (mTLS listeners).
    pub identity: Option<ClientIdentity>,
    /// The server name the client asked for (SNI).
    pub server_name: Option<String>,
}

impl ConnectionContext {
    pub fn identity(&self) -> Option<&ClientIdentity> {
        self.tls.as_ref().and_then(|t| t.identity.as_ref())
    }

    /// Resolves when no relay runs on this connection.
    async fn no_relays(&self) {
        loop {
            let notified = self.relays_done.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.relays.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Serves one accepted connection. Not inside a span of its own: creating one cost 6% of a
/// handshake's instructions; each line logged on a connection's behalf names its client (and,
/// where it helps, its listener and route) itself.
pub(super) async fn serve(stream: TcpStream, peer: SocketAddr, listener: Arc<ListenerContext>) {
    // The configuration in force when the connection arrived decides its TLS and limits.
    let gateway = listener.server.gateway.load_full();
    let Some(this) = gateway.listener(&listener.key) else {
        return; // removed by a reload a moment ago
    };
    serve_listener(stream, peer, listener.clone(), &gateway, this).await
}

async fn serve_listener(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerContext>,
    gateway: &Gateway,
    this: ListenerRef<'_>,
) {
    let config = this.config;
    // `handshake_timeout` covers the PROXY header, the TLS handshake and the request head.
    let deadline = Instant::now() + gateway.config.gateway.handshake_timeout;
    // A listener bound to one address and port is that address: no system call to ask.
    let mut local = if config.bind.ip().is_unspecified() || config.bind.port() == 0 {
        stream.local_addr().ok()
    } else {
        Some(config.bind)
    };
    let mut client = ClientAddr::from(peer);
    let mut proxied = false;
    let socket = if gateway.config.gateway.allow_faults {
        stream.as_fd().try_clone_to_owned().ok()
    } else {
        None
    };
    let stream = if config.accept_proxy_protocol {
        let trusted = config.trusts(peer.ip());
        match tokio::time::timeout_at(deadline, proxy_protocol::accept(stream, trusted)).await {
            Ok(Ok((preamble, stream))) => {
                // Any PROXY header ends the chain of trust, also one that names no client
                // (LOCAL, UNKNOWN, unix or unspecified families): the bytes after it are the
                // end client's, and so are any forwarded headers in them.
                proxied = preamble.is_some();
                if let Some(Some(p)) = preamble {
                    client = p.source.into();
                    local = Some(p.destination);
                }
                stream
            }
            Ok(Err(e)) => {
                if let Verdict::Log { suppressed } = listener.server.rejection_log.check() {
                    info!(client = %peer, listener = %config.name, suppressed, reason = %e, "connection refused");
                }
                return;
            }
            Err(_) => {
                debug!(client = %peer, "no PROXY protocol header within handshake_timeout");
                return;
            }
        }
    } else {
        Prefixed::new(Vec::new(), stream)
    };
    let Some(tls_config) = this.tls.cloned() else {
        let who = Who {
            peer: client,
            proxied,
            local,
            socket,
        };
        return serve_http(stream, who, listener, gateway, deadline, None).await;
    };
    match tokio::time::timeout_at(deadline, TlsStream::accept(tls_config, stream)).await {
        Ok(Ok(tls)) => {
            let session = &tls;
            // rustls has verified the chain; only its identity is read here.
            let identity = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(ClientIdentity::from_certificate);
            let h2 = session.alpn_protocol() == Some(b"h2");
            let info = TlsInfo {
                identity,
                server_name: session.server_name().map(str::to_string),
            };
            let who = Who {
                peer: client,
                proxied,
                local,
                socket,
            };
            // Boxed: a TLS stream and what serves it are most of this future's size, and
            // the accept loop copies the whole future into its task, TLS or not.
            if h2 {
                let io = TokioIo::new(tls);
                Box::pin(serve_h2(io, who, listener, gateway, deadline, Some(info))).await
            } else {
                Box::pin(serve_http(
                    tls,
                    who,
                    listener,
                    gateway,
                    deadline,
                    Some(info),
                ))
                .await
            }
        }
        Ok(Err(e)) => debug!(client = %client, error = %e, "TLS handshake failed"),
        Err(_) => debug!(client = %client, "TLS handshake timed out (handshake_timeout)"),
    }
}

impl ConnectionContext {
    fn new(who: Who, listener: Arc<ListenerContext>, tls: Option<TlsInfo>) -> Arc<Self> {
        Arc::new(ConnectionContext {
            peer: who.peer,
            proxied: who.proxied,
            local: who.local,
            listener,
            tls,
            socket: std::sync::Mutex::new(who.socket),
            relays: std::sync::atomic::AtomicUsize::new(0),
            relays_done: tokio::sync::Notify::new(),
        })
    }
}

/// Who is at the other end, as far as the connection tells.
struct Who {
    peer: ClientAddr,
    proxied: bool,
    local: Option<SocketAddr>,
    socket: Option<OwnedFd>,
}

/// HTTP/2 (TLS listeners whose client chose `h2`): plain requests, and WebSockets as
/// extended CONNECT streams (RFC 8441). Each stream's flow control is its backpressure.
async fn serve_h2<I>(
    io: TokioIo<I>,
    who: Who,
    listener: Arc<ListenerContext>,
    gateway: &Gateway,
    deadline: Instant,
    tls: Option<TlsInfo>,
) where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Retiring (a binary upgrade, or the drain) ends the connection, not its WebSockets.
    let shutdown = listener.server.retire.clone();
    let peer = who.peer;
    let ctx = ConnectionContext::new(who, listener, tls);
    let context = ctx.clone();
    // Whether a request came yet: hyper's HTTP/2 server has no header-read timeout, so a
    // client that never sends its preface or a request is cut at `handshake_timeout` here.
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first = asked.clone();
    let service = service_fn(move |req| {
        first.store(true, std::sync::atomic::Ordering::Relaxed);
        super::upgrade::handle(req, ctx.clone())
    });
    let settings = &gateway.config.gateway;
    let force = context.listener.server.shutdown.force.clone();
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        // nginx's http2_max_concurrent_streams; each WebSocket is one stream.
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(settings.max_request_head_size as u32)
        // HTTP/2 PINGs find a dead connection under all of its streams at once.
        .keep_alive_interval(crate::config::defaults::PING.interval)
        .keep_alive_timeout(crate::config::defaults::PING.timeout);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let silent = async {
        tokio::time::sleep_until(deadline).await;
        if asked.load(std::sync::atomic::Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = silent => {
            debug!(client = %peer, "HTTP/2: no request within handshake_timeout");
            Ok(())
        }
        _ = shutdown.cancelled() => {
            // GOAWAY: no new streams. The WebSocket streams run on until they end (after a
            // binary upgrade) or are closed with 1001 by their relays (the drain); once none
            // is left the connection ends (also one that is idle or never sent its preface,
            // which hyper would otherwise wait for).
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                _ = context.no_relays() => Ok(()),
                _ = force.cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(client = %peer, error = %e, "HTTP/2 connection ended with an error");
    }
}

/// Concurrent streams per HTTP/2 connection (nginx's default is 128).
const H2_MAX_STREAMS: u32 = 128;

/// HTTP/1.1: the first request is read here, and a WebSocket upgrade answered without hyper
/// (`http1`); anything else, and every later request of the connection, is hyper's.
async fn serve_http<S: ClientStream>(
    mut stream: S,
    who: Who,
    listener: Arc<ListenerContext>,
    gateway: &Gateway,
    deadline: Instant,
    tls: Option<TlsInfo>,
) {
    let shutdown = listener.server.shutdown.graceful.clone();
    let peer = who.peer;
    let ctx = ConnectionContext::new(who, listener, tls);
    let max_head = gateway.config.gateway.max_request_head_size;
    let first = tokio::select! {
        // A whole head that came as the drain began is still answered.
        biased;
        // A slowloris client that trickles its head is cut off at the deadline.
        head = tokio::time::timeout_at(deadline, read_head(&mut stream, max_head)) => head,
        // Draining: a connection that has not sent a whole request is closed.
        _ = shutdown.cancelled() => return,
    };
    let read = match first {
        Ok(Ok(Head::Upgrade { request, rest })) => {
            // Boxed, as hyper boxes a request's future: the checks and the upstream's
            // handshake would be most of the connection's future, which the accept loop
            // copies whole into the box it spawns.
            return Box::pin(super::upgrade::handle_direct(request, ctx, stream, rest)).await;
        }
        Ok(Ok(Head::Other(read))) => read,
        Ok(Ok(Head::Gone)) => return,
        Ok(Err(e)) => {
            return debug!(client = %peer, error = %e, "connection failed before a request");
        }
        Err(_) => return debug!(client = %peer, "no whole request head within handshake_timeout"),
    };
    // Boxed, as it is the less common path: hyper's connection would double the size of
    // every connection's future until its upgrade.
    Box::pin(serve_hyper(
        Prefixed::new(read, stream),
        ctx,
        gateway,
        deadline,
    ))
    .await
}

/// hyper's HTTP/1.1 server for the rest of a connection whose first request was not an
/// upgrade (or not one this module reads).
async fn serve_hyper<S: ClientStream>(
    stream: Prefixed<S>,
    ctx: Arc<ConnectionContext>,
    gateway: &Gateway,
    deadline: Instant,
) {
    let shutdown = ctx.listener.server.retire.clone();
    let peer = ctx.peer;
    let max_head = gateway.config.gateway.max_request_head_size;
    let io = TokioIo::new(stream);
    let service = service_fn(move |req| super::upgrade::handle(req, ctx.clone()));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The rest of the deadline for the first head; later heads get as long.
        .header_read_timeout(deadline.saturating_duration_since(Instant::now()))
        // Heads larger than this are answered 431 by hyper.
        .max_buf_size(max_head);
    let conn = builder.serve_connection(io, service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            // Finish the request in progress, if any, then close; upgraded connections are
            // no longer hyper's and are drained by their relays.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(client = %peer, error = %e, "HTTP connection ended with an error");
    }
}
