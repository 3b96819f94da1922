//! LAN peers over QUIC: serving chunks, bitmaps and manifests to fleet members, asking them for the same,
//! and keeping a table of who is live and what they hold.
//!
//! One request per bidirectional stream: the client writes one frame and finishes its side; the server
//! answers with one frame (`protocol::wire`). Limits, so serving never starves recognition:
//! * each connection carries at most [`PeerConfig::streams_per_peer`] concurrent streams (QUIC flow
//!   control enforces it), and the whole agent serves at most [`MAX_SERVING`] chunks at once (more get
//!   `Busy`);
//! * chunk bytes served pass through a token bucket ([`PeerConfig::serve_bytes_per_sec`]);
//! * every read and write has a timeout; a stalled peer is set aside for a while.
//!
//! Peers prove who they are in the TLS handshake (`fleet`); a `Hello` whose agent id differs from the
//! certificate's is refused. A peer that sends a chunk that does not hash to its id is banned for
//! [`BAN`]: nothing more is asked of it, and what it asks is refused.

pub mod discovery;
pub mod tls;

use crate::metrics::Metrics;
use crate::peer::tls::{FleetCredentials, FleetError, peer_id};
use deckhand_protocol::BlobId;
use deckhand_protocol::status::PeerInfo;
use deckhand_protocol::wire::PEER_NAME;
use deckhand_protocol::wire::{
    self, Hello, MAX_REQUEST, MAX_RESPONSE, ReleaseRef, Request, Response, WireError,
};
use deckhand_store::Store;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::Instrument as _;

/// How long a peer that sent a bad chunk is banned.
pub const BAN: Duration = Duration::from_secs(600);
/// How long a stalled or failing peer is set aside.
pub const SET_ASIDE: Duration = Duration::from_secs(15);
/// Chunks served at once, across all peers.
pub const MAX_SERVING: usize = 16;
/// Peers tracked at most (addresses beyond this are ignored).
pub const MAX_PEERS: usize = 256;
/// How long a chunk request waits for a serving slot before it is answered Busy.
const BUSY_AFTER: Duration = Duration::from_secs(2);
/// Incoming connections served at once; one more is refused at the QUIC handshake.
pub const MAX_INCOMING: usize = 64;
/// A peer is live if it answered a Hello this recently.
pub const LIVE: Duration = Duration::from_secs(8);
const GOSSIP: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a chunk request may take (a chunk is at most a few hundred KiB on a LAN).
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
const READ_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {0} is not connected")]
    NotConnected(String),
    #[error("peer {peer}: {what} timed out after {after:?}")]
    Timeout {
        peer: String,
        what: &'static str,
        after: Duration,
    },
    #[error("peer {peer}: connection: {why}")]
    Connection { peer: String, why: String },
    #[error("peer {peer}: bad message: {source}")]
    Wire {
        peer: String,
        #[source]
        source: WireError,
    },
    #[error("peer {peer} answered {what} with an unexpected message")]
    Unexpected { peer: String, what: &'static str },
    #[error("peer {peer} is busy")]
    Busy { peer: String },
    #[error("peer {peer} does not have it")]
    NotFound { peer: String },
    #[error("peer {peer} reported an error: {message}")]
    Remote { peer: String, message: String },
    #[error("peer {peer} sent a chunk that does not hash to {expected}; banned")]
    BadChunk { peer: String, expected: BlobId },
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("cannot listen on {addr}: {why}")]
    Listen { addr: SocketAddr, why: String },
}

/// What this agent says about itself.
#[derive(Clone, Debug, Default)]
pub struct LocalState {
    pub active: Option<ReleaseRef>,
    pub pending: Option<ReleaseRef>,
    /// The newest accepted, verified envelope: relayed to peers that ask.
    pub envelope: Option<Vec<u8>>,
    /// Whether this agent can fetch from the origin now.
    pub origin: bool,
    /// The release this agent holds ready, waiting to switch together with the shop.
    pub ready: Option<ReleaseRef>,
}

impl LocalState {
    fn newest(&self) -> u64 {
        [self.active, self.pending]
            .iter()
            .flatten()
            .map(|r| r.version)
            .max()
            .unwrap_or(0)
    }
}

/// A peer announced chunks it verified and stored (a pushed HAVE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaveNote {
    pub peer: String,
    pub blob: BlobId,
    pub chunks: Vec<u32>,
}

/// HAVE announcements waiting for the engine; when it falls behind, later ones are dropped (the
/// engine's periodic bitmap refresh covers what they said).
const HAVE_QUEUE: usize = 512;
/// How long a pushed HAVE may take.
const HAVE_TIMEOUT: Duration = Duration::from_secs(2);

impl PeerError {
    /// How the download state machine treats this failure of a chunk request.
    /// The peer sent a frame over the limit for its kind: never what an honest peer sends (a message of
    /// a newer version that this one cannot read is a decoding error, not this).
    pub fn is_oversized_frame(&self) -> bool {
        matches!(
            self,
            PeerError::Wire {
                source: deckhand_protocol::wire::WireError::FrameTooLarge { .. },
                ..
            }
        )
    }

    pub fn failure(&self) -> deckhand_protocol::fetch::PeerFailure {
        use deckhand_protocol::fetch::PeerFailure;
        match self {
            PeerError::Timeout { .. } => PeerFailure::Timeout,
            PeerError::Busy { .. } => PeerFailure::Busy,
            PeerError::NotFound { .. } => PeerFailure::NotFound,
            PeerError::BadChunk { .. } => PeerFailure::Corrupt,
            e if e.is_oversized_frame() => PeerFailure::Corrupt,
            _ => PeerFailure::Other,
        }
    }
}

/// A peer announced a release newer than any this agent holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    pub peer: String,
    pub version: u64,
}

#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub creds: FleetCredentials,
    pub deployment: String,
    pub listen: SocketAddr,
    /// Addresses to dial (host:port), besides what discovery finds.
    pub static_peers: Vec<String>,
    pub streams_per_peer: u32,
    /// Serving bandwidth cap, bytes per second; `None` for none.
    pub serve_bytes_per_sec: Option<u64>,
}

struct PeerState {
    addr: SocketAddr,
    conn: Option<quinn::Connection>,
    hello: Option<Hello>,
    last_hello: Option<Instant>,
    banned_until: Option<Instant>,
    aside_until: Option<Instant>,
    bytes_from: u64,
    bytes_to: u64,
    last_error: Option<String>,
    /// It closed its connection saying it is leaving; cleared by its next Hello.
    left: bool,
}

/// Whether a connection was closed by a peer leaving on purpose.
fn closed_by_leaving(c: &quinn::Connection) -> bool {
    matches!(
        c.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(a))
            if a.error_code == LEAVING.into() && a.reason.as_ref() == LEAVING_REASON
    )
}

impl PeerState {
    fn new(addr: SocketAddr) -> Self {
        PeerState {
            addr,
            conn: None,
            hello: None,
            last_hello: None,
            banned_until: None,
            aside_until: None,
            bytes_from: 0,
            bytes_to: 0,
            last_error: None,
            left: false,
        }
    }
    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|t| t > now)
    }
    /// The peer closed the connection saying it is leaving (a graceful shutdown).
    fn left(&self) -> bool {
        self.left || self.conn.as_ref().is_some_and(closed_by_leaving)
    }

    fn usable(&self, now: Instant) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.close_reason().is_none())
            && self
                .last_hello
                .is_some_and(|t| now.duration_since(t) < LIVE)
            && !self.banned(now)
            && self.aside_until.is_none_or(|t| t <= now)
    }
}

/// The serving bandwidth cap: a token bucket of `rate` bytes per second with one second of burst.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Self {
        Self {
            rate: rate.max(1) as f64,
            tokens: rate.max(1) as f64,
            at: now,
        }
    }

    /// Takes `n` bytes at `now`; returns how long the caller must wait before sending them.
    fn take(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

struct Inner {
    me: String,
    deployment: String,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    store: Store,
    local: Mutex<LocalState>,
    changed: Notify,
    peers: Mutex<HashMap<String, PeerState>>,
    /// Addresses to dial; the value is when the next attempt may happen.
    addrs: Mutex<HashMap<SocketAddr, Instant>>,
    /// Our own addresses, learnt when a dial reaches ourselves.
    own: Mutex<HashSet<SocketAddr>>,
    hints: mpsc::Sender<Hint>,
    haves: mpsc::Sender<HaveNote>,
    haves_rx: Mutex<Option<mpsc::Receiver<HaveNote>>>,
    serving: Semaphore,
    incoming: Arc<Semaphore>,
    bucket: Option<tokio::sync::Mutex<Bucket>>,
    metrics: Arc<Metrics>,
    listen: SocketAddr,
    /// Every task the node starts (its loops, one per connection, stream and dial): owned here, and
    /// waited for, within a bound, on shutdown.
    tasks: tokio_util::task::TaskTracker,
    started: Instant,
    /// What a peer asking for this agent's status gets (the daemon's `/v1/status` document).
    status: Mutex<Option<StatusSource>>,
}

/// Produces this agent's status document, as JSON, for peers that ask ([`PeerNode::set_status_source`]).
pub type StatusSource = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// How long a peer has to answer a status request (the shop page waits for it).
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(1500);

/// The application close code an agent leaving on purpose sends its peers.
const LEAVING: u32 = 0;
const LEAVING_REASON: &[u8] = b"shutting down";

/// This agent's QUIC endpoint, its peer table, and the background tasks that keep it fresh.
#[derive(Clone)]
pub struct PeerNode {
    inner: Arc<Inner>,
}

impl PeerNode {
    /// Binds the endpoint and starts accepting, dialing and gossiping. Returns the node and the
    /// receiver of hints (a peer announced a newer release).
    pub async fn start(
        cfg: PeerConfig,
        store: Store,
        metrics: Arc<Metrics>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(PeerNode, mpsc::Receiver<Hint>), PeerError> {
        let server = cfg.creds.server_config(cfg.streams_per_peer.max(1))?;
        let client = cfg.creds.client_config()?;
        let endpoint =
            quinn::Endpoint::server(server, cfg.listen).map_err(|e| PeerError::Listen {
                addr: cfg.listen,
                why: e.to_string(),
            })?;
        let listen = endpoint.local_addr().map_err(|e| PeerError::Listen {
            addr: cfg.listen,
            why: e.to_string(),
        })?;
        let (hints_tx, hints_rx) = mpsc::channel(16);
        let (haves_tx, haves_rx) = mpsc::channel(HAVE_QUEUE);
        let bucket = cfg
            .serve_bytes_per_sec
            .map(|rate| tokio::sync::Mutex::new(Bucket::new(rate, Instant::now())));
        let node = PeerNode {
            inner: Arc::new(Inner {
                me: cfg.creds.agent_id.clone(),
                deployment: cfg.deployment.clone(),
                endpoint,
                client,
                store,
                local: Mutex::new(LocalState::default()),
                changed: Notify::new(),
                peers: Mutex::new(HashMap::new()),
                addrs: Mutex::new(HashMap::new()),
                own: Mutex::new(HashSet::new()),
                hints: hints_tx,
                haves: haves_tx,
                haves_rx: Mutex::new(Some(haves_rx)),
                status: Mutex::new(None),
                serving: Semaphore::new(MAX_SERVING),
                incoming: Arc::new(Semaphore::new(MAX_INCOMING)),
                bucket,
                metrics,
                listen,
                tasks: tokio_util::task::TaskTracker::new(),
                started: Instant::now(),
            }),
        };
        for p in &cfg.static_peers {
            match tokio::net::lookup_host(p.as_str()).await {
                Ok(addrs) => addrs.for_each(|a| node.add_addr(a)),
                Err(e) => {
                    tracing::warn!(peer = %p, cause = %e, "cannot resolve a static peer; skipped")
                }
            }
        }
        let span = tracing::info_span!("peers", agent = %node.inner.me, listen = %listen);
        let tasks = &node.inner.tasks;
        tasks.spawn(
            node.clone()
                .accept_loop(stop.clone())
                .instrument(span.clone()),
        );
        tasks.spawn(
            node.clone()
                .dial_loop(stop.clone())
                .instrument(span.clone()),
        );
        tasks.spawn(node.clone().gossip_loop(stop).instrument(span));
        Ok((node, hints_rx))
    }

    pub fn me(&self) -> &str {
        &self.inner.me
    }

    /// How long the node has been looking for peers.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    /// Adds an address to dial (from discovery or configuration).
    pub fn add_addr(&self, addr: SocketAddr) {
        if self.inner.own.lock().is_ok_and(|o| o.contains(&addr)) || addr == self.inner.listen {
            return;
        }
        if let Ok(mut a) = self.inner.addrs.lock()
            && a.len() < MAX_PEERS
        {
            a.entry(addr).or_insert_with(Instant::now);
        }
    }

    /// Updates what this agent announces, and tells connected peers at once if it changed.
    pub fn set_local(&self, state: LocalState) {
        if let Ok(mut l) = self.inner.local.lock() {
            let same = l.active == state.active
                && l.pending == state.pending
                && l.origin == state.origin
                && l.ready == state.ready
                && l.envelope == state.envelope;
            *l = state;
            if same {
                return;
            }
        }
        self.inner.changed.notify_one();
    }

    pub fn local(&self) -> LocalState {
        self.inner
            .local
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    fn hello(&self) -> Hello {
        let l = self.local();
        Hello {
            agent_id: self.inner.me.clone(),
            deployment: self.inner.deployment.clone(),
            active: l.active,
            pending: l.pending,
            listen: self.inner.listen.to_string(),
            origin: l.origin,
            ready: l.ready,
        }
    }

    /// Every peer the table knows.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let now = Instant::now();
        let Ok(peers) = self.inner.peers.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = peers
            .iter()
            .map(|(id, p)| PeerInfo {
                id: id.clone(),
                addr: p.addr.to_string(),
                live: p.usable(now)
                    || (!p.left() && p.last_hello.is_some_and(|t| now.duration_since(t) < LIVE)),
                deployment: p.hello.as_ref().map(|h| h.deployment.clone()),
                active: p.hello.as_ref().and_then(|h| h.active.map(|r| r.version)),
                pending: p.hello.as_ref().and_then(|h| h.pending.map(|r| r.version)),
                version: p.hello.as_ref().and_then(|h| h.active.map(|r| r.version)),
                last_seen: p.last_hello.map(|t| wall(now, t)),
                banned_until: p.banned_until.filter(|t| *t > now).map(|t| wall(now, t)),
                banned: p.banned(now),
                bytes_from: p.bytes_from,
                bytes_to: p.bytes_to,
                last_error: p.last_error.clone(),
                origin: p.hello.as_ref().map(|h| h.origin),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Live, usable peers of this deployment, with their latest Hello.
    pub fn usable(&self) -> Vec<(String, Hello)> {
        let now = Instant::now();
        let Ok(peers) = self.inner.peers.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = peers
            .iter()
            .filter(|(_, p)| p.usable(now))
            .filter_map(|(id, p)| {
                let h = p.hello.clone()?;
                (h.deployment == self.inner.deployment).then(|| (id.clone(), h))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Bans a peer (it sent a chunk that failed verification).
    pub fn ban(&self, peer: &str, why: &str) {
        tracing::warn!(peer, reason = why, ban_secs = BAN.as_secs(), "peer banned");
        self.inner.metrics.peer_banned();
        if let Ok(mut peers) = self.inner.peers.lock()
            && let Some(p) = peers.get_mut(peer)
        {
            p.banned_until = Some(Instant::now() + BAN);
            p.last_error = Some(why.to_owned());
        }
    }

    /// Sets a peer aside for a while (it stalled or failed).
    pub fn set_aside(&self, peer: &str, why: &str) {
        tracing::info!(
            peer,
            reason = why,
            secs = SET_ASIDE.as_secs(),
            "peer set aside"
        );
        if let Ok(mut peers) = self.inner.peers.lock()
            && let Some(p) = peers.get_mut(peer)
        {
            p.aside_until = Some(Instant::now() + SET_ASIDE);
            p.last_error = Some(why.to_owned());
        }
    }

    /// Whether `peer` may be asked now: connected, live, neither banned nor set aside.
    pub fn is_usable(&self, peer: &str) -> bool {
        let now = Instant::now();
        self.inner
            .peers
            .lock()
            .map(|p| p.get(peer).is_some_and(|s| s.usable(now)))
            .unwrap_or(false)
    }

    fn is_banned(&self, peer: &str) -> bool {
        let now = Instant::now();
        self.inner
            .peers
            .lock()
            .map(|p| p.get(peer).is_some_and(|s| s.banned(now)))
            .unwrap_or(false)
    }

    fn conn(&self, peer: &str) -> Result<quinn::Connection, PeerError> {
        self.inner
            .peers
            .lock()
            .ok()
            .and_then(|p| p.get(peer).and_then(|s| s.conn.clone()))
            .filter(|c| c.close_reason().is_none())
            .ok_or_else(|| PeerError::NotConnected(peer.to_owned()))
    }

    /// One request, one response, within `timeout`.
    pub async fn request(
        &self,
        peer: &str,
        req: &Request,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Response, PeerError> {
        let conn = self.conn(peer)?;
        roundtrip(&conn, peer, req, what, timeout).await
    }

    /// A chunk (or a small raw blob, e.g. a chunk map) by content id, verified. A peer whose bytes do not
    /// hash to `id`, or that announces a frame over the limit, is banned.
    pub async fn get_chunk(&self, peer: &str, id: &BlobId) -> Result<Vec<u8>, PeerError> {
        let resp = self
            .request(peer, &Request::GetChunk { id: *id }, "chunk", CHUNK_TIMEOUT)
            .await;
        let data = match resp {
            Ok(Response::Chunk { data }) => data,
            Ok(other) => return Err(unexpected(peer, "chunk", other)),
            Err(e @ PeerError::Timeout { .. }) => {
                self.set_aside(peer, &e.to_string());
                return Err(e);
            }
            Err(e) if e.is_oversized_frame() => {
                // Its frame was refused at the header, before anything was read or allocated.
                self.ban(peer, &e.to_string());
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if BlobId::of(&data) != *id {
            self.ban(peer, &format!("chunk {id} failed verification"));
            return Err(PeerError::BadChunk {
                peer: peer.to_owned(),
                expected: *id,
            });
        }
        if let Ok(mut peers) = self.inner.peers.lock()
            && let Some(p) = peers.get_mut(peer)
        {
            p.bytes_from += data.len() as u64;
        }
        Ok(data)
    }

    /// Which chunks of `blob` a peer holds (chunk-map order), or `None` if it knows nothing of it.
    pub async fn get_have(&self, peer: &str, blob: &BlobId) -> Result<Option<Vec<u8>>, PeerError> {
        match self
            .request(
                peer,
                &Request::GetHave { blob: *blob },
                "have",
                HELLO_TIMEOUT,
            )
            .await?
        {
            Response::Have { bitmap } => Ok(Some(bitmap)),
            Response::NotFound => Ok(None),
            other => Err(unexpected(peer, "have", other)),
        }
    }

    /// The receiver of the HAVE announcements peers push (taken once, by the sync engine).
    pub fn take_haves(&self) -> Option<mpsc::Receiver<HaveNote>> {
        self.inner.haves_rx.lock().ok().and_then(|mut r| r.take())
    }

    /// Tells `peer` this agent verified and stored `chunks` of `blob` (at most [`deckhand_protocol::wire::MAX_HAVE`]).
    pub async fn push_have(
        &self,
        peer: &str,
        blob: &BlobId,
        chunks: Vec<u32>,
    ) -> Result<(), PeerError> {
        let req = Request::Have {
            blob: *blob,
            chunks,
        };
        match self.request(peer, &req, "have push", HAVE_TIMEOUT).await? {
            Response::Ack => Ok(()),
            other => Err(unexpected(peer, "have push", other)),
        }
    }

    /// Sets what peers asking for this agent's status get.
    pub fn set_status_source(&self, source: StatusSource) {
        if let Ok(mut s) = self.inner.status.lock() {
            *s = Some(source);
        }
    }

    /// A peer's status document (for the fleet view), within [`STATUS_TIMEOUT`].
    pub async fn get_status(
        &self,
        peer: &str,
    ) -> Result<deckhand_protocol::status::Status, PeerError> {
        match self
            .request(peer, &Request::GetStatus, "status", STATUS_TIMEOUT)
            .await?
        {
            Response::Status { json } => {
                serde_json::from_slice(&json).map_err(|e| PeerError::Remote {
                    peer: peer.to_owned(),
                    message: format!("its status document does not parse: {e}"),
                })
            }
            other => Err(unexpected(peer, "status", other)),
        }
    }

    /// The newest manifest envelope a peer holds (unverified: the caller verifies it).
    pub async fn get_manifest(&self, peer: &str) -> Result<Vec<u8>, PeerError> {
        match self
            .request(
                peer,
                &Request::GetManifest {
                    deployment: self.inner.deployment.clone(),
                },
                "manifest",
                HELLO_TIMEOUT,
            )
            .await?
        {
            Response::Manifest { envelope } => Ok(envelope),
            other => Err(unexpected(peer, "manifest", other)),
        }
    }

    /// The deployment's trust root of `version` from `peer`, if it holds it (unverified: the caller
    /// checks it along its own chain).
    pub async fn get_root(&self, peer: &str, version: u64) -> Result<Option<Vec<u8>>, PeerError> {
        match self
            .request(
                peer,
                &Request::GetRoot {
                    deployment: self.inner.deployment.clone(),
                    version,
                },
                "trust root",
                HELLO_TIMEOUT,
            )
            .await?
        {
            Response::Root { envelope } => Ok(Some(envelope)),
            Response::NotFound => Ok(None),
            other => Err(unexpected(peer, "trust root", other)),
        }
    }

    /// Records a peer's Hello, learnt from either side of a connection. Sends a hint if it announces a
    /// newer release of our deployment.
    fn record_hello(
        &self,
        id: &str,
        hello: Hello,
        addr: SocketAddr,
        conn: Option<quinn::Connection>,
    ) {
        let newest = self.local().newest();
        let announced = [hello.active, hello.pending]
            .iter()
            .flatten()
            .map(|r| r.version)
            .max()
            .unwrap_or(0);
        let ours = hello.deployment == self.inner.deployment;
        if let Ok(mut peers) = self.inner.peers.lock() {
            if !peers.contains_key(id) && peers.len() >= MAX_PEERS {
                return;
            }
            let p = peers
                .entry(id.to_owned())
                .or_insert_with(|| PeerState::new(addr));
            if let Some(c) = conn {
                p.conn = Some(c);
                p.addr = addr;
            }
            p.hello = Some(hello);
            p.last_hello = Some(Instant::now());
            p.left = false;
        }
        if ours && announced > newest && !self.is_banned(id) {
            // Bounded: when the engine is busy, a later Hello repeats the hint.
            let _ = self.inner.hints.try_send(Hint {
                peer: id.to_owned(),
                version: announced,
            });
        }
    }

    async fn accept_loop(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let incoming = tokio::select! {
                i = self.inner.endpoint.accept() => i,
                _ = stop.changed() => break,
            };
            let Some(incoming) = incoming else { break };
            let Ok(permit) = self.inner.incoming.clone().try_acquire_owned() else {
                tracing::warn!(
                    remote = %incoming.remote_address(),
                    limit = MAX_INCOMING,
                    "refused an incoming connection: at the connection limit"
                );
                incoming.refuse();
                continue;
            };
            let node = self.clone();
            self.inner.tasks.spawn(async move {
                let _permit = permit;
                let remote = incoming.remote_address();
                let conn = match tokio::time::timeout(CONNECT_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, cause = %e, "refused an incoming connection");
                        return;
                    }
                    Err(_) => return,
                };
                let Some(id) = peer_id(&conn) else {
                    conn.close(1u8.into(), b"no fleet identity");
                    return;
                };
                let span = tracing::info_span!("peer", peer = %id, %remote);
                node.serve_conn(id, conn).instrument(span).await;
            });
        }
        self.inner.endpoint.close(LEAVING.into(), LEAVING_REASON);
    }

    /// Leaves the fleet: closes every connection with "shutting down" (peers mark this agent gone at
    /// once instead of after an idle timeout), then waits, at most `limit`, for the node's tasks to end
    /// and the close to reach the peers. Call after `stop` turned true.
    pub async fn shutdown(&self, limit: Duration) {
        self.inner.endpoint.close(LEAVING.into(), LEAVING_REASON);
        self.inner.tasks.close();
        let wait = async {
            self.inner.tasks.wait().await;
            self.inner.endpoint.wait_idle().await;
        };
        if tokio::time::timeout(limit, wait).await.is_err() {
            tracing::warn!(
                tasks = self.inner.tasks.len(),
                "peer tasks still running at shutdown; leaving them"
            );
        }
    }

    async fn serve_conn(&self, id: String, conn: quinn::Connection) {
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => {
                    // A peer known only by the connections it opened says here that it left.
                    if closed_by_leaving(&conn)
                        && let Ok(mut peers) = self.inner.peers.lock()
                        && let Some(p) = peers.get_mut(&id)
                    {
                        p.left = true;
                        tracing::info!(peer = %id, "the peer left");
                    }
                    return;
                }
            };
            if self.is_banned(&id) {
                conn.close(2u8.into(), b"banned");
                return;
            }
            let node = self.clone();
            let (id2, remote) = (id.clone(), conn.remote_address());
            self.inner.tasks.spawn(
                async move {
                    if let Err(e) = node.serve_stream(&id2, remote, send, recv).await {
                        tracing::debug!(cause = %e, "stream ended with an error");
                    }
                }
                .in_current_span(),
            );
        }
    }

    async fn serve_stream(
        &self,
        id: &str,
        remote: SocketAddr,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), PeerError> {
        let conn_err = |e: &dyn std::fmt::Display| PeerError::Connection {
            peer: id.to_owned(),
            why: e.to_string(),
        };
        let body = tokio::time::timeout(READ_REQUEST_TIMEOUT, read_frame(&mut recv, MAX_REQUEST))
            .await
            .map_err(|_| PeerError::Timeout {
                peer: id.to_owned(),
                what: "request",
                after: READ_REQUEST_TIMEOUT,
            })?
            .map_err(|e| match e {
                FrameError::Wire(source) => PeerError::Wire {
                    peer: id.to_owned(),
                    source,
                },
                FrameError::Io(why) => conn_err(&why),
            })?;
        let response = match Request::decode(&body) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(req) => self.answer(id, remote, req).await,
        };
        let bytes = response.encode();
        if let Response::Chunk { data } = &response {
            self.throttle(data.len()).await;
            if let Ok(mut peers) = self.inner.peers.lock()
                && let Some(p) = peers.get_mut(id)
            {
                p.bytes_to += data.len() as u64;
            }
            self.inner.metrics.peer_served(data.len() as u64);
        }
        tokio::time::timeout(CHUNK_TIMEOUT, async {
            send.write_all(&bytes).await.map_err(|e| conn_err(&e))?;
            send.finish().map_err(|e| conn_err(&e))?;
            Ok::<_, PeerError>(())
        })
        .await
        .map_err(|_| PeerError::Timeout {
            peer: id.to_owned(),
            what: "response",
            after: CHUNK_TIMEOUT,
        })??;
        Ok(())
    }

    async fn answer(&self, id: &str, remote: SocketAddr, req: Request) -> Response {
        match req {
            Request::Hello(h) => {
                if h.agent_id != id {
                    return Response::Error {
                        message: format!(
                            "hello names agent {:?} but the certificate names {id:?}",
                            h.agent_id
                        ),
                    };
                }
                // The peer's own listen address, with the address it actually came from.
                if let Ok(listen) = h.listen.parse::<SocketAddr>() {
                    let back = SocketAddr::new(
                        if listen.ip().is_unspecified() {
                            remote.ip()
                        } else {
                            listen.ip()
                        },
                        listen.port(),
                    );
                    self.add_addr(back);
                }
                let known = self
                    .inner
                    .peers
                    .lock()
                    .map(|p| p.contains_key(id))
                    .unwrap_or(false);
                let addr = h
                    .listen
                    .parse::<SocketAddr>()
                    .ok()
                    .filter(|a| !a.ip().is_unspecified())
                    .unwrap_or(remote);
                self.record_hello(id, h, addr, None);
                if !known {
                    tracing::info!(peer = id, "new peer");
                }
                Response::Hello(self.hello())
            }
            Request::GetManifest { deployment } => {
                if deployment != self.inner.deployment {
                    return Response::NotFound;
                }
                match self.local().envelope {
                    Some(envelope) => Response::Manifest { envelope },
                    None => Response::NotFound,
                }
            }
            Request::GetRoot {
                deployment,
                version,
            } => {
                if deployment != self.inner.deployment {
                    return Response::NotFound;
                }
                let store = self.inner.store.clone();
                let root = move || crate::ledger::Ledger::new(&store).root(version);
                match tokio::task::spawn_blocking(root).await {
                    Ok(Ok(Some(envelope))) => Response::Root { envelope },
                    Ok(Ok(_)) => Response::NotFound,
                    Ok(Err(e)) => Response::Error {
                        message: e.to_string(),
                    },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::GetChunk { id: chunk } => {
                // At the serving limit a request waits a little for a slot, then is told Busy: a
                // short queue instead of a storm of retries when many peers want one new chunk.
                let Ok(Ok(_permit)) =
                    tokio::time::timeout(BUSY_AFTER, self.inner.serving.acquire()).await
                else {
                    return Response::Busy;
                };
                let store = self.inner.store.clone();
                match tokio::task::spawn_blocking(move || store.read_chunk(&chunk)).await {
                    Ok(Ok(Some(data))) => Response::Chunk { data },
                    Ok(Ok(None)) => Response::NotFound,
                    Ok(Err(e)) => Response::Error {
                        message: e.to_string(),
                    },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::GetHave { blob } => {
                let store = self.inner.store.clone();
                match tokio::task::spawn_blocking(move || store.have_bitmap(&blob)).await {
                    Ok(Ok(Some(bitmap))) => Response::Have { bitmap },
                    Ok(Ok(None)) => Response::NotFound,
                    Ok(Err(e)) => Response::Error {
                        message: e.to_string(),
                    },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Have { blob, chunks } => {
                // Bounded: when the engine falls behind, the announcement is dropped and its periodic
                // bitmap refresh catches up.
                let note = HaveNote {
                    peer: id.to_owned(),
                    blob,
                    chunks,
                };
                if self.inner.haves.try_send(note).is_err() {
                    tracing::debug!(peer = id, "have announcement dropped: the engine is behind");
                }
                Response::Ack
            }
            Request::GetStatus => {
                let source = self.inner.status.lock().ok().and_then(|s| s.clone());
                if let Some(source) = source {
                    return Response::Status { json: source() };
                }
                let json = serde_json::json!({
                    "agent_id": self.inner.me,
                    "deployment": self.inner.deployment,
                    "peers": self.peers(),
                });
                Response::Status {
                    json: json.to_string().into_bytes(),
                }
            }
        }
    }

    /// Waits until the serving bucket has `n` bytes of tokens.
    async fn throttle(&self, n: usize) {
        let Some(bucket) = &self.inner.bucket else {
            return;
        };
        let wait = bucket.lock().await.take(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    async fn dial_loop(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let now = Instant::now();
            let connected: HashSet<SocketAddr> = self
                .inner
                .peers
                .lock()
                .map(|p| {
                    p.values()
                        .filter(|s| s.conn.as_ref().is_some_and(|c| c.close_reason().is_none()))
                        .map(|s| s.addr)
                        .collect()
                })
                .unwrap_or_default();
            let due: Vec<SocketAddr> = match self.inner.addrs.lock() {
                Ok(mut addrs) => {
                    let due: Vec<_> = addrs
                        .iter()
                        .filter(|(a, t)| **t <= now && !connected.contains(a))
                        .map(|(a, _)| *a)
                        .collect();
                    for a in &due {
                        // The next attempt, if this one fails; backs off while it keeps failing.
                        addrs.insert(*a, now + Duration::from_secs(3));
                    }
                    due
                }
                Err(_) => Vec::new(),
            };
            for addr in due {
                let node = self.clone();
                self.inner
                    .tasks
                    .spawn(async move { node.dial(addr).await }.in_current_span());
            }
        }
    }

    async fn dial(&self, addr: SocketAddr) {
        let connecting =
            match self
                .inner
                .endpoint
                .connect_with(self.inner.client.clone(), addr, PEER_NAME)
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%addr, cause = %e, "cannot dial");
                    return;
                }
            };
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(%addr, cause = %e, "dial failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%addr, "dial timed out");
                return;
            }
        };
        let Some(id) = peer_id(&conn) else {
            conn.close(1u8.into(), b"no fleet identity");
            return;
        };
        if id == self.inner.me {
            conn.close(0u8.into(), b"self");
            if let Ok(mut own) = self.inner.own.lock() {
                own.insert(addr);
            }
            if let Ok(mut a) = self.inner.addrs.lock() {
                a.remove(&addr);
            }
            return;
        }
        // One connection per peer: a second address of a connected peer is dropped.
        let already = self.conn(&id).is_ok();
        if already {
            conn.close(0u8.into(), b"duplicate");
            if let Ok(mut a) = self.inner.addrs.lock() {
                a.remove(&addr);
            }
            return;
        }
        if let Err(e) = self.exchange_hello(&id, addr, conn).await {
            tracing::debug!(peer = %id, cause = %e, "hello failed");
        } else {
            tracing::info!(peer = %id, %addr, "connected");
        }
    }

    async fn exchange_hello(
        &self,
        id: &str,
        addr: SocketAddr,
        conn: quinn::Connection,
    ) -> Result<(), PeerError> {
        let resp = roundtrip(
            &conn,
            id,
            &Request::Hello(self.hello()),
            "hello",
            HELLO_TIMEOUT,
        )
        .await?;
        match resp {
            Response::Hello(h) if h.agent_id == id => {
                self.record_hello(id, h, addr, Some(conn));
                Ok(())
            }
            Response::Hello(h) => Err(PeerError::Remote {
                peer: id.to_owned(),
                message: format!("hello names {:?}, not its certificate", h.agent_id),
            }),
            other => Err(unexpected(id, "hello", other)),
        }
    }

    async fn gossip_loop(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(GOSSIP) => {}
                _ = self.inner.changed.notified() => {}
                _ = stop.changed() => return,
            }
            let conns: Vec<(String, SocketAddr, quinn::Connection)> = self
                .inner
                .peers
                .lock()
                .map(|p| {
                    p.iter()
                        .filter_map(|(id, s)| {
                            let c = s.conn.clone()?;
                            c.close_reason().is_none().then(|| (id.clone(), s.addr, c))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let jobs = conns.into_iter().map(|(id, addr, conn)| {
                let node = self.clone();
                async move {
                    if let Err(e) = node.exchange_hello(&id, addr, conn.clone()).await {
                        tracing::debug!(peer = %id, cause = %e, "gossip failed");
                        if conn.close_reason().is_some()
                            && let Ok(mut peers) = node.inner.peers.lock()
                            && let Some(p) = peers.get_mut(&id)
                        {
                            p.left |= closed_by_leaving(&conn);
                            p.conn = None;
                            p.last_error = Some(e.to_string());
                            if let Ok(mut a) = node.inner.addrs.lock() {
                                a.insert(p.addr, Instant::now());
                            }
                        }
                    }
                }
            });
            futures::future::join_all(jobs).await;
        }
    }
}

/// An instant as wall-clock time (RFC 3339).
fn wall(now: Instant, t: Instant) -> String {
    let ts = jiff::Timestamp::now();
    let shifted = if t >= now {
        jiff::SignedDuration::try_from(t - now)
            .ok()
            .and_then(|d| ts.checked_add(d).ok())
    } else {
        jiff::SignedDuration::try_from(now - t)
            .ok()
            .and_then(|d| ts.checked_sub(d).ok())
    };
    shifted.unwrap_or(ts).to_string()
}

fn unexpected(peer: &str, what: &'static str, r: Response) -> PeerError {
    match r {
        Response::Busy => PeerError::Busy {
            peer: peer.to_owned(),
        },
        Response::NotFound => PeerError::NotFound {
            peer: peer.to_owned(),
        },
        Response::Error { message } => PeerError::Remote {
            peer: peer.to_owned(),
            message,
        },
        _ => PeerError::Unexpected {
            peer: peer.to_owned(),
            what,
        },
    }
}

enum FrameError {
    Wire(WireError),
    Io(String),
}

async fn read_frame(recv: &mut quinn::RecvStream, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    let len = wire::frame_len(header, limit).map_err(FrameError::Wire)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    Ok(body)
}

/// Sends one request on a new stream and reads the one response, all within `timeout`.
pub async fn roundtrip(
    conn: &quinn::Connection,
    peer: &str,
    req: &Request,
    what: &'static str,
    timeout: Duration,
) -> Result<Response, PeerError> {
    let conn_err = |e: String| PeerError::Connection {
        peer: peer.to_owned(),
        why: e,
    };
    let fut = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| conn_err(e.to_string()))?;
        send.write_all(&req.encode())
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        send.finish().map_err(|e| conn_err(e.to_string()))?;
        let body = read_frame(&mut recv, MAX_RESPONSE)
            .await
            .map_err(|e| match e {
                FrameError::Wire(source) => PeerError::Wire {
                    peer: peer.to_owned(),
                    source,
                },
                FrameError::Io(why) => conn_err(why),
            })?;
        Response::decode(&body).map_err(|source| PeerError::Wire {
            peer: peer.to_owned(),
            source,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| PeerError::Timeout {
            peer: peer.to_owned(),
            what,
            after: timeout,
        })?
}

/// Serves one connection's requests with a custom answer function: for tests that need a peer that
/// misbehaves on purpose (the real serving path is [`PeerNode`]).
pub async fn serve_with<F, Fut>(conn: quinn::Connection, answer: F)
where
    F: Fn(Request) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response> + Send,
{
    // The streams' tasks end with the connection.
    let mut streams = tokio::task::JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let answer = answer.clone();
        streams.spawn(async move {
            let Ok(Ok(body)) =
                tokio::time::timeout(READ_REQUEST_TIMEOUT, read_frame(&mut recv, MAX_REQUEST))
                    .await
            else {
                return;
            };
            let resp = match Request::decode(&body) {
                Ok(r) => answer(r).await,
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            };
            let _ = send.write_all(&resp.encode()).await;
            let _ = send.finish();
        });
        while streams.try_join_next().is_some() {}
    }
    streams.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_cap_admits_rate_times_time_plus_one_second_of_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, t0);
        // One second of burst is free; then each byte costs a thousandth of a second.
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // A sender that sleeps as told, sending 100-byte chunks for 10 virtual seconds.
        let mut b = Bucket::new(1000, t0);
        let (mut now, mut sent) = (t0, 0u64);
        let end = t0 + Duration::from_secs(10);
        loop {
            let at = now + b.take(100, now);
            if at > end {
                break;
            }
            now = at;
            sent += 100;
        }
        let allowed = 1000 * 10 + 1000;
        assert!(sent <= allowed, "{sent} bytes in 10 s at 1000 B/s");
        assert!(
            sent >= allowed - 200,
            "the cap starves: {sent} bytes in 10 s"
        );
        // Idle time refills at most one second of burst.
        let later = end + Duration::from_secs(60);
        assert_eq!(b.take(1000, later), Duration::ZERO);
        assert!(b.take(1, later) > Duration::ZERO);
        // A clock that steps back does not mint tokens.
        let mut b = Bucket::new(1000, t0 + Duration::from_secs(5));
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        assert!(b.take(100, t0) > Duration::ZERO);
    }
}
