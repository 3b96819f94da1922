//! [`Fetch::poll`]: what to ask for now, in named steps. Each step notes in a [`Wake`] when what it
//! decided may change without another event.

use super::{Action, Fetch, Flight, ME, Place, Wake};
use crate::chunk::Chunk;
use crate::id::BlobId;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

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

/// What the origin may be sent this turn.
struct OriginRoom {
    /// Range GETs that may start.
    slots: usize,
    /// Bytes they may ask for together.
    bytes: u64,
}

impl Fetch {
    /// Takes the actions to do now: fills every peer's window and the origin's.
    pub fn poll(&mut self, now: Duration) -> Vec<Action> {
        let mut wake = Wake::new(now);
        let mut out = Vec::new();
        self.lift_bans(&mut wake);
        let gathering = self.gathering(now, &mut wake);
        // Each agent scans from its own point of the release, so a fleet asks for different chunks first
        // and has more to trade among itself.
        let rotate = self.scan_start();
        self.ask_holders(now, rotate, &mut out);
        let room = self.origin_room(now);
        let idle = self.origin_idle(&mut wake);
        let mut to_origin = Vec::new();
        if room.slots > 0 && !gathering && !idle {
            to_origin = self.choose_for_origin(now, rotate, room.bytes, &mut wake);
        }
        self.send_ranges(now, to_origin, room.slots, &mut wake, &mut out);
        self.timers.wake = wake.at;
        out
    }

    /// Bans that ran out are lifted (the peer rejoins the group); every verdict's end is a time to
    /// look again.
    fn lift_bans(&mut self, wake: &mut Wake) {
        if self.peers.lift_bans(wake.now) {
            self.designation.group += 1;
        }
        for p in self.peers.views.iter().filter(|p| p.up) {
            for t in p.deadlines() {
                wake.at(t);
            }
        }
    }

    /// Whether origin work waits: booting peers are not known yet ([`FetchConfig::gather`]), or known
    /// peers have not taken up the release ([`FetchConfig::join_wait`]).
    ///
    /// [`FetchConfig::gather`]: super::FetchConfig::gather
    /// [`FetchConfig::join_wait`]: super::FetchConfig::join_wait
    fn gathering(&self, now: Duration, wake: &mut Wake) -> bool {
        let joining = now < self.timers.join_until && self.peers.any_not_sharing();
        if !self.is_complete() {
            if let Some(t) = self.origin.until.filter(|_| self.cfg.has_origin) {
                wake.at(t);
            }
            wake.at(self.timers.gather_until);
            if joining {
                wake.at(self.timers.join_until);
            }
        }
        now < self.timers.gather_until || joining
    }

    fn scan_start(&self) -> usize {
        let score = crate::sync::rendezvous_score(&self.cfg.me, &BlobId::of(b"scan start"));
        let first = u64::from_le_bytes(score[..8].try_into().unwrap_or([0; 8]));
        (first % self.layout.places.len().max(1) as u64) as usize
    }

    /// Chunks some peer announced go to the least-loaded holder with room, until the windows are full.
    fn ask_holders(&mut self, now: Duration, rotate: usize, out: &mut Vec<Action>) {
        let window = self.cfg.peer_window.max(1);
        let mut room: usize = self
            .peers
            .views
            .iter()
            .filter(|p| p.usable(now))
            .map(|p| window.saturating_sub(p.inflight))
            .sum::<usize>()
            .min(
                self.cfg
                    .max_inflight
                    .max(1)
                    .saturating_sub(self.peers.in_flight()),
            );
        let salt = crate::sync::rendezvous_score(&self.cfg.me, &BlobId::of(b"holder order"))[0];
        let (mut cursor, mut wrapped) = (rotate, false);
        let mut stale = Vec::new();
        while room > 0 {
            let Some(place) =
                next_rotated(&self.peers.available, rotate, &mut cursor, &mut wrapped)
            else {
                break;
            };
            if !self.missing.contains(&place) {
                stale.push(place);
                continue;
            }
            let chunk = self.layout.places[place].chunk;
            if self.inflight.contains_key(&chunk.id) {
                continue;
            }
            if let Some(s) = self.least_loaded_holder(&chunk.id, now, salt) {
                self.peers.views[s].inflight += 1;
                room = room.saturating_sub(1);
                self.inflight.insert(chunk.id, Flight::Peer(s));
                self.peer_requests += 1;
                out.push(Action::Ask {
                    peer: self.peers.views[s].name.clone(),
                    id: chunk.id,
                    len: chunk.len,
                });
            }
        }
        for p in stale {
            self.peers.available.remove(&p);
        }
    }

    /// The usable holder of a chunk with the fewest requests in flight and room in its window (ties
    /// broken by a per-agent salt, so a fleet spreads over the holders).
    fn least_loaded_holder(&self, id: &BlobId, now: Duration, salt: u8) -> Option<usize> {
        let window = self.cfg.peer_window.max(1);
        let mut best: Option<(usize, u32, usize)> = None;
        for &p in self.layout.places_of(id) {
            for &s in &self.peers.holders[p] {
                let s = s as usize;
                let v = &self.peers.views[s];
                if !v.has(p) || !v.usable(now) || v.inflight >= window {
                    continue;
                }
                let tie = (s as u32).wrapping_mul(2_654_435_761) ^ u32::from(salt);
                if best.is_none_or(|(l, t, _)| (v.inflight, tie) < (l, t)) {
                    best = Some((v.inflight, tie, s));
                }
            }
        }
        best.map(|(_, _, s)| s)
    }

    fn origin_room(&self, now: Duration) -> OriginRoom {
        let slots = if self.origin_usable(now) {
            self.cfg
                .origin_window
                .max(1)
                .saturating_sub(self.origin.inflight)
        } else {
            0
        };
        let bytes = self
            .origin
            .cwnd
            .saturating_sub(self.origin.inflight_bytes)
            .min(slots as u64 * self.cfg.max_range.max(1));
        OriginRoom { slots, bytes }
    }

    /// Nothing can have changed for the origin since a scan that found nothing (same group, no wait run
    /// out, no range returned): the scan is skipped.
    fn origin_idle(&self, wake: &mut Wake) -> bool {
        match self.origin.idle {
            Some((until, epoch)) if epoch == self.designation.group && wake.now < until => {
                wake.at(until);
                true
            }
            _ => false,
        }
    }

    /// The missing places the origin should send this agent now, up to `budget` bytes: those no live
    /// peer holds whose designated fetcher is this agent (or nobody), or whose designated fetcher showed
    /// no progress for [`FetchConfig::max_wait`](super::FetchConfig::max_wait).
    fn choose_for_origin(
        &mut self,
        now: Duration,
        rotate: usize,
        budget: u64,
        wake: &mut Wake,
    ) -> Vec<usize> {
        let (mut cursor, mut wrapped) = (rotate, false);
        let mut waits: Option<Duration> = None;
        let mut chosen = Vec::new();
        let mut ids: HashSet<BlobId> = HashSet::new();
        let mut bytes = 0u64;
        while bytes < budget {
            let Some(place) = next_rotated(&self.missing, rotate, &mut cursor, &mut wrapped) else {
                break;
            };
            let Place {
                blob_of_piece,
                chunk,
                piece,
                ..
            } = self.layout.places[place].clone();
            if self.inflight.contains_key(&chunk.id)
                || ids.contains(&chunk.id)
                || self.held_by_a_peer(&chunk.id, now)
            {
                continue;
            }
            let from_origin = match self.designated_for(blob_of_piece, piece) {
                Some(ME) | None => true,
                Some(d) => {
                    let started = *self.waiting.entry(chunk.id).or_insert(now);
                    let until = started.max(self.peers.views[d].progress_at) + self.cfg.max_wait;
                    if now < until {
                        waits = Some(waits.map_or(until, |w| w.min(until)));
                    }
                    now >= until
                }
            };
            if from_origin {
                bytes += u64::from(chunk.len);
                ids.insert(chunk.id);
                chosen.push(place);
            }
        }
        if let Some(w) = waits {
            wake.at(w);
        }
        self.origin.idle = chosen.is_empty().then(|| {
            (
                waits.unwrap_or(now + self.cfg.max_wait),
                self.designation.group,
            )
        });
        chosen
    }

    /// A live peer holds the chunk (even one busy or with a full window): it comes from there.
    fn held_by_a_peer(&self, id: &BlobId, now: Duration) -> bool {
        self.layout.places_of(id).iter().any(|&p| {
            self.peers.holders[p]
                .iter()
                .any(|&s| self.peers.views[s as usize].holds_for_us(p, now))
        })
    }

    /// Adjacent places of one blob become one Range GET, up to the range cap; ranges go out while the
    /// origin's slots and this agent's share of the budget allow.
    fn send_ranges(
        &mut self,
        now: Duration,
        to_origin: Vec<usize>,
        slots: usize,
        wake: &mut Wake,
        out: &mut Vec<Action>,
    ) {
        let max_range = self.range_cap();
        let runs = self.runs(to_origin, max_range);
        self.count_fetching(now);
        self.refill(now);
        let share = self.budget.share();
        for run in runs.into_iter().take(slots) {
            let b = self.layout.places[run[0]].blob;
            let start = self.layout.places[run[0]].chunk.offset;
            let end = run
                .last()
                .map(|p| self.layout.places[*p].chunk.range().end)
                .unwrap_or(start);
            if let Some(share) = share {
                let need = ((end - start) as f64).min(max_range as f64);
                if self.budget.tokens < need {
                    // Over this agent's share of the budget: the next range waits for the balance.
                    let wait =
                        Duration::from_secs_f64((need - self.budget.tokens) / share.max(1.0));
                    wake.at(now + wait.max(Duration::from_millis(1)));
                    break;
                }
                self.budget.tokens -= (end - start) as f64;
            }
            let chunks: Vec<Chunk> = run.iter().map(|p| self.layout.places[*p].chunk).collect();
            for c in &chunks {
                self.inflight.insert(c.id, Flight::Origin);
            }
            self.origin
                .ranges
                .insert((b, start), (run, now, end - start));
            self.origin.inflight_bytes += end - start;
            self.origin.inflight += 1;
            self.origin_requests += 1;
            out.push(Action::Get {
                blob: self.layout.blobs[b],
                range: start..end,
                chunks,
            });
        }
    }

    /// Groups places into runs of adjacent chunks of one blob, each at most `max_range` bytes.
    fn runs(&self, places: Vec<usize>, max_range: u64) -> Vec<Vec<usize>> {
        let mut runs: Vec<Vec<usize>> = Vec::new();
        for p in places {
            let c = &self.layout.places[p];
            let joins = runs.last().is_some_and(|run| {
                let first = &self.layout.places[run[0]];
                let last = &self.layout.places[*run.last().unwrap_or(&run[0])];
                last.blob == c.blob
                    && last.chunk.range().end == c.chunk.offset
                    && c.chunk.range().end - first.chunk.offset <= max_range
            });
            match runs.last_mut() {
                Some(run) if joins => run.push(p),
                _ => runs.push(vec![p]),
            }
        }
        runs
    }
}
