//! The serde mirror of the TOML file. Every field is `Spanned` so that validation can point
//! at the line and column of a bad value; unknown keys are rejected so typos are not ignored.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub gateway: Option<GatewaySection>,
    pub admin: Option<AdminSection>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Spanned<ListenerSection>>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Spanned<RouteSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    pub shutdown_timeout: Option<Spanned<String>>,
    pub upgrade_drain_timeout: Option<Spanned<String>>,
    pub drain_delay: Option<Spanned<String>>,
    pub watch_config: Option<Spanned<bool>>,
    pub handshake_timeout: Option<Spanned<String>>,
    pub close_timeout: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub max_request_head_size: Option<Spanned<SizeValue>>,
    pub log_format: Option<Spanned<String>>,
    pub certificate_check_interval: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
    pub tcp_keepalive: Option<Spanned<KeepaliveValue>>,
    pub allow_faults: Option<Spanned<bool>>,
}

/// `tcp_keepalive = "off"` or `{ idle = "60s", interval = "10s", probes = 6 }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum KeepaliveValue {
    Text(String),
    Table(KeepaliveSection),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveSection {
    pub idle: Option<String>,
    pub interval: Option<String>,
    pub probes: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub bind: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: Option<Spanned<String>>,
    pub bind: Spanned<String>,
    pub tls: Option<Spanned<TlsSection>>,
    pub max_connections: Option<Spanned<i64>>,
    pub accept_proxy_protocol: Option<Spanned<bool>>,
    pub trusted: Option<Spanned<Vec<String>>>,
    pub trusted_header: Option<Spanned<String>>,
    pub http2: Option<Spanned<bool>>,
    pub reuse_port: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub certs: Option<Spanned<Vec<CertPairSection>>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub identity_header: Option<Spanned<String>>,
    pub self_signed: Option<Spanned<bool>>,
    pub names: Option<Spanned<Vec<String>>>,
    pub ca_out: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPairSection {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub path: Spanned<String>,
    pub host: Option<Spanned<String>>,
    pub listeners: Option<Spanned<Vec<String>>>,
    pub upstream: Option<Spanned<String>>,
    pub upstreams: Option<Spanned<Vec<UpstreamEntry>>>,
    pub balance: Option<Spanned<String>>,
    pub connect_attempts: Option<Spanned<i64>>,
    pub connect_budget: Option<Spanned<String>>,
    pub max_fails: Option<Spanned<i64>>,
    pub fail_timeout: Option<Spanned<String>>,
    pub health_check: Option<Spanned<HealthCheckSection>>,
    pub proxy_protocol: Option<Spanned<String>>,
    pub forwarded_headers: Option<Spanned<bool>>,
    pub x_real_ip: Option<Spanned<bool>>,
    pub subprotocols: Option<Spanned<Vec<String>>>,
    pub max_message_size: Option<Spanned<SizeValue>>,
    pub max_frame_size: Option<Spanned<SizeValue>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub ping_interval: Option<Spanned<String>>,
    pub ping_timeout: Option<Spanned<String>>,
    pub allowed_origins: Option<Spanned<Vec<String>>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
    pub tls_server_name: Option<Spanned<String>>,
    pub insecure_skip_verify: Option<Spanned<bool>>,
    pub faults: Option<Spanned<FaultsSection>>,
    pub web_root: Option<Spanned<String>>,
    pub web_auth: Option<Spanned<bool>>,
    pub targets: Option<Spanned<TargetsSection>>,
    pub token_from: Option<Spanned<String>>,
    pub allowed_targets: Option<Spanned<Vec<String>>>,
    pub auth: Option<Spanned<AuthSection>>,
    pub identity_header: Option<Spanned<String>>,
    pub framing: Option<Spanned<String>>,
    pub compression: Option<Spanned<bool>>,
}

/// `targets = { file = "tokens.cfg" }` or `{ dir = "tokens.d/" }` (websockify's TokenFile).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsSection {
    pub file: Option<String>,
    pub dir: Option<String>,
}

/// `auth = { jwt = { … } }`, `{ basic = { … } }` or `{ forward = { … } }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub jwt: Option<Spanned<JwtSection>>,
    pub basic: Option<Spanned<BasicSection>>,
    pub forward: Option<Spanned<ForwardSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    pub jwks: Option<String>,
    pub secret_file: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Option<String>,
    pub from: Option<Vec<String>>,
    pub target_claim: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicSection {
    pub htpasswd: String,
    pub realm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSection {
    pub url: String,
    pub timeout: Option<String>,
    pub copy_response_headers: Option<Vec<String>>,
}

/// `faults = { … }`: misbehaviour on purpose, for testing clients (needs `allow_faults`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsSection {
    pub latency: Option<Spanned<String>>,
    pub close_after: Option<Spanned<ThresholdSection>>,
    pub reset_after: Option<Spanned<ThresholdSection>>,
    pub stall_after: Option<Spanned<ThresholdSection>>,
    pub refuse_first: Option<Spanned<RefuseSection>>,
    pub fragment: Option<Spanned<i64>>,
}

/// When a fault strikes: after `messages` to the client, `bytes` either way, or `after` a
/// time; `code` and `reason` for `close_after` only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdSection {
    pub messages: Option<i64>,
    pub bytes: Option<SizeValue>,
    pub after: Option<String>,
    pub code: Option<i64>,
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefuseSection {
    pub count: Option<i64>,
    pub status: Option<i64>,
}

/// One member of `upstreams`: a URL, or a table with its weight.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UpstreamEntry {
    Url(String),
    Weighted(WeightedUpstream),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedUpstream {
    pub url: String,
    pub weight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub fails: Option<Spanned<i64>>,
    pub passes: Option<Spanned<i64>>,
}

/// A size is either a plain number of bytes or a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}
