//! Logging setup, metrics, and the limiter that keeps floods out of the logs.

pub mod metrics;
pub mod ratelimit;

pub use metrics::Metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber: `RUST_LOG` filters (default `info`), lines go to stderr.
/// `json` switches to one JSON object per line.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A subscriber already set (tests start several gateways) keeps its place.
    drop(result);
}
