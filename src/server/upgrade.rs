//! One upgrade request, top to bottom, in the order the checks run:
//!
//! 1. the request line and Host (HTTP/1.1, or HTTP/2 with `:authority` as Host; exactly one
//!    Host): 400;
//! 2. the path, normalised (`routing::normalize_path`): 400 for dot segments or bad escapes;
//! 3. the route for (listener, Host, path): 404; a plain GET under its `web_root` is answered
//!    with the file here (after authentication, with `web_auth`: 401 or 403);
//! 4. the upgrade itself (RFC 6455 §4.2.1, no body; RFC 8441's extended CONNECT over
//!    HTTP/2): 405, 426, 400 or 501;
//! 5. the route's Origin allow-list: 403;
//! 6. faults (`allow_faults` only): the refusals ordered;
//! 7. authentication (`auth`): 401 or 403, 503 when a forward-auth service fails;
//! 8. the connection budgets (gateway, listener, client IP): 503;
//! 9. the token target (`targets`): 404, 403 outside `allowed_targets`;
//! 10. the upstream, connected and (ws) handshaken before the client hears anything: 502/504;
//! 11. the 101 (HTTP/2: 200), and the relay task, behind the fault layer when it applies.
//!
//! Every failure becomes exactly one HTTP answer here (SPEC §3) and at most one log line
//! (rate-limited).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either as Body, Full};
use hyper::body::Incoming;
use tokio_util::either::Either;
use tracing::{debug, info, warn};

use super::client::{ClientIo, ClientStream};
use super::connection::{ConnectionContext, RelayOnConnection};
use super::http1;
use super::limits::{ConnectionPermit, LimitHit, PerIp, Permit};
use crate::auth::{AuthError, Authenticated, Credentials};
use crate::config::{Framing, RouteConfig, Target, TokenFrom, Upstream};
use crate::faults;
use crate::forwarded::{self, ClientAddr};
use crate::gateway::{Gateway, ListenerRef, RouteRelay, RouteTarget};
use crate::handshake::{self, HandshakeError};
use crate::origin::{self, OriginRefused};
use crate::relay::{self, RelaySettings, Summary};
use crate::routing::{self, PathError};
use crate::targets::{TokenRefused, TokenTable};
use crate::telemetry::metrics::Flow;
use crate::telemetry::ratelimit::Verdict;
use crate::upstream::{self, Connected, Introduction, Lease, UpstreamError};
use crate::webroot::{self, FileBody};

/// Why an upgrade request was not accepted.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("no route for this path")]
    NoRoute,
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Origin(#[from] OriginRefused),
    #[error(transparent)]
    Limit(#[from] LimitHit),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("refused on purpose (faults: refuse_first or /faults/refuse)")]
    Fault(StatusCode),
    #[error("this route serves files (web_root) and has no upstream")]
    FilesOnly,
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Token(#[from] TokenRefused),
}

impl Rejection {
    fn response(&self) -> Response<Bytes> {
        // A few seconds lets connections finish without inviting a stampede.
        const RETRY: &[(HeaderName, &str)] = &[(header::RETRY_AFTER, "5")];
        let (status, extra) = match self {
            Rejection::Path(_) => (StatusCode::BAD_REQUEST, &[][..]),
            Rejection::NoRoute => (StatusCode::NOT_FOUND, &[][..]),
            Rejection::Handshake(e) => (e.status(), e.extra_headers()),
            Rejection::Origin(_) => (StatusCode::FORBIDDEN, &[][..]),
            Rejection::Limit(_) => (StatusCode::SERVICE_UNAVAILABLE, RETRY),
            Rejection::Upstream(e) => (e.status(), &[][..]),
            Rejection::Fault(status) => (*status, RETRY),
            Rejection::FilesOnly => (StatusCode::NOT_FOUND, &[][..]),
            Rejection::Auth(e) => (e.status(), &[][..]),
            Rejection::Token(TokenRefused::Missing | TokenRefused::Unknown) => {
                (StatusCode::NOT_FOUND, &[][..])
            }
            Rejection::Token(TokenRefused::NotAllowed { .. }) => (StatusCode::FORBIDDEN, &[][..]),
            Rejection::Token(TokenRefused::Unresolved { .. }) => (StatusCode::BAD_GATEWAY, &[][..]),
        };
        // The client learns the category; the details of the upstream stay in the log.
        let body = match self {
            Rejection::Limit(_) => "too many connections; try again later\n".into(),
            Rejection::Upstream(UpstreamError::Timeout { .. }) => {
                "the upstream did not answer in time\n".into()
            }
            Rejection::Upstream(_) => "the upstream is not reachable\n".into(),
            // Which token and where it points stay in the log.
            Rejection::Token(TokenRefused::NotAllowed { .. }) => {
                "the token's target is not allowed\n".into()
            }
            Rejection::Token(TokenRefused::Unresolved { .. }) => {
                "the token's target is not reachable\n".into()
            }
            Rejection::Auth(AuthError::InvalidToken(_)) => {
                "authentication failed: invalid token\n".into()
            }
            Rejection::Auth(AuthError::Unavailable(_)) => {
                "authentication is unavailable; try again later\n".into()
            }
            other => format!("{other}\n"),
        };
        let mut response = Response::new(Bytes::from(body));
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
        if let Rejection::Auth(e) = self
            && let Some(challenge) = e.challenge()
        {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

/// Responses: short text (refusals, the 101) or a file streamed from a web root.
pub(super) type GatewayBody = Body<Full<Bytes>, FileBody>;

pub(super) async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ConnectionContext>,
) -> Result<Response<GatewayBody>, Infallible> {
    if req.version() == http::Version::HTTP_2
        && !req.headers().contains_key(header::HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        // HTTP/2 names the host in `:authority`; as Host it routes, is forwarded and is
        // checked exactly as over HTTP/1.1.
        req.headers_mut().insert(header::HOST, host);
    }
    // HTTP/2: the stream counts on its connection from its first moment, so that a drain
    // that begins while the upstream is being reached waits for its answer and its 1001.
    let on_connection =
        (req.version() == http::Version::HTTP_2).then(|| RelayOnConnection::new(conn.clone()));
    Ok(match answer(&mut req, &conn).await {
        Answer::Served(response) => response,
        Answer::Upgraded(response, relay) => {
            relay.spawn(
                ClientSource::Hyper(hyper::upgrade::on(&mut req)),
                on_connection,
            );
            response.map(|b| Body::Left(Full::new(b)))
        }
        Answer::Refused(response) => response.map(|b| Body::Left(Full::new(b))),
    })
}

/// The first request of an HTTP/1.1 connection when it is a WebSocket upgrade, read without
/// hyper ([`super::http1`]): answered on `stream`, which then becomes the relay's client.
pub(super) async fn handle_direct<S: ClientStream>(
    mut req: Request<()>,
    conn: Arc<ConnectionContext>,
    mut stream: S,
    mut rest: Vec<u8>,
) {
    let peer = conn.peer;
    // While the checks and the upstream's handshake run, the client is watched as hyper
    // watches it: one that leaves cancels them (and gives back its slots at once); what it
    // sends meanwhile (frames in a hurry) is kept for the relay. Not a match's scrutinee:
    // the future would stay in this one's state (4.8 kB) beside the writes below.
    let answered = tokio::select! {
        answered = answer(&mut req, &conn) => answered,
        () = http1::watch(&mut stream, &mut rest) => {
            return debug!(client = %peer, "client left during its handshake");
        }
    };
    match answered {
        Answer::Upgraded(response, relay) => {
            if let Err(e) = http1::write_response(&mut stream, &response).await {
                // Dropping the relay gives back its connection slots and upstream.
                debug!(client = %peer, error = %e, "client left before the upgrade completed");
                return;
            }
            relay.spawn(ClientSource::Ready(stream.into_client(rest)), None);
        }
        Answer::Refused(response) => {
            // `Connection: close`, as every refusal says: written, then the end of the stream.
            if http1::write_response(&mut stream, &response).await.is_ok() {
                let _ = stream.shutdown().await;
            }
        }
        Answer::Served(_) => {
            // Not reached: `http1` hands over only requests that ask for an upgrade, and only
            // requests that do not are served from a web root.
            debug!(client = %peer, "a served response on the direct upgrade path; closed");
        }
    }
}

/// What became of a request.
enum Answer {
    /// Answered whole (a file of the web root).
    Served(Response<GatewayBody>),
    /// Accepted: the 101 (HTTP/2: 200), and the relay to start once it is written.
    Upgraded(Response<Bytes>, Relay),
    /// Refused; counted and logged.
    Refused(Response<Bytes>),
}

async fn answer<B>(req: &mut Request<B>, conn: &Arc<ConnectionContext>) -> Answer {
    let started = Instant::now();
    // Each request sees the configuration in force when it arrives (hot reload).
    let gateway = conn.listener.server.gateway.load_full();
    let Some(listener) = gateway.listener(&conn.listener.key) else {
        // Removed by a reload while this connection was open: it serves nothing now.
        return Answer::Refused(Rejection::NoRoute.response());
    };
    let config = listener.config;
    // Any PROXY header, even one that names no client, ends the chain of trust: what
    // follows it was written by whoever is behind the balancer.
    let trusted_peer = !conn.proxied && config.trusts(conn.peer.ip);
    let client = if trusted_peer {
        forwarded::real_client(conn.peer, req.headers(), config.trusted_header, |ip| {
            config.trusts(ip)
        })
    } else {
        conn.peer
    };
    let request = UpgradeRequest {
        conn,
        gateway: &gateway,
        listener,
        client,
        trusted_peer,
        started,
        token_in_path: std::sync::atomic::AtomicBool::new(false),
    };
    match request.accept(req).await {
        Ok(answer) => answer,
        Err(rejection) => {
            let server = &conn.listener.server;
            let response = rejection.response();
            let status = response.status().as_u16();
            server.metrics.rejected(status);
            if let Verdict::Log { suppressed } = server.rejection_log.check() {
                // Tokens are never logged: not a refused one, and on a route that takes its
                // token from the path, no path at all, whatever the refusal.
                let path = match &rejection {
                    _ if request.token_in_path.load(Relaxed) => "(not logged: it holds a token)",
                    Rejection::Token(_) => "(not logged: it may hold a token)",
                    _ => req.uri().path(),
                };
                match &rejection {
                    Rejection::Upstream(e) => {
                        warn!(%client, listener = %config.name, path, status, suppressed, error = %e, "upgrade failed")
                    }
                    _ => {
                        info!(%client, listener = %config.name, path, status, suppressed, reason = %rejection, "upgrade refused")
                    }
                }
            }
            Answer::Refused(response)
        }
    }
}

/// One upgrade request and who sent it.
struct UpgradeRequest<'a> {
    conn: &'a Arc<ConnectionContext>,
    gateway: &'a Arc<Gateway>,
    /// This connection's listener in `gateway`.
    listener: ListenerRef<'a>,
    /// The real client: the connection's peer, or whom a trusted proxy forwarded for.
    client: ClientAddr,
    /// The connection's peer is one of the listener's trusted proxies.
    trusted_peer: bool,
    started: Instant,
    /// The route takes its token from the path (`token_from = "path"`), which the log
    /// must then not show; known once the route is.
    token_in_path: std::sync::atomic::AtomicBool,
}

impl UpgradeRequest<'_> {
    /// The checks in the order of the module's list.
    async fn accept<B>(&self, req: &mut Request<B>) -> Result<Answer, Rejection> {
        let conn = self.conn;
        handshake::check_request_line(req)?;
        let path = routing::normalize_path(req.uri().path())?;
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let target = self
            .gateway
            .route(self.listener.index, host, &path)
            .ok_or(Rejection::NoRoute)?;
        let route = target.config;
        self.token_in_path.store(
            target.tokens.is_some()
                && route
                    .targets
                    .as_ref()
                    .is_some_and(|t| t.from == TokenFrom::Path),
            Relaxed,
        );
        if let Some(root) = &route.web_root
            && !handshake::wants_upgrade(req)
        {
            if route.web_auth {
                self.authenticate(&target, req, &[]).await?;
            }
            return Ok(Answer::Served(serve_file(root, route, &path, req).await));
        }
        if route.upstreams.is_empty() && target.tokens.is_none() {
            return Err(Rejection::FilesOnly);
        }
        let h2 = req.version() == http::Version::HTTP_2;
        let mut upgrade = if h2 {
            handshake::validate_h2(req)?
        } else {
            handshake::validate(req)?
        };
        origin::check(route.allowed_origins.as_deref(), upgrade.origin.as_deref())?;
        if self.gateway.config.gateway.allow_faults {
            let server = &conn.listener.server;
            if let Some(status) = server
                .faults
                .route(&route.path)
                .refusal(route.faults.as_ref())
            {
                server.metrics.fault(&route.path, "refuse").inc();
                return Err(Rejection::Fault(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                ));
            }
        }
        let authenticated = self.authenticate(&target, req, &upgrade.protocols).await?;
        if let Some(used) = &authenticated.used_protocol {
            // The token's carrier is the gateway's business: not offered upstream, not echoed.
            upgrade.protocols.retain(|p| p != used);
        }
        let permit = self.acquire()?;

        // Token targets: this connection's one upstream, from the token (or a JWT claim).
        let single = match target.tokens {
            Some(tokens) => Some(
                self.token_target(route, tokens, &authenticated, req, &path)
                    .await?,
            ),
            None => None,
        };
        let (route, pool, shared) = match &single {
            Some((route, pool, shared)) => (route, pool, shared),
            None => (route, target.pool, target.relay),
        };

        let introduction = Introduction {
            peer: conn.peer,
            client: self.client,
            trusted: self
                .trusted_peer
                .then_some(self.listener.config.trusted_header),
            tls: conn.tls.is_some(),
            server_name: conn.tls.as_ref().and_then(|t| t.server_name.as_deref()),
            local: conn.local.unwrap_or(self.listener.config.bind),
            identity: self
                .listener
                .identity_header
                .map(|name| (name, conn.identity().map(|i| i.to_string()))),
            identity_headers: self.gateway.identity_headers(),
        };
        // The normalised path goes upstream; the query as it came.
        let path_and_query = match req.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let mut client_handshake =
            introduction.handshake(route, path_and_query, &upgrade.protocols, req.headers());
        client_handshake
            .forwarding
            .set
            .extend(authenticated.headers.iter().cloned());
        if let (Some(name), Some(user)) = (&route.identity_header, &authenticated.name)
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(user),
            )
        {
            client_handshake.forwarding.set.push((name, value));
        }
        let proxy_header = introduction.proxy_header(route)?;
        let metrics = &conn.listener.server.metrics;
        let (connected, lease) = upstream::connect(
            route,
            pool,
            target.tls,
            &client_handshake,
            proxy_header.as_deref(),
            self.gateway.config.gateway.tcp_keepalive,
            metrics,
        )
        .await?;
        let (protocol, extensions) = match &connected {
            Connected::WebSocket {
                protocol,
                extensions,
                ..
            } => (protocol.clone(), extensions.clone()),
            Connected::Stream(_) => (
                handshake::select_protocol(&route.subprotocols, &upgrade.protocols)
                    .map(str::to_string),
                None,
            ),
        };
        let connected = match (route.framing, connected) {
            (Framing::Lines, Connected::Stream(stream)) => {
                // The line adapter is the relay's ws upstream, on an in-memory pipe.
                let (relay_end, adapter_end) = tokio::io::duplex(64 << 10);
                conn.listener.server.tracker.spawn(upstream::lines::adapt(
                    stream,
                    adapter_end,
                    route.max_message_size,
                ));
                Connected::WebSocket {
                    ws: crate::prefixed::Prefixed::new(
                        Vec::new(),
                        upstream::WsTransport::Pipe(relay_end),
                    ),
                    protocol: None,
                    extensions: None,
                }
            }
            (_, connected) => connected,
        };
        let mut response: Response<Bytes> = if h2 {
            handshake::connect_accepted(protocol.as_deref())
        } else {
            handshake::switching_protocols(&upgrade.key, protocol.as_deref())
        };
        // The upstream's permessage-deflate answer, as it gave it (RFC 7692 end to end);
        // on tcp routes with `compression`, the gateway's own.
        let compress =
            route.compression && !route.is_ws() && crate::compression::acceptable(req.headers());
        let answer = if compress {
            Some(crate::compression::RESPONSE.to_string())
        } else {
            extensions
        };
        if let Some(value) = answer.and_then(|e| HeaderValue::from_str(&e).ok()) {
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
        }
        metrics.upgraded(h2);
        let relay = self.relay(
            h2,
            route,
            pool,
            shared,
            connected,
            lease,
            permit,
            authenticated.name,
            compress,
        );
        Ok(Answer::Upgraded(response, relay))
    }

    /// The route's authentication, if it has one; failures are counted by reason.
    async fn authenticate<B>(
        &self,
        target: &RouteTarget<'_>,
        req: &Request<B>,
        protocols: &[String],
    ) -> Result<Authenticated, Rejection> {
        let Some(auth) = target.auth else {
            return Ok(Authenticated::default());
        };
        let credentials = Credentials {
            headers: req.headers(),
            uri: req.uri(),
            protocols,
            client: self.client,
            tls: self.conn.tls.is_some(),
        };
        auth.check(&credentials).await.map_err(|e| {
            let metrics = &self.conn.listener.server.metrics;
            metrics.auth_failed(&target.config.path, e.reason());
            Rejection::Auth(e)
        })
    }

    /// A copy of the route with the token's target as its one upstream, a pool of it, and
    /// what its relay shares (with no one).
    async fn token_target<B>(
        &self,
        route: &RouteConfig,
        tokens: &TokenTable,
        authenticated: &Authenticated,
        req: &Request<B>,
        path: &str,
    ) -> Result<(RouteConfig, Arc<upstream::Pool>, RouteRelay), Rejection> {
        let from = route.targets.as_ref().map_or(TokenFrom::Query, |t| t.from);
        let token = match &authenticated.target {
            Some(claimed) => Some(claimed.clone()),
            None => match from {
                TokenFrom::Query => req.uri().query().and_then(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == "token")
                        .map(|(_, v)| v.into_owned())
                }),
                TokenFrom::Path => path
                    .rsplit('/')
                    .next()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            },
        };
        let token = token.ok_or(TokenRefused::Missing)?;
        let addr = tokens
            .resolve(&token, &route.allowed_targets, route.connect_timeout)
            .await?;
        let mut single = route.clone();
        single.upstreams = vec![Target {
            upstream: Upstream::Tcp {
                host: addr.ip().to_string(),
                port: addr.port(),
            },
            weight: 1,
        }];
        single.connect_attempts = 1;
        let pool = Arc::new(upstream::Pool::new(&single));
        let shared = RouteRelay::new(&single, self.gateway.config.gateway.close_timeout);
        Ok((single, pool, shared))
    }

    /// Takes a slot in each connection budget: the gateway's, the listener's, the client
    /// IP's (the real client's, when a trusted proxy named it).
    fn acquire(&self) -> Result<ConnectionPermit, LimitHit> {
        let (conn, gateway) = (self.conn, self.gateway);
        let server = &conn.listener.server;
        let limits = &gateway.config.gateway;
        let listener_max = self.listener.config.max_connections;
        let total = Permit::try_acquire(&server.total, Some(limits.max_connections))
            .ok_or(LimitHit::Gateway(limits.max_connections))?;
        let listener = Permit::try_acquire(&conn.listener.active, listener_max)
            .ok_or(LimitHit::Listener(listener_max.unwrap_or_default()))?;
        let ip = match limits.max_connections_per_ip {
            Some(max) => Some(
                PerIp::try_acquire(&server.per_ip, self.client.ip, max).ok_or(LimitHit::Ip(max))?,
            ),
            None => None,
        };
        Ok(ConnectionPermit::new(total, listener, ip))
    }

    /// Everything the relay of an accepted upgrade needs but the client's stream, which
    /// comes once the 101 has been written.
    #[allow(clippy::too_many_arguments)] // one call site: the parts of one accepted upgrade
    fn relay(
        &self,
        h2: bool,
        route: &RouteConfig,
        pool: &Arc<upstream::Pool>,
        shared: &RouteRelay,
        connected: Connected,
        lease: Lease,
        permit: ConnectionPermit,
        user: Option<String>,
        compress: bool,
    ) -> Relay {
        // The gateway's own (tcp and unix routes), or the upstream's (ws routes).
        let compressed = compress
            || matches!(
                connected,
                Connected::WebSocket {
                    extensions: Some(_),
                    ..
                }
            );
        let settings = shared.settings(compressed);
        let flow = shared.flow(&self.conn.listener.server.metrics);
        let done = Finished {
            client: self.client,
            listener: self.listener.name.clone(),
            route: shared.path().clone(),
            tls: self.conn.tls.is_some(),
            client_cert: self.conn.identity().map(|i| i.to_string().into_boxed_str()),
            upstream: pool.name(lease.index()).clone(),
            user,
            http: if h2 { "2" } else { "1.1" },
            started: self.started,
            _permit: permit,
            _lease: lease,
        };
        let injection = self
            .gateway
            .config
            .gateway
            .allow_faults
            .then(|| Box::new(self.injection(route, &settings)));
        Relay {
            conn: self.conn.clone(),
            done,
            injection,
            // Unpacked only after the upgrade: captured as they are, they would stay in the
            // task's state for the connection's life next to the relay made of them.
            parts: Box::new((settings, flow, connected)),
        }
    }
}

/// Where the relay's client comes from.
enum ClientSource {
    /// hyper hands the connection over once it has written the 101 (HTTP/2: the stream).
    Hyper(hyper::upgrade::OnUpgrade),
    /// The 101 is written; the stream is the client.
    Ready(ClientIo),
}

/// An accepted upgrade's relay, before it has its client.
struct Relay {
    conn: Arc<ConnectionContext>,
    done: Finished,
    injection: Option<Box<faults::Injection>>,
    parts: Box<(Arc<RelaySettings>, Flow, Connected)>,
}

impl Relay {
    /// Starts the relay task, tracked so that shutdown waits for it.
    /// `on_connection` counts it on an HTTP/2 connection (whose drain waits for its streams).
    fn spawn(self, client: ClientSource, on_connection: Option<RelayOnConnection>) {
        let Relay {
            conn,
            done,
            injection,
            parts,
        } = self;
        let server = conn.listener.server.clone();
        // Not inside the connection's span: a span lives in the subscriber's registry for as
        // long as a task holds it (about 0.4 kB a connection) and is entered at every poll of
        // the relay. The relay's one line names client and listener itself.
        //
        // Boxed: tokio copies a task's whole future into its cell and copies the cell's stage
        // over twice more when the task ends (3 kB each time here, 3% of a handshake's
        // instructions), and rounds the cell up to whole cache lines.
        // The client comes boxed: a capture keeps its room in the task for the connection's
        // whole life, and the stream moves on into the relay's state.
        let client = Box::new(client);
        server.tracker.clone().spawn(Box::pin(async move {
            let client = match *client {
                ClientSource::Ready(client) => client,
                ClientSource::Hyper(on_upgrade) => match on_upgrade.await {
                    Ok(upgraded) => super::client::upgraded(upgraded),
                    Err(e) => {
                        debug!(client = %done.client, error = %e, "client left before the upgrade completed");
                        return;
                    }
                },
            };
            let metrics = &server.metrics;
            let _active = metrics.relay_started(&done.listener, &done.route);
            let _on_connection = on_connection;
            // Made in a block of its own, so that nothing it was made of stays in the task's
            // state beside it while it runs.
            let relay = {
                let shutdown = server.shutdown.clone();
                let (settings, flow, connected) = *parts;
                match injection {
                    None => Either::Left(match connected {
                        Connected::Stream(stream) => Either::Left(relay::relay_stream(
                            client, stream, settings, shutdown, flow,
                        )),
                        Connected::WebSocket { ws, .. } => {
                            Either::Right(relay::relay_ws(client, ws, settings, shutdown, flow))
                        }
                    }),
                    Some(injection) => Either::Right(Box::pin(faulted(
                        client, connected, settings, shutdown, flow, *injection,
                    ))),
                }
            };
            let summary = relay.await;
            metrics.finished(
                &done.route,
                summary.close_code,
                summary.closed_by.as_str(),
                done.started.elapsed(),
            );
            log_summary(&done, &summary);
        }));
    }
}

impl UpgradeRequest<'_> {
    /// What the fault layer of a connection on `route` needs (`allow_faults` only).
    fn injection(&self, route: &RouteConfig, settings: &RelaySettings) -> faults::Injection {
        let server = &self.conn.listener.server;
        let counter = |fault| server.metrics.fault(&route.path, fault);
        faults::Injection {
            faults: route.faults.clone().unwrap_or_default(),
            orders: server.faults.route(&route.path).orders(),
            counters: faults::Counters {
                latency: counter("latency"),
                fragment: counter("fragment"),
                close: counter("close"),
                reset: counter("reset"),
                stall: counter("stall"),
            },
            socket: self
                .conn
                .socket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
            max_frame_size: settings.max_frame_size,
            close_timeout: settings.close_timeout,
            shutdown: server.shutdown.clone(),
        }
    }
}

/// The relay behind the fault layer (`allow_faults`), which sits on an in-memory pipe: the
/// relay's client is the pipe's end.
async fn faulted<C>(
    client: C,
    connected: Connected,
    settings: Arc<RelaySettings>,
    shutdown: crate::relay::ShutdownSignals,
    flow: Flow,
    injection: faults::Injection,
) -> Summary
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Room for a few frames in flight; the pipe applies backpressure beyond it.
    const PIPE: usize = 64 << 10;
    let (relay_end, layer_end) = tokio::io::duplex(PIPE);
    let relay = match connected {
        Connected::Stream(stream) => Either::Left(relay::relay_stream(
            relay_end, stream, settings, shutdown, flow,
        )),
        Connected::WebSocket { ws, .. } => {
            Either::Right(relay::relay_ws(relay_end, ws, settings, shutdown, flow))
        }
    };
    let (mut summary, outcome) =
        tokio::join!(relay, faults::interpose(client, layer_end, injection));
    if let Some(detail) = outcome.detail() {
        summary.closed_by = crate::relay::Side::Gateway;
        summary.close_code = match outcome {
            faults::Outcome::Closed(code) => Some(code),
            _ => None,
        };
        summary.detail = Some(detail);
    }
    summary
}

/// A plain GET or HEAD under a route's web root.
async fn serve_file<B>(
    root: &std::path::Path,
    route: &RouteConfig,
    path: &str,
    req: &Request<B>,
) -> Response<GatewayBody> {
    let rest = if route.path == "/" {
        path
    } else {
        path.strip_prefix(route.path.as_str()).unwrap_or("")
    };
    match webroot::serve(root, rest, req.method(), req.headers()).await {
        webroot::Served::File(response) => response.map(Body::Right),
        webroot::Served::Error(status, body) => {
            let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            if status == StatusCode::METHOD_NOT_ALLOWED {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            response.map(Body::Left)
        }
    }
}

/// What the log line of a finished connection names.
struct Finished {
    client: ClientAddr,
    listener: Arc<str>,
    route: Arc<str>,
    /// Over TLS, and the verified client certificate's identity (the connection's context
    /// is not kept for the relay's life only to tell these).
    tls: bool,
    client_cert: Option<Box<str>>,
    upstream: std::sync::Arc<str>,
    /// The authenticated name, when the route authenticates.
    user: Option<String>,
    /// The HTTP version the WebSocket came over: "1.1" (Upgrade) or "2" (RFC 8441).
    http: &'static str,
    started: Instant,
    /// Held for the connection's life: its slots in the connection budgets, and its upstream's
    /// share of the pool's balancing.
    _permit: ConnectionPermit,
    _lease: Lease,
}

/// The one line per finished connection (SPEC §5).
fn log_summary(done: &Finished, s: &Summary) {
    let close_code = s.close_code.map(i64::from).unwrap_or(1006);
    info!(
        client = %done.client,
        listener = %done.listener,
        tls = done.tls,
        http = done.http,
        client_cert = %done.client_cert.as_deref().unwrap_or(""),
        route = %done.route,
        upstream = %done.upstream,
        user = done.user.as_deref().unwrap_or(""),
        duration_ms = done.started.elapsed().as_millis() as u64,
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
