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

use super::anchors::{self, Bundle, Resolved};
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
    #[error("fleet bundle: {0}")]
    Bundle(String),
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

/// An agent's fleet credentials: what was installed with it (`--fleet-*`) and what the newest fleet
/// bundle it holds adds ([`super::anchors`]): renewed certificates, CAs a rotation introduced,
/// revocation lists. Immutable; a bundle taken makes new credentials ([`take`](Self::take)).
#[derive(Clone)]
pub struct FleetCredentials {
    pub agent_id: String,
    /// The installed CA.
    ca: CertificateDer<'static>,
    /// The installed certificate chain.
    installed: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The installed revocation lists.
    crls: Vec<CertificateRevocationListDer<'static>>,
    bundle: Option<Bundle>,
    /// The anchors and lists in force, from the installed ones and the bundle.
    resolved: Arc<Resolved>,
    /// The chain this agent presents: the installed one, or the newest renewal that checks.
    chain: Vec<CertificateDer<'static>>,
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
            installed: chain.clone(),
            chain,
            key: Arc::new(key),
            crls,
            bundle: None,
            resolved: Arc::default(),
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
        let least = self.installed.first().and_then(not_before).unwrap_or(EPOCH);
        self.clock = TrustedClock::new(read_floor, least);
        self.resolve()
    }

    /// The same credentials with `bundle` (in place of any bundle held), resolved at the trusted now.
    pub fn with_bundle(mut self, bundle: Option<Bundle>) -> Self {
        self.bundle = bundle;
        self.resolve()
    }

    /// Takes `bundle` if it is newer than the one held (a higher revocation list number under an
    /// anchor this agent trusts): the credentials to use from now on. `Ok(None)`: not newer, nothing
    /// changes. An error names why nothing in it could be trusted.
    pub fn take(&self, bundle: Bundle) -> Result<Option<Self>, FleetError> {
        let next = self.clone().with_bundle(Some(bundle));
        match next.resolved.number {
            None => Err(FleetError::Bundle(
                next.resolved.refused.first().cloned().unwrap_or_else(|| {
                    "no revocation list signed by a fleet CA this agent trusts".into()
                }),
            )),
            Some(n) if Some(n) > self.resolved.number => Ok(Some(next)),
            Some(_) => Ok(None),
        }
    }

    /// The chain this agent presents in its handshakes.
    pub fn presented(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The number of the fleet bundle in force (its highest revocation list number).
    pub fn number(&self) -> Option<u64> {
        self.resolved.number
    }

    /// The bundle held, as received (relayed to peers that ask).
    pub fn bundle(&self) -> Option<&Bundle> {
        self.bundle.as_ref()
    }

    /// The fleet CAs trusted (names), and those retired.
    pub fn anchors(&self) -> (Vec<String>, Vec<String>) {
        (
            self.resolved
                .anchors
                .iter()
                .map(|a| a.name.clone())
                .collect(),
            self.resolved.retired.clone(),
        )
    }

    /// What status shows of the fleet's trust.
    pub fn trust(&self) -> deckhand_protocol::status::FleetTrust {
        let (cas, retired_cas) = self.anchors();
        deckhand_protocol::status::FleetTrust {
            bundle: self.number(),
            cas,
            retired_cas,
            certificate_serial: self.chain.first().and_then(|c| {
                let (_, x) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
                Some(hex::encode(x.raw_serial()))
            }),
        }
    }

    /// Works out the anchors and lists in force and the chain to present.
    fn resolve(mut self) -> Self {
        let now = self.clock.now().as_second();
        let resolved = anchors::resolve(&self.ca, &self.crls, self.bundle.as_ref(), now);
        for why in &resolved.refused {
            tracing::warn!(cause = %why, "part of the fleet bundle was refused");
        }
        self.resolved = Arc::new(resolved);
        self.chain = self.best_chain();
        self
    }

    /// The installed chain, or a renewed certificate for this agent's key from the bundle: the one
    /// that checks now with the latest end (with the cross-certificate of its CA when a rotation
    /// introduced that CA). When none checks, the installed chain (its check says why).
    fn best_chain(&self) -> Vec<CertificateDer<'static>> {
        let Some(spki) = self.installed.first().and_then(public_key) else {
            return self.installed.clone();
        };
        let mut candidates = vec![self.installed.clone()];
        for cert in self.bundle.iter().flat_map(|b| b.certs.iter()) {
            let ours = common_name(cert).as_deref() == Some(self.agent_id.as_str())
                && public_key(cert).as_ref() == Some(&spki);
            if !ours {
                continue;
            }
            let mut chain = vec![cert.clone()];
            if let Some(anchor) = self.resolved.issuer_of(cert).filter(|a| !a.installed) {
                chain.push(anchor.cert.clone());
            }
            candidates.push(chain);
        }
        let Ok(verifier) = self.client_verifier() else {
            return self.installed.clone();
        };
        let now = self.unix_now();
        candidates
            .into_iter()
            .filter(|c| {
                c.split_first().is_some_and(|(leaf, rest)| {
                    verifier.verify_client_cert(leaf, rest, now).is_ok()
                })
            })
            .max_by_key(|c| c.first().and_then(not_after))
            .unwrap_or_else(|| self.installed.clone())
    }

    fn unix_now(&self) -> rustls::pki_types::UnixTime {
        rustls::time_provider::TimeProvider::current_time(self.clock.as_ref())
            .unwrap_or_else(rustls::pki_types::UnixTime::now)
    }

    /// Whether a peer's certificate chain (as its handshake presented it) still checks: chained to a
    /// live anchor, within its dates at the trusted now, not revoked. Connections whose peer no longer
    /// checks are closed when new credentials are taken.
    pub fn verifies_peer(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Ok(verifier) = self.client_verifier() else {
            return false;
        };
        chain.split_first().is_some_and(|(leaf, rest)| {
            verifier
                .verify_client_cert(leaf, rest, self.unix_now())
                .is_ok()
        })
    }

    /// Whether this agent's certificate is valid under the fleet CA at the trusted now: chained to it,
    /// within its dates, not revoked. Peers judge it the same way; an error names the problem.
    pub fn check(&self) -> Result<(), FleetError> {
        let verifier = self.client_verifier()?;
        let (leaf, rest) = self
            .chain
            .split_first()
            .ok_or_else(|| invalid(&self.cert_path, "holds no certificate"))?;
        let now = self.unix_now();
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

    /// When this agent's certificate and the fleet CA that issued it stop being valid.
    pub fn not_after(&self) -> (Option<jiff::Timestamp>, Option<jiff::Timestamp>) {
        let leaf = self.chain.first();
        let ca = leaf
            .and_then(|l| self.resolved.issuer_of(l))
            .and_then(|a| a.not_after)
            .or_else(|| not_after(&self.ca));
        (leaf.and_then(not_after), ca)
    }

    /// The trusted now certificates are judged at.
    pub fn now(&self) -> jiff::Timestamp {
        self.clock.now()
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// The live anchors (the installed CA until a bundle says otherwise).
    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, FleetError> {
        let mut roots = rustls::RootCertStore::empty();
        if self.resolved.anchors.is_empty() && self.resolved.retired.is_empty() {
            roots
                .add(self.ca.clone())
                .map_err(|e| FleetError::Tls(format!("fleet CA: {e}")))?;
        }
        for a in &self.resolved.anchors {
            roots
                .add(a.cert.clone())
                .map_err(|e| FleetError::Tls(format!("fleet CA {}: {e}", a.name)))?;
        }
        if roots.is_empty() {
            return Err(FleetError::Tls(
                "every fleet CA this agent knew is retired".into(),
            ));
        }
        Ok(Arc::new(roots))
    }

    /// The revocation lists in force.
    fn lists(&self) -> Vec<CertificateRevocationListDer<'static>> {
        if self.resolved.anchors.is_empty() {
            self.crls.clone()
        } else {
            self.resolved.crls.clone()
        }
    }

    /// How this agent checks a peer's certificate, as a server: chained to the fleet CA, not revoked.
    fn client_verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, FleetError> {
        rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .with_crls(self.lists())
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
        .with_crls(self.lists())
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

/// A DER certificate's subject public key info.
fn public_key(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(x509.public_key().raw.to_vec())
}

/// When a DER certificate starts being valid.
fn not_before(cert: &CertificateDer<'_>) -> Option<jiff::Timestamp> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    jiff::Timestamp::from_second(x509.validity().not_before.timestamp()).ok()
}

/// When a DER certificate stops being valid.
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Option<jiff::Timestamp> {
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
