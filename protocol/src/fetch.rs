//! The download of one release, as a state machine with no I/O.
//!
//! In the manner of quinn-proto's `Connection`: the caller feeds [`Event`]s in (a peer came or went, a
//! peer announced chunks it verified, a chunk was stored, a request failed, an origin range finished) and
//! takes [`Action`]s out ([`Fetch::poll`]: ask peer P for chunk C, GET this origin range), and sleeps
//! until [`Fetch::next_wake`] or the next event. Every decision (who to ask, what to take from the
//! origin, how long to wait for a chunk's designated fetcher, when a peer is set aside or banned, when to
//! retry the origin) is made here from the events and the `now` the caller passes; the agent's tasks and
//! the fleet simulator ([`crate::sim`]) only pump.
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

use crate::chunk::Chunk;
use crate::id::BlobId;
use std::collections::{BTreeMap, BTreeSet, HashMap};
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

#[derive(Clone, Debug)]
struct PeerView {
    name: String,
    up: bool,
    shares: bool,
    /// Bit per place: the peer holds it.
    have: Vec<u64>,
    held: usize,
    inflight: usize,
    /// The last time the peer showed progress (more chunks held), or came up.
    progress_at: Duration,
    banned_until: Option<Duration>,
    aside_until: Option<Duration>,
    busy_until: Option<Duration>,
    /// Busy answers in a row: each doubles the pause before this peer is asked again.
    busy_streak: u32,
}

impl PeerView {
    fn has(&self, place: usize) -> bool {
        self.have
            .get(place / 64)
            .is_some_and(|w| w & (1 << (place % 64)) != 0)
    }
    /// Sets the bit; true if it was not set.
    fn set(&mut self, place: usize) -> bool {
        match self.have.get_mut(place / 64) {
            Some(w) if *w & (1 << (place % 64)) == 0 => {
                *w |= 1 << (place % 64);
                self.held += 1;
                true
            }
            _ => false,
        }
    }
    fn clear(&mut self, place: usize) {
        if let Some(w) = self.have.get_mut(place / 64)
            && *w & (1 << (place % 64)) != 0
        {
            *w &= !(1 << (place % 64));
            self.held -= 1;
        }
    }
    fn usable(&self, now: Duration) -> bool {
        self.up
            && self.banned_until.is_none_or(|t| t <= now)
            && self.aside_until.is_none_or(|t| t <= now)
            && self.busy_until.is_none_or(|t| t <= now)
    }
}

/// The download of one release: see the module documentation.
#[derive(Debug)]
pub struct Fetch {
    cfg: FetchConfig,
    blobs: Vec<BlobId>,
    blob_index: HashMap<BlobId, usize>,
    /// Every place, blob by blob in chunk-map order.
    places: Vec<Place>,
    /// The first place of each blob.
    blob_start: Vec<usize>,
    /// Every place of each chunk id.
    by_id: HashMap<BlobId, Vec<usize>>,
    /// Places not held, in order.
    missing: BTreeSet<usize>,
    held_bytes: u64,
    total_bytes: u64,
    inflight: HashMap<BlobId, Flight>,
    /// Origin ranges in flight, by (blob, start): the places inside, when it was asked, its length.
    ranges: HashMap<(usize, u64), (Vec<usize>, Duration, u64)>,
    /// The origin window: the most bytes in flight to the origin ([`FetchConfig::origin_target`]).
    origin_cwnd: u64,
    origin_inflight_bytes: u64,
    /// When a chunk began waiting for its designated fetcher.
    waiting: HashMap<BlobId, Duration>,
    /// Per place, the peers (slots) announced to hold it.
    holders: Vec<Vec<u16>>,
    /// Missing places some peer announced (entries held since are dropped lazily).
    available: BTreeSet<usize>,
    /// After an origin scan that found nothing: until when, and for which group, nothing can change.
    origin_idle: Option<(Duration, u64)>,
    peers: Vec<PeerView>,
    slots: BTreeMap<String, usize>,
    /// The designated fetcher of each (blob, piece), for the group as it was at `group_epoch`.
    designated: HashMap<(usize, usize), Option<usize>>,
    group_epoch: u64,
    designated_epoch: u64,
    origin_failures: u32,
    origin_until: Option<Duration>,
    origin_reachable: bool,
    origin_inflight: usize,
    gather_until: Duration,
    /// Until when origin work waits for live peers to take up the release ([`FetchConfig::join_wait`]).
    join_until: Duration,
    /// The shop's uplink budget, and this agent's token balance for its share (bytes; may run negative
    /// after a range, which then waits for the balance to refill).
    budget: Option<u64>,
    tokens: f64,
    tokens_at: Duration,
    /// How many agents are fetching from the origin (they have designated pieces they do not hold), as
    /// counted at a time and group epoch.
    fetching: (Duration, u64, usize),
    last_progress: Duration,
    wake: Option<Duration>,
    /// Pieces whose designated fetcher is this agent, and how many origin GETs were asked.
    peer_requests: usize,
    origin_requests: usize,
}

/// The next element of `set` after `cursor`, going round once from `rotate`.
fn next_rotated(
    set: &BTreeSet<usize>,
    rotate: usize,
    cursor: &mut usize,
    wrapped: &mut bool,
) -> Option<usize> {
    loop {
        let next = if *wrapped {
            set.range(*cursor..rotate).next()
        } else {
            set.range(*cursor..).next()
        };
        match next {
            Some(&p) => {
                *cursor = p + 1;
                return Some(p);
            }
            None if !*wrapped => {
                *wrapped = true;
                *cursor = 0;
            }
            None => return None,
        }
    }
}

/// The slot standing for this agent in designation.
const ME: usize = usize::MAX;

/// The smallest origin window (and Range GET): an average chunk.
const MIN_WINDOW: u64 = 64 * 1024;

/// The largest origin window: every slot with a full range.
fn max_window(cfg: &FetchConfig) -> u64 {
    (cfg.origin_window.max(1) as u64 * cfg.max_range.max(1)).max(MIN_WINDOW)
}

impl Fetch {
    /// A download of `blobs`; `held` lists, per blob (same order), the chunk indices the store already
    /// holds. `now` starts the clock (gathering, stall detection).
    pub fn new(cfg: FetchConfig, blobs: &[BlobChunks], held: &[Vec<u32>], now: Duration) -> Self {
        let mut places = Vec::new();
        let mut blob_start = Vec::new();
        let mut by_id: HashMap<BlobId, Vec<usize>> = HashMap::new();
        let piece = cfg.piece.max(1);
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
        let total_bytes = places.iter().map(|p| u64::from(p.chunk.len)).sum();
        let mut missing: BTreeSet<usize> = (0..places.len()).collect();
        let mut held_bytes = 0;
        for (b, idx) in held.iter().enumerate().take(blobs.len()) {
            for &i in idx {
                let p = blob_start[b] + i as usize;
                if p < places.len() && (i as usize) < blobs[b].chunks.len() && missing.remove(&p) {
                    held_bytes += u64::from(places[p].chunk.len);
                }
            }
        }
        let mut f = Fetch {
            blob_index: blobs.iter().enumerate().map(|(i, b)| (b.blob, i)).collect(),
            blobs: blobs.iter().map(|b| b.blob).collect(),
            holders: vec![Vec::new(); places.len()],
            available: BTreeSet::new(),
            origin_idle: None,
            places,
            blob_start,
            by_id,
            missing,
            held_bytes,
            total_bytes,
            inflight: HashMap::new(),
            ranges: HashMap::new(),
            waiting: HashMap::new(),
            peers: Vec::new(),
            slots: BTreeMap::new(),
            designated: HashMap::new(),
            group_epoch: 0,
            designated_epoch: u64::MAX,
            origin_failures: 0,
            origin_until: None,
            origin_reachable: cfg.has_origin,
            origin_inflight: 0,
            origin_cwnd: cfg.origin_initial.clamp(MIN_WINDOW, max_window(&cfg)),
            origin_inflight_bytes: 0,
            gather_until: now + cfg.gather,
            join_until: now + cfg.join_wait,
            budget: None,
            tokens: 0.0,
            tokens_at: now,
            fetching: (Duration::ZERO, u64::MAX, 1),
            last_progress: now,
            wake: None,
            peer_requests: 0,
            origin_requests: 0,
            cfg,
        };
        // A chunk held at one place (a duplicate within the release) is held at all of them.
        let held_ids: Vec<BlobId> = (0..f.places.len())
            .filter(|p| !f.missing.contains(p))
            .map(|p| f.places[p].chunk.id)
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
            bytes_total: self.total_bytes,
            bytes_held: self.held_bytes,
            chunks_missing: self.missing.len(),
            peer_requests: self.peer_requests,
            origin_requests: self.origin_requests,
        }
    }

    /// No chunk stored for [`FetchConfig::stall`]: the caller should give up for now.
    pub fn stalled(&self, now: Duration) -> bool {
        !self.is_complete() && now >= self.last_progress + self.cfg.stall
    }

    /// Whether this agent reaches the origin, as far as its last range showed (what it announces).
    pub fn origin_reachable(&self) -> bool {
        self.origin_reachable
    }

    /// Whether any request is in flight.
    pub fn busy(&self) -> bool {
        !self.inflight.is_empty() || self.origin_inflight > 0
    }

    /// The live peers taking a share of the origin fetches.
    pub fn sharing(&self) -> Vec<&str> {
        self.peers
            .iter()
            .filter(|p| p.up && p.shares)
            .map(|p| p.name.as_str())
            .collect()
    }

    /// The earliest time something may be decided without another event (a wait running out, the origin
    /// or a peer becoming usable again, the gathering ending, the stall deadline), as of the last `poll`.
    pub fn next_wake(&self) -> Option<Duration> {
        let stall = (!self.is_complete()).then_some(self.last_progress + self.cfg.stall);
        [self.wake, stall].into_iter().flatten().min()
    }

    fn slot(&mut self, peer: &str, now: Duration) -> usize {
        if let Some(&s) = self.slots.get(peer) {
            return s;
        }
        let s = self.peers.len();
        self.peers.push(PeerView {
            name: peer.to_owned(),
            up: false,
            shares: false,
            have: vec![0; self.places.len().div_ceil(64)],
            held: 0,
            inflight: 0,
            progress_at: now,
            banned_until: None,
            aside_until: None,
            busy_until: None,
            busy_streak: 0,
        });
        self.slots.insert(peer.to_owned(), s);
        s
    }

    fn peer_has(&mut self, s: usize, place: usize, now: Duration) {
        let Some(p) = self.peers.get_mut(s) else {
            return;
        };
        if p.set(place) {
            p.progress_at = now;
            if self.missing.contains(&place) {
                self.available.insert(place);
            }
            let list = &mut self.holders[place];
            if !list.contains(&(s as u16)) && s < u16::MAX as usize {
                list.push(s as u16);
            }
        }
    }

    fn mark_held(&mut self, id: &BlobId) -> bool {
        let Some(places) = self.by_id.get(id) else {
            return false;
        };
        let mut newly = false;
        for &p in places {
            if self.missing.remove(&p) {
                self.held_bytes += u64::from(self.places[p].chunk.len);
                newly = true;
            }
        }
        self.waiting.remove(id);
        newly
    }

    fn end_flight(&mut self, id: &BlobId) -> Option<Flight> {
        let f = self.inflight.remove(id)?;
        if let Flight::Peer(s) = f
            && let Some(p) = self.peers.get_mut(s)
        {
            p.inflight = p.inflight.saturating_sub(1);
        }
        Some(f)
    }

    /// Feeds one event in.
    pub fn handle(&mut self, event: Event, now: Duration) {
        match event {
            Event::PeerUp { peer, shares } => {
                if peer == self.cfg.me {
                    return;
                }
                let s = self.slot(&peer, now);
                let p = &mut self.peers[s];
                if !p.up || p.shares != shares {
                    self.group_epoch += 1;
                }
                if !p.up {
                    p.progress_at = now;
                }
                p.up = true;
                p.shares = shares;
            }
            Event::PeerDown { peer } => {
                if let Some(&s) = self.slots.get(&peer)
                    && self.peers[s].up
                {
                    self.peers[s].up = false;
                    self.group_epoch += 1;
                }
            }
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
                    if let Some(p) = self.peers.get_mut(s) {
                        p.busy_streak = 0;
                    }
                }
                if self.mark_held(&id) {
                    self.last_progress = now;
                }
            }
            Event::PeerFailed { peer, id, failure } => {
                // The chunk is wanted again, and the peer may be set aside: the origin may be needed.
                self.origin_idle = None;
                if matches!(self.inflight.get(&id), Some(Flight::Peer(_))) {
                    self.end_flight(&id);
                }
                let Some(&s) = self.slots.get(&peer) else {
                    return;
                };
                match failure {
                    PeerFailure::Timeout | PeerFailure::Other => {
                        self.peers[s].aside_until = Some(now + self.cfg.set_aside)
                    }
                    PeerFailure::Busy => {
                        let p = &mut self.peers[s];
                        p.busy_streak = p.busy_streak.saturating_add(1);
                        let pause = self
                            .cfg
                            .busy
                            .saturating_mul(1 << (p.busy_streak - 1).min(5));
                        p.busy_until = Some(now + pause);
                    }
                    PeerFailure::Corrupt => {
                        self.peers[s].banned_until = Some(now + self.cfg.ban);
                        self.group_epoch += 1;
                    }
                    PeerFailure::NotFound => {
                        if let Some(places) = self.by_id.get(&id).cloned() {
                            for p in places {
                                self.peers[s].clear(p);
                                self.holders[p].retain(|h| *h as usize != s);
                            }
                        }
                    }
                }
            }
            Event::RangeDone { blob, range } => {
                if let Some((asked, len)) = self.end_range(&blob, &range) {
                    self.adapt_window(now.saturating_sub(asked), len);
                }
                self.origin_failures = 0;
                self.origin_until = None;
                if !self.origin_reachable {
                    self.origin_reachable = true;
                    self.group_epoch += 1;
                }
            }
            Event::Budget { bytes_per_sec } => {
                self.refill(now);
                let was = self.budget;
                self.budget = bytes_per_sec.filter(|b| *b > 0);
                if was.is_none() && self.budget.is_some() {
                    // Agents start their balances at different points of one range, so a shop's
                    // agents do not all take their first range at the same moment.
                    let phase = f64::from(
                        crate::sync::rendezvous_score(&self.cfg.me, &BlobId::of(b"budget phase"))
                            [0],
                    ) / 255.0;
                    self.tokens = -phase * self.range_cap() as f64;
                }
            }
            Event::RangeFailed {
                blob,
                range,
                unreachable,
            } => {
                if self.end_range(&blob, &range).is_some() {
                    self.origin_cwnd = (self.origin_cwnd / 2).max(MIN_WINDOW);
                }
                self.origin_failures = self.origin_failures.saturating_add(1);
                let delay = if unreachable {
                    self.cfg.origin_retry
                } else {
                    self.cfg
                        .origin_backoff
                        .saturating_mul(1 << (self.origin_failures - 1).min(16))
                        .min(self.cfg.origin_retry)
                };
                self.origin_until = Some(now + delay);
                if unreachable && self.origin_reachable {
                    self.origin_reachable = false;
                    self.group_epoch += 1;
                }
            }
        }
    }

    /// A peer holds these chunks (indices in `blob`'s chunk map; any out of range are ignored).
    fn announced(
        &mut self,
        peer: &str,
        blob: &BlobId,
        chunks: impl IntoIterator<Item = u32>,
        now: Duration,
    ) {
        let Some(&b) = self.blob_index.get(blob) else {
            return;
        };
        if peer == self.cfg.me {
            return;
        }
        let s = self.slot(peer, now);
        let (start, len) = (self.blob_start[b], self.blob_len(b));
        for i in chunks {
            if (i as usize) < len {
                self.peer_has(s, start + i as usize, now);
            }
        }
    }

    fn blob_len(&self, b: usize) -> usize {
        self.blob_start
            .get(b + 1)
            .copied()
            .unwrap_or(self.places.len())
            - self.blob_start[b]
    }

    /// Ends an origin range in flight: when it was asked and its length, if it was one.
    fn end_range(&mut self, blob: &BlobId, range: &Range<u64>) -> Option<(Duration, u64)> {
        self.origin_idle = None;
        let &b = self.blob_index.get(blob)?;
        let (places, asked, len) = self.ranges.remove(&(b, range.start))?;
        self.origin_inflight = self.origin_inflight.saturating_sub(1);
        self.origin_inflight_bytes = self.origin_inflight_bytes.saturating_sub(len);
        for p in places {
            let id = self.places[p].chunk.id;
            if self.inflight.get(&id) == Some(&Flight::Origin) {
                self.inflight.remove(&id);
            }
        }
        Some((asked, len))
    }

    /// A range of `len` bytes came back after `took`: faster than the target grows the window by it
    /// (doubling per round, as TCP's slow start), slower shrinks it in proportion, so the bytes in
    /// flight settle near what arrives in [`FetchConfig::origin_target`].
    fn adapt_window(&mut self, took: Duration, len: u64) {
        let target = self.cfg.origin_target.as_secs_f64().max(1e-3);
        let took = took.as_secs_f64().max(1e-6);
        let max = max_window(&self.cfg);
        self.origin_cwnd = if took <= target {
            self.origin_cwnd.saturating_add(len).min(max)
        } else {
            ((self.origin_cwnd as f64 * target / took) as u64).clamp(MIN_WINDOW, max)
        };
    }

    /// This agent's share of the budget: equal among the agents fetching from the origin, that is the
    /// sharing agents (this one included) with designated pieces they do not hold yet, as their
    /// announcements show. A peer whose announcements lag counts as fetching: the error is on the side
    /// of the budget.
    fn share(&self) -> Option<f64> {
        let budget = self.budget? as f64;
        Some(budget / self.fetching.2.max(1) as f64)
    }

    /// Recounts the agents fetching from the origin (at most every 250 ms, or when the group changed).
    fn count_fetching(&mut self, now: Duration) {
        if self.budget.is_none()
            || (self.fetching.1 == self.group_epoch
                && now < self.fetching.0 + Duration::from_millis(250))
        {
            return;
        }
        let mut active: BTreeSet<usize> = BTreeSet::new();
        for p in 0..self.places.len() {
            let (b, piece) = (self.places[p].blob_of_piece, self.places[p].piece);
            match self.designated_for(b, piece) {
                Some(ME) if self.missing.contains(&p) => {
                    active.insert(ME);
                }
                Some(d) if d != ME && !self.peers[d].has(p) => {
                    active.insert(d);
                }
                _ => {}
            }
        }
        self.fetching = (now, self.group_epoch, active.len().max(1));
    }

    /// Under a budget, the longest Range GET: a quarter of a second of this agent's share (at least one
    /// average chunk, at most `max_range`), so no agent takes its share in bursts.
    fn range_cap(&self) -> u64 {
        let cap = match self.share() {
            Some(share) => ((share * 0.25) as u64).clamp(MIN_WINDOW, self.cfg.max_range.max(1)),
            None => self.cfg.max_range,
        };
        cap.min(self.origin_cwnd).max(MIN_WINDOW)
    }

    /// Adds the tokens earned since the last refill (at most one range's worth is kept).
    fn refill(&mut self, now: Duration) {
        // Nothing is earned while gathering: the shop's agents would all start with a full balance.
        self.tokens_at = self.tokens_at.max(self.gather_until.min(now));
        if let Some(share) = self.share() {
            let dt = now.saturating_sub(self.tokens_at).as_secs_f64();
            self.tokens = (self.tokens + share * dt).min(self.range_cap() as f64);
        }
        self.tokens_at = self.tokens_at.max(now);
    }

    /// This agent's share of the shop's uplink budget now, bytes per second (`None`: no limit).
    pub fn origin_share(&mut self, now: Duration) -> Option<f64> {
        self.count_fetching(now);
        self.share()
    }

    fn origin_usable(&self, now: Duration) -> bool {
        self.cfg.has_origin && self.origin_until.is_none_or(|t| t <= now)
    }

    /// The designated origin fetcher of a piece: a peer slot, [`ME`], or `None` (nobody shares).
    fn designated_for(&mut self, blob: usize, piece: usize) -> Option<usize> {
        if self.designated_epoch != self.group_epoch {
            self.designated.clear();
            self.designated_epoch = self.group_epoch;
        }
        if let Some(d) = self.designated.get(&(blob, piece)) {
            return *d;
        }
        let key = crate::sync::piece_key(&self.blobs[blob], piece as u64);
        let me_in = self.cfg.has_origin && self.origin_reachable;
        let mut best: Option<([u8; 32], &str, usize)> = None;
        let candidates = self
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.up && p.shares && p.banned_until.is_none())
            .map(|(s, p)| (s, p.name.as_str()))
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
        let d = best.map(|(_, _, s)| s);
        self.designated.insert((blob, piece), d);
        d
    }

    /// Takes the actions to do now: fills every peer's window and the origin's.
    pub fn poll(&mut self, now: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        let mut wake: Option<Duration> = None;
        let soon = |t: Duration, wake: &mut Option<Duration>| {
            if t > now {
                *wake = Some(wake.map_or(t, |w: Duration| w.min(t)));
            }
        };
        // Bans expire: an expired ban rejoins the group.
        for p in &mut self.peers {
            if p.banned_until.is_some_and(|t| t <= now) {
                p.banned_until = None;
                self.group_epoch += 1;
            }
            for t in [p.aside_until, p.busy_until, p.banned_until]
                .into_iter()
                .flatten()
            {
                if p.up {
                    soon(t, &mut wake);
                }
            }
        }
        let window = self.cfg.peer_window.max(1);
        let in_flight: usize = self.peers.iter().map(|p| p.inflight).sum();
        let mut peer_room: usize = self
            .peers
            .iter()
            .filter(|p| p.usable(now))
            .map(|p| window.saturating_sub(p.inflight))
            .sum::<usize>()
            .min(self.cfg.max_inflight.max(1).saturating_sub(in_flight));
        let origin_ok = self.origin_usable(now);
        // Gathering: booting peers are not known yet, or known peers have not taken up the release.
        let joining = now < self.join_until
            && self
                .peers
                .iter()
                .any(|p| p.up && !p.shares && p.banned_until.is_none());
        let gathering = now < self.gather_until || joining;
        let origin_slots = if origin_ok {
            self.cfg
                .origin_window
                .max(1)
                .saturating_sub(self.origin_inflight)
        } else {
            0
        };
        let origin_budget = if origin_slots > 0 {
            self.origin_cwnd
                .saturating_sub(self.origin_inflight_bytes)
                .min(origin_slots as u64 * self.cfg.max_range.max(1))
        } else {
            0
        };
        let mut to_origin: Vec<usize> = Vec::new();
        let mut origin_bytes = 0u64;
        let salt = crate::sync::rendezvous_score(&self.cfg.me, &BlobId::of(b"holder order"))[0];
        let mut origin_ids: std::collections::HashSet<BlobId> = std::collections::HashSet::new();
        if !self.is_complete() {
            if let Some(t) = self.origin_until.filter(|_| self.cfg.has_origin) {
                soon(t, &mut wake);
            }
            if now < self.gather_until {
                soon(self.gather_until, &mut wake);
            }
            if joining {
                soon(self.join_until, &mut wake);
            }
        }
        // Each agent scans from its own point of the release, so a fleet asks for different chunks first
        // and has more to trade among itself.
        let rotate = (u64::from_le_bytes(
            crate::sync::rendezvous_score(&self.cfg.me, &BlobId::of(b"scan start"))[..8]
                .try_into()
                .unwrap_or([0; 8]),
        ) % self.places.len().max(1) as u64) as usize;
        // Phase 1: chunks some peer announced, to the least-loaded holder with room, until the windows
        // are full.
        let mut cursor = rotate;
        let mut wrapped = false;
        let mut stale = Vec::new();
        while peer_room > 0 {
            let Some(place) = next_rotated(&self.available, rotate, &mut cursor, &mut wrapped)
            else {
                break;
            };
            if !self.missing.contains(&place) {
                stale.push(place);
                continue;
            }
            let chunk = self.places[place].chunk;
            if self.inflight.contains_key(&chunk.id) {
                continue;
            }
            let mut best: Option<(usize, u32, usize)> = None;
            for &p in self.by_id.get(&chunk.id).map(Vec::as_slice).unwrap_or(&[]) {
                for &s in &self.holders[p] {
                    let s = s as usize;
                    let v = &self.peers[s];
                    if !v.has(p) || !v.usable(now) || v.inflight >= window {
                        continue;
                    }
                    let tie = (s as u32).wrapping_mul(2_654_435_761) ^ u32::from(salt);
                    if best.is_none_or(|(l, t, _)| (v.inflight, tie) < (l, t)) {
                        best = Some((v.inflight, tie, s));
                    }
                }
            }
            if let Some((_, _, s)) = best {
                self.peers[s].inflight += 1;
                peer_room = peer_room.saturating_sub(1);
                self.inflight.insert(chunk.id, Flight::Peer(s));
                self.peer_requests += 1;
                out.push(Action::Ask {
                    peer: self.peers[s].name.clone(),
                    id: chunk.id,
                    len: chunk.len,
                });
            }
        }
        for p in stale {
            self.available.remove(&p);
        }
        // Phase 2: what the origin should send this agent. Skipped while nothing can have changed since a
        // scan that found nothing (same group, no wait run out, no range returned).
        let idle = self
            .origin_idle
            .is_some_and(|(until, epoch)| epoch == self.group_epoch && now < until);
        if let Some((until, _)) = self.origin_idle.filter(|_| idle) {
            soon(until, &mut wake);
        }
        if self.cfg.has_origin && origin_ok && !gathering && origin_slots > 0 && !idle {
            let mut cursor = rotate;
            let mut wrapped = false;
            let mut waits: Option<Duration> = None;
            while origin_bytes < origin_budget {
                let Some(place) = next_rotated(&self.missing, rotate, &mut cursor, &mut wrapped)
                else {
                    break;
                };
                let Place {
                    blob_of_piece,
                    chunk,
                    piece,
                    ..
                } = self.places[place].clone();
                if self.inflight.contains_key(&chunk.id) || origin_ids.contains(&chunk.id) {
                    continue;
                }
                // A live peer holds it (even one busy or with a full window): it comes from there.
                let held = self
                    .by_id
                    .get(&chunk.id)
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                    .iter()
                    .any(|&p| {
                        self.holders[p].iter().any(|&s| {
                            let v = &self.peers[s as usize];
                            v.has(p)
                                && v.up
                                && v.aside_until.is_none_or(|t| t <= now)
                                && v.banned_until.is_none_or(|t| t <= now)
                        })
                    });
                if held {
                    continue;
                }
                let from_origin = match self.designated_for(blob_of_piece, piece) {
                    Some(ME) | None => true,
                    Some(d) => {
                        let started = *self.waiting.entry(chunk.id).or_insert(now);
                        let since = started.max(self.peers[d].progress_at);
                        let until = since + self.cfg.max_wait;
                        if now >= until {
                            true
                        } else {
                            waits = Some(waits.map_or(until, |w: Duration| w.min(until)));
                            false
                        }
                    }
                };
                if from_origin {
                    origin_bytes += u64::from(chunk.len);
                    origin_ids.insert(chunk.id);
                    to_origin.push(place);
                }
            }
            if let Some(w) = waits {
                soon(w, &mut wake);
            }
            self.origin_idle = if to_origin.is_empty() {
                Some((waits.unwrap_or(now + self.cfg.max_wait), self.group_epoch))
            } else {
                None
            };
        }
        // Adjacent places of one blob become one Range GET.
        let max_range = self.range_cap();
        let mut runs: Vec<Vec<usize>> = Vec::new();
        for p in to_origin {
            let c = &self.places[p];
            let joins = runs.last().is_some_and(|run| {
                let first = &self.places[run[0]];
                let last = &self.places[*run.last().unwrap_or(&run[0])];
                last.blob == c.blob
                    && last.chunk.range().end == c.chunk.offset
                    && c.chunk.range().end - first.chunk.offset <= max_range
            });
            match runs.last_mut() {
                Some(run) if joins => run.push(p),
                _ => runs.push(vec![p]),
            }
        }
        self.count_fetching(now);
        self.refill(now);
        let share = self.share();
        for run in runs.into_iter().take(origin_slots) {
            let b = self.places[run[0]].blob;
            let start = self.places[run[0]].chunk.offset;
            let end = run
                .last()
                .map(|p| self.places[*p].chunk.range().end)
                .unwrap_or(start);
            if let Some(share) = share {
                let need = ((end - start) as f64).min(max_range as f64);
                if self.tokens < need {
                    // Over this agent's share of the budget: the next range waits for the balance.
                    let wait = Duration::from_secs_f64((need - self.tokens) / share.max(1.0));
                    soon(now + wait.max(Duration::from_millis(1)), &mut wake);
                    break;
                }
            }
            let chunks: Vec<Chunk> = run.iter().map(|p| self.places[*p].chunk).collect();
            for c in &chunks {
                self.inflight.insert(c.id, Flight::Origin);
            }
            self.ranges.insert((b, start), (run, now, end - start));
            self.origin_inflight_bytes += end - start;
            if share.is_some() {
                self.tokens -= (end - start) as f64;
            }
            self.origin_inflight += 1;
            self.origin_requests += 1;
            out.push(Action::Get {
                blob: self.blobs[b],
                range: start..end,
                chunks,
            });
        }
        self.wake = wake;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(n: usize, len: u32) -> Vec<BlobChunks> {
        let chunks = (0..n as u64)
            .map(|i| Chunk {
                offset: i * u64::from(len),
                len,
                id: BlobId::of(&i.to_le_bytes()),
            })
            .collect();
        vec![BlobChunks {
            blob: BlobId::of(b"blob"),
            chunks,
        }]
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn cfg(me: &str) -> FetchConfig {
        let mut c = FetchConfig::new(me);
        c.gather = Duration::ZERO;
        c.join_wait = Duration::ZERO;
        c.piece = 4 * 64 * 1024;
        c.max_range = 4 * 64 * 1024;
        c
    }

    fn gets(actions: &[Action]) -> Vec<Range<u64>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Get { range, .. } => Some(range.clone()),
                _ => None,
            })
            .collect()
    }

    fn range_len(a: &Action) -> u64 {
        match a {
            Action::Get { range, .. } => range.end - range.start,
            Action::Ask { len, .. } => u64::from(*len),
        }
    }

    #[test]
    fn alone_it_pipelines_origin_ranges_and_refills_the_window_on_each_completion() {
        let r = release(64, 64 * 1024);
        let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
        let done = |f: &mut Fetch, a: &Action, t: Duration| {
            let Action::Get {
                blob,
                range,
                chunks,
            } = a.clone()
            else {
                panic!("{a:?}")
            };
            for c in &chunks {
                f.handle(Event::Stored { id: c.id }, t);
            }
            f.handle(Event::RangeDone { blob, range }, t);
        };
        // Before anything came back: the initial window, one range.
        let mut flight = f.poll(Duration::ZERO);
        let g = gets(&flight);
        assert!(
            g.len() == 1 && g[0].end - g[0].start == 4 * 64 * 1024,
            "{g:?}"
        );
        // Ranges that come back fast open the window, round by round, to a full window of full ranges.
        let mut t = Duration::ZERO;
        for _ in 0..3 {
            t += secs(0.05);
            for a in std::mem::take(&mut flight) {
                done(&mut f, &a, t);
            }
            flight = f.poll(t);
        }
        let g = gets(&flight);
        assert_eq!(g.len(), cfg("a").origin_window, "{g:?}");
        // Each at most max_range (4 chunks), all but one full (a run stops at the blob's end).
        assert!(g.iter().all(|g| g.end - g.start <= 4 * 64 * 1024), "{g:?}");
        assert!(
            g.iter()
                .filter(|g| g.end - g.start == 4 * 64 * 1024)
                .count()
                >= g.len() - 1,
            "{g:?}"
        );
        assert!(f.poll(t).is_empty(), "window full");
        // One range done: its chunks stored, one more range goes out at once.
        t += secs(0.05);
        let held = f.progress().bytes_held;
        done(&mut f, &flight[0], t);
        assert_eq!(gets(&f.poll(t)).len(), 1);
        assert_eq!(f.progress().bytes_held, held + range_len(&flight[0]));
    }

    #[test]
    fn slow_ranges_shrink_the_origin_window_to_what_arrives_in_the_target_time() {
        // The origin sends this agent 256 KiB/s: each range takes its length over that rate, times the
        // ranges sharing the line. The bytes in flight settle near 1 s worth (the target), not the
        // full window, so a change of designation finds little in flight.
        let r = release(256, 64 * 1024);
        let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
        let rate = 256.0 * 1024.0;
        let mut t = Duration::ZERO;
        let mut flight: Vec<(Duration, Action)> = Vec::new();
        let mut peak_late = 0u64;
        for _ in 0..200 {
            for a in f.poll(t) {
                flight.push((t, a));
            }
            if flight.is_empty() {
                break;
            }
            // The oldest range finishes: the line is shared by all in flight.
            let in_flight: u64 = flight.iter().map(|(_, a)| range_len(a)).sum();
            let (_, a) = flight.remove(0);
            t += Duration::from_secs_f64(range_len(&a) as f64 * (flight.len() + 1) as f64 / rate);
            if t > secs(10.0) {
                peak_late = peak_late.max(in_flight);
            }
            let Action::Get {
                blob,
                range,
                chunks,
            } = a
            else {
                panic!()
            };
            for c in &chunks {
                f.handle(Event::Stored { id: c.id }, t);
            }
            f.handle(Event::RangeDone { blob, range }, t);
        }
        assert!(f.is_complete());
        assert!(
            peak_late <= 2 * 256 * 1024,
            "{peak_late} bytes in flight at 256 KiB/s"
        );
    }

    #[test]
    fn chunks_held_by_a_peer_are_asked_of_it_and_the_rest_waits_for_its_designated_fetcher() {
        let r = release(64, 64 * 1024);
        let blob = r[0].blob;
        let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
        f.handle(
            Event::PeerUp {
                peer: "b".into(),
                shares: true,
            },
            Duration::ZERO,
        );
        f.handle(
            Event::Have {
                peer: "b".into(),
                blob,
                chunks: vec![0, 1, 2],
            },
            Duration::ZERO,
        );
        let actions = f.poll(Duration::ZERO);
        let asks: Vec<_> = actions
            .iter()
            .filter(|a| matches!(a, Action::Ask { .. }))
            .collect();
        assert_eq!(asks.len(), 3);
        // The origin ranges are only of pieces designated to "a".
        let group = ["a".to_string(), "b".to_string()];
        let mine = |start: u64| {
            let piece = start / (4 * 64 * 1024);
            crate::sync::designated(&group, &crate::sync::piece_key(&blob, piece)) == Some("a")
        };
        for g in gets(&actions) {
            assert!(mine(g.start));
        }
        // Pieces designated to "b" wait max_wait after b's last progress, then come from the origin.
        let wake = f.next_wake().unwrap();
        assert_eq!(wake, secs(20.0));
        let mut t = Duration::ZERO;
        let mut from_origin = std::collections::BTreeSet::new();
        // Complete everything as asked, except b never makes progress again.
        let mut first = Some(actions);
        while !f.is_complete() && t < secs(60.0) {
            let actions = first.take().unwrap_or_else(|| f.poll(t));
            let idle = actions.is_empty();
            for a in actions {
                match a {
                    Action::Ask { id, .. } => f.handle(Event::Stored { id }, t),
                    Action::Get {
                        blob,
                        range,
                        chunks,
                    } => {
                        assert!(t >= secs(20.0) || mine(range.start));
                        from_origin.insert(range.start);
                        for c in chunks {
                            f.handle(Event::Stored { id: c.id }, t);
                        }
                        f.handle(Event::RangeDone { blob, range }, t);
                    }
                }
            }
            if idle {
                t = f.next_wake().unwrap_or(t + secs(1.0)).max(t + secs(0.01));
            }
        }
        assert!(f.is_complete(), "{t:?} {:?}", f.progress());
        assert!(t >= secs(20.0) && t < secs(21.0), "done at {t:?}");
    }

    #[test]
    fn nothing_is_taken_from_the_origin_while_gathering_and_a_late_peer_takes_its_share() {
        let r = release(64, 64 * 1024);
        let blob = r[0].blob;
        let mut c = cfg("a");
        c.gather = secs(2.0);
        let mut f = Fetch::new(c, &r, &[vec![]], Duration::ZERO);
        assert!(f.poll(secs(1.0)).is_empty());
        assert_eq!(f.next_wake(), Some(secs(2.0)));
        f.handle(
            Event::PeerUp {
                peer: "b".into(),
                shares: true,
            },
            secs(1.5),
        );
        let g = gets(&f.poll(secs(2.0)));
        assert!(!g.is_empty());
        let group = ["a".to_string(), "b".to_string()];
        for r in &g {
            let piece = r.start / (4 * 64 * 1024);
            assert_eq!(
                crate::sync::designated(&group, &crate::sync::piece_key(&blob, piece)),
                Some("a")
            );
        }
    }

    #[test]
    fn a_new_release_waits_for_the_live_peers_to_take_it_up_but_not_longer_than_join_wait() {
        let r = release(64, 64 * 1024);
        let blob = r[0].blob;
        let mut c = cfg("a");
        c.join_wait = secs(2.0);
        let up = |f: &mut Fetch, peer: &str, shares: bool, t: f64| {
            f.handle(
                Event::PeerUp {
                    peer: peer.into(),
                    shares,
                },
                secs(t),
            )
        };
        // Alone: nothing to wait for.
        let mut alone = Fetch::new(c.clone(), &r, &[vec![]], Duration::ZERO);
        assert!(!gets(&alone.poll(Duration::ZERO)).is_empty());
        // b and c are up but have not taken the release up yet: the origin waits.
        let mut f = Fetch::new(c.clone(), &r, &[vec![]], Duration::ZERO);
        up(&mut f, "b", false, 0.0);
        up(&mut f, "c", false, 0.0);
        assert!(gets(&f.poll(Duration::ZERO)).is_empty());
        assert_eq!(f.next_wake(), Some(secs(2.0)));
        up(&mut f, "b", true, 0.1);
        assert!(gets(&f.poll(secs(0.1))).is_empty(), "c does not share yet");
        // Once both share, the pieces are shared out at once, and "a" takes only its own.
        up(&mut f, "c", true, 0.2);
        let g = gets(&f.poll(secs(0.2)));
        assert!(!g.is_empty());
        let group = ["a".to_string(), "b".to_string(), "c".to_string()];
        for r in &g {
            let piece = r.start / (4 * 64 * 1024);
            assert_eq!(
                crate::sync::designated(&group, &crate::sync::piece_key(&blob, piece)),
                Some("a")
            );
        }
        // A peer that never takes the release up holds the origin back join_wait at most.
        let mut f = Fetch::new(c, &r, &[vec![]], Duration::ZERO);
        up(&mut f, "b", false, 0.0);
        assert!(gets(&f.poll(secs(1.9))).is_empty());
        assert!(!gets(&f.poll(secs(2.0))).is_empty());
    }

    #[test]
    fn failures_set_peers_aside_ban_liars_and_back_the_origin_off() {
        let r = release(8, 64 * 1024);
        let blob = r[0].blob;
        let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
        for p in ["b", "c"] {
            f.handle(
                Event::PeerUp {
                    peer: p.into(),
                    shares: false,
                },
                Duration::ZERO,
            );
            f.handle(
                Event::Bitmap {
                    peer: p.into(),
                    blob,
                    bitmap: vec![0xff],
                },
                Duration::ZERO,
            );
        }
        let asks = f.poll(Duration::ZERO);
        assert_eq!(asks.len(), 8, "all from peers, none from the origin");
        let mut by_peer: HashMap<String, Vec<BlobId>> = HashMap::new();
        for a in &asks {
            if let Action::Ask { peer, id, .. } = a {
                by_peer.entry(peer.clone()).or_default().push(*id);
            }
        }
        assert_eq!(by_peer.len(), 2, "spread over both holders");
        // b lies: banned; its chunks go to c.
        for id in by_peer["b"].clone() {
            f.handle(
                Event::PeerFailed {
                    peer: "b".into(),
                    id,
                    failure: PeerFailure::Corrupt,
                },
                secs(1.0),
            );
        }
        let again = f.poll(secs(1.0));
        assert!(!again.is_empty());
        assert!(
            again
                .iter()
                .all(|a| matches!(a, Action::Ask { peer, .. } if peer == "c"))
        );
        // c times out: set aside; with no peer left the origin is used.
        for a in by_peer["c"]
            .iter()
            .copied()
            .chain(again.iter().filter_map(|a| match a {
                Action::Ask { id, .. } => Some(*id),
                _ => None,
            }))
        {
            f.handle(
                Event::PeerFailed {
                    peer: "c".into(),
                    id: a,
                    failure: PeerFailure::Timeout,
                },
                secs(2.0),
            );
        }
        let origin = f.poll(secs(2.0));
        let g = gets(&origin);
        assert!(!g.is_empty());
        // The origin fails with a 5xx: backed off, doubling.
        let Action::Get { blob, range, .. } = origin[0].clone() else {
            panic!()
        };
        f.handle(
            Event::RangeFailed {
                blob,
                range: range.clone(),
                unreachable: false,
            },
            secs(2.0),
        );
        assert!(gets(&f.poll(secs(2.1))).is_empty());
        let retry = f.poll(secs(2.2));
        assert!(!gets(&retry).is_empty());
        assert!(f.origin_reachable());
        // Unreachable: left alone for origin_retry, and no longer announced as reaching it.
        for a in retry.into_iter().chain(origin.into_iter().skip(1)) {
            if let Action::Get { blob, range, .. } = a {
                f.handle(
                    Event::RangeFailed {
                        blob,
                        range,
                        unreachable: true,
                    },
                    secs(3.0),
                );
            }
        }
        assert!(!f.origin_reachable());
        assert!(gets(&f.poll(secs(7.9))).is_empty());
        assert!(!f.stalled(secs(44.0)));
        assert!(f.stalled(secs(45.0)));
    }

    #[test]
    fn an_uplink_budget_is_shared_among_the_agents_fetching_and_holds_over_time() {
        let r = release(400, 64 * 1024);
        let mut f = Fetch::new(cfg("a"), &r, &[vec![]], Duration::ZERO);
        f.handle(
            Event::PeerUp {
                peer: "b".into(),
                shares: true,
            },
            Duration::ZERO,
        );
        // 2 MB/s for the shop, two agents fetching: 1 MB/s each.
        f.handle(
            Event::Budget {
                bytes_per_sec: Some(2_000_000),
            },
            Duration::ZERO,
        );
        assert_eq!(f.origin_share(Duration::ZERO), Some(1_000_000.0));
        let mut t = Duration::ZERO;
        let mut asked = 0u64;
        let end = secs(10.0);
        while t < end {
            for a in f.poll(t) {
                if let Action::Get {
                    blob,
                    range,
                    chunks,
                } = a
                {
                    asked += range.end - range.start;
                    for c in chunks {
                        f.handle(Event::Stored { id: c.id }, t);
                    }
                    f.handle(Event::RangeDone { blob, range }, t);
                }
            }
            t = f.next_wake().unwrap_or(end).max(t + secs(0.001));
        }
        // At most the share over the time, plus one range of burst.
        let most = 1_000_000.0 * end.as_secs_f64() + 4.0 * 64.0 * 1024.0;
        assert!(asked as f64 <= most, "asked {asked} in 10 s");
        assert!(
            asked as f64 >= 0.8 * 1_000_000.0 * end.as_secs_f64(),
            "asked only {asked}"
        );
        // The other agent finishes (leaves the group): the whole budget is this agent's.
        f.handle(Event::PeerDown { peer: "b".into() }, t);
        assert_eq!(f.origin_share(t), Some(2_000_000.0));
        f.handle(
            Event::Budget {
                bytes_per_sec: None,
            },
            t,
        );
        assert_eq!(f.origin_share(t), None);
    }

    #[test]
    fn a_chunk_named_twice_is_fetched_once_and_held_chunks_are_not_fetched() {
        let mut r = release(6, 64 * 1024);
        r[0].chunks[5].id = r[0].chunks[1].id;
        let mut f = Fetch::new(cfg("a"), &r, &[vec![0, 2]], Duration::ZERO);
        assert_eq!(f.progress().chunks_missing, 4);
        let all: Vec<Chunk> = f
            .poll(Duration::ZERO)
            .into_iter()
            .flat_map(|a| match a {
                Action::Get { chunks, .. } => chunks,
                Action::Ask { .. } => vec![],
            })
            .collect();
        let ids: BTreeSet<BlobId> = all.iter().map(|c| c.id).collect();
        assert_eq!(ids.len(), all.len(), "no id twice");
        assert_eq!(all.len(), 3);
        for c in all {
            f.handle(Event::Stored { id: c.id }, secs(0.1));
        }
        assert!(f.is_complete());
    }
}
