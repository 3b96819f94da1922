//! The pump around [`deckhand_protocol::fetch::Fetch`]: it feeds the state machine what happened (peers
//! up and down, pushed HAVEs and bitmaps, chunks stored, requests failed, ranges done) and carries out
//! what it asks (chunk requests to peers, Range GETs to the origin), in owned tasks of one `JoinSet`.
//! Every decision about peers and the origin is the machine's (its verdicts on peers are recorded for
//! the peer node to enforce); this file does I/O, verification and storage, and the chores of a
//! member of the swarm: pushing HAVEs to the peers downloading the same release and refreshing their
//! bitmaps.

use super::{Engine, SyncError};
use crate::metrics::RangeFailure;
use crate::metrics::Source;
use crate::origin::OriginError;
use crate::peer::{HaveNote, PeerError};
use deckhand_protocol::fetch::{Action, BlobChunks, Event, Fetch};
use deckhand_protocol::wire::{Hello, MAX_HAVE, ReleaseRef};
use deckhand_protocol::{BlobId, Chunk, ChunkMap};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How often stored chunks are announced to the peers downloading the same release.
const HAVE_EVERY: Duration = Duration::from_millis(100);
/// How often every peer's bitmap is asked for again (anti-entropy: covers dropped announcements and
/// peers that hold chunks from other releases).
const REFRESH: Duration = Duration::from_secs(3);
/// The longest sleep between looks at the peer table.
const LOOK: Duration = Duration::from_millis(250);
/// How long the final HAVE pushes are waited for once the download is complete.
const LAST_PUSHES: Duration = Duration::from_millis(500);

/// What an owned task reports back.
enum Done {
    Chunk {
        peer: String,
        id: BlobId,
        result: Result<u64, PeerError>,
    },
    ChunkStoreFailed(SyncError),
    Range {
        blob: BlobId,
        range: Range<u64>,
        outcome: RangeOutcome,
    },
    Bitmap {
        peer: String,
        blob: BlobId,
        bitmap: Option<Vec<u8>>,
    },
    Pushed {
        peer: String,
    },
}

/// What became of one Range GET.
pub(super) struct RangeOutcome {
    /// The chunks stored from it.
    pub(super) stored: Vec<BlobId>,
    /// Bytes the origin sent.
    pub(super) received: u64,
    pub(super) error: Option<RangeError>,
}

pub(super) enum RangeError {
    Origin(OriginError),
    /// The origin sent fewer bytes than the range, or bytes that do not hash to the chunk map's ids.
    Bad(&'static str),
    Store(SyncError),
}

impl Engine {
    /// Brings every chunk of `maps` into the store (each blob begun, with what the store held already
    /// filled in), pumping the download state machine until it is complete. The caller completes the
    /// blobs. `before`: bytes of the release's blobs already complete, for the progress in status.
    pub(super) async fn download(
        &mut self,
        maps: &[ChunkMap],
        release: &ReleaseRef,
        before: u64,
        bases: &HashMap<BlobId, (BlobId, u64)>,
    ) -> Result<(), SyncError> {
        let mut pump = Pump::new(self, maps, *release, before).await?;
        pump.deltas = maps
            .iter()
            .filter_map(|m| {
                let (base, size) = bases.get(&m.blob())?;
                Some((
                    m.blob(),
                    std::sync::Arc::new(super::packed::Delta::new(m, *base, *size)),
                ))
            })
            .collect();
        loop {
            pump.engine.beat.beat();
            let t = pump.now();
            pump.budget_now(t);
            pump.look_at_peers(t);
            if let Some((peer, newer)) = pump.engine.superseded(release) {
                let version = release.version;
                return Err(SyncError::Superseded {
                    version,
                    newer,
                    peer,
                });
            }
            pump.show_progress();
            if pump.fetch.is_complete() {
                break;
            }
            if pump.fetch.stalled(t) {
                return Err(pump.stalled());
            }
            for action in pump.fetch.poll(t) {
                pump.start(action);
            }
            pump.engine.announce();
            pump.push_haves(t, false);
            let wake = pump.wake(t);
            tokio::select! {
                Some(done) = pump.tasks.join_next() => {
                    pump.finished(done.map_err(SyncError::Worker)?)?;
                    // Take in whatever else finished meanwhile before deciding again.
                    while let Some(more) = pump.tasks.try_join_next() {
                        pump.finished(more.map_err(SyncError::Worker)?)?;
                    }
                }
                Some(note) = recv_opt(&mut pump.haves) => {
                    pump.have(note);
                    while let Some(Ok(more)) = pump.haves.as_mut().map(|h| h.try_recv()) {
                        pump.have(more);
                    }
                }
                _ = tokio::time::sleep(wake) => {}
            }
        }
        pump.finish().await;
        Ok(())
    }
}

/// One download's state around its machine: the owned tasks, the peers fed to the machine, and the
/// HAVEs owed to the peers downloading the same release.
struct Pump<'e> {
    engine: &'e mut Engine,
    /// The engine's receiver of the HAVEs peers push, held for the download (given back on drop).
    haves: Option<tokio::sync::mpsc::Receiver<HaveNote>>,
    fetch: Fetch,
    release: ReleaseRef,
    blobs: Vec<BlobChunks>,
    /// Where each chunk id sits, for the HAVEs this agent pushes.
    places: HashMap<BlobId, Vec<(BlobId, u32)>>,
    /// Each blob's pack, read from the origin instead of the blob's raw bytes when it has one.
    packs: HashMap<BlobId, std::sync::Arc<super::packed::Pack>>,
    /// The delta packs of the blobs that replace one of the active release, read before their packs.
    deltas: HashMap<BlobId, std::sync::Arc<super::packed::Delta>>,
    tasks: JoinSet<Done>,
    /// The peers fed to the machine as up, and whether each shares the origin fetches.
    known: BTreeMap<String, bool>,
    /// Peers that serve this release already: they hold every chunk of it.
    serving: BTreeSet<String>,
    owed: Owed,
    started: Instant,
    refresh_at: Duration,
    flush_at: Duration,
    /// Bytes of the release complete before this download, and held as last shown in status.
    before: u64,
    shown: u64,
    /// The last refused answer of the origin, for a stall's message.
    origin_bad: Option<String>,
    /// The uplink budget last fed to the machine.
    budget: Option<Option<u64>>,
    stall: Duration,
}

impl<'e> Pump<'e> {
    async fn new(
        engine: &'e mut Engine,
        maps: &[ChunkMap],
        release: ReleaseRef,
        before: u64,
    ) -> Result<Pump<'e>, SyncError> {
        let started = Instant::now();
        let mut blobs = Vec::new();
        let mut held = Vec::new();
        for map in maps {
            let id = map.blob();
            let bitmap = engine
                .on_store(move |s| Ok(s.have_bitmap(&id)?))
                .await?
                .unwrap_or_default();
            held.push(
                (0..map.chunks().len() as u32)
                    .filter(|i| deckhand_protocol::sync::bit(&bitmap, *i as usize))
                    .collect(),
            );
            blobs.push(BlobChunks {
                blob: map.blob(),
                chunks: map.chunks().to_vec(),
            });
        }
        let mut places: HashMap<BlobId, Vec<(BlobId, u32)>> = HashMap::new();
        for b in &blobs {
            for (i, c) in b.chunks.iter().enumerate() {
                places.entry(c.id).or_default().push((b.blob, i as u32));
            }
        }
        let mut fc = engine.fetch_config();
        // Peers are gathered once, when the node starts: a download that begins later already knows them.
        fc.gather = engine
            .peers
            .as_ref()
            .map_or(Duration::ZERO, |n| fc.gather.saturating_sub(n.uptime()));
        let stall = fc.stall;
        let fetch = Fetch::new(fc, &blobs, &held, Duration::ZERO);
        Ok(Pump {
            haves: engine.haves.take(),
            engine,
            shown: fetch.progress().bytes_held,
            fetch,
            release,
            blobs,
            places,
            packs: maps
                .iter()
                .map(|m| (m.blob(), std::sync::Arc::new(super::packed::Pack::new(m))))
                .collect(),
            deltas: HashMap::new(),
            tasks: JoinSet::new(),
            known: BTreeMap::new(),
            serving: BTreeSet::new(),
            owed: Owed::default(),
            started,
            refresh_at: Duration::ZERO,
            flush_at: Duration::ZERO,
            before,
            origin_bad: None,
            budget: None,
            stall,
        })
    }

    /// The machine's clock: time since the download began.
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The shop's budget at this minute of the local day, fed in when it changed.
    fn budget_now(&mut self, t: Duration) {
        let zoned = jiff::Zoned::now();
        let minute = zoned.hour() as u16 * 60 + zoned.minute() as u16;
        let b = self.engine.cfg.budget.at(minute);
        if self.budget != Some(b) {
            self.budget = Some(b);
            self.fetch.handle(Event::Budget { bytes_per_sec: b }, t);
        }
    }

    /// The node's usable peers, fed in as changes (up, down, sharing or not); a new peer and, every
    /// [`REFRESH`], every peer is asked for its bitmaps.
    fn look_at_peers(&mut self, t: Duration) {
        let usable = self
            .engine
            .peers
            .as_ref()
            .map(|n| n.usable())
            .unwrap_or_default();
        let seen: BTreeSet<String> = usable.iter().map(|(p, _)| p.clone()).collect();
        for (peer, hello) in &usable {
            self.peer_seen(peer, hello, t);
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for peer in gone {
            // Its origin pieces go to the others: rare, and the reason a piece can cross the uplink
            // twice, so it is logged.
            if self.known.remove(&peer) == Some(true) {
                tracing::info!(%peer, "a peer sharing the origin fetches is no longer usable; its pieces go to the others");
            }
            self.fetch.handle(Event::PeerDown { peer }, t);
        }
        if t >= self.refresh_at {
            self.refresh_at = t + REFRESH;
            let known: Vec<String> = self.known.keys().cloned().collect();
            for peer in known {
                self.ask_bitmaps(&peer);
            }
        }
    }

    fn peer_seen(&mut self, peer: &str, hello: &Hello, t: Duration) {
        let release = self.release;
        let shares = hello
            .pending
            .is_some_and(|r| r.manifest == release.manifest)
            && hello.origin;
        let new = !self.known.contains_key(peer);
        if self.known.get(peer) != Some(&shares) {
            if self.known.insert(peer.to_owned(), shares) == Some(true) {
                tracing::info!(%peer, pending = ?hello.pending.map(|r| r.version), origin = hello.origin, "a peer stopped sharing the origin fetches; its pieces go to the others");
            }
            let peer = peer.to_owned();
            self.fetch.handle(Event::PeerUp { peer, shares }, t);
        }
        if new {
            self.ask_bitmaps(peer);
        }
        // A peer that switched to the release holds all of it, whatever its last HAVE pushes said: its
        // pieces are not fetched again when it stops sharing the origin fetches.
        if hello.active == Some(release) && self.serving.insert(peer.to_owned()) {
            for b in &self.blobs {
                let bitmap = vec![0xff; b.chunks.len().div_ceil(8)];
                let (peer, blob) = (peer.to_owned(), b.blob);
                self.fetch.handle(Event::Bitmap { peer, blob, bitmap }, t);
            }
        }
    }

    fn show_progress(&mut self) {
        let held = self.fetch.progress().bytes_held;
        if held != self.shown {
            self.shown = held;
            let have = self.before + held;
            self.engine.pending_update(|s| s.bytes_have = have);
        }
    }

    fn stalled(&self) -> SyncError {
        let p = self.fetch.progress();
        let origin = match (&self.engine.cfg.origin, &self.origin_bad) {
            (None, _) => "not configured".to_owned(),
            (Some(_), Some(bad)) => format!("no help: {bad}"),
            (Some(_), None) => "unreachable".to_owned(),
        };
        SyncError::Stalled {
            version: self.release.version,
            secs: self.stall.as_secs(),
            why: format!(
                "{} chunks missing; no peer holds them and the origin is {origin}",
                p.chunks_missing
            ),
        }
    }

    /// How long to sleep: until the machine's next wake or the next HAVE push, at most [`LOOK`].
    fn wake(&self, t: Duration) -> Duration {
        let wake = self
            .fetch
            .next_wake()
            .map_or(LOOK, |w| w.saturating_sub(t))
            .min(LOOK);
        if self.owed.is_empty() {
            wake
        } else {
            wake.min(self.flush_at.saturating_sub(t))
        }
    }

    fn have(&mut self, note: HaveNote) {
        let t = self.now();
        let HaveNote { peer, blob, chunks } = note;
        self.fetch.handle(Event::Have { peer, blob, chunks }, t);
    }

    /// The download is complete: what was stored last is pushed to the others, and the final pushes
    /// (short, 2 s timeout each) are waited for a moment. What was owed to a peer while a push to it was
    /// in flight goes out once that push is done.
    async fn finish(mut self) {
        self.push_haves(Duration::ZERO, true);
        let _ = tokio::time::timeout(LAST_PUSHES, async {
            while let Some(done) = self.tasks.join_next().await {
                if let Ok(Done::Pushed { peer }) = done {
                    self.owed.pushing.remove(&peer);
                    self.push_haves(Duration::ZERO, true);
                }
            }
        })
        .await;
    }

    fn ask_bitmaps(&mut self, peer: &str) {
        let Some(node) = self.engine.peers.clone() else {
            return;
        };
        for b in &self.blobs {
            let (node, peer, blob) = (node.clone(), peer.to_owned(), b.blob);
            self.tasks.spawn(async move {
                let bitmap = match node.get_have(&peer, &blob).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::debug!(peer = %peer, cause = %e, "bitmap request failed");
                        None
                    }
                };
                Done::Bitmap { peer, blob, bitmap }
            });
        }
    }

    /// Carries out one of the machine's actions in an owned task.
    fn start(&mut self, action: Action) {
        let store = self.engine.store.clone();
        match action {
            Action::Ask { peer, id, .. } => {
                let Some(node) = self.engine.peers.clone() else {
                    return;
                };
                self.tasks.spawn(async move {
                    let data = match node.get_chunk(&peer, &id).await {
                        Ok(d) => d,
                        Err(e) => {
                            let result = Err(e);
                            return Done::Chunk { peer, id, result };
                        }
                    };
                    let n = data.len() as u64;
                    match tokio::task::spawn_blocking(move || store.put_chunk(&id, &data)).await {
                        Ok(Ok(_)) => Done::Chunk {
                            peer,
                            id,
                            result: Ok(n),
                        },
                        Ok(Err(e)) => Done::ChunkStoreFailed(e.into()),
                        Err(e) => Done::ChunkStoreFailed(SyncError::Worker(e)),
                    }
                });
            }
            Action::Get {
                blob,
                range,
                chunks,
            } => {
                let Some(origin) = self.engine.cfg.origin.clone() else {
                    return;
                };
                let pack = self.packs.get(&blob).cloned();
                let delta = self.deltas.get(&blob).cloned();
                self.tasks.spawn(async move {
                    let outcome = super::packed::get_range(
                        &*origin,
                        &store,
                        delta.as_deref(),
                        pack.as_deref(),
                        &blob,
                        range.clone(),
                        chunks,
                    )
                    .await;
                    Done::Range {
                        blob,
                        range,
                        outcome,
                    }
                });
            }
        }
    }

    /// A chunk was stored: the machine is told, and every peer downloading the release is owed it.
    fn stored(&mut self, id: BlobId, t: Duration) {
        self.fetch.handle(Event::Stored { id }, t);
        for (blob, i) in self.places.get(&id).into_iter().flatten() {
            self.owed.fresh.entry(*blob).or_default().insert(*i);
        }
    }

    /// Feeds what a task reports into the machine. A store failure ends the download.
    fn finished(&mut self, done: Done) -> Result<(), SyncError> {
        let t = self.now();
        match done {
            Done::Chunk {
                id, result: Ok(n), ..
            } => {
                self.engine.account(Source::Peer, n);
                self.stored(id, t);
            }
            Done::Chunk {
                peer,
                id,
                result: Err(e),
            } => {
                tracing::debug!(peer = %peer, chunk = %id, cause = %e, "chunk from peer failed");
                let failure = e.failure();
                self.fetch
                    .handle(Event::PeerFailed { peer, id, failure }, t);
                for j in self.fetch.judgements() {
                    self.engine.record_judgement(&j, &e.to_string());
                }
            }
            Done::ChunkStoreFailed(e) => return Err(e),
            Done::Range {
                blob,
                range,
                outcome,
            } => self.range_finished(blob, range, outcome, t)?,
            Done::Bitmap {
                peer,
                blob,
                bitmap: Some(bitmap),
            } => self.fetch.handle(Event::Bitmap { peer, blob, bitmap }, t),
            Done::Bitmap { bitmap: None, .. } => {}
            Done::Pushed { peer } => {
                self.owed.pushing.remove(&peer);
            }
        }
        Ok(())
    }

    fn range_finished(
        &mut self,
        blob: BlobId,
        range: Range<u64>,
        outcome: RangeOutcome,
        t: Duration,
    ) -> Result<(), SyncError> {
        if outcome.received > 0 {
            self.engine.account(Source::Origin, outcome.received);
        }
        for id in outcome.stored {
            self.stored(id, t);
        }
        let unreachable = match outcome.error {
            None => {
                self.engine.origin_ok();
                self.fetch.handle(Event::RangeDone { blob, range }, t);
                return Ok(());
            }
            Some(RangeError::Store(e)) => return Err(e),
            Some(RangeError::Bad(why)) => {
                tracing::warn!(blob = %blob, ?range, why, "the origin's answer to a range GET was refused");
                self.engine
                    .service
                    .metrics()
                    .range_failed(RangeFailure::Bad);
                let bad = format!(
                    "the origin answered bytes {}..{} of blob {blob} with {why}: its copy is \
                     damaged or another release's",
                    range.start, range.end
                );
                self.engine.note_status(|s| {
                    s.last_error = Some(format!(
                        "{bad}; asking peers, and the origin again with backoff"
                    ));
                });
                self.origin_bad = Some(bad);
                false
            }
            Some(RangeError::Origin(e)) => {
                // The bytes received before it failed were counted; the chunks they did not complete
                // are fetched again.
                let received = outcome.received;
                let why = if matches!(e, OriginError::Stalled { .. }) {
                    tracing::info!(blob = %blob, ?range, received, cause = %e, "range GET abandoned as stalled; fetching it again");
                    RangeFailure::Stalled
                } else if received > 0 {
                    tracing::info!(blob = %blob, ?range, received, cause = %e, "range GET failed part way; fetching the rest again");
                    RangeFailure::Error
                } else {
                    tracing::debug!(blob = %blob, ?range, cause = %e, "range GET failed");
                    RangeFailure::Error
                };
                self.engine.service.metrics().range_failed(why);
                self.engine.origin_failed(&e);
                e.is_unreachable() || e.is_denied()
            }
        };
        self.fetch.handle(
            Event::RangeFailed {
                blob,
                range,
                unreachable,
            },
            t,
        );
        Ok(())
    }

    /// Pushes to every peer downloading the same release the chunks owed to it, every [`HAVE_EVERY`]
    /// (or now, when `now` is set), one push in flight per peer: what is stored meanwhile waits for that
    /// push to finish, and is not lost.
    fn push_haves(&mut self, t: Duration, now: bool) {
        if !now && (t < self.flush_at || self.owed.is_empty()) {
            return;
        }
        self.flush_at = t + HAVE_EVERY;
        let fresh = std::mem::take(&mut self.owed.fresh);
        let Some(node) = self.engine.peers.clone() else {
            return;
        };
        let release = self.release;
        let downloading: BTreeSet<String> = node
            .usable()
            .into_iter()
            .filter(|(_, h)| h.pending.is_some_and(|r| r.manifest == release.manifest))
            .map(|(peer, _)| peer)
            .collect();
        // A peer that left, or no longer downloads it, is owed nothing (it asks for bitmaps if it
        // comes back).
        let owed = &mut self.owed;
        owed.per_peer.retain(|peer, _| downloading.contains(peer));
        for peer in downloading {
            let debt = owed.per_peer.entry(peer.clone()).or_default();
            for (blob, idx) in &fresh {
                debt.entry(*blob).or_default().extend(idx.iter().copied());
            }
            if owed.pushing.contains(&peer) || debt.is_empty() {
                continue;
            }
            let batches: Vec<(BlobId, Vec<u32>)> = std::mem::take(debt)
                .into_iter()
                .flat_map(|(blob, idx)| {
                    let idx: Vec<u32> = idx.into_iter().collect();
                    idx.chunks(MAX_HAVE)
                        .map(|c| (blob, c.to_vec()))
                        .collect::<Vec<_>>()
                })
                .collect();
            owed.pushing.insert(peer.clone());
            let node = node.clone();
            self.tasks.spawn(async move {
                for (blob, chunks) in batches {
                    if let Err(e) = node.push_have(&peer, &blob, chunks).await {
                        tracing::debug!(peer = %peer, cause = %e, "have push failed");
                        break;
                    }
                }
                Done::Pushed { peer }
            });
        }
    }
}

impl Drop for Pump<'_> {
    fn drop(&mut self) {
        self.engine.haves = self.haves.take();
    }
}

/// HAVE announcements this agent owes the peers downloading the same release.
#[derive(Default)]
struct Owed {
    /// Stored since the last flush, not yet assigned to peers.
    fresh: BTreeMap<BlobId, BTreeSet<u32>>,
    /// Per peer, what it has not been told yet.
    per_peer: BTreeMap<String, BTreeMap<BlobId, BTreeSet<u32>>>,
    /// Peers with a push in flight.
    pushing: BTreeSet<String>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.fresh.is_empty() && self.per_peer.values().all(BTreeMap::is_empty)
    }
}

impl RangeOutcome {
    pub(super) fn failed(error: RangeError) -> Self {
        RangeOutcome {
            stored: Vec::new(),
            received: 0,
            error: Some(error),
        }
    }
}

/// Stores the chunks of one origin range (on a blocking thread).
pub(super) fn store_range(
    store: &deckhand_store::Store,
    start: u64,
    data: &[u8],
    chunks: &[Chunk],
) -> RangeOutcome {
    let mut batch = Vec::with_capacity(chunks.len());
    let mut short = false;
    for c in chunks {
        let at = (c.offset - start) as usize;
        let Some(bytes) = data.get(at..at + c.len as usize) else {
            short = true;
            break;
        };
        batch.push((c.id, bytes));
    }
    let mut out = store_batch(store, &batch, data.len() as u64);
    if short && out.error.is_none() {
        out.error = Some(RangeError::Bad("fewer bytes than the range"));
    }
    out
}

/// Stores the chunks of one origin answer (`received` bytes) with one sync and one commit.
pub(super) fn store_batch(
    store: &deckhand_store::Store,
    batch: &[(BlobId, &[u8])],
    received: u64,
) -> RangeOutcome {
    let mut out = RangeOutcome {
        stored: Vec::new(),
        received,
        error: None,
    };
    let put = store.put_chunks(batch);
    out.stored = batch[..put.stored].iter().map(|(id, _)| *id).collect();
    match put.error {
        // Bytes that do not hash to the chunk map's id: the origin's copy is damaged.
        Some(deckhand_store::StoreError::ContentMismatch { .. }) => {
            out.error = Some(RangeError::Bad("bytes that do not match the chunk map"));
        }
        Some(e) => out.error = Some(RangeError::Store(e.into())),
        None => {}
    }
    out
}

async fn recv_opt<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
