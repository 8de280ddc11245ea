//! Who the client is behind trusted proxies, and what a ws upstream is told:
//! `forwarded::real_client` and `forwarded::for_upstream` on headers built from fuzz bytes.
//!
//! Checks that nothing panics; that an untrusted peer is always its own client; that a
//! client taken from a header has no port and a canonical address (no v4-mapped v6); that
//! only trusted peers get headers kept; and that the headers set are forwarding headers,
//! with X-Forwarded-For ending in the peer and X-Real-IP naming the client when asked for.
//!
//! Input, as text lines: `WHICH TRUST POLICY PEER`, where the first byte of WHICH picks
//! the trusted header (`% 3`: X-Forwarded-For, Forwarded, X-Real-IP), of TRUST the
//! proxies trusted (`% 4`: none, all, addresses whose last byte is even, 10.0.0.0/8 and
//! loopback), of POLICY the route's choices (bit 0 forwarded headers, bit 1 X-Real-IP,
//! bit 2 TLS), and PEER is the socket address; then up to 16 `name: value` lines. A name
//! not in the list below picks one of them by its first byte; invalid values are skipped.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use wsgate::config::TrustedHeader;
use wsgate::forwarded::{
    ClientAddr, FORWARDING, Policy, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
    X_REAL_IP, for_upstream, real_client,
};

const NAMES: [HeaderName; 6] = [
    X_FORWARDED_FOR,
    header::FORWARDED,
    X_REAL_IP,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    header::HOST,
];

fn last_byte(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(ip) => ip.octets()[3],
        IpAddr::V6(ip) => ip.octets()[15],
    }
}

fn trusts(mode: u8, ip: IpAddr) -> bool {
    match mode % 4 {
        0 => false,
        1 => true,
        2 => last_byte(ip) % 2 == 0,
        _ => ip.is_loopback() || matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10),
    }
}

fn first(token: Option<&[u8]>) -> u8 {
    token.and_then(|t| t.first().copied()).unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(control) = lines.next() else {
        return;
    };
    let mut tokens = control.split(|&b| b == b' ');
    let which = match first(tokens.next()) % 3 {
        0 => TrustedHeader::XForwardedFor,
        1 => TrustedHeader::Forwarded,
        _ => TrustedHeader::XRealIp,
    };
    let mode = first(tokens.next());
    let bits = first(tokens.next());
    let policy = Policy {
        forwarded_headers: bits & 1 != 0,
        x_real_ip: bits & 2 != 0,
    };
    let tls = bits & 4 != 0;
    let Some(peer) = tokens
        .next()
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.parse::<SocketAddr>().ok())
    else {
        return;
    };
    let peer = ClientAddr::from(peer);

    let mut headers = HeaderMap::new();
    for l in lines.take(16) {
        let (name, value) = match l.iter().position(|&b| b == b':') {
            Some(i) => (&l[..i], &l[i + 1..]),
            None => (l, &b""[..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let pick = NAMES
            .iter()
            .position(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name))
            .unwrap_or(usize::from(name.first().copied().unwrap_or(0)) % NAMES.len());
        let name = NAMES[pick].clone();
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }

    let trusted_peer = trusts(mode, peer.ip);
    let client = real_client(peer, &headers, which, |ip| trusts(mode, ip));
    if !trusted_peer {
        assert_eq!(client, peer, "an untrusted peer named someone else");
    }
    if client != peer {
        assert_eq!(client.port, None);
        assert_eq!(client.ip, client.ip.to_canonical(), "a v4-mapped client");
    }

    let trusted = trusted_peer.then_some(which);
    let forwarding = for_upstream(&headers, peer, client, trusted, tls, policy);
    assert_eq!(forwarding.keep.is_empty(), trusted.is_none());
    for name in &FORWARDING {
        assert_eq!(forwarding.drops(name), !forwarding.keep.contains(name));
    }
    let set = |name: &HeaderName| {
        forwarding
            .set
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_str().unwrap().to_string())
    };
    for (name, _) in &forwarding.set {
        assert!(
            FORWARDING.contains(name),
            "{name} is not a forwarding header"
        );
    }
    if policy.forwarded_headers {
        let xff = set(&X_FORWARDED_FOR).expect("X-Forwarded-For is always set");
        assert!(xff.ends_with(&peer.ip.to_string()), "{xff:?} {peer}");
        assert!(set(&X_FORWARDED_PROTO).is_some());
        assert!(set(&header::FORWARDED).is_some());
    }
    if policy.x_real_ip {
        assert_eq!(set(&X_REAL_IP), Some(client.ip.to_string()));
    }
});
