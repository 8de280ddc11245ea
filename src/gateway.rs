//! A configuration made ready to serve: the router built and every TLS file loaded. Built
//! once at start-up (and by `wsgate check`), so that a bad certificate is a start-up error
//! and never a per-connection one.

use std::sync::Arc;

use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ListenerConfig, RouteConfig, Upstream};
use crate::routing::Router;
use crate::tls::{self, TlsError};
use crate::upstream::{self, Pool};

pub struct Gateway {
    pub config: Config,
    router: Router,
    /// TLS acceptor per listener, in configuration order (`None` for plain ws://).
    acceptors: Vec<Option<TlsAcceptor>>,
    /// TLS connector per route, for wss:// upstreams.
    connectors: Vec<Option<TlsConnector>>,
    /// Upstream pool per route: balance state, health, connection counts. A reload starts
    /// fresh pools; connections keep the lease on the pool they were opened from.
    pools: Vec<Arc<Pool>>,
    /// Stops this configuration's health checks when it is replaced.
    health_checks: CancellationToken,
}

/// What a request is routed to.
pub struct RouteTarget<'a> {
    pub config: &'a RouteConfig,
    pub tls: Option<&'a TlsConnector>,
    pub pool: &'a Arc<Pool>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("listener {name:?}: {source}")]
    ListenerTls {
        name: String,
        #[source]
        source: TlsError,
    },
    #[error("route[{index}] (path {path:?}): {source}")]
    RouteTls {
        index: usize,
        path: String,
        #[source]
        source: TlsError,
    },
}

impl Gateway {
    pub fn prepare(config: Config) -> Result<Gateway, PrepareError> {
        let acceptors = config
            .listeners
            .iter()
            .map(|l| match &l.tls {
                None => Ok(None),
                Some(files) => tls::server_config(files)
                    .map(|c| Some(TlsAcceptor::from(c)))
                    .map_err(|source| PrepareError::ListenerTls {
                        name: l.name.clone(),
                        source,
                    }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let connectors = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let wss = r
                    .upstreams
                    .iter()
                    .any(|t| matches!(t.upstream, Upstream::Ws { tls: true, .. }));
                if !wss {
                    return Ok(None);
                }
                upstream::tls::connector(r)
                    .map(Some)
                    .map_err(|source| PrepareError::RouteTls {
                        index,
                        path: r.path.clone(),
                        source,
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
        for route in config.routes.iter().filter(|r| r.insecure_skip_verify) {
            tracing::warn!(
                route = %route.path,
                upstream = %route.upstream_names(),
                "insecure_skip_verify: the upstream's certificate is not checked; for tests only"
            );
        }
        let pools = config
            .routes
            .iter()
            .map(|r| Arc::new(Pool::new(r)))
            .collect();
        Ok(Gateway {
            router: Router::new(&config.routes),
            config,
            acceptors,
            connectors,
            pools,
            health_checks: CancellationToken::new(),
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
            if let Some(pool) = Arc::get_mut(&mut self.pools[index]) {
                pool.inherit(&old.pools[previous]);
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
        for (index, route) in self.config.routes.iter().enumerate() {
            upstream::health::spawn(
                route,
                self.pools[index].clone(),
                self.connectors[index].clone(),
                self.health_checks.child_token(),
                shutdown.clone(),
                metrics.clone(),
            );
        }
    }

    /// The route for a request, with its TLS connector and upstream pool.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<RouteTarget<'_>> {
        let index = self.router.find(host, path)?;
        Some(RouteTarget {
            config: &self.config.routes[index],
            tls: self.connectors[index].as_ref(),
            pool: &self.pools[index],
        })
    }

    pub fn acceptor(&self, listener: usize) -> Option<&TlsAcceptor> {
        self.acceptors.get(listener).and_then(Option::as_ref)
    }

    /// Every certificate, key and CA file the configuration names, for change detection.
    pub fn tls_files(&self) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for tls in self.config.listeners.iter().filter_map(|l| l.tls.as_ref()) {
            for pair in &tls.certs {
                files.push(pair.cert.clone());
                files.push(pair.key.clone());
            }
            files.extend(tls.client_auth.as_ref().map(|a| a.ca.clone()));
        }
        for route in &self.config.routes {
            files.extend(route.ca.clone());
            if let Some(pair) = &route.client_cert {
                files.push(pair.cert.clone());
                files.push(pair.key.clone());
            }
        }
        files
    }

    /// The listener a running socket belongs to in this configuration, with its index.
    pub fn listener(&self, key: &ListenerKey) -> Option<(usize, &ListenerConfig)> {
        self.config
            .listeners
            .iter()
            .enumerate()
            .find(|(_, l)| ListenerKey::of(l) == *key)
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
