//! File → `Config`: every value parsed and checked, every problem reported with its position.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use toml::Spanned;

use super::file::{
    AuthSection, FaultsSection, FileConfig, HealthCheckSection, JwtSection, KeepaliveValue,
    RouteSection, SizeValue, TargetsSection, ThresholdSection, TlsSection, UpstreamEntry,
};
use super::units::{parse_duration, parse_size};
use super::{
    AdminConfig, Balance, ClientAuth, CloseAfter, Config, ConfigError, ConfigIssue, Faults,
    GatewayConfig, HealthCheck, ListenerConfig, ListenerTls, LogFormat, PingConfig, ProxyProtocol,
    Refuse, RouteConfig, SelfSigned, Target, TcpKeepalive, Threshold, TlsFiles, TrustedHeader,
    Upstream, defaults,
};
use super::{
    Auth, BasicAuth, CredentialSource, ForwardAuth, Framing, JwtAuth, JwtKeys, TargetRule,
    TokenFrom, TokenSource, TokenTargets,
};
use crate::origin::OriginRule;
use std::time::Duration;

pub(super) fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        let (line, column) = line_column(text, offset);
        ConfigError::Invalid {
            file: source.to_string(),
            issues: vec![ConfigIssue {
                line,
                column,
                key: key_on_line(text, offset),
                message: e.message().trim().to_string(),
            }],
        }
    })?;
    let mut v = Validator {
        text,
        issues: Vec::new(),
        allow_faults: false,
    };
    let config = v.config(file, source);
    if v.issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            file: source.to_string(),
            issues: v.issues,
        })
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The `key` of a `key = value` line that holds `offset`, so parse errors can name it.
fn key_on_line(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let end = text[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(text.len());
    let line = &text[start..end];
    match line.find('=') {
        Some(eq) if start + eq < offset => line[..eq].trim().to_string(),
        _ => String::new(),
    }
}

struct Validator<'a> {
    text: &'a str,
    issues: Vec<ConfigIssue>,
    /// `[gateway] allow_faults`, read before the routes that may use it.
    allow_faults: bool,
}

impl Validator<'_> {
    fn issue<T>(&mut self, at: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_column(self.text, at.span().start);
        self.issues.push(ConfigIssue {
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    fn listener_tls(&mut self, tls: Spanned<TlsSection>, key: &str) -> Option<ListenerTls> {
        let at = Spanned::new(tls.span(), ());
        let tls = tls.into_inner();
        let mut certs = Vec::new();
        match (tls.cert, tls.key) {
            (Some(cert), Some(k)) => certs.push(TlsFiles {
                cert: PathBuf::from(cert.into_inner()),
                key: PathBuf::from(k.into_inner()),
            }),
            (None, None) => {}
            _ => self.issue(
                &at,
                format!("{key}.tls"),
                "cert and key go together; set both",
            ),
        }
        if let Some(list) = tls.certs {
            for pair in list.into_inner() {
                certs.push(TlsFiles {
                    cert: PathBuf::from(pair.cert),
                    key: PathBuf::from(pair.key),
                });
            }
        }
        let self_signed = self.self_signed(&tls.self_signed, tls.names, tls.ca_out, key);
        if self_signed.is_some() && !certs.is_empty() {
            self.issue(
                &at,
                format!("{key}.tls"),
                "self_signed = true makes its own certificate; remove cert/key/certs, or self_signed",
            );
        } else if certs.is_empty() && self_signed.is_none() {
            self.issue(
                &at,
                format!("{key}.tls"),
                "needs a certificate: cert = \"…\", key = \"…\", certs = [{ cert = \"…\", key = \"…\" }, …] or self_signed = true",
            );
        }
        let required = match &tls.client_auth {
            None => true,
            Some(mode) => match mode.get_ref().as_str() {
                "required" => true,
                "optional" => false,
                other => {
                    self.issue(
                        mode,
                        format!("{key}.tls.client_auth"),
                        format!("`{other}` is not a mode; write \"required\" or \"optional\""),
                    );
                    true
                }
            },
        };
        if tls.client_ca.is_none()
            && let Some(mode) = &tls.client_auth
        {
            self.issue(
                mode,
                format!("{key}.tls.client_auth"),
                "needs client_ca, the CA that signs client certificates",
            );
        }
        let client_auth = tls.client_ca.map(|ca| ClientAuth {
            ca: PathBuf::from(ca.into_inner()),
            required,
        });
        let identity_header = match tls.identity_header {
            Some(name) => {
                if http::HeaderName::from_bytes(name.get_ref().as_bytes()).is_err() {
                    self.issue(
                        &name,
                        format!("{key}.tls.identity_header"),
                        "is not a valid header name",
                    );
                }
                if client_auth.is_none() {
                    self.issue(
                        &name,
                        format!("{key}.tls.identity_header"),
                        "needs client_ca: there is no client identity without client certificates",
                    );
                }
                Some(name.into_inner().to_ascii_lowercase())
            }
            None => None,
        };
        Some(ListenerTls {
            http2: true,
            certs,
            self_signed,
            client_auth,
            identity_header,
        })
    }

    /// `self_signed = true` with its optional `names` and `ca_out`.
    fn self_signed(
        &mut self,
        flag: &Option<Spanned<bool>>,
        names: Option<Spanned<Vec<String>>>,
        ca_out: Option<Spanned<String>>,
        key: &str,
    ) -> Option<SelfSigned> {
        let on = flag.as_ref().is_some_and(|f| *f.get_ref());
        if !on {
            for (at, name) in [
                (names.as_ref().map(|n| n.span()), "names"),
                (ca_out.as_ref().map(|c| c.span()), "ca_out"),
            ] {
                if let Some(span) = at {
                    self.issue(
                        &Spanned::new(span, ()),
                        format!("{key}.tls.{name}"),
                        "applies to self_signed = true only",
                    );
                }
            }
            return None;
        }
        let names = match names {
            None => defaults::SELF_SIGNED_NAMES
                .iter()
                .map(|n| n.to_string())
                .collect(),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.issue(
                        &list,
                        format!("{key}.tls.names"),
                        "is empty; list the names clients connect to, like [\"localhost\"]",
                    );
                }
                for name in list.get_ref() {
                    if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                        self.issue(
                            &list,
                            format!("{key}.tls.names"),
                            format!("`{name}` is not a DNS name or IP address"),
                        );
                    }
                }
                list.into_inner()
            }
        };
        let ca_out = ca_out.map(|path| {
            if path.get_ref().is_empty() {
                self.issue(&path, format!("{key}.tls.ca_out"), "is empty; name a file");
            }
            PathBuf::from(path.into_inner())
        });
        Some(SelfSigned { names, ca_out })
    }

    /// A whole number of connections, at least 1.
    fn count(&mut self, value: &Spanned<i64>, key: &str) -> Option<usize> {
        match usize::try_from(*value.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.issue(value, key, "must be a whole number of at least 1");
                None
            }
        }
    }

    /// CIDR blocks (`10.0.0.0/8`, `::1/128`) or single addresses.
    fn networks(&mut self, list: &Spanned<Vec<String>>, key: &str) -> Vec<ipnet::IpNet> {
        let mut nets = Vec::new();
        for text in list.get_ref() {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => nets.push(net.trunc()),
                Err(_) => self.issue(
                    list,
                    key,
                    format!("`{text}` is not an address or CIDR block; write one like \"10.0.0.0/8\" or \"192.0.2.7\""),
                ),
            }
        }
        nets
    }

    fn size(&mut self, value: &Spanned<SizeValue>, key: &str) -> Option<usize> {
        let parsed = match value.get_ref() {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(t) => parse_size(t),
        };
        match parsed.map(usize::try_from) {
            Ok(Ok(n)) => Some(n),
            Ok(Err(_)) => {
                self.issue(value, key, "is too large");
                None
            }
            Err(e) => {
                self.issue(value, key, e);
                None
            }
        }
    }

    /// A message or frame limit: 1 byte to 1 GiB.
    fn message_size(&mut self, value: &Spanned<SizeValue>, key: &str) -> Option<usize> {
        match self.size(value, key)? {
            0 => self.issue(value, key, "must be at least 1 byte"),
            n if n > 1 << 30 => self.issue(value, key, "must be at most 1GiB"),
            n => return Some(n),
        }
        None
    }

    /// `"off"`, or a table whose missing keys take the defaults.
    fn tcp_keepalive(&mut self, value: &Spanned<KeepaliveValue>) -> Option<TcpKeepalive> {
        const KEY: &str = "gateway.tcp_keepalive";
        let table = match value.get_ref() {
            KeepaliveValue::Text(text) if text == "off" => return None,
            KeepaliveValue::Text(text) => {
                self.issue(value, KEY, format!("`{text}` is not a keepalive setting; write \"off\" or a table like {{ idle = \"60s\", interval = \"10s\", probes = 6 }}"));
                return Some(defaults::TCP_KEEPALIVE);
            }
            KeepaliveValue::Table(table) => table,
        };
        let mut keepalive = defaults::TCP_KEEPALIVE;
        let duration = |this: &mut Self, text: &Option<String>, name: &str, slot: &mut Duration| {
            let Some(text) = text else { return };
            match parse_duration(text) {
                // Kernel options count whole seconds, up to 32767.
                Ok(d) if d.as_secs() >= 1 && d.as_secs() <= 32767 => *slot = d,
                Ok(_) => this.issue(
                    value,
                    format!("{KEY}.{name}"),
                    "must be between 1s and 32767s (whole seconds)",
                ),
                Err(e) => this.issue(value, format!("{KEY}.{name}"), e),
            }
        };
        duration(self, &table.idle, "idle", &mut keepalive.idle);
        duration(self, &table.interval, "interval", &mut keepalive.interval);
        if let Some(probes) = table.probes {
            match u32::try_from(probes) {
                Ok(n @ 1..=127) => keepalive.probes = n,
                _ => self.issue(
                    value,
                    format!("{KEY}.probes"),
                    "must be a whole number from 1 to 127",
                ),
            }
        }
        Some(keepalive)
    }

    /// A duration, or `"off"` (`Ok(None)`).
    fn duration_or_off(&mut self, value: &Spanned<String>, key: &str) -> Option<Option<Duration>> {
        if value.get_ref() == "off" {
            return Some(None);
        }
        self.positive_duration(value, key).map(Some)
    }

    fn positive_duration(&mut self, value: &Spanned<String>, key: &str) -> Option<Duration> {
        match parse_duration(value.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.issue(value, key, "must be longer than zero");
                None
            }
            Err(e) => {
                self.issue(value, key, e);
                None
            }
        }
    }

    fn config(&mut self, file: FileConfig, source: &str) -> Config {
        let mut gateway = GatewayConfig::default();
        if let Some(section) = file.gateway {
            let mut duration = |value: Option<Spanned<String>>, key: &str, slot: &mut _| {
                if let Some(value) = value {
                    match parse_duration(value.get_ref()) {
                        Ok(d) => *slot = d,
                        Err(e) => self.issue(&value, format!("gateway.{key}"), e),
                    }
                }
            };
            duration(
                section.shutdown_timeout,
                "shutdown_timeout",
                &mut gateway.shutdown_timeout,
            );
            duration(
                section.upgrade_drain_timeout,
                "upgrade_drain_timeout",
                &mut gateway.upgrade_drain_timeout,
            );
            duration(section.drain_delay, "drain_delay", &mut gateway.drain_delay);
            duration(
                section.handshake_timeout,
                "handshake_timeout",
                &mut gateway.handshake_timeout,
            );
            duration(
                section.close_timeout,
                "close_timeout",
                &mut gateway.close_timeout,
            );
            if let Some(n) = section.max_connections
                && let Some(n) = self.count(&n, "gateway.max_connections")
            {
                gateway.max_connections = n;
            }
            if let Some(n) = section.max_connections_per_ip {
                gateway.max_connections_per_ip = self.count(&n, "gateway.max_connections_per_ip");
            }
            if let Some(size) = section.max_request_head_size
                && let Some(n) = self.size(&size, "gateway.max_request_head_size")
            {
                if n < defaults::MIN_REQUEST_HEAD_SIZE {
                    self.issue(
                        &size,
                        "gateway.max_request_head_size",
                        "must be at least 8KiB",
                    );
                } else if n > defaults::REQUEST_HEAD_SIZE_LIMIT {
                    // Each connection may buffer this much before it is routed.
                    self.issue(
                        &size,
                        "gateway.max_request_head_size",
                        "must be at most 1MiB",
                    );
                } else {
                    gateway.max_request_head_size = n;
                }
            }
            if let Some(value) = section.certificate_check_interval
                && let Some(d) =
                    self.positive_duration(&value, "gateway.certificate_check_interval")
            {
                gateway.certificate_check_interval = d;
            }
            if let Some(n) = section.workers {
                gateway.workers = self.count(&n, "gateway.workers");
                if gateway.workers.is_some_and(|w| w > defaults::MAX_WORKERS) {
                    self.issue(
                        &n,
                        "gateway.workers",
                        "must be at most 1024 (one thread each)",
                    );
                    gateway.workers = None;
                }
            }
            if let Some(value) = section.tcp_keepalive {
                gateway.tcp_keepalive = self.tcp_keepalive(&value);
            }
            gateway.watch_config = section.watch_config.is_some_and(|w| w.into_inner());
            gateway.allow_faults = section.allow_faults.is_some_and(|a| a.into_inner());
            self.allow_faults = gateway.allow_faults;
            if let Some(format) = section.log_format {
                match format.get_ref().as_str() {
                    "text" => gateway.log_format = LogFormat::Text,
                    "json" => gateway.log_format = LogFormat::Json,
                    other => self.issue(
                        &format,
                        "gateway.log_format",
                        format!("`{other}` is not a log format; write \"text\" or \"json\""),
                    ),
                }
            }
        }

        let admin = file.admin.and_then(|admin| match admin.bind.get_ref().parse::<SocketAddr>() {
            Ok(bind) => Some(AdminConfig { bind }),
            Err(_) => {
                self.issue(
                    &admin.bind,
                    "admin.bind",
                    format!(
                        "`{}` is not an address; write an IP address and port, like \"127.0.0.1:9090\"",
                        admin.bind.get_ref()
                    ),
                );
                None
            }
        });

        if file.listeners.is_empty() {
            self.issues.push(ConfigIssue {
                line: 1,
                column: 1,
                key: "listener".into(),
                message: "no [[listener]] table; add one with bind = \"127.0.0.1:8080\"".into(),
            });
        }
        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for (i, section) in file.listeners.into_iter().enumerate() {
            let key = format!("listener[{i}]");
            let section = section.into_inner();
            let bind = match section.bind.get_ref().parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    self.issue(
                        &section.bind,
                        format!("{key}.bind"),
                        format!(
                            "`{}` is not an address; write an IP address and port, like \"127.0.0.1:8080\" or \"[::]:8443\"",
                            section.bind.get_ref()
                        ),
                    );
                    continue;
                }
            };
            if bind.port() != 0 && !binds.insert(bind) {
                self.issue(
                    &section.bind,
                    format!("{key}.bind"),
                    format!(
                        "{bind} is bound by an earlier listener; give each listener its own address"
                    ),
                );
            }
            let name = match section.name {
                Some(name) => {
                    if name.get_ref().trim().is_empty() {
                        self.issue(
                            &name,
                            format!("{key}.name"),
                            "a listener name must not be empty",
                        );
                    }
                    if !names.insert(name.get_ref().clone()) {
                        self.issue(
                            &name,
                            format!("{key}.name"),
                            format!(
                                "the name `{}` is used twice; listener names must be unique",
                                name.get_ref()
                            ),
                        );
                    }
                    name.into_inner()
                }
                None => {
                    let name = bind.to_string();
                    if !names.insert(name.clone()) {
                        self.issue(
                            &section.bind,
                            format!("{key}.name"),
                            format!(
                                "another listener is also named `{name}`; give each listener a name"
                            ),
                        );
                    }
                    name
                }
            };
            let mut tls = section.tls.and_then(|tls| self.listener_tls(tls, &key));
            if let Some(flag) = section.http2 {
                match tls.as_mut() {
                    Some(tls) => tls.http2 = *flag.get_ref(),
                    None => self.issue(
                        &flag,
                        format!("{key}.http2"),
                        "applies to TLS listeners (browsers speak HTTP/2 over TLS only)",
                    ),
                }
            }
            let max_connections = section
                .max_connections
                .and_then(|n| self.count(&n, &format!("{key}.max_connections")));
            let trusted = section
                .trusted
                .map(|list| self.networks(&list, &format!("{key}.trusted")))
                .unwrap_or_default();
            let accept_proxy_protocol = match section.accept_proxy_protocol {
                Some(flag) if *flag.get_ref() && trusted.is_empty() => {
                    self.issue(
                        &flag,
                        format!("{key}.accept_proxy_protocol"),
                        "needs `trusted`, the addresses of the load balancers that send the header, like trusted = [\"10.0.0.0/8\"]",
                    );
                    false
                }
                Some(flag) => *flag.get_ref(),
                None => false,
            };
            let trusted_header = match section.trusted_header {
                None => TrustedHeader::default(),
                Some(value) => match value.get_ref().to_ascii_lowercase().as_str() {
                    "x-forwarded-for" => TrustedHeader::XForwardedFor,
                    "forwarded" => TrustedHeader::Forwarded,
                    "x-real-ip" => TrustedHeader::XRealIp,
                    other => {
                        self.issue(
                            &value,
                            format!("{key}.trusted_header"),
                            format!("`{other}` is not a forwarded header; write \"x-forwarded-for\", \"forwarded\" or \"x-real-ip\", the one your proxies write"),
                        );
                        TrustedHeader::default()
                    }
                },
            };
            listeners.push(ListenerConfig {
                name,
                bind,
                tls,
                max_connections,
                accept_proxy_protocol,
                trusted,
                trusted_header,
                reuse_port: section.reuse_port.is_some_and(|flag| *flag.get_ref()),
            });
        }

        if file.routes.is_empty() {
            self.issues.push(ConfigIssue {
                line: 1,
                column: 1,
                key: "route".into(),
                message: "no [[route]] table; add one with path = \"/\" and upstream = \"tcp://127.0.0.1:5900\"".into(),
            });
        }
        let mut routes = Vec::new();
        let mut seen = HashSet::new();
        for (i, section) in file.routes.into_iter().enumerate() {
            let at = Spanned::new(section.span(), ());
            if let Some(route) = self.route(i, section.into_inner(), &names) {
                if !seen.insert((route.host.clone(), route.path.clone())) {
                    self.issue(
                        &at,
                        format!("route[{i}]"),
                        format!(
                            "an earlier route has the same path `{}` and host; remove one",
                            route.path
                        ),
                    );
                }
                routes.push(route);
            }
        }

        Config {
            source: source.to_string(),
            gateway,
            admin,
            listeners,
            routes,
        }
    }

    /// `upstream = "…"` or `upstreams = ["…", { url = "…", weight = 2 }]`, all of one kind.
    fn upstreams(&mut self, section: &RouteSection, key: &str) -> Vec<Target> {
        let mut targets = Vec::new();
        match (&section.upstream, &section.upstreams) {
            (Some(one), None) => match parse_upstream(one.get_ref()) {
                Ok(upstream) => targets.push(Target {
                    upstream,
                    weight: 1,
                }),
                Err(e) => self.issue(one, format!("{key}.upstream"), e),
            },
            (None, Some(list)) => {
                if list.get_ref().is_empty() {
                    self.issue(
                        list,
                        format!("{key}.upstreams"),
                        "is empty; list at least one upstream",
                    );
                }
                for entry in list.get_ref() {
                    let (url, weight) = match entry {
                        UpstreamEntry::Url(url) => (url, Some(1)),
                        UpstreamEntry::Weighted(w) => (
                            &w.url,
                            w.weight.map_or(Some(1), |n| {
                                u32::try_from(n).ok().filter(|n| (1..=1000).contains(n))
                            }),
                        ),
                    };
                    let Some(weight) = weight else {
                        self.issue(
                            list,
                            format!("{key}.upstreams"),
                            format!("{url}: weight must be a whole number from 1 to 1000"),
                        );
                        continue;
                    };
                    match parse_upstream(url) {
                        Ok(upstream) => targets.push(Target { upstream, weight }),
                        Err(e) => self.issue(list, format!("{key}.upstreams"), e),
                    }
                }
                if targets.iter().any(|t| t.upstream.is_ws())
                    && !targets.iter().all(|t| t.upstream.is_ws())
                {
                    self.issue(list, format!("{key}.upstreams"), "mixes WebSocket (ws://, wss://, ws+unix:) and byte-stream (tcp://, unix:) upstreams; a route relays one way, so split them into two routes");
                }
            }
            (Some(one), Some(_)) => self.issue(
                one,
                format!("{key}.upstream"),
                "set either upstream or upstreams, not both",
            ),
            // The upstream comes from a token, or the route only serves files.
            (None, None) if section.targets.is_some() || section.web_root.is_some() => {}
            (None, None) => self.issue(
                &section.path,
                key,
                "has no upstream; add upstream = \"tcp://127.0.0.1:5900\", upstreams = [...], targets = { file = \"…\" } or web_root = \"…\"",
            ),
        }
        targets
    }

    fn health_check(
        &mut self,
        section: Spanned<HealthCheckSection>,
        key: &str,
        is_ws: bool,
    ) -> Option<HealthCheck> {
        let at = Spanned::new(section.span(), ());
        let section = section.into_inner();
        let key = format!("{key}.health_check");
        let duration = |this: &mut Self, v: Option<Spanned<String>>, name: &str, default| {
            v.and_then(|v| this.positive_duration(&v, &format!("{key}.{name}")))
                .unwrap_or(default)
        };
        let interval = duration(
            self,
            section.interval,
            "interval",
            defaults::HEALTH_INTERVAL,
        );
        let timeout = duration(self, section.timeout, "timeout", defaults::HEALTH_TIMEOUT);
        let count = |this: &mut Self, v: Option<Spanned<i64>>, name: &str, default: u32| {
            v.and_then(|v| this.count(&v, &format!("{key}.{name}")))
                .map_or(default, |n| n.min(u32::MAX as usize) as u32)
        };
        let fails = count(self, section.fails, "fails", defaults::HEALTH_FAILS);
        let passes = count(self, section.passes, "passes", defaults::HEALTH_PASSES);
        let path = match section.path {
            Some(p) if !is_ws => {
                self.issue(
                    &p,
                    format!("{key}.path"),
                    "applies to ws upstreams only; tcp upstreams are checked by connecting",
                );
                None
            }
            Some(p) if !p.get_ref().starts_with('/') => {
                self.issue(
                    &p,
                    format!("{key}.path"),
                    format!("`{}` must start with `/`", p.get_ref()),
                );
                None
            }
            Some(p) => Some(p.into_inner()),
            None => None,
        };
        if timeout > interval {
            self.issue(
                &at,
                key.clone(),
                "timeout is longer than interval; checks would overlap",
            );
        }
        Some(HealthCheck {
            interval,
            timeout,
            path,
            fails,
            passes,
        })
    }

    fn route(
        &mut self,
        i: usize,
        mut section: RouteSection,
        listener_names: &HashSet<String>,
    ) -> Option<RouteConfig> {
        let key = format!("route[{i}]");
        let issues_before = self.issues.len();

        let listeners = section.listeners.take().map(|list| {
            if list.get_ref().is_empty() {
                self.issue(
                    &list,
                    format!("{key}.listeners"),
                    "an empty list binds the route to no listener; name at least one, or remove the key to serve it on every listener",
                );
            }
            for name in list.get_ref() {
                if !listener_names.contains(name) {
                    let mut known: Vec<&String> = listener_names.iter().collect();
                    known.sort();
                    self.issue(
                        &list,
                        format!("{key}.listeners"),
                        format!("no [[listener]] is named `{name}`; the listeners are named {known:?}"),
                    );
                }
            }
            list.into_inner()
        });

        let path = normalize_path(section.path.get_ref());
        if path.is_none() {
            self.issue(
                &section.path,
                format!("{key}.path"),
                format!(
                    "`{}` is not a path prefix; write one that starts with `/` and has no query, like \"/vnc\"",
                    section.path.get_ref()
                ),
            );
        }

        let upstreams = self.upstreams(&section, &key);
        let host = section.host.and_then(|host| {
            let value = host.get_ref().trim().trim_end_matches('.').to_ascii_lowercase();
            let bare = value.strip_prefix("*.").unwrap_or(&value);
            if bare.is_empty()
                || !bare
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                self.issue(
                    &host,
                    format!("{key}.host"),
                    format!(
                        "`{}` is not a host name; write one like \"app.example.com\" or \"*.example.com\" (no port)",
                        host.get_ref()
                    ),
                );
                None
            } else {
                Some(value)
            }
        });

        let is_ws = upstreams.first().is_some_and(|t| t.upstream.is_ws());
        let balance = section.balance.as_ref().and_then(|b| match b.get_ref().as_str() {
            "round_robin" => Some(Balance::RoundRobin),
            "least_connections" => Some(Balance::LeastConnections),
            "random_two" => Some(Balance::RandomTwo),
            other => {
                self.issue(
                    b,
                    format!("{key}.balance"),
                    format!("`{other}` is not a balance mode; write \"round_robin\", \"least_connections\" or \"random_two\""),
                );
                None
            }
        });
        let connect_attempts = section
            .connect_attempts
            .and_then(|n| self.count(&n, &format!("{key}.connect_attempts")))
            .unwrap_or(upstreams.len().max(1));
        let connect_budget = section
            .connect_budget
            .and_then(|v| self.positive_duration(&v, &format!("{key}.connect_budget")));
        let max_fails = match section.max_fails {
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(n) => n,
                Err(_) => {
                    self.issue(
                        &n,
                        format!("{key}.max_fails"),
                        "must be a whole number, 0 or more (0 never takes an upstream out)",
                    );
                    0
                }
            },
            None => defaults::MAX_FAILS,
        };
        let fail_timeout = section
            .fail_timeout
            .and_then(|v| self.positive_duration(&v, &format!("{key}.fail_timeout")))
            .unwrap_or(defaults::FAIL_TIMEOUT);
        let health_check = section
            .health_check
            .and_then(|h| self.health_check(h, &key, is_ws));
        let proxy_protocol = section.proxy_protocol.and_then(|v| {
            let version = match v.get_ref().as_str() {
                "v1" => ProxyProtocol::V1,
                "v2" => ProxyProtocol::V2,
                other => {
                    self.issue(&v, format!("{key}.proxy_protocol"), format!("`{other}` is not a PROXY protocol version; write \"v1\" or \"v2\""));
                    return None;
                }
            };
            if is_ws {
                self.issue(&v, format!("{key}.proxy_protocol"), "applies to tcp:// and unix: upstreams only; ws upstreams get X-Forwarded-For and Forwarded headers instead");
                return None;
            }
            Some(version)
        });
        let mut ws_only = |flag: Option<Spanned<bool>>, name: &str, default: bool| match flag {
            Some(flag) if !is_ws && *flag.get_ref() => {
                self.issue(&flag, format!("{key}.{name}"), "applies to ws:// and wss:// upstreams only (headers need an HTTP handshake); use proxy_protocol for tcp:// upstreams");
                false
            }
            Some(flag) => *flag.get_ref(),
            None => default && is_ws,
        };
        let forwarded_headers = ws_only(section.forwarded_headers, "forwarded_headers", true);
        let x_real_ip = ws_only(section.x_real_ip, "x_real_ip", false);

        let mut subprotocols = Vec::new();
        if let Some(list) = section.subprotocols {
            if is_ws {
                self.issue(
                    &list,
                    format!("{key}.subprotocols"),
                    "applies to tcp:// and unix: upstreams only; a ws:// upstream chooses from what the client offers, so remove this key",
                );
            }
            for p in list.get_ref() {
                if p.is_empty() || !p.bytes().all(is_token_byte) {
                    self.issue(
                        &list,
                        format!("{key}.subprotocols"),
                        format!("`{p}` is not a valid subprotocol token (letters, digits and !#$%&'*+-.^_`|~)"),
                    );
                }
            }
            subprotocols = list.into_inner();
        }

        let max_message_size = section
            .max_message_size
            .and_then(|size| self.message_size(&size, &format!("{key}.max_message_size")))
            .unwrap_or(defaults::MAX_MESSAGE_SIZE);
        // Browsers send each message as one frame, so by default a frame may be as large as
        // a message; a smaller limit only suits clients known to fragment.
        let max_frame_size = section
            .max_frame_size
            .and_then(|size| self.message_size(&size, &format!("{key}.max_frame_size")))
            .unwrap_or(max_message_size);

        let allowed_origins = section.allowed_origins.map(|list| {
            let mut origins = Vec::new();
            for origin in list.get_ref() {
                match OriginRule::parse(origin) {
                    Some(o) => origins.push(o),
                    None => self.issue(
                        &list,
                        format!("{key}.allowed_origins"),
                        format!("`{origin}` is not an origin; write scheme://host[:port] without a path, like \"https://app.example.com\", or a pattern like \"https://*.example.com\""),
                    ),
                }
            }
            origins
        });

        let connect_timeout = section
            .connect_timeout
            .and_then(|v| self.positive_duration(&v, &format!("{key}.connect_timeout")))
            .unwrap_or(defaults::CONNECT_TIMEOUT);
        let idle_timeout = section
            .idle_timeout
            .and_then(|v| self.positive_duration(&v, &format!("{key}.idle_timeout")));
        // Keepalive pings are on unless turned off: a client that vanished without FIN or
        // RST is otherwise never noticed (SPEC §4).
        let ping_interval = match section.ping_interval {
            None => Some(defaults::PING.interval),
            Some(v) => self
                .duration_or_off(&v, &format!("{key}.ping_interval"))
                .unwrap_or(Some(defaults::PING.interval)),
        };
        let ping_timeout = section.ping_timeout.and_then(|v| {
            if ping_interval.is_none() {
                self.issue(
                    &v,
                    format!("{key}.ping_timeout"),
                    "has no effect with ping_interval = \"off\"; remove it",
                );
                None
            } else {
                self.positive_duration(&v, &format!("{key}.ping_timeout"))
            }
        });
        let ping = ping_interval.map(|interval| PingConfig {
            interval,
            timeout: ping_timeout.unwrap_or(interval),
        });

        let wss = upstreams
            .iter()
            .any(|t| matches!(t.upstream, Upstream::Ws { tls: true, .. }));
        let mut wss_only = |value: Option<Spanned<String>>, name: &str| {
            let value = value?;
            if wss {
                Some(value)
            } else {
                self.issue(
                    &value,
                    format!("{key}.{name}"),
                    "applies to wss:// upstreams only; remove it or change the upstream to wss://",
                );
                None
            }
        };
        let ca = wss_only(section.ca, "ca").map(|ca| PathBuf::from(ca.into_inner()));
        let client_cert_path = wss_only(section.client_cert, "client_cert");
        let client_key_path = wss_only(section.client_key, "client_key");
        let tls_server_name = wss_only(section.tls_server_name, "tls_server_name");
        let faults = section.faults.and_then(|f| self.faults(f, &key));
        let web_root_written = section.web_root.is_some();
        let web_root = section.web_root.take().and_then(|dir| {
            let path = PathBuf::from(dir.get_ref());
            if path.is_dir() {
                Some(path)
            } else {
                self.issue(
                    &dir,
                    format!("{key}.web_root"),
                    format!(
                        "{}: not a folder; name the folder the files are in",
                        path.display()
                    ),
                );
                None
            }
        });
        let targets = section.targets.take().and_then(|t| {
            if upstreams.iter().len() > 0 {
                self.issue(
                    &t,
                    format!("{key}.targets"),
                    "replaces upstream: set one of them",
                );
            }
            let at = Spanned::new(t.span(), ());
            match t.into_inner() {
                TargetsSection {
                    file: Some(f),
                    dir: None,
                } => Some(TokenSource::File(f.into())),
                TargetsSection {
                    file: None,
                    dir: Some(d),
                } => Some(TokenSource::Dir(d.into())),
                _ => {
                    self.issue(
                        &at,
                        format!("{key}.targets"),
                        "set one of file = \"tokens.cfg\" and dir = \"tokens.d\"",
                    );
                    None
                }
            }
        });
        let token_from = match section.token_from.take() {
            None => TokenFrom::Query,
            Some(from) => {
                if targets.is_none() {
                    self.issue(
                        &from,
                        format!("{key}.token_from"),
                        "applies to routes with targets only",
                    );
                }
                match from.get_ref().as_str() {
                    "query" => TokenFrom::Query,
                    "path" => TokenFrom::Path,
                    other => {
                        self.issue(&from, format!("{key}.token_from"), format!("`{other}` is not a place; write \"query\" (the token parameter) or \"path\" (the last segment)"));
                        TokenFrom::Query
                    }
                }
            }
        };
        let targets = targets.map(|source| TokenTargets {
            source,
            from: token_from,
        });
        let allowed_targets = match section.allowed_targets.take() {
            None => Vec::new(),
            Some(list) => {
                if targets.is_none() {
                    self.issue(
                        &list,
                        format!("{key}.allowed_targets"),
                        "applies to routes with targets only",
                    );
                }
                let mut rules = Vec::new();
                for text in list.get_ref() {
                    match parse_target_rule(text) {
                        Some(rule) => rules.push(rule),
                        None => self.issue(&list, format!("{key}.allowed_targets"), format!("`{text}` is not an address block with optional ports; write one like \"10.0.0.0/8\", \"192.0.2.7:5900\" or \"192.0.2.0/24:5900-5999\"")),
                    }
                }
                rules
            }
        };
        let auth_written = section.auth.is_some();
        let auth = section.auth.take().and_then(|a| self.auth(a, &key));
        let web_auth = match section.web_auth.take() {
            Some(flag) if *flag.get_ref() => {
                let missing = match (web_root_written, auth_written) {
                    (false, _) => Some("needs web_root: it guards the web root's files"),
                    (true, false) => Some("needs auth: it says who may fetch the files"),
                    (true, true) => None,
                };
                if let Some(message) = missing {
                    self.issue(&flag, format!("{key}.web_auth"), message);
                }
                true
            }
            _ => false,
        };
        let identity_header = section.identity_header.take().and_then(|name| {
            if http::HeaderName::from_bytes(name.get_ref().as_bytes()).is_err() {
                self.issue(
                    &name,
                    format!("{key}.identity_header"),
                    "is not a valid header name",
                );
                return None;
            }
            if auth.is_none() {
                self.issue(
                    &name,
                    format!("{key}.identity_header"),
                    "needs auth: there is no authenticated name without it",
                );
            }
            Some(name.into_inner().to_ascii_lowercase())
        });
        let compression = match section.compression.take() {
            Some(flag) if *flag.get_ref() && is_ws => {
                self.issue(&flag, format!("{key}.compression"), "applies to tcp and unix upstreams; ws routes pass permessage-deflate through to the upstream, which decides");
                false
            }
            Some(flag) => *flag.get_ref(),
            None => false,
        };
        let framing = match section.framing.take() {
            None => Framing::Stream,
            Some(f) => match f.get_ref().as_str() {
                "stream" => Framing::Stream,
                "lines" if is_ws => {
                    self.issue(&f, format!("{key}.framing"), "applies to tcp and unix upstreams; WebSocket upstreams keep their messages");
                    Framing::Stream
                }
                "lines" => Framing::Lines,
                other => {
                    self.issue(
                        &f,
                        format!("{key}.framing"),
                        format!("`{other}` is not a framing; write \"stream\" or \"lines\""),
                    );
                    Framing::Stream
                }
            },
        };
        let insecure_skip_verify = match section.insecure_skip_verify {
            Some(flag) if *flag.get_ref() && !wss => {
                self.issue(
                    &flag,
                    format!("{key}.insecure_skip_verify"),
                    "applies to wss:// upstreams only",
                );
                false
            }
            Some(flag) => *flag.get_ref(),
            None => false,
        };
        let client_cert = match (client_cert_path, client_key_path) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: PathBuf::from(cert.into_inner()),
                key: PathBuf::from(key.into_inner()),
            }),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                self.issue(
                    &one,
                    format!("{key}.client_cert"),
                    "client_cert and client_key go together; set both or neither",
                );
                None
            }
        };
        let tls_server_name = tls_server_name.and_then(|name| {
            if rustls_pki_types::ServerName::try_from(name.get_ref().as_str()).is_err() {
                self.issue(
                    &name,
                    format!("{key}.tls_server_name"),
                    format!("`{}` is not a DNS name or IP address", name.get_ref()),
                );
                None
            } else {
                Some(name.into_inner())
            }
        });

        if self.issues.len() > issues_before {
            return None;
        }
        Some(RouteConfig {
            path: path?,
            host,
            listeners,
            upstreams,
            balance: balance.unwrap_or(Balance::RoundRobin),
            connect_attempts,
            connect_budget,
            max_fails,
            fail_timeout,
            health_check,
            proxy_protocol,
            forwarded_headers,
            x_real_ip,
            subprotocols,
            max_message_size,
            max_frame_size,
            allowed_origins,
            idle_timeout,
            ping,
            connect_timeout,
            ca,
            client_cert,
            tls_server_name,
            insecure_skip_verify,
            faults,
            web_root,
            web_auth,
            targets,
            allowed_targets,
            auth,
            identity_header,
            framing,
            compression,
        })
    }

    /// One of `jwt`, `basic` and `forward`.
    fn auth(&mut self, section: Spanned<AuthSection>, key: &str) -> Option<Auth> {
        let at = Spanned::new(section.span(), ());
        let key = format!("{key}.auth");
        match section.into_inner() {
            AuthSection {
                jwt: Some(jwt),
                basic: None,
                forward: None,
            } => self.jwt(jwt, &key).map(Auth::Jwt),
            AuthSection {
                jwt: None,
                basic: Some(basic),
                forward: None,
            } => {
                let basic = basic.into_inner();
                Some(Auth::Basic(BasicAuth {
                    htpasswd: basic.htpasswd.into(),
                    realm: basic
                        .realm
                        .unwrap_or_else(|| defaults::BASIC_REALM.to_string()),
                }))
            }
            AuthSection {
                jwt: None,
                basic: None,
                forward: Some(forward),
            } => {
                let at = Spanned::new(forward.span(), ());
                let forward = forward.into_inner();
                let Ok(uri) = forward.url.parse::<http::Uri>() else {
                    self.issue(
                        &at,
                        format!("{key}.forward.url"),
                        format!(
                            "`{}` is not a URL; write one like \"http://127.0.0.1:9000/check\"",
                            forward.url
                        ),
                    );
                    return None;
                };
                if uri.scheme_str() != Some("http") || uri.host().is_none() {
                    self.issue(&at, format!("{key}.forward.url"), format!("`{}`: the auth service is reached over plain http://host:port/path (keep it on a private address)", forward.url));
                    return None;
                }
                let timeout = match forward.timeout.map(|t| parse_duration(&t)) {
                    None => defaults::FORWARD_AUTH_TIMEOUT,
                    Some(Ok(d)) if !d.is_zero() => d,
                    Some(Ok(_)) => {
                        self.issue(
                            &at,
                            format!("{key}.forward.timeout"),
                            "must be longer than zero",
                        );
                        return None;
                    }
                    Some(Err(e)) => {
                        self.issue(&at, format!("{key}.forward.timeout"), e);
                        return None;
                    }
                };
                let mut copy = Vec::new();
                for name in forward.copy_response_headers.unwrap_or_default() {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        self.issue(
                            &at,
                            format!("{key}.forward.copy_response_headers"),
                            format!("`{name}` is not a header name"),
                        );
                    }
                    copy.push(name.to_ascii_lowercase());
                }
                Some(Auth::Forward(ForwardAuth {
                    host: uri
                        .host()
                        .unwrap_or_default()
                        .trim_matches(['[', ']'])
                        .to_string(),
                    port: uri.port_u16().unwrap_or(80),
                    path_and_query: uri.path_and_query().map_or("/".into(), |p| p.to_string()),
                    timeout,
                    copy_response_headers: copy,
                }))
            }
            _ => {
                self.issue(
                    &at,
                    key,
                    "set one of jwt = { … }, basic = { … } and forward = { … }",
                );
                None
            }
        }
    }

    fn jwt(&mut self, section: Spanned<JwtSection>, key: &str) -> Option<JwtAuth> {
        let at = Spanned::new(section.span(), ());
        let key = format!("{key}.jwt");
        let jwt = section.into_inner();
        let keys = match (jwt.jwks, jwt.secret_file) {
            (Some(jwks), None) => JwtKeys::Jwks(jwks.into()),
            (None, Some(secret)) => JwtKeys::Secret(secret.into()),
            _ => {
                self.issue(&at, key, "set one of jwks = \"keys.json\" (public keys) and secret_file = \"hs.key\" (a shared secret)");
                return None;
            }
        };
        let algorithms = match jwt.algorithms {
            Some(list) => list,
            None => match keys {
                JwtKeys::Jwks(_) => ["RS256", "ES256", "EdDSA"].map(String::from).to_vec(),
                JwtKeys::Secret(_) => vec!["HS256".to_string()],
            },
        };
        for name in &algorithms {
            let known = name.parse::<jsonwebtoken::Algorithm>().is_ok();
            let fits = matches!(
                (&keys, name.starts_with("HS")),
                (JwtKeys::Secret(_), true) | (JwtKeys::Jwks(_), false)
            );
            if !known {
                self.issue(&at, format!("{key}.algorithms"), format!("`{name}` is not a JWT algorithm; use RS256, RS384, RS512, PS256, ES256, ES384, EdDSA, HS256, HS384 or HS512"));
            } else if !fits {
                self.issue(
                    &at,
                    format!("{key}.algorithms"),
                    format!(
                        "`{name}` does not go with the key: HS* need secret_file, the others jwks"
                    ),
                );
            }
        }
        let leeway = match jwt.leeway.map(|l| parse_duration(&l)) {
            None => defaults::JWT_LEEWAY,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.issue(&at, format!("{key}.leeway"), e);
                defaults::JWT_LEEWAY
            }
        };
        let from_text: Vec<String> = jwt
            .from
            .unwrap_or_else(|| defaults::JWT_FROM.iter().map(|s| s.to_string()).collect());
        let mut from = Vec::new();
        for place in &from_text {
            let source = match place.split_once(':') {
                Some(("header", "authorization")) => Some(CredentialSource::Authorization),
                Some(("cookie", name)) if !name.is_empty() => {
                    Some(CredentialSource::Cookie(name.into()))
                }
                Some(("query", name)) if !name.is_empty() => {
                    Some(CredentialSource::Query(name.into()))
                }
                None if place == "subprotocol" => Some(CredentialSource::Subprotocol),
                _ => None,
            };
            match source {
                Some(source) => from.push(source),
                None => self.issue(&at, format!("{key}.from"), format!("`{place}` is not a place for a token; use \"header:authorization\", \"cookie:NAME\", \"query:NAME\" or \"subprotocol\"")),
            }
        }
        if from.is_empty() {
            self.issue(
                &at,
                format!("{key}.from"),
                "is empty; name where the token is",
            );
        }
        Some(JwtAuth {
            keys,
            algorithms,
            issuer: jwt.issuer,
            audience: jwt.audience,
            leeway,
            from,
            target_claim: jwt.target_claim,
        })
    }

    /// A route's `faults` table; refused unless `[gateway] allow_faults = true`.
    fn faults(&mut self, section: Spanned<FaultsSection>, key: &str) -> Option<Faults> {
        let key = format!("{key}.faults");
        if !self.allow_faults {
            self.issue(
                &section,
                key,
                "faults are for testing clients; set allow_faults = true in [gateway] to use them",
            );
            return None;
        }
        let section = section.into_inner();
        let latency = section
            .latency
            .and_then(|v| self.positive_duration(&v, &format!("{key}.latency")));
        let close_after = section.close_after.and_then(|t| {
            let at = Spanned::new(t.span(), ());
            let name = format!("{key}.close_after");
            let code = t.get_ref().code.unwrap_or(i64::from(defaults::FAULT_CLOSE_CODE));
            let code = match u16::try_from(code) {
                Ok(c) if crate::relay::frames::is_valid_close_code(c) && c != 1000 => c,
                _ => {
                    self.issue(&at, format!("{name}.code"), format!("{code} is not a close code a server may send; use 1001, 1011, 1012, 1013 or 3000-4999"));
                    return None;
                }
            };
            let reason = t.get_ref().reason.clone().unwrap_or_default();
            if reason.len() > 123 {
                self.issue(&at, format!("{name}.reason"), "is longer than the 123 bytes a Close frame holds");
                return None;
            }
            let when = self.threshold(t, &name, true)?;
            Some(CloseAfter { when, code, reason })
        });
        let reset_after = section
            .reset_after
            .and_then(|t| self.threshold(t, &format!("{key}.reset_after"), false));
        let stall_after = section
            .stall_after
            .and_then(|t| self.threshold(t, &format!("{key}.stall_after"), false));
        let refuse_first = section.refuse_first.and_then(|r| {
            let name = format!("{key}.refuse_first");
            let count = r
                .get_ref()
                .count
                .unwrap_or(defaults::FAULT_REFUSE_COUNT as i64);
            let status = r
                .get_ref()
                .status
                .unwrap_or(i64::from(defaults::FAULT_REFUSE_STATUS));
            let Ok(count) = u64::try_from(count) else {
                self.issue(
                    &r,
                    format!("{name}.count"),
                    "must be a whole number of at least 0",
                );
                return None;
            };
            match u16::try_from(status) {
                Ok(status) if (400..=599).contains(&status) => Some(Refuse { count, status }),
                _ => {
                    self.issue(
                        &r,
                        format!("{name}.status"),
                        format!("{status} is not an error status; use 400 to 599, like 503"),
                    );
                    None
                }
            }
        });
        let fragment = section
            .fragment
            .and_then(|n| match usize::try_from(*n.get_ref()) {
                Ok(frames @ 1..=1024) => Some(frames),
                _ => {
                    self.issue(
                        &n,
                        format!("{key}.fragment"),
                        "must be a number of frames from 1 to 1024",
                    );
                    None
                }
            });
        Some(Faults {
            latency,
            close_after,
            reset_after,
            stall_after,
            refuse_first,
            fragment,
        })
    }

    /// Exactly one of `messages`, `bytes` and `after`.
    fn threshold(
        &mut self,
        section: Spanned<ThresholdSection>,
        key: &str,
        closes: bool,
    ) -> Option<Threshold> {
        let at = Spanned::new(section.span(), ());
        let t = section.into_inner();
        if !closes && (t.code.is_some() || t.reason.is_some()) {
            self.issue(&at, key, "code and reason belong to close_after only");
        }
        let mut chosen = Vec::new();
        if let Some(n) = t.messages {
            match u64::try_from(n) {
                Ok(n) => chosen.push(Threshold::Messages(n)),
                Err(_) => self.issue(
                    &at,
                    format!("{key}.messages"),
                    "must be a whole number of at least 0",
                ),
            }
        }
        if let Some(size) = t.bytes
            && let Some(n) = self.size(&Spanned::new(at.span(), size), &format!("{key}.bytes"))
        {
            chosen.push(Threshold::Bytes(n as u64));
        }
        if let Some(after) = t.after {
            match parse_duration(&after) {
                Ok(d) => chosen.push(Threshold::After(d)),
                Err(e) => self.issue(&at, format!("{key}.after"), e),
            }
        }
        match chosen.as_slice() {
            [one] => Some(*one),
            [] => {
                self.issue(
                    &at,
                    key,
                    "needs one of messages = N, bytes = N or after = \"5s\"",
                );
                None
            }
            _ => {
                self.issue(
                    &at,
                    key,
                    "set one of messages, bytes and after, not several",
                );
                None
            }
        }
    }
}

/// `10.0.0.0/8`, `192.0.2.7`, `192.0.2.7:5900`, `192.0.2.0/24:5900-5999`, `[::1]:5900`, `::1`.
fn parse_target_rule(text: &str) -> Option<TargetRule> {
    let (net, ports) = if let Some(rest) = text.strip_prefix('[') {
        let (net, after) = rest.split_once(']')?;
        (net, after.strip_prefix(':'))
    } else if text.matches(':').count() == 1 {
        let (net, ports) = text.split_once(':')?;
        (net, Some(ports))
    } else {
        (text, None)
    };
    let net = net
        .parse::<ipnet::IpNet>()
        .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .ok()?
        .trunc();
    let ports = match ports {
        None => None,
        Some(range) => {
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            let (low, high) = (low.parse::<u16>().ok()?, high.parse::<u16>().ok()?);
            if low > high {
                return None;
            }
            Some((low, high))
        }
    };
    Some(TargetRule { net, ports })
}

/// RFC 7230 `tchar`, the alphabet of subprotocol names.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A route prefix, normalised as request paths are (so that it can match them), without a
/// trailing `/`.
fn normalize_path(path: &str) -> Option<String> {
    if path.contains(['?', '#']) || path.contains(char::is_whitespace) {
        return None;
    }
    let path = crate::routing::normalize_path(path).ok()?;
    let trimmed = path.trim_end_matches('/');
    Some(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

/// Parses `tcp://host:port`, `ws://host[:port][/path]`, `wss://…`, `unix:/path` or
/// `ws+unix:/socket[:/path]`.
pub(crate) fn parse_upstream(text: &str) -> Result<Upstream, String> {
    if let Some(rest) = text.strip_prefix("ws+unix:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        // Like nginx's `http://unix:/socket:/uri`: the request path follows a colon.
        let (socket, path) = match rest.find(":/") {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if socket.is_empty() {
            return Err("`ws+unix:` needs a socket path, like \"ws+unix:/run/app.sock\" or \"ws+unix:/run/app.sock:/ws\"".into());
        }
        return Ok(Upstream::WsUnix {
            socket: PathBuf::from(socket),
            path: path.to_string(),
        });
    }
    if let Some(path) = text.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err("`unix:` needs a socket path, like \"unix:/run/app.sock\"".into());
        }
        return Ok(Upstream::Unix {
            path: PathBuf::from(path),
        });
    }
    let bad_scheme = || {
        format!(
            "`{text}` is not an upstream; write tcp://host:port, ws://host:port/path, wss://host:port/path, unix:/path or ws+unix:/path"
        )
    };
    let uri: http::Uri = text.parse().map_err(|_| bad_scheme())?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(bad_scheme)?
        .to_ascii_lowercase();
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("`{text}` has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "`{text}`: credentials in the upstream URL are not supported"
        ));
    }
    // http::Uri reports "/" for a URL without a path; an absent path has its own meaning
    // for ws:// upstreams (forward the client's path), so look at the text itself.
    let after_authority = text.split_once("://").map_or("", |(_, rest)| rest);
    let path = if after_authority.contains(['/', '?']) {
        uri.path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("")
            .to_string()
    } else {
        String::new()
    };
    match scheme.as_str() {
        "tcp" => {
            let port = uri
                .port_u16()
                .ok_or_else(|| format!("`{text}` needs a port, like tcp://127.0.0.1:5900"))?;
            if !(path.is_empty() || path == "/") {
                return Err(format!(
                    "`{text}`: a tcp:// upstream has no path; remove `{path}`"
                ));
            }
            Ok(Upstream::Tcp { host, port })
        }
        "ws" | "wss" => {
            let tls = scheme == "wss";
            let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
            Ok(Upstream::Ws {
                tls,
                host,
                port,
                path,
            })
        }
        _ => Err(bad_scheme()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> String {
        match Config::parse(text, "test.toml") {
            Ok(_) => panic!("config was accepted"),
            Err(e) => e.to_string(),
        }
    }

    const MINIMAL: &str = "[[listener]]\nbind = \"127.0.0.1:8080\"\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:5900\"\n";

    #[test]
    fn minimal_file_uses_defaults() {
        let config = Config::parse(MINIMAL, "test.toml").unwrap();
        assert_eq!(config.listeners[0].name, "127.0.0.1:8080");
        let route = &config.routes[0];
        assert_eq!(route.path, "/");
        assert_eq!(route.max_message_size, defaults::MAX_MESSAGE_SIZE);
        assert_eq!(route.connect_timeout, defaults::CONNECT_TIMEOUT);
        assert_eq!(config.gateway.shutdown_timeout, defaults::SHUTDOWN_TIMEOUT);
        assert_eq!(
            route.upstreams,
            [Target {
                upstream: Upstream::Tcp {
                    host: "127.0.0.1".into(),
                    port: 5900
                },
                weight: 1
            }]
        );
    }

    #[test]
    fn unknown_key_names_line_column_and_key() {
        let text = MINIMAL.replace("path = \"/\"", "path = \"/\"\npaht = \"/x\"");
        let message = errors(&text);
        assert!(message.starts_with("test.toml:6:1: "), "{message}");
        assert!(message.contains("paht"), "{message}");
    }

    #[test]
    fn bad_address_names_line_and_key() {
        let text = MINIMAL.replace("127.0.0.1:8080", "localhost:80x");
        let message = errors(&text);
        assert!(
            message
                .starts_with("test.toml:2:8: listener[0].bind: `localhost:80x` is not an address"),
            "{message}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = MINIMAL.replace("path = \"/\"", "path = 5");
        let message = errors(&text);
        assert!(message.starts_with("test.toml:5:8: path: "), "{message}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[gateway]\nshutdown_timeout = \"soon\"\n[[listener]]\nbind = \"nowhere\"\n[[route]]\npath = \"vnc\"\nupstream = \"http://x\"\n";
        let message = errors(text);
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), 4, "{message}");
        assert!(
            lines[0].starts_with("test.toml:2:20: gateway.shutdown_timeout"),
            "{message}"
        );
        assert!(
            lines[1].starts_with("test.toml:4:8: listener[0].bind"),
            "{message}"
        );
        assert!(
            lines[2].starts_with("test.toml:6:8: route[0].path"),
            "{message}"
        );
        assert!(
            lines[3].starts_with("test.toml:7:12: route[0].upstream"),
            "{message}"
        );
    }

    #[test]
    fn pools_and_client_identity() {
        let text = "[[listener]]\nbind = \"127.0.0.1:8080\"\naccept_proxy_protocol = true\ntrusted = [\"10.0.0.0/8\", \"::1\"]\n\n[[route]]\npath = \"/\"\nupstreams = [\"tcp://127.0.0.1:1\", { url = \"tcp://127.0.0.1:2\", weight = 3 }]\nbalance = \"least_connections\"\nproxy_protocol = \"v2\"\nhealth_check = { interval = \"1s\", timeout = \"500ms\" }\n";
        let config = Config::parse(text, "t.toml").unwrap();
        let listener = &config.listeners[0];
        assert!(listener.accept_proxy_protocol);
        assert!(listener.trusts("10.1.2.3".parse().unwrap()));
        assert!(listener.trusts("::1".parse().unwrap()));
        assert!(!listener.trusts("127.0.0.1".parse().unwrap()));
        let route = &config.routes[0];
        assert_eq!(route.upstreams.len(), 2);
        assert_eq!(route.upstreams[1].weight, 3);
        assert_eq!(route.balance, Balance::LeastConnections);
        assert_eq!(route.connect_attempts, 2);
        assert_eq!(route.proxy_protocol, Some(ProxyProtocol::V2));
        assert!(!route.forwarded_headers, "tcp routes have no headers");
        assert_eq!(
            route.health_check.as_ref().unwrap().fails,
            defaults::HEALTH_FAILS
        );

        let bad = errors(
            "[[listener]]\nbind = \"127.0.0.1:8080\"\naccept_proxy_protocol = true\n[[route]]\npath = \"/\"\nupstreams = [\"tcp://a:1\", \"ws://b:2\"]\nbalance = \"fastest\"\nproxy_protocol = \"v3\"\n",
        );
        for needle in [
            "accept_proxy_protocol: needs `trusted`",
            "route[0].upstreams: mixes",
            "route[0].balance: `fastest`",
            "route[0].proxy_protocol: `v3`",
        ] {
            assert!(bad.contains(needle), "{needle} in\n{bad}");
        }
        let ws = Config::parse("[[listener]]\nbind = \"127.0.0.1:8080\"\n[[route]]\npath = \"/\"\nupstream = \"ws://a:1\"\n", "t").unwrap();
        assert!(
            ws.routes[0].forwarded_headers,
            "on by default toward ws upstreams"
        );
        assert!(errors("[[listener]]\nbind = \"127.0.0.1:8080\"\n[[route]]\npath = \"/\"\nupstream = \"ws://a:1\"\nproxy_protocol = \"v1\"\n").contains("tcp:// and unix: upstreams only"));
    }

    #[test]
    fn upstream_forms() {
        assert_eq!(
            parse_upstream("ws://backend/chat?room=1"),
            Ok(Upstream::Ws {
                tls: false,
                host: "backend".into(),
                port: 80,
                path: "/chat?room=1".into()
            })
        );
        assert_eq!(
            parse_upstream("wss://[::1]:9443"),
            Ok(Upstream::Ws {
                tls: true,
                host: "::1".into(),
                port: 9443,
                path: "".into()
            })
        );
        assert_eq!(
            parse_upstream("unix:/run/app.sock"),
            Ok(Upstream::Unix {
                path: "/run/app.sock".into()
            })
        );
        assert_eq!(
            parse_upstream("ws+unix:/run/app.sock:/ws?x=1"),
            Ok(Upstream::WsUnix {
                socket: "/run/app.sock".into(),
                path: "/ws?x=1".into()
            })
        );
        assert_eq!(
            parse_upstream("ws+unix:/run/app.sock"),
            Ok(Upstream::WsUnix {
                socket: "/run/app.sock".into(),
                path: "".into()
            })
        );
        assert!(parse_upstream("ws+unix:").is_err());
        assert!(parse_upstream("tcp://host").is_err());
        assert!(parse_upstream("tcp://host:1/path").is_err());
        assert!(parse_upstream("http://host:1").is_err());
        assert!(parse_upstream("127.0.0.1:5900").is_err());
    }

    #[test]
    fn ca_only_for_wss_and_subprotocols_only_for_tcp() {
        let text = MINIMAL.replace(
            "upstream = \"tcp://127.0.0.1:5900\"",
            "upstream = \"tcp://127.0.0.1:5900\"\nca = \"ca.pem\"",
        );
        assert!(errors(&text).contains("route[0].ca: applies to wss://"));
        let text = MINIMAL.replace(
            "upstream = \"tcp://127.0.0.1:5900\"",
            "upstream = \"ws://127.0.0.1:5900\"\nsubprotocols = [\"chat\"]",
        );
        assert!(errors(&text).contains("route[0].subprotocols: applies to tcp://"));
    }

    #[test]
    fn sizes_accept_numbers_and_units() {
        let text = MINIMAL.replace("path = \"/\"", "path = \"/\"\nmax_message_size = \"64KiB\"");
        assert_eq!(
            Config::parse(&text, "t").unwrap().routes[0].max_message_size,
            65536
        );
        let text = MINIMAL.replace("path = \"/\"", "path = \"/\"\nmax_message_size = 1000");
        assert_eq!(
            Config::parse(&text, "t").unwrap().routes[0].max_message_size,
            1000
        );
    }

    #[test]
    fn dead_peer_detection_is_on_by_default_and_can_be_turned_off() {
        let config = Config::parse(MINIMAL, "t").unwrap();
        assert_eq!(
            config.gateway.tcp_keepalive,
            Some(defaults::TCP_KEEPALIVE),
            "tcp keepalive on by default"
        );
        assert_eq!(
            config.gateway.tcp_keepalive.unwrap().detection_time(),
            Duration::from_secs(120)
        );
        assert_eq!(config.routes[0].ping, Some(defaults::PING));

        let text = format!(
            "[gateway]\ntcp_keepalive = {{ idle = \"5s\", probes = 3 }}\n{}",
            MINIMAL.replace("[[route]]\n", "[[route]]\nping_interval = \"10s\"\n")
        );
        let config = Config::parse(&text, "t").unwrap();
        let keepalive = config.gateway.tcp_keepalive.unwrap();
        assert_eq!(keepalive.idle, Duration::from_secs(5));
        assert_eq!(keepalive.interval, defaults::TCP_KEEPALIVE.interval);
        assert_eq!(keepalive.probes, 3);
        let ping = config.routes[0].ping.unwrap();
        assert_eq!(
            (ping.interval, ping.timeout),
            (Duration::from_secs(10), Duration::from_secs(10))
        );

        let text = format!(
            "[gateway]\ntcp_keepalive = \"off\"\n{}",
            MINIMAL.replace("[[route]]\n", "[[route]]\nping_interval = \"off\"\n")
        );
        let config = Config::parse(&text, "t").unwrap();
        assert_eq!(config.gateway.tcp_keepalive, None);
        assert_eq!(config.routes[0].ping, None);

        let text = format!("[gateway]\ntcp_keepalive = \"sometimes\"\n{MINIMAL}");
        assert!(errors(&text).contains("gateway.tcp_keepalive"));
        let text = format!("[gateway]\ntcp_keepalive = {{ probes = 0 }}\n{MINIMAL}");
        assert!(errors(&text).contains("gateway.tcp_keepalive.probes"));
        let text = MINIMAL.replace(
            "[[route]]\n",
            "[[route]]\nping_interval = \"off\"\nping_timeout = \"5s\"\n",
        );
        assert!(errors(&text).contains("ping_timeout"));
    }

    #[test]
    fn workers_must_be_positive() {
        let text = format!("[gateway]\nworkers = 2\n{MINIMAL}");
        assert_eq!(Config::parse(&text, "t").unwrap().gateway.workers, Some(2));
        let text = format!("[gateway]\nworkers = 0\n{MINIMAL}");
        assert!(errors(&text).contains("gateway.workers: must be a whole number of at least 1"));
        let text = format!("[gateway]\nworkers = 100000\n{MINIMAL}");
        assert!(errors(&text).contains("gateway.workers: must be at most 1024"));
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normalize_path("/vnc/").as_deref(), Some("/vnc"));
        assert_eq!(normalize_path("///").as_deref(), Some("/"));
        assert_eq!(normalize_path("vnc"), None);
        assert_eq!(normalize_path("/a?b"), None);
    }
}
