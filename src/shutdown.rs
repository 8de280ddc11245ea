//! Process signals → the shutdown token.

use tokio_util::sync::CancellationToken;

/// Cancels `token` at the first SIGINT or SIGTERM. A second signal is left to the default
/// handler only after the drain: operators who want out at once use SIGKILL.
pub async fn on_signal(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutting down: no new connections, closing open ones with 1001"
    );
    token.cancel();
    Ok(())
}
