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
//! **Fetching a blob**, in rounds until nothing is missing:
//! 1. the chunk map (from the store, a peer holding the release, or the origin), then `begin`, and chunks
//!    already in the store are copied (`fill_local`), never fetched;
//! 2. ask every usable peer that holds or wants the release for its bitmap of the blob;
//! 3. decide per missing chunk (`protocol::sync::decide`): from a peer that holds it; from the origin if
//!    this agent is the chunk's designated fetcher (rendezvous hashing over the agents that want the
//!    release); otherwise wait for the designated fetcher, while it makes progress, up to `max_wait`;
//! 4. fetch (bounded concurrency), verify (a peer whose chunk fails verification is banned) and store.
//!
//! Errors never stop the engine: the origin being unreachable sets `offline_since` and polls back off
//! with jitter, while the active release keeps serving.

pub mod activation;
pub mod bundle;

use crate::http::metrics::Source;
use crate::origin::{Fetched, Origin, OriginError};
use crate::peer::{Hint, LocalState, PeerNode};
use crate::recognizer::BackendChoice;
use crate::recognizer::service::Service;
use crate::sync::activation::ActivationError;
use deckhand_protocol::chunk::Chunk;
use deckhand_protocol::layout::{Layout, Name};
use deckhand_protocol::manifest::BlobRef;
use deckhand_protocol::status::Pending;
use deckhand_protocol::sync::{Decision, View, bit, coalesce, decide};
use deckhand_protocol::wire::ReleaseRef;
use deckhand_protocol::{BlobId, ChunkMap, TrustPolicy, VerifiedManifest, VerifyError};
use deckhand_store::Store;
use futures::StreamExt as _;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The longest Range GET: adjacent missing chunks are merged up to this many bytes.
pub const MAX_RANGE: u64 = 4 * 1024 * 1024;
/// Origin bytes asked for per round, so the plan is revised often as peers progress.
const ORIGIN_PER_ROUND: u64 = 8 * 1024 * 1024;
/// Chunks asked of peers per round.
const PEER_CHUNKS_PER_ROUND: usize = 96;
/// Peer chunk requests in flight at once, and Range GETs.
const PEER_PARALLEL: usize = 8;
const ORIGIN_PARALLEL: usize = 2;
/// A download with no progress at all for this long gives up (and is retried later).
const STALL: Duration = Duration::from_secs(45);
/// After the origin fails, how long it is left alone before it is tried again.
const ORIGIN_RETRY: Duration = Duration::from_secs(5);
/// The least time between two manifest requests to the same peer.
const HINT_SPACING: Duration = Duration::from_secs(5);
const META_PENDING: &str = "pending_envelope";

/// What status shows about syncing.
#[derive(Clone, Debug, Default)]
pub struct SyncStatus {
    pub pending: Option<Pending>,
    pub offline_since: Option<String>,
    pub last_error: Option<String>,
    /// Bytes stored since start, by source.
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_bundles: u64,
    /// The last manifest refused as older than what this agent accepted (a replay), and from where.
    pub last_refused_manifest: Option<String>,
}

#[derive(Clone)]
pub struct SyncConfig {
    /// This agent's id (its fleet certificate's name, or a stored random id).
    pub agent_id: String,
    pub origin: Option<std::sync::Arc<dyn Origin>>,
    pub deployment: Name,
    pub policy: TrustPolicy,
    pub backend: BackendChoice,
    pub poll: Duration,
    pub max_backoff: Duration,
    /// How long to wait for a chunk's designated fetcher while it makes no progress.
    pub max_wait: Duration,
    /// After accepting a release, how long to let peers hear of it before planning (so the group that
    /// shares the origin fetches is known).
    pub settle: Duration,
}

/// Where a manifest came from.
#[derive(Clone, Debug)]
enum Via {
    Origin,
    Peer(String),
    Bundle(PathBuf),
    Resume,
}

impl Via {
    fn label(&self) -> String {
        match self {
            Via::Origin => "origin".into(),
            Via::Peer(p) => format!("peer {p}"),
            Via::Bundle(d) => format!("bundle {}", d.display()),
            Via::Resume => "resumed".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Origin(#[from] OriginError),
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
}

fn joined<T>(r: Result<T, tokio::task::JoinError>) -> Result<T, SyncError> {
    Ok(r?)
}

/// The engine's shared parts.
#[derive(Clone)]
pub struct Engine {
    cfg: SyncConfig,
    store: Store,
    service: Service,
    status: Arc<Mutex<SyncStatus>>,
    peers: Option<PeerNode>,
    origin_down_until: Arc<Mutex<Option<Instant>>>,
    /// Whether the last request to the origin succeeded (what peers are told).
    origin_last_ok: Arc<std::sync::atomic::AtomicBool>,
    /// The release being fetched, announced to peers as pending.
    pending: Arc<Mutex<Option<VerifiedManifest>>>,
    started: Instant,
}

/// Inputs the engine listens to besides the origin.
pub struct Inputs {
    pub hints: Option<mpsc::Receiver<Hint>>,
    /// Bundle directories that changed.
    pub bundles: Option<mpsc::Receiver<PathBuf>>,
}

impl Engine {
    pub fn new(
        cfg: SyncConfig,
        store: Store,
        service: Service,
        status: Arc<Mutex<SyncStatus>>,
        peers: Option<PeerNode>,
    ) -> Self {
        Engine {
            cfg,
            store,
            service,
            status,
            peers,
            origin_down_until: Arc::new(Mutex::new(None)),
            pending: Arc::new(Mutex::new(None)),
            origin_last_ok: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            started: Instant::now(),
        }
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
        self,
        mut inputs: Inputs,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        self.announce();
        let mut etag: Option<String> = None;
        let mut backoff = self.cfg.poll;
        let mut next_poll = tokio::time::Instant::now();
        let mut asked: HashMap<String, Instant> = HashMap::new();
        let mut failures = 0u64;
        // A download accepted before a restart resumes first.
        let mut resume = true;
        loop {
            if resume {
                resume = false;
                if let Ok(Some(env)) = self.store.get_meta(META_PENDING)
                    && !env.is_empty()
                {
                    match self.cfg.policy.verify_ignoring_expiry(&env) {
                        Ok(v) => {
                            if let Err(e) = self.fetch_and_activate(&v, Via::Resume).await {
                                tracing::warn!(cause = %e, "the pending release is not complete yet; will retry");
                                self.note_error(&e);
                                resume = true;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(cause = %e, "the recorded pending manifest no longer verifies; dropped")
                        }
                    }
                }
            }
            let has_origin = self.cfg.origin.is_some();
            let event = tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep_until(next_poll), if has_origin => Event::Poll,
                _ = tokio::time::sleep_until(next_poll), if !has_origin && resume => Event::Retry,
                Some(h) = recv_opt(&mut inputs.hints) => Event::Hint(h),
                Some(dir) = recv_opt(&mut inputs.bundles) => Event::Bundle(dir),
            };
            match event {
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
                            if let Ok(mut s) = self.status.lock() {
                                s.offline_since = None;
                                s.last_error = None;
                            }
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
                    let now = Instant::now();
                    if asked
                        .get(&h.peer)
                        .is_some_and(|t| now.duration_since(*t) < HINT_SPACING)
                    {
                        continue;
                    }
                    asked.insert(h.peer.clone(), now);
                    if let Err(e) = self.release_from_peer(&h).await {
                        tracing::warn!(peer = %h.peer, version = h.version, cause = %e, "release from peer failed");
                        self.note_error(&e);
                        resume = true;
                    }
                }
                Event::Bundle(dir) => {
                    if let Err(e) = self.release_from_bundle(&dir).await {
                        tracing::warn!(bundle = %dir.display(), cause = %e, "bundle not imported");
                        self.note_error(&e);
                    }
                }
            }
        }
    }

    fn note_error(&self, e: &SyncError) {
        let unreachable = matches!(e, SyncError::Origin(o) if o.is_unreachable());
        if let Ok(mut s) = self.status.lock() {
            if unreachable && s.offline_since.is_none() {
                s.offline_since = Some(jiff::Timestamp::now().to_string());
            }
            s.last_error = Some(e.to_string());
        }
        if unreachable {
            tracing::debug!(cause = %e, "origin unreachable; serving the active release");
        } else if matches!(e, SyncError::Origin(o) if o.is_denied()) {
            tracing::warn!(cause = %e, "the origin refused this agent's credentials");
        }
    }

    /// Tells peers what this agent holds and wants (when that changed).
    fn announce(&self) {
        let Some(node) = &self.peers else { return };
        let pending = self.pending.lock().ok().and_then(|p| p.clone());
        let pending = pending.as_ref();
        let active = self.service.active().map(|r| ReleaseRef {
            version: r.version,
            manifest: r.manifest_id,
        });
        let envelope = match pending {
            Some(v) => Some(v.envelope.clone()),
            None => activation::active_envelope(&self.store).ok().flatten(),
        };
        node.set_local(LocalState {
            active,
            pending: pending.map(|v| ReleaseRef {
                version: v.manifest.version,
                manifest: v.id,
            }),
            envelope,
            origin: self.origin_reachable(),
        });
    }

    /// Verifies an envelope and, if it is new, records it as pending. `Ok(None)` when it is the newest
    /// already accepted (nothing to do) or older (refused, logged).
    fn admit(&self, envelope: &[u8], from: &Via) -> Result<Option<VerifiedManifest>, SyncError> {
        let deployment = self.cfg.deployment.as_str();
        let highest = activation::highest_accepted(&self.store, deployment)?;
        match activation::accept(
            &self.store,
            &self.cfg.policy,
            deployment,
            envelope,
            jiff::Timestamp::now(),
        ) {
            Ok(v) => {
                self.store.set_meta(META_PENDING, &v.envelope, true)?;
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
                if let Ok(mut s) = self.status.lock() {
                    s.last_refused_manifest = Some(format!("from {}: {e}", from.label()));
                }
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn poll_origin(&self, etag: &mut Option<String>) -> Result<(), SyncError> {
        let Some(origin) = &self.cfg.origin else {
            return Ok(());
        };
        let key = origin.layout().current(&self.cfg.deployment);
        let (body, new_etag) = match origin.get_if_changed(&key, etag.as_deref()).await {
            Ok(Fetched::NotModified | Fetched::Missing) => return Ok(()),
            Ok(Fetched::Changed { body, etag }) => (body, etag),
            Err(e) => {
                self.origin_failed(&e);
                return Err(e.into());
            }
        };
        self.origin_ok();
        if let Some(v) = self.admit(&body, &Via::Origin)? {
            self.fetch_and_activate(&v, Via::Origin).await?;
        }
        *etag = new_etag;
        Ok(())
    }

    async fn release_from_peer(&self, h: &Hint) -> Result<(), SyncError> {
        let Some(node) = &self.peers else {
            return Ok(());
        };
        let envelope = node.get_manifest(&h.peer).await?;
        // A fleet member that relays a forged manifest, or announces one version and relays an older
        // one (a replay), is lying: banned.
        match self.cfg.policy.verify_ignoring_expiry(&envelope) {
            Ok(v) if v.manifest.version < h.version => node.ban(
                &h.peer,
                &format!(
                    "announced version {} but relayed version {}",
                    h.version, v.manifest.version
                ),
            ),
            Ok(_) => {}
            Err(e) => node.ban(
                &h.peer,
                &format!("relayed a manifest that does not verify: {e}"),
            ),
        }
        let from = Via::Peer(h.peer.clone());
        match self.admit(&envelope, &from) {
            Ok(Some(v)) => self.fetch_and_activate(&v, from).await,
            Ok(None) => Ok(()),
            Err(e) => {
                tracing::warn!(peer = %h.peer, cause = %e, "a peer relayed a manifest that does not verify");
                Err(e)
            }
        }
    }

    async fn release_from_bundle(&self, dir: &std::path::Path) -> Result<(), SyncError> {
        let layout = Layout::new("")?;
        let current = dir.join(layout.current(&self.cfg.deployment));
        let envelope = match tokio::fs::read(&current).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(SyncError::Bundle {
                    path: current,
                    source,
                });
            }
        };
        let from = Via::Bundle(dir.to_owned());
        let Some(v) = self.admit(&envelope, &from)? else {
            return Ok(());
        };
        let (store, d, m) = (self.store.clone(), dir.to_owned(), v.manifest.clone());
        let bytes = joined(
            tokio::task::spawn_blocking(move || activation::import_bundle(&store, &d, &m)).await,
        )??;
        self.service.metrics().sync_bytes(Source::Local, bytes);
        if let Ok(mut s) = self.status.lock() {
            s.bytes_from_bundles += bytes;
        }
        self.fetch_and_activate(&v, from).await
    }

    /// An origin that cannot be reached, or refuses this agent's credentials, is left alone for a while,
    /// and peers are told this agent does not share the origin fetches.
    fn origin_failed(&self, e: &OriginError) {
        if e.is_unreachable() || e.is_denied() {
            if let Ok(mut d) = self.origin_down_until.lock() {
                *d = Some(Instant::now() + ORIGIN_RETRY);
            }
            self.origin_last_ok
                .store(false, std::sync::atomic::Ordering::SeqCst);
            self.announce();
        }
    }

    fn origin_ok(&self) {
        if let Ok(mut d) = self.origin_down_until.lock() {
            *d = None;
        }
        self.origin_last_ok
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.announce();
    }

    /// Configured, and the last request to it succeeded: this agent shares the origin fetches.
    fn origin_reachable(&self) -> bool {
        self.cfg.origin.is_some()
            && self
                .origin_last_ok
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn origin_usable(&self) -> bool {
        self.cfg.origin.is_some()
            && self
                .origin_down_until
                .lock()
                .map(|d| d.is_none_or(|t| Instant::now() >= t))
                .unwrap_or(true)
    }

    fn pending_update(&self, f: impl FnOnce(&mut Pending)) {
        if let Ok(mut s) = self.status.lock()
            && let Some(p) = s.pending.as_mut()
        {
            f(p);
        }
    }

    async fn fetch_and_activate(&self, v: &VerifiedManifest, from: Via) -> Result<(), SyncError> {
        let m = &v.manifest;
        let blobs = m.blobs();
        if let Ok(mut s) = self.status.lock() {
            s.pending = Some(Pending {
                version: m.version,
                source: from.label(),
                bytes_total: blobs.iter().map(|b| b.size).sum(),
                ..Pending::default()
            });
        }
        if let Ok(mut p) = self.pending.lock() {
            *p = Some(v.clone());
        }
        self.announce();
        self.store
            .set_pin("pending", &activation::release_blobs(m))?;
        let sizes: Vec<_> = blobs.iter().map(|b| (b.blob, b.size)).collect();
        let s = self.store.clone();
        joined(tokio::task::spawn_blocking(move || s.reserve(&sizes)).await)??;
        let complete = {
            let (s, m) = (self.store.clone(), m.clone());
            joined(tokio::task::spawn_blocking(move || activation::is_complete(&s, &m)).await)??
        };
        if !complete && self.peers.is_some() && !self.cfg.settle.is_zero() {
            // Let peers hear of the release (and fetch the manifest from us) before planning, so the
            // agents sharing the origin fetches agree on who they are.
            tokio::time::sleep(self.cfg.settle).await;
        }
        let release = ReleaseRef {
            version: m.version,
            manifest: v.id,
        };
        let mut have = 0;
        for b in &blobs {
            self.fetch_blob(b, &release, have).await?;
            have += b.size;
            self.pending_update(|p| p.bytes_have = have);
        }
        self.activate(v).await
    }

    async fn activate(&self, v: &VerifiedManifest) -> Result<(), SyncError> {
        let m = &v.manifest;
        let (s2, v2, backend) = (self.store.clone(), v.clone(), self.cfg.backend);
        let loaded = joined(
            tokio::task::spawn_blocking(move || {
                let r = activation::load_recognizer(&s2, &v2, backend)?;
                let c = activation::canaries(&s2, &v2.manifest)?;
                Ok::<_, ActivationError>((r, c))
            })
            .await,
        )?;
        let result = match loaded {
            Ok((recognizer, canaries)) => self
                .service
                .activate(recognizer, &canaries)
                .map_err(|e| e.to_string()),
            Err(e) => {
                self.service
                    .refuse(m.version, &v.id.to_string(), &e.to_string());
                Err(e.to_string())
            }
        };
        if let Ok(mut s) = self.status.lock() {
            s.pending = None;
        }
        if let Ok(mut p) = self.pending.lock() {
            *p = None;
        }
        self.store.set_meta(META_PENDING, b"", true)?;
        match result {
            Ok(()) => {
                let (s2, v2) = (self.store.clone(), v.clone());
                let gc = joined(
                    tokio::task::spawn_blocking(move || activation::record_active(&s2, &v2)).await,
                )??;
                tracing::info!(
                    version = m.version,
                    freed = gc.bytes_freed,
                    "release active"
                );
            }
            Err(why) => {
                tracing::error!(version = m.version, reason = %why, "release refused; the active release keeps serving");
            }
        }
        self.announce();
        Ok(())
    }

    /// Usable peers, each with whether it shares the origin fetches of `release`: it wants the release
    /// too and can reach the origin. Any peer may hold chunks of it (from an older release, say), so all
    /// are asked for bitmaps.
    fn sharing(&self, release: &ReleaseRef) -> Vec<(String, bool)> {
        let Some(node) = &self.peers else {
            return Vec::new();
        };
        node.usable()
            .into_iter()
            .map(|(id, h)| {
                let wants = h.pending.is_some_and(|r| r.manifest == release.manifest);
                (id, wants && h.origin)
            })
            .collect()
    }

    /// A usable peer announcing a release newer than `release`: downloading it is pointless.
    fn superseded(&self, release: &ReleaseRef) -> Option<(String, u64)> {
        let node = self.peers.as_ref()?;
        node.usable().into_iter().find_map(|(id, h)| {
            let newest = [h.active, h.pending]
                .iter()
                .flatten()
                .map(|r| r.version)
                .max()?;
            (newest > release.version).then_some((id, newest))
        })
    }

    async fn chunk_map(&self, b: &BlobRef, release: &ReleaseRef) -> Result<ChunkMap, SyncError> {
        if let Ok(m) = self.store.read_chunk_map(&b.chunk_map) {
            return Ok(m);
        }
        let mut last: Option<SyncError> = None;
        if let Some(node) = &self.peers {
            for (peer, _) in self.sharing(release) {
                match node.get_chunk(&peer, &b.chunk_map).await {
                    Ok(bytes) => {
                        self.store.put_raw_expect(&b.chunk_map, &bytes)?;
                        return ChunkMap::decode(&bytes).map_err(|source| SyncError::ChunkMap {
                            id: b.chunk_map,
                            source,
                        });
                    }
                    Err(e) => last = Some(e.into()),
                }
            }
        }
        if let Some(origin) = &self.cfg.origin
            && self.origin_usable()
        {
            match origin.get(&origin.layout().blob(&b.chunk_map)).await {
                Ok(bytes) => {
                    self.origin_ok();
                    self.store.put_raw_expect(&b.chunk_map, &bytes)?;
                    self.account(Source::Origin, bytes.len() as u64);
                    return ChunkMap::decode(&bytes).map_err(|source| SyncError::ChunkMap {
                        id: b.chunk_map,
                        source,
                    });
                }
                Err(e) => {
                    self.origin_failed(&e);
                    last = Some(e.into());
                }
            }
        }
        Err(last.unwrap_or(SyncError::ChunkMapUnavailable(b.chunk_map)))
    }

    fn account(&self, source: Source, n: u64) {
        self.service.metrics().sync_bytes(source, n);
        if let Ok(mut s) = self.status.lock() {
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
        }
    }

    /// Brings one blob into the store. `before`: the bytes of the release's blobs already complete (for
    /// the progress in status).
    async fn fetch_blob(
        &self,
        b: &BlobRef,
        release: &ReleaseRef,
        before: u64,
    ) -> Result<(), SyncError> {
        if self.store.has(&b.blob)? {
            return Ok(());
        }
        let map = self.chunk_map(b, release).await?;
        activation::check_chunk_map(&map, b)?;
        let (s, m) = (self.store.clone(), map.clone());
        joined(
            tokio::task::spawn_blocking(move || -> Result<_, deckhand_store::StoreError> {
                s.begin(&m)?;
                s.fill_local(&m.blob())
            })
            .await,
        )??;
        let index: HashMap<u64, usize> = map
            .chunks()
            .iter()
            .enumerate()
            .map(|(i, c)| (c.offset, i))
            .collect();
        let me = self
            .peers
            .as_ref()
            .map(|n| n.me().to_owned())
            .unwrap_or_default();
        let mut first_wait: HashMap<usize, Duration> = HashMap::new();
        let mut progress: HashMap<String, (usize, Duration)> = HashMap::new();
        let mut last_progress = Instant::now();
        let mut last_missing = usize::MAX;
        loop {
            let (s, id) = (self.store.clone(), b.blob);
            let missing = joined(tokio::task::spawn_blocking(move || s.missing(&id)).await)??;
            if missing.is_empty() {
                break;
            }
            let lacking: u64 = missing.iter().map(|c| u64::from(c.len)).sum();
            self.pending_update(|p| p.bytes_have = before + b.size.saturating_sub(lacking));
            let now_i = Instant::now();
            if missing.len() < last_missing {
                last_missing = missing.len();
                last_progress = now_i;
            } else if now_i.duration_since(last_progress) > STALL {
                return Err(SyncError::Stalled {
                    version: release.version,
                    secs: STALL.as_secs(),
                    why: format!(
                        "{} chunks of {} missing; no peer holds them and the origin is {}",
                        missing.len(),
                        b.blob,
                        if self.cfg.origin.is_none() {
                            "not configured"
                        } else {
                            "unreachable"
                        }
                    ),
                });
            }
            if let Some((peer, newer)) = self.superseded(release) {
                return Err(SyncError::Superseded {
                    version: release.version,
                    newer,
                    peer,
                });
            }
            let now = self.started.elapsed();
            // Who shares this release, and what they hold.
            let sharing = self.sharing(release);
            let origin_ok = self.origin_usable();
            // Tell peers whether this agent can still reach the origin (only when that changed).
            self.announce();
            let mut group: Vec<String> = self
                .origin_reachable()
                .then(|| me.clone())
                .into_iter()
                .collect();
            group.extend(sharing.iter().filter(|(_, w)| *w).map(|(p, _)| p.clone()));
            let bitmaps = self.bitmaps(&sharing, &b.blob).await;
            for (peer, bits) in &bitmaps {
                let count = bits.iter().map(|x| x.count_ones() as usize).sum::<usize>();
                let e = progress.entry(peer.clone()).or_insert((0, now));
                if count > e.0 {
                    *e = (count, now);
                }
            }
            let mut to_peer: Vec<(String, Chunk)> = Vec::new();
            let mut to_origin: Vec<Chunk> = Vec::new();
            let mut origin_bytes = 0u64;
            let mut load: HashMap<String, usize> = HashMap::new();
            for c in &missing {
                let Some(&i) = index.get(&c.offset) else {
                    continue;
                };
                let mut holders: Vec<String> = bitmaps
                    .iter()
                    .filter(|(_, bits)| bit(bits, i))
                    .map(|(p, _)| p.clone())
                    .collect();
                // Spread requests: least-loaded holder first.
                holders.sort_by_key(|p| load.get(p).copied().unwrap_or(0));
                let started = *first_wait.entry(i).or_insert(now);
                let fetcher = deckhand_protocol::sync::designated(&group, &c.id).unwrap_or(&me);
                // Waiting restarts while the designated fetcher makes progress.
                let since = progress
                    .get(fetcher)
                    .map(|(_, t)| (*t).max(started))
                    .unwrap_or(started);
                let view = View {
                    me: &me,
                    group: &group,
                    holders: &holders,
                    origin_reachable: origin_ok,
                    waiting_since: since,
                    max_wait: self.cfg.max_wait,
                    now,
                };
                match decide(&c.id, &view) {
                    Decision::FromPeer(p) => {
                        if to_peer.len() < PEER_CHUNKS_PER_ROUND {
                            *load.entry(p.clone()).or_insert(0) += 1;
                            to_peer.push((p, *c));
                        }
                    }
                    Decision::FromOrigin if origin_ok => {
                        if origin_bytes < ORIGIN_PER_ROUND {
                            origin_bytes += u64::from(c.len);
                            to_origin.push(*c);
                        }
                    }
                    Decision::FromOrigin | Decision::Wait { .. } => {}
                }
            }
            if to_peer.is_empty() && to_origin.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            tokio::join!(
                self.fetch_from_peers(to_peer),
                self.fetch_from_origin(b, &to_origin)
            );
        }
        let (s, id) = (self.store.clone(), b.blob);
        joined(tokio::task::spawn_blocking(move || s.complete(&id)).await)??;
        Ok(())
    }

    async fn bitmaps(&self, sharing: &[(String, bool)], blob: &BlobId) -> Vec<(String, Vec<u8>)> {
        let Some(node) = &self.peers else {
            return Vec::new();
        };
        let asks = sharing.iter().map(|(p, _)| async move {
            match node.get_have(p, blob).await {
                Ok(Some(bits)) => Some((p.clone(), bits)),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(peer = %p, cause = %e, "bitmap request failed");
                    None
                }
            }
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn fetch_from_peers(&self, jobs: Vec<(String, Chunk)>) {
        let Some(node) = &self.peers else { return };
        futures::stream::iter(jobs)
            .for_each_concurrent(PEER_PARALLEL, |(peer, c)| async move {
                // A peer that stalled, lied or left during this round is not asked again: its chunks are
                // planned elsewhere in the next round.
                if !node.is_usable(&peer) {
                    return;
                }
                match node.get_chunk(&peer, &c.id).await {
                    Ok(data) => {
                        let n = data.len() as u64;
                        let s = self.store.clone();
                        match tokio::task::spawn_blocking(move || s.put_chunk(&c.id, &data)).await {
                            Ok(Ok(_)) => {
                                self.account(Source::Peer, n);
                                self.pending_update(|p| p.bytes_have += n);
                            }
                            Ok(Err(e)) => tracing::warn!(peer = %peer, cause = %e, "chunk not stored"),
                            Err(e) => tracing::warn!(cause = %e, "store worker stopped"),
                        }
                    }
                    Err(e) => tracing::debug!(peer = %peer, chunk = %c.id, cause = %e, "chunk from peer failed"),
                }
            })
            .await;
    }

    async fn fetch_from_origin(&self, b: &BlobRef, chunks: &[Chunk]) {
        let Some(origin) = &self.cfg.origin else {
            return;
        };
        if chunks.is_empty() {
            return;
        }
        let key = origin.layout().blob(&b.blob);
        let ranges = coalesce(chunks, MAX_RANGE);
        futures::stream::iter(ranges)
            .for_each_concurrent(ORIGIN_PARALLEL, |range| {
                let key = key.clone();
                async move {
                    let data = match origin.get_range(&key, range.clone()).await {
                        Ok(d) => {
                            self.origin_ok();
                            d
                        }
                        Err(e) => {
                            tracing::debug!(cause = %e, "range GET failed");
                            self.origin_failed(&e);
                            return;
                        }
                    };
                    self.account(Source::Origin, data.len() as u64);
                    let inside: Vec<Chunk> = chunks
                        .iter()
                        .filter(|c| c.offset >= range.start && c.offset < range.end)
                        .copied()
                        .collect();
                    let s = self.store.clone();
                    let inside_bytes: u64 = inside.iter().map(|c| u64::from(c.len)).sum();
                    let stored = tokio::task::spawn_blocking(move || {
                        for c in inside {
                            let at = (c.offset - range.start) as usize;
                            let Some(bytes) = data.get(at..at + c.len as usize) else {
                                return Err(format!(
                                    "the origin returned {} bytes for a range of {}",
                                    data.len(),
                                    range.end - range.start
                                ));
                            };
                            s.put_chunk(&c.id, bytes).map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    })
                    .await;
                    match stored {
                        Ok(Ok(())) => self.pending_update(|p| p.bytes_have += inside_bytes),
                        Ok(Err(e)) => tracing::warn!(cause = %e, "origin bytes not stored"),
                        Err(e) => tracing::warn!(cause = %e, "store worker stopped"),
                    }
                }
            })
            .await;
    }
}

enum Event {
    Poll,
    Retry,
    Hint(Hint),
    Bundle(PathBuf),
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
