//! One client connection before its upgrade: TLS, then HTTP/1.1 with hyper.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::ListenerContext;
use crate::gateway::Gateway;
use crate::tls::ClientIdentity;

/// Per connection: who it is and on which listener.
pub(super) struct ConnectionContext {
    pub peer: SocketAddr,
    pub listener: Arc<ListenerContext>,
    pub tls: bool,
    /// The verified client certificate's identity (mTLS listeners).
    pub identity: Option<ClientIdentity>,
}

pub(super) async fn serve(stream: TcpStream, peer: SocketAddr, listener: Arc<ListenerContext>) {
    // The configuration in force when the connection arrived decides its TLS and limits.
    let gateway = listener.server.gateway.load_full();
    let Some((index, _)) = gateway.listener(&listener.key) else {
        return; // removed by a reload a moment ago
    };
    // `handshake_timeout` covers the TLS handshake and the request head together.
    let deadline = Instant::now() + gateway.config.gateway.handshake_timeout;
    let Some(acceptor) = gateway.acceptor(index).cloned() else {
        let io = TokioIo::new(stream);
        return serve_http(io, peer, listener, &gateway, deadline, None).await;
    };
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            // rustls has verified the chain; only its identity is read here.
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(ClientIdentity::from_certificate);
            let io = TokioIo::new(tls);
            serve_http(io, peer, listener, &gateway, deadline, Some(identity)).await
        }
        Ok(Err(e)) => debug!(client = %peer, error = %e, "TLS handshake failed"),
        Err(_) => debug!(client = %peer, "TLS handshake timed out (handshake_timeout)"),
    }
}

async fn serve_http<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    listener: Arc<ListenerContext>,
    gateway: &Gateway,
    deadline: Instant,
    tls: Option<Option<ClientIdentity>>,
) where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let shutdown = listener.server.shutdown.graceful.clone();
    let ctx = Arc::new(ConnectionContext {
        peer,
        listener,
        tls: tls.is_some(),
        identity: tls.flatten(),
    });
    let service = service_fn(move |req| super::upgrade::handle(req, ctx.clone()));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // A slowloris client that trickles its head is cut off at the deadline.
        .header_read_timeout(deadline.saturating_duration_since(Instant::now()))
        // Heads larger than this are answered 431 by hyper.
        .max_buf_size(gateway.config.gateway.max_request_head_size);
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
