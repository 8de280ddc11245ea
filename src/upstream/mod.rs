//! Reaching a route's upstream before the client is answered: TCP or Unix connect, TLS for
//! `wss://`, and the client side of the WebSocket handshake. Every phase runs against one
//! deadline, the route's `connect_timeout`, and a timeout names the phase it cut.

mod stream;
pub mod tls;
mod ws;

use std::io;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

pub use stream::{UpstreamReader, UpstreamStream, UpstreamWriter};
pub use ws::{ClientHandshake, UpstreamWs};

use crate::config::{RouteConfig, Upstream, authority};

/// What `connect` hands to the relay.
pub enum Connected {
    /// A byte stream (tcp:// or unix:) for the ws↔stream relay.
    Stream(UpstreamStream),
    /// An upgraded WebSocket and the subprotocol the upstream chose.
    WebSocket {
        ws: UpstreamWs,
        protocol: Option<String>,
    },
}

/// The phase of reaching an upstream, named in errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Tls,
    Handshake,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Tls => "TLS handshake",
            Phase::Handshake => "WebSocket handshake",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {target}: connect failed: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("upstream {target}: {phase} did not finish within {after:?} (connect_timeout)")]
    Timeout {
        target: String,
        phase: Phase,
        after: Duration,
    },
    #[error("upstream {target}: TLS handshake failed: {source}")]
    Tls {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("upstream {target}: answered the WebSocket handshake with status {status}")]
    Status { target: String, status: StatusCode },
    #[error("upstream {target}: bad WebSocket handshake: {reason}")]
    Handshake { target: String, reason: String },
}

impl UpstreamError {
    /// The status the client gets (SPEC §3): 504 when the upstream was too slow, else 502.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Connects to a route's upstream. `handshake` carries what a ws:// upstream needs.
pub async fn connect(
    route: &RouteConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
    handshake: &ClientHandshake<'_>,
) -> Result<Connected, UpstreamError> {
    let deadline = Instant::now() + route.connect_timeout;
    let target = route.upstream.to_string();
    let deadline = Deadline {
        at: deadline,
        after: route.connect_timeout,
        target: &target,
    };
    let connect_failed = |source| UpstreamError::Connect {
        target: target.clone(),
        source,
    };
    match &route.upstream {
        Upstream::Tcp { host, port } => {
            let stream = deadline
                .run(Phase::Connect, stream::connect_tcp(host, *port))
                .await?
                .map_err(connect_failed)?;
            Ok(Connected::Stream(UpstreamStream::Tcp(stream)))
        }
        Upstream::Unix { path } => {
            let stream = deadline
                .run(Phase::Connect, tokio::net::UnixStream::connect(path))
                .await?
                .map_err(connect_failed)?;
            Ok(Connected::Stream(UpstreamStream::Unix(stream)))
        }
        Upstream::Ws {
            tls: use_tls,
            host,
            port,
            ..
        } => {
            let tcp = deadline
                .run(Phase::Connect, stream::connect_tcp(host, *port))
                .await?
                .map_err(connect_failed)?;
            let host_header = host_header(host, *port, *use_tls);
            let result = if *use_tls {
                let refused = |reason: String| UpstreamError::Handshake {
                    target: target.clone(),
                    reason,
                };
                let connector = tls.ok_or_else(|| {
                    refused("no TLS settings were prepared for this route".into())
                })?;
                let name = tls::server_name(route.tls_server_name.as_deref().unwrap_or(host))
                    .map_err(refused)?;
                let stream = deadline
                    .run(Phase::Tls, connector.connect(name, tcp))
                    .await?
                    .map_err(|source| UpstreamError::Tls {
                        target: target.clone(),
                        source,
                    })?;
                deadline
                    .run(
                        Phase::Handshake,
                        ws::handshake(stream, &host_header, handshake),
                    )
                    .await?
            } else {
                deadline
                    .run(
                        Phase::Handshake,
                        ws::handshake(tcp, &host_header, handshake),
                    )
                    .await?
            };
            let (ws, protocol) = result.map_err(|e| e.into_upstream_error(&target))?;
            Ok(Connected::WebSocket { ws, protocol })
        }
    }
}

/// Every phase runs against the same deadline; a timeout names the phase it cut.
struct Deadline<'a> {
    at: Instant,
    after: Duration,
    target: &'a str,
}

impl Deadline<'_> {
    async fn run<T>(
        &self,
        phase: Phase,
        step: impl std::future::Future<Output = T>,
    ) -> Result<T, UpstreamError> {
        tokio::time::timeout_at(self.at, step)
            .await
            .map_err(|_| UpstreamError::Timeout {
                target: self.target.to_string(),
                phase,
                after: self.after,
            })
    }
}

/// Host header for the upstream request: the port only when it is not the scheme's default.
fn host_header(host: &str, port: u16, tls: bool) -> String {
    let default = if tls { 443 } else { 80 };
    if port == default {
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        }
    } else {
        authority(host, port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC §3: a non-101 answer is a 502, with the upstream's status in the log line.
    #[test]
    fn a_refused_upstream_handshake_names_its_status() {
        let e = UpstreamError::Status {
            target: "ws://backend:9001/ws".into(),
            status: StatusCode::FORBIDDEN,
        };
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(e.to_string().contains("403 Forbidden"), "{e}");
        assert!(e.to_string().contains("ws://backend:9001/ws"), "{e}");
    }

    #[test]
    fn timeouts_are_504_and_name_the_phase() {
        let e = UpstreamError::Timeout {
            target: "wss://api:443/".into(),
            phase: Phase::Tls,
            after: Duration::from_secs(5),
        };
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(e.to_string().contains("TLS handshake"), "{e}");
    }
}
