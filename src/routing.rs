//! (listener, Host, path) → route, and the request path it is matched on. Pure, so every
//! rule is unit-tested here.
//!
//! Rules, as an nginx user would expect them:
//! - the path is normalised first ([`normalize_path`]) and everything after routing (Origin
//!   rules, the path sent upstream) sees the normalised one, so `//admin` or `/%61dmin`
//!   cannot reach `/admin`'s upstream while side-stepping `/admin`'s policy;
//! - a route bound to listeners (`listeners = [...]`) does not exist on the others;
//! - a route's `path` is a prefix on whole segments: `/vnc` matches `/vnc`, `/vnc/` and
//!   `/vnc/a`, never `/vncx`; `/` matches everything;
//! - routes that name the request's host are tried first, then routes without `host`;
//!   within each group the longest prefix wins;
//! - `host = "*.example.com"` matches any name below example.com (not example.com itself);
//!   at equal prefix length an exact host beats a wildcard.

use crate::config::Config;

/// The match keys of one configuration's routes, in configuration order.
#[derive(Debug, Clone)]
pub struct Router {
    keys: Vec<RouteKey>,
}

#[derive(Debug, Clone)]
struct RouteKey {
    path: String,
    host: Option<String>,
    /// Indexes of the listeners the route exists on; `None` for all of them.
    listeners: Option<Vec<usize>>,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let keys = config
            .routes
            .iter()
            .map(|r| RouteKey {
                path: r.path.clone(),
                host: r.host.clone(),
                // Names were checked against the listeners when the file was validated.
                listeners: r.listeners.as_ref().map(|names| {
                    config
                        .listeners
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| names.contains(&l.name))
                        .map(|(i, _)| i)
                        .collect()
                }),
            })
            .collect();
        Self { keys }
    }

    /// The index of the route for a request on listener `listener` (its index in the
    /// configuration), by its Host header value (port allowed) and its normalised path
    /// (without query).
    pub fn find(&self, listener: usize, host: Option<&str>, path: &str) -> Option<usize> {
        let host = host.map(normalize_host);
        let best = |host_specific: bool| {
            self.keys
                .iter()
                .enumerate()
                .filter(|(_, r)| r.listeners.as_ref().is_none_or(|l| l.contains(&listener)))
                .filter(|(_, r)| r.host.is_some() == host_specific)
                .filter(|(_, r)| match (&r.host, &host) {
                    (None, _) => true,
                    (Some(pattern), Some(h)) => host_matches(pattern, h),
                    (Some(_), None) => false,
                })
                .filter(|(_, r)| path_matches(&r.path, path))
                // Longest prefix first; at equal length an exact host beats a wildcard.
                .max_by_key(|(_, r)| {
                    let exact = r.host.as_deref().is_some_and(|h| !h.starts_with("*."));
                    (r.path.len(), exact)
                })
                .map(|(i, _)| i)
        };
        best(true).or_else(|| best(false))
    }
}

/// Lower-case, without port and trailing dot.
fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: keep what is inside the brackets.
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == host,
    }
}

/// Prefix match on whole path segments; `prefix` is normalised (no trailing `/`).
pub fn path_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The upstream request path for a ws:// upstream: like nginx's `proxy_pass`, an upstream URL
/// without a path forwards the client's path and query unchanged; one with a path replaces the
/// matched route prefix with it.
pub fn upstream_path(route_prefix: &str, upstream_path: &str, path_and_query: &str) -> String {
    if upstream_path.is_empty() {
        return path_and_query.to_string();
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let rest = if route_prefix == "/" {
        path
    } else {
        path.strip_prefix(route_prefix).unwrap_or(path)
    };
    let (base, base_query) = match upstream_path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (upstream_path, None),
    };
    let mut out = if rest.is_empty() || rest == "/" && base.ends_with('/') {
        base.to_string()
    } else {
        format!("{}{}", base.trim_end_matches('/'), rest)
    };
    if out.is_empty() {
        out.push('/');
    }
    let queries: Vec<&str> = [base_query, query]
        .into_iter()
        .flatten()
        .filter(|q| !q.is_empty())
        .collect();
    if !queries.is_empty() {
        out.push('?');
        out.push_str(&queries.join("&"));
    }
    out
}

/// Why a request path cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has . or .. segments")]
    DotSegments,
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    #[error("the path must start with /")]
    NotAbsolute,
}

/// The path a request is routed on and forwarded with, as nginx normalises it:
/// percent-escapes of unreserved characters (RFC 3986 §2.3) decoded, other escapes kept
/// with upper-case hex (so `%2f` and `%2F` are one path, and an encoded `/` never splits a
/// segment), repeated slashes merged. Dot segments (also encoded ones) are refused rather
/// than resolved: the upstream might resolve them to a place the route does not cover.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                    return Err(PathError::BadEscape);
                };
                let decoded = (hi * 16 + lo) as u8;
                if is_unreserved(decoded) {
                    out.push(decoded as char);
                } else {
                    push_escape(&mut out, decoded);
                }
                i += 3;
            }
            b'/' if out.ends_with('/') => i += 1,
            // http admits UTF-8 in a path: encoded, so that `/café` and `/caf%C3%A9` are
            // one path to routing and to the upstream.
            b if b >= 0x80 => {
                push_escape(&mut out, b);
                i += 1;
            }
            b => {
                out.push(b as char);
                i += 1;
            }
        }
    }
    // Some backends decode `%2F` or read `\` as `/` (IIS, some Java and Node stacks):
    // `/public/..%2Fadmin` is a dot segment to them, so it is one here too.
    let dot = |segment: &str| segment == "." || segment == "..";
    let as_backends_read = out
        .replace("%2F", "/")
        .replace("%5C", "/")
        .replace('\\', "/");
    if as_backends_read.split('/').any(dot) {
        return Err(PathError::DotSegments);
    }
    Ok(out)
}

/// `%XX` with upper-case hex (RFC 3986 §6.2.2.1).
fn push_escape(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 0xf)] as char);
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Upstream};

    use crate::config::RouteConfig;

    fn route(path: &str, host: Option<&str>, port: u16) -> RouteConfig {
        let text = format!(
            "[[listener]]\nbind = \"127.0.0.1:1\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:{port}\"\n"
        );
        let mut route = Config::parse(&text, "t").unwrap().routes.remove(0);
        route.path = path.into();
        route.host = host.map(Into::into);
        route
    }

    fn router(routes: &[RouteConfig]) -> Router {
        let text = "[[listener]]\nbind = \"127.0.0.1:1\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n";
        let mut config = Config::parse(text, "t").unwrap();
        config.routes = routes.to_vec();
        Router::new(&config)
    }

    fn port_of(routes: &[RouteConfig], host: Option<&str>, path: &str) -> Option<u16> {
        router(routes)
            .find(0, host, path)
            .map(|i| match routes[i].upstreams[0].upstream {
                Upstream::Tcp { port, .. } => port,
                _ => 0,
            })
    }

    #[test]
    fn longest_segment_prefix_wins() {
        let router = &[
            route("/", None, 1),
            route("/vnc", None, 2),
            route("/vnc/admin", None, 3),
        ];
        assert_eq!(port_of(router, None, "/"), Some(1));
        assert_eq!(port_of(router, None, "/vnc"), Some(2));
        assert_eq!(port_of(router, None, "/vnc/"), Some(2));
        assert_eq!(port_of(router, None, "/vnc/x"), Some(2));
        assert_eq!(port_of(router, None, "/vncx"), Some(1));
        assert_eq!(port_of(router, None, "/vnc/admin/1"), Some(3));
        assert_eq!(port_of(router, None, "/vnc/administrator"), Some(2));
    }

    #[test]
    fn no_match_without_root_route() {
        let router = &[route("/vnc", None, 2)];
        assert_eq!(port_of(router, None, "/other"), None);
        assert_eq!(port_of(router, None, "/vn"), None);
    }

    #[test]
    fn host_specific_routes_first() {
        let router = &[
            route("/a", None, 1),
            route("/", Some("vnc.example.com"), 2),
            route("/", Some("*.example.com"), 3),
        ];
        assert_eq!(port_of(router, Some("VNC.example.com:8443"), "/a"), Some(2));
        assert_eq!(port_of(router, Some("x.y.example.com"), "/a"), Some(3));
        assert_eq!(port_of(router, Some("example.com"), "/a"), Some(1));
        assert_eq!(port_of(router, Some("other.org"), "/a"), Some(1));
        assert_eq!(port_of(router, Some("other.org"), "/b"), None);
        assert_eq!(port_of(router, None, "/b"), None);
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.COM.:80"), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("localhost"), "localhost");
    }

    #[test]
    fn upstream_paths_follow_proxy_pass() {
        assert_eq!(upstream_path("/vnc", "", "/vnc/a?x=1"), "/vnc/a?x=1");
        assert_eq!(upstream_path("/vnc", "/base", "/vnc/a?x=1"), "/base/a?x=1");
        assert_eq!(upstream_path("/vnc", "/base/", "/vnc/a"), "/base/a");
        assert_eq!(upstream_path("/vnc", "/base", "/vnc"), "/base");
        assert_eq!(upstream_path("/vnc", "/", "/vnc"), "/");
        assert_eq!(upstream_path("/", "/ws", "/chat"), "/ws/chat");
        assert_eq!(upstream_path("/", "/", "/chat"), "/chat");
        assert_eq!(
            upstream_path("/vnc", "/b?k=v", "/vnc/a?x=1"),
            "/b/a?k=v&x=1"
        );
    }

    #[test]
    fn paths_are_normalised_as_nginx_does() {
        let ok = |p: &str| normalize_path(p).unwrap();
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("//admin"), "/admin");
        assert_eq!(ok("/a///b//"), "/a/b/");
        assert_eq!(ok("/%7Euser/%41-%5f"), "/~user/A-_");
        assert_eq!(ok("/a%2fb"), "/a%2Fb", "an encoded slash stays encoded");
        assert_eq!(ok("/a%2Fb%20c%3F"), "/a%2Fb%20c%3F");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/a/..b/c.d"), "/a/..b/c.d");
        for bad in ["/a/../b", "/a/%2E%2e/b", "/./", "/%2e", "/a/.", "//.."] {
            assert_eq!(normalize_path(bad), Err(PathError::DotSegments), "{bad}");
        }
        for bad in ["/%", "/%4", "/%zz", "/a%g1"] {
            assert_eq!(normalize_path(bad), Err(PathError::BadEscape), "{bad}");
        }
        assert_eq!(normalize_path("*"), Err(PathError::NotAbsolute));
        assert_eq!(ok("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        for bad in [
            "/public/..%2Fadmin",
            "/a/%2e%2e%5cb",
            "/public/..\\admin",
            "/%2F..",
        ] {
            assert_eq!(normalize_path(bad), Err(PathError::DotSegments), "{bad}");
        }
    }

    #[test]
    fn a_route_bound_to_listeners_exists_only_there() {
        let mut internal = route("/admin", None, 2);
        internal.listeners = Some(vec!["second".into()]);
        let text = "[[listener]]\nbind = \"127.0.0.1:1\"\nname = \"first\"\n[[listener]]\nbind = \"127.0.0.1:2\"\nname = \"second\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:1\"\n";
        let mut config = Config::parse(text, "t").unwrap();
        config.routes.push(internal);
        let router = Router::new(&config);
        assert_eq!(
            router.find(0, None, "/admin"),
            Some(0),
            "falls to / on first"
        );
        assert_eq!(router.find(1, None, "/admin"), Some(1));
    }
}
