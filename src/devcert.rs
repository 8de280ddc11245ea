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
    let date = |days: i64| {
        let (y, m, d) = ymd(days);
        rcgen::date_time_ymd(y, m, d)
    };

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
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, "wsgate development CA");
        params.not_before = date(today - 1);
        params.not_after = date(today + 3650);
        let cert = params.self_signed(&key)?;
        write_file(&ca_cert_path, &cert.pem(), false)?;
        write_file(&ca_key_path, &key.serialize_pem(), true)?;
        (Issuer::new(params, key), false)
    };

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = date(today - 1);
    params.not_after = date(today + 365);
    let cert = params.signed_by(&key, &issuer)?;
    let stem = file_stem(&names[0]);
    let cert_path = out.join(format!("{stem}.crt"));
    let key_path = out.join(format!("{stem}.key"));
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    // The chain: server certificate, then the CA, as servers send it.
    write_file(&cert_path, &format!("{}{}", cert.pem(), ca_pem), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;

    let spki = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
    Ok(DevCerts {
        ca_cert: ca_cert_path,
        ca_reused,
        cert: cert_path,
        key: key_path,
        spki_sha256: base64::engine::general_purpose::STANDARD.encode(spki.as_ref()),
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
