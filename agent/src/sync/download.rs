//! The pump around [`deckhand_protocol::fetch::Fetch`]: it feeds the state machine what happened (peers
//! up and down, pushed HAVEs and bitmaps, chunks stored, requests failed, ranges done) and carries out
//! what it asks (chunk requests to peers, Range GETs to the origin), in owned tasks of one `JoinSet`.
//! Every decision is the machine's; this file only does I/O, verification and storage.

use super::{Engine, SyncError};
use crate::metrics::RangeFailure;
use crate::metrics::Source;
use crate::origin::OriginError;
use crate::peer::{HaveNote, PeerError};
use deckhand_protocol::fetch::{Action, BlobChunks, Event, Fetch, FetchConfig};
use deckhand_protocol::wire::{MAX_HAVE, ReleaseRef};
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
struct RangeOutcome {
    /// The chunks stored from it.
    stored: Vec<BlobId>,
    /// Bytes the origin sent.
    received: u64,
    error: Option<RangeError>,
}

enum RangeError {
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
        &self,
        maps: &[ChunkMap],
        release: &ReleaseRef,
        before: u64,
    ) -> Result<(), SyncError> {
        let started = Instant::now();
        let now = || started.elapsed();
        let mut blobs = Vec::new();
        let mut held = Vec::new();
        for map in maps {
            let (s, id) = (self.store.clone(), map.blob());
            let bitmap =
                super::joined(tokio::task::spawn_blocking(move || s.have_bitmap(&id)).await)??
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
        // Where each chunk id sits, for the HAVEs this agent pushes.
        let mut places: HashMap<BlobId, Vec<(BlobId, u32)>> = HashMap::new();
        for b in &blobs {
            for (i, c) in b.chunks.iter().enumerate() {
                places.entry(c.id).or_default().push((b.blob, i as u32));
            }
        }
        let me = self
            .peers
            .as_ref()
            .map_or(self.cfg.agent_id.clone(), |n| n.me().to_owned());
        let mut fc = FetchConfig::new(me);
        fc.has_origin = self.cfg.origin.is_some();
        fc.max_wait = self.cfg.max_wait;
        // Peers are gathered once, when the node starts: a download that begins later already knows them.
        fc.gather = self.peers.as_ref().map_or(Duration::ZERO, |n| {
            self.cfg.gather.saturating_sub(n.uptime())
        });
        fc.origin_retry = super::ORIGIN_RETRY;
        fc.set_aside = crate::peer::SET_ASIDE;
        fc.ban = crate::peer::BAN;
        fc.stall = super::STALL;
        let mut fetch = Fetch::new(fc, &blobs, &held, now());
        let mut tasks: JoinSet<Done> = JoinSet::new();
        let mut known: BTreeMap<String, bool> = BTreeMap::new();
        let mut refresh_at = Duration::ZERO;
        let mut owed = Owed::default();
        // Peers that serve this release already: they hold every chunk of it.
        let mut serving: BTreeSet<String> = BTreeSet::new();
        let mut flush_at = Duration::ZERO;
        let mut haves = self.haves.lock().await;
        let mut last_have = fetch.progress().bytes_held;
        // The last refused answer of the origin, for a stall's message.
        let mut origin_bad: Option<String> = None;
        let mut budget: Option<Option<u64>> = None;
        loop {
            self.beat.beat();
            let t = now();
            // The budget at this minute of the local day.
            let zoned = jiff::Zoned::now();
            let minute = zoned.hour() as u16 * 60 + zoned.minute() as u16;
            let b = self.cfg.budget.at(minute);
            if budget != Some(b) {
                budget = Some(b);
                fetch.handle(Event::Budget { bytes_per_sec: b }, t);
            }
            // The peer table, as events.
            let usable = self.peers.as_ref().map(|n| n.usable()).unwrap_or_default();
            let mut seen = BTreeSet::new();
            for (peer, hello) in &usable {
                seen.insert(peer.clone());
                let shares = hello
                    .pending
                    .is_some_and(|r| r.manifest == release.manifest)
                    && hello.origin;
                let new = !known.contains_key(peer);
                if known.get(peer) != Some(&shares) {
                    known.insert(peer.clone(), shares);
                    fetch.handle(
                        Event::PeerUp {
                            peer: peer.clone(),
                            shares,
                        },
                        t,
                    );
                }
                if new {
                    self.ask_bitmaps(&mut tasks, peer, &blobs);
                }
                // A peer that switched to the release holds all of it, whatever its last HAVE pushes
                // said: its pieces are not fetched again when it stops sharing the origin fetches.
                if hello.active == Some(*release) && serving.insert(peer.clone()) {
                    for b in &blobs {
                        fetch.handle(
                            Event::Bitmap {
                                peer: peer.clone(),
                                blob: b.blob,
                                bitmap: vec![0xff; b.chunks.len().div_ceil(8)],
                            },
                            t,
                        );
                    }
                }
            }
            let gone: Vec<String> = known
                .keys()
                .filter(|p| !seen.contains(*p))
                .cloned()
                .collect();
            for peer in gone {
                known.remove(&peer);
                fetch.handle(Event::PeerDown { peer }, t);
            }
            if t >= refresh_at {
                refresh_at = t + REFRESH;
                for peer in known.keys() {
                    self.ask_bitmaps(&mut tasks, peer, &blobs);
                }
            }
            if let Some((peer, newer)) = self.superseded(release) {
                return Err(SyncError::Superseded {
                    version: release.version,
                    newer,
                    peer,
                });
            }
            let p = fetch.progress();
            if p.bytes_held != last_have {
                last_have = p.bytes_held;
                self.pending_update(|s| s.bytes_have = before + p.bytes_held);
            }
            if fetch.is_complete() {
                // Tell the others what the last chunks were before leaving.
                self.flush_haves(&mut tasks, release, &mut owed);
                break;
            }
            if fetch.stalled(t) {
                return Err(SyncError::Stalled {
                    version: release.version,
                    secs: super::STALL.as_secs(),
                    why: format!(
                        "{} chunks missing; no peer holds them and the origin is {}",
                        p.chunks_missing,
                        match (&self.cfg.origin, &origin_bad) {
                            (None, _) => "not configured".to_owned(),
                            (Some(_), Some(bad)) => format!("no help: {bad}"),
                            (Some(_), None) => "unreachable".to_owned(),
                        }
                    ),
                });
            }
            for action in fetch.poll(t) {
                self.start(&mut tasks, action);
            }
            self.announce();
            if t >= flush_at && !owed.is_empty() {
                flush_at = t + HAVE_EVERY;
                self.flush_haves(&mut tasks, release, &mut owed);
            }
            let wake = fetch
                .next_wake()
                .map_or(LOOK, |w| w.saturating_sub(t))
                .min(LOOK);
            let wake = if owed.is_empty() {
                wake
            } else {
                wake.min(flush_at.saturating_sub(t))
            };
            tokio::select! {
                Some(done) = tasks.join_next() => {
                    let done = match done {
                        Ok(d) => d,
                        Err(e) => return Err(SyncError::Worker(e)),
                    };
                    self.finished(done, &mut fetch, &places, &mut owed, &mut origin_bad, now())?;
                    // Take in whatever else finished meanwhile before deciding again.
                    while let Some(more) = tasks.try_join_next() {
                        let d = more.map_err(SyncError::Worker)?;
                        self.finished(d, &mut fetch, &places, &mut owed, &mut origin_bad, now())?;
                    }
                }
                Some(note) = recv_opt(&mut *haves) => {
                    take_have(&mut fetch, note, now());
                    while let Some(Ok(more)) = haves.as_mut().map(|h| h.try_recv()) {
                        take_have(&mut fetch, more, now());
                    }
                }
                _ = tokio::time::sleep(wake) => {}
            }
        }
        // The final HAVE pushes are short (2 s timeout each); they are not waited for past a moment. What
        // was owed to a peer while a push to it was in flight goes out once that push is done.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(done) = tasks.join_next().await {
                if let Ok(Done::Pushed { peer }) = done {
                    owed.pushing.remove(&peer);
                    self.flush_haves(&mut tasks, release, &mut owed);
                }
            }
        })
        .await;
        Ok(())
    }

    fn ask_bitmaps(&self, tasks: &mut JoinSet<Done>, peer: &str, blobs: &[BlobChunks]) {
        let Some(node) = self.peers.clone() else {
            return;
        };
        for b in blobs {
            let (node, peer, blob) = (node.clone(), peer.to_owned(), b.blob);
            tasks.spawn(async move {
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

    fn start(&self, tasks: &mut JoinSet<Done>, action: Action) {
        match action {
            Action::Ask { peer, id, .. } => {
                let Some(node) = self.peers.clone() else {
                    return;
                };
                let store = self.store.clone();
                tasks.spawn(async move {
                    let data = match node.get_chunk(&peer, &id).await {
                        Ok(d) => d,
                        Err(e) => {
                            return Done::Chunk {
                                peer,
                                id,
                                result: Err(e),
                            };
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
                let Some(origin) = self.cfg.origin.clone() else {
                    return;
                };
                let store = self.store.clone();
                tasks.spawn(async move {
                    let key = origin.layout().blob(&blob);
                    let outcome = match origin.get_range(&key, range.clone()).await {
                        Err(OriginError::Short { .. }) => RangeOutcome {
                            stored: Vec::new(),
                            received: 0,
                            error: Some(RangeError::Bad("fewer bytes than the range")),
                        },
                        Err(e) => RangeOutcome {
                            stored: Vec::new(),
                            received: 0,
                            error: Some(RangeError::Origin(e)),
                        },
                        Ok(data) => {
                            let start = range.start;
                            tokio::task::spawn_blocking(move || {
                                store_range(&store, start, &data, &chunks)
                            })
                            .await
                            .unwrap_or_else(|e| RangeOutcome {
                                stored: Vec::new(),
                                received: 0,
                                error: Some(RangeError::Store(SyncError::Worker(e))),
                            })
                        }
                    };
                    Done::Range {
                        blob,
                        range,
                        outcome,
                    }
                });
            }
        }
    }

    fn finished(
        &self,
        done: Done,
        fetch: &mut Fetch,
        places: &HashMap<BlobId, Vec<(BlobId, u32)>>,
        owed: &mut Owed,
        origin_bad: &mut Option<String>,
        t: Duration,
    ) -> Result<(), SyncError> {
        let mut stored = |fetch: &mut Fetch, id: BlobId| {
            fetch.handle(Event::Stored { id }, t);
            for (blob, i) in places.get(&id).into_iter().flatten() {
                owed.fresh.entry(*blob).or_default().insert(*i);
            }
        };
        match done {
            Done::Chunk {
                id, result: Ok(n), ..
            } => {
                self.account(Source::Peer, n);
                stored(fetch, id);
            }
            Done::Chunk {
                peer,
                id,
                result: Err(e),
            } => {
                tracing::debug!(peer = %peer, chunk = %id, cause = %e, "chunk from peer failed");
                fetch.handle(
                    Event::PeerFailed {
                        peer,
                        id,
                        failure: e.failure(),
                    },
                    t,
                );
            }
            Done::ChunkStoreFailed(e) => return Err(e),
            Done::Range {
                blob,
                range,
                outcome,
            } => {
                if outcome.received > 0 {
                    self.account(Source::Origin, outcome.received);
                }
                for id in outcome.stored {
                    stored(fetch, id);
                }
                match outcome.error {
                    None => {
                        self.origin_ok();
                        fetch.handle(Event::RangeDone { blob, range }, t);
                    }
                    Some(RangeError::Store(e)) => return Err(e),
                    Some(RangeError::Bad(why)) => {
                        tracing::warn!(blob = %blob, ?range, why, "the origin's answer to a range GET was refused");
                        self.service.metrics().range_failed(RangeFailure::Bad);
                        let bad = format!(
                            "the origin answered bytes {}..{} of blob {blob} with {why}: its copy is \
                             damaged or another release's",
                            range.start, range.end
                        );
                        if let Ok(mut s) = self.status.lock() {
                            s.last_error = Some(format!(
                                "{bad}; asking peers, and the origin again with backoff"
                            ));
                        }
                        *origin_bad = Some(bad);
                        fetch.handle(
                            Event::RangeFailed {
                                blob,
                                range,
                                unreachable: false,
                            },
                            t,
                        );
                    }
                    Some(RangeError::Origin(e)) => {
                        let why = if matches!(e, OriginError::Stalled { .. }) {
                            tracing::info!(blob = %blob, ?range, cause = %e, "range GET abandoned as stalled; fetching it again");
                            RangeFailure::Stalled
                        } else {
                            tracing::debug!(blob = %blob, ?range, cause = %e, "range GET failed");
                            RangeFailure::Error
                        };
                        self.service.metrics().range_failed(why);
                        self.origin_failed(&e);
                        fetch.handle(
                            Event::RangeFailed {
                                blob,
                                range,
                                unreachable: e.is_unreachable() || e.is_denied(),
                            },
                            t,
                        );
                    }
                }
            }
            Done::Bitmap {
                peer,
                blob,
                bitmap: Some(bitmap),
            } => fetch.handle(Event::Bitmap { peer, blob, bitmap }, t),
            Done::Bitmap { bitmap: None, .. } => {}
            Done::Pushed { peer } => {
                owed.pushing.remove(&peer);
            }
        }
        Ok(())
    }

    /// Pushes what was stored since the last push to every peer downloading the same release (one push
    /// in flight per peer; a peer still busy with the last one catches up from its bitmap refresh).
    /// Pushes to every peer downloading the same release the chunks owed to it, one push in flight per
    /// peer: what is stored meanwhile waits for that push to finish, and is not lost.
    fn flush_haves(&self, tasks: &mut JoinSet<Done>, release: &ReleaseRef, owed: &mut Owed) {
        let fresh = std::mem::take(&mut owed.fresh);
        let Some(node) = self.peers.clone() else {
            return;
        };
        let downloading: BTreeSet<String> = node
            .usable()
            .into_iter()
            .filter(|(_, h)| h.pending.is_some_and(|r| r.manifest == release.manifest))
            .map(|(peer, _)| peer)
            .collect();
        // A peer that left, or no longer downloads it, is owed nothing (it asks for bitmaps if it
        // comes back).
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
            tasks.spawn(async move {
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

fn take_have(fetch: &mut Fetch, note: HaveNote, t: Duration) {
    fetch.handle(
        Event::Have {
            peer: note.peer,
            blob: note.blob,
            chunks: note.chunks,
        },
        t,
    );
}

/// Stores the chunks of one origin range (on a blocking thread).
fn store_range(
    store: &deckhand_store::Store,
    start: u64,
    data: &[u8],
    chunks: &[Chunk],
) -> RangeOutcome {
    let mut out = RangeOutcome {
        stored: Vec::new(),
        received: data.len() as u64,
        error: None,
    };
    let mut batch = Vec::with_capacity(chunks.len());
    for c in chunks {
        let at = (c.offset - start) as usize;
        let Some(bytes) = data.get(at..at + c.len as usize) else {
            out.error = Some(RangeError::Bad("fewer bytes than the range"));
            break;
        };
        batch.push((c.id, bytes));
    }
    // One sync and one commit for the whole range.
    let put = store.put_chunks(&batch);
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
