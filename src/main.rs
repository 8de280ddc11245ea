//! `wsgate`: CLI → config → logging → bind → run → exit code. Nothing else lives here.
//!
//! Start-up errors go to stderr as one plain line each (no log decoration), then exit 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use wsgate::cli::{Cli, Command};
use wsgate::config::{Config, LogFormat};
use wsgate::gateway::Gateway;
use wsgate::server::Server;
use wsgate::shutdown::Event;
use wsgate::telemetry::Metrics;

/// mimalloc rather than the system allocator: a held connection is a few small allocations
/// that live for hours among short-lived handshake buffers, and glibc's arenas fragment under
/// that mix. Measured with the bench's hold and handshake scenarios: 6.2 -> 5.5 kB a held
/// connection, 12% more handshakes per CPU-second.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(&config),
        Some(Command::Reload { pid_file }) => reload(&pid_file),
        Some(Command::Upgrade { pid_file }) => upgrade(&pid_file),
        Some(Command::Cert { out, names }) => cert(&out, &names),
        None => match cli.config {
            Some(config) => run(
                &config,
                RunOptions {
                    log_json: cli.log_json,
                    pid_file: cli.pid_file,
                    ready_file: cli.ready_file,
                    exit_on_eof: cli.exit_on_eof,
                    invocation: wsgate::handover::Invocation::current().ok(),
                },
            ),
            None => {
                eprintln!(
                    "wsgate: no configuration given; run `wsgate --config gateway.toml` (see --help)"
                );
                ExitCode::FAILURE
            }
        },
    }
}

/// `wsgate check`: everything `run` loads, without binding.
fn check(path: &Path) -> ExitCode {
    let result = Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
        let (listeners, routes) = (c.listeners.len(), c.routes.len());
        Gateway::prepare(c)
            .map(|_| (listeners, routes))
            .map_err(|e| format!("{}: {e}", path.display()))
    });
    match result {
        Ok((listeners, routes)) => {
            println!(
                "{}: ok ({listeners} listeners, {routes} routes)",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `wsgate cert`: development certificates, and how to use them.
fn cert(out: &Path, names: &[String]) -> ExitCode {
    match wsgate::devcert::write(out, names) {
        Ok(c) => {
            let ca_note = if c.ca_reused {
                " (existing CA reused)"
            } else {
                ""
            };
            let (ca, cert, key) = (c.ca_cert.display(), c.cert.display(), c.key.display());
            let text = format!(
                "wrote {ca}{ca_note}, {cert} and {key} for: {names}\n\n\
                 Use them in a listener:\n    tls = {{ cert = \"{cert}\", key = \"{key}\" }}\n\n\
                 Trust the CA ({ca}) to connect without warnings:\n\
                 \x20 Chromium/Chrome: Settings > Privacy and security > Security > Manage certificates > Authorities > Import, tick \"Trust this certificate for identifying websites\"\n\
                 \x20 Firefox: Settings > Privacy & Security > Certificates > View Certificates > Authorities > Import, tick \"Trust this CA to identify websites\"\n\
                 \x20 A throw-away Chromium profile instead: chromium --ignore-certificate-errors-spki-list={spki}\n\
                 \x20 curl and most CLI clients: --cacert {ca}\n\n\
                 Keep {ca_key} private; never use these files for a real host.\n",
                names = names.join(", "),
                spki = c.spki_sha256,
                ca_key = c.ca_cert.with_extension("key").display(),
            );
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsgate cert: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The process ID in a `--pid-file`, or why there is none.
fn read_pid(pid_file: &Path) -> Result<i32, String> {
    match std::fs::read_to_string(pid_file) {
        Ok(text) => match text.trim().parse::<i32>() {
            Ok(pid) if pid > 0 => Ok(pid),
            _ => Err(format!(
                "{}: does not hold a process ID",
                pid_file.display()
            )),
        },
        Err(e) => Err(format!(
            "{}: cannot read: {e}; is wsgate running with --pid-file?",
            pid_file.display()
        )),
    }
}

/// `wsgate reload`: SIGHUP to the process named in the PID file.
fn reload(pid_file: &Path) -> ExitCode {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = match read_pid(pid_file) {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match kill(Pid::from_raw(pid), Signal::SIGHUP) {
        Ok(()) => {
            println!(
                "sent SIGHUP to wsgate (pid {pid}); its log says whether the reload was accepted"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot signal pid {pid} from {}: {e}", pid_file.display());
            ExitCode::FAILURE
        }
    }
}

/// `wsgate upgrade`: SIGUSR2 to the process named in the PID file, then the outcome it
/// reports (`handover::report`): 0 once the new process serves, 1 with the reason.
fn upgrade(pid_file: &Path) -> ExitCode {
    match upgrade_and_wait(pid_file) {
        Ok((old, new)) => {
            println!(
                "upgraded: pid {new} serves; pid {old} stopped accepting and drains its open connections (upgrade_drain_timeout)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsgate upgrade: {e}");
            ExitCode::FAILURE
        }
    }
}

fn upgrade_and_wait(pid_file: &Path) -> Result<(i32, u32), String> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = read_pid(pid_file)?;
    let old = Pid::from_raw(pid);
    let name = wsgate::handover::status_socket(pid as u32);
    let socket = SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|addr| UnixDatagram::bind_addr(&addr))
        .map_err(|e| {
            format!("cannot listen for the outcome: {e}; is another `wsgate upgrade` of pid {pid} running?")
        })?;
    let poll = std::time::Duration::from_millis(200);
    socket
        .set_read_timeout(Some(poll))
        .map_err(|e| format!("cannot listen for the outcome: {e}"))?;
    kill(old, Signal::SIGUSR2)
        .map_err(|e| format!("cannot signal pid {pid} from {}: {e}", pid_file.display()))?;
    // The new process gets START_TIMEOUT; the old one reports soon after.
    let patience = wsgate::handover::START_TIMEOUT + std::time::Duration::from_secs(10);
    let mut waited = std::time::Duration::ZERO;
    let mut buf = [0u8; 1024];
    loop {
        if let Ok(n) = socket.recv(&mut buf) {
            let report = String::from_utf8_lossy(&buf[..n]);
            return wsgate::handover::parse_report(&report).map(|new| (pid, new));
        }
        if kill(old, None).is_err() {
            return Err(format!(
                "pid {pid} exited during the upgrade; its log says why"
            ));
        }
        waited += poll;
        if waited >= patience {
            return Err(format!(
                "pid {pid} did not report within {patience:?}; its log says what happened"
            ));
        }
    }
}

/// What `run` was asked for on the command line, beside the configuration.
struct RunOptions {
    log_json: bool,
    pid_file: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    exit_on_eof: bool,
    /// What a binary upgrade starts again; `None` when the binary's path is unknown.
    invocation: Option<wsgate::handover::Invocation>,
}

fn run(path: &Path, options: RunOptions) -> ExitCode {
    // Before any thread exists: a SIGTERM during start-up waits for the handlers below.
    wsgate::shutdown::block();
    // Also before any thread: taking the sockets unsets the variables that passed them.
    let activated = match wsgate::systemd::Activated::from_env() {
        Ok(activated) => activated,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    wsgate::telemetry::init_logging(
        options.log_json || config.gateway.log_format == LogFormat::Json,
    );
    let runtime = match wsgate::runtime::build(config.gateway.workers) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(path, config, options, activated))
}

async fn serve(
    path: &Path,
    config: Config,
    options: RunOptions,
    activated: wsgate::systemd::Activated,
) -> ExitCode {
    let mut signals = match wsgate::shutdown::Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("wsgate: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let gateway = match Gateway::prepare(config) {
        Ok(gateway) => gateway,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let started = tokio::select! {
        biased;
        event = stop_signal(&mut signals) => {
            tracing::info!(signal = event, "stopped during start-up");
            return ExitCode::SUCCESS;
        }
        started = Server::start_with(gateway, Arc::new(Metrics::new()), activated) => started,
    };
    let server = match started {
        Ok(server) => server,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    if let Some(pid_file) = &options.pid_file
        && let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id()))
    {
        eprintln!("{}: cannot write the PID file: {e}", pid_file.display());
        failed = true;
    }
    let ready = wsgate::ready::Ready::of(&server);
    if let Some(ready_file) = &options.ready_file
        && !failed
        && let Err(e) = ready.write(ready_file)
    {
        eprintln!("{}: cannot write the ready file: {e}", ready_file.display());
        failed = true;
    }
    if failed {
        wsgate::systemd::stopping();
        server.shutdown();
    } else {
        tracing::info!(
            pid = ready.pid,
            listeners = %ready.summary(),
            admin = ready.admin.as_deref().unwrap_or("none"),
            ca = ready.ca.as_deref().unwrap_or("none"),
            "ready"
        );
        wsgate::systemd::ready();
        if let Some(interval) = wsgate::systemd::watchdog_interval() {
            tokio::spawn(wsgate::systemd::watchdog(interval));
        }
    }
    tokio::spawn(server.clone().watch_config(path.to_path_buf()));
    let mut stdin_closed = options.exit_on_eof.then(wsgate::shutdown::stdin_closed);
    let running = server.clone().run();
    tokio::pin!(running);
    // Set once a new binary serves on this process's sockets: when its drain ends.
    let mut handed_over: Option<tokio::time::Instant> = None;
    // Set by a stop with drain_delay: when the drain begins.
    let mut drain_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut running => break,
            () = server.idle(), if handed_over.is_some() && !server.is_draining() => {
                tracing::info!("upgrade: every connection of this process has ended; exiting");
                server.shutdown();
            }
            () = sleep_until(drain_at), if drain_at.is_some() && !server.is_draining() => {
                tracing::info!("drain_delay passed: no new connections, closing open ones with 1001");
                server.shutdown();
            }
            () = sleep_until(handed_over), if handed_over.is_some() && !server.is_draining() => {
                tracing::info!(open = server.metrics().active_relays(), "upgrade_drain_timeout passed: closing this process's open connections with 1001");
                server.shutdown();
            }
            event = signals.next(), if !server.is_draining() => match event {
                Event::Reload => {
                    tracing::info!(signal = "SIGHUP", config = %path.display(), "reloading configuration");
                    wsgate::systemd::reloading();
                    // Serving either way: the new configuration, or the old one when the
                    // new one was refused.
                    let _ = server.reload_from(path).await;
                    wsgate::systemd::ready();
                }
                Event::Upgrade if handed_over.is_some() => {
                    tracing::info!(signal = "SIGUSR2", "already handed over to a new process: ignored");
                }
                Event::Upgrade => {
                    tracing::info!(signal = "SIGUSR2", "upgrade: starting the new binary with the listening sockets");
                    let outcome = hand_over(&server, options.invocation.as_ref()).await;
                    wsgate::handover::report(&outcome);
                    match outcome {
                        Ok(pid) => {
                            let timeout = server.gateway().config.gateway.upgrade_drain_timeout;
                            tracing::info!(new_pid = pid, open = server.metrics().active_relays(), "upgrade: the new process serves; this one stops accepting and lets its connections run for up to {timeout:?} (upgrade_drain_timeout)");
                            wsgate::systemd::main_pid(pid);
                            server.retire().await;
                            handed_over = Some(tokio::time::Instant::now() + timeout);
                        }
                        Err(e) => tracing::error!("upgrade failed; this process keeps serving: {e}"),
                    }
                }
                Event::Stop(name) => {
                    let delay = server.gateway().config.gateway.drain_delay;
                    wsgate::systemd::stopping();
                    // A second signal does not wait for the first one's delay.
                    if delay.is_zero() || drain_at.is_some() {
                        tracing::info!(signal = name, "shutting down: no new connections, closing open ones with 1001");
                        server.shutdown();
                    } else {
                        tracing::info!(signal = name, "stopping: /readyz says 503; new connections are still served for {delay:?} (drain_delay), then the drain");
                        server.unready();
                        drain_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            },
            _ = wait_closed(&mut stdin_closed), if stdin_closed.is_some() && !server.is_draining() => {
                stdin_closed = None;
                tracing::info!("standard input closed (--exit-on-eof): shutting down, closing open connections with 1001");
                wsgate::systemd::stopping();
                server.shutdown();
            }
        }
    }
    // After an upgrade the files are the new process's.
    for file in [&options.ready_file, &options.pid_file]
        .into_iter()
        .flatten()
        .filter(|_| handed_over.is_none())
    {
        let _ = std::fs::remove_file(file);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Starts the new binary with this process's listening sockets; its PID once it serves.
async fn hand_over(
    server: &Server,
    invocation: Option<&wsgate::handover::Invocation>,
) -> Result<u32, wsgate::handover::UpgradeError> {
    use wsgate::handover::UpgradeError;
    if server.is_draining() {
        return Err(UpgradeError::Draining);
    }
    let invocation = invocation.ok_or_else(|| UpgradeError::Spawn {
        binary: "the running binary".into(),
        source: std::io::Error::other("its path was not readable at start-up (/proc/self/exe)"),
    })?;
    let sockets = server.listening_sockets().map_err(UpgradeError::Sockets)?;
    wsgate::handover::start_new(invocation, sockets).await
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn wait_closed(closed: &mut Option<tokio::sync::oneshot::Receiver<()>>) {
    match closed {
        Some(rx) => {
            let _ = rx.await;
        }
        None => std::future::pending().await,
    }
}

/// The next SIGTERM or SIGINT (a SIGHUP before the gateway runs has nothing to reload).
async fn stop_signal(signals: &mut wsgate::shutdown::Signals) -> &'static str {
    loop {
        if let Event::Stop(name) = signals.next().await {
            return name;
        }
    }
}
