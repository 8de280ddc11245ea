//! Listening: bind, accept with back-off, one task per connection that does TLS and HTTP
//! (`connection`) and, for upgrades, the handshake and relay (`upgrade`); connection budgets
//! (`limits`); hot reload of configuration and listeners; the drain at shutdown.
//!
//! The accept loop only accepts: TLS and everything else slow happen in the spawned task,
//! so one slow client cannot hold up the others.

mod client;
mod connection;
mod http1;
pub mod limits;
mod tls_stream;
mod upgrade;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::gateway::{Gateway, ListenerKey, PrepareError};
use crate::relay::ShutdownSignals;
use crate::telemetry::Metrics;
use crate::telemetry::ratelimit::LogLimiter;

#[derive(Debug, thiserror::Error)]
#[error("listener {name:?}: cannot listen on {addr}: {source}{hint}")]
pub struct BindError {
    pub name: String,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
    hint: &'static str,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Activation(#[from] crate::systemd::ActivationError),
    #[error(
        "listener {listener:?}: tls.ca_out: {source}; check that the folder exists and is writable"
    )]
    CaOut {
        listener: String,
        #[source]
        source: crate::devcert::DevCertError,
    },
}

/// Why a reload was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("preparing the configuration stopped: {0}")]
    Aborted(String),
}

/// A running gateway. Cloning gives another handle to the same one.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

/// What every connection task shares with the server.
pub(crate) struct Inner {
    /// The configuration in force; swapped whole on reload, read per connection and request.
    pub gateway: ArcSwap<Gateway>,
    pub metrics: Arc<Metrics>,
    pub total: Arc<AtomicUsize>,
    pub per_ip: Arc<limits::PerIp>,
    pub tracker: TaskTracker,
    pub shutdown: ShutdownSignals,
    /// Cancelled when this process hands its sockets to a new one (binary upgrade), and with
    /// the drain: listeners stop accepting and HTTP connections end after the request in
    /// progress (HTTP/2 with GOAWAY); relays go on until the drain.
    pub retire: CancellationToken,
    /// `/readyz` says 503 from here on (a stop's `drain_delay`), while everything is served.
    pub unready: std::sync::atomic::AtomicBool,
    /// Rejected upgrades are logged at most this often (a flood must not fill the disk).
    pub rejection_log: LogLimiter,
    /// Fault state by route (`allow_faults`), kept across reloads.
    pub faults: crate::faults::Registry,
    listeners: Mutex<Vec<Running>>,
    admin: Mutex<Option<(SocketAddr, OwnedFd)>>,
    /// Stops the admin listener at the very end, after the drain (so `/readyz` shows it).
    admin_stop: CancellationToken,
    /// Serialises reloads: binding, swapping and stopping must not interleave.
    reload_lock: tokio::sync::Mutex<()>,
}

/// A listening socket with its accept loop.
struct Running {
    key: ListenerKey,
    local: SocketAddr,
    stop: CancellationToken,
    /// The listening socket itself (a duplicate descriptor), to hand to a new binary.
    socket: Option<OwnedFd>,
}

/// What the accept loop of one listener and its connections hold.
pub(crate) struct ListenerContext {
    pub key: ListenerKey,
    pub server: Arc<Inner>,
    /// Upgraded connections through this listener, for its `max_connections`.
    pub active: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Server {
    /// Binds every listener of the configuration and starts accepting.
    pub async fn start(gateway: Gateway, metrics: Arc<Metrics>) -> Result<Server, StartError> {
        Server::start_with(gateway, metrics, crate::systemd::Activated::none()).await
    }

    /// The same, with the listening sockets systemd passed (socket activation) used by the
    /// listeners of their names instead of binding.
    pub async fn start_with(
        gateway: Gateway,
        metrics: Arc<Metrics>,
        mut activated: crate::systemd::Activated,
    ) -> Result<Server, StartError> {
        write_ca_files(&gateway)?;
        // Before the listeners: a socket left after them is one no listener took.
        let passed_admin = activated.take_admin();
        let bound = bind_activated(&gateway, &mut activated)?;
        let admin = match &gateway.config.admin {
            Some(admin) if let Some(socket) = passed_admin => {
                let bind_error = |source: io::Error| BindError {
                    name: "admin".into(),
                    addr: admin.bind,
                    hint: "",
                    source,
                };
                socket.set_nonblocking(true).map_err(bind_error)?;
                Some(TcpListener::from_std(socket).map_err(bind_error)?)
            }
            Some(admin) => {
                Some(
                    TcpListener::bind(admin.bind)
                        .await
                        .map_err(|source| BindError {
                            name: "admin".into(),
                            addr: admin.bind,
                            hint: hint(&source),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let shutdown = ShutdownSignals::default();
        gateway.start_health_checks(&shutdown.graceful.child_token(), &metrics);
        let retire = shutdown.graceful.child_token();
        let inner = Arc::new(Inner {
            gateway: ArcSwap::from_pointee(gateway),
            metrics,
            total: Arc::new(AtomicUsize::new(0)),
            per_ip: Arc::new(limits::PerIp::default()),
            tracker: TaskTracker::new(),
            shutdown,
            retire,
            unready: std::sync::atomic::AtomicBool::new(false),
            rejection_log: LogLimiter::new(20),
            faults: Default::default(),
            listeners: Mutex::new(Vec::new()),
            admin: Mutex::new(None),
            admin_stop: CancellationToken::new(),
            reload_lock: tokio::sync::Mutex::new(()),
        });
        let server = Server { inner };
        if let Some(listener) = admin {
            let addr = listener.local_addr().ok();
            info!(addr = ?addr, "admin listening: /metrics /healthz /readyz");
            if let (Some(addr), Ok(socket)) = (addr, listener.as_fd().try_clone_to_owned())
                && let Ok(mut slot) = server.inner.admin.lock()
            {
                *slot = Some((addr, socket));
            }
            tokio::spawn(crate::admin::serve(
                listener,
                server.inner.clone(),
                server.inner.admin_stop.clone(),
            ));
        }
        server.spawn_listeners(bound);
        tokio::spawn(watch_certificates(server.clone()));
        Ok(server)
    }

    /// Local addresses of the listeners, in configuration order (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound_listeners()
            .into_iter()
            .map(|(_, addr)| addr)
            .collect()
    }

    /// The listeners that are bound, as (index in the configuration, local address), in
    /// configuration order.
    pub fn bound_listeners(&self) -> Vec<(usize, SocketAddr)> {
        let gateway = self.inner.gateway.load();
        let running = self.lock_listeners();
        gateway
            .config
            .listeners
            .iter()
            .enumerate()
            .filter_map(|(index, l)| {
                let key = ListenerKey::of(l);
                running
                    .iter()
                    .find(|r| r.key == key)
                    .map(|r| (index, r.local))
            })
            .collect()
    }

    /// The admin listener's local address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.inner
            .admin
            .lock()
            .ok()
            .and_then(|a| a.as_ref().map(|(addr, _)| *addr))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The configuration in force.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.inner.gateway.load_full()
    }

    /// Starts the drain: stop accepting, Close 1001 to every client. `run` returns when the
    /// drain is over.
    pub fn shutdown(&self) {
        self.inner.shutdown.graceful.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.inner.shutdown.graceful.is_cancelled()
    }

    /// The listening sockets (duplicates), named as a new binary takes them: each listener
    /// by its name, the admin listener as [`crate::handover::ADMIN_SOCKET`].
    pub fn listening_sockets(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        let gateway = self.inner.gateway.load();
        let mut sockets = Vec::new();
        for running in self.lock_listeners().iter() {
            if let (Some(listener), Some(socket)) =
                (gateway.listener(&running.key), &running.socket)
            {
                sockets.push((listener.config.name.clone(), socket.try_clone()?));
            }
        }
        if let Ok(admin) = self.inner.admin.lock()
            && let Some((_, socket)) = admin.as_ref()
        {
            sockets.push((
                crate::handover::ADMIN_SOCKET.to_string(),
                socket.try_clone()?,
            ));
        }
        Ok(sockets)
    }

    /// A new binary serves on this process's sockets: stop accepting (on the admin listener
    /// too) and let HTTP connections end; relays run on until [`Server::shutdown`]. Reloads
    /// are ignored from here on.
    pub async fn retire(&self) {
        let _serial = self.inner.reload_lock.lock().await;
        self.inner.retire.cancel();
        self.inner.admin_stop.cancel();
        self.inner.tracker.close();
    }

    /// The first step of a stop with `drain_delay`: `/readyz` answers 503, so that
    /// balancers stop choosing this process, while it goes on accepting and serving.
    pub fn unready(&self) {
        self.inner
            .unready
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_unready(&self) -> bool {
        self.inner
            .unready
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_retired(&self) -> bool {
        self.inner.retire.is_cancelled()
    }

    /// Resolves once no connection is left (after [`Server::retire`]).
    pub async fn idle(&self) {
        self.inner.tracker.wait().await
    }

    /// Re-reads a configuration file and applies it (see [`Server::reload`]); the failure
    /// or success is logged in one line and counted.
    pub async fn reload_from(&self, path: &Path) -> Result<(), ReloadError> {
        let result = async {
            let gateway = prepare_off_runtime(path.to_path_buf(), self.gateway()).await?;
            self.reload(gateway).await
        }
        .await;
        match &result {
            Ok(()) => info!(config = %path.display(), "configuration reloaded"),
            Err(e) => {
                error!(config = %path.display(), "reload refused, the running configuration stays: {e}")
            }
        }
        result
    }

    /// Applies a new configuration: new connections use its routes, certificates and limits;
    /// established connections are untouched. Listeners that appeared are bound and those that
    /// disappeared stop accepting. If a new listener cannot bind, nothing changes.
    pub async fn reload(&self, gateway: Gateway) -> Result<(), ReloadError> {
        self.reload_unless_changed(gateway, None).await.map(|_| ())
    }

    /// `reload`, but only if the configuration in force is still `expected` (the certificate
    /// watcher prepared `gateway` from it; a SIGHUP reload in between must not be undone).
    /// `Ok(false)`: nothing applied (draining, or the configuration changed meanwhile).
    async fn reload_unless_changed(
        &self,
        mut gateway: Gateway,
        expected: Option<&Arc<Gateway>>,
    ) -> Result<bool, ReloadError> {
        let _serial = self.inner.reload_lock.lock().await;
        if self.is_draining() {
            info!("draining: configuration reload ignored");
            return Ok(false);
        }
        if self.is_retired() {
            info!("handed over to a new process: configuration reload ignored");
            return Ok(false);
        }
        if let Some(expected) = expected
            && !Arc::ptr_eq(expected, &self.inner.gateway.load_full())
        {
            return Ok(false);
        }
        let keep: Vec<ListenerKey> = self
            .lock_listeners()
            .iter()
            .map(|r| r.key.clone())
            .collect();
        let bound = match bind_all(&gateway, &keep) {
            Ok(bound) => bound,
            Err(e) => {
                self.inner.metrics.reload(false);
                return Err(e.into());
            }
        };
        if let Err(e) = write_ca_files(&gateway) {
            self.inner.metrics.reload(false);
            return Err(e.into());
        }
        let wanted: Vec<ListenerKey> = gateway
            .config
            .listeners
            .iter()
            .map(ListenerKey::of)
            .collect();
        if gateway.config.admin != self.inner.gateway.load().config.admin {
            warn!("[admin] changed: the admin listener keeps its address until restart");
        }
        gateway.inherit_pools(&self.inner.gateway.load());
        gateway.start_health_checks(
            &self.inner.shutdown.graceful.child_token(),
            &self.inner.metrics,
        );
        self.inner.gateway.store(Arc::new(gateway));
        {
            let mut running = self.lock_listeners();
            running.retain(|r| {
                let stays = wanted.contains(&r.key);
                if !stays {
                    info!(addr = %r.local, "listener removed by reload: no longer accepting");
                    r.stop.cancel();
                }
                stays
            });
        }
        self.spawn_listeners(bound);
        self.inner.metrics.reload(true);
        Ok(true)
    }

    /// Serves until [`Server::shutdown`], then drains: relays send Close 1001 and get up to
    /// `shutdown_timeout` to finish; whatever is left after that is dropped.
    pub async fn run(self) {
        let inner = &self.inner;
        inner.shutdown.graceful.cancelled().await;
        // No reload may bind listeners from here on (reload checks for draining under this lock).
        let serial = inner.reload_lock.lock().await;
        for running in self.lock_listeners().drain(..) {
            running.stop.cancel();
        }
        drop(serial);
        inner.tracker.close();
        let timeout = inner.gateway.load().config.gateway.shutdown_timeout;
        info!(
            open = inner.metrics.active_relays(),
            "draining: waiting up to {timeout:?} for open connections"
        );
        if tokio::time::timeout(timeout, inner.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = inner.metrics.active_relays(),
                "shutdown_timeout ({timeout:?}) passed; closing the connections that are still open"
            );
            inner.shutdown.force.cancel();
            // Forced relays end at their next poll; this bound only guards against a bug.
            let _ = tokio::time::timeout(Duration::from_secs(1), inner.tracker.wait()).await;
        }
        info!("all connections closed");
        inner.admin_stop.cancel();
    }

    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        // A panic while holding this lock cannot leave the list half-changed; carry on.
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn spawn_listeners(&self, bound: Vec<(ListenerKey, TcpListener)>) {
        for (key, listener) in bound {
            let local = match listener.local_addr() {
                Ok(addr) => addr,
                Err(e) => {
                    warn!(error = %e, "a bound listener has no local address; dropping it");
                    continue;
                }
            };
            let gateway = self.inner.gateway.load();
            let Some(this) = gateway.listener(&key) else {
                continue;
            };
            info!(listener = %this.config.name, addr = %local, tls = this.tls.is_some(), "listening");
            let stop = self.inner.retire.child_token();
            // Only an upgrade needs it; without it (out of descriptors) the new binary binds
            // its own, which fails unless `reuse_port` is on, and the upgrade says so.
            let socket = listener.as_fd().try_clone_to_owned().ok();
            let ctx = Arc::new(ListenerContext {
                key: key.clone(),
                server: self.inner.clone(),
                active: Arc::new(AtomicUsize::new(0)),
                stop: stop.clone(),
            });
            self.lock_listeners().push(Running {
                key,
                local,
                stop,
                socket,
            });
            self.inner.tracker.spawn(accept_loop(listener, ctx));
        }
    }
}

/// Writes the in-memory CA to every `ca_out` of a `self_signed` listener.
fn write_ca_files(gateway: &Gateway) -> Result<(), StartError> {
    let Some(ephemeral) = gateway.ephemeral() else {
        return Ok(());
    };
    for listener in &gateway.config.listeners {
        let Some(path) = listener
            .tls
            .as_ref()
            .and_then(|t| t.self_signed.as_ref())
            .and_then(|s| s.ca_out.as_ref())
        else {
            continue;
        };
        ephemeral
            .write_ca(path)
            .map_err(|source| StartError::CaOut {
                listener: listener.name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// At start: each listener takes the socket systemd (or the process this one replaces)
/// passed for its name, or binds its own when there is no socket activation. A replaced
/// process's socket serves only a listener still at its address; the others bind.
fn bind_activated(
    gateway: &Gateway,
    activated: &mut crate::systemd::Activated,
) -> Result<Vec<(ListenerKey, TcpListener)>, StartError> {
    if !activated.is_active() {
        return Ok(bind_all(gateway, &[])?);
    }
    let mut bound = Vec::new();
    for l in &gateway.config.listeners {
        let Some(socket) = activated.take(&l.name)? else {
            continue;
        };
        if activated.is_handed_over()
            && let Ok(local) = socket.local_addr()
            && !same_address(local, l.bind)
        {
            info!(listener = %l.name, bind = %l.bind, was = %local, "the listener moved: binding its new address");
            continue;
        }
        let bind_error = |source: io::Error| BindError {
            name: l.name.clone(),
            addr: l.bind,
            hint: "",
            source,
        };
        socket.set_nonblocking(true).map_err(bind_error)?;
        if !activated.is_handed_over()
            && let Ok(local) = socket.local_addr()
            && local != l.bind
        {
            warn!(listener = %l.name, bind = %l.bind, socket = %local, "the socket systemd passed is not at the listener's bind address; serving on the socket's");
        }
        // Its options are set (and what waits in its backlog given them) by the accept loop.
        let listener = TcpListener::from_std(socket).map_err(bind_error)?;
        bound.push((ListenerKey::of(l), listener));
    }
    let names: Vec<&str> = gateway
        .config
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    activated.check_all_taken(&names)?;
    if activated.is_handed_over() {
        let taken: Vec<ListenerKey> = bound.iter().map(|(key, _)| key.clone()).collect();
        bound.extend(bind_all(gateway, &taken)?);
    }
    Ok(bound)
}

/// Whether a socket bound at `local` is what `bind` asks for (port 0: any port).
fn same_address(local: SocketAddr, bind: SocketAddr) -> bool {
    local.ip() == bind.ip() && (bind.port() == 0 || local.port() == bind.port())
}

/// Binds the listeners of `gateway` that are not in `keep`, in order; all or nothing.
fn bind_all(
    gateway: &Gateway,
    keep: &[ListenerKey],
) -> Result<Vec<(ListenerKey, TcpListener)>, BindError> {
    let mut bound = Vec::new();
    for l in &gateway.config.listeners {
        let key = ListenerKey::of(l);
        if keep.contains(&key) {
            continue;
        }
        let keepalive = gateway.config.gateway.tcp_keepalive;
        let listener =
            crate::sockets::listen(l.bind, l.reuse_port, keepalive.as_ref()).map_err(|source| {
                BindError {
                    name: l.name.clone(),
                    addr: l.bind,
                    hint: hint(&source),
                    source,
                }
            })?;
        bound.push((key, listener));
    }
    Ok(bound)
}

/// Re-loads TLS material, JWT keys, htpasswd and token files when one changes on disk. Files are read
/// (following symlinks) and hashed, so the atomic symlink swaps of certbot and Kubernetes
/// secrets count as changes as much as a file rewritten in place. A pair caught half-written
/// fails to load, is logged, and is tried again when the files change once more.
async fn watch_certificates(server: Server) {
    let mut last = fingerprint(&server.gateway().watched_files());
    let stop = server.inner.shutdown.graceful.child_token();
    loop {
        // The configuration in force when the files are read, whose files they are.
        let mut gateway = server.gateway();
        let files = || {
            gateway = server.gateway();
            gateway.watched_files()
        };
        match next_check(&server, &stop, files, &mut last).await {
            None => return,
            Some(false) => continue,
            Some(true) => {}
        }
        let config = gateway.config.clone();
        let old = gateway.clone();
        let Ok(prepared) =
            tokio::task::spawn_blocking(move || Gateway::prepare_after(config, &old)).await
        else {
            continue;
        };
        match prepared.map_err(ReloadError::from) {
            Ok(fresh) => match server.reload_unless_changed(fresh, Some(&gateway)).await {
                Ok(true) => info!("certificate files changed: reloaded; new connections use them"),
                Ok(false) => {}
                Err(e) => error!("certificate files changed, but the reload failed: {e}"),
            },
            Err(e) => {
                server.inner.metrics.reload(false);
                error!("certificate files changed but cannot be used; the previous ones stay: {e}");
            }
        }
    }
}

impl Server {
    /// `[gateway] watch_config`: re-reads the configuration file at `path` when its content
    /// changes, as on SIGHUP (checked every `certificate_check_interval`, read through
    /// symlinks, so a Kubernetes ConfigMap's swap of its data folder counts). Runs for the
    /// process's life; the key is read at each check, so a reload may turn it on or off.
    pub async fn watch_config(self, path: std::path::PathBuf) {
        let files = vec![path.clone()];
        let mut last = fingerprint(&files);
        let stop = self.inner.retire.clone();
        loop {
            match next_check(&self, &stop, || files.clone(), &mut last).await {
                None => return,
                Some(false) => continue,
                Some(true) => {}
            }
            if !self.gateway().config.gateway.watch_config {
                continue;
            }
            info!(config = %path.display(), "configuration file changed (watch_config): reloading");
            crate::systemd::reloading();
            // Serving either way: the new configuration, or the old one if it was refused.
            let _ = self.reload_from(&path).await;
            crate::systemd::ready();
        }
    }
}

/// The watchers' one step: waits `certificate_check_interval`, then reads and hashes the
/// files `files()` names then, off the runtime's worker threads (reads block). Whether they
/// changed since `last` (which becomes what was read); `None` once `stop` is cancelled.
async fn next_check(
    server: &Server,
    stop: &CancellationToken,
    files: impl FnOnce() -> Vec<std::path::PathBuf>,
    last: &mut u64,
) -> Option<bool> {
    let interval = server.gateway().config.gateway.certificate_check_interval;
    tokio::select! {
        _ = stop.cancelled() => return None,
        _ = tokio::time::sleep(interval) => {}
    }
    let files = files();
    let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&files)).await else {
        return Some(false);
    };
    let changed = now != *last;
    *last = now;
    Some(changed)
}

/// Reads and checks a configuration file and loads its certificates on the blocking pool:
/// file reads and key parsing must not stall a runtime worker's connections. The one path
/// for SIGHUP reloads; the certificate watcher prepares the configuration in force the
/// same way.
async fn prepare_off_runtime(
    path: std::path::PathBuf,
    old: Arc<Gateway>,
) -> Result<Gateway, ReloadError> {
    tokio::task::spawn_blocking(move || -> Result<Gateway, ReloadError> {
        Ok(Gateway::prepare_after(Config::load(&path)?, &old)?)
    })
    .await
    .unwrap_or_else(|e| Err(ReloadError::Aborted(e.to_string())))
}

fn fingerprint(files: &[std::path::PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in files {
        file.hash(&mut hasher);
        if file.is_dir() {
            // A folder (of token files): its files' names and contents, as the table reads them.
            let source = crate::config::TokenSource::Dir(file.clone());
            for entry in crate::targets::files(&source).unwrap_or_default() {
                entry.hash(&mut hasher);
                if let Ok(bytes) = std::fs::read(&entry) {
                    bytes.hash(&mut hasher);
                }
            }
            continue;
        }
        match std::fs::read(file) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(e) => e.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
}

fn hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::AddrInUse => {
            "; another process uses this port: stop it or choose another bind address"
        }
        io::ErrorKind::PermissionDenied => "; ports below 1024 need root or CAP_NET_BIND_SERVICE",
        io::ErrorKind::AddrNotAvailable => "; this machine has no such address",
        _ => "",
    }
}

/// Accepts until shutdown or until a reload removes the listener. Errors (EMFILE when out
/// of file descriptors, ECONNABORTED) are logged and retried after a growing pause, so the
/// loop neither exits nor spins; the pending connection waits in the kernel's backlog.
async fn accept_loop(listener: TcpListener, ctx: Arc<ListenerContext>) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = FIRST_BACKOFF;
    // The keepalive settings last put on the listening socket, which accepted sockets
    // inherit; a reload may change them.
    let keepalive = ctx.server.gateway.load().config.gateway.tcp_keepalive;
    let mut on_listener = settle(&listener, &ctx, keepalive);
    loop {
        let accepted = tokio::select! {
            // Stop first: a removed or draining listener accepts nothing more.
            biased;
            _ = ctx.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = FIRST_BACKOFF;
                let keepalive = ctx.server.gateway.load().config.gateway.tcp_keepalive;
                if on_listener != Some(keepalive) {
                    // Accepted with the old settings (a reload changed them), or where
                    // accepted sockets do not inherit them: set its own.
                    crate::sockets::prepare(
                        &stream,
                        keepalive.as_ref(),
                        crate::sockets::Side::Client,
                    );
                    on_listener = settle(&listener, &ctx, keepalive);
                }
                spawn_connection(stream, peer, &ctx);
            }
            Err(e) => {
                error!(addr = ?listener.local_addr().ok(), error = %e, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    _ = ctx.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Puts `keepalive` on the listening socket, then gives it to what already waits in the
/// backlog, which was made from the listener as it was before: a socket systemd passed (it
/// listened before this process existed), or a listener whose settings a reload changed.
/// Returns the settings the listener now holds, `None` where accepted sockets do not
/// inherit them.
fn settle(
    listener: &TcpListener,
    ctx: &Arc<ListenerContext>,
    keepalive: Option<crate::config::TcpKeepalive>,
) -> Option<Option<crate::config::TcpKeepalive>> {
    let on_listener =
        crate::sockets::prepare_listener(listener, keepalive.as_ref()).then_some(keepalive);
    if on_listener.is_some() {
        accept_backlog(listener, ctx, keepalive.as_ref());
    }
    on_listener
}

/// Accepts every connection waiting in the backlog now, without waiting for readiness (a
/// new registration reads as not ready until the first event), and gives each the current
/// settings. Whatever arrives after this returns is made from the listener as it is now.
/// An error other than an empty backlog is left to the accept loop, which meets it again.
fn accept_backlog(
    listener: &TcpListener,
    ctx: &Arc<ListenerContext>,
    keepalive: Option<&crate::config::TcpKeepalive>,
) {
    let socket = socket2::SockRef::from(listener);
    // At most one backlog's worth (sockets::listen's), so that a flood arriving meanwhile
    // does not keep this loop from yielding; the rest inherits the settings anyway.
    for _ in 0..1024 {
        let Ok((accepted, addr)) = socket.accept() else {
            return;
        };
        let Some(peer) = addr.as_socket() else {
            continue;
        };
        if accepted.set_nonblocking(true).is_err() {
            continue;
        }
        let Ok(stream) = TcpStream::from_std(accepted.into()) else {
            continue;
        };
        crate::sockets::prepare(&stream, keepalive, crate::sockets::Side::Client);
        spawn_connection(stream, peer, ctx);
    }
}

fn spawn_connection(stream: TcpStream, peer: SocketAddr, ctx: &Arc<ListenerContext>) {
    // Boxed for the reason the relay task is (server/upgrade.rs): tokio copies a task's
    // future whole.
    ctx.server
        .tracker
        .spawn(Box::pin(connection::serve(stream, peer, ctx.clone())));
}
