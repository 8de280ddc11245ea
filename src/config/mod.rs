//! Configuration: the TOML file (`file`), turned into checked, typed values (`validate`).
//!
//! Two stages on purpose: serde mirrors the file exactly (unknown keys are errors), and
//! validation turns strings into addresses, durations, sizes and upstream URLs while
//! collecting every problem with its line and column, so an operator fixes a file in one pass.

mod file;
mod units;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use units::{parse_duration, parse_size};

use crate::origin::OriginRule;

/// Defaults that apply when a key is absent. The README's configuration reference lists the
/// same values; a test keeps the two in step.
pub mod defaults {
    use std::time::Duration;

    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
    /// After a binary upgrade, how long the old process's connections may run on before it
    /// closes them with 1001: long enough for most sessions to end on their own, short
    /// enough that repeated upgrades do not pile up generations (HAProxy's hard-stop-after).
    pub const UPGRADE_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Large enough for VNC framebuffer updates and typical JSON APIs. Frames stream through
    /// the relay in pieces, so the limit costs no memory.
    pub const MAX_MESSAGE_SIZE: usize = 16 << 20;
    /// Far above what one 2-core machine relays well, low enough that a flood of upgrades
    /// meets a clear 503 before file descriptors run out.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// Browsers send a few KiB of headers (cookies included); 16 KiB leaves room and caps
    /// what an unauthenticated peer can make the gateway hold. hyper needs at least 8 KiB.
    pub const MAX_REQUEST_HEAD_SIZE: usize = 16 << 10;
    pub const MIN_REQUEST_HEAD_SIZE: usize = 8 << 10;
    pub const REQUEST_HEAD_SIZE_LIMIT: usize = 1 << 20;
    pub const MAX_WORKERS: usize = 1024;
    /// Dead peers found within two minutes: 60 s idle, then six probes ten seconds apart.
    pub const TCP_KEEPALIVE: super::TcpKeepalive = super::TcpKeepalive {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(10),
        probes: 6,
    };
    /// Keepalive pings toward clients: one every 30 s, answered within 30 s (ping_timeout
    /// defaults to the interval).
    pub const PING: super::PingConfig = super::PingConfig {
        interval: Duration::from_secs(30),
        timeout: Duration::from_secs(30),
    };
    /// Renewal tools replace certificates hours before they expire; a few seconds' delay
    /// costs nothing, and reading a few small files that often costs nothing either.
    pub const CERTIFICATE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
    /// nginx's `max_fails` and `fail_timeout` defaults: one failure takes an upstream out
    /// of a pool for ten seconds. Only pools of two or more skip anyone.
    pub const MAX_FAILS: u32 = 1;
    pub const FAIL_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    pub const HEALTH_FAILS: u32 = 2;
    pub const HEALTH_PASSES: u32 = 2;
    /// What a test's client connects to: `wss://localhost:PORT` or the loopback addresses.
    pub const SELF_SIGNED_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];
    /// 1012 Service Restart: what a client sees when its server goes down for a restart,
    /// the case reconnect logic exists for.
    pub const FAULT_CLOSE_CODE: u16 = 1012;
    pub const FAULT_REFUSE_STATUS: u16 = 503;
    pub const FAULT_REFUSE_COUNT: u64 = 1;
    /// RFC 6750 §2.3 names the query parameter `access_token`; browsers cannot set headers
    /// on `new WebSocket(url)`, so a cookie, the query or a subprotocol carry it instead.
    pub const JWT_FROM: &[&str] = &[
        "header:authorization",
        "cookie:access_token",
        "query:access_token",
        "subprotocol",
    ];
    pub const JWT_LEEWAY: Duration = Duration::from_secs(60);
    pub const FORWARD_AUTH_TIMEOUT: Duration = Duration::from_secs(2);
    pub const BASIC_REALM: &str = "wsgate";
}

/// A validated configuration: everything here has been parsed and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from, for messages (`<string>` when parsed from memory).
    pub source: String,
    pub gateway: GatewayConfig,
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub shutdown_timeout: Duration,
    /// After handing its sockets to a new binary, how long the old process lets its
    /// connections run before it closes them with 1001 (then `shutdown_timeout` as usual).
    pub upgrade_drain_timeout: Duration,
    /// After SIGTERM, how long `/readyz` says 503 while everything is still served, before
    /// the drain (HAProxy's `grace`): a balancer's health check notices first.
    pub drain_delay: Duration,
    /// Re-read the configuration file when it changes, as on SIGHUP.
    pub watch_config: bool,
    pub handshake_timeout: Duration,
    pub close_timeout: Duration,
    /// Upgraded connections over all listeners; more get 503.
    pub max_connections: usize,
    /// Upgraded connections per client IP address; `None` for no limit.
    pub max_connections_per_ip: Option<usize>,
    /// Request line plus headers; larger heads get 431.
    pub max_request_head_size: usize,
    pub log_format: LogFormat,
    /// How often certificate, key and CA files are checked for changes.
    pub certificate_check_interval: Duration,
    /// Runtime worker threads; `None` for one per CPU the process may run on.
    pub workers: Option<usize>,
    /// TCP keepalive on every client and upstream socket; `None` when turned off.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Routes may inject faults (`faults` tables) and the admin listener takes `/faults/…`
    /// requests. For test fixtures only.
    pub allow_faults: bool,
}

/// TCP keepalive probes: after `idle` without traffic, a probe every `interval`; `probes`
/// unanswered ones end the connection. The same bound caps how long sent data may stay
/// unacknowledged (TCP_USER_TIMEOUT), so a peer that vanished mid-transfer is noticed too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub probes: u32,
}

impl TcpKeepalive {
    /// How long after its last sign of life a vanished peer is detected, at most.
    pub fn detection_time(&self) -> Duration {
        self.idle + self.interval * self.probes
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            upgrade_drain_timeout: defaults::UPGRADE_DRAIN_TIMEOUT,
            drain_delay: Duration::ZERO,
            watch_config: false,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            close_timeout: defaults::CLOSE_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_ip: None,
            max_request_head_size: defaults::MAX_REQUEST_HEAD_SIZE,
            log_format: LogFormat::Text,
            certificate_check_interval: defaults::CERTIFICATE_CHECK_INTERVAL,
            workers: None,
            tcp_keepalive: Some(defaults::TCP_KEEPALIVE),
            allow_faults: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub tls: Option<ListenerTls>,
    /// Upgraded connections on this listener; `None` for no limit beyond the gateway's.
    pub max_connections: Option<usize>,
    /// Connections from `trusted` peers start with a PROXY protocol header (v1 or v2)
    /// that names the real client.
    pub accept_proxy_protocol: bool,
    /// Proxies in front of this listener: their PROXY headers and forwarded headers are
    /// believed. Nobody is trusted by default.
    pub trusted: Vec<ipnet::IpNet>,
    /// The one forwarded header the trusted proxies write; the others are not believed.
    pub trusted_header: TrustedHeader,
    /// SO_REUSEPORT: several gateway processes listen on this address, and the kernel
    /// spreads connections over them.
    pub reuse_port: bool,
}

/// Which header names the client behind a trusted proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrustedHeader {
    #[default]
    XForwardedFor,
    Forwarded,
    XRealIp,
}

impl ListenerConfig {
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// TLS settings of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Certificate and key pairs; the first is the default for clients that send no SNI
    /// name or one no certificate covers. The others are chosen by the names they carry.
    /// Empty when the certificate is `self_signed`.
    pub certs: Vec<TlsFiles>,
    /// A certificate made in memory at start, signed by a CA made with it (test fixtures).
    pub self_signed: Option<SelfSigned>,
    /// Offer `h2` by ALPN (and WebSockets over it, RFC 8441) beside `http/1.1`.
    pub http2: bool,
    /// Client certificates (mTLS): verified against this CA, required or optional.
    pub client_auth: Option<ClientAuth>,
    /// Header that carries the verified client identity to ws upstreams.
    pub identity_header: Option<String>,
}

impl ListenerTls {
    /// One certificate, no client authentication.
    pub fn single(cert: PathBuf, key: PathBuf) -> Self {
        Self {
            certs: vec![TlsFiles { cert, key }],
            self_signed: None,
            http2: true,
            client_auth: None,
            identity_header: None,
        }
    }
}

/// `tls = { self_signed = true }`: what the made certificate covers, and where its CA goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfSigned {
    /// DNS names and IP addresses; `localhost`, `127.0.0.1` and `::1` by default.
    pub names: Vec<String>,
    /// The CA certificate (PEM) is written here, atomically; the keys never are.
    pub ca_out: Option<PathBuf>,
}

/// Misbehaviour on purpose, so that a client's reconnect and timeout logic can be tested.
/// Honoured only with `[gateway] allow_faults = true`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Faults {
    /// Every message is delayed this long, in both directions, order kept.
    pub latency: Option<Duration>,
    /// Both sides closed with this code and reason once the threshold is reached.
    pub close_after: Option<CloseAfter>,
    /// The client's TCP connection reset (no Close) once the threshold is reached.
    pub reset_after: Option<Threshold>,
    /// Nothing relayed any more in either direction; the connection stays open.
    pub stall_after: Option<Threshold>,
    /// The first handshakes on the route refused.
    pub refuse_first: Option<Refuse>,
    /// Each message to the client sent as this many frames.
    pub fragment: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    /// Messages delivered to the client.
    Messages(u64),
    /// Payload bytes relayed, both directions together.
    Bytes(u64),
    /// Time since the connection was upgraded.
    After(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseAfter {
    pub when: Threshold,
    pub code: u16,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refuse {
    pub count: u64,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub ca: PathBuf,
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Normalised prefix: starts with `/`, no trailing `/` except for the root.
    pub path: String,
    /// Lower-case host name or `*.suffix` pattern.
    pub host: Option<String>,
    /// Names of the listeners the route exists on; `None` for every listener.
    pub listeners: Option<Vec<String>>,
    /// One or more, all of the same kind (byte stream or WebSocket).
    pub upstreams: Vec<Target>,
    pub balance: Balance,
    /// How many upstreams one client request may try, and for how long in total.
    pub connect_attempts: usize,
    pub connect_budget: Option<Duration>,
    /// Passive health: this many connect failures in a row take an upstream out of the
    /// rotation for `fail_timeout`; 0 never takes one out.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub health_check: Option<HealthCheck>,
    /// PROXY protocol header sent first to byte-stream upstreams.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// X-Forwarded-For/-Proto/-Host and Forwarded toward ws upstreams.
    pub forwarded_headers: bool,
    pub x_real_ip: bool,
    pub subprotocols: Vec<String>,
    pub max_message_size: usize,
    /// Largest single frame (frames stream through in pieces; this is a protocol limit).
    pub max_frame_size: usize,
    /// `None` accepts any Origin (and requests without one).
    pub allowed_origins: Option<Vec<OriginRule>>,
    /// No data message in either direction for this long closes with 1001.
    pub idle_timeout: Option<Duration>,
    /// Keepalive toward the client: ping every interval, drop when no pong within timeout.
    pub ping: Option<PingConfig>,
    pub connect_timeout: Duration,
    /// CA bundle that verifies a `wss://` upstream instead of the built-in web roots.
    pub ca: Option<PathBuf>,
    /// Certificate and key the gateway presents to a `wss://` upstream.
    pub client_cert: Option<TlsFiles>,
    /// Name sent as SNI and verified in the upstream's certificate, instead of its host.
    pub tls_server_name: Option<String>,
    /// Accept any upstream certificate. For tests only; logged as a warning at start-up.
    pub insecure_skip_verify: bool,
    /// Faults injected on this route's connections (`allow_faults` only).
    pub faults: Option<Faults>,
    /// Plain GET and HEAD requests under the route's path are answered from this folder.
    pub web_root: Option<PathBuf>,
    /// The web root's files are answered only to clients that pass `auth` (websockify's
    /// `--web-auth`); without it they are public, as the page that starts the login must be.
    pub web_auth: bool,
    /// The upstream is chosen per connection by a token (websockify's TokenFile), in place of
    /// `upstreams` (which is then empty).
    pub targets: Option<TokenTargets>,
    /// What a token (or a JWT claim) may point at; empty allows any target.
    pub allowed_targets: Vec<TargetRule>,
    pub auth: Option<Auth>,
    /// Header that carries the authenticated name to ws upstreams.
    pub identity_header: Option<String>,
    pub framing: Framing,
    /// tcp/unix routes: accept permessage-deflate and terminate it here.
    pub compression: bool,
}

/// Where the table of tokens is, and where a request names its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTargets {
    pub source: TokenSource,
    pub from: TokenFrom,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// One file of `TOKEN: HOST:PORT` lines.
    File(PathBuf),
    /// Every file in a folder, as websockify reads `--token-source` folders.
    Dir(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFrom {
    /// The `token` query parameter (websockify's default).
    Query,
    /// The last segment of the path.
    Path,
}

/// An address block and optionally a port range a token target must fall in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetRule {
    pub net: ipnet::IpNet,
    pub ports: Option<(u16, u16)>,
}

impl TargetRule {
    pub fn allows(&self, addr: SocketAddr) -> bool {
        self.net.contains(&addr.ip().to_canonical())
            && self
                .ports
                .is_none_or(|(low, high)| (low..=high).contains(&addr.port()))
    }
}

/// How a route authenticates its clients before the upstream is dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Jwt(JwtAuth),
    Basic(BasicAuth),
    Forward(ForwardAuth),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuth {
    pub keys: JwtKeys,
    /// Names as JWT headers write them: RS256, ES256, EdDSA, HS256, …
    pub algorithms: Vec<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    /// Where the token is looked for, in order.
    pub from: Vec<CredentialSource>,
    /// A claim whose value is the token that picks the route's target.
    pub target_claim: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeys {
    Jwks(PathBuf),
    Secret(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// `Authorization: Bearer …`
    Authorization,
    Cookie(String),
    Query(String),
    /// An offered subprotocol `bearer.TOKEN`, removed from the offer.
    Subprotocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub htpasswd: PathBuf,
    pub realm: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuth {
    /// `http://host:port/path`
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
    pub timeout: Duration,
    pub copy_response_headers: Vec<String>,
}

/// How a byte-stream upstream's bytes become messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// Whatever each read returns is one binary message (websockify).
    #[default]
    Stream,
    /// Each line is one text message; each client message is written followed by `\n`.
    Lines,
}

impl RouteConfig {
    /// True when the route relays to WebSocket upstreams (all of its upstreams are alike).
    pub fn is_ws(&self) -> bool {
        self.upstreams.first().is_some_and(|t| t.upstream.is_ws())
    }

    /// The upstreams, for logs: one URL, or the list.
    pub fn upstream_names(&self) -> String {
        let names: Vec<String> = self
            .upstreams
            .iter()
            .map(|t| t.upstream.to_string())
            .collect();
        names.join(", ")
    }
}

/// One upstream of a route and its share of the connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub upstream: Upstream,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    /// Power of two choices: two upstreams at random, the less loaded wins.
    RandomTwo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// ws upstreams: the path of the WebSocket handshake that is checked; tcp: unused.
    pub path: Option<String>,
    /// Failed checks in a row that take an upstream out, passed ones that bring it back.
    pub fails: u32,
    pub passes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Where a route's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Raw TCP: message payloads become a byte stream (the websockify use case).
    Tcp { host: String, port: u16 },
    /// Unix-domain stream socket, relayed like `Tcp`.
    Unix { path: PathBuf },
    /// Another WebSocket server; messages, pings and closes pass through.
    Ws {
        tls: bool,
        host: String,
        port: u16,
        /// Path and query of the upstream URL; empty when the URL had no path, which means
        /// "forward the client's path unchanged".
        path: String,
    },
    /// A WebSocket server on a Unix-domain socket (`ws+unix:/run/app.sock[:/path]`).
    WsUnix {
        socket: PathBuf,
        /// As for `Ws`: empty forwards the client's path.
        path: String,
    },
}

impl Upstream {
    pub fn is_ws(&self) -> bool {
        matches!(self, Upstream::Ws { .. } | Upstream::WsUnix { .. })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Tcp { host, port } => write!(f, "tcp://{}", authority(host, *port)),
            Upstream::Unix { path } => write!(f, "unix:{}", path.display()),
            Upstream::Ws {
                tls,
                host,
                port,
                path,
            } => {
                let scheme = if *tls { "wss" } else { "ws" };
                write!(f, "{scheme}://{}{path}", authority(host, *port))
            }
            Upstream::WsUnix { socket, path } if path.is_empty() => {
                write!(f, "ws+unix:{}", socket.display())
            }
            Upstream::WsUnix { socket, path } => write!(f, "ws+unix:{}:{path}", socket.display()),
        }
    }
}

/// `host:port`, with IPv6 literals in brackets.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One problem in a configuration file, printed as `file:line:column: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

/// Why a configuration could not be used. Each issue renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration file: {source}; check the --config path")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_issues(file, issues))]
    Invalid {
        file: String,
        issues: Vec<ConfigIssue>,
    },
}

fn render_issues(file: &str, issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| {
            if i.key.is_empty() {
                format!("{file}:{}:{}: {}", i.line, i.column, i.message)
            } else {
                format!("{file}:{}:{}: {}: {}", i.line, i.column, i.key, i.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        validate::parse(text, source)
    }
}
