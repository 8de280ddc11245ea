//! `wsgate`: CLI → config → logging → bind → run → exit code. Nothing else lives here.
//!
//! Start-up errors go to stderr as one plain line each (no log decoration), then exit 1.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use wsgate::cli::{Cli, Command};
use wsgate::config::Config;
use wsgate::gateway::Gateway;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(&config),
        None => match cli.config {
            Some(config) => run(&config, cli.log_json),
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
fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
        let (listeners, routes) = (c.listeners.len(), c.routes.len());
        Gateway::prepare(c)
            .map(|_| (listeners, routes))
            .map_err(|e| format!("{}: {e}", path.display()))
    }) {
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

fn run(path: &std::path::Path, log_json: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    wsgate::telemetry::init_logging(log_json);
    let gateway = match Gateway::prepare(config) {
        Ok(gateway) => Arc::new(gateway),
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listeners = match wsgate::server::bind(&gateway).await {
            Ok(listeners) => listeners,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(wsgate::shutdown::on_signal(shutdown.clone()));
        let stats = Arc::new(wsgate::telemetry::Stats::default());
        let server = wsgate::server::run(gateway, listeners, stats, shutdown.clone());
        tokio::pin!(server);
        tokio::select! {
            _ = &mut server => {}
            result = signals => {
                if let Ok(Err(e)) = result {
                    tracing::error!("cannot install signal handlers: {e}");
                    shutdown.cancel();
                }
                server.await;
            }
        }
        ExitCode::SUCCESS
    })
}
