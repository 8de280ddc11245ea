//! Reaching a route's upstream before the client is answered: pick one from the route's
//! pool, TCP or Unix connect, the PROXY header or TLS for `wss://`, and the client side of the
//! WebSocket handshake. Every phase of an attempt runs against one deadline, the route's
//! `connect_timeout`, and a timeout names the phase it cut. A failed attempt moves on to the
//! next upstream, within `connect_attempts` and `connect_budget`.

pub mod health;
mod introduction;
pub mod lines;
pub mod pool;
mod stream;
pub mod tls;
mod ws;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::warn;

pub use introduction::Introduction;
pub use pool::{Lease, Pool};
pub use stream::{UpstreamReader, UpstreamStream, UpstreamWriter};
pub use ws::{ClientHandshake, UpstreamWs, WsTransport, deflate_offers};

use crate::config::{RouteConfig, TcpKeepalive, Upstream, authority};
use crate::routing;
use crate::telemetry::Metrics;

/// What `connect` hands to the relay.
pub enum Connected {
    /// A byte stream (tcp:// or unix:) for the ws↔stream relay.
    Stream(UpstreamStream),
    /// An upgraded WebSocket, the subprotocol the upstream chose, and its
    /// permessage-deflate answer.
    WebSocket {
        ws: UpstreamWs,
        protocol: Option<String>,
        extensions: Option<String>,
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
    #[error("upstream {target}: sending the PROXY protocol header failed: {source}")]
    ProxyHeader {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "no upstream left to try ({attempts} attempted within connect_attempts and connect_budget)"
    )]
    Exhausted { attempts: usize },
}

impl UpstreamError {
    /// The status the client gets (SPEC §3): 504 when the upstream was too slow, else 502.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the next upstream may do better. An upstream that answered its handshake
    /// with a status is up and has said no; asking its neighbour would only hide that.
    fn try_next(&self) -> bool {
        !matches!(self, UpstreamError::Status { .. })
    }
}

/// Connects to one of a route's upstreams, moving on to the next after a connect error or
/// timeout. `proxy_header` is sent first to byte-stream upstreams (PROXY protocol).
/// Returns the connection and its lease on the upstream it reached.
pub async fn connect(
    route: &RouteConfig,
    pool: &Arc<Pool>,
    tls: Option<&TlsConnector>,
    handshake: &ClientHandshake<'_>,
    proxy_header: Option<&[u8]>,
    keepalive: Option<TcpKeepalive>,
    metrics: &Metrics,
) -> Result<(Connected, Lease), UpstreamError> {
    let budget = route.connect_budget.map(|b| Instant::now() + b);
    let mut tried = Vec::new();
    let mut last = None;
    while tried.len() < route.connect_attempts {
        let left = budget.map(|at| at.saturating_duration_since(Instant::now()));
        if left.is_some_and(|d| d.is_zero()) {
            break;
        }
        let Some(lease) = pool.pick(&tried) else {
            break;
        };
        let index = lease.index();
        tried.push(index);
        let attempt = Connection {
            route,
            upstream: pool.upstream(index),
            name: pool.name(index),
            tls,
            handshake,
            proxy_header,
            keepalive,
            timeout: left.map_or(route.connect_timeout, |d| d.min(route.connect_timeout)),
        };
        let started = Instant::now();
        let name = pool.name(index);
        match attempt.open().await {
            Ok(connected) => {
                pool.succeeded(index);
                metrics.upstream_connected(name, started.elapsed());
                return Ok((connected, lease));
            }
            Err(e) => {
                metrics.upstream_failed(name);
                if !e.try_next() {
                    return Err(e);
                }
                // A timeout the budget cut short says nothing about the upstream.
                let cut_short = matches!(e, UpstreamError::Timeout { .. })
                    && attempt.timeout < route.connect_timeout;
                let standing = if cut_short {
                    pool::Standing::Kept
                } else {
                    pool.failed(index)
                };
                if let pool::Standing::Ejected(cool_down) = standing {
                    metrics.upstream_ejected(name);
                    warn!(route = %route.path, upstream = %name, ?cool_down, error = %e, "upstream taken out of the rotation after failed connects (max_fails)");
                } else if tried.len() < route.connect_attempts.min(pool.len()) {
                    warn!(route = %route.path, upstream = %name, error = %e, "upstream failed; trying the next one");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(UpstreamError::Exhausted {
        attempts: tried.len(),
    }))
}

/// One attempt at one upstream.
pub(crate) struct Connection<'a> {
    pub route: &'a RouteConfig,
    pub upstream: &'a Upstream,
    /// `upstream` as errors name it.
    pub name: &'a str,
    pub tls: Option<&'a TlsConnector>,
    pub handshake: &'a ClientHandshake<'a>,
    pub proxy_header: Option<&'a [u8]>,
    /// For the TCP socket (see [`crate::sockets`]); `None` for health checks, which are
    /// short, and where turned off.
    pub keepalive: Option<TcpKeepalive>,
    pub timeout: Duration,
}

impl Connection<'_> {
    pub(crate) async fn open(&self) -> Result<Connected, UpstreamError> {
        let target = self.name;
        let deadline = Deadline {
            at: Instant::now() + self.timeout,
            after: self.timeout,
            target,
        };
        let connect_failed = |source| UpstreamError::Connect {
            target: target.to_string(),
            source,
        };
        let ws_request = |path: &str| {
            if self.handshake.map_path {
                routing::upstream_path(&self.route.path, path, &self.handshake.path_and_query)
            } else {
                self.handshake.path_and_query.clone()
            }
        };
        let handshake_failed = |e: ws::Failure| e.into_upstream_error(target);
        match self.upstream {
            Upstream::Tcp { host, port } => {
                let stream = deadline
                    .run(
                        Phase::Connect,
                        stream::connect_tcp(host, *port, self.keepalive.as_ref()),
                    )
                    .await?
                    .map_err(connect_failed)?;
                self.stream(UpstreamStream::Tcp(stream), &deadline).await
            }
            Upstream::Unix { path } => {
                let stream = deadline
                    .run(Phase::Connect, tokio::net::UnixStream::connect(path))
                    .await?
                    .map_err(connect_failed)?;
                self.stream(UpstreamStream::Unix(stream), &deadline).await
            }
            Upstream::WsUnix { socket, path } => {
                let stream = deadline
                    .run(Phase::Connect, tokio::net::UnixStream::connect(socket))
                    .await?
                    .map_err(connect_failed)?;
                // A Unix socket has no host name; "localhost" is what curl sends too.
                let (ws, agreed) = deadline
                    .run(
                        Phase::Handshake,
                        ws::handshake(
                            WsTransport::Unix(stream),
                            "localhost",
                            &ws_request(path),
                            self.handshake,
                        ),
                    )
                    .await?
                    .map_err(handshake_failed)?;
                Ok(Connected::WebSocket {
                    ws,
                    protocol: agreed.protocol,
                    extensions: agreed.extensions,
                })
            }
            Upstream::Ws {
                tls: use_tls,
                host,
                port,
                path,
            } => {
                let tcp = deadline
                    .run(
                        Phase::Connect,
                        stream::connect_tcp(host, *port, self.keepalive.as_ref()),
                    )
                    .await?
                    .map_err(connect_failed)?;
                let host_header = host_header(host, *port, *use_tls);
                let request = ws_request(path);
                let result = if *use_tls {
                    let refused = |reason: String| UpstreamError::Handshake {
                        target: target.to_string(),
                        reason,
                    };
                    let connector = self.tls.ok_or_else(|| {
                        refused("no TLS settings were prepared for this route".into())
                    })?;
                    let name =
                        tls::server_name(self.route.tls_server_name.as_deref().unwrap_or(host))
                            .map_err(refused)?;
                    let stream = deadline
                        .run(Phase::Tls, connector.connect(name, tcp))
                        .await?
                        .map_err(|source| UpstreamError::Tls {
                            target: target.to_string(),
                            source,
                        })?;
                    deadline
                        .run(
                            Phase::Handshake,
                            ws::handshake(
                                WsTransport::Tls(Box::new(stream)),
                                &host_header,
                                &request,
                                self.handshake,
                            ),
                        )
                        .await?
                } else {
                    deadline
                        .run(
                            Phase::Handshake,
                            ws::handshake(
                                WsTransport::Tcp(tcp),
                                &host_header,
                                &request,
                                self.handshake,
                            ),
                        )
                        .await?
                };
                let (ws, agreed) = result.map_err(handshake_failed)?;
                Ok(Connected::WebSocket {
                    ws,
                    protocol: agreed.protocol,
                    extensions: agreed.extensions,
                })
            }
        }
    }

    /// A byte-stream upstream is ready once the PROXY header, if any, is written.
    async fn stream(
        &self,
        mut stream: UpstreamStream,
        deadline: &Deadline<'_>,
    ) -> Result<Connected, UpstreamError> {
        if let Some(header) = self.proxy_header {
            deadline
                .run(Phase::Connect, stream.write_all(header))
                .await?
                .map_err(|source| UpstreamError::ProxyHeader {
                    target: deadline.target.to_string(),
                    source,
                })?;
        }
        Ok(Connected::Stream(stream))
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
