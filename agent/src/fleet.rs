//! Fleet membership: a private certificate authority, one certificate per agent, mutual TLS between peers.
//!
//! * `deckhand fleet init` makes the fleet CA (`ca.crt`, `ca.key`; the key stays with the operator).
//! * `deckhand fleet enroll --name pi-3` issues `pi-3.crt`/`pi-3.key`, copied to the Pi with `ca.crt`. The
//!   certificate's common name is the agent id: peers learn who they talk to from the handshake, never
//!   from what a peer claims about itself.
//! * `deckhand fleet revoke --name pi-3` adds the certificate's serial to the CA's certificate revocation
//!   list (`crl.pem`); agents given that file (`--fleet-crl`) refuse the certificate, as client and as
//!   server. Certificates also expire (365 days by default), so a lost Pi drops out on its own.
//!
//! Both sides of every QUIC connection present a certificate chained to the CA (TLS 1.3, ALPN
//! `deckhand/1`); a device without one is refused during the handshake, before any request is read.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The name every agent certificate carries, and the name clients ask for: any fleet member may serve.
pub const PEER_NAME: &str = "peer.deckhand";
/// The longest agent id.
pub const MAX_AGENT_ID: usize = 63;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error(
        "agent id {0:?} is invalid: use 1 to 63 lowercase letters, digits and '-', starting with a letter or digit"
    )]
    AgentId(String),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("no certificate named {0:?} was issued by this CA")]
    UnknownAgent(String),
}

/// Checks an agent id (a certificate's common name).
pub fn check_agent_id(id: &str) -> Result<(), FleetError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_AGENT_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(FleetError::AgentId(id.to_owned()))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|source| FleetError::Io {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> FleetError {
    FleetError::Invalid {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

fn write_new(path: &Path, data: &[u8], private: bool) -> Result<(), FleetError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| FleetError::Io {
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
                FleetError::Exists(path.to_owned())
            } else {
                io(e)
            }
        })?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Replaces a file atomically (write beside it, sync, rename).
fn replace(path: &Path, data: &[u8]) -> Result<(), FleetError> {
    let io = |source| FleetError::Io {
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
    pub fn init(&self, fleet: &str) -> Result<(), FleetError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| FleetError::Io {
            path: self.dir.clone(),
            source,
        })?;
        if self.key_path().exists() {
            return Err(FleetError::Exists(self.key_path()));
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
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        write_new(&self.key_path(), key.serialize_pem().as_bytes(), true)?;
        write_new(&self.cert_path(), cert.pem().as_bytes(), false)?;
        self.save_issued(&[])?;
        self.write_crl(&[])
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, FleetError> {
        let key_pem = String::from_utf8(read(&self.key_path())?)
            .map_err(|_| invalid(&self.key_path(), "not PEM text"))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&self.key_path(), e))?;
        let cert_pem = String::from_utf8(read(&self.cert_path())?)
            .map_err(|_| invalid(&self.cert_path(), "not PEM text"))?;
        Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid(&self.cert_path(), e))
    }

    pub fn issued(&self) -> Result<Vec<Issued>, FleetError> {
        let path = self.issued_path();
        serde_json::from_slice(&read(&path)?).map_err(|e| invalid(&path, e))
    }

    fn save_issued(&self, issued: &[Issued]) -> Result<(), FleetError> {
        let json = serde_json::to_vec_pretty(issued).map_err(|e| FleetError::Tls(e.to_string()))?;
        replace(&self.issued_path(), &json)
    }

    /// Issues an agent certificate: writes `NAME.crt` and `NAME.key` (0600) into `out`.
    pub fn enroll(
        &self,
        name: &str,
        days: u32,
        out: &Path,
    ) -> Result<(PathBuf, PathBuf), FleetError> {
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
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::create_dir_all(out).map_err(|source| FleetError::Io {
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
    pub fn revoke(&self, name: &str) -> Result<usize, FleetError> {
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
            return Err(FleetError::UnknownAgent(name.to_owned()));
        }
        self.save_issued(&issued)?;
        self.write_crl(&issued)?;
        Ok(n)
    }

    fn write_crl(&self, issued: &[Issued]) -> Result<(), FleetError> {
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
            .collect::<Result<Vec<_>, FleetError>>()?;
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

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and never shortened
    SerialNumber::from_slice(&b)
}

fn format_time(t: time::OffsetDateTime) -> String {
    jiff::Timestamp::from_second(t.unix_timestamp())
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// An agent's fleet credentials, loaded and checked at start-up.
#[derive(Clone)]
pub struct FleetCredentials {
    pub agent_id: String,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl std::fmt::Debug for FleetCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCredentials")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

/// Paths of an agent's fleet credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: Option<PathBuf>,
}

impl FleetCredentials {
    pub fn load(p: &CredentialPaths) -> Result<Self, FleetError> {
        let ca = CertificateDer::from_pem_slice(&read(&p.ca)?)
            .map_err(|e| invalid(&p.ca, format!("not a PEM certificate: {e}")))?;
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&read(&p.cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(&p.cert, format!("not a PEM certificate: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(&p.cert, "holds no certificate"));
        };
        let key = PrivateKeyDer::from_pem_slice(&read(&p.key)?)
            .map_err(|e| invalid(&p.key, format!("not a PEM private key: {e}")))?;
        let crls = match &p.crl {
            Some(path) => CertificateRevocationListDer::pem_slice_iter(&read(path)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(path, format!("not a PEM CRL: {e}")))?,
            None => Vec::new(),
        };
        let agent_id = common_name(leaf).ok_or_else(|| invalid(&p.cert, "no common name"))?;
        check_agent_id(&agent_id).map_err(|e| invalid(&p.cert, e))?;
        let creds = FleetCredentials {
            agent_id,
            ca,
            chain,
            key: Arc::new(key),
            crls,
        };
        // Catch a certificate from another CA, a key that does not match, or a revoked certificate
        // now, not at the first handshake.
        creds.check_own(p)?;
        Ok(creds)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, FleetError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| FleetError::Tls(format!("fleet CA: {e}")))?;
        Ok(Arc::new(roots))
    }

    fn check_own(&self, p: &CredentialPaths) -> Result<(), FleetError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            Self::provider(),
        )
        .with_crls(self.crls.clone())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| FleetError::Tls(e.to_string()))?;
        let (leaf, rest) = self
            .chain
            .split_first()
            .ok_or_else(|| invalid(&p.cert, "holds no certificate"))?;
        verifier
            .verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now())
            .map_err(|e| invalid(&p.cert, format!("not valid under {}: {e}", p.ca.display())))?;
        // The key must match the certificate: building a server config checks it.
        self.tls_server()?;
        Ok(())
    }

    fn tls_server(&self) -> Result<rustls::ServerConfig, FleetError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            Self::provider(),
        )
        .with_crls(self.crls.clone())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| FleetError::Tls(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| FleetError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| FleetError::Tls(format!("certificate and key do not match: {e}")))?;
        cfg.alpn_protocols = vec![deckhand_protocol::wire::ALPN.to_vec()];
        Ok(cfg)
    }

    /// The QUIC server side: mutual TLS against the fleet CA.
    pub fn server_config(&self, max_streams: u32) -> Result<quinn::ServerConfig, FleetError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(self.tls_server()?)
            .map_err(|e| FleetError::Tls(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport(max_streams));
        Ok(cfg)
    }

    /// The QUIC client side: the server must hold a fleet certificate; this agent presents its own.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, FleetError> {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots()?,
            Self::provider(),
        )
        .with_crls(self.crls.clone())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| FleetError::Tls(e.to_string()))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| FleetError::Tls(e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| FleetError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![deckhand_protocol::wire::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| FleetError::Tls(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport(8));
        Ok(cfg)
    }
}

fn transport(max_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_streams.into());
    t.max_concurrent_uni_streams(0u8.into());
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(20)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// The common name of a DER certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    x509.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// The agent id a QUIC connection's peer proved in the handshake.
pub fn peer_id(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let id = common_name(certs.first()?)?;
    check_agent_id(&id).ok()?;
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(ca.init("shop"), Err(FleetError::Exists(_))));
        let out = tmp.path().join("out");
        ca.enroll("pi-1", 30, &out).unwrap();
        let creds = FleetCredentials::load(&paths(&ca, &out, "pi-1", true)).unwrap();
        assert_eq!(creds.agent_id, "pi-1");
        creds.server_config(8).unwrap();
        creds.client_config().unwrap();
        // Revoked: the agent's own check refuses it at load.
        assert_eq!(ca.revoke("pi-1").unwrap(), 1);
        let err = FleetCredentials::load(&paths(&ca, &out, "pi-1", true)).unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
        assert!(matches!(
            ca.revoke("pi-9"),
            Err(FleetError::UnknownAgent(_))
        ));
        assert!(matches!(
            ca.enroll("Pi_1", 30, &out),
            Err(FleetError::AgentId(_))
        ));
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
        let err = FleetCredentials::load(&p).unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
        // A key that is not the certificate's.
        a.enroll("pi-3", 30, &out).unwrap();
        p = paths(&a, &out, "pi-3", false);
        p.key = out.join("pi-2.key");
        let err = FleetCredentials::load(&p).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
    }
}
