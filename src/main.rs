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
        Some(Command::Cert { out, names }) => cert(&out, &names),
        None => match cli.config {
            Some(config) => run(
                &config,
                RunOptions {
                    log_json: cli.log_json,
                    pid_file: cli.pid_file,
                    ready_file: cli.ready_file,
                    exit_on_eof: cli.exit_on_eof,
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

/// `wsgate reload`: SIGHUP to the process named in the PID file.
fn reload(pid_file: &Path) -> ExitCode {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = match std::fs::read_to_string(pid_file) {
        Ok(text) => match text.trim().parse::<i32>() {
            Ok(pid) if pid > 0 => pid,
            _ => {
                eprintln!("{}: does not hold a process ID", pid_file.display());
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            eprintln!(
                "{}: cannot read: {e}; is wsgate running with --pid-file?",
                pid_file.display()
            );
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

/// What `run` was asked for on the command line, beside the configuration.
struct RunOptions {
    log_json: bool,
    pid_file: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    exit_on_eof: bool,
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
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // Default: one worker per CPU in the process's affinity mask (tokio's default), so a
    // gateway pinned with taskset runs one worker instead of contending with itself.
    if let Some(workers) = config.gateway.workers {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
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
    let mut stdin_closed = options.exit_on_eof.then(wsgate::shutdown::stdin_closed);
    let running = server.clone().run();
    tokio::pin!(running);
    loop {
        tokio::select! {
            _ = &mut running => break,
            event = signals.next(), if !server.is_draining() => match event {
                Event::Reload => {
                    tracing::info!(signal = "SIGHUP", config = %path.display(), "reloading configuration");
                    wsgate::systemd::reloading();
                    // Serving either way: the new configuration, or the old one when the
                    // new one was refused.
                    let _ = server.reload_from(path).await;
                    wsgate::systemd::ready();
                }
                Event::Stop(name) => {
                    tracing::info!(signal = name, "shutting down: no new connections, closing open ones with 1001");
                    wsgate::systemd::stopping();
                    server.shutdown();
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
    for file in [&options.ready_file, &options.pid_file]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(file);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
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
