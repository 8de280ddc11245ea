//! Token targets, as websockify's TokenFile reads them: lines `TOKEN: HOST:PORT` in one file
//! or in every file of a folder, `#` comments and blank lines ignored. A bad line is logged
//! with its file and line and skipped; the others stay in force. The table is made when the
//! configuration is prepared, and made again when a file changes (the certificate watcher
//! watches these files too), so a reload never loses the lines that were good.
//!
//! A token's target is checked against the route's `allowed_targets` after its name is
//! resolved, and the gateway connects to the address it checked: a token file (or a signed
//! claim naming a token) cannot turn the gateway into an open proxy, nor can DNS answer
//! differently between the check and the connect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::config::{TargetRule, TokenSource};

#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    #[error("{}: cannot read the token file: {source}; check the path", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a token did not lead to an upstream.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefused {
    #[error("no token in the request")]
    Missing,
    #[error("unknown token")]
    Unknown,
    #[error("the token's target {target} cannot be resolved: {reason}")]
    Unresolved { target: String, reason: String },
    #[error("the token's target {target} ({addr}) is outside allowed_targets")]
    NotAllowed { target: String, addr: SocketAddr },
}

/// Tokens and the `HOST:PORT` each names.
#[derive(Debug, Default)]
pub struct TokenTable {
    targets: HashMap<String, (String, u16)>,
}

impl TokenTable {
    /// Reads the file, or every file of the folder (in name order; a later line for a token
    /// replaces an earlier one, as in websockify).
    pub fn load(source: &TokenSource) -> Result<TokenTable, TargetsError> {
        let mut table = TokenTable::default();
        for file in files(source)? {
            let text = std::fs::read_to_string(&file).map_err(|source| TargetsError::Read {
                path: file.clone(),
                source,
            })?;
            table.read(&file, &text);
        }
        Ok(table)
    }

    fn read(&mut self, file: &Path, text: &str) {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line) {
                Some((token, host, port)) => {
                    self.targets
                        .insert(token.to_string(), (host.to_string(), port));
                }
                None => warn!(
                    file = %file.display(),
                    line = n + 1,
                    "token file: not `TOKEN: HOST:PORT`; line skipped, the others stay in force"
                ),
            }
        }
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The `HOST:PORT` a token names.
    pub fn get(&self, token: &str) -> Option<(&str, u16)> {
        self.targets
            .get(token)
            .map(|(host, port)| (host.as_str(), *port))
    }

    /// Resolves the token's target and checks it against `allowed` (empty allows any); the
    /// address to connect to. The lookup gets `within` (the route's `connect_timeout`): the
    /// system resolver's own retries can take much longer, and the client waits meanwhile.
    pub async fn resolve(
        &self,
        token: &str,
        allowed: &[TargetRule],
        within: std::time::Duration,
    ) -> Result<SocketAddr, TokenRefused> {
        let (host, port) = self.get(token).ok_or(TokenRefused::Unknown)?;
        let target = crate::config::authority(host, port);
        let unresolved = |reason: String| TokenRefused::Unresolved {
            target: target.clone(),
            reason,
        };
        let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                match tokio::time::timeout(within, tokio::net::lookup_host((host, port))).await {
                    Ok(Ok(addrs)) => addrs.collect(),
                    Ok(Err(e)) => return Err(unresolved(e.to_string())),
                    Err(_) => return Err(unresolved("no answer within connect_timeout".into())),
                }
            }
        };
        match (pick(&addrs, allowed), addrs.first()) {
            (Some(addr), _) => Ok(addr),
            (None, Some(&addr)) => Err(TokenRefused::NotAllowed {
                target: target.clone(),
                addr,
            }),
            (None, None) => Err(unresolved("no address".into())),
        }
    }
}

/// The first of a name's addresses that `allowed` allows (empty allows any). A name with an
/// address outside the rules and one inside (IPv6 first, say) is dialled at the one inside:
/// the rules say where the gateway may connect, not which names it may look up.
fn pick(addrs: &[SocketAddr], allowed: &[TargetRule]) -> Option<SocketAddr> {
    addrs
        .iter()
        .copied()
        .find(|&addr| allowed.is_empty() || allowed.iter().any(|rule| rule.allows(addr)))
}

/// The files a source names: the file, or the folder's regular files in name order.
pub fn files(source: &TokenSource) -> Result<Vec<PathBuf>, TargetsError> {
    match source {
        TokenSource::File(path) => Ok(vec![path.clone()]),
        TokenSource::Dir(dir) => {
            let read = |source| TargetsError::Read {
                path: dir.clone(),
                source,
            };
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(read)?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.is_file())
                .collect();
            files.sort();
            Ok(files)
        }
    }
}

/// `TOKEN: HOST:PORT` (spaces around the colon optional; IPv6 hosts in brackets).
fn parse_line(line: &str) -> Option<(&str, &str, u16)> {
    let (token, target) = line.split_once(':')?;
    let (token, target) = (token.trim(), target.trim());
    if token.is_empty() || token.contains(char::is_whitespace) {
        return None;
    }
    let (host, port) = target.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((token, host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_allowed_address_of_a_name_is_dialled() {
        let v6: SocketAddr = "[::1]:5900".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:5900".parse().unwrap();
        let rules = crate::config::Config::parse(
            "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntargets = { file = \"t\" }\nallowed_targets = [\"127.0.0.1/32\"]\n",
            "t.toml",
        )
        .unwrap()
        .routes[0]
            .allowed_targets
            .clone();
        assert_eq!(pick(&[v6, v4], &rules), Some(v4));
        assert_eq!(pick(&[v6], &rules), None);
        assert_eq!(pick(&[v6, v4], &[]), Some(v6));
    }

    #[test]
    fn lines_as_websockify_reads_them() {
        let mut table = TokenTable::default();
        table.read(
            Path::new("tokens.cfg"),
            "# fleet\nvm1: 10.0.0.5:5900\n\nvm2:host.internal:5901\nbroken line\nv6: [::1]:5902\nnoport: 10.0.0.1\n",
        );
        assert_eq!(table.get("vm1"), Some(("10.0.0.5", 5900)));
        assert_eq!(table.get("vm2"), Some(("host.internal", 5901)));
        assert_eq!(table.get("v6"), Some(("::1", 5902)));
        assert_eq!(table.get("noport"), None);
        assert_eq!(table.len(), 3);
    }
}
