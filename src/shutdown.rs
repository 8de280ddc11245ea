//! Process signals: SIGHUP reloads the configuration, SIGTERM and SIGINT start the drain.

use std::path::PathBuf;

use tokio::signal::unix::{SignalKind, signal};

use crate::server::Server;

/// Handles signals until the first SIGTERM or SIGINT, which starts the drain and returns.
/// A reload that fails leaves the running configuration in place (logged by `reload_from`).
pub async fn handle_signals(server: Server, config: PathBuf) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                tracing::info!(signal = "SIGHUP", config = %config.display(), "reloading configuration");
                let _ = server.reload_from(&config).await;
                continue;
            }
        };
        tracing::info!(
            signal = name,
            "shutting down: no new connections, closing open ones with 1001"
        );
        server.shutdown();
        return Ok(());
    }
}
