//! LAN peers over QUIC: serving chunks, bitmaps and manifests to fleet members, asking them for the same,
//! and keeping a table of who is live and what they hold.
//!
//! One request per bidirectional stream: the client writes one frame and finishes its side; the server
//! answers with one frame (`protocol::wire`). Limits, so serving never starves recognition:
//! * each connection carries at most [`PeerConfig::streams_per_peer`] concurrent streams (QUIC flow
//!   control enforces it), and the whole agent serves at most [`MAX_SERVING`] chunks at once (more get
//!   `Busy`);
//! * chunk bytes served pass through a token bucket ([`PeerConfig::serve_bytes_per_sec`]);
//! * every read and write has a timeout.
//!
//! Peers prove who they are in the TLS handshake (`fleet`); a `Hello` whose agent id differs from the
//! certificate's is refused. The node is transport: a request returns a typed outcome and the node
//! never judges the peer. The download's state machine does ([`deckhand_protocol::fetch`]); its
//! verdicts are recorded in [`Verdicts`], which the node enforces: a banned peer is not offered for
//! requests, its streams are refused and its announcements ignored; a peer set aside is not offered.

pub mod admission;
pub mod anchors;
pub mod discovery;
pub mod renewal;
pub mod statuses;
pub mod tls;
pub mod verdicts;

mod dial;
mod frames;
mod serve;

use frames::unexpected;
pub use frames::{roundtrip, serve_with};
use serve::Bucket;
pub use verdicts::Verdicts;

use crate::metrics::Metrics;
use crate::peer::tls::{FleetError, peer_id};
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

/// Chunks served at once, across all peers.
pub const MAX_SERVING: usize = 16;
/// Peers tracked at most (a new one beyond this is ignored until one is forgotten).
pub const MAX_PEERS: usize = 256;
/// How long a chunk request waits for a serving slot before it is answered Busy.
const BUSY_AFTER: Duration = Duration::from_secs(2);
/// A peer is live if it answered a Hello this recently.
pub const LIVE: Duration = Duration::from_secs(8);
/// How often each connected peer's Hello is refreshed (and on every change of this agent's state).
const GOSSIP: Duration = Duration::from_secs(3);
/// A peer whose Hello came this recently, because it gossiped to us, is not gossiped to on the timer:
/// an exchange tells each side the other's state, so one a round per pair is enough.
const HEARD: Duration = Duration::from_millis(2500);
/// The dial loop's longest sleep: a safety net, not how it learns of work (see `dial_loop`).
const DIAL_IDLE: Duration = Duration::from_secs(30);
/// The least time between two rounds of the dial loop.
const DIAL_ROUND: Duration = Duration::from_millis(500);
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
    /// The trust root version followed, once it was rotated (2 and up).
    pub root: Option<u64>,
    /// The release this agent will not take (rolled back here, or by a peer).
    pub rejected: Option<ReleaseRef>,
    /// The active release, once it passed its probation here.
    pub proven: Option<ReleaseRef>,
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
    /// The peer's trust root version, when it is newer than ours: follow it even if the release it
    /// announces is not newer (a rotation of the release keys starts the versions again).
    pub newer_root: Option<u64>,
    /// The peer's fleet bundle number, when it is newer than ours: ask it for the bundle.
    pub newer_fleet: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub fleet: Arc<renewal::Fleet>,
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
    /// The one connection to the peer, whichever side dialed it: both sides make requests on it and
    /// serve the other's ([`keeps_new`] picks one when two cross).
    conn: Option<quinn::Connection>,
    /// Whether this agent dialed `conn`.
    mine: bool,
    hello: Option<Hello>,
    last_hello: Option<Instant>,
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
            mine: false,
            hello: None,
            last_hello: None,
            bytes_from: 0,
            bytes_to: 0,
            last_error: None,
            left: false,
        }
    }
    /// The peer closed the connection saying it is leaving (a graceful shutdown).
    fn left(&self) -> bool {
        self.left || self.conn.as_ref().is_some_and(closed_by_leaving)
    }

    /// Connected, and answered a Hello recently.
    fn connected(&self, now: Instant) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.close_reason().is_none())
            && self
                .last_hello
                .is_some_and(|t| now.duration_since(t) < LIVE)
    }
}

struct Inner {
    me: String,
    deployment: String,
    endpoint: quinn::Endpoint,
    /// The client side of this agent's credentials, and the credentials it was made of: made again at
    /// the first dial after a fleet bundle is taken ([`PeerNode::client_config`]).
    client: Mutex<(Arc<tls::FleetCredentials>, quinn::ClientConfig)>,
    fleet: Arc<renewal::Fleet>,
    streams_per_peer: u32,
    store: Store,
    local: Mutex<LocalState>,
    changed: Notify,
    /// Wakes the dial loop: an address to dial, a connection that closed.
    dial_wake: Notify,
    /// A peer announced a different release it will not take (the sync engine heeds it).
    rejections: Notify,
    peers: Mutex<HashMap<String, PeerState>>,
    /// The verdicts passed on peers (recorded by the sync engine, enforced here).
    verdicts: Verdicts,
    /// Addresses to dial ([`admission::DialTable`]: failing ones back off and age out).
    addrs: Mutex<admission::DialTable>,
    /// Our own addresses, learnt when a dial reaches ourselves.
    own: Mutex<HashSet<SocketAddr>>,
    hints: mpsc::Sender<Hint>,
    haves: mpsc::Sender<HaveNote>,
    haves_rx: Mutex<Option<mpsc::Receiver<HaveNote>>>,
    serving: Semaphore,
    /// QUIC handshakes in flight ([`admission`]), and how to cancel each (to shed it).
    handshakes: Mutex<(
        admission::Handshakes,
        HashMap<u64, tokio::sync::oneshot::Sender<()>>,
    )>,
    /// Connections each member holds open to this agent ([`admission::PER_MEMBER`] at most).
    members: Mutex<HashMap<String, usize>>,
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

/// The certificate chain a connection's peer presented in its handshake.
fn presented(conn: &quinn::Connection) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}

/// When the certificate a connection's peer presented stops being valid.
fn presented_ends(conn: &quinn::Connection) -> Option<jiff::Timestamp> {
    presented(conn).and_then(|c| c.first().and_then(tls::not_after))
}

/// Produces this agent's status document, as JSON, for peers that ask ([`PeerNode::set_status_source`]).
pub type StatusSource = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// How long a peer has to answer a status request (the shop page waits for it).
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(1500);

/// Which of two open connections between this agent (`me`) and `peer` the pair keeps, given which side
/// dialed each: `true` for the new one. Both sides decide alike, so a pair holds one connection, which
/// carries each side's requests and Hellos (a second would only carry keep-alives):
/// * dialed by different sides (two dials crossed): the one dialed by the smaller agent id;
/// * both by the peer: the new one (it dialed again because it lost the old one, which this side has
///   not noticed yet);
/// * both by this agent: the old one (a second address of a peer it reached already).
fn keeps_new(me: &str, peer: &str, old_mine: bool, new_mine: bool) -> bool {
    match (old_mine, new_mine) {
        (true, true) => false,
        (false, false) => true,
        (false, true) => me < peer,
        (true, false) => peer < me,
    }
}

/// The application close code an agent leaving on purpose sends its peers.
const LEAVING: u32 = 0;
const LEAVING_REASON: &[u8] = b"shutting down";
/// The reason a connection to a peer connected by another one already is closed with.
const DUPLICATE: &[u8] = b"duplicate";

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
        let creds = cfg.fleet.current();
        let server = creds.server_config(cfg.streams_per_peer.max(1))?;
        let client = creds.client_config()?;
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
                me: creds.agent_id.clone(),
                deployment: cfg.deployment.clone(),
                endpoint,
                client: Mutex::new((creds.clone(), client)),
                fleet: cfg.fleet.clone(),
                streams_per_peer: cfg.streams_per_peer.max(1),
                store,
                local: Mutex::new(LocalState::default()),
                changed: Notify::new(),
                dial_wake: Notify::new(),
                rejections: Notify::new(),
                peers: Mutex::new(HashMap::new()),
                verdicts: Verdicts::default(),
                addrs: Mutex::default(),
                own: Mutex::new(HashSet::new()),
                hints: hints_tx,
                haves: haves_tx,
                haves_rx: Mutex::new(Some(haves_rx)),
                status: Mutex::new(None),
                serving: Semaphore::new(MAX_SERVING),
                handshakes: Mutex::default(),
                members: Mutex::default(),
                bucket,
                metrics,
                listen,
                tasks: tokio_util::task::TaskTracker::new(),
                started: Instant::now(),
            }),
        };
        for p in &cfg.static_peers {
            match tokio::net::lookup_host(p.as_str()).await {
                Ok(addrs) => addrs.for_each(|a| node.add_dial(a, true)),
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
        tasks.spawn(
            node.clone()
                .follow_fleet(stop.clone())
                .instrument(span.clone()),
        );
        tasks.spawn(node.clone().gossip_loop(stop).instrument(span));
        Ok((node, hints_rx))
    }

    pub fn me(&self) -> &str {
        &self.inner.me
    }

    /// The verdicts passed on peers: the sync engine records them, the node enforces them.
    pub fn verdicts(&self) -> &Verdicts {
        &self.inner.verdicts
    }

    /// How long the node has been looking for peers.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    /// Adds an address to dial (from discovery, or a peer's Hello).
    pub fn add_addr(&self, addr: SocketAddr) {
        self.add_dial(addr, false);
    }

    /// Adds an address to dial; `pinned` for a configured peer (never forgotten).
    fn add_dial(&self, addr: SocketAddr, pinned: bool) {
        if crate::locks::lock(&self.inner.own, "own addresses").contains(&addr)
            || addr == self.inner.listen
        {
            return;
        }
        let added =
            crate::locks::lock(&self.inner.addrs, "addresses").add(addr, pinned, Instant::now());
        match added {
            admission::Added::Due => self.inner.dial_wake.notify_one(),
            admission::Added::Waiting => {
                tracing::debug!(%addr, "the dial table is full of addresses not tried yet; this one waits");
                self.inner.dial_wake.notify_one();
            }
            // Every Hello names its sender's address, and mDNS repeats its adverts: nothing to wake for.
            admission::Added::Unchanged => {}
        }
    }

    /// Waits until a peer announces a release it will not take, or another one than it did.
    pub async fn rejection_heard(&self) {
        self.inner.rejections.notified().await;
    }

    /// The addresses known to dial, how many were evicted for newer ones and forgotten after failing,
    /// and the QUIC connections open (dialed or accepted).
    pub fn dial_table(&self) -> deckhand_protocol::status::DialTable {
        let t = crate::locks::lock(&self.inner.addrs, "addresses");
        let (evicted, forgotten) = t.dropped();
        deckhand_protocol::status::DialTable {
            known: t.len(),
            evicted,
            forgotten,
            connections: self.inner.endpoint.open_connections(),
        }
    }

    /// Updates what this agent announces, and tells connected peers at once if it changed.
    pub fn set_local(&self, state: LocalState) {
        {
            let mut l = crate::locks::lock(&self.inner.local, "local");
            let same = l.active == state.active
                && l.pending == state.pending
                && l.origin == state.origin
                && l.ready == state.ready
                && l.rejected == state.rejected
                && l.proven == state.proven
                && l.envelope == state.envelope;
            *l = state;
            if same {
                return;
            }
        }
        self.inner.changed.notify_one();
    }

    pub fn local(&self) -> LocalState {
        crate::locks::lock(&self.inner.local, "local state").clone()
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
            root: l.root,
            fleet: self.inner.fleet.current().number(),
            rejected: l.rejected,
            proven: l.proven,
        }
    }

    /// The client side of this agent's credentials as they are now. Made again when they changed: a
    /// connection closed because its peer no longer checks wakes the dial loop, which may dial before
    /// `follow_fleet` runs, and a dial with the old revocation lists would connect again to the peer
    /// just revoked. When the new ones do not make a config, the old one is kept (and said so).
    pub(super) fn client_config(&self) -> quinn::ClientConfig {
        let creds = self.inner.fleet.current();
        let mut client = crate::locks::lock(&self.inner.client, "client config");
        if !Arc::ptr_eq(&client.0, &creds) {
            match creds.client_config() {
                Ok(c) => *client = (creds, c),
                Err(e) => {
                    tracing::error!(cause = %e, "cannot dial with the new fleet credentials; dialing with the old ones");
                    client.0 = creds;
                }
            }
        }
        client.1.clone()
    }

    /// Whether the certificate a connection's peer presented still checks under this agent's
    /// credentials as they are now.
    fn still_valid(&self, conn: &quinn::Connection) -> bool {
        presented(conn).is_some_and(|c| self.inner.fleet.current().verifies_peer(&c))
    }

    /// Whether `ends`, the end of a connected peer's certificate, has passed: a connection made while
    /// the certificate was valid does not outlive it. Judged at every Hello each way and at every
    /// request served, so within [`GOSSIP`] of the clock passing it. A live connection is closed only
    /// when both clocks agree it has ended, the trusted one (which new handshakes are judged at) and
    /// the system's: a time floor raised by a manifest from a leaked key (created in 9999) does not cut
    /// the links the fleet recovers through, and a Pi at 1970 keeps what it has.
    fn outlived(&self, ends: Option<jiff::Timestamp>) -> bool {
        let now = self.inner.fleet.current().now().min(jiff::Timestamp::now());
        ends.is_some_and(|t| now > t)
    }

    /// Closes a connection whose peer's certificate ended at `ends`.
    fn close_outlived(&self, id: &str, conn: &quinn::Connection, ends: Option<jiff::Timestamp>) {
        tracing::warn!(peer = %id, ends = ?ends, "closing the connection: the peer's certificate has expired");
        conn.close(1u8.into(), b"certificate expired");
    }

    /// This agent's fleet credentials, as they are now.
    pub fn fleet(&self) -> &Arc<renewal::Fleet> {
        &self.inner.fleet
    }

    /// Switches the endpoint to new credentials when a fleet bundle is taken: the server side for the
    /// next handshakes (the client side is made again at the next dial); connections whose peer no
    /// longer checks (revoked, its CA retired) are closed; peers hear the new bundle number in the next
    /// Hello.
    async fn follow_fleet(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut changed = self.inner.fleet.subscribe();
        loop {
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            let creds = self.inner.fleet.current();
            match creds.server_config(self.inner.streams_per_peer) {
                Ok(server) => self.inner.endpoint.set_server_config(Some(server)),
                Err(e) => {
                    tracing::error!(cause = %e, "cannot use the new fleet credentials; the endpoint keeps the old ones");
                    continue;
                }
            }
            let conns: Vec<(String, quinn::Connection)> =
                crate::locks::lock(&self.inner.peers, "peers")
                    .iter()
                    .filter_map(|(id, p)| Some((id.clone(), p.conn.clone()?)))
                    .collect();
            for (id, conn) in conns {
                if !self.still_valid(&conn) {
                    tracing::warn!(peer = %id, "closing the connection: the peer's certificate no longer checks");
                    conn.close(1u8.into(), b"certificate no longer valid");
                }
            }
            self.inner.changed.notify_one();
        }
    }

    /// Every peer the table knows.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let now = Instant::now();
        let peers = crate::locks::lock(&self.inner.peers, "peers");
        let verdicts = &self.inner.verdicts;
        let mut out: Vec<_> = peers
            .iter()
            .map(|(id, p)| {
                let shown = verdicts.shown(id, now);
                let standing = !verdicts.clear(id, now);
                PeerInfo {
                    id: id.clone(),
                    addr: p.addr.to_string(),
                    live: (p.connected(now) && !standing)
                        || (!p.left()
                            && p.last_hello.is_some_and(|t| now.duration_since(t) < LIVE)),
                    deployment: p.hello.as_ref().map(|h| h.deployment.clone()),
                    active: p.hello.as_ref().and_then(|h| h.active.map(|r| r.version)),
                    pending: p.hello.as_ref().and_then(|h| h.pending.map(|r| r.version)),
                    version: p.hello.as_ref().and_then(|h| h.active.map(|r| r.version)),
                    last_seen: p.last_hello.map(|t| wall(now, t)),
                    banned_until: shown
                        .as_ref()
                        .and_then(|s| s.banned_until)
                        .map(|t| wall(now, t)),
                    banned: shown.as_ref().is_some_and(|s| s.banned_until.is_some()),
                    bytes_from: p.bytes_from,
                    bytes_to: p.bytes_to,
                    // A verdict that stands says why; otherwise the last transport error.
                    last_error: match shown {
                        Some(s) if standing => Some(s.why),
                        _ => p.last_error.clone(),
                    },
                    origin: p.hello.as_ref().map(|h| h.origin),
                    connected: p.connected(now),
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Live, usable peers of this deployment, with their latest Hello: connected, recently heard from,
    /// and under no verdict (neither banned nor set aside).
    pub fn usable(&self) -> Vec<(String, Hello)> {
        let now = Instant::now();
        let peers = crate::locks::lock(&self.inner.peers, "peers");
        let mut out: Vec<_> = peers
            .iter()
            .filter(|(id, p)| p.connected(now) && self.inner.verdicts.clear(id, now))
            .filter_map(|(id, p)| {
                let h = p.hello.clone()?;
                (h.deployment == self.inner.deployment).then(|| (id.clone(), h))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn is_banned(&self, peer: &str) -> bool {
        self.inner.verdicts.banned(peer, Instant::now())
    }

    fn conn(&self, peer: &str) -> Result<quinn::Connection, PeerError> {
        crate::locks::lock(&self.inner.peers, "peers")
            .get(peer)
            .and_then(|s| s.conn.clone())
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

    /// A chunk (or a small raw blob, e.g. a chunk map) by content id, verified. Bytes that do not hash to
    /// `id` are [`PeerError::BadChunk`]; a frame over the limit is refused at its header, before
    /// anything is read or allocated. What the failure earns the peer is the caller's judge's to say
    /// ([`PeerError::failure`]).
    pub async fn get_chunk(&self, peer: &str, id: &BlobId) -> Result<Vec<u8>, PeerError> {
        let data = match self
            .request(peer, &Request::GetChunk { id: *id }, "chunk", CHUNK_TIMEOUT)
            .await?
        {
            Response::Chunk { data } => data,
            other => return Err(unexpected(peer, "chunk", other)),
        };
        if BlobId::of(&data) != *id {
            return Err(PeerError::BadChunk {
                peer: peer.to_owned(),
                expected: *id,
            });
        }
        if let Some(p) = crate::locks::lock(&self.inner.peers, "peers").get_mut(peer) {
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
        crate::locks::lock(&self.inner.haves_rx, "haves receiver").take()
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
        {
            let mut s = crate::locks::lock(&self.inner.status, "status");
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
    /// The fleet bundle `peer` holds, if any.
    pub async fn get_fleet(&self, peer: &str) -> Result<Option<Vec<u8>>, PeerError> {
        match self
            .request(peer, &Request::GetFleet, "fleet bundle", HELLO_TIMEOUT)
            .await?
        {
            Response::Fleet { bundle } => Ok(Some(bundle)),
            Response::NotFound => Ok(None),
            other => Err(unexpected(peer, "fleet bundle", other)),
        }
    }

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

    /// Leaves the fleet: closes every connection with "shutting down" (peers mark this agent gone at
    /// once instead of after an idle timeout), then waits, at most `limit`, for the node's tasks to end
    /// and the close to reach the peers. Call after `stop` turned true.
    pub async fn shutdown(&self, limit: Duration) {
        // The status source holds the daemon's view of this node: dropped here, so that the node (and
        // the store it holds) is freed once its tasks end.
        crate::locks::lock(&self.inner.status, "status").take();
        self.inner.endpoint.close(LEAVING.into(), LEAVING_REASON);
        self.inner.tasks.close();
        if tokio::time::timeout(limit, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.inner.tasks.len(),
                "peer tasks still running at shutdown; leaving them"
            );
        }
        // Connections closed by us drain for three probe timeouts; the peers were told at once.
        let drained = tokio::time::timeout(limit, self.inner.endpoint.wait_idle()).await;
        tracing::debug!(drained = drained.is_ok(), "left the fleet");
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

#[cfg(test)]
mod tests {
    use super::keeps_new;

    #[test]
    fn both_sides_of_a_pair_keep_the_same_one_of_two_connections() {
        // A connection is named by who dialed it; each side sees `mine` from its own end.
        for (a, b) in [("pi-1", "pi-2"), ("pi-2", "pi-1")] {
            // Two dials crossed: whichever each side recorded first, both keep the smaller id's.
            for (old_by, new_by) in [(a, b), (b, a)] {
                let kept_by_a = if keeps_new(a, b, old_by == a, new_by == a) {
                    new_by
                } else {
                    old_by
                };
                let kept_by_b = if keeps_new(b, a, old_by == b, new_by == b) {
                    new_by
                } else {
                    old_by
                };
                assert_eq!(
                    kept_by_a,
                    a.min(b),
                    "{a} keeps the connection dialed by the smaller id"
                );
                assert_eq!(
                    kept_by_b,
                    a.min(b),
                    "{b} keeps the connection dialed by the smaller id"
                );
                // Recorded in the other order on one side, the choice is the same.
                let swapped = if keeps_new(b, a, new_by == b, old_by == b) {
                    old_by
                } else {
                    new_by
                };
                assert_eq!(swapped, kept_by_a);
            }
        }
        // A peer that dials again lost its old connection: its new one is kept. This agent's own
        // second dial (another address of the same peer) is not.
        assert!(keeps_new("pi-1", "pi-2", false, false));
        assert!(keeps_new("pi-2", "pi-1", false, false));
        assert!(!keeps_new("pi-1", "pi-2", true, true));
    }
}
