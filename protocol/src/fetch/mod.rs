//! The download of one release, as a state machine with no I/O.
//!
//! In the manner of quinn-proto's `Connection`: the caller feeds [`Event`]s in (a peer came or went, a
//! peer announced chunks it verified, a chunk was stored, a request failed, an origin range finished) and
//! takes [`Action`]s out ([`Fetch::poll`]: ask peer P for chunk C, GET this origin range), and sleeps
//! until [`Fetch::next_wake`] or the next event. Every decision (who to ask, what to take from the
//! origin, how long to wait for a chunk's designated fetcher, when a peer is set aside or banned, when to
//! retry the origin) is made here from the events and the `now` the caller passes; the agent's tasks and
//! the fleet simulator ([`crate::sim`]) only pump. The verdicts on peers come out as [`Judgement`]s
//! ([`Fetch::judgements`]) for the caller to record and enforce beyond this download; their durations
//! live in [`FetchConfig`] only ([`FetchConfig::judge`]).
//!
//! * **Pipelined.** A window of requests stays in flight per peer ([`FetchConfig::peer_window`]) and for
//!   the origin ([`FetchConfig::origin_window`] Range GETs); every completion frees a slot that the next
//!   `poll` fills. There are no rounds. The origin's window is also a number of bytes that follows the
//!   rate this agent gets ([`FetchConfig::origin_target`]): on a shop uplink shared by many agents, a
//!   full window each would queue minutes of requests, and every piece whose designation moves while it
//!   is queued would cross the uplink twice.
//! * **One uplink.** Origin bytes are assigned in pieces ([`FetchConfig::piece`] bytes of a blob): each
//!   piece's designated fetcher is chosen by rendezvous hashing over the agents that want the release and
//!   reach the origin ([`crate::sync::designated`]), so all agents agree without a tracker. A chunk some
//!   peer holds is taken from that peer. Any other chunk waits for its designated fetcher, for
//!   [`FetchConfig::max_wait`] after that fetcher last showed progress, then is taken from the origin.
//! * **Cold start.** For [`FetchConfig::gather`] after the download starts nothing is taken from the
//!   origin, so the peers booting at the same moment are known before the pieces are shared out. A peer
//!   that appears later takes its share at once: its pieces are designated to it from the moment it is
//!   up.
//! * **A new release.** An agent that learns of a release first (its poll of the origin came first)
//!   waits up to [`FetchConfig::join_wait`] for the live peers to take it up too, which they do within
//!   moments of its announcement; until then it would be the designated fetcher of their pieces, and
//!   their ranges would cross the uplink twice. The wait ends once every live peer shares.
//!
//! The state is split as quinn-proto splits a connection: [`peers`] (what each peer holds, its window
//! and its verdicts), [`origin`] (the origin's window, backoff and the uplink budget), the designation
//! of pieces, and the timers `poll` collects into one [`Fetch::next_wake`]; [`poll`] takes its steps
//! by name.

mod origin;
mod peers;
mod poll;
#[cfg(test)]
mod tests;

use crate::chunk::Chunk;
use crate::id::BlobId;
use origin::{Budget, OriginWindow};
use peers::PeerTable;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::time::Duration;

/// The unit of origin assignment the agents use: the chunks of a blob whose offsets fall in one 1 MiB
/// slice share a designated fetcher ([`crate::sync::piece_fetcher`]).
pub const PIECE: u64 = 1024 * 1024;

/// The chunks of one blob to bring in, in chunk-map order.
#[derive(Clone, Debug)]
pub struct BlobChunks {
    pub blob: BlobId,
    pub chunks: Vec<Chunk>,
}

/// The knobs of a download. [`FetchConfig::new`] gives the agent's defaults.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// This agent's id.
    pub me: String,
    /// Whether this agent has an origin at all.
    pub has_origin: bool,
    /// How long a chunk waits for its designated fetcher after that fetcher last made progress.
    pub max_wait: Duration,
    /// How long after the download starts nothing is taken from the origin, so booting peers are known.
    pub gather: Duration,
    /// How long after the download starts origin work waits for the live peers that do not want this
    /// release yet: they learn of it from this agent's announcement within moments, and a piece fetched
    /// before they share would be one another member is designated for. The wait ends as soon as every
    /// live peer shares.
    pub join_wait: Duration,
    /// Chunk requests in flight per peer.
    pub peer_window: usize,
    /// Chunk requests in flight to all peers together.
    pub max_inflight: usize,
    /// Origin Range GETs in flight, at most.
    pub origin_window: usize,
    /// How long an origin range should take: the bytes in flight to the origin are kept near what this
    /// agent receives in that time (a window grown on fast ranges, shrunk on slow ones), so a shared
    /// uplink never holds minutes of requests that a change of designation would duplicate.
    pub origin_target: Duration,
    /// The bytes in flight to the origin before the first range has come back.
    pub origin_initial: u64,
    /// The longest Range GET.
    pub max_range: u64,
    /// The unit of origin assignment: a blob's chunks whose offsets fall in one `piece`-byte slice.
    pub piece: u64,
    /// After the origin could not be reached, how long it is left alone.
    pub origin_retry: Duration,
    /// After an origin answer failed otherwise (5xx, a cut body), the first retry delay; it doubles per
    /// failure in a row up to `origin_retry`.
    pub origin_backoff: Duration,
    /// How long a peer that timed out is not asked.
    pub set_aside: Duration,
    /// How long a peer that sent a chunk failing verification is not asked.
    pub ban: Duration,
    /// How long a peer that answered Busy is not asked.
    pub busy: Duration,
    /// No chunk stored for this long: the download is stalled (the caller gives up and retries later).
    pub stall: Duration,
}

impl FetchConfig {
    pub fn new(me: impl Into<String>) -> Self {
        FetchConfig {
            me: me.into(),
            has_origin: true,
            max_wait: Duration::from_secs(20),
            gather: Duration::from_secs(2),
            join_wait: Duration::from_secs(2),
            peer_window: 8,
            max_inflight: 32,
            origin_window: 4,
            origin_target: Duration::from_secs(1),
            origin_initial: 256 * 1024,
            max_range: 1024 * 1024,
            piece: PIECE,
            origin_retry: Duration::from_secs(5),
            origin_backoff: Duration::from_millis(200),
            set_aside: Duration::from_secs(15),
            ban: Duration::from_secs(600),
            busy: Duration::from_millis(50),
            stall: Duration::from_secs(45),
        }
    }

    /// The verdict a failed request earns its peer, if any: set aside after a timeout or a broken
    /// exchange, banned for bytes that fail verification (a chunk, a chunk map, a manifest it relayed).
    /// Busy and not-found answers are honest: they earn none (a busy peer is paused inside the download
    /// only, see [`FetchConfig::busy`]).
    pub fn judge(&self, peer: &str, failure: PeerFailure) -> Option<Judgement> {
        let (verdict, lasts) = match failure {
            PeerFailure::Timeout | PeerFailure::Other => (Verdict::SetAside, self.set_aside),
            PeerFailure::Corrupt => (Verdict::Banned, self.ban),
            PeerFailure::Busy | PeerFailure::NotFound => return None,
        };
        Some(Judgement {
            peer: peer.to_owned(),
            verdict,
            lasts,
            failure,
        })
    }
}

/// Why a chunk request to a peer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerFailure {
    /// No answer in time: the peer is set aside.
    Timeout,
    /// The peer does not hold the chunk after all: its announcement is corrected.
    NotFound,
    /// The peer is at its serving limit: asked again a little later.
    Busy,
    /// The bytes failed verification: the peer is banned.
    Corrupt,
    /// Anything else (the connection dropped, an error answer): set aside.
    Other,
}

/// What a peer is not asked for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not asked for [`FetchConfig::set_aside`]: it stalled or failed.
    SetAside,
    /// Not asked, served or listened to for [`FetchConfig::ban`]: it sent bytes that failed
    /// verification.
    Banned,
}

/// A verdict passed on a peer, for the caller to log, count, show and enforce beyond this download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub peer: String,
    pub verdict: Verdict,
    /// How long it stands, from when it was passed.
    pub lasts: Duration,
    /// What earned it.
    pub failure: PeerFailure,
}

/// What the caller tells the machine.
#[derive(Clone, Debug)]
pub enum Event {
    /// A peer of the deployment is up (it joined, or its announcement changed). `shares`: it wants this
    /// release and reaches the origin, so it takes a share of the origin fetches.
    PeerUp { peer: String, shares: bool },
    /// A peer left, died or is no longer usable.
    PeerDown { peer: String },
    /// A peer announced chunks of `blob` (indices in chunk-map order) that it verified and stored.
    Have {
        peer: String,
        blob: BlobId,
        chunks: Vec<u32>,
    },
    /// A peer's whole bitmap of `blob` (bit `i` set: chunk `i` held).
    Bitmap {
        peer: String,
        blob: BlobId,
        bitmap: Vec<u8>,
    },
    /// A chunk was verified and stored (every place in the release that names it is now held).
    Stored { id: BlobId },
    /// A chunk request to a peer failed.
    PeerFailed {
        peer: String,
        id: BlobId,
        failure: PeerFailure,
    },
    /// An origin range finished: every chunk inside it was stored (or, if not, is wanted again).
    RangeDone { blob: BlobId, range: Range<u64> },
    /// The shop's uplink budget now, bytes per second for all agents together (`None`: no limit). This
    /// agent takes an equal share among the agents sharing the origin fetches.
    Budget { bytes_per_sec: Option<u64> },
    /// An origin range failed. `unreachable`: the origin could not be reached at all.
    RangeFailed {
        blob: BlobId,
        range: Range<u64>,
        unreachable: bool,
    },
}

/// What the machine asks the caller to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask `peer` for chunk `id` (`len` bytes), then report `Stored` or `PeerFailed`.
    Ask { peer: String, id: BlobId, len: u32 },
    /// GET `range` of `blob` from the origin, store the `chunks` inside it, then report `RangeDone` or
    /// `RangeFailed`.
    Get {
        blob: BlobId,
        range: Range<u64>,
        chunks: Vec<Chunk>,
    },
}

/// How far the download is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub bytes_total: u64,
    pub bytes_held: u64,
    pub chunks_missing: usize,
    pub peer_requests: usize,
    pub origin_requests: usize,
}

/// One place of a chunk in the release.
#[derive(Clone, Debug)]
struct Place {
    blob: usize,
    chunk: Chunk,
    /// The piece that decides the chunk's designated fetcher: of its first place in the release.
    blob_of_piece: usize,
    piece: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flight {
    Peer(usize),
    Origin,
}

/// The release being brought in: where every chunk sits. Fixed for the download.
#[derive(Debug)]
struct Layout {
    blobs: Vec<BlobId>,
    blob_index: HashMap<BlobId, usize>,
    /// Every place, blob by blob in chunk-map order.
    places: Vec<Place>,
    /// The first place of each blob.
    blob_start: Vec<usize>,
    /// Every place of each chunk id.
    by_id: HashMap<BlobId, Vec<usize>>,
    total_bytes: u64,
}

impl Layout {
    fn new(blobs: &[BlobChunks], piece: u64) -> Self {
        let mut places = Vec::new();
        let mut blob_start = Vec::new();
        let mut by_id: HashMap<BlobId, Vec<usize>> = HashMap::new();
        let piece = piece.max(1);
        for (b, bc) in blobs.iter().enumerate() {
            blob_start.push(places.len());
            for c in &bc.chunks {
                by_id.entry(c.id).or_default().push(places.len());
                places.push(Place {
                    blob: b,
                    blob_of_piece: b,
                    chunk: *c,
                    piece: (c.offset / piece) as usize,
                });
            }
        }
        // A chunk named at several places is designated by its first.
        for p in 0..places.len() {
            let first = by_id[&places[p].chunk.id][0];
            places[p].blob_of_piece = places[first].blob;
            places[p].piece = places[first].piece;
        }
        Layout {
            blob_index: blobs.iter().enumerate().map(|(i, b)| (b.blob, i)).collect(),
            blobs: blobs.iter().map(|b| b.blob).collect(),
            total_bytes: places.iter().map(|p| u64::from(p.chunk.len)).sum(),
            places,
            blob_start,
            by_id,
        }
    }

    fn blob_len(&self, b: usize) -> usize {
        self.blob_start
            .get(b + 1)
            .copied()
            .unwrap_or(self.places.len())
            - self.blob_start[b]
    }

    /// Every place of chunk `id`.
    fn places_of(&self, id: &BlobId) -> &[usize] {
        self.by_id.get(id).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// The designated origin fetcher of each (blob, piece), for the group (the peers that share, this
/// agent if it reaches the origin) as it was at `epoch`. Any change to the group bumps `group`, and
/// the table is recomputed lazily.
#[derive(Debug, Default)]
struct Designation {
    table: HashMap<(usize, usize), Option<usize>>,
    /// Bumped whenever the group changes.
    group: u64,
    /// The group the table was computed for.
    epoch: u64,
}

/// When the download's deadlines fall. `wake` is the earliest time `poll` found something may change
/// without another event.
#[derive(Debug)]
struct Timers {
    /// Until when nothing is taken from the origin ([`FetchConfig::gather`]).
    gather_until: Duration,
    /// Until when origin work waits for live peers to take up the release ([`FetchConfig::join_wait`]).
    join_until: Duration,
    /// The last chunk stored: the stall deadline runs from it.
    last_progress: Duration,
    wake: Option<Duration>,
}

/// The earliest of the times a `poll` found it must look again at.
#[derive(Debug)]
struct Wake {
    now: Duration,
    at: Option<Duration>,
}

impl Wake {
    fn new(now: Duration) -> Self {
        Wake { now, at: None }
    }
    /// Something may change at `t` (ignored unless it is in the future).
    fn at(&mut self, t: Duration) {
        if t > self.now {
            self.at = Some(self.at.map_or(t, |w| w.min(t)));
        }
    }
}

/// The download of one release: see the module documentation.
#[derive(Debug)]
pub struct Fetch {
    cfg: FetchConfig,
    layout: Layout,
    /// Places not held, in order.
    missing: BTreeSet<usize>,
    held_bytes: u64,
    inflight: HashMap<BlobId, Flight>,
    /// When a chunk began waiting for its designated fetcher.
    waiting: HashMap<BlobId, Duration>,
    peers: PeerTable,
    designation: Designation,
    origin: OriginWindow,
    budget: Budget,
    timers: Timers,
    peer_requests: usize,
    origin_requests: usize,
    /// Verdicts passed since the caller last took them.
    judged: Vec<Judgement>,
}

/// The slot standing for this agent in designation.
const ME: usize = usize::MAX;

impl Fetch {
    /// A download of `blobs`; `held` lists, per blob (same order), the chunk indices the store already
    /// holds. `now` starts the clock (gathering, stall detection).
    pub fn new(cfg: FetchConfig, blobs: &[BlobChunks], held: &[Vec<u32>], now: Duration) -> Self {
        let layout = Layout::new(blobs, cfg.piece);
        let mut missing: BTreeSet<usize> = (0..layout.places.len()).collect();
        let mut held_bytes = 0;
        for (b, idx) in held.iter().enumerate().take(blobs.len()) {
            for &i in idx {
                let p = layout.blob_start[b] + i as usize;
                if p < layout.places.len()
                    && (i as usize) < blobs[b].chunks.len()
                    && missing.remove(&p)
                {
                    held_bytes += u64::from(layout.places[p].chunk.len);
                }
            }
        }
        let mut f = Fetch {
            peers: PeerTable::new(layout.places.len()),
            missing,
            held_bytes,
            inflight: HashMap::new(),
            waiting: HashMap::new(),
            designation: Designation {
                epoch: u64::MAX,
                ..Designation::default()
            },
            origin: OriginWindow::new(&cfg),
            budget: Budget::new(now),
            timers: Timers {
                gather_until: now + cfg.gather,
                join_until: now + cfg.join_wait,
                last_progress: now,
                wake: None,
            },
            peer_requests: 0,
            origin_requests: 0,
            judged: Vec::new(),
            layout,
            cfg,
        };
        // A chunk held at one place (a duplicate within the release) is held at all of them.
        let held_ids: Vec<BlobId> = (0..f.layout.places.len())
            .filter(|p| !f.missing.contains(p))
            .map(|p| f.layout.places[p].chunk.id)
            .collect();
        for id in held_ids {
            f.mark_held(&id);
        }
        f
    }

    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            bytes_total: self.layout.total_bytes,
            bytes_held: self.held_bytes,
            chunks_missing: self.missing.len(),
            peer_requests: self.peer_requests,
            origin_requests: self.origin_requests,
        }
    }

    /// No chunk stored for [`FetchConfig::stall`]: the caller should give up for now.
    pub fn stalled(&self, now: Duration) -> bool {
        !self.is_complete() && now >= self.timers.last_progress + self.cfg.stall
    }

    /// Whether this agent reaches the origin, as far as its last range showed (what it announces).
    pub fn origin_reachable(&self) -> bool {
        self.origin.reachable
    }

    /// The verdicts passed on peers since the last call, oldest first.
    pub fn judgements(&mut self) -> Vec<Judgement> {
        std::mem::take(&mut self.judged)
    }

    /// The earliest time something may be decided without another event (a wait running out, the origin
    /// or a peer becoming usable again, the gathering ending, the stall deadline), as of the last `poll`.
    pub fn next_wake(&self) -> Option<Duration> {
        let stall = (!self.is_complete()).then_some(self.timers.last_progress + self.cfg.stall);
        [self.timers.wake, stall].into_iter().flatten().min()
    }

    fn mark_held(&mut self, id: &BlobId) -> bool {
        let mut newly = false;
        for &p in self.layout.places_of(id) {
            if self.missing.remove(&p) {
                self.held_bytes += u64::from(self.layout.places[p].chunk.len);
                newly = true;
            }
        }
        self.waiting.remove(id);
        newly
    }

    fn end_flight(&mut self, id: &BlobId) -> Option<Flight> {
        let f = self.inflight.remove(id)?;
        if let Flight::Peer(s) = f {
            self.peers.request_ended(s);
        }
        Some(f)
    }

    /// Feeds one event in.
    pub fn handle(&mut self, event: Event, now: Duration) {
        match event {
            Event::PeerUp { peer, shares } => self.peer_up(&peer, shares, now),
            Event::PeerDown { peer } => self.peer_down(&peer),
            Event::Have { peer, blob, chunks } => self.announced(&peer, &blob, chunks, now),
            Event::Bitmap { peer, blob, bitmap } => {
                let held = (0..bitmap.len() * 8)
                    .filter(|i| crate::sync::bit(&bitmap, *i))
                    .map(|i| i as u32);
                self.announced(&peer, &blob, held, now);
            }
            Event::Stored { id } => {
                if let Some(Flight::Peer(s)) = self.inflight.get(&id).copied() {
                    self.end_flight(&id);
                    self.peers.answered(s);
                }
                if self.mark_held(&id) {
                    self.timers.last_progress = now;
                }
            }
            Event::PeerFailed { peer, id, failure } => self.peer_failed(&peer, &id, failure, now),
            Event::RangeDone { blob, range } => self.range_done(&blob, &range, now),
            Event::Budget { bytes_per_sec } => self.set_budget(bytes_per_sec, now),
            Event::RangeFailed {
                blob,
                range,
                unreachable,
            } => self.range_failed(&blob, &range, unreachable, now),
        }
    }

    /// The designated origin fetcher of a piece: a peer slot, [`ME`], or `None` (nobody shares).
    fn designated_for(&mut self, blob: usize, piece: usize) -> Option<usize> {
        let d = &mut self.designation;
        if d.epoch != d.group {
            d.table.clear();
            d.epoch = d.group;
        }
        if let Some(s) = d.table.get(&(blob, piece)) {
            return *s;
        }
        let key = crate::sync::piece_key(&self.layout.blobs[blob], piece as u64);
        let me_in = self.cfg.has_origin && self.origin.reachable;
        let mut best: Option<([u8; 32], &str, usize)> = None;
        let candidates = self
            .peers
            .sharing()
            .chain(me_in.then_some((ME, self.cfg.me.as_str())));
        for (s, name) in candidates {
            let score = crate::sync::rendezvous_score(name, &key);
            let better = match &best {
                None => true,
                Some((bs, bn, _)) => score > *bs || (score == *bs && name < *bn),
            };
            if better {
                best = Some((score, name, s));
            }
        }
        let s = best.map(|(_, _, s)| s);
        d.table.insert((blob, piece), s);
        s
    }
}
