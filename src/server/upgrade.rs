//! One upgrade request, top to bottom: validate → route → Origin → connect the upstream →
//! 101 → relay. Every failure becomes exactly one HTTP answer here (SPEC §3) and one log line.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fastwebsockets::{Role, WebSocket};
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use super::connection::ConnectionContext;
use crate::config::{RouteConfig, Upstream};
use crate::handshake::{self, HandshakeError};
use crate::relay::{self, RelaySettings, Summary};
use crate::routing;
use crate::upstream::{self, ClientHandshake, Connected, UpstreamError};

/// Why an upgrade request was not accepted.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl Rejection {
    fn response(&self) -> Response<Full<Bytes>> {
        let (status, extra) = match self {
            Rejection::Handshake(e) => (e.status(), e.extra_headers()),
            Rejection::Upstream(e) => (e.status(), &[][..]),
        };
        // The client learns the category; the details of the upstream stay in the log.
        let body = match self {
            Rejection::Handshake(e) => format!("{e}\n"),
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
            conn.listener.stats.rejected();
            let response = rejection.response();
            let status = response.status().as_u16();
            let path = req.uri().path();
            match &rejection {
                Rejection::Upstream(e) => {
                    warn!(client = %conn.peer, listener = %conn.listener.name, path, status, error = %e, "upgrade failed")
                }
                Rejection::Handshake(e) => {
                    info!(client = %conn.peer, listener = %conn.listener.name, path, status, reason = %e, "upgrade refused")
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
    let gateway = conn.listener.gateway.clone();
    let (route, tls) = gateway.route(host, path).ok_or(HandshakeError::NoRoute)?;
    let upgrade = handshake::validate(req)?;
    handshake::check_origin(upgrade.origin.as_deref(), route.allowed_origins.as_deref())?;

    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let upstream_path = match &route.upstream {
        Upstream::Ws { path, .. } => routing::upstream_path(&route.path, path, path_and_query),
        _ => String::new(),
    };
    let client_handshake = ClientHandshake {
        path_and_query: upstream_path,
        protocols: &upgrade.protocols,
        headers: req.headers(),
    };
    let connected = upstream::connect(route, tls, &client_handshake).await?;
    let protocol = match &connected {
        Connected::WebSocket { protocol, .. } => protocol.clone(),
        Connected::Stream(_) => {
            handshake::select_protocol(&route.subprotocols, &upgrade.protocols).map(str::to_string)
        }
    };
    let response = handshake::switching_protocols(&upgrade.key, protocol.as_deref());
    spawn_relay(req, conn, route, connected, started);
    Ok(response)
}

/// Starts the relay task. It waits for hyper to hand over the connection once the 101 has
/// been written, and is tracked so that shutdown waits for it.
fn spawn_relay(
    req: &mut Request<Incoming>,
    conn: &Arc<ConnectionContext>,
    route: &RouteConfig,
    connected: Connected,
    started: Instant,
) {
    let on_upgrade = hyper::upgrade::on(req);
    let conn = conn.clone();
    let settings = RelaySettings {
        max_message_size: route.max_message_size,
        close_timeout: conn.listener.gateway.config.gateway.close_timeout,
    };
    let route_path = route.path.clone();
    let upstream_name = route.upstream.to_string();
    let shutdown = conn.listener.shutdown.clone();
    let tracker = conn.listener.tracker.clone();
    tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                debug!(client = %conn.peer, error = %e, "client left before the upgrade completed");
                return;
            }
        };
        let _active = conn.listener.stats.relay_started();
        let client = WebSocket::after_handshake(TokioIo::new(upgraded), Role::Server);
        let summary = match connected {
            Connected::Stream(stream) => {
                relay::relay_stream(client, stream, settings, shutdown).await
            }
            Connected::WebSocket { ws, .. } => {
                relay::relay_ws(client, ws, settings, shutdown).await
            }
        };
        log_summary(&conn, &route_path, &upstream_name, started, &summary);
    });
}

/// The one line per finished connection (SPEC §5).
fn log_summary(
    conn: &ConnectionContext,
    route: &str,
    upstream: &str,
    started: Instant,
    s: &Summary,
) {
    let close_code = s.close_code.map(i64::from).unwrap_or(1006);
    info!(
        client = %conn.peer,
        listener = %conn.listener.name,
        tls = conn.tls,
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
