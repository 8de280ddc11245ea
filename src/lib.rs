//! wsgate: a WebSocket gateway.
//!
//! It accepts HTTP/1.1 WebSocket upgrades (ws:// and wss://), validates them per RFC 6455,
//! connects the route's upstream, answers 101, and relays data both ways: to raw TCP or
//! Unix-socket services (message payloads ↔ byte stream) or to WebSocket servers (frames
//! pass through). `../shared/SPEC.md` in the project is the behaviour contract.
//!
//! # Layout
//!
//! - [`config`]: the TOML file (serde mirror) and its validation into typed values.
//! - [`gateway`]: a configuration made ready to serve: router, loaded TLS material, and
//!   an upstream pool per route.
//! - [`server`]: bind, accept loop, limits, per-connection TLS + HTTP, the upgrade flow,
//!   hot reload and drain; the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`origin`]: the Origin allow-list.
//! - [`handshake`]: RFC 6455 §4.2 request validation, `Sec-WebSocket-Accept`, the 101.
//! - [`routing`]: path normalisation; (listener, host, path) → route; upstream path mapping.
//! - [`proxy_protocol`], [`forwarded`]: who the client really is (PROXY headers from
//!   trusted load balancers, forwarded headers from trusted proxies) and how upstreams
//!   are told.
//! - [`upstream`]: pick from the route's pool (balance, health, failover), connect with
//!   deadlines; PROXY header, TLS and the client handshake for ws upstreams.
//! - [`relay`]: the two pumps per connection: frames parsed and streamed in place through
//!   pooled read buffers; close codes, half-close, limits.
//! - [`tls`], [`shutdown`], [`telemetry`], [`sockets`], [`runtime`]: TLS settings, signals,
//!   logs and counters, TCP options, the tokio runtime (one thread for one worker).
//! - [`systemd`], [`handover`]: running under a supervisor: readiness and watchdog
//!   notifications, socket activation, and the binary upgrade that hands the listening
//!   sockets to a new process.
//! - [`testing`], [`ready`], [`devcert`], `faults`: wsgate as a test fixture: the in-process
//!   `TestGateway`, `--ready-file`, certificates (`wsgate cert`, `self_signed` listeners) and
//!   faults on purpose (`allow_faults`: a frame layer between the client and the relay).
//!
//! # Data path
//!
//! ```text
//! accept (server; sockets: nodelay, keepalive) → PROXY header (proxy_protocol)
//!   → TLS (settings: tls; the session: server::tls_stream, rustls' unbuffered API)
//!   → HTTP/1.1 (server::http1; hyper for all but a first upgrade) → forwarded::real_client (trusted proxies only)
//!   → handshake::check_request_line → routing::normalize_path → Gateway::route
//!   → handshake::validate → origin::check → limits
//!   → upstream::connect (pool pick, failover; TCP/Unix + PROXY header, or TLS + WS handshake;
//!     upstream::Introduction says who the client is)
//!   → 101 → [faults layer, allow_faults only] → relay::relay_stream | relay::relay_ws
//!   → lingering close → one log line
//! ```
//!
//! `server::upgrade` runs the checks in that order and documents the status each earns.
//!
//! The library binds what the configuration names (port 0 included) and hands back a
//! handle, so tests run the real server in-process:
//!
//! ```no_run
//! # async fn example(config: wsgate::config::Config) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let gateway = wsgate::gateway::Gateway::prepare(config)?;
//! let server = wsgate::server::Server::start(gateway, Arc::new(wsgate::telemetry::Metrics::new())).await?;
//! println!("listening on {:?}", server.local_addrs());
//! let running = tokio::spawn(server.clone().run());
//! server.shutdown(); // what SIGTERM does: drain, then `run` returns
//! running.await?;
//! # Ok(()) }
//! ```

mod admin;
pub mod auth;
pub mod cli;
pub mod compression;
pub mod config;
pub mod devcert;
mod faults;
pub mod forwarded;
pub mod gateway;
pub mod handover;
pub mod handshake;
pub mod origin;
pub mod prefixed;
pub mod proxy_protocol;
pub mod ready;
pub mod relay;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod sockets;
pub mod systemd;
pub mod targets;
pub mod telemetry;
pub mod testing;
pub mod tls;
pub mod upstream;
pub mod webroot;
