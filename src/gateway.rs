//! A configuration made ready to serve: the router built and every TLS file loaded. Built
//! once at start-up (and by `wsgate check`), so that a bad certificate is a start-up error
//! and never a per-connection one.

use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{Config, ListenerConfig, RouteConfig, Upstream};
use crate::routing::Router;
use crate::tls::{self, TlsError};
use crate::upstream;

pub struct Gateway {
    pub config: Config,
    router: Router,
    /// TLS acceptor per listener, in configuration order (`None` for plain ws://).
    acceptors: Vec<Option<TlsAcceptor>>,
    /// TLS connector per route, for wss:// upstreams.
    connectors: Vec<Option<TlsConnector>>,
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
        let connectors =
            config
                .routes
                .iter()
                .enumerate()
                .map(|(index, r)| match r.upstream {
                    Upstream::Ws { tls: true, .. } => upstream::tls::connector(r)
                        .map(Some)
                        .map_err(|source| PrepareError::RouteTls {
                            index,
                            path: r.path.clone(),
                            source,
                        }),
                    _ => Ok(None),
                })
                .collect::<Result<Vec<_>, _>>()?;
        for route in config.routes.iter().filter(|r| r.insecure_skip_verify) {
            tracing::warn!(
                route = %route.path,
                upstream = %route.upstream,
                "insecure_skip_verify: the upstream's certificate is not checked; for tests only"
            );
        }
        Ok(Gateway {
            router: Router::new(&config.routes),
            config,
            acceptors,
            connectors,
        })
    }

    /// The route for a request and its TLS connector, if any.
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Option<(&RouteConfig, Option<&TlsConnector>)> {
        let index = self.router.find(host, path)?;
        Some((&self.config.routes[index], self.connectors[index].as_ref()))
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
