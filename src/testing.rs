//! wsgate in-process, as the `wss://` (or `ws://`) endpoint of a test: listeners on port 0,
//! an in-memory CA the test's client trusts and nothing else does, the metrics, and a drain
//! at the end. The project's own integration tests start every gateway through this.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use futures_util::{SinkExt, StreamExt};
//! use tokio::io::AsyncWriteExt;
//! use tokio_tungstenite::tungstenite::Message;
//! use wsgate::testing::TestGateway;
//!
//! // The backend under test: here a TCP echo service on a free port.
//! let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let port = backend.local_addr()?.port();
//! tokio::spawn(async move {
//!     while let Ok((mut stream, _)) = backend.accept().await {
//!         tokio::spawn(async move {
//!             let (mut r, mut w) = stream.split();
//!             let _ = tokio::io::copy(&mut r, &mut w).await;
//!             let _ = w.shutdown().await;
//!         });
//!     }
//! });
//!
//! let gateway = TestGateway::builder()
//!     .route("/echo", &format!("tcp://127.0.0.1:{port}"))
//!     .self_signed()
//!     .start()
//!     .await?;
//! let url = gateway.url("/echo"); // wss://localhost:PORT/echo
//! // A client that trusts the gateway's in-memory CA and nothing else.
//! let tls = tokio_rustls::TlsConnector::from(gateway.rustls_client_config().expect("a CA"));
//! let tcp = tokio::net::TcpStream::connect(gateway.addr()).await?;
//! let name = rustls_pki_types::ServerName::try_from("localhost")?;
//! let (mut ws, _) = tokio_tungstenite::client_async(&url, tls.connect(name, tcp).await?).await?;
//! ws.send(Message::binary(b"hello".to_vec())).await?;
//! let echoed = ws.next().await.expect("a message")?;
//! assert_eq!(echoed.into_data().as_ref(), b"hello");
//! ws.close(None).await?;
//! gateway.shutdown().await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::gateway::{Gateway, PrepareError};
use crate::server::{Server, StartError};
use crate::systemd::Activated;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("the gateway's task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A gateway running in this process. Dropping it leaves it running until the runtime
/// ends; [`TestGateway::shutdown`] drains it.
pub struct TestGateway {
    server: Server,
    addrs: Vec<SocketAddr>,
    task: JoinHandle<()>,
}

impl TestGateway {
    /// A configuration written for you: one listener on 127.0.0.1 port 0, and routes.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Starts from configuration text (listeners should bind port 0).
    pub async fn from_toml(text: &str) -> Result<TestGateway, TestError> {
        TestGateway::from_config(Config::parse(text, "<test>")?).await
    }

    pub async fn from_config(config: Config) -> Result<TestGateway, TestError> {
        TestGateway::from_config_with(config, Arc::new(Metrics::new())).await
    }

    /// As `from_config`, counting into `metrics`.
    pub async fn from_config_with(
        config: Config,
        metrics: Arc<Metrics>,
    ) -> Result<TestGateway, TestError> {
        TestGateway::start_server(config, metrics, Activated::none()).await
    }

    /// As `from_config`, serving on listening sockets made elsewhere (socket activation):
    /// each listener takes the socket of its name.
    pub async fn with_sockets(
        config: Config,
        sockets: Activated,
    ) -> Result<TestGateway, TestError> {
        TestGateway::start_server(config, Arc::new(Metrics::new()), sockets).await
    }

    async fn start_server(
        config: Config,
        metrics: Arc<Metrics>,
        sockets: Activated,
    ) -> Result<TestGateway, TestError> {
        let gateway = Gateway::prepare(config)?;
        let server = Server::start_with(gateway, metrics, sockets).await?;
        let addrs = server.local_addrs();
        let task = tokio::spawn(server.clone().run());
        Ok(TestGateway {
            server,
            addrs,
            task,
        })
    }

    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every listener's address, in configuration order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// `ws://` or `wss://` URL of `path` on the first listener. A `self_signed` listener's
    /// URL names the first name its certificate holds (`localhost` by default), so that the
    /// client verifies the certificate as it would in production.
    pub fn url(&self, path: &str) -> String {
        let gateway = self.server.gateway();
        let listener = &gateway.config.listeners[0];
        let tls = listener.tls.as_ref();
        let first_name = tls
            .and_then(|t| t.self_signed.as_ref())
            .and_then(|s| s.names.first());
        let host = crate::ready::url_host(self.addr(), first_name);
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{host}:{}{path}", self.addr().port())
    }

    /// The in-memory CA's certificate (PEM), when a listener is `self_signed`.
    pub fn ca_pem(&self) -> Option<String> {
        Some(self.server.gateway().ephemeral()?.ca_pem().to_string())
    }

    /// A rustls client configuration that trusts the in-memory CA, and only it.
    pub fn rustls_client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        let gateway = self.server.gateway();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(gateway.ephemeral()?.ca_der().clone()).ok()?;
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(crate::tls::PROTOCOL_VERSIONS)
            .ok()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Some(Arc::new(config))
    }

    /// What `--ready-file` would say about this gateway.
    pub fn ready(&self) -> crate::ready::Ready {
        crate::ready::Ready::of(&self.server)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        self.server.metrics()
    }

    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Starts the drain (what SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.server.shutdown();
    }

    /// Drains (Close 1001 to every client, `shutdown_timeout` at most) and waits for the end.
    pub async fn shutdown(self) -> Result<(), TestError> {
        self.server.shutdown();
        self.task.await?;
        Ok(())
    }
}

/// Builds a configuration: one listener (`127.0.0.1:0`), the routes given, and the extras.
#[derive(Debug, Default, Clone)]
pub struct Builder {
    gateway: Vec<String>,
    listener: Vec<String>,
    routes: Vec<String>,
    admin: bool,
}

impl Builder {
    /// A route: prefix `path` relayed to `upstream` (`tcp://`, `ws://`, `wss://`, `unix:`…).
    pub fn route(self, path: &str, upstream: &str) -> Builder {
        self.route_with(path, upstream, "")
    }

    /// A route with more keys, as TOML lines of its `[[route]]` table (`faults = { … }`).
    pub fn route_with(mut self, path: &str, upstream: &str, extra: &str) -> Builder {
        self.routes.push(format!(
            "[[route]]\npath = {}\nupstream = {}\n{extra}\n",
            quoted(path),
            quoted(upstream)
        ));
        self
    }

    /// `wss://` with a certificate for localhost, 127.0.0.1 and ::1 from an in-memory CA.
    pub fn self_signed(mut self) -> Builder {
        self.listener.push("tls = { self_signed = true }".into());
        self
    }

    /// An admin listener on 127.0.0.1 port 0 (`/metrics`, and `/faults/…` with faults).
    pub fn admin(mut self) -> Builder {
        self.admin = true;
        self
    }

    /// `[gateway] allow_faults = true`, for routes with `faults`.
    pub fn allow_faults(self) -> Builder {
        self.gateway("allow_faults = true")
    }

    /// A line of the `[gateway]` table, like `close_timeout = "1s"`.
    pub fn gateway(mut self, line: &str) -> Builder {
        self.gateway.push(line.into());
        self
    }

    /// The configuration text this builder makes.
    pub fn toml(&self) -> String {
        let mut text = String::new();
        if !self.gateway.is_empty() {
            text.push_str(&format!("[gateway]\n{}\n\n", self.gateway.join("\n")));
        }
        if self.admin {
            text.push_str("[admin]\nbind = \"127.0.0.1:0\"\n\n");
        }
        text.push_str(&format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\n{}\n\n",
            self.listener.join("\n")
        ));
        text.push_str(&self.routes.join("\n"));
        text
    }

    pub async fn start(self) -> Result<TestGateway, TestError> {
        TestGateway::from_toml(&self.toml()).await
    }
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
