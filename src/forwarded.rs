//! Who the client really is, and how a ws upstream is told.
//!
//! Behind a load balancer the socket's peer is the balancer. Its word about the client (a
//! PROXY header, or X-Forwarded-For / Forwarded) is believed only when the peer is in the
//! listener's `trusted` list; anyone else could write those headers to pose as another
//! address, so from them the headers are dropped, never passed on.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::TrustedHeader;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The headers that carry a client's identity through proxies.
pub const FORWARDING: [HeaderName; 5] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    header::FORWARDED,
    X_REAL_IP,
];

/// The client as the gateway knows it: an address, and its port when it came from the
/// socket or a PROXY header (forwarded headers carry none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl From<SocketAddr> for ClientAddr {
    fn from(addr: SocketAddr) -> Self {
        Self {
            ip: addr.ip().to_canonical(),
            port: Some(addr.port()),
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => SocketAddr::new(self.ip, port).fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

impl TrustedHeader {
    pub fn name(self) -> HeaderName {
        match self {
            TrustedHeader::XForwardedFor => X_FORWARDED_FOR,
            TrustedHeader::Forwarded => header::FORWARDED,
            TrustedHeader::XRealIp => X_REAL_IP,
        }
    }
}

/// The real client of a request that arrived from `peer`: the peer itself, unless it is
/// a trusted proxy; then the nearest address in the one header the listener's proxies
/// write (`trusted_header`) that is not a trusted proxy too. The other forwarded headers
/// are never consulted: the proxy passes them on as the client wrote them. A hop that is
/// not an address (`unknown`, an obfuscated name, an unreadable header) ends the walk at
/// the last hop that could be believed, as nginx's real_ip does: what lies beyond it may be
/// anyone's invention.
pub fn real_client(
    peer: ClientAddr,
    headers: &HeaderMap,
    which: TrustedHeader,
    trusts: impl Fn(IpAddr) -> bool,
) -> ClientAddr {
    if !trusts(peer.ip) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded_chain(headers, which).iter().rev() {
        let Some(ip) = *hop else {
            return client;
        };
        client = ClientAddr { ip, port: None };
        if !trusts(ip) {
            break;
        }
    }
    client
}

/// The hops of the forwarding chain in header `which`, client first; `None` for a hop that
/// is not an address.
fn forwarded_chain(headers: &HeaderMap, which: TrustedHeader) -> Vec<Option<IpAddr>> {
    let lines = |name: &HeaderName| headers.get_all(name).iter().map(|v| v.to_str().ok());
    match which {
        // One address, written by the proxy; several lines are a client adding its own.
        TrustedHeader::XRealIp => {
            let all: Vec<_> = lines(&X_REAL_IP).collect();
            return match all.as_slice() {
                [] => Vec::new(),
                [Some(line)] => vec![node_ip(line)],
                _ => vec![None],
            };
        }
        TrustedHeader::XForwardedFor => {
            return lines(&X_FORWARDED_FOR)
                .flat_map(|line| match line {
                    Some(line) => line.split(',').map(node_ip).collect(),
                    None => vec![None],
                })
                .collect();
        }
        TrustedHeader::Forwarded => {}
    }
    lines(&header::FORWARDED)
        .flat_map(|line| match line {
            Some(line) => split_unquoted(line, ',')
                .into_iter()
                .map(|element| {
                    split_unquoted(element, ';').into_iter().find_map(|pair| {
                        let (key, value) = pair.split_once('=')?;
                        key.trim()
                            .eq_ignore_ascii_case("for")
                            .then(|| node_ip(value))
                    })?
                })
                .collect(),
            None => vec![None],
        })
        .collect()
}

/// Splits at `separator` outside double-quoted strings (RFC 7230 quoted-string, with
/// backslash escapes), so that `host="a, for=6.6.6.6"` stays one value.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:80`, `"[2001:db8::1]:80"`.
fn node_ip(node: &str) -> Option<IpAddr> {
    let node = node.trim().trim_matches('"');
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    node.strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

/// True when `sent` names `header`, also when spelled with underscores: CGI, WSGI, Rack
/// and PHP read `x_real_ip` and `x-real-ip` as the same `HTTP_X_REAL_IP`.
pub fn same_header(header: &HeaderName, sent: &HeaderName) -> bool {
    let (a, b) = (header.as_str().as_bytes(), sent.as_str().as_bytes());
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || (*x == b'-' && *y == b'_'))
}

/// What a ws upstream's handshake request gets instead of the client's own forwarding
/// headers.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    /// The forwarding headers of the request that pass on as they came: from a trusted
    /// proxy, the header it writes (with X-Forwarded-Proto/-Host when that is
    /// X-Forwarded-For); from anyone else, none.
    /// Every other header of [`FORWARDING`] is dropped.
    pub keep: Vec<HeaderName>,
    /// Headers to set, replacing any of the same name.
    pub set: Vec<(HeaderName, HeaderValue)>,
}

impl Forwarding {
    /// True when the client's header `name` must not reach the upstream.
    pub fn drops(&self, name: &HeaderName) -> bool {
        FORWARDING.iter().any(|f| same_header(f, name)) && !self.keep.contains(name)
    }
}

/// The route's choices about forwarded headers.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub forwarded_headers: bool,
    pub x_real_ip: bool,
}

/// Builds the forwarding headers for a request from `peer` (the socket's peer, or the
/// client a PROXY header named) whose real client is `client`. `trusted` is the header the
/// peer writes when it is a trusted proxy (`None` otherwise): only that one of the address
/// chains is continued.
pub fn for_upstream(
    request: &HeaderMap,
    peer: ClientAddr,
    client: ClientAddr,
    trusted: Option<TrustedHeader>,
    tls: bool,
    policy: Policy,
) -> Forwarding {
    let mut keep = Vec::new();
    match trusted {
        // X-Forwarded-Proto and -Host come from the same proxies as X-Forwarded-For.
        Some(TrustedHeader::XForwardedFor) => {
            keep.extend([X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST])
        }
        Some(which) => keep.push(which.name()),
        None => {}
    }
    let mut set = Vec::new();
    let existing = |name: &HeaderName| -> Option<String> {
        if !keep.contains(name) {
            return None;
        }
        let values: Vec<&str> = request
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let mut push = |name: HeaderName, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            set.push((name, value));
        }
    };
    if policy.forwarded_headers {
        let proto = if tls { "https" } else { "http" };
        let host = request
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let xff = match existing(&X_FORWARDED_FOR) {
            Some(chain) => format!("{chain}, {}", peer.ip),
            None => peer.ip.to_string(),
        };
        push(X_FORWARDED_FOR, xff);
        push(
            X_FORWARDED_PROTO,
            existing(&X_FORWARDED_PROTO).unwrap_or(proto.to_string()),
        );
        if let Some(host) = existing(&X_FORWARDED_HOST).or(host.clone()) {
            push(X_FORWARDED_HOST, host);
        }
        // RFC 7239 §6: IPv6 nodes are quoted and bracketed; a host is quoted when it has
        // a port (a colon is not a token character).
        let node = match peer.ip {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("\"[{ip}]\""),
        };
        let mut ours = format!("for={node};proto={proto}");
        if let Some(host) = &host {
            ours.push_str(&format!(";host=\"{}\"", host.replace(['"', '\\'], "")));
        }
        let forwarded = match existing(&header::FORWARDED) {
            Some(chain) => format!("{chain}, {ours}"),
            None => ours,
        };
        push(header::FORWARDED, forwarded);
    }
    if policy.x_real_ip {
        push(X_REAL_IP, client.ip.to_string());
    }
    Forwarding { keep, set }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn addr(s: &str) -> ClientAddr {
        s.parse::<SocketAddr>().unwrap().into()
    }

    fn lb(ip: IpAddr) -> bool {
        ip.to_string().starts_with("10.")
    }

    #[test]
    fn the_real_client_comes_only_from_trusted_peers() {
        let spoof = headers(&[("x-forwarded-for", "1.2.3.4")]);
        let xff = TrustedHeader::XForwardedFor;
        assert_eq!(
            real_client(addr("198.51.100.9:4000"), &spoof, xff, lb),
            addr("198.51.100.9:4000")
        );
        let chain = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.5, 10.0.0.7")]);
        let client = real_client(addr("10.0.0.1:4000"), &chain, xff, lb);
        assert_eq!(
            client.to_string(),
            "203.0.113.5",
            "nearest untrusted hop, no port"
        );
        let forwarded = headers(&[("forwarded", "for=\"[2001:db8::1]:80\";proto=https")]);
        assert_eq!(
            real_client(addr("10.0.0.1:1"), &forwarded, TrustedHeader::Forwarded, lb).ip,
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            real_client(addr("10.0.0.1:1"), &HeaderMap::new(), xff, lb),
            addr("10.0.0.1:1")
        );
    }

    #[test]
    fn only_the_listeners_trusted_header_is_believed() {
        // The proxy writes only Forwarded; the X-Forwarded-For is the client's invention.
        let both = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=203.0.113.5"),
            ("x-real-ip", "7.7.7.7"),
        ]);
        let lb_peer = addr("10.0.0.1:1");
        let ip = |which| real_client(lb_peer, &both, which, lb).ip.to_string();
        assert_eq!(ip(TrustedHeader::Forwarded), "203.0.113.5");
        assert_eq!(ip(TrustedHeader::XForwardedFor), "6.6.6.6");
        assert_eq!(ip(TrustedHeader::XRealIp), "7.7.7.7");
        let only_xff = headers(&[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(
            real_client(lb_peer, &only_xff, TrustedHeader::Forwarded, lb),
            lb_peer,
            "no Forwarded header: the proxy itself is the client"
        );
        // One client, however its address is spelled (found by the forwarded fuzz target):
        // per-IP limits must not count `[::ffff:a.b.c.d]` apart from `a.b.c.d`.
        for spelling in [
            "for=\"[::ffff:198.51.100.7]\"",
            "for=\"[::ffff:198.51.100.7]:9\"",
        ] {
            let h = headers(&[("forwarded", spelling)]);
            let ip = real_client(lb_peer, &h, TrustedHeader::Forwarded, lb).ip;
            assert_eq!(ip.to_string(), "198.51.100.7", "{spelling}");
        }
        let two_real_ips = headers(&[("x-real-ip", "7.7.7.7"), ("x-real-ip", "8.8.8.8")]);
        assert_eq!(
            real_client(lb_peer, &two_real_ips, TrustedHeader::XRealIp, lb),
            lb_peer
        );
    }

    #[test]
    fn upstream_headers() {
        let policy = Policy {
            forwarded_headers: true,
            x_real_ip: true,
        };
        let request = headers(&[("host", "app.example.com"), ("x-forwarded-for", "6.6.6.6")]);
        let peer = addr("198.51.100.9:4000");
        let f = for_upstream(&request, peer, peer, None, true, policy);
        assert!(f.drops(&X_FORWARDED_FOR) && f.drops(&X_REAL_IP));
        let get = |f: &Forwarding, name: &str| {
            f.set
                .iter()
                .find(|(n, _)| n.as_str() == name)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get(&f, "x-forwarded-for").as_deref(), Some("198.51.100.9"));
        assert_eq!(get(&f, "x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(
            get(&f, "x-forwarded-host").as_deref(),
            Some("app.example.com")
        );
        assert_eq!(
            get(&f, "forwarded").as_deref(),
            Some("for=198.51.100.9;proto=https;host=\"app.example.com\"")
        );
        assert_eq!(get(&f, "x-real-ip").as_deref(), Some("198.51.100.9"));

        let lb = addr("10.0.0.1:5000");
        let client = ClientAddr {
            ip: "6.6.6.6".parse().unwrap(),
            port: None,
        };
        let f = for_upstream(
            &request,
            lb,
            client,
            Some(TrustedHeader::XForwardedFor),
            false,
            policy,
        );
        assert!(!f.drops(&X_FORWARDED_FOR) && f.drops(&header::FORWARDED));
        assert!(
            f.drops(&HeaderName::from_static("x_real_ip")),
            "underscore spelling"
        );
        let g = for_upstream(
            &request,
            lb,
            client,
            Some(TrustedHeader::Forwarded),
            false,
            policy,
        );
        assert!(
            g.drops(&X_FORWARDED_HOST) && g.drops(&X_FORWARDED_PROTO),
            "a Forwarded-writing proxy vouches for no X-Forwarded-*"
        );
        assert_eq!(
            get(&f, "x-forwarded-for").as_deref(),
            Some("6.6.6.6, 10.0.0.1")
        );
        assert_eq!(get(&f, "x-real-ip").as_deref(), Some("6.6.6.6"));
        let v6 = addr("[2001:db8::2]:1");
        let f = for_upstream(&HeaderMap::new(), v6, v6, None, false, policy);
        assert_eq!(
            get(&f, "forwarded").as_deref(),
            Some("for=\"[2001:db8::2]\";proto=http")
        );
    }
}
