//! The peers as the download sees them: what each announced it holds, its requests in flight, and the
//! verdicts passed on it (set aside, banned, paused while busy).

use super::{Fetch, FetchConfig, PeerFailure, Verdict};
use crate::id::BlobId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Clone, Debug)]
pub(super) struct PeerView {
    pub(super) name: String,
    pub(super) up: bool,
    pub(super) shares: bool,
    /// Bit per place: the peer holds it.
    have: Vec<u64>,
    pub(super) inflight: usize,
    /// The last time the peer showed progress (more chunks held), or came up.
    pub(super) progress_at: Duration,
    pub(super) banned_until: Option<Duration>,
    pub(super) aside_until: Option<Duration>,
    busy_until: Option<Duration>,
    /// Busy answers in a row: each doubles the pause before this peer is asked again.
    busy_streak: u32,
}

impl PeerView {
    pub(super) fn has(&self, place: usize) -> bool {
        self.have
            .get(place / 64)
            .is_some_and(|w| w & (1 << (place % 64)) != 0)
    }
    /// Sets the bit; true if it was not set.
    fn set(&mut self, place: usize) -> bool {
        match self.have.get_mut(place / 64) {
            Some(w) if *w & (1 << (place % 64)) == 0 => {
                *w |= 1 << (place % 64);
                true
            }
            _ => false,
        }
    }
    fn clear(&mut self, place: usize) {
        if let Some(w) = self.have.get_mut(place / 64) {
            *w &= !(1 << (place % 64));
        }
    }
    /// May be asked now: up, and neither banned, set aside nor paused.
    pub(super) fn usable(&self, now: Duration) -> bool {
        self.up
            && self.banned_until.is_none_or(|t| t <= now)
            && self.aside_until.is_none_or(|t| t <= now)
            && self.busy_until.is_none_or(|t| t <= now)
    }
    /// Up, and neither banned nor set aside (a busy or full peer still holds what it holds).
    pub(super) fn holds_for_us(&self, place: usize, now: Duration) -> bool {
        self.has(place)
            && self.up
            && self.aside_until.is_none_or(|t| t <= now)
            && self.banned_until.is_none_or(|t| t <= now)
    }
    /// The times at which this peer's verdicts run out.
    pub(super) fn deadlines(&self) -> impl Iterator<Item = Duration> {
        [self.aside_until, self.busy_until, self.banned_until]
            .into_iter()
            .flatten()
    }
}

/// Every peer the download heard of, by slot.
#[derive(Debug)]
pub(super) struct PeerTable {
    pub(super) views: Vec<PeerView>,
    slots: BTreeMap<String, usize>,
    /// Per place, the peers (slots) announced to hold it.
    pub(super) holders: Vec<Vec<u16>>,
    /// Missing places some peer announced (entries held since are dropped lazily).
    pub(super) available: BTreeSet<usize>,
    places: usize,
}

impl PeerTable {
    pub(super) fn new(places: usize) -> Self {
        PeerTable {
            views: Vec::new(),
            slots: BTreeMap::new(),
            holders: vec![Vec::new(); places],
            available: BTreeSet::new(),
            places,
        }
    }

    fn slot(&mut self, peer: &str, now: Duration) -> usize {
        if let Some(&s) = self.slots.get(peer) {
            return s;
        }
        let s = self.views.len();
        self.views.push(PeerView {
            name: peer.to_owned(),
            up: false,
            shares: false,
            have: vec![0; self.places.div_ceil(64)],
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

    /// The peers taking a share of the origin fetches: up, sharing, not banned.
    pub(super) fn sharing(&self) -> impl Iterator<Item = (usize, &str)> {
        self.views
            .iter()
            .enumerate()
            .filter(|(_, p)| p.up && p.shares && p.banned_until.is_none())
            .map(|(s, p)| (s, p.name.as_str()))
    }

    /// A live peer that does not want the release yet (and is not banned).
    pub(super) fn any_not_sharing(&self) -> bool {
        self.views
            .iter()
            .any(|p| p.up && !p.shares && p.banned_until.is_none())
    }

    pub(super) fn in_flight(&self) -> usize {
        self.views.iter().map(|p| p.inflight).sum()
    }

    pub(super) fn request_ended(&mut self, s: usize) {
        if let Some(p) = self.views.get_mut(s) {
            p.inflight = p.inflight.saturating_sub(1);
        }
    }

    /// A request to it was answered: it is no longer busy.
    pub(super) fn answered(&mut self, s: usize) {
        if let Some(p) = self.views.get_mut(s) {
            p.busy_streak = 0;
        }
    }

    /// Bans that ran out are lifted; true if any was (the peer rejoins the group).
    pub(super) fn lift_bans(&mut self, now: Duration) -> bool {
        let mut lifted = false;
        for p in &mut self.views {
            if p.banned_until.is_some_and(|t| t <= now) {
                p.banned_until = None;
                lifted = true;
            }
        }
        lifted
    }

    fn has(&mut self, s: usize, place: usize, missing: bool, now: Duration) {
        let Some(p) = self.views.get_mut(s) else {
            return;
        };
        if p.set(place) {
            p.progress_at = now;
            if missing {
                self.available.insert(place);
            }
            let list = &mut self.holders[place];
            if !list.contains(&(s as u16)) && s < u16::MAX as usize {
                list.push(s as u16);
            }
        }
    }

    fn has_not(&mut self, s: usize, place: usize) {
        if let Some(p) = self.views.get_mut(s) {
            p.clear(place);
        }
        self.holders[place].retain(|h| *h as usize != s);
    }

    /// Pauses a busy peer, doubling the pause per busy answer in a row.
    fn pause(&mut self, s: usize, cfg: &FetchConfig, now: Duration) {
        let p = &mut self.views[s];
        p.busy_streak = p.busy_streak.saturating_add(1);
        let pause = cfg.busy.saturating_mul(1 << (p.busy_streak - 1).min(5));
        p.busy_until = Some(now + pause);
    }
}

impl Fetch {
    pub(super) fn peer_up(&mut self, peer: &str, shares: bool, now: Duration) {
        if peer == self.cfg.me {
            return;
        }
        let s = self.peers.slot(peer, now);
        let p = &mut self.peers.views[s];
        if !p.up || p.shares != shares {
            self.designation.group += 1;
        }
        if !p.up {
            p.progress_at = now;
        }
        p.up = true;
        p.shares = shares;
    }

    pub(super) fn peer_down(&mut self, peer: &str) {
        if let Some(&s) = self.peers.slots.get(peer)
            && self.peers.views[s].up
        {
            self.peers.views[s].up = false;
            self.designation.group += 1;
        }
    }

    /// A peer holds these chunks (indices in `blob`'s chunk map; any out of range are ignored).
    pub(super) fn announced(
        &mut self,
        peer: &str,
        blob: &BlobId,
        chunks: impl IntoIterator<Item = u32>,
        now: Duration,
    ) {
        let Some(&b) = self.layout.blob_index.get(blob) else {
            return;
        };
        if peer == self.cfg.me {
            return;
        }
        let s = self.peers.slot(peer, now);
        let (start, len) = (self.layout.blob_start[b], self.layout.blob_len(b));
        for i in chunks {
            if (i as usize) < len {
                let place = start + i as usize;
                let missing = self.missing.contains(&place);
                self.peers.has(s, place, missing, now);
            }
        }
    }

    /// A request to a peer failed: the chunk is wanted again, and the peer is judged.
    pub(super) fn peer_failed(
        &mut self,
        peer: &str,
        id: &BlobId,
        failure: PeerFailure,
        now: Duration,
    ) {
        // The peer may be set aside: the origin may be needed.
        self.origin.idle = None;
        if matches!(self.inflight.get(id), Some(super::Flight::Peer(_))) {
            self.end_flight(id);
        }
        let Some(&s) = self.peers.slots.get(peer) else {
            return;
        };
        match failure {
            PeerFailure::Busy => self.peers.pause(s, &self.cfg, now),
            PeerFailure::NotFound => {
                for &p in self.layout.places_of(id) {
                    self.peers.has_not(s, p);
                }
            }
            PeerFailure::Timeout | PeerFailure::Other | PeerFailure::Corrupt => {}
        }
        if let Some(j) = self.cfg.judge(peer, failure) {
            let until = Some(now + j.lasts);
            match j.verdict {
                Verdict::SetAside => self.peers.views[s].aside_until = until,
                Verdict::Banned => {
                    self.peers.views[s].banned_until = until;
                    self.designation.group += 1;
                }
            }
            self.judged.push(j);
        }
    }
}
