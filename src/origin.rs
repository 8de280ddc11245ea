//! The Origin allow-list of a route: the defence against cross-site WebSocket hijacking.
//!
//! Browsers attach cookies and HTTP authentication to WebSocket handshakes no matter which
//! site opened them, and the same-origin policy does not apply to WebSockets. Without a check
//! of `Origin`, any page a logged-in user visits can open a connection in that user's name.
//!
//! A rule is an exact origin (`https://app.example.com`, `http://localhost:8080`) or a
//! wildcard on the host (`https://*.example.com`: any name below example.com, any depth, not
//! example.com itself). A rule without a scheme (`*.example.com`) allows http and https.

/// One allowed origin or pattern, parsed and lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRule {
    /// `None`: http or https.
    scheme: Option<String>,
    host: HostRule,
    /// The port as written, or `None` for the scheme's default.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Exact(String),
    /// Holds the suffix with its leading dot: `.example.com`.
    Below(String),
}

impl OriginRule {
    /// Parses `scheme://host[:port]`, `scheme://*.suffix[:port]` or `*.suffix[:port]`.
    pub fn parse(text: &str) -> Option<OriginRule> {
        let lower = text.trim().to_ascii_lowercase();
        let (scheme, rest) = match lower.split_once("://") {
            Some((s, r))
                if !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) =>
            {
                (Some(s.to_string()), r.to_string())
            }
            Some(_) => return None,
            None if lower.starts_with("*.") => (None, lower.clone()),
            None => return None,
        };
        let (host, port) = split_port(&rest)?;
        if host.is_empty()
            || host.contains(['/', '?', '#', '@'])
            || host.contains(char::is_whitespace)
        {
            return None;
        }
        let host = match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                HostRule::Below(format!(".{suffix}"))
            }
            Some(_) => return None,
            None if host.contains('*') => return None,
            None => HostRule::Exact(host.to_string()),
        };
        if scheme.is_none() && matches!(host, HostRule::Exact(_)) {
            return None;
        }
        Some(OriginRule { scheme, host, port })
    }

    /// Whether a request's `Origin` header value matches this rule.
    pub fn matches(&self, origin: &str) -> bool {
        let lower = origin.trim().to_ascii_lowercase();
        let Some((scheme, rest)) = lower.split_once("://") else {
            return false;
        };
        let Some((host, port)) = split_port(rest) else {
            return false;
        };
        let scheme_ok = match &self.scheme {
            Some(s) => s == scheme,
            None => scheme == "http" || scheme == "https",
        };
        let host_ok = match &self.host {
            HostRule::Exact(h) => h == host,
            HostRule::Below(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        };
        scheme_ok && host_ok && port == self.port
    }
}

/// `host[:port]` → (host, port); IPv6 literals keep their brackets.
fn split_port(text: &str) -> Option<(&str, Option<u16>)> {
    let text = text.trim_end_matches('/');
    let (host, port) = match text.rfind(':') {
        Some(i) if !text[i..].contains(']') => {
            (&text[..i], Some(text[i + 1..].parse::<u16>().ok()?))
        }
        _ => (text, None),
    };
    Some((host, port))
}

/// A request whose Origin a route does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Origin {0:?} is not allowed on this route")]
pub struct OriginRefused(pub String);

/// Checks a request's Origin against a route's allow-list (see [`allowed`]).
pub fn check(rules: Option<&[OriginRule]>, origin: Option<&str>) -> Result<(), OriginRefused> {
    if allowed(rules, origin) {
        Ok(())
    } else {
        Err(OriginRefused(origin.unwrap_or_default().to_string()))
    }
}

/// `None` allows every Origin. A request without `Origin` comes from a non-browser client,
/// which cross-site hijacking cannot use, so it passes.
pub fn allowed(rules: Option<&[OriginRule]>, origin: Option<&str>) -> bool {
    match (rules, origin) {
        (None, _) | (Some(_), None) => true,
        (Some(rules), Some(origin)) => rules.iter().any(|r| r.matches(origin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> OriginRule {
        OriginRule::parse(text).unwrap_or_else(|| panic!("{text} should parse"))
    }

    #[test]
    fn exact_origins() {
        let r = rule("https://App.Example.com");
        assert!(r.matches("https://app.example.com"));
        assert!(!r.matches("http://app.example.com"));
        assert!(!r.matches("https://app.example.com:8443"));
        assert!(!r.matches("https://app.example.com.evil.org"));
        assert!(rule("http://localhost:8080").matches("http://localhost:8080"));
        assert!(!rule("http://localhost:8080").matches("http://localhost"));
    }

    #[test]
    fn wildcards() {
        let r = rule("https://*.example.com");
        assert!(r.matches("https://a.example.com"));
        assert!(r.matches("https://a.b.example.com"));
        assert!(!r.matches("https://example.com"));
        assert!(!r.matches("https://evilexample.com"));
        assert!(!r.matches("http://a.example.com"));
        let any_scheme = rule("*.example.com");
        assert!(any_scheme.matches("http://a.example.com"));
        assert!(any_scheme.matches("https://a.example.com"));
        assert!(!any_scheme.matches("ftp://a.example.com"));
    }

    #[test]
    fn invalid_rules() {
        for text in [
            "example.com",
            "https://",
            "https://a/b",
            "https://*",
            "https://a.*.com",
            "*",
            "https://x:99999",
        ] {
            assert!(OriginRule::parse(text).is_none(), "{text}");
        }
    }

    #[test]
    fn absent_list_or_header() {
        let rules = vec![rule("https://app.example.com")];
        assert!(allowed(None, Some("https://evil.org")));
        assert!(allowed(Some(&rules), None));
        assert!(!allowed(Some(&rules), Some("https://evil.org")));
        assert!(!allowed(Some(&rules), Some("null")));
    }
}
