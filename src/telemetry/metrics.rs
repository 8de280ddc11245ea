//! Prometheus metrics (prometheus-client), served by the admin listener at `/metrics`.
//!
//! Label values are bounded by the configuration (listener names, route paths, upstreams)
//! and by fixed sets (status codes the gateway sends, close codes on the wire, sides), so a
//! client cannot grow the label space. Per-frame counters are cloned once per connection,
//! so the hot path pays one atomic add, not a map lookup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub listener: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub route: String,
    /// `client_to_upstream` or `upstream_to_client`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// The close code, or 1006 when a side vanished without one.
    pub code: u16,
    /// Who closed: client, upstream or gateway.
    pub side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub route: String,
    /// latency, close, reset, stall, refuse or fragment.
    pub fault: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub route: String,
    /// missing, invalid, denied or unavailable.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// "1.1" (Upgrade) or "2" (extended CONNECT, RFC 8441).
    pub http: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn connect_buckets() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn duration_buckets() -> Histogram {
    // 10 ms … ~1.5 days
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// All of the gateway's metrics, plus two plain counters that tests poll.
pub struct Metrics {
    registry: Registry,
    connections_active: Family<ConnectionLabels, Gauge>,
    connections_total: Family<ConnectionLabels, Counter>,
    rejections: Family<StatusLabels, Counter>,
    upstream_connect_errors: Family<UpstreamLabels, Counter>,
    upstream_connect_seconds: HistogramFamily<UpstreamLabels>,
    upstream_healthy: Family<UpstreamLabels, Gauge>,
    upstream_ejections: Family<UpstreamLabels, Counter>,
    bytes: Family<FlowLabels, Counter>,
    messages: Family<FlowLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    connection_seconds: HistogramFamily<RouteLabels>,
    reloads: Family<ResultLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    auth_failures: Family<AuthLabels, Counter>,
    /// `wsgate_upgrades_total` for HTTP/1.1 and HTTP/2, made once: counted per handshake.
    upgrades: [Counter; 2],
    active_relays: AtomicUsize,
    relays_total: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("active_relays", &self.active_relays())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A route's flow counters, shared by its connections: a held connection keeps one
/// pointer, not four handles (and making it takes no lookups per connection).
#[derive(Clone, Debug, Default)]
pub struct Flow(Arc<FlowCounters>);

impl std::ops::Deref for Flow {
    type Target = FlowCounters;

    fn deref(&self) -> &FlowCounters {
        &self.0
    }
}

#[derive(Debug, Default)]
pub struct FlowCounters {
    pub bytes_from_client: Counter,
    pub bytes_to_client: Counter,
    pub messages_from_client: Counter,
    pub messages_to_client: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsgate");
        let connections_active = Family::default();
        registry.register(
            "connections_active",
            "Relayed connections open now",
            connections_active.clone(),
        );
        let connections_total = Family::default();
        registry.register(
            "connections",
            "Relayed connections started",
            connections_total.clone(),
        );
        let rejections = Family::default();
        registry.register(
            "handshake_rejections",
            "Upgrade requests answered with an error status",
            rejections.clone(),
        );
        let upstream_connect_errors = Family::default();
        registry.register(
            "upstream_connect_errors",
            "Failed attempts to reach an upstream (connect, TLS or handshake)",
            upstream_connect_errors.clone(),
        );
        let upstream_connect_seconds: HistogramFamily<UpstreamLabels> =
            Family::new_with_constructor(connect_buckets);
        registry.register(
            "upstream_connect_seconds",
            "Time to reach an upstream, including TLS and WebSocket handshake",
            upstream_connect_seconds.clone(),
        );
        let upstream_healthy = Family::default();
        registry.register(
            "upstream_healthy",
            "1 while the active health check keeps an upstream in the rotation, 0 while it is out",
            upstream_healthy.clone(),
        );
        let upstream_ejections = Family::default();
        registry.register(
            "upstream_ejections",
            "Times an upstream was taken out of the rotation after failed connects (max_fails)",
            upstream_ejections.clone(),
        );
        let bytes = Family::default();
        registry.register("bytes", "Payload bytes relayed", bytes.clone());
        let messages = Family::default();
        registry.register(
            "messages",
            "Messages relayed (tcp upstreams: reads)",
            messages.clone(),
        );
        let closes = Family::default();
        registry.register(
            "closes",
            "Finished connections by close code and side",
            closes.clone(),
        );
        let connection_seconds: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(duration_buckets);
        registry.register(
            "connection_duration_seconds",
            "Lifetime of relayed connections",
            connection_seconds.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            reloads.clone(),
        );
        let faults = Family::default();
        registry.register(
            "faults_injected",
            "Faults injected on purpose (allow_faults): delayed and fragmented messages, closed, reset and stalled connections, refused handshakes",
            faults.clone(),
        );
        let auth_failures = Family::default();
        registry.register(
            "auth_failures",
            "Upgrades refused by the route's authentication, by reason",
            auth_failures.clone(),
        );
        let upgrade_family: Family<HttpLabels, Counter> = Family::default();
        registry.register(
            "upgrades",
            "WebSocket handshakes accepted, by the HTTP version they came over",
            upgrade_family.clone(),
        );
        let upgrades =
            ["1.1", "2"].map(|http| upgrade_family.get_or_create(&HttpLabels { http }).clone());
        Self {
            registry,
            connections_active,
            connections_total,
            rejections,
            upstream_connect_errors,
            upstream_connect_seconds,
            upstream_healthy,
            upstream_ejections,
            bytes,
            messages,
            closes,
            connection_seconds,
            reloads,
            faults,
            auth_failures,
            upgrades,
            active_relays: AtomicUsize::new(0),
            relays_total: AtomicU64::new(0),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Relayed connections open right now (after the 101, until both sides are closed).
    pub fn active_relays(&self) -> usize {
        self.active_relays.load(Ordering::Acquire)
    }

    pub fn relays_total(&self) -> u64 {
        self.relays_total.load(Ordering::Relaxed)
    }

    pub(crate) fn rejected(&self, status: u16) {
        self.rejections
            .get_or_create(&StatusLabels { status })
            .inc();
    }

    pub(crate) fn upstream_connected(&self, upstream: &str, took: Duration) {
        self.upstream_connect_seconds
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn upstream_failed(&self, upstream: &str) {
        self.upstream_connect_errors
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .inc();
    }

    pub(crate) fn upstream_health(&self, upstream: &str, healthy: bool) {
        self.upstream_healthy
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .set(i64::from(healthy));
    }

    pub(crate) fn upstream_ejected(&self, upstream: &str) {
        self.upstream_ejections
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .inc();
    }

    /// A counter of one fault on one route, to count into for a connection's life.
    pub(crate) fn fault(&self, route: &str, fault: &'static str) -> Counter {
        self.faults
            .get_or_create(&FaultLabels {
                route: route.to_string(),
                fault,
            })
            .clone()
    }

    pub(crate) fn auth_failed(&self, route: &str, reason: &'static str) {
        self.auth_failures
            .get_or_create(&AuthLabels {
                route: route.to_string(),
                reason,
            })
            .inc();
    }

    pub(crate) fn upgraded(&self, h2: bool) {
        self.upgrades[usize::from(h2)].inc();
    }

    pub(crate) fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a relay as active until the guard is dropped, however its task ends.
    pub(crate) fn relay_started(&self, listener: &str, route: &str) -> RelayGuard<'_> {
        let labels = ConnectionLabels {
            listener: listener.to_string(),
            route: route.to_string(),
        };
        self.connections_total.get_or_create(&labels).inc();
        let active = self.connections_active.get_or_create_owned(&labels);
        active.inc();
        self.active_relays.fetch_add(1, Ordering::AcqRel);
        self.relays_total.fetch_add(1, Ordering::Relaxed);
        RelayGuard {
            metrics: self,
            active,
        }
    }

    /// The flow counters of a route, to be cloned into a connection.
    pub(crate) fn flow(&self, route: &str) -> Flow {
        let get = |family: &Family<FlowLabels, Counter>, direction| {
            family.get_or_create_owned(&FlowLabels {
                route: route.to_string(),
                direction,
            })
        };
        Flow(Arc::new(FlowCounters {
            bytes_from_client: get(&self.bytes, "client_to_upstream"),
            bytes_to_client: get(&self.bytes, "upstream_to_client"),
            messages_from_client: get(&self.messages, "client_to_upstream"),
            messages_to_client: get(&self.messages, "upstream_to_client"),
        }))
    }

    pub(crate) fn finished(
        &self,
        route: &str,
        code: Option<u16>,
        side: &'static str,
        took: Duration,
    ) {
        self.closes
            .get_or_create(&CloseLabels {
                code: code.unwrap_or(1006),
                side,
            })
            .inc();
        self.connection_seconds
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }
}

pub(crate) struct RelayGuard<'a> {
    metrics: &'a Metrics,
    active: Gauge,
}

impl Drop for RelayGuard<'_> {
    fn drop(&mut self) {
        self.active.dec();
        self.metrics.active_relays.fetch_sub(1, Ordering::AcqRel);
    }
}
