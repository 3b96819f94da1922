//! The fleet's certificate authority, kept by the operator: `deckhand fleet init|enroll|renew|revoke|
//! rotate-ca|retire-ca`.
//!
//! * `init` makes the fleet CA (`ca.crt`, `ca.key`; the key stays with the operator).
//! * `enroll --name pi-3` issues `pi-3.crt`/`pi-3.key`, copied to the Pi with `ca.crt`. The certificate's
//!   common name is the agent id. Every certificate issued is kept in `certs/` (public).
//! * `renew` issues new certificates for the same keys (every live one ending within `--within` days,
//!   or the agents named), so no Pi is touched: the Pi's key never leaves it again.
//! * `revoke --name pi-3` adds the certificate's serial to the issuing CA's revocation list.
//! * `rotate-ca` makes a new CA, cross-signed by the current one (`cross/`), and renews every live
//!   certificate under it; `retire-ca` lists the previous CA's serial in the new CA's revocation list,
//!   after which agents refuse certificates of the old CA.
//!
//! Each of them rewrites `bundle.pem`: every live certificate, the cross-certificates and each CA's
//! revocation list, numbered (one counter for the whole directory, so the newest bundle has the highest
//! number). `deckhand fleet ... --origin` puts it in the bucket (`fleet/bundle.pem`), where agents read
//! it at their poll and pass it on to their peers; on a stick it is taken too. Every part is CA-signed:
//! neither the bucket nor a peer is trusted with it.
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
    #[error(
        "{name}: the certificate issued to it was not kept (issued before renewals existed); enroll it again"
    )]
    NotKept { name: String },
    #[error("{0}")]
    Rotation(String),
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
    /// The serial number (hex) of the CA that issued it (`None`: issued before any rotation, by the
    /// first CA).
    #[serde(default)]
    pub issuer: Option<String>,
}

/// One CA rotation (`rotations.json`): the CA that was current, its successor, and whether the
/// successor has retired it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rotation {
    /// Serial numbers (hex) of the previous CA (kept in `previous/<serial>/`) and its successor.
    pub previous: String,
    pub next: String,
    #[serde(default)]
    pub retired_at: Option<String>,
}

/// What a change to the CA directory published: the bundle and its number.
#[derive(Clone, Debug)]
pub struct Written {
    pub bundle: PathBuf,
    pub number: u64,
    /// Certificates issued by the change (renewals), by agent name.
    pub issued: Vec<String>,
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
    /// The fleet bundle (`fleet/bundle.pem` in the bucket).
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }
    fn kept_cert(&self, serial: &str) -> PathBuf {
        self.dir.join("certs").join(format!("{serial}.crt"))
    }
    fn rotations_path(&self) -> PathBuf {
        self.dir.join("rotations.json")
    }
    fn previous_dir(&self, serial: &str) -> PathBuf {
        self.dir.join("previous").join(serial)
    }
    fn cross_path(&self, serial: &str) -> PathBuf {
        self.dir.join("cross").join(format!("{serial}.crt"))
    }
    fn counter_path(&self) -> PathBuf {
        self.dir.join("crl_number")
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
        let params = ca_params(&format!("deckhand fleet CA {fleet}"))?;
        let cert = params.self_signed(&key)?;
        write_new(&self.key_path(), key.serialize_pem().as_bytes(), true)?;
        write_new(&self.cert_path(), cert.pem().as_bytes(), false)?;
        self.save_issued(&[])?;
        self.publish().map(|_| ())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CaError> {
        issuer_in(&self.key_path(), &self.cert_path())
    }

    /// The current CA's serial number (hex).
    fn ca_serial(&self) -> Result<String, CaError> {
        serial_of(&read(&self.cert_path())?).map_err(|e| invalid(&self.cert_path(), e))
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

    pub fn rotations(&self) -> Result<Vec<Rotation>, CaError> {
        let path = self.rotations_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| invalid(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(CaError::Io { path, source }),
        }
    }

    fn save_rotations(&self, rotations: &[Rotation]) -> Result<(), CaError> {
        let json = serde_json::to_vec_pretty(rotations).map_err(|source| CaError::Encode {
            path: self.rotations_path(),
            source,
        })?;
        replace(&self.rotations_path(), &json)
    }

    /// Signs an agent certificate for `public_key` under the current CA, keeps it in `certs/` and
    /// records it in `issued`.
    fn issue(
        &self,
        name: &str,
        days: u32,
        public_key: &impl rcgen::PublicKeyData,
        issued: &mut Vec<Issued>,
    ) -> Result<rcgen::Certificate, CaError> {
        let issuer = self.issuer()?;
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
        let cert = params.signed_by(public_key, &issuer)?;
        let serial = hex::encode(serial.as_ref());
        let kept = self.kept_cert(&serial);
        create_dir(kept.parent().unwrap_or(&self.dir))?;
        write_new(&kept, cert.pem().as_bytes(), false)?;
        issued.push(Issued {
            name: name.to_owned(),
            serial,
            not_after: format_time(params.not_after),
            revoked_at: None,
            issuer: Some(self.ca_serial()?),
        });
        Ok(cert)
    }

    /// Issues an agent certificate: writes `NAME.crt` and `NAME.key` (0600) into `out`.
    pub fn enroll(&self, name: &str, days: u32, out: &Path) -> Result<(PathBuf, PathBuf), CaError> {
        check_agent_id(name)?;
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
        create_dir(out)?;
        let (crt, keyf) = (
            out.join(format!("{name}.crt")),
            out.join(format!("{name}.key")),
        );
        if crt.exists() {
            return Err(CaError::Exists(crt));
        }
        let cert = self.issue(name, days, &key, &mut issued)?;
        write_new(&keyf, key.serialize_pem().as_bytes(), true)?;
        write_new(&crt, cert.pem().as_bytes(), false)?;
        self.save_issued(&issued)?;
        self.publish()?;
        Ok((crt, keyf))
    }

    /// The live (not revoked, not expired) certificates, the newest of each name.
    fn live(issued: &[Issued]) -> Vec<&Issued> {
        let now = jiff::Timestamp::now();
        let mut newest: std::collections::BTreeMap<&str, &Issued> = Default::default();
        for i in issued.iter().filter(|i| i.revoked_at.is_none()) {
            let ends = i.not_after.parse::<jiff::Timestamp>().ok();
            if ends.is_some_and(|e| e <= now) {
                continue;
            }
            let newer = newest
                .get(i.name.as_str())
                .is_none_or(|held| held.not_after.parse::<jiff::Timestamp>().ok() <= ends);
            if newer {
                newest.insert(&i.name, i);
            }
        }
        newest.into_values().collect()
    }

    /// Renews certificates for the keys they were issued to: the agents `names`, or (none named) every
    /// live certificate that ends within `within_days`. The new ones are valid for `days`; the bundle
    /// carries them to the Pis.
    pub fn renew(&self, names: &[String], within_days: u32, days: u32) -> Result<Written, CaError> {
        let mut issued = self.issued()?;
        let horizon =
            jiff::Timestamp::now() + jiff::SignedDuration::from_hours(i64::from(within_days) * 24);
        for n in names {
            if !Self::live(&issued).iter().any(|i| &i.name == n) {
                return Err(CaError::UnknownAgent(n.clone()));
            }
        }
        let due: Vec<Issued> = Self::live(&issued)
            .into_iter()
            .filter(|i| {
                if names.is_empty() {
                    i.not_after
                        .parse::<jiff::Timestamp>()
                        .is_ok_and(|e| e <= horizon)
                } else {
                    names.contains(&i.name)
                }
            })
            .cloned()
            .collect();
        let renewed = self.reissue(&due, days, &mut issued)?;
        self.save_issued(&issued)?;
        let mut written = self.publish()?;
        written.issued = renewed;
        Ok(written)
    }

    /// Issues each of `due` again under the current CA, for the same public key.
    fn reissue(
        &self,
        due: &[Issued],
        days: u32,
        issued: &mut Vec<Issued>,
    ) -> Result<Vec<String>, CaError> {
        let mut renewed = Vec::new();
        for old in due {
            let kept = self.kept_cert(&old.serial);
            let pem = std::fs::read(&kept).map_err(|_| CaError::NotKept {
                name: old.name.clone(),
            })?;
            let spki = public_key_of(&pem).map_err(|e| invalid(&kept, e))?;
            let key = rcgen::SubjectPublicKeyInfo::from_der(&spki)?;
            self.issue(&old.name, days, &key, issued)?;
            renewed.push(old.name.clone());
        }
        Ok(renewed)
    }

    /// Revokes every live certificate issued to `name` and rewrites the bundle. Returns how many.
    pub fn revoke(&self, name: &str) -> Result<(usize, Written), CaError> {
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
        Ok((n, self.publish()?))
    }

    /// Rotates the fleet CA: the current one moves to `previous/<serial>/`, a new one takes its place,
    /// cross-signed by the old one (agents trust it through that signature), and every live certificate
    /// is issued again under it for the same key. Agents that have not taken the bundle yet still
    /// accept the new certificates: they are presented with the cross-certificate.
    pub fn rotate_ca(&self, days: u32) -> Result<Written, CaError> {
        let mut rotations = self.rotations()?;
        if rotations.iter().any(|r| r.retired_at.is_none()) {
            return Err(CaError::Rotation(
                "the previous rotation is not finished: retire the old CA first (deckhand fleet retire-ca)"
                    .into(),
            ));
        }
        let old_serial = self.ca_serial()?;
        let old = self.issuer()?;
        let old_name =
            ca_name(&read(&self.cert_path())?).map_err(|e| invalid(&self.cert_path(), e))?;
        let base = old_name
            .rsplit_once(" #")
            .filter(|(_, n)| n.parse::<u32>().is_ok())
            .map_or(old_name.as_str(), |(b, _)| b);
        let name = format!("{base} #{}", rotations.len() + 2);
        let key = KeyPair::generate()?;
        let params = ca_params(&name)?;
        let cert = params.self_signed(&key)?;
        let cross = params.signed_by(&key, &old)?;
        let new_serial = hex::encode(
            params
                .serial_number
                .as_ref()
                .ok_or_else(|| CaError::Rotation("the new CA has no serial number".into()))?
                .as_ref(),
        );
        // The old CA is kept (its revocation list stays in the bundle until it is retired).
        let prev = self.previous_dir(&old_serial);
        create_dir(&prev)?;
        let mut issued = self.issued()?;
        for i in issued.iter_mut().filter(|i| i.issuer.is_none()) {
            i.issuer = Some(old_serial.clone());
        }
        std::fs::copy(self.key_path(), prev.join("ca.key"))
            .and_then(|_| std::fs::copy(self.cert_path(), prev.join("ca.crt")))
            .map_err(|source| CaError::Io {
                path: prev.clone(),
                source,
            })?;
        let cross_path = self.cross_path(&new_serial);
        create_dir(cross_path.parent().unwrap_or(&self.dir))?;
        write_new(&cross_path, cross.pem().as_bytes(), false)?;
        replace_private(&self.key_path(), key.serialize_pem().as_bytes())?;
        replace(&self.cert_path(), cert.pem().as_bytes())?;
        rotations.push(Rotation {
            previous: old_serial,
            next: new_serial,
            retired_at: None,
        });
        self.save_rotations(&rotations)?;
        let due: Vec<Issued> = Self::live(&issued).into_iter().cloned().collect();
        let renewed = self.reissue(&due, days, &mut issued)?;
        self.save_issued(&issued)?;
        let mut written = self.publish()?;
        written.issued = renewed;
        Ok(written)
    }

    /// Retires the CA the last rotation replaced: its serial goes into the new CA's revocation list,
    /// and agents that take the bundle stop trusting it (and every CA it alone introduced).
    pub fn retire_ca(&self) -> Result<Written, CaError> {
        let mut rotations = self.rotations()?;
        let Some(r) = rotations.iter_mut().rev().find(|r| r.retired_at.is_none()) else {
            return Err(CaError::Rotation(
                "no CA to retire: rotate first (deckhand fleet rotate-ca)".into(),
            ));
        };
        r.retired_at = Some(format_time(time::OffsetDateTime::now_utc()));
        self.save_rotations(&rotations)?;
        self.publish()
    }

    /// The next revocation list number: one counter for the directory, never below the time in
    /// seconds (so a directory restored from an old backup still numbers after what agents hold).
    fn next_number(&self) -> Result<u64, CaError> {
        let path = self.counter_path();
        let last = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|e| invalid(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(CaError::Io { path, source }),
        };
        let now = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
        let next = last.saturating_add(1).max(now);
        replace(&path, next.to_string().as_bytes())?;
        Ok(next)
    }

    /// Rewrites every CA's revocation list under a new number, and the bundle: the cross-certificates,
    /// every live certificate and the lists. `crl.pem` stays the current CA's list (`--fleet-crl`).
    pub fn publish(&self) -> Result<Written, CaError> {
        let issued = self.issued()?;
        let rotations = self.rotations()?;
        let number = self.next_number()?;
        let current = self.ca_serial()?;
        let first = rotations
            .first()
            .map_or(current.clone(), |r| r.previous.clone());
        let issuer_of = |i: &Issued| i.issuer.clone().unwrap_or_else(|| first.clone());
        let mut bundle = String::new();
        // Lists: the current CA's, listing its revoked certificates and every CA it retired; each
        // previous CA's, listing its own revoked certificates.
        let mut cas: Vec<(String, Issuer<'static, KeyPair>, Vec<String>)> = Vec::new();
        let retired: Vec<String> = rotations
            .iter()
            .filter(|r| r.retired_at.is_some())
            .map(|r| r.previous.clone())
            .collect();
        cas.push((current.clone(), self.issuer()?, retired));
        for r in &rotations {
            let prev = self.previous_dir(&r.previous);
            cas.push((
                r.previous.clone(),
                issuer_in(&prev.join("ca.key"), &prev.join("ca.crt"))?,
                Vec::new(),
            ));
        }
        for (serial, issuer, retired) in &cas {
            let mut revoked: Vec<String> = issued
                .iter()
                .filter(|i| i.revoked_at.is_some() && &issuer_of(i) == serial)
                .map(|i| i.serial.clone())
                .collect();
            // A CA retires its predecessor (only the one it succeeded, in this directory).
            revoked.extend(
                rotations
                    .iter()
                    .filter(|r| &r.next == serial && retired.contains(&r.previous))
                    .map(|r| r.previous.clone()),
            );
            let pem = self.crl(issuer, &revoked, number)?;
            if *serial == current {
                replace(&self.crl_path(), pem.as_bytes())?;
            }
            bundle.push_str(&pem);
        }
        for r in &rotations {
            bundle.push_str(&String::from_utf8_lossy(&read(&self.cross_path(&r.next))?));
        }
        for i in Self::live(&issued) {
            let pem = read(&self.kept_cert(&i.serial)).map_err(|_| CaError::NotKept {
                name: i.name.clone(),
            })?;
            bundle.push_str(&String::from_utf8_lossy(&pem));
        }
        replace(&self.bundle_path(), bundle.as_bytes())?;
        Ok(Written {
            bundle: self.bundle_path(),
            number,
            issued: Vec::new(),
        })
    }

    fn crl(
        &self,
        issuer: &Issuer<'static, KeyPair>,
        serials: &[String],
        number: u64,
    ) -> Result<String, CaError> {
        let now = time::OffsetDateTime::now_utc();
        let revoked = serials
            .iter()
            .map(|s| {
                let serial = hex::decode(s)
                    .map_err(|e| invalid(&self.issued_path(), format!("serial {s}: {e}")))?;
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
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(issuer)?.pem()?)
    }
}

/// A CA certificate's parameters (valid ten years, may issue agent certificates).
fn ca_params(name: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
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
    Ok(params)
}

fn issuer_in(key_path: &Path, cert_path: &Path) -> Result<Issuer<'static, KeyPair>, CaError> {
    let key_pem =
        String::from_utf8(read(key_path)?).map_err(|_| invalid(key_path, "not PEM text"))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key_path, e))?;
    let cert_pem =
        String::from_utf8(read(cert_path)?).map_err(|_| invalid(cert_path, "not PEM text"))?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid(cert_path, e))
}

/// Reads a PEM certificate and applies `f` to it.
fn with_cert<T>(
    pem: &[u8],
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> Result<T, String>,
) -> Result<T, String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
    let cert = p.parse_x509().map_err(|e| e.to_string())?;
    f(&cert)
}

/// The subject public key info (DER) of a PEM certificate.
fn public_key_of(pem: &[u8]) -> Result<Vec<u8>, String> {
    with_cert(pem, |c| Ok(c.public_key().raw.to_vec()))
}

/// The serial number (hex) of a PEM certificate.
fn serial_of(pem: &[u8]) -> Result<String, String> {
    with_cert(pem, |c| Ok(hex::encode(c.raw_serial())))
}

/// The common name of a PEM certificate.
fn ca_name(pem: &[u8]) -> Result<String, String> {
    with_cert(pem, |c| {
        c.subject()
            .iter_common_name()
            .next()
            .and_then(|n| n.as_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| "no common name".into())
    })
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Replaces a private file atomically, created 0600.
fn replace_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
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
        assert_eq!(ca.revoke("pi-1").unwrap().0, 1);
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

    fn bundle(ca: &CaDir) -> deckhand_agent::peer::anchors::Bundle {
        deckhand_agent::peer::anchors::Bundle::parse(&std::fs::read(ca.bundle_path()).unwrap())
            .unwrap()
    }

    fn chain(creds: &FleetCredentials) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        creds.presented().to_vec()
    }

    #[test]
    fn a_renewal_keeps_the_key_and_reaches_the_agent_through_the_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path().join("ca"));
        ca.init("shop").unwrap();
        let out = tmp.path().join("out");
        ca.enroll("pi-1", 20, &out).unwrap();
        ca.enroll("pi-2", 200, &out).unwrap();
        let installed = FleetCredentials::load(&paths(&ca, &out, "pi-1", false)).unwrap();
        let (before, _) = installed.not_after();
        // Only what ends within 30 days is renewed; names must be live.
        let written = ca.renew(&[], 30, 365).unwrap();
        assert_eq!(written.issued, vec!["pi-1".to_owned()]);
        assert!(matches!(
            ca.renew(&["pi-9".into()], 30, 365),
            Err(CaError::UnknownAgent(_))
        ));
        let renewed = installed.take(bundle(&ca)).unwrap().expect("newer");
        assert_eq!(renewed.number(), Some(written.number));
        let (after, _) = renewed.not_after();
        assert!(after.unwrap() > before.unwrap() + jiff::SignedDuration::from_hours(300 * 24));
        renewed.check().unwrap();
        // The same bundle again, or an older one, changes nothing.
        assert!(renewed.take(bundle(&ca)).unwrap().is_none());
        // A bundle of another CA is refused with why.
        let other = CaDir::new(tmp.path().join("other"));
        other.init("other").unwrap();
        let err = renewed.take(bundle(&other)).unwrap_err();
        assert!(
            err.to_string().contains("not signed by a fleet CA"),
            "{err}"
        );
        // Revoked through the bundle: pi-2's certificate no longer checks for pi-1.
        let pi2 = FleetCredentials::load(&paths(&ca, &out, "pi-2", false)).unwrap();
        assert!(renewed.verifies_peer(&chain(&pi2)));
        let (_, written) = ca.revoke("pi-2").unwrap();
        let revoked = renewed.take(bundle(&ca)).unwrap().expect("newer");
        assert_eq!(revoked.number(), Some(written.number));
        assert!(!revoked.verifies_peer(&chain(&pi2)));
        assert!(revoked.verifies_peer(&chain(&revoked)));
    }

    #[test]
    fn a_ca_rotation_moves_every_agent_and_retiring_the_old_ca_refuses_its_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path().join("ca"));
        ca.init("shop").unwrap();
        let out = tmp.path().join("out");
        ca.enroll("pi-1", 365, &out).unwrap();
        ca.enroll("pi-2", 365, &out).unwrap();
        let pi1 = FleetCredentials::load(&paths(&ca, &out, "pi-1", false)).unwrap();
        let pi2 = FleetCredentials::load(&paths(&ca, &out, "pi-2", false)).unwrap();
        let old_ca = std::fs::read(ca.cert_path()).unwrap();
        let written = ca.rotate_ca(365).unwrap();
        assert_eq!(written.issued.len(), 2);
        assert!(matches!(ca.rotate_ca(365), Err(CaError::Rotation(_))));
        assert_ne!(std::fs::read(ca.cert_path()).unwrap(), old_ca);
        let moved = pi1.take(bundle(&ca)).unwrap().expect("newer");
        moved.check().unwrap();
        let (cas, retired) = moved.anchors();
        assert_eq!(cas.len(), 2, "{cas:?}");
        assert!(cas[1].ends_with("#2"), "{cas:?}");
        assert!(retired.is_empty());
        // The renewed certificate is presented with the cross-certificate: pi-2, which has not taken
        // the bundle, accepts it; pi-1 still accepts pi-2's old certificate.
        assert_eq!(chain(&moved).len(), 2);
        assert!(pi2.verifies_peer(&chain(&moved)));
        assert!(moved.verifies_peer(&chain(&pi2)));
        // Retired: the old CA is dropped, and with it certificates it issued.
        ca.retire_ca().unwrap();
        assert!(matches!(ca.retire_ca(), Err(CaError::Rotation(_))));
        let retired_old = moved.take(bundle(&ca)).unwrap().expect("newer");
        let (cas, retired) = retired_old.anchors();
        assert_eq!((cas.len(), retired.len()), (1, 1), "{cas:?} {retired:?}");
        retired_old.check().unwrap();
        assert!(!retired_old.verifies_peer(&chain(&pi2)));
        // pi-2 takes the same bundle late, from a peer or the bucket: renewed under the new CA.
        let pi2_moved = pi2.take(bundle(&ca)).unwrap().expect("newer");
        pi2_moved.check().unwrap();
        assert!(retired_old.verifies_peer(&chain(&pi2_moved)));
        // A CA cross-signed with the old key by someone else is not trusted after the retirement.
        let prev = std::fs::read_dir(tmp.path().join("ca/previous"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let old = issuer_in(&prev.join("ca.key"), &prev.join("ca.crt")).unwrap();
        let thief_key = KeyPair::generate().unwrap();
        let thief = ca_params("thief CA")
            .unwrap()
            .signed_by(&thief_key, &old)
            .unwrap();
        let mut bytes = std::fs::read(ca.bundle_path()).unwrap();
        bytes.extend_from_slice(thief.pem().as_bytes());
        let with_thief = pi2
            .take(deckhand_agent::peer::anchors::Bundle::parse(&bytes).unwrap())
            .unwrap()
            .expect("newer");
        let (cas, retired) = with_thief.anchors();
        assert!(!cas.iter().any(|c| c == "thief CA"), "{cas:?}");
        assert!(retired.iter().any(|c| c == "thief CA"), "{retired:?}");
    }
}
