//! An agent's fleet credentials and the mutual TLS between peers. (The operator's side, the CA that
//! issues and revokes certificates, is `deckhand fleet` in the tools crate.)
//!
//! The certificate's common name is the agent id: peers learn who they talk to from the handshake, never
//! from what a peer claims about itself. Agents given the CA's revocation list (`--fleet-crl`) refuse a
//! revoked certificate, as client and as server. Certificates also expire, so a lost Pi drops out on its
//! own.
//!
//! Certificate dates are judged at the agent's trusted now ([`TrustedClock`]: the later of the system
//! clock, the store's time floor and [`EPOCH`]), never at a clock that booted at 1970. Credentials that
//! do not check (expired, revoked, from another CA) never stop the agent: it serves from its store and
//! status says why it is not a fleet member ([`FleetCredentials::check`]).
//!
//! Both sides of every QUIC connection present a certificate chained to the CA (TLS 1.3, ALPN
//! `deckhand/1`); a device without one is refused during the handshake, before any request is read.

use deckhand_protocol::wire::check_agent_id;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// No clock this code runs under reads earlier than the day it was written (2026-11-01), as systemd
/// takes its build time as the earliest time: a Pi that boots at 1970 with an empty store still judges
/// certificates at a time they can be valid at.
pub const EPOCH: jiff::Timestamp = jiff::Timestamp::constant(1_793_491_200, 0);

/// How long a time floor read from the store is used before it is read again.
const FLOOR_FRESH: Duration = Duration::from_secs(10);

/// Reads the durable time floor (the store's ledger); `None` when there is none (or it cannot be read).
pub type FloorFn = Box<dyn Fn() -> Option<jiff::Timestamp> + Send + Sync>;

/// The time certificate checks are made at: the later of the system clock, the time floor (the newest
/// `created_at` the agent verified, see `protocol::clock`), the start of this agent's own certificate
/// (the CA signed it then, so real time is at least that) and [`EPOCH`]. rustls asks it at every
/// handshake. A Pi booting at 1970 with a store judges at its floor; one with an empty store at its
/// certificate's start, so peers enrolled before it are valid to it.
pub struct TrustedClock {
    read_floor: Option<FloorFn>,
    least: jiff::Timestamp,
    cached: Mutex<Option<(Instant, Option<jiff::Timestamp>)>>,
}

impl std::fmt::Debug for TrustedClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedClock")
            .field("least", &self.least)
            .finish_non_exhaustive()
    }
}

impl TrustedClock {
    /// The system clock, never before [`EPOCH`].
    pub fn system() -> Arc<Self> {
        Self::new(None, EPOCH)
    }

    /// The system clock, never before `least`, raised to the floor `read_floor` returns (read at most
    /// every 10 s).
    pub fn new(read_floor: Option<FloorFn>, least: jiff::Timestamp) -> Arc<Self> {
        Arc::new(Self {
            read_floor,
            least: least.max(EPOCH),
            cached: Mutex::new(None),
        })
    }

    fn floor(&self) -> Option<jiff::Timestamp> {
        let read = self.read_floor.as_ref()?;
        let mut cached = crate::locks::lock(&self.cached, "the trusted clock's floor");
        match *cached {
            Some((at, floor)) if at.elapsed() < FLOOR_FRESH => floor,
            _ => {
                let floor = read();
                *cached = Some((Instant::now(), floor));
                floor
            }
        }
    }

    pub fn now(&self) -> jiff::Timestamp {
        let system = jiff::Timestamp::now().max(self.least);
        deckhand_protocol::clock::trusted_now(system, self.floor())
    }
}

impl rustls::time_provider::TimeProvider for TrustedClock {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        let secs = u64::try_from(self.now().as_second()).ok()?;
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            Duration::from_secs(secs),
        ))
    }
}

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
    #[error("tls: {0}")]
    Tls(String),
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

/// An agent's fleet credentials, loaded at start-up.
#[derive(Clone)]
pub struct FleetCredentials {
    pub agent_id: String,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    clock: Arc<TrustedClock>,
    cert_path: PathBuf,
    ca_path: PathBuf,
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
    /// Reads the credentials and checks what no date changes: the files parse, the certificate names a
    /// valid agent id and the key matches it. Whether the certificate is valid under the CA now is
    /// [`check`](Self::check)'s question, asked again whenever status is read.
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
            clock: TrustedClock::system(),
            cert_path: p.cert.clone(),
            ca_path: p.ca.clone(),
        };
        // A key that does not match the certificate: building a server config checks it.
        creds.tls_server()?;
        Ok(creds.with_floor(None))
    }

    /// Judges certificates at the trusted clock: never before this agent's own certificate's start,
    /// raised to the floor `read_floor` returns.
    pub fn with_floor(mut self, read_floor: Option<FloorFn>) -> Self {
        let least = self.chain.first().and_then(not_before).unwrap_or(EPOCH);
        self.clock = TrustedClock::new(read_floor, least);
        self
    }

    /// Whether this agent's certificate is valid under the fleet CA at the trusted now: chained to it,
    /// within its dates, not revoked. Peers judge it the same way; an error names the problem.
    pub fn check(&self) -> Result<(), FleetError> {
        let verifier = self.client_verifier()?;
        let (leaf, rest) = self
            .chain
            .split_first()
            .ok_or_else(|| invalid(&self.cert_path, "holds no certificate"))?;
        let now = rustls::time_provider::TimeProvider::current_time(self.clock.as_ref())
            .unwrap_or_else(rustls::pki_types::UnixTime::now);
        verifier
            .verify_client_cert(leaf, rest, now)
            .map(|_| ())
            .map_err(|e| {
                invalid(
                    &self.cert_path,
                    format!("not valid under {}: {e}", self.ca_path.display()),
                )
            })
    }

    /// When this agent's certificate and the fleet CA's stop being valid.
    pub fn not_after(&self) -> (Option<jiff::Timestamp>, Option<jiff::Timestamp>) {
        (self.chain.first().and_then(not_after), not_after(&self.ca))
    }

    /// The trusted now certificates are judged at.
    pub fn now(&self) -> jiff::Timestamp {
        self.clock.now()
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

    /// How this agent checks a peer's certificate, as a server: chained to the fleet CA, not revoked.
    fn client_verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, FleetError> {
        rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .with_crls(self.crls.clone())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| FleetError::Tls(e.to_string()))
    }

    fn tls_server(&self) -> Result<rustls::ServerConfig, FleetError> {
        let verifier = self.client_verifier()?;
        let mut cfg =
            rustls::ServerConfig::builder_with_details(Self::provider(), self.clock.clone())
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
        let mut tls =
            rustls::ClientConfig::builder_with_details(Self::provider(), self.clock.clone())
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

/// When a DER certificate starts being valid.
fn not_before(cert: &CertificateDer<'_>) -> Option<jiff::Timestamp> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    jiff::Timestamp::from_second(x509.validity().not_before.timestamp()).ok()
}

/// When a DER certificate stops being valid.
fn not_after(cert: &CertificateDer<'_>) -> Option<jiff::Timestamp> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    jiff::Timestamp::from_second(x509.validity().not_after.timestamp()).ok()
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
