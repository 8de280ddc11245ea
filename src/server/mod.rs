//! Listening: bind, accept with back-off, then one task per connection that does TLS and
//! HTTP (`connection`) and, for upgrades, the handshake and relay (`upgrade`).
//!
//! The accept loop only accepts: TLS and everything else slow happen in the spawned task,
//! so one slow client cannot hold up the others.

mod connection;
mod upgrade;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::gateway::Gateway;
use crate::telemetry::Stats;

#[derive(Debug, thiserror::Error)]
#[error("listener {name:?}: cannot listen on {addr}: {source}{hint}")]
pub struct BindError {
    pub name: String,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
    hint: &'static str,
}

/// Binds every listener of the configuration, in order.
pub async fn bind(gateway: &Gateway) -> Result<Vec<TcpListener>, BindError> {
    let mut listeners = Vec::new();
    for l in &gateway.config.listeners {
        let listener = TcpListener::bind(l.bind).await.map_err(|source| {
            let hint = match source.kind() {
                io::ErrorKind::AddrInUse => {
                    "; another process uses this port: stop it or choose another bind address"
                }
                io::ErrorKind::PermissionDenied => {
                    "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
                }
                io::ErrorKind::AddrNotAvailable => "; this machine has no such address",
                _ => "",
            };
            BindError {
                name: l.name.clone(),
                addr: l.bind,
                source,
                hint,
            }
        })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Serves until `shutdown` fires, then stops accepting, lets relays send Close 1001 and
/// waits for them, at most `shutdown_timeout`.
pub async fn run(
    gateway: Arc<Gateway>,
    listeners: Vec<TcpListener>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let name = gateway.config.listeners[index].name.clone();
        match listener.local_addr() {
            Ok(addr) => {
                info!(listener = %name, %addr, tls = gateway.acceptor(index).is_some(), "listening")
            }
            Err(e) => warn!(listener = %name, error = %e, "listening (address unknown)"),
        }
        let ctx = connection::ListenerContext {
            index,
            name,
            gateway: gateway.clone(),
            stats: stats.clone(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
        };
        tracker.spawn(accept_loop(listener, Arc::new(ctx)));
    }
    shutdown.cancelled().await;
    tracker.close();
    let timeout = gateway.config.gateway.shutdown_timeout;
    if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
        warn!(
            open = tracker.len(),
            "shutdown_timeout ({timeout:?}) passed; closing the connections that are still open"
        );
    } else {
        info!("all connections closed");
    }
}

/// Accepts until shutdown. Errors (EMFILE when out of file descriptors, ECONNABORTED) are
/// logged and retried after a growing pause, so the loop neither exits nor spins.
async fn accept_loop(listener: TcpListener, ctx: Arc<connection::ListenerContext>) {
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                // Frames are written whole; Nagle would only delay interactive traffic.
                let _ = stream.set_nodelay(true);
                ctx.tracker
                    .spawn(connection::serve(stream, peer, ctx.clone()));
            }
            Err(e) => {
                error!(listener = %ctx.name, error = %e, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
