//! One upgrade request, top to bottom: validate → route → Origin → connection budget →
//! connect the upstream → 101 → relay. Every failure becomes exactly one HTTP answer here
//! (SPEC §3) and at most one log line (rate-limited).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use super::connection::ConnectionContext;
use super::limits::{ConnectionPermit, LimitHit, PerIp, Permit};
use crate::config::{RouteConfig, Upstream};
use crate::gateway::Gateway;
use crate::handshake::{self, HandshakeError};
use crate::relay::{self, RelaySettings, Summary};
use crate::routing;
use crate::telemetry::ratelimit::Verdict;
use crate::upstream::{self, ClientHandshake, Connected, UpstreamError};

/// Why an upgrade request was not accepted.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Limit(#[from] LimitHit),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl Rejection {
    fn response(&self) -> Response<Full<Bytes>> {
        // A few seconds lets connections finish without inviting a stampede.
        const RETRY: &[(HeaderName, &str)] = &[(header::RETRY_AFTER, "5")];
        let (status, extra) = match self {
            Rejection::Handshake(e) => (e.status(), e.extra_headers()),
            Rejection::Limit(_) => (StatusCode::SERVICE_UNAVAILABLE, RETRY),
            Rejection::Upstream(e) => (e.status(), &[][..]),
        };
        // The client learns the category; the details of the upstream stay in the log.
        let body = match self {
            Rejection::Handshake(e) => format!("{e}\n"),
            Rejection::Limit(_) => "too many connections; try again later\n".into(),
            Rejection::Upstream(UpstreamError::Timeout { .. }) => {
                "the upstream did not answer in time\n".into()
            }
            Rejection::Upstream(_) => "the upstream is not reachable\n".into(),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // One refusal per connection: a client cannot pipeline requests and hold the
        // connection open by never reading the answers.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        for (name, value) in extra {
            headers.insert(name.clone(), HeaderValue::from_static(value));
        }
        response
    }
}

pub(super) async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ConnectionContext>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    match accept(&mut req, &conn, started).await {
        Ok(response) => Ok(response),
        Err(rejection) => {
            let server = &conn.listener.server;
            let response = rejection.response();
            let status = response.status().as_u16();
            server.metrics.rejected(status);
            if let Verdict::Log { suppressed } = server.rejection_log.check() {
                let path = req.uri().path();
                match &rejection {
                    Rejection::Upstream(e) => {
                        warn!(client = %conn.peer, path, status, suppressed, error = %e, "upgrade failed")
                    }
                    _ => {
                        info!(client = %conn.peer, path, status, suppressed, reason = %rejection, "upgrade refused")
                    }
                }
            }
            Ok(response)
        }
    }
}

async fn accept(
    req: &mut Request<Incoming>,
    conn: &Arc<ConnectionContext>,
    started: Instant,
) -> Result<Response<Full<Bytes>>, Rejection> {
    handshake::check_request_line(req)?;
    let path = req.uri().path();
    if routing::has_dot_segments(path) {
        return Err(HandshakeError::DotSegments.into());
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    // Each request sees the configuration in force when it arrives (hot reload).
    let gateway = conn.listener.server.gateway.load_full();
    let (route, tls) = gateway.route(host, path).ok_or(HandshakeError::NoRoute)?;
    let upgrade = handshake::validate(req)?;
    handshake::check_origin(upgrade.origin.as_deref(), route.allowed_origins.as_deref())?;
    let permit = acquire(conn, &gateway)?;

    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let upstream_path = match &route.upstream {
        Upstream::Ws { path, .. } => routing::upstream_path(&route.path, path, path_and_query),
        _ => String::new(),
    };
    let identity_header = gateway
        .listener(&conn.listener.key)
        .and_then(|(_, l)| l.tls.as_ref())
        .and_then(|t| t.identity_header.clone());
    let identity_value = conn.identity.as_ref().map(|i| i.to_string());
    let client_handshake = ClientHandshake {
        path_and_query: upstream_path,
        protocols: &upgrade.protocols,
        headers: req.headers(),
        identity: identity_header
            .as_deref()
            .map(|h| (h, identity_value.as_deref())),
    };
    let upstream_name = route.upstream.to_string();
    let metrics = &conn.listener.server.metrics;
    let connect_started = Instant::now();
    let connected = match upstream::connect(route, tls, &client_handshake).await {
        Ok(connected) => {
            metrics.upstream_connected(&upstream_name, connect_started.elapsed());
            connected
        }
        Err(e) => {
            metrics.upstream_failed(&upstream_name);
            return Err(e.into());
        }
    };
    let protocol = match &connected {
        Connected::WebSocket { protocol, .. } => protocol.clone(),
        Connected::Stream(_) => {
            handshake::select_protocol(&route.subprotocols, &upgrade.protocols).map(str::to_string)
        }
    };
    let response = handshake::switching_protocols(&upgrade.key, protocol.as_deref());
    spawn_relay(req, conn, &gateway, route, connected, permit, started);
    Ok(response)
}

/// Takes a slot in each connection budget: the gateway's, the listener's, the client IP's.
fn acquire(conn: &ConnectionContext, gateway: &Gateway) -> Result<ConnectionPermit, LimitHit> {
    let server = &conn.listener.server;
    let limits = &gateway.config.gateway;
    let listener_max = gateway
        .listener(&conn.listener.key)
        .and_then(|(_, l)| l.max_connections);
    let total = Permit::try_acquire(&server.total, Some(limits.max_connections))
        .ok_or(LimitHit::Gateway(limits.max_connections))?;
    let listener = Permit::try_acquire(&conn.listener.active, listener_max)
        .ok_or(LimitHit::Listener(listener_max.unwrap_or_default()))?;
    let ip = match limits.max_connections_per_ip {
        Some(max) => {
            Some(PerIp::try_acquire(&server.per_ip, conn.peer.ip(), max).ok_or(LimitHit::Ip(max))?)
        }
        None => None,
    };
    Ok(ConnectionPermit::new(total, listener, ip))
}

/// Starts the relay task. It waits for hyper to hand over the connection once the 101 has
/// been written, and is tracked so that shutdown waits for it.
fn spawn_relay(
    req: &mut Request<Incoming>,
    conn: &Arc<ConnectionContext>,
    gateway: &Gateway,
    route: &RouteConfig,
    connected: Connected,
    permit: ConnectionPermit,
    started: Instant,
) {
    let on_upgrade = hyper::upgrade::on(req);
    let conn = conn.clone();
    let settings = RelaySettings {
        max_message_size: route.max_message_size,
        max_frame_size: route.max_frame_size,
        close_timeout: gateway.config.gateway.close_timeout,
        idle_timeout: route.idle_timeout,
        ping: route.ping,
    };
    let listener_name = gateway
        .listener(&conn.listener.key)
        .map(|(_, l)| l.name.clone())
        .unwrap_or_default();
    let route_path = route.path.clone();
    let upstream_name = route.upstream.to_string();
    let server = conn.listener.server.clone();
    server.tracker.clone().spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                debug!(client = %conn.peer, error = %e, "client left before the upgrade completed");
                return;
            }
        };
        let metrics = &server.metrics;
        let _active = metrics.relay_started(&listener_name, &route_path);
        let flow = metrics.flow(&route_path);
        let shutdown = server.shutdown.clone();
        let client = TokioIo::new(upgraded);
        let summary = match connected {
            Connected::Stream(stream) => {
                relay::relay_stream(client, stream, settings, shutdown, flow).await
            }
            Connected::WebSocket { ws, .. } => {
                relay::relay_ws(client, ws, settings, shutdown, flow).await
            }
        };
        metrics.finished(
            &route_path,
            summary.close_code,
            summary.closed_by.as_str(),
            started.elapsed(),
        );
        log_summary(
            &conn,
            &listener_name,
            &route_path,
            &upstream_name,
            started,
            &summary,
        );
    });
}

/// The one line per finished connection (SPEC §5).
fn log_summary(
    conn: &ConnectionContext,
    listener: &str,
    route: &str,
    upstream: &str,
    started: Instant,
    s: &Summary,
) {
    let close_code = s.close_code.map(i64::from).unwrap_or(1006);
    info!(
        client = %conn.peer,
        listener = %listener,
        tls = conn.tls,
        client_cert = %conn.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
        route = %route,
        upstream = %upstream,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_from_client = s.bytes_from_client,
        bytes_to_client = s.bytes_to_client,
        messages_from_client = s.messages_from_client,
        messages_to_client = s.messages_to_client,
        close_code,
        closed_by = %s.closed_by.as_str(),
        detail = s.detail.as_deref().unwrap_or(""),
        "connection closed"
    );
}
