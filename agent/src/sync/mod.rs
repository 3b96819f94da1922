//! The sync engine: resolve a release, fetch what the store misses (LAN peers first, the origin
//! otherwise), verify every chunk, and hand the complete release to the recognizer.
//!
//! **Where manifests come from.** The deployment's current.json at the origin (conditional GET with the
//! ETag), a peer announcing a newer release (it relays its newest verified envelope), or a bundle
//! directory (a USB stick). All three go through the same gate, [`activation::accept`]: trusted keys,
//! threshold, expiry, and a version strictly above the highest ever accepted (kept durably). The accepted
//! envelope is recorded as pending, so a restart resumes its download without fetching again what is
//! stored.
//!
//! **Fetching a release:**
//! 1. each blob's chunk map (from the store, a peer holding the release, or the origin), then `begin`,
//!    and chunks already in the store are copied (`fill_local`), never fetched;
//! 2. one download of every missing chunk of every blob ([`download`]): the state machine in
//!    `deckhand_protocol::fetch` decides (peers that hold a chunk first; the origin for the pieces this
//!    agent is the designated fetcher of; a bounded wait for the others), and this agent's tasks pump
//!    its events and actions: pipelined chunk requests and Range GETs, HAVE pushes to the peers
//!    downloading the same release, bitmap refreshes;
//! 3. each blob completed (hashed whole, renamed into place).
//!
//! Errors never stop the engine: the origin being unreachable sets `offline_since` and polls back off
//! with jitter, while the active release keeps serving.

pub mod activation;
pub mod bundle;
mod download;
mod packed;
mod probation;
mod sources;
mod switching;
pub mod trust;

use crate::metrics::Source;
use crate::origin::{Fetched, Origin, OriginError};
use crate::peer::{HaveNote, Hint, LocalState, PeerNode};
use crate::recognizer::BackendChoice;
use crate::recognizer::service::Service;
use crate::sync::activation::ActivationError;
use deckhand_protocol::layout::Name;
use deckhand_protocol::status::Pending;
use deckhand_protocol::wire::ReleaseRef;
use deckhand_protocol::{BlobId, VerifiedManifest, VerifyError};
use deckhand_store::Store;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often a new Pi looks whether it heard a peer yet, before its first origin poll (for at most
/// `gather` after it started).
const HEAR_PEERS_STEP: Duration = Duration::from_millis(50);

/// The least time between two manifest requests to the same peer.
const HINT_SPACING: Duration = Duration::from_secs(5);
/// How often a release held at its gate or on probation is looked at.
const BUSY_TICK: Duration = Duration::from_secs(1);
/// How often the loop goes round when nothing happens (well inside [`crate::systemd::SYNC_LIMIT`]).
const IDLE_BEAT: Duration = Duration::from_secs(30);

/// What status shows about syncing.
#[derive(Clone, Debug, Default)]
pub struct SyncStatus {
    pub pending: Option<Pending>,
    pub offline_since: Option<String>,
    pub last_error: Option<String>,
    /// Set while the store's disk is full.
    pub disk_full: Option<deckhand_protocol::status::DiskFull>,
    /// Bytes stored since start, by source.
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_bundles: u64,
    /// The last manifest refused as older than what this agent accepted (a replay), and from where.
    pub last_refused_manifest: Option<String>,
    /// How the last release this agent switched to went live.
    pub last_switch: Option<deckhand_protocol::status::Switch>,
    /// The last shadow evaluation of a release before it went live.
    pub shadow: Option<deckhand_protocol::status::Shadow>,
    /// The active release's probation.
    pub probation: Option<deckhand_protocol::status::Probation>,
    /// Polls of the origin answered since start.
    pub origin_polls: u64,
}

#[derive(Clone)]
pub struct SyncConfig {
    /// This agent's id (its fleet certificate's name, or a stored random id).
    pub agent_id: String,
    pub origin: Option<std::sync::Arc<dyn Origin>>,
    pub deployment: Name,
    /// The keys manifests need: fixed, or a trust root followed to newer ones.
    pub trust: std::sync::Arc<trust::Trust>,
    /// Whether the system clock is taken as synchronised when admitting a manifest.
    pub clock: crate::systemd::ClockSync,
    pub backend: BackendChoice,
    pub poll: Duration,
    pub max_backoff: Duration,
    /// How long to wait for a chunk's designated fetcher while it makes no progress.
    pub max_wait: Duration,
    /// How long after a download starts nothing is taken from the origin, so peers booting at the same
    /// time are known before the origin fetches are shared out.
    pub gather: Duration,
    /// The shop's uplink budget, shared by the agents fetching.
    pub budget: deckhand_protocol::budget::Budget,
    /// How a ready release goes live when its manifest does not say, and the longest wait for the shop.
    pub activate: deckhand_protocol::switch::Mode,
    pub activate_deadline: Duration,
    /// When this agent lets a verified release go live (maintenance windows, idle counter).
    pub gate: deckhand_protocol::switch::Gate,
    /// The shadow policy for releases whose manifest has none.
    pub shadow: Option<deckhand_protocol::shadow::Policy>,
    /// The probation policy for releases whose manifest has none.
    pub rollout: deckhand_protocol::probation::Rollout,
}

/// Where a manifest came from.
#[derive(Clone, Debug)]
enum Via {
    Origin,
    Peer(String),
    Bundle(PathBuf),
    Resume,
    /// Blobs of the active release the scrub found rotten, fetched again.
    Repair,
}

impl Via {
    fn label(&self) -> String {
        match self {
            Via::Origin => "origin".into(),
            Via::Peer(p) => format!("peer {p}"),
            Via::Bundle(d) => format!("bundle {}", d.display()),
            Via::Resume => "resumed".into(),
            Via::Repair => "repair of the active release".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error(transparent)]
    Root(#[from] deckhand_protocol::root::RootError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error(transparent)]
    Store(#[from] deckhand_store::StoreError),
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    #[error("release {version} was superseded by version {newer}, announced by peer {peer}")]
    Superseded {
        version: u64,
        newer: u64,
        peer: String,
    },
    #[error("no progress for {secs} s on release {version}: {why}")]
    Stalled {
        version: u64,
        secs: u64,
        why: String,
    },
    #[error("a store worker stopped: {0}")]
    Worker(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Layout(#[from] deckhand_protocol::layout::LayoutError),
    #[error("bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk map {id}: {source}")]
    ChunkMap {
        id: deckhand_protocol::BlobId,
        #[source]
        source: deckhand_protocol::ChunkMapError,
    },
    #[error(transparent)]
    ChunkMapMismatch(#[from] activation::ChunkMapMismatch),
    #[error("chunk map {0} is held by no reachable peer and the origin is unavailable")]
    ChunkMapUnavailable(deckhand_protocol::BlobId),
    #[error("{path}: more than {limit} bytes, over the limit for what it holds; not read")]
    TooLarge { path: PathBuf, limit: usize },
}

/// Reads a file of at most `limit` bytes (`None` if it does not exist). A larger one is refused after
/// reading `limit + 1` bytes, whatever its size: a bundle on a stick is not trusted to be small.
pub(crate) async fn read_capped(
    path: &std::path::Path,
    limit: usize,
) -> Result<Option<Vec<u8>>, SyncError> {
    use tokio::io::AsyncReadExt as _;
    let bundle = |source| SyncError::Bundle {
        path: path.to_owned(),
        source,
    };
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bundle(e)),
    };
    let mut buf = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(bundle)?;
    if buf.len() > limit {
        return Err(SyncError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(Some(buf))
}

fn joined<T>(r: Result<T, tokio::task::JoinError>) -> Result<T, SyncError> {
    Ok(r?)
}

/// The sync engine: one task ([`Engine::run`]) owns it and its plain fields; what it is doing is
/// published as a [`SyncStatus`] snapshot on a `watch` channel ([`Engine::status`]), which status
/// documents read (`crate::report`).
pub struct Engine {
    cfg: SyncConfig,
    store: Store,
    service: Service,
    status: tokio::sync::watch::Sender<SyncStatus>,
    peers: Option<PeerNode>,
    /// After the origin could not be reached: until when it is left alone.
    origin_down_until: Option<Instant>,
    /// Whether the last request to the origin succeeded (what peers are told).
    origin_last_ok: bool,
    /// The release being fetched, announced to peers as pending.
    pending: Option<VerifiedManifest>,
    /// HAVE announcements peers push; read by the one download running.
    haves: Option<mpsc::Receiver<HaveNote>>,
    /// The release held ready to switch together, announced to peers.
    ready: Option<ReleaseRef>,
    /// The active release's envelope as recorded in the store (what peers are relayed when nothing is
    /// pending): read at start, replaced when a release is recorded active.
    active_envelope: Option<Vec<u8>>,
    /// Whether the active envelope's keys are retired ([`Engine::active_retired`]), for the trust root
    /// version it was judged under: announcing is on the download's path, a signature check is not.
    retired: std::sync::Mutex<Option<(Option<u64>, bool)>>,
    /// The entity tag of the fleet bundle last read from the origin.
    fleet_etag: Option<String>,
    /// When the engine's loops last went round (the watchdog withholds its ping if they stop).
    beat: crate::systemd::Beat,
    /// A verified, loaded release its gate holds (a maintenance window, an idle counter).
    held: Option<switching::Held>,
    /// The active release on probation.
    probation: Option<probation::OnProbation>,
    /// The release this agent will not take (from the ledger).
    rejected: Option<deckhand_protocol::status::Rejected>,
    /// When the engine started (an agent that has recognised nothing has been idle since).
    started: Instant,
}

/// Inputs the engine listens to besides the origin.
pub struct Inputs {
    pub hints: Option<mpsc::Receiver<Hint>>,
    /// HAVE announcements peers push.
    pub haves: Option<mpsc::Receiver<HaveNote>>,
    /// Bundle directories that changed.
    pub bundles: Option<mpsc::Receiver<PathBuf>>,
    /// The scrub quarantined a blob: fetch what the active release misses.
    pub repairs: Option<mpsc::Receiver<()>>,
}

impl Engine {
    pub fn new(cfg: SyncConfig, store: Store, service: Service, peers: Option<PeerNode>) -> Self {
        Engine {
            cfg,
            store,
            service,
            status: tokio::sync::watch::Sender::new(SyncStatus::default()),
            peers,
            origin_down_until: None,
            pending: None,
            origin_last_ok: true,
            haves: None,
            ready: None,
            active_envelope: None,
            retired: std::sync::Mutex::new(None),
            fleet_etag: None,
            beat: crate::systemd::Beat::default(),
            held: None,
            probation: None,
            rejected: None,
            started: Instant::now(),
        }
    }

    /// What the engine is doing, as it publishes it.
    pub fn status(&self) -> tokio::sync::watch::Receiver<SyncStatus> {
        self.status.subscribe()
    }

    /// The engine's heartbeat: its loops beat each time they go round (at least every 30 s while idle,
    /// every second while a release is held or on probation, every 250 ms while downloading, every
    /// 100 ms while waiting to switch).
    pub fn beat(&self) -> crate::systemd::Beat {
        self.beat.clone()
    }

    /// Runs until `stop` turns true. Whatever it is doing then (a download, a poll) is dropped at once:
    /// every chunk it stored is already committed, and the pending release resumes at the next start
    /// without fetching those again.
    pub async fn run(self, inputs: Inputs, stop: tokio::sync::watch::Receiver<bool>) {
        let mut stopping = stop.clone();
        tokio::select! {
            () = self.run_until_stopped(inputs, stop) => {}
            _ = stopping.wait_for(|s| *s) => {
                tracing::info!("stopping; an unfinished download resumes at the next start");
            }
        }
    }

    async fn run_until_stopped(
        mut self,
        mut inputs: Inputs,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        self.haves = inputs.haves.take();
        self.read_active_envelope().await;
        self.announce();
        let mut etag: Option<String> = None;
        let mut backoff = self.cfg.poll;
        let mut next_poll = tokio::time::Instant::now();
        let mut asked: HashMap<String, Instant> = HashMap::new();
        let mut fleet_asked: HashMap<String, Instant> = HashMap::new();
        let mut failures = 0u64;
        // A download accepted before a restart resumes first.
        let mut resume = true;
        let mut next_tick = tokio::time::Instant::now() + BUSY_TICK;
        loop {
            if resume {
                resume = !self.resume_pending().await;
            }
            let has_origin = self.cfg.origin.is_some();
            // A release held at its gate or on probation is looked at every second; otherwise the loop
            // sleeps until there is something to do (a rejection a peer announces wakes it), and
            // still beats every IDLE_BEAT (the watchdog's sign of life; peers' rejections are looked
            // at again then).
            let event = loop {
                self.beat.beat();
                let busy = self.held.is_some() || self.watching();
                let beat = if busy { BUSY_TICK } else { IDLE_BEAT };
                // A release just held or put on probation brings the next look forward; the deadline
                // outlives the other events, so that frequent ones do not starve it.
                next_tick = next_tick.min(tokio::time::Instant::now() + beat);
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep_until(next_tick) => {
                        next_tick = tokio::time::Instant::now() + beat;
                        if busy || self.peers.is_some() {
                            break Event::Tick;
                        }
                        continue;
                    }
                    () = rejection_heard(self.peers.as_ref()) => break Event::Tick,
                    _ = tokio::time::sleep_until(next_poll), if has_origin => break Event::Poll,
                    _ = tokio::time::sleep_until(next_poll), if !has_origin && resume => break Event::Retry,
                    Some(h) = recv_opt(&mut inputs.hints) => break Event::Hint(h),
                    Some(dir) = recv_opt(&mut inputs.bundles) => break Event::Bundle(dir),
                    Some(()) = recv_opt(&mut inputs.repairs) => break Event::Repair,
                }
            };
            match event {
                Event::Poll if self.hear_peers_first() => {
                    // A new Pi hears its peers before it takes a release from the origin: one they
                    // rejected is not accepted (which would raise its floors above the one they
                    // serve). It looks again shortly, and polls once one is heard.
                    next_poll = tokio::time::Instant::now() + HEAR_PEERS_STEP;
                }
                Event::Poll | Event::Retry => {
                    let outcome = if has_origin {
                        self.poll_origin(&mut etag).await
                    } else {
                        Ok(())
                    };
                    let wait = match outcome {
                        Ok(()) => {
                            backoff = self.cfg.poll;
                            failures = 0;
                            // The origin answered; an error of the pending release that is still
                            // being retried (`resume`) still stands until a retry succeeds.
                            let settled = !resume;
                            self.note_status(|s| {
                                s.origin_polls += u64::from(has_origin);
                                s.offline_since = None;
                                if settled {
                                    s.last_error = None;
                                    s.disk_full = None;
                                }
                            });
                            self.cfg.poll
                        }
                        Err(e) => {
                            self.note_error(&e);
                            let (next, wait) = deckhand_protocol::sync::poll_backoff(
                                backoff,
                                self.cfg.max_backoff,
                                &self.cfg.agent_id,
                                failures,
                            );
                            backoff = next;
                            failures += 1;
                            wait
                        }
                    };
                    next_poll = tokio::time::Instant::now() + wait;
                    resume = true;
                }
                Event::Hint(h) => {
                    if h.newer_fleet.is_some() {
                        let now = Instant::now();
                        let recent = fleet_asked
                            .get(&h.peer)
                            .is_some_and(|t| now.duration_since(*t) < HINT_SPACING);
                        if !recent {
                            fleet_asked.insert(h.peer.clone(), now);
                            self.fleet_from_peer(&h.peer).await;
                        }
                    }
                    // A hint queued while this agent got the release some other way is stale:
                    // the peer is not asked (it may be unreachable by now). A peer on a newer root
                    // is asked whatever it announces.
                    // (With a fixed list of keys there are no roots to follow.)
                    let newer_root = h
                        .newer_root
                        .is_some_and(|r| self.cfg.trust.version().is_some_and(|ours| r > ours));
                    if !newer_root && self.live_active().is_some_and(|r| r.version >= h.version) {
                        continue;
                    }
                    let now = Instant::now();
                    if asked
                        .get(&h.peer)
                        .is_some_and(|t| now.duration_since(*t) < HINT_SPACING)
                    {
                        continue;
                    }
                    asked.insert(h.peer.clone(), now);
                    match self.release_from_peer(&h).await {
                        Ok(()) => self.note_ok(),
                        Err(e) => {
                            tracing::warn!(peer = %h.peer, version = h.version, cause = %e, "release from peer failed");
                            self.note_error(&e);
                            resume = true;
                        }
                    }
                }
                Event::Tick => {
                    if let Err(e) = self.heed_rejections().await {
                        tracing::warn!(cause = %e, "a rejection a peer announced could not be recorded");
                        self.note_error(&e);
                    }
                    if let Err(e) = self.watch_probation().await {
                        tracing::warn!(cause = %e, "the release on probation could not be judged");
                        self.note_error(&e);
                    }
                    if let Err(e) = self.release_held().await {
                        tracing::warn!(cause = %e, "the held release could not go live");
                        self.note_error(&e);
                    }
                }
                Event::Repair => match self.repair_active().await {
                    Ok(()) => self.note_ok(),
                    Err(e) => {
                        tracing::warn!(cause = %e, "the active release could not be repaired yet; the scrub will find it again");
                        self.note_error(&e);
                    }
                },
                Event::Bundle(dir) => match self.release_from_bundle(&dir).await {
                    Ok(()) => self.note_ok(),
                    Err(e) => {
                        tracing::warn!(bundle = %dir.display(), cause = %e, "bundle not imported");
                        self.note_error(&e);
                    }
                },
            }
        }
    }

    /// Whether the first origin poll waits for the peers' hellos: nothing is live here yet, peers are
    /// looked for, none was heard, and the gathering time since start has not passed.
    fn hear_peers_first(&self) -> bool {
        self.service.active().is_none()
            && self.started.elapsed() < self.cfg.gather
            && self.peers.as_ref().is_some_and(|n| n.usable().is_empty())
    }

    /// The active release's envelope, as the store records it (relayed to peers while nothing is pending).
    async fn read_active_envelope(&mut self) {
        match self
            .on_store(|store| Ok(crate::ledger::Ledger::new(store).active()?))
            .await
        {
            Ok(envelope) => self.set_active_envelope(envelope),
            Err(e) => tracing::warn!(cause = %e, "cannot read the active release's envelope"),
        }
        match self
            .on_store(|store| Ok(crate::ledger::Ledger::new(store).rejected()?))
            .await
        {
            Ok(rejected) => self.rejected = rejected,
            Err(e) => tracing::warn!(cause = %e, "cannot read the release rejected"),
        }
        let active = self
            .active_envelope
            .as_deref()
            .and_then(|env| self.cfg.trust.policy().verify_ignoring_expiry(env).ok());
        if let Some(v) = active
            && let Err(e) = self.resume_probation(&v).await
        {
            tracing::warn!(cause = %e, "cannot resume the active release's probation");
        }
    }

    /// Resumes the release recorded pending (accepted before a restart, or not complete when last
    /// tried). Returns whether nothing is left to resume: false when it is still not complete, to be
    /// tried again.
    async fn resume_pending(&mut self) -> bool {
        let Ok(Some(env)) = self
            .on_store(|store| Ok(crate::ledger::Ledger::new(store).pending()?))
            .await
        else {
            return true;
        };
        match self.cfg.trust.policy().verify_ignoring_expiry(&env) {
            // Held ready for its gate: nothing to resume.
            Ok(v) if self.held.as_ref().is_some_and(|h| h.id() == v.id) => {}
            Ok(v) => {
                if let Err(e) = self.fetch_and_activate(&v, Via::Resume).await {
                    tracing::warn!(cause = %e, "the pending release is not complete yet; will retry");
                    self.note_error(&e);
                    return false;
                }
                self.note_ok();
            }
            Err(e) => {
                tracing::warn!(cause = %e, "the recorded pending manifest no longer verifies; dropped")
            }
        }
        true
    }

    /// A step succeeded (a release from a peer or a bundle): an earlier error no longer stands. Being
    /// offline is about the origin, and is cleared by its next answer only.
    fn note_ok(&self) {
        self.note_status(|s| {
            s.last_error = None;
            s.disk_full = None;
        });
    }

    fn note_error(&self, e: &SyncError) {
        let unreachable = matches!(e, SyncError::Origin(o) if o.is_unreachable());
        let disk_full = matches!(e, SyncError::Store(s) if s.is_disk_full());
        let free = if disk_full {
            self.store.free_bytes().unwrap_or(0)
        } else {
            0
        };
        self.note_status(|s| {
            if unreachable && s.offline_since.is_none() {
                s.offline_since = Some(jiff::Timestamp::now().to_string());
            }
            s.last_error = Some(e.to_string());
            if disk_full {
                let needed = s
                    .pending
                    .as_ref()
                    .map_or(0, |p| p.bytes_total.saturating_sub(p.bytes_have));
                let since = s
                    .disk_full
                    .as_ref()
                    .map_or_else(|| jiff::Timestamp::now().to_string(), |d| d.since.clone());
                s.disk_full = Some(deckhand_protocol::status::DiskFull {
                    since,
                    bytes_needed: needed,
                    bytes_free: free,
                });
            }
        });
        if disk_full {
            tracing::warn!(
                cause = %e,
                free,
                "the disk is full; the active release keeps serving, the new one waits for space"
            );
        }
        if unreachable {
            tracing::debug!(cause = %e, "origin unreachable; serving the active release");
        } else if matches!(e, SyncError::Origin(o) if o.is_denied()) {
            tracing::warn!(cause = %e, "the origin refused this agent's credentials");
        }
    }

    /// Whether the active release was signed by release keys a rotation retired (after a leaked key's
    /// fast-forward, say). It keeps serving until the next release goes live, but the current keys do
    /// not vouch for it, and after a rotation of the release keys its version means nothing: it is
    /// neither announced nor relayed (a peer would refuse it, and judge the relay), and a peer's
    /// release is not judged older than it.
    fn active_retired(&self) -> bool {
        let root = self.cfg.trust.version();
        let mut cached = crate::locks::lock(&self.retired, "retired keys");
        match *cached {
            Some((judged_under, retired)) if judged_under == root => retired,
            _ => {
                let retired = self.active_envelope.as_deref().is_some_and(|env| {
                    self.cfg.trust.policy().verify_ignoring_expiry(env).is_err()
                });
                *cached = Some((root, retired));
                retired
            }
        }
    }

    /// Replaces the active envelope (read at start, or after a swap); judged again when next needed.
    fn set_active_envelope(&mut self, envelope: Option<Vec<u8>>) {
        self.active_envelope = envelope;
        *crate::locks::lock(&self.retired, "retired keys") = None;
    }

    /// The active release, as announced and compared with peers' (none while its keys are retired).
    fn live_active(&self) -> Option<ReleaseRef> {
        if self.active_retired() {
            return None;
        }
        self.service.active().map(|r| ReleaseRef {
            version: r.version,
            manifest: r.manifest_id,
        })
    }

    /// Tells peers what this agent holds and wants (when that changed).
    pub(super) fn announce(&self) {
        let Some(node) = &self.peers else { return };
        let pending = self.pending.as_ref();
        let active = self.live_active();
        let envelope = match pending {
            Some(v) => Some(v.envelope.clone()),
            None if active.is_none() => None,
            None => self.active_envelope.clone(),
        };
        node.set_local(LocalState {
            active,
            pending: pending.map(|v| ReleaseRef {
                version: v.manifest.version,
                manifest: v.id,
            }),
            envelope,
            origin: self.origin_reachable(),
            ready: self.ready,
            root: self.cfg.trust.version().filter(|v| *v > 1),
            rejected: self.rejected_ref(),
            proven: self.proven(),
        });
    }

    /// Verifies an envelope and, if it is new, records it as pending. `Ok(None)` when it is the newest
    /// already accepted (nothing to do) or older (refused, logged).
    async fn admit(
        &mut self,
        envelope: &[u8],
        from: &Via,
    ) -> Result<Option<VerifiedManifest>, SyncError> {
        // A release this agent or a peer rejected is not accepted: the floors stay where they are, so
        // the release the shop serves can still be taken.
        if let (Ok(id), Ok(m)) = (
            deckhand_protocol::envelope::unverified_id(envelope),
            deckhand_protocol::envelope::inspect_unverified(envelope),
        ) {
            let release = ReleaseRef {
                version: m.version,
                manifest: id,
            };
            if self.refuses(release).await? {
                tracing::debug!(version = m.version, source = %from.label(), "a rejected release was offered; not taken");
                return Ok(None);
            }
        }
        let policy = self.cfg.trust.admit_policy(jiff::Timestamp::now())?;
        let (deployment, envelope) = (self.cfg.deployment.to_string(), envelope.to_vec());
        let clock = self.cfg.clock;
        let (highest, accepted) = self
            .on_store(move |store| {
                let highest = crate::ledger::Ledger::new(store).highest_accepted(&deployment)?;
                // Accepting records it as pending in the same commit.
                let accepted =
                    activation::accept(store, &policy, &deployment, &envelope, clock.now());
                Ok((highest, accepted))
            })
            .await?;
        match accepted {
            Ok(v) => {
                tracing::info!(version = v.manifest.version, manifest = %v.id, source = %from.label(), "release accepted");
                Ok(Some(v))
            }
            Err(ActivationError::Verify(VerifyError::Stale { version, .. }))
                if Some(version) == highest =>
            {
                Ok(None)
            }
            Err(ActivationError::Verify(e @ VerifyError::Stale { .. })) => {
                tracing::warn!(source = %from.label(), cause = %e, "an older manifest was offered; refused");
                self.note_status(|s| {
                    s.last_refused_manifest = Some(format!("from {}: {e}", from.label()));
                });
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn poll_origin(&mut self, etag: &mut Option<String>) -> Result<(), SyncError> {
        let Some(origin) = self.cfg.origin.clone() else {
            return Ok(());
        };
        let key = origin.layout().current(&self.cfg.deployment);
        let fetched = match origin
            .get_if_changed(
                &key,
                etag.as_deref(),
                deckhand_protocol::envelope::MAX_ENVELOPE as u64,
            )
            .await
        {
            Ok(f) => f,
            Err(e) => {
                self.origin_failed(&e);
                return Err(e.into());
            }
        };
        // Renewed certificates and revocations, whatever the deployment's releases do.
        self.fleet_from_origin(origin.as_ref()).await;
        let (body, new_etag) = match fetched {
            Fetched::NotModified | Fetched::Missing => return Ok(()),
            Fetched::Changed { body, etag } => (body, etag),
        };
        self.origin_ok();
        // Newer trust roots before the manifest is checked. Only when current.json changed (an
        // unchanged one costs a conditional GET, not a root GET too): a manifest signed by a rotated-in
        // key, or by a key a rotation revoked, always arrives as a change; and until it is admitted its
        // ETag is not kept, so every poll looks again.
        let source = trust::RootSource::Origin(origin.as_ref());
        if let Err(e) = self.follow_roots(source, "the origin").await {
            if let SyncError::Origin(o) = &e {
                self.origin_failed(o);
            }
            return Err(e);
        }
        if let Some(v) = self.admit(&body, &Via::Origin).await? {
            self.fetch_and_activate(&v, Via::Origin).await?;
        }
        *etag = new_etag;
        Ok(())
    }

    /// An origin that cannot be reached, or refuses this agent's credentials, is left alone for a while,
    /// and peers are told this agent does not share the origin fetches.
    fn origin_failed(&mut self, e: &OriginError) {
        if e.is_unreachable() || e.is_denied() {
            if self.origin_last_ok {
                tracing::info!(cause = %e, "the origin failed: this agent stops sharing the origin fetches until it answers again");
            }
            self.origin_down_until = Some(Instant::now() + self.fetch_config().origin_retry);
            self.origin_last_ok = false;
            self.announce();
        }
    }

    fn origin_ok(&mut self) {
        self.origin_down_until = None;
        self.origin_last_ok = true;
        self.announce();
    }

    /// Configured, and the last request to it succeeded: this agent shares the origin fetches.
    fn origin_reachable(&self) -> bool {
        self.cfg.origin.is_some() && self.origin_last_ok
    }

    fn origin_usable(&self) -> bool {
        self.cfg.origin.is_some() && self.origin_down_until.is_none_or(|t| Instant::now() >= t)
    }

    /// Store work on a blocking thread: the one way the engine reaches its store, whose commits are
    /// durable and may wait on the disk.
    async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, SyncError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let store = self.store.clone();
        joined(tokio::task::spawn_blocking(move || f(&store)).await)?
    }

    /// Stores a small raw blob (a chunk map) checked against its id; gives the bytes back.
    async fn put_raw(
        &self,
        id: deckhand_protocol::BlobId,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, SyncError> {
        self.on_store(move |store| {
            store.put_raw_expect(&id, &bytes)?;
            Ok(bytes)
        })
        .await
    }

    /// Changes what status shows about syncing. A panic while the lock was held (a bug) poisons it;
    /// the status is then taken over as it was left, and the poisoning reported once, rather than
    /// status freezing quietly.
    fn note_status(&self, f: impl FnOnce(&mut SyncStatus)) {
        self.status.send_modify(f);
    }

    fn pending_update(&self, f: impl FnOnce(&mut Pending)) {
        self.note_status(|s| {
            if let Some(p) = s.pending.as_mut() {
                f(p);
            }
        });
    }

    /// For each artifact of `m` that differs from the active release's of the same role, that blob:
    /// the base its delta pack is patched against (`packed::Delta`).
    fn delta_bases(&self, m: &deckhand_protocol::Manifest) -> HashMap<BlobId, (BlobId, u64)> {
        let active = self
            .active_envelope
            .as_deref()
            .and_then(|env| self.cfg.trust.policy().verify_ignoring_expiry(env).ok());
        let Some(active) = active else {
            return HashMap::new();
        };
        m.artifacts
            .iter()
            .filter_map(|a| {
                let old = active.manifest.artifact(a.role)?;
                (old.blob != a.blob).then_some((a.blob, (old.blob, old.size)))
            })
            .collect()
    }

    /// Fetches what the store misses of `v` (announced and shown as pending meanwhile): every blob's
    /// chunk map, the blobs begun, one download of their chunks from peers and the origin, each blob
    /// completed.
    async fn fetch(&mut self, v: &VerifiedManifest, from: Via) -> Result<(), SyncError> {
        let m = &v.manifest;
        let blobs = m.blobs();
        self.note_status(|s| {
            s.pending = Some(Pending {
                version: m.version,
                source: from.label(),
                bytes_total: blobs.iter().map(|b| b.size).sum(),
                ..Pending::default()
            });
        });
        self.pending = Some(v.clone());
        self.announce();
        let (pin, sizes): (Vec<_>, Vec<_>) = (
            activation::release_blobs(m),
            blobs.iter().map(|b| (b.blob, b.size)).collect(),
        );
        self.on_store(move |store| {
            store.set_pin("pending", &pin)?;
            Ok(store.reserve(&sizes)?)
        })
        .await?;
        let complete = {
            let m = m.clone();
            self.on_store(move |s| Ok(activation::is_complete(s, &m)?))
                .await?
        };
        let release = ReleaseRef {
            version: m.version,
            manifest: v.id,
        };
        if !complete {
            // Every blob's chunk map, then the blobs begun (what the store holds elsewhere is copied,
            // never fetched), then one download of all their chunks, then each blob completed.
            let mut maps = Vec::new();
            let mut have = 0;
            for b in &blobs {
                let id = b.blob;
                if self.on_store(move |store| Ok(store.has(&id)?)).await? {
                    have += b.size;
                    self.pending_update(|p| p.bytes_have = have);
                    continue;
                }
                let map = self.chunk_map(b, &release).await?;
                activation::check_chunk_map(&map, b)?;
                let m = map.clone();
                self.on_store(move |s| {
                    s.begin(&m)?;
                    Ok(s.fill_local(&m.blob())?)
                })
                .await?;
                maps.push(map);
            }
            self.pending_update(|p| p.bytes_have = have);
            let bases = self.delta_bases(m);
            self.download(&maps, &release, have, &bases).await?;
            for map in &maps {
                let id = map.blob();
                self.on_store(move |s| Ok(s.complete(&id)?)).await?;
            }
            let total = blobs.iter().map(|b| b.size).sum();
            self.pending_update(|p| p.bytes_have = total);
        }
        Ok(())
    }

    /// Fetches what the store misses of `v` ([`Engine::fetch`]), then makes it live.
    async fn fetch_and_activate(
        &mut self,
        v: &VerifiedManifest,
        from: Via,
    ) -> Result<(), SyncError> {
        self.fetch(v, from).await?;
        self.activate(v, false).await
    }

    /// Fetches again the blobs of the active release the scrub quarantined (from peers or the origin,
    /// as any download), and reloads it from the repaired store, so the recognizer no longer holds
    /// bytes read before the rot was found. Nothing to do when every blob is there.
    async fn repair_active(&mut self) -> Result<(), SyncError> {
        let Some(envelope) = self.active_envelope.clone() else {
            return Ok(());
        };
        let v = self.cfg.trust.policy().verify_ignoring_expiry(&envelope)?;
        let complete = {
            let m = v.manifest.clone();
            self.on_store(move |s| Ok(activation::is_complete(s, &m)?))
                .await?
        };
        if complete {
            return Ok(());
        }
        tracing::warn!(
            version = v.manifest.version,
            "fetching again what the scrub quarantined"
        );
        self.fetch(&v, Via::Repair).await?;
        self.activate(&v, true).await
    }

    fn account(&self, source: Source, n: u64) {
        self.service.metrics().sync_bytes(source, n);
        self.note_status(|s| {
            match source {
                Source::Peer => s.bytes_from_peers += n,
                Source::Origin => s.bytes_from_origin += n,
                Source::Local => s.bytes_from_bundles += n,
            }
            if let Some(p) = s.pending.as_mut() {
                match source {
                    Source::Peer => p.bytes_from_peers += n,
                    Source::Origin => p.bytes_from_origin += n,
                    Source::Local => {}
                }
            }
        });
    }
}

enum Event {
    Poll,
    Retry,
    Hint(Hint),
    Bundle(PathBuf),
    Repair,
    /// A second passed while a release is held (is its gate open now?), on probation (is it worse?),
    /// or while peers may announce a release they rejected.
    Tick,
}

/// Until a peer announces a release it will not take (never without peers).
async fn rejection_heard(peers: Option<&PeerNode>) {
    match peers {
        Some(p) => p.rejection_heard().await,
        None => std::future::pending().await,
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
