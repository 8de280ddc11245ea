//! Forward auth (nginx's `auth_request`, Traefik's ForwardAuth): the handshake's headers go to
//! an HTTP service in a GET, with `X-Forwarded-Method`, `-Uri`, `-Host`, `-Proto` and `-For`
//! saying what was asked (the client's own forwarding headers are not passed on). 2xx lets the client in (and named response headers go into the upstream
//! handshake), 401 and 403 are answered to the client as they came, anything else, a timeout
//! or an error is 503. One HTTP/1.1 exchange per check, with hyper's client.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use super::{AuthError, Authenticated, Credentials};
use crate::config::ForwardAuth;

pub struct Service {
    settings: ForwardAuth,
    copy: Vec<HeaderName>,
}

/// Request headers that belong to the client's upgrade, not to a question about it.
const NOT_SENT: &[&str] = &[
    "connection",
    "upgrade",
    "host",
    "content-length",
    "transfer-encoding",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "keep-alive",
    "te",
    "trailer",
];

/// Forwarding headers (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`) as the client wrote them:
/// not passed on, as Traefik's ForwardAuth does unless told to trust them. The service hears
/// the gateway's own `X-Forwarded-*`, whose client is the real one (`request.client`, from
/// trusted proxies only); the client's could name anyone.
fn is_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "forwarded" || name == "x-real-ip" || name.starts_with("x-forwarded-")
}

impl Service {
    pub fn new(settings: &ForwardAuth) -> Service {
        Service {
            copy: settings
                .copy_response_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            settings: settings.clone(),
        }
    }

    pub async fn check(&self, request: &Credentials<'_>) -> Result<Authenticated, AuthError> {
        let timeout = self.settings.timeout;
        match tokio::time::timeout(timeout, self.ask(request)).await {
            Ok(result) => result,
            Err(_) => Err(AuthError::Unavailable(format!(
                "no answer within {timeout:?} (timeout)"
            ))),
        }
    }

    async fn ask(&self, request: &Credentials<'_>) -> Result<Authenticated, AuthError> {
        let s = &self.settings;
        let authority = crate::config::authority(&s.host, s.port);
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            AuthError::Unavailable(format!(
                "http://{authority}{}: {what}: {e}",
                s.path_and_query
            ))
        };
        let stream = tokio::net::TcpStream::connect((s.host.as_str(), s.port))
            .await
            .map_err(|e| unavailable("connect", &e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable("HTTP", &e))?;
        tokio::spawn(connection);
        let mut ask = Request::get(s.path_and_query.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| unavailable("request", &e))?;
        let headers = ask.headers_mut();
        for (name, value) in request.headers {
            if !NOT_SENT.contains(&name.as_str()) && !is_forwarding(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let set = |headers: &mut http::HeaderMap, name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        set(headers, "host", &authority);
        set(headers, "x-forwarded-method", "GET");
        set(
            headers,
            "x-forwarded-uri",
            request.uri.path_and_query().map_or("/", |p| p.as_str()),
        );
        // HTTP/2 has no Host header: its :authority is in the URI.
        if let Some(host) = request
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri.authority().map(|a| a.as_str()))
        {
            set(headers, "x-forwarded-host", host);
        }
        set(
            headers,
            "x-forwarded-proto",
            if request.tls { "https" } else { "http" },
        );
        set(headers, "x-forwarded-for", &request.client.ip.to_string());
        let answer = sender
            .send_request(ask)
            .await
            .map_err(|e| unavailable("exchange", &e))?;
        let status = answer.status();
        if status.is_success() {
            let headers: Vec<(HeaderName, HeaderValue)> = self
                .copy
                .iter()
                .filter_map(|name| Some((name.clone(), answer.headers().get(name)?.clone())))
                .collect();
            let name = headers
                .first()
                .and_then(|(_, v)| v.to_str().ok())
                .map(str::to_string);
            return Ok(Authenticated {
                name,
                headers,
                ..Default::default()
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(AuthError::Denied {
                status,
                challenge: answer.headers().get(header::WWW_AUTHENTICATE).cloned(),
            });
        }
        Err(unavailable("answered", &status))
    }
}
