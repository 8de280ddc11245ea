//! `--ready-file`: once every listener is bound and serving, where the gateway listens, as
//! JSON, so that a test (or its runner) learns the ports it got for port 0, the URL to open,
//! the key a browser should trust and the CA file, without polling ports or reading logs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::server::Server;

/// What the ready file holds.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Ready {
    pub pid: u32,
    pub listeners: Vec<ReadyListener>,
    /// The admin listener's address; `null` without `[admin]`.
    pub admin: Option<String>,
    /// Absolute path of the first `ca_out` file of a `self_signed` listener; `null` if none.
    pub ca: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReadyListener {
    pub name: String,
    pub addr: String,
    /// `ws://` or `wss://`, with the host a client should use (see [`url_host`]).
    pub url: String,
    /// base64 SHA-256 of the server certificate's public key (TLS listeners), for Chromium's
    /// `--ignore-certificate-errors-spki-list`; `null` for ws:// listeners.
    pub spki_sha256: Option<String>,
}

impl Ready {
    /// The facts of a running server.
    pub fn of(server: &Server) -> Ready {
        let gateway = server.gateway();
        let listeners = server
            .bound_listeners()
            .into_iter()
            .map(|(index, addr)| {
                let config = &gateway.config.listeners[index];
                let tls = config.tls.as_ref();
                let scheme = if tls.is_some() { "wss" } else { "ws" };
                let self_signed = tls.and_then(|t| t.self_signed.as_ref());
                let host = url_host(addr, self_signed.and_then(|s| s.names.first()));
                ReadyListener {
                    name: config.name.clone(),
                    addr: addr.to_string(),
                    url: format!("{scheme}://{host}:{}", addr.port()),
                    spki_sha256: gateway.listener_spki(index).map(str::to_string),
                }
            })
            .collect();
        let ca = gateway
            .config
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref()?.self_signed.as_ref()?.ca_out.as_ref())
            .next()
            .map(|path| absolute(path).display().to_string());
        Ready {
            pid: std::process::id(),
            listeners,
            admin: server.admin_addr().map(|a| a.to_string()),
            ca,
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Writes the file atomically (a sibling file, then a rename): a reader that sees it sees
    /// all of it.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::devcert::write_atomic(path, format!("{}\n", self.to_json()).as_bytes())
    }

    /// The same facts for the one `ready` log line: `name url addr [spki]` per listener.
    pub fn summary(&self) -> String {
        self.listeners
            .iter()
            .map(|l| match &l.spki_sha256 {
                Some(spki) => format!("{} {} {} spki_sha256={spki}", l.name, l.url, l.addr),
                None => format!("{} {} {}", l.name, l.url, l.addr),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The host of a listener's URL: the first name of a `self_signed` certificate (the name it
/// is valid for), else the address it is bound to, loopback for an unspecified one.
pub fn url_host(addr: SocketAddr, first_name: Option<&String>) -> String {
    let host = match first_name {
        Some(name) => name.clone(),
        None if addr.ip().is_unspecified() && addr.is_ipv4() => "127.0.0.1".into(),
        None if addr.ip().is_unspecified() => "::1".into(),
        None => addr.ip().to_string(),
    };
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
