//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// WebSocket gateway: accepts ws:// and wss:// upgrades and relays them to TCP, Unix-socket
/// or WebSocket upstreams.
#[derive(Debug, Parser)]
#[command(
    name = "wsgate",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Configuration file (TOML) to run with.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log as JSON lines instead of text (same as log_format = "json").
    #[arg(long)]
    pub log_json: bool,

    /// Write the process ID to this file while running (for `wsgate reload`).
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Once every listener is bound and serving, write where (addresses, URLs, certificate
    /// key, CA file) to this file as JSON, atomically; removed at exit. For tests.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,

    /// Drain and exit, as on SIGTERM, when standard input closes: the test runner that
    /// started wsgate with a pipe on its standard input finished or died.
    #[arg(long)]
    pub exit_on_eof: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration, its certificates and keys, then exit 0 (valid) or 1.
    Check {
        /// Configuration file (TOML) to check.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Make a local CA and a server certificate for development (reuses ca.crt/ca.key in OUT).
    Cert {
        /// Folder to write into.
        #[arg(long, value_name = "OUT", default_value = "certs")]
        out: PathBuf,
        /// Names the certificate is valid for (DNS names or IP addresses); repeat the option.
        #[arg(long = "name", value_name = "NAME", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
        names: Vec<String>,
    },
    /// Replace a running wsgate with the binary now at its path, without refusing a
    /// connection (sends SIGUSR2 to the PID in the file; exits 0 once the new process serves).
    Upgrade {
        /// The file the running wsgate was started with as --pid-file.
        #[arg(long, value_name = "FILE")]
        pid_file: PathBuf,
    },
    /// Ask a running wsgate to re-read its configuration (sends SIGHUP to the PID in the file).
    Reload {
        /// The file the running wsgate was started with as --pid-file.
        #[arg(long, value_name = "FILE")]
        pid_file: PathBuf,
    },
}
