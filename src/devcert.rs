//! `wsgate cert`: a local CA and a server certificate it signed, for development and tests.
//!
//! An existing `ca.crt` + `ca.key` in the output folder is reused, so a CA that a browser
//! already trusts keeps working when the server certificate is made again for other names.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};

#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make the certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the made key does not load: {0}")]
    Key(String),
    #[error("{}: not a CA this command can reuse ({reason}); move ca.crt and ca.key away to make a new CA", path.display())]
    BadCa { path: PathBuf, reason: String },
}

/// What was written, for the instructions printed afterwards.
#[derive(Debug)]
pub struct DevCerts {
    pub ca_cert: PathBuf,
    pub ca_reused: bool,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// base64 SHA-256 of the server key's SubjectPublicKeyInfo, for Chromium's
    /// `--ignore-certificate-errors-spki-list`.
    pub spki_sha256: String,
}

/// Writes `ca.crt`/`ca.key` (unless both exist) and `<first name>.crt`/`.key` into `out`.
pub fn write(out: &Path, names: &[String]) -> Result<DevCerts, DevCertError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DevCertError::Io { path, source }
    };
    fs::create_dir_all(out).map_err(io_err(out))?;
    let ca_cert_path = out.join("ca.crt");
    let ca_key_path = out.join("ca.key");
    let today = days_since_epoch();

    let (issuer, ca_reused) = if ca_cert_path.exists() && ca_key_path.exists() {
        let pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
        let key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
        let bad = |e: rcgen::Error| DevCertError::BadCa {
            path: ca_cert_path.clone(),
            reason: e.to_string(),
        };
        let key = KeyPair::from_pem(&key_pem).map_err(bad)?;
        (Issuer::from_ca_cert_pem(&pem, key).map_err(bad)?, true)
    } else {
        let (params, key, cert) = new_ca("wsgate development CA", today, 3650)?;
        write_file(&ca_cert_path, &cert.pem(), false)?;
        write_file(&ca_key_path, &key.serialize_pem(), true)?;
        (Issuer::new(params, key), false)
    };

    let (cert, key) = server_cert(names, &issuer, today)?;
    let stem = file_stem(&names[0]);
    let cert_path = out.join(format!("{stem}.crt"));
    let key_path = out.join(format!("{stem}.key"));
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    // The chain: server certificate, then the CA, as servers send it.
    write_file(&cert_path, &format!("{}{}", cert.pem(), ca_pem), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;

    Ok(DevCerts {
        ca_cert: ca_cert_path,
        ca_reused,
        cert: cert_path,
        key: key_path,
        spki_sha256: spki_sha256(&key.subject_public_key_info()),
    })
}

/// A new CA: its parameters (to sign with), key and self-signed certificate.
fn new_ca(
    name: &str,
    today: i64,
    days: i64,
) -> Result<(CertificateParams, KeyPair, rcgen::Certificate), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    validity(&mut params, today, days);
    let cert = params.self_signed(&key)?;
    Ok((params, key, cert))
}

/// A server certificate for `names`, valid for a year from yesterday, signed by `issuer`.
fn server_cert(
    names: &[String],
    issuer: &Issuer<'_, KeyPair>,
    today: i64,
) -> Result<(rcgen::Certificate, KeyPair), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, today, 365);
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert, key))
}

/// Valid from yesterday (clocks drift) for `days`.
fn validity(params: &mut CertificateParams, today: i64, days: i64) {
    let date = |day: i64| {
        let (y, m, d) = ymd(day);
        rcgen::date_time_ymd(y, m, d)
    };
    params.not_before = date(today - 1);
    params.not_after = date(today + days);
}

/// base64 SHA-256 of a SubjectPublicKeyInfo: what Chromium's
/// `--ignore-certificate-errors-spki-list` takes.
pub fn spki_sha256(spki: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// The CA and server certificates of `tls = { self_signed = true }` listeners: made in
/// memory, keys never written anywhere. One CA for the process, kept across reloads (a
/// reload hands it to the next configuration), so a test trusts it once; one server
/// certificate per set of names, kept as well.
pub struct Ephemeral {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: rustls_pki_types::CertificateDer<'static>,
    /// Server certificates by the names they cover.
    certs: std::sync::Mutex<Vec<(Vec<String>, EphemeralCert)>>,
}

/// One made server certificate, ready for rustls.
#[derive(Clone)]
pub struct EphemeralCert {
    pub key: std::sync::Arc<rustls::sign::CertifiedKey>,
    pub spki_sha256: String,
}

impl Ephemeral {
    pub fn new() -> Result<Ephemeral, DevCertError> {
        let (params, key, cert) = new_ca("wsgate ephemeral test CA", days_since_epoch(), 30)?;
        Ok(Ephemeral {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            certs: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The CA certificate, PEM: what a test's client trusts.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &rustls_pki_types::CertificateDer<'static> {
        &self.ca_der
    }

    /// The server certificate for `names`: the one made before for the same names, or a new one.
    pub fn cert(
        &self,
        names: &[String],
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<EphemeralCert, DevCertError> {
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, made)) = certs.iter().find(|(n, _)| n.as_slice() == names) {
            return Ok(made.clone());
        }
        let (cert, key) = server_cert(names, &self.issuer, days_since_epoch())?;
        let chain = vec![cert.der().clone(), self.ca_der.clone()];
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let certified = rustls::sign::CertifiedKey::from_der(chain, der, provider)
            .map_err(|e| DevCertError::Key(e.to_string()))?;
        let made = EphemeralCert {
            key: std::sync::Arc::new(certified),
            spki_sha256: spki_sha256(&key.subject_public_key_info()),
        };
        certs.push((names.to_vec(), made.clone()));
        Ok(made)
    }

    /// Writes the CA certificate to `path` atomically: a file beside it, then a rename, so a
    /// test polling for the file never reads half of it.
    pub fn write_ca(&self, path: &Path) -> Result<(), DevCertError> {
        write_atomic(path, self.ca_pem.as_bytes()).map_err(|source| DevCertError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Writes `contents` to a temporary file in `path`'s folder, then renames it over `path`.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    fs::write(&temporary, contents)?;
    fs::rename(&temporary, path).inspect_err(|_| {
        let _ = fs::remove_file(&temporary);
    })
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), DevCertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let err = |source| DevCertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)
}

/// `*.example.com` → `wildcard.example.com`; `::1` → `__1`: a file name for the first name.
fn file_stem(name: &str) -> String {
    name.replace("*", "wildcard")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn days_since_epoch() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0)
}

/// Civil date (year, month, day) of a day number since 1970 (Howard Hinnant's algorithm).
fn ymd(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(ymd(0), (1970, 1, 1));
        assert_eq!(ymd(20_781), (2026, 11, 24));
        assert_eq!(ymd(11_016), (2000, 2, 29));
    }

    #[test]
    fn file_stems() {
        assert_eq!(file_stem("localhost"), "localhost");
        assert_eq!(file_stem("*.example.com"), "wildcard.example.com");
        assert_eq!(file_stem("::1"), "__1");
    }
}
