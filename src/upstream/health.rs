//! Active health checks: every `interval`, each upstream of a route that asks for them is
//! checked (a TCP or Unix connect; for ws upstreams a WebSocket handshake on `path`). After
//! `fails` failed checks in a row it leaves the rotation, after `passes` good ones it comes
//! back. Connections already open are left alone either way.

use std::sync::Arc;

use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::pool::Pool;
use super::{ClientHandshake, Connection};
use crate::config::{HealthCheck, RouteConfig, Upstream};
use crate::proxy_protocol;
use crate::telemetry::Metrics;

/// Starts the checks of one route; they stop when `replaced` is cancelled (the
/// configuration they belong to was replaced) or at `shutdown`.
pub fn spawn(
    route: &RouteConfig,
    pool: Arc<Pool>,
    tls: Option<TlsConnector>,
    replaced: CancellationToken,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let Some(check) = route.health_check.clone() else {
        return;
    };
    for index in 0..pool.len() {
        let route = route.clone();
        let pool = pool.clone();
        let tls = tls.clone();
        let check = check.clone();
        let (replaced, shutdown) = (replaced.clone(), shutdown.clone());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = replaced.cancelled() => {}
                _ = shutdown.cancelled() => {}
                _ = watch(&route, &pool, index, tls.as_ref(), &check, &metrics) => {}
            }
        });
    }
}

async fn watch(
    route: &RouteConfig,
    pool: &Pool,
    index: usize,
    tls: Option<&TlsConnector>,
    check: &HealthCheck,
    metrics: &Metrics,
) {
    let upstream = pool.upstream(index).to_string();
    // A reload carries the verdict over; the gauge starts from it.
    metrics.upstream_health(&upstream, pool.is_healthy(index));
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match probe(route, pool, index, tls, check).await {
            Ok(()) => {
                failed = 0;
                passed = passed.saturating_add(1);
                if passed >= check.passes && pool.set_healthy(index, true) {
                    metrics.upstream_health(&upstream, true);
                    info!(route = %route.path, upstream, passes = passed, "health check: upstream is back in the rotation");
                }
            }
            Err(reason) => {
                passed = 0;
                failed = failed.saturating_add(1);
                if failed >= check.fails && pool.set_healthy(index, false) {
                    metrics.upstream_health(&upstream, false);
                    warn!(route = %route.path, upstream, fails = failed, error = %reason, "health check: upstream taken out of the rotation");
                }
            }
        }
    }
}

/// One check: connect (and for ws upstreams, complete a WebSocket handshake) within the
/// timeout, then hang up.
async fn probe(
    route: &RouteConfig,
    pool: &Pool,
    index: usize,
    tls: Option<&TlsConnector>,
    check: &HealthCheck,
) -> Result<(), String> {
    let headers = http::HeaderMap::new();
    let upstream = pool.upstream(index);
    // Without a path of its own, a check asks for the path clients are sent to: `/` may
    // well be a 404 on a server that only serves `/ws`.
    let own_path = match upstream {
        Upstream::Ws { path, .. } | Upstream::WsUnix { path, .. } => path.as_str(),
        _ => "",
    };
    let path = match (&check.path, own_path) {
        (Some(path), _) => path.clone(),
        (None, "") => "/".to_string(),
        (None, own) => own.to_string(),
    };
    // A backend that expects a PROXY header gets one that says "a check, no client"
    // (v2 LOCAL, v1 UNKNOWN), as HAProxy's check-send-proxy does.
    let proxy_header = route.proxy_protocol.map(proxy_protocol::encode_local);
    let handshake = ClientHandshake {
        path_and_query: path,
        map_path: false,
        protocols: &[],
        headers: &headers,
        identity: None,
        drop_headers: &[],
        forwarding: Default::default(),
        extensions: None,
    };
    let connection = Connection {
        route,
        upstream,
        name: pool.name(index),
        tls,
        handshake: &handshake,
        proxy_header: proxy_header.as_deref(),
        keepalive: None,
        timeout: check.timeout,
    };
    // `open` runs every phase against the check's timeout and names the one it cut.
    connection.open().await.map(drop).map_err(|e| e.to_string())
}
