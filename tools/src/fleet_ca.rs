//! The fleet's certificate authority, kept by the operator: `deckhand fleet init|enroll|revoke`.
//!
//! * `init` makes the fleet CA (`ca.crt`, `ca.key`; the key stays with the operator).
//! * `enroll --name pi-3` issues `pi-3.crt`/`pi-3.key`, copied to the Pi with `ca.crt`. The certificate's
//!   common name is the agent id.
//! * `revoke --name pi-3` adds the certificate's serial to the CA's revocation list (`crl.pem`); agents
//!   given that file refuse the certificate. Certificates also expire (365 days by default).
//!
//! The agent's side (loading credentials, mutual TLS) is `deckhand_agent::peer::tls`.

use deckhand_protocol::wire::{AgentIdError, PEER_NAME, check_agent_id};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error(transparent)]
    AgentId(#[from] AgentIdError),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("no randomness from the operating system for a serial number: {0}")]
    Random(#[source] getrandom::Error),
    #[error("{path}: cannot encode the issued list: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("no certificate named {0:?} was issued by this CA")]
    UnknownAgent(String),
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> CaError {
    CaError::Invalid {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

fn write_new(path: &Path, data: &[u8], private: bool) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CaError::Exists(path.to_owned())
            } else {
                io(e)
            }
        })?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Replaces a file atomically (write beside it, sync, rename).
fn replace(path: &Path, data: &[u8]) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(io)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// What the CA directory records about each certificate it issued (`issued.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Issued {
    pub name: String,
    /// The serial number, hex.
    pub serial: String,
    pub not_after: String,
    #[serde(default)]
    pub revoked_at: Option<String>,
}

/// The operator's CA directory: `ca.crt`, `ca.key`, `issued.json`, `crl.pem`.
/// How long `deckhand fleet enroll` makes a certificate valid unless told otherwise.
pub const ENROLL_DAYS: u32 = 365;

pub struct CaDir {
    pub dir: PathBuf,
}

impl CaDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CaDir { dir: dir.into() }
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    fn key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    fn issued_path(&self) -> PathBuf {
        self.dir.join("issued.json")
    }

    /// Makes a new fleet CA in an empty (or new) directory.
    pub fn init(&self, fleet: &str) -> Result<(), CaError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| CaError::Io {
            path: self.dir.clone(),
            source,
        })?;
        if self.key_path().exists() {
            return Err(CaError::Exists(self.key_path()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("deckhand fleet CA {fleet}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        write_new(&self.key_path(), key.serialize_pem().as_bytes(), true)?;
        write_new(&self.cert_path(), cert.pem().as_bytes(), false)?;
        self.save_issued(&[])?;
        self.write_crl(&[])
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CaError> {
        let key_pem = String::from_utf8(read(&self.key_path())?)
            .map_err(|_| invalid(&self.key_path(), "not PEM text"))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&self.key_path(), e))?;
        let cert_pem = String::from_utf8(read(&self.cert_path())?)
            .map_err(|_| invalid(&self.cert_path(), "not PEM text"))?;
        Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid(&self.cert_path(), e))
    }

    pub fn issued(&self) -> Result<Vec<Issued>, CaError> {
        let path = self.issued_path();
        serde_json::from_slice(&read(&path)?).map_err(|e| invalid(&path, e))
    }

    fn save_issued(&self, issued: &[Issued]) -> Result<(), CaError> {
        let json = serde_json::to_vec_pretty(issued).map_err(|source| CaError::Encode {
            path: self.issued_path(),
            source,
        })?;
        replace(&self.issued_path(), &json)
    }

    /// Issues an agent certificate: writes `NAME.crt` and `NAME.key` (0600) into `out`.
    pub fn enroll(&self, name: &str, days: u32, out: &Path) -> Result<(PathBuf, PathBuf), CaError> {
        check_agent_id(name)?;
        let issuer = self.issuer()?;
        let mut issued = self.issued()?;
        if issued
            .iter()
            .any(|i| i.name == name && i.revoked_at.is_none())
        {
            tracing::warn!(
                agent = name,
                "a certificate for this name is already live; issuing another"
            );
        }
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec![PEER_NAME.to_owned(), format!("{name}.agent.deckhand")])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(days.max(1)));
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::create_dir_all(out).map_err(|source| CaError::Io {
            path: out.to_owned(),
            source,
        })?;
        let (crt, keyf) = (
            out.join(format!("{name}.crt")),
            out.join(format!("{name}.key")),
        );
        write_new(&keyf, key.serialize_pem().as_bytes(), true)?;
        write_new(&crt, cert.pem().as_bytes(), false)?;
        issued.push(Issued {
            name: name.to_owned(),
            serial: hex::encode(serial.as_ref()),
            not_after: format_time(params.not_after),
            revoked_at: None,
        });
        self.save_issued(&issued)?;
        Ok((crt, keyf))
    }

    /// Revokes every live certificate issued to `name` and rewrites `crl.pem`. Returns how many.
    pub fn revoke(&self, name: &str) -> Result<usize, CaError> {
        let mut issued = self.issued()?;
        let now = format_time(time::OffsetDateTime::now_utc());
        let mut n = 0;
        for i in issued
            .iter_mut()
            .filter(|i| i.name == name && i.revoked_at.is_none())
        {
            i.revoked_at = Some(now.clone());
            n += 1;
        }
        if n == 0 {
            return Err(CaError::UnknownAgent(name.to_owned()));
        }
        self.save_issued(&issued)?;
        self.write_crl(&issued)?;
        Ok(n)
    }

    fn write_crl(&self, issued: &[Issued]) -> Result<(), CaError> {
        let issuer = self.issuer()?;
        let now = time::OffsetDateTime::now_utc();
        let revoked = issued
            .iter()
            .filter(|i| i.revoked_at.is_some())
            .map(|i| {
                let serial = hex::decode(&i.serial).map_err(|e| {
                    invalid(&self.issued_path(), format!("serial of {}: {e}", i.name))
                })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(3650),
            crl_number: SerialNumber::from(now.unix_timestamp().max(1) as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&issuer)?;
        replace(&self.crl_path(), crl.pem()?.as_bytes())
    }
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(CaError::Random)?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and never shortened
    Ok(SerialNumber::from_slice(&b))
}

fn format_time(t: time::OffsetDateTime) -> String {
    jiff::Timestamp::from_second(t.unix_timestamp())
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use deckhand_agent::peer::tls::{CredentialPaths, FleetCredentials};

    fn paths(ca: &CaDir, dir: &Path, name: &str, crl: bool) -> CredentialPaths {
        CredentialPaths {
            ca: ca.cert_path(),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            crl: crl.then(|| ca.crl_path()),
        }
    }

    #[test]
    fn enroll_load_and_revoke() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path().join("ca"));
        ca.init("shop").unwrap();
        assert!(matches!(ca.init("shop"), Err(CaError::Exists(_))));
        let out = tmp.path().join("out");
        ca.enroll("pi-1", 30, &out).unwrap();
        let creds = FleetCredentials::load(&paths(&ca, &out, "pi-1", true)).unwrap();
        assert_eq!(creds.agent_id, "pi-1");
        creds.check().unwrap();
        creds.server_config(8).unwrap();
        creds.client_config().unwrap();
        // Revoked: the credentials load (the agent serves regardless), and its check names why it is
        // not a member.
        assert_eq!(ca.revoke("pi-1").unwrap(), 1);
        let creds = FleetCredentials::load(&paths(&ca, &out, "pi-1", true)).unwrap();
        let err = creds.check().unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
        assert!(err.to_string().contains("Revoked"), "{err}");
        assert!(matches!(ca.revoke("pi-9"), Err(CaError::UnknownAgent(_))));
        assert!(matches!(
            ca.enroll("Pi_1", 30, &out),
            Err(CaError::AgentId(_))
        ));
    }

    #[test]
    fn certificates_are_judged_at_the_trusted_clock() {
        use deckhand_agent::peer::tls::{EPOCH, TrustedClock};
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path().join("ca"));
        ca.init("shop").unwrap();
        let out = tmp.path().join("out");
        ca.enroll("pi-1", 30, &out).unwrap();
        let creds = FleetCredentials::load(&paths(&ca, &out, "pi-1", false)).unwrap();
        creds.check().unwrap();
        let (cert, ca_end) = creds.not_after();
        let cert = cert.unwrap();
        assert!(cert > jiff::Timestamp::now() + jiff::SignedDuration::from_hours(29 * 24));
        assert!(ca_end.unwrap() > cert);
        // A floor past the certificate's end (a newer manifest was verified): expired, whatever the
        // system clock says.
        let later = cert + jiff::SignedDuration::from_hours(24);
        let floored = creds.with_floor(Some(Box::new(move || Some(later))));
        assert_eq!(floored.now(), later);
        let err = floored.check().unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(TrustedClock::system().now() >= EPOCH);
        // Never before the agent's own certificate's start (the CA signed it then).
        let least = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
        assert_eq!(TrustedClock::new(None, least).now(), least);
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (
            CaDir::new(tmp.path().join("a")),
            CaDir::new(tmp.path().join("b")),
        );
        a.init("a").unwrap();
        b.init("b").unwrap();
        let out = tmp.path().join("out");
        b.enroll("pi-2", 30, &out).unwrap();
        let mut p = paths(&a, &out, "pi-2", false);
        let err = FleetCredentials::load(&p).unwrap().check().unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
        // A key that is not the certificate's.
        a.enroll("pi-3", 30, &out).unwrap();
        p = paths(&a, &out, "pi-3", false);
        p.key = out.join("pi-2.key");
        let err = FleetCredentials::load(&p).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
    }
}
