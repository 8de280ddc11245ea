//! (Host, path) → route. Pure, so every rule is unit-tested here.
//!
//! Rules, as an nginx user would expect them:
//! - a route's `path` is a prefix on whole segments: `/vnc` matches `/vnc`, `/vnc/` and
//!   `/vnc/a`, never `/vncx`; `/` matches everything;
//! - routes that name the request's host are tried first, then routes without `host`;
//!   within each group the longest prefix wins;
//! - `host = "*.example.com"` matches any name below example.com (not example.com itself);
//!   at equal prefix length an exact host beats a wildcard.

use crate::config::RouteConfig;

/// The match keys of one configuration's routes, in configuration order.
#[derive(Debug, Clone)]
pub struct Router {
    keys: Vec<RouteKey>,
}

#[derive(Debug, Clone)]
struct RouteKey {
    path: String,
    host: Option<String>,
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Self {
        let keys = routes
            .iter()
            .map(|r| RouteKey {
                path: r.path.clone(),
                host: r.host.clone(),
            })
            .collect();
        Self { keys }
    }

    /// The index of the route for a request, by its Host header value (port allowed) and its
    /// path (without query).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let host = host.map(normalize_host);
        let best = |host_specific: bool| {
            self.keys
                .iter()
                .enumerate()
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

/// True when a path has `.` or `..` segments (also percent-encoded). Such paths are refused
/// rather than forwarded, because the upstream might resolve them to a place the route does
/// not cover.
pub fn has_dot_segments(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Upstream};

    fn route(path: &str, host: Option<&str>, port: u16) -> RouteConfig {
        let text = format!(
            "[[listener]]\nbind = \"127.0.0.1:1\"\n[[route]]\npath = \"/\"\nupstream = \"tcp://127.0.0.1:{port}\"\n"
        );
        let mut route = Config::parse(&text, "t").unwrap().routes.remove(0);
        route.path = path.into();
        route.host = host.map(Into::into);
        route
    }

    fn port_of(routes: &[RouteConfig], host: Option<&str>, path: &str) -> Option<u16> {
        Router::new(routes)
            .find(host, path)
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
    fn dot_segments_are_detected() {
        assert!(has_dot_segments("/a/../b"));
        assert!(has_dot_segments("/a/%2E%2e/b"));
        assert!(has_dot_segments("/./"));
        assert!(!has_dot_segments("/a/..b/c.d"));
    }
}
