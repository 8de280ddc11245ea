//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (it accepts new connections: 503 while draining); with `allow_faults`, the
//! fault orders `POST /faults/close` and `/faults/refuse`. Plain HTTP; bind it to a private
//! address.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::defaults;
use crate::faults::CloseOrder;
use crate::relay::frames::is_valid_close_code;
use crate::server::Inner;

pub(crate) async fn serve(listener: TcpListener, server: Arc<Inner>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let server = server.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(respond(&req, &server)) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(client = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn respond(req: &Request<Incoming>, server: &Inner) -> Response<Full<Bytes>> {
    if req.uri().path().starts_with("/faults/") {
        return faults(req, server);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, &server.metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz"
            if server.shutdown.graceful.is_cancelled()
                || server.unready.load(std::sync::atomic::Ordering::Relaxed) =>
        {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/readyz" => text(StatusCode::OK, "ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    }
}

/// `POST /faults/close?route=/ws&code=1012[&reason=…]`: every live connection on the route
/// is closed with that code; `POST /faults/refuse?route=/ws&count=K[&status=503]`: the next
/// K handshakes on the route are refused. Only with `allow_faults`.
fn faults(req: &Request<Incoming>, server: &Inner) -> Response<Full<Bytes>> {
    let gateway = server.gateway.load();
    if !gateway.config.gateway.allow_faults {
        return text(
            StatusCode::NOT_FOUND,
            "faults are off; set allow_faults = true in [gateway] (for tests only)\n",
        );
    }
    if req.method() != Method::POST {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        response
            .headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return response;
    }
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(route) = param("route") else {
        return text(
            StatusCode::BAD_REQUEST,
            "name the route: ?route=/path (a route's path as configured)\n",
        );
    };
    if !gateway.config.routes.iter().any(|r| r.path == route) {
        let known: Vec<&str> = gateway
            .config
            .routes
            .iter()
            .map(|r| r.path.as_str())
            .collect();
        return text(
            StatusCode::NOT_FOUND,
            &format!("no route {route:?}; the routes are {}\n", known.join(", ")),
        );
    }
    // A bad number is answered with what was wrong with it.
    let number = |name: &str, default: u64| -> Result<u64, String> {
        match param(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name}={v:?} is not a whole number\n")),
        }
    };
    let faults = server.faults.route(route);
    match req.uri().path() {
        "/faults/close" => {
            let code = match number("code", u64::from(defaults::FAULT_CLOSE_CODE)) {
                Ok(code) => code,
                Err(why) => return text(StatusCode::BAD_REQUEST, &why),
            };
            let code = match u16::try_from(code) {
                Ok(c) if is_valid_close_code(c) => c,
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("{code} is not a close code; use 1000-1014 or 3000-4999\n"),
                    );
                }
            };
            let reason = param("reason").unwrap_or("").to_string();
            if reason.len() > 123 {
                return text(StatusCode::BAD_REQUEST, "reason is longer than 123 bytes\n");
            }
            let closed = faults.close_all(CloseOrder { code, reason });
            info!(route, code, connections = closed, "faults: close ordered");
            text(
                StatusCode::OK,
                &format!("closing {closed} connections with {code}\n"),
            )
        }
        "/faults/refuse" => {
            let (count, status) = match (
                number("count", defaults::FAULT_REFUSE_COUNT),
                number("status", u64::from(defaults::FAULT_REFUSE_STATUS)),
            ) {
                (Ok(count), Ok(status)) => (count, status),
                (Err(why), _) | (_, Err(why)) => return text(StatusCode::BAD_REQUEST, &why),
            };
            let Some(status) = u16::try_from(status)
                .ok()
                .filter(|s| (400..=599).contains(s))
            else {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("status {status} is not an error status; use 400 to 599\n"),
                );
            };
            faults.refuse_next(count, status);
            info!(route, count, status, "faults: refusals ordered");
            text(
                StatusCode::OK,
                &format!("refusing the next {count} handshakes with {status}\n"),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try POST /faults/close or /faults/refuse\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
