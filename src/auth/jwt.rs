//! JWT bearer tokens (jsonwebtoken): looked for where the route's `from` says, verified
//! against a JWKS file's public keys or a shared secret, with `exp` required and `nbf`,
//! `iss` and `aud` checked.

use std::collections::HashSet;

use http::header;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::{AuthError, AuthLoadError, Authenticated, Credentials};
use crate::config::{CredentialSource, JwtAuth, JwtKeys};

pub struct Verifier {
    settings: JwtAuth,
    keys: Keys,
    /// One set of checks per allowed algorithm, made once.
    validations: Vec<(Algorithm, Validation)>,
}

enum Keys {
    Secret(DecodingKey),
    /// By `kid`; keys without one are tried when the token names none.
    Set(Vec<(Option<String>, Option<Algorithm>, DecodingKey)>),
}

const SUBPROTOCOL_PREFIX: &str = "bearer.";

impl Verifier {
    pub fn load(settings: &JwtAuth) -> Result<Verifier, AuthLoadError> {
        let read = |path: &std::path::PathBuf| {
            std::fs::read(path).map_err(|source| AuthLoadError::Read {
                path: path.clone(),
                source,
            })
        };
        let keys = match &settings.keys {
            JwtKeys::Secret(path) => {
                let secret = read(path)?;
                // A trailing newline from `echo` or an editor is not part of the secret.
                let secret = secret.trim_ascii_end();
                if secret.is_empty() {
                    return Err(AuthLoadError::Invalid {
                        path: path.clone(),
                        reason: "the secret file is empty".into(),
                    });
                }
                Keys::Secret(DecodingKey::from_secret(secret))
            }
            JwtKeys::Jwks(path) => {
                let invalid = |reason: String| AuthLoadError::Invalid {
                    path: path.clone(),
                    reason,
                };
                let set: JwkSet = serde_json::from_slice(&read(path)?)
                    .map_err(|e| invalid(format!("not a JWKS document ({e})")))?;
                let mut keys = Vec::new();
                for jwk in &set.keys {
                    let key = DecodingKey::from_jwk(jwk)
                        .map_err(|e| invalid(format!("a key cannot be used: {e}")))?;
                    let algorithm = jwk
                        .common
                        .key_algorithm
                        .and_then(|a| a.to_string().parse::<Algorithm>().ok());
                    keys.push((jwk.common.key_id.clone(), algorithm, key));
                }
                if keys.is_empty() {
                    return Err(invalid("the JWKS holds no keys".into()));
                }
                Keys::Set(keys)
            }
        };
        let validations = settings
            .algorithms
            .iter()
            .filter_map(|a| a.parse().ok())
            .map(|algorithm| (algorithm, validation(settings, algorithm)))
            .collect();
        Ok(Verifier {
            settings: settings.clone(),
            keys,
            validations,
        })
    }

    pub fn check(&self, request: &Credentials<'_>) -> Result<Authenticated, AuthError> {
        let (token, used_protocol) = self.find(request).ok_or(AuthError::MissingToken)?;
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::InvalidToken(e.to_string());
        let head = jsonwebtoken::decode_header(&token).map_err(invalid)?;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == head.alg) else {
            return Err(AuthError::InvalidToken(format!(
                "algorithm {:?} is not allowed",
                head.alg
            )));
        };
        let key = match &self.keys {
            Keys::Secret(key) => key,
            Keys::Set(keys) => keys
                .iter()
                .find(|(kid, alg, _)| {
                    kid.as_deref() == head.kid.as_deref() && alg.is_none_or(|a| a == head.alg)
                })
                .or_else(|| (keys.len() == 1).then(|| &keys[0]))
                .map(|(_, _, key)| key)
                .ok_or_else(|| AuthError::InvalidToken("no key with its kid".into()))?,
        };
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            &token, key, validation,
        )
        .map_err(invalid)?
        .claims;
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        // With `target_claim`, the token names the target: a token without it must not fall
        // back to a target the client picks in the query or path.
        let target = match self.settings.target_claim.as_deref() {
            Some(claim) => Some(text(claim).ok_or_else(|| {
                AuthError::InvalidToken(format!("the token has no `{claim}` claim (a string)"))
            })?),
            None => None,
        };
        Ok(Authenticated {
            name: text("sub"),
            target,
            headers: Vec::new(),
            used_protocol,
        })
    }

    /// The first token found, in the order of `from`; with the subprotocol that carried it.
    fn find(&self, request: &Credentials<'_>) -> Option<(String, Option<String>)> {
        for source in &self.settings.from {
            let found = match source {
                CredentialSource::Authorization => request
                    .headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        let (scheme, token) = v.trim().split_once(' ')?;
                        scheme
                            .eq_ignore_ascii_case("bearer")
                            .then(|| token.trim().to_string())
                    })
                    .map(|t| (t, None)),
                CredentialSource::Cookie(name) => request
                    .headers
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .find_map(|pair| {
                        let (k, v) = pair.trim().split_once('=')?;
                        (k == name).then(|| v.trim_matches('"').to_string())
                    })
                    .map(|t| (t, None)),
                CredentialSource::Query(name) => request.uri.query().and_then(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| (v.into_owned(), None))
                }),
                CredentialSource::Subprotocol => request.protocols.iter().find_map(|p| {
                    p.strip_prefix(SUBPROTOCOL_PREFIX)
                        .map(|t| (t.to_string(), Some(p.clone())))
                }),
            };
            if let Some((token, protocol)) = found.filter(|(t, _)| !t.is_empty()) {
                return Some((token, protocol));
            }
        }
        None
    }
}

/// What every token must pass: `exp` present and not past, `nbf` not in the future (both
/// within `leeway`), and `iss` and `aud` when the route names them.
fn validation(settings: &JwtAuth, algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_nbf = true;
    validation.required_spec_claims = HashSet::from(["exp".to_string()]);
    match &settings.audience {
        Some(audience) => validation.set_audience(&[audience]),
        None => validation.validate_aud = false,
    }
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
    }
    validation
}
