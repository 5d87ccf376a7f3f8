//! Development certificates: a private CA and one certificate per node or client,
//! made with rcgen (`dirsync-cli certs`, `just certs`).
//!
//! Every certificate carries its owner's name as the subject CN and as a SAN, and its
//! [`Role`] as the subject OU, so the other side of a TLS handshake can read who it
//! talks to and what that party may ask (see [`crate::tls::peer_identity`]).
//! Node certificates are valid for TLS server and client authentication (nodes both
//! accept and dial); client certificates only for client authentication.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::tls::Role;

/// Organization written into every certificate's subject.
pub const ORGANIZATION: &str = "dirsync";
/// File names of the CA inside a certificates directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// Errors while making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0} exists but {1} does not: restore it, or remove both to make a new CA (this invalidates every certificate it signed)")]
    HalfCa(PathBuf, PathBuf),
    #[error("invalid name {0:?}: use letters, digits, '.', '-' or '_' (and not \"ca\")")]
    BadName(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A certificate authority able to sign node and client certificates.
pub struct Ca {
    key: KeyPair,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA, valid for ten years.
    pub fn generate() -> Result<Ca, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A distinct name per CA, so a certificate from another CA reads as
        // "unknown issuer" rather than as a bad signature from a same-named one.
        let key = KeyPair::generate()?;
        let id = blake3::hash(key.public_key_raw()).to_hex();
        dn.push(
            DnType::CommonName,
            format!("dirsync development CA {}", &id[..12]),
        );
        dn.push(DnType::OrganizationName, ORGANIZATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert_pem = params.self_signed(&key)?.pem();
        let issuer = Issuer::new(params, KeyPair::from_pem(&key.serialize_pem())?);
        Ok(Ca {
            key,
            cert_pem,
            issuer,
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`; `Ok(None)` if neither exists.
    pub fn load(dir: &Path) -> Result<Option<Ca>, CertError> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        match (cert_path.exists(), key_path.exists()) {
            (false, false) => return Ok(None),
            (true, false) => return Err(CertError::HalfCa(cert_path, key_path)),
            (false, true) => return Err(CertError::HalfCa(key_path, cert_path)),
            (true, true) => {}
        }
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, KeyPair::from_pem(&key_pem)?)?;
        Ok(Some(Ca {
            key,
            cert_pem,
            issuer,
        }))
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a certificate for `name` with `role`, valid from `not_before` to
    /// `not_after`. SANs: the name, `localhost`, `127.0.0.1`, `::1` and `extra_sans`.
    /// Returns `(certificate PEM, private key PEM)`.
    pub fn issue_with_validity(
        &self,
        name: &str,
        role: Role,
        extra_sans: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(String, String), CertError> {
        check_name(name)?;
        let mut sans: Vec<String> = vec![name.into(), "localhost".into()];
        sans.extend(["127.0.0.1".into(), "::1".into()]);
        for san in extra_sans {
            if !sans.contains(san) {
                sans.push(san.clone());
            }
        }
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Client | Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// [`Ca::issue_with_validity`] for five years from now.
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        extra_sans: &[String],
    ) -> Result<(String, String), CertError> {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(
            name,
            role,
            extra_sans,
            now - Duration::hours(1),
            now + Duration::days(5 * 365),
        )
    }

    fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name != "ca"
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(CertError::BadName(name.to_string()))
    }
}

/// What `dirsync-cli certs` was asked to make.
#[derive(Clone, Debug)]
pub struct CertRequest {
    pub out: PathBuf,
    pub nodes: Vec<String>,
    pub clients: Vec<String>,
    /// Client certificates that may also break other users' locks.
    pub admins: Vec<String>,
    pub extra_sans: Vec<String>,
    /// Replace existing certificates of the named nodes and clients (never the CA).
    pub force: bool,
}

impl CertRequest {
    /// Nodes `a` and `b`, client `cli` and admin `admin` in `out`.
    pub fn defaults(out: impl Into<PathBuf>) -> Self {
        CertRequest {
            out: out.into(),
            nodes: vec!["a".into(), "b".into()],
            clients: vec!["cli".into()],
            admins: vec!["admin".into()],
            extra_sans: Vec::new(),
            force: false,
        }
    }
}

/// What [`generate`] did, one line per file or pair, for the user.
#[derive(Debug, Default)]
pub struct CertReport {
    pub written: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
    pub ca_created: bool,
}

/// Makes the CA (unless `out` has one) and a certificate + key for each name.
/// Existing certificates are kept unless `force`; the CA is never replaced.
pub fn generate(req: &CertRequest) -> Result<CertReport, CertError> {
    let names: Vec<(&String, Role)> = req
        .nodes
        .iter()
        .map(|n| (n, Role::Node))
        .chain(req.clients.iter().map(|n| (n, Role::Client)))
        .chain(req.admins.iter().map(|n| (n, Role::Admin)))
        .collect();
    for (name, _) in &names {
        check_name(name)?;
    }
    fs::create_dir_all(&req.out).map_err(io_err(&req.out))?;
    let mut report = CertReport::default();
    let ca = match Ca::load(&req.out)? {
        Some(ca) => ca,
        None => {
            let ca = Ca::generate()?;
            write_file(&req.out.join(CA_KEY), &ca.key_pem(), true)?;
            write_file(&req.out.join(CA_CERT), ca.cert_pem(), false)?;
            report.ca_created = true;
            report.written.push(req.out.join(CA_CERT));
            ca
        }
    };
    for (name, role) in names {
        let cert_path = req.out.join(format!("{name}.pem"));
        let key_path = req.out.join(format!("{name}.key"));
        if !req.force && (cert_path.exists() || key_path.exists()) {
            report.kept.push(cert_path);
            continue;
        }
        let (cert, key) = ca.issue(name, role, &req.extra_sans)?;
        write_file(&key_path, &key, true)?;
        write_file(&cert_path, &cert, false)?;
        report.written.push(cert_path);
    }
    Ok(report)
}

/// Writes `contents` to a temporary name then renames it into place, so a crash
/// never leaves half a key. Private keys get mode 0600 from creation on.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    opts.mode(if private { 0o600 } else { 0o644 });
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_keeps_existing_and_reuses_ca() {
        let dir = tempfile::tempdir().unwrap();
        let report = generate(&CertRequest::defaults(dir.path())).unwrap();
        assert!(report.ca_created);
        assert_eq!(report.written.len(), 5, "ca, a, b, cli, admin");
        let mode = fs::metadata(dir.path().join("a.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca_before = fs::read(dir.path().join(CA_CERT)).unwrap();
        let a_before = fs::read(dir.path().join("a.pem")).unwrap();

        // Again with a third node: a, b, cli, admin are kept and c is signed by the
        // same CA.
        let mut req = CertRequest::defaults(dir.path());
        req.nodes.push("c".into());
        let report = generate(&req).unwrap();
        assert!(!report.ca_created);
        assert_eq!(report.kept.len(), 4);
        assert_eq!(report.written, vec![dir.path().join("c.pem")]);
        assert_eq!(fs::read(dir.path().join(CA_CERT)).unwrap(), ca_before);
        assert_eq!(fs::read(dir.path().join("a.pem")).unwrap(), a_before);

        // --force replaces certificates but not the CA.
        req.force = true;
        generate(&req).unwrap();
        assert_ne!(fs::read(dir.path().join("a.pem")).unwrap(), a_before);
        assert_eq!(fs::read(dir.path().join(CA_CERT)).unwrap(), ca_before);
    }

    #[test]
    fn bad_names_and_half_ca_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = CertRequest::defaults(dir.path());
        req.nodes = vec!["../x".into()];
        assert!(matches!(generate(&req), Err(CertError::BadName(_))));
        generate(&CertRequest::defaults(dir.path())).unwrap();
        fs::remove_file(dir.path().join(CA_KEY)).unwrap();
        let mut req = CertRequest::defaults(dir.path());
        req.nodes = vec!["d".into()];
        assert!(matches!(generate(&req), Err(CertError::HalfCa(..))));
    }
}
