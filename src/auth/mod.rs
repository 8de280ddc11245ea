//! Authentication per route, before the upstream is dialled: a JWT (from the Authorization
//! header, a cookie, a query parameter or a `bearer.TOKEN` subprotocol, since browsers cannot
//! set headers on `new WebSocket(url)`), Basic auth against an htpasswd file of bcrypt
//! entries, or a forward-auth service (nginx's `auth_request`). Keys and password files are
//! loaded when the configuration is prepared and again when they change (the certificate
//! watcher watches them), so a request never reads a file.

mod basic;
mod forward;
mod jwt;

use std::path::PathBuf;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};

use crate::config::{Auth, JwtKeys};
use crate::forwarded::ClientAddr;

#[derive(Debug, thiserror::Error)]
pub enum AuthLoadError {
    #[error("{}: cannot read: {source}; check the path", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// Why a client was not let through; each maps to one answer.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("no credentials")]
    MissingPassword { realm: String },
    #[error("wrong user or password")]
    WrongPassword { realm: String },
    #[error("the auth service answered {status}")]
    Denied {
        status: StatusCode,
        challenge: Option<HeaderValue>,
    },
    #[error("the auth service failed: {0}")]
    Unavailable(String),
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Denied { status, .. } => *status,
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The `WWW-Authenticate` header of the answer.
    pub fn challenge(&self) -> Option<HeaderValue> {
        match self {
            AuthError::MissingToken | AuthError::InvalidToken(_) => {
                Some(HeaderValue::from_static("Bearer error=\"invalid_token\""))
            }
            AuthError::MissingPassword { realm } | AuthError::WrongPassword { realm } => {
                HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")).ok()
            }
            AuthError::Denied { challenge, .. } => challenge.clone(),
            AuthError::Unavailable(_) => None,
        }
    }

    /// For `wsgate_auth_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingToken | AuthError::MissingPassword { .. } => "missing",
            AuthError::InvalidToken(_) | AuthError::WrongPassword { .. } => "invalid",
            AuthError::Denied { .. } => "denied",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

/// What authentication found out.
#[derive(Debug, Default)]
pub struct Authenticated {
    /// The authenticated name: JWT `sub`, the Basic user, the forward service's first copied
    /// header.
    pub name: Option<String>,
    /// The token target a JWT claim picked (`target_claim`).
    pub target: Option<String>,
    /// Headers the auth service answered that go into the upstream handshake.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The offered subprotocol that carried the token: removed from the offer.
    pub used_protocol: Option<String>,
}

/// What the request offers to authenticate with.
pub struct Credentials<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    pub protocols: &'a [String],
    pub client: ClientAddr,
    /// The client came over TLS (wss://).
    pub tls: bool,
}

/// A route's authentication, ready to check requests.
pub enum Authenticator {
    Jwt(jwt::Verifier),
    Basic(basic::Users),
    Forward(forward::Service),
}

impl Authenticator {
    pub fn prepare(auth: &Auth) -> Result<Authenticator, AuthLoadError> {
        Ok(match auth {
            Auth::Jwt(settings) => Authenticator::Jwt(jwt::Verifier::load(settings)?),
            Auth::Basic(settings) => Authenticator::Basic(basic::Users::load(settings)?),
            Auth::Forward(settings) => Authenticator::Forward(forward::Service::new(settings)),
        })
    }

    /// The files this authentication reads, for change detection.
    pub fn files(auth: &Auth) -> Vec<PathBuf> {
        match auth {
            Auth::Jwt(jwt) => match &jwt.keys {
                JwtKeys::Jwks(path) | JwtKeys::Secret(path) => vec![path.clone()],
            },
            Auth::Basic(basic) => vec![basic.htpasswd.clone()],
            Auth::Forward(_) => Vec::new(),
        }
    }

    pub async fn check(&self, request: &Credentials<'_>) -> Result<Authenticated, AuthError> {
        match self {
            Authenticator::Jwt(verifier) => verifier.check(request),
            Authenticator::Basic(users) => users.check(request).await,
            Authenticator::Forward(service) => service.check(request).await,
        }
    }
}
