//! A configuration made ready to serve: the router built and every TLS file loaded. Built
//! once at start-up (and by `wsgate check`), so that a bad certificate is a start-up error
//! and never a per-connection one.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::{Config, ListenerConfig, RouteConfig, Upstream};
use crate::devcert::Ephemeral;
use crate::relay::RelaySettings;
use crate::routing::Router;
use crate::targets::TokenTable;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::Flow;
use crate::tls::{self, TlsError};
use crate::upstream::{self, Pool};

pub struct Gateway {
    pub config: Config,
    router: Router,
    /// Per listener, in configuration order: its TLS server configuration (`None` for plain ws://).
    listeners: Vec<PreparedListener>,
    /// Listeners by what identifies a running socket (see [`ListenerKey`]).
    listener_index: HashMap<ListenerKey, usize>,
    /// Per route, in configuration order: its TLS connector and upstream pool.
    routes: Vec<PreparedRoute>,
    /// Every header that carries a verified client identity on some listener: removed from
    /// every client request on every listener, so that only the gateway sets them.
    identity_headers: Arc<[HeaderName]>,
    /// Stops this configuration's health checks when it is replaced.
    health_checks: CancellationToken,
    /// The in-memory CA of `self_signed` listeners, handed on by reloads.
    ephemeral: Option<Arc<Ephemeral>>,
}

struct PreparedListener {
    /// Its name, shared by the log lines of its connections.
    name: Arc<str>,
    tls: Option<Arc<rustls::ServerConfig>>,
    identity_header: Option<HeaderName>,
    spki_sha256: Option<String>,
}

struct PreparedRoute {
    /// For wss:// upstreams.
    connector: Option<TlsConnector>,
    /// The route's authentication, keys and password files loaded.
    auth: Option<Arc<Authenticator>>,
    /// Token targets, read from their file or folder.
    tokens: Option<Arc<TokenTable>>,
    /// Balance state, health, connection counts; taken over from the previous
    /// configuration by [`Gateway::inherit_pools`]. Connections keep the lease on the pool
    /// they were opened from.
    pool: Arc<Pool>,
    relay: RouteRelay,
}

/// What every relay of a route shares, made once per configuration: its limits and timers
/// and its flow counters. A held connection keeps pointers to them, not copies (about 100
/// bytes of each connection's state), and its start makes neither.
pub struct RouteRelay {
    /// The route's path, which names it in metrics and log lines.
    path: Arc<str>,
    /// Without and with the gateway's own permessage-deflate (or the upstream's, passed
    /// through on ws routes).
    settings: [Arc<RelaySettings>; 2],
    flow: std::sync::OnceLock<Flow>,
}

impl RouteRelay {
    pub fn new(route: &RouteConfig, close_timeout: std::time::Duration) -> Self {
        let settings =
            |compressed| Arc::new(RelaySettings::of_route(route, close_timeout, compressed));
        Self {
            path: route.path.as_str().into(),
            settings: [settings(false), settings(true)],
            flow: std::sync::OnceLock::new(),
        }
    }

    pub fn settings(&self, compressed: bool) -> Arc<RelaySettings> {
        self.settings[usize::from(compressed)].clone()
    }

    pub fn path(&self) -> &Arc<str> {
        &self.path
    }

    /// The route's flow counters, looked up in `metrics` once.
    pub fn flow(&self, metrics: &Metrics) -> Flow {
        self.flow.get_or_init(|| metrics.flow(&self.path)).clone()
    }
}

/// A listener of this configuration, resolved once per request.
#[derive(Clone, Copy)]
pub struct ListenerRef<'a> {
    pub index: usize,
    pub config: &'a ListenerConfig,
    /// `config.name`, shared.
    pub name: &'a Arc<str>,
    pub tls: Option<&'a Arc<rustls::ServerConfig>>,
    /// The header this listener sets to a verified client certificate's identity.
    pub identity_header: Option<&'a HeaderName>,
}

/// What a request is routed to.
pub struct RouteTarget<'a> {
    pub config: &'a RouteConfig,
    pub tls: Option<&'a TlsConnector>,
    pub pool: &'a Arc<Pool>,
    pub relay: &'a RouteRelay,
    pub auth: Option<&'a Authenticator>,
    pub tokens: Option<&'a TokenTable>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("listener {name:?}: {source}")]
    ListenerTls {
        name: String,
        #[source]
        source: TlsError,
    },
    #[error("route[{index}] (path {path:?}): {reason}")]
    Route {
        index: usize,
        path: String,
        reason: String,
    },
    #[error("self_signed: cannot make the in-memory CA: {0}")]
    Ephemeral(String),
    #[error("route[{index}] (path {path:?}): {source}")]
    RouteTls {
        index: usize,
        path: String,
        #[source]
        source: TlsError,
    },
}

impl Gateway {
    /// Loads everything `config` names; a `self_signed` listener gets a new in-memory CA.
    pub fn prepare(config: Config) -> Result<Gateway, PrepareError> {
        Gateway::prepare_with(config, None)
    }

    /// As `prepare`, for a configuration that replaces `old`: `self_signed` listeners keep
    /// the CA and certificates `old` made, so clients that trust them go on trusting them.
    pub fn prepare_after(config: Config, old: &Gateway) -> Result<Gateway, PrepareError> {
        Gateway::prepare_with(config, old.ephemeral.clone())
    }

    fn prepare_with(
        config: Config,
        ephemeral: Option<Arc<Ephemeral>>,
    ) -> Result<Gateway, PrepareError> {
        let self_signed = config
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.self_signed.is_some()));
        let ephemeral = match ephemeral {
            Some(made) => Some(made),
            None if self_signed => Some(Arc::new(
                Ephemeral::new().map_err(|e| PrepareError::Ephemeral(e.to_string()))?,
            )),
            None => None,
        };
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let server_tls = match &l.tls {
                    None => None,
                    Some(settings) => {
                        Some(tls::server_config(settings, ephemeral.as_deref()).map_err(
                            |source| PrepareError::ListenerTls {
                                name: l.name.clone(),
                                source,
                            },
                        )?)
                    }
                };
                let spki_sha256 = server_tls.as_ref().and_then(|t| t.spki_sha256.clone());
                let tls = server_tls.map(|t| t.config);
                let identity_header = l
                    .tls
                    .as_ref()
                    .and_then(|t| t.identity_header.as_deref())
                    .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok());
                Ok(PreparedListener {
                    name: l.name.as_str().into(),
                    tls,
                    identity_header,
                    spki_sha256,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let wss = r
                    .upstreams
                    .iter()
                    .any(|t| matches!(t.upstream, Upstream::Ws { tls: true, .. }));
                let connector = if wss {
                    Some(
                        upstream::tls::connector(r).map_err(|source| PrepareError::RouteTls {
                            index,
                            path: r.path.clone(),
                            source,
                        })?,
                    )
                } else {
                    None
                };
                let failed = |reason: String| PrepareError::Route {
                    index,
                    path: r.path.clone(),
                    reason,
                };
                let auth = match &r.auth {
                    Some(auth) => Some(Arc::new(
                        Authenticator::prepare(auth).map_err(|e| failed(e.to_string()))?,
                    )),
                    None => None,
                };
                let tokens = match &r.targets {
                    Some(targets) => {
                        let table =
                            TokenTable::load(&targets.source).map_err(|e| failed(e.to_string()))?;
                        if table.is_empty() {
                            tracing::warn!(route = %r.path, "token targets: no token is defined yet; every upgrade gets 404 until one is");
                        }
                        if r.allowed_targets.is_empty() {
                            tracing::warn!(route = %r.path, "token targets without allowed_targets: a token may name any host and port; list the blocks the tokens may point at");
                        }
                        Some(Arc::new(table))
                    }
                    None => None,
                };
                Ok(PreparedRoute {
                    connector,
                    auth,
                    tokens,
                    pool: Arc::new(Pool::new(r)),
                    relay: RouteRelay::new(r, config.gateway.close_timeout),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for listener in &config.listeners {
            if listener.trusted.iter().any(|net| net.prefix_len() == 0) {
                tracing::warn!(
                    listener = %listener.name,
                    "trusted covers every address: any client can name itself in X-Forwarded-For or a PROXY header; list only your load balancers"
                );
            }
        }
        if config.gateway.allow_faults {
            let routes: Vec<&str> = config
                .routes
                .iter()
                .filter(|r| r.faults.is_some())
                .map(|r| r.path.as_str())
                .collect();
            tracing::warn!(
                routes = %routes.join(", "),
                "allow_faults: routes misbehave on purpose and /faults/… is open on the admin listener; for tests only"
            );
        }
        for route in config.routes.iter().filter(|r| r.insecure_skip_verify) {
            tracing::warn!(
                route = %route.path,
                upstream = %route.upstream_names(),
                "insecure_skip_verify: the upstream's certificate is not checked; for tests only"
            );
        }
        // Headers the gateway vouches for: listener (mTLS) and route (auth) identities, and
        // what a forward-auth service answers.
        let route_headers = config.routes.iter().flat_map(|r| {
            let forwarded = match &r.auth {
                Some(crate::config::Auth::Forward(f)) => f.copy_response_headers.clone(),
                _ => Vec::new(),
            };
            r.identity_header.iter().cloned().chain(forwarded)
        });
        let mut identity_headers: Vec<HeaderName> = listeners
            .iter()
            .filter_map(|l| l.identity_header.clone())
            .chain(route_headers.filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()))
            .collect();
        identity_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        identity_headers.dedup();
        let listener_index = config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (ListenerKey::of(l), i))
            .collect();
        Ok(Gateway {
            router: Router::new(&config),
            config,
            listeners,
            listener_index,
            routes,
            identity_headers: identity_headers.into(),
            health_checks: CancellationToken::new(),
            ephemeral,
        })
    }

    /// Takes over what `old` knows about upstreams that this configuration keeps (same
    /// route path and host, same upstream URL): open connection counts, ejections and
    /// health verdicts. Must run before the pools are shared (before serving).
    pub fn inherit_pools(&mut self, old: &Gateway) {
        for (index, route) in self.config.routes.iter().enumerate() {
            let Some(previous) = old
                .config
                .routes
                .iter()
                .position(|r| r.path == route.path && r.host == route.host)
            else {
                continue;
            };
            if let Some(pool) = Arc::get_mut(&mut self.routes[index].pool) {
                pool.inherit(&old.routes[previous].pool);
            }
        }
    }

    /// Starts the active health checks of the routes that have them. They run until this
    /// configuration is dropped (replaced by a reload) or `shutdown`.
    pub fn start_health_checks(
        &self,
        shutdown: &CancellationToken,
        metrics: &Arc<crate::telemetry::Metrics>,
    ) {
        for (route, prepared) in self.config.routes.iter().zip(&self.routes) {
            upstream::health::spawn(
                route,
                prepared.pool.clone(),
                prepared.connector.clone(),
                self.health_checks.child_token(),
                shutdown.clone(),
                metrics.clone(),
            );
        }
    }

    /// The route for a request on `listener`, with its TLS connector and upstream pool.
    /// Routes bound to other listeners do not exist here.
    pub fn route(
        &self,
        listener: usize,
        host: Option<&str>,
        path: &str,
    ) -> Option<RouteTarget<'_>> {
        let index = self.router.find(listener, host, path)?;
        let prepared = &self.routes[index];
        Some(RouteTarget {
            config: &self.config.routes[index],
            tls: prepared.connector.as_ref(),
            pool: &prepared.pool,
            relay: &prepared.relay,
            auth: prepared.auth.as_deref(),
            tokens: prepared.tokens.as_deref(),
        })
    }

    /// The in-memory CA of `self_signed` listeners, when there are any.
    pub fn ephemeral(&self) -> Option<&Arc<Ephemeral>> {
        self.ephemeral.as_ref()
    }

    /// base64 SHA-256 of the public key of listener `index`'s default certificate.
    pub fn listener_spki(&self, index: usize) -> Option<&str> {
        self.listeners.get(index)?.spki_sha256.as_deref()
    }

    /// Every identity header of every listener (see the field).
    pub fn identity_headers(&self) -> &[HeaderName] {
        &self.identity_headers
    }

    /// Every file the configuration loads when it is prepared (certificates, keys, CA files,
    /// JWT keys, htpasswd files, token files and folders), for change detection.
    pub fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for tls in self.config.listeners.iter().filter_map(|l| l.tls.as_ref()) {
            for pair in &tls.certs {
                files.push(pair.cert.clone());
                files.push(pair.key.clone());
            }
            files.extend(tls.client_auth.as_ref().map(|a| a.ca.clone()));
        }
        for route in &self.config.routes {
            if let Some(auth) = &route.auth {
                files.extend(Authenticator::files(auth));
            }
            if let Some(targets) = &route.targets {
                files.push(match &targets.source {
                    crate::config::TokenSource::File(path)
                    | crate::config::TokenSource::Dir(path) => path.clone(),
                });
            }
            files.extend(route.ca.clone());
            if let Some(pair) = &route.client_cert {
                files.push(pair.cert.clone());
                files.push(pair.key.clone());
            }
        }
        files
    }

    /// The listener a running socket belongs to in this configuration.
    pub fn listener(&self, key: &ListenerKey) -> Option<ListenerRef<'_>> {
        let index = *self.listener_index.get(key)?;
        let prepared = &self.listeners[index];
        Some(ListenerRef {
            index,
            config: &self.config.listeners[index],
            name: &prepared.name,
            tls: prepared.tls.as_ref(),
            identity_header: prepared.identity_header.as_ref(),
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.health_checks.cancel();
    }
}

/// What makes a listener "the same one" across reloads: its address; for port 0, which
/// binds anew each time, its address and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    bind: std::net::SocketAddr,
    name: Option<String>,
}

impl ListenerKey {
    pub fn of(listener: &ListenerConfig) -> ListenerKey {
        ListenerKey {
            bind: listener.bind,
            name: (listener.bind.port() == 0).then(|| listener.name.clone()),
        }
    }
}
