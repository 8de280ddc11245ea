//! Basic auth against an htpasswd file of bcrypt entries (`htpasswd -B`). A bcrypt check
//! costs milliseconds of CPU by design, so it runs on the blocking pool, not on a runtime
//! worker that relays other connections, and at most one per CPU at a time: a flood of
//! guesses waits its turn instead of taking every blocking thread. An unknown user costs a
//! check as well, so that the time of the answer does not tell which names exist.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use http::header;
use tracing::warn;

use super::{AuthError, AuthLoadError, Authenticated, Credentials};
use crate::config::BasicAuth;

pub struct Users {
    realm: String,
    /// User → bcrypt hash.
    hashes: Arc<HashMap<String, String>>,
}

impl Users {
    pub fn load(settings: &BasicAuth) -> Result<Users, AuthLoadError> {
        let path = &settings.htpasswd;
        let text = std::fs::read_to_string(path).map_err(|source| AuthLoadError::Read {
            path: path.clone(),
            source,
        })?;
        let mut hashes = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some((user, hash)) if hash.starts_with("$2") => {
                    hashes.insert(user.to_string(), hash.to_string());
                }
                _ => warn!(
                    file = %path.display(),
                    line = n + 1,
                    "htpasswd: not a bcrypt entry (write it with `htpasswd -B`); line skipped"
                ),
            }
        }
        Ok(Users {
            realm: settings.realm.clone(),
            hashes: Arc::new(hashes),
        })
    }

    pub async fn check(&self, request: &Credentials<'_>) -> Result<Authenticated, AuthError> {
        let realm = || self.realm.clone();
        let (user, password) = request
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, encoded) = v.trim().split_once(' ')?;
                if !scheme.eq_ignore_ascii_case("basic") {
                    return None;
                }
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()?;
                let text = String::from_utf8(decoded).ok()?;
                let (user, password) = text.split_once(':')?;
                Some((user.to_string(), password.to_string()))
            })
            .ok_or_else(|| AuthError::MissingPassword { realm: realm() })?;
        let hashes = self.hashes.clone();
        let name = user.clone();
        let Ok(_turn) = checks().acquire().await else {
            return Err(AuthError::WrongPassword { realm: realm() });
        };
        let verified = tokio::task::spawn_blocking(move || match hashes.get(&name) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                // The same work against some entry's hash, and a refusal whatever it says.
                if let Some(hash) = hashes.values().next() {
                    let _ = bcrypt::verify(password, hash);
                }
                false
            }
        })
        .await
        .unwrap_or(false);
        if !verified {
            return Err(AuthError::WrongPassword { realm: realm() });
        }
        Ok(Authenticated {
            name: Some(user),
            ..Default::default()
        })
    }
}

/// Turns for bcrypt checks, one per CPU, shared by every route.
fn checks() -> &'static tokio::sync::Semaphore {
    static CHECKS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    CHECKS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::sync::Semaphore::new(cpus)
    })
}
