//! The origin as the download sees it: the window of bytes in flight (following the rate this agent
//! gets), the backoff after failures, whether it is reachable at all, and this agent's share of the
//! shop's uplink budget.

use super::{Fetch, FetchConfig, ME};
use crate::id::BlobId;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::time::Duration;

/// The smallest origin window (and Range GET): an average chunk.
pub(super) const MIN_WINDOW: u64 = 64 * 1024;

/// The largest origin window: every slot with a full range.
pub(super) fn max_window(cfg: &FetchConfig) -> u64 {
    (cfg.origin_window.max(1) as u64 * cfg.max_range.max(1)).max(MIN_WINDOW)
}

/// Origin Range GETs in flight, the window they fill, and the backoff.
#[derive(Debug)]
pub(super) struct OriginWindow {
    /// Ranges in flight, by (blob, start): the places inside, when it was asked, its length.
    pub(super) ranges: HashMap<(usize, u64), (Vec<usize>, Duration, u64)>,
    /// The most bytes in flight ([`FetchConfig::origin_target`]).
    pub(super) cwnd: u64,
    pub(super) inflight_bytes: u64,
    pub(super) inflight: usize,
    /// Failed answers in a row (the backoff doubles per failure).
    failures: u32,
    /// Until when the origin is left alone.
    pub(super) until: Option<Duration>,
    pub(super) reachable: bool,
    /// After a scan that found nothing for the origin: until when, and for which group, nothing can
    /// change.
    pub(super) idle: Option<(Duration, u64)>,
}

impl OriginWindow {
    pub(super) fn new(cfg: &FetchConfig) -> Self {
        OriginWindow {
            ranges: HashMap::new(),
            cwnd: cfg.origin_initial.clamp(MIN_WINDOW, max_window(cfg)),
            inflight_bytes: 0,
            inflight: 0,
            failures: 0,
            until: None,
            reachable: cfg.has_origin,
            idle: None,
        }
    }

    /// A range of `len` bytes came back after `took`: faster than the target grows the window by it
    /// (doubling per round, as TCP's slow start), slower shrinks it in proportion, so the bytes in
    /// flight settle near what arrives in [`FetchConfig::origin_target`].
    fn adapt(&mut self, cfg: &FetchConfig, took: Duration, len: u64) {
        let target = cfg.origin_target.as_secs_f64().max(1e-3);
        let took = took.as_secs_f64().max(1e-6);
        let max = max_window(cfg);
        self.cwnd = if took <= target {
            self.cwnd.saturating_add(len).min(max)
        } else {
            ((self.cwnd as f64 * target / took) as u64).clamp(MIN_WINDOW, max)
        };
    }
}

/// The shop's uplink budget and this agent's token balance for its share (bytes; may run negative
/// after a range, which then waits for the balance to refill).
#[derive(Debug)]
pub(super) struct Budget {
    bytes_per_sec: Option<u64>,
    pub(super) tokens: f64,
    tokens_at: Duration,
    /// How many agents are fetching from the origin (they have designated pieces they do not hold), as
    /// counted at a time and group epoch.
    fetching: (Duration, u64, usize),
}

impl Budget {
    pub(super) fn new(now: Duration) -> Self {
        Budget {
            bytes_per_sec: None,
            tokens: 0.0,
            tokens_at: now,
            fetching: (Duration::ZERO, u64::MAX, 1),
        }
    }

    /// This agent's share: equal among the agents fetching from the origin, that is the sharing agents
    /// (this one included) with designated pieces they do not hold yet, as their announcements show. A
    /// peer whose announcements lag counts as fetching: the error is on the side of the budget.
    pub(super) fn share(&self) -> Option<f64> {
        let budget = self.bytes_per_sec? as f64;
        Some(budget / self.fetching.2.max(1) as f64)
    }
}

impl Fetch {
    pub(super) fn origin_usable(&self, now: Duration) -> bool {
        self.cfg.has_origin && self.origin.until.is_none_or(|t| t <= now)
    }

    /// Ends an origin range in flight: when it was asked and its length, if it was one.
    fn end_range(&mut self, blob: &BlobId, range: &Range<u64>) -> Option<(Duration, u64)> {
        self.origin.idle = None;
        let &b = self.layout.blob_index.get(blob)?;
        let (places, asked, len) = self.origin.ranges.remove(&(b, range.start))?;
        self.origin.inflight = self.origin.inflight.saturating_sub(1);
        self.origin.inflight_bytes = self.origin.inflight_bytes.saturating_sub(len);
        for p in places {
            let id = self.layout.places[p].chunk.id;
            if self.inflight.get(&id) == Some(&super::Flight::Origin) {
                self.inflight.remove(&id);
            }
        }
        Some((asked, len))
    }

    pub(super) fn range_done(&mut self, blob: &BlobId, range: &Range<u64>, now: Duration) {
        if let Some((asked, len)) = self.end_range(blob, range) {
            self.origin.adapt(&self.cfg, now.saturating_sub(asked), len);
        }
        self.origin.failures = 0;
        self.origin.until = None;
        if !self.origin.reachable {
            self.origin.reachable = true;
            self.designation.group += 1;
        }
    }

    pub(super) fn range_failed(
        &mut self,
        blob: &BlobId,
        range: &Range<u64>,
        unreachable: bool,
        now: Duration,
    ) {
        if self.end_range(blob, range).is_some() {
            self.origin.cwnd = (self.origin.cwnd / 2).max(MIN_WINDOW);
        }
        self.origin.failures = self.origin.failures.saturating_add(1);
        let delay = if unreachable {
            self.cfg.origin_retry
        } else {
            self.cfg
                .origin_backoff
                .saturating_mul(1 << (self.origin.failures - 1).min(16))
                .min(self.cfg.origin_retry)
        };
        self.origin.until = Some(now + delay);
        if unreachable && self.origin.reachable {
            self.origin.reachable = false;
            self.designation.group += 1;
        }
    }

    pub(super) fn set_budget(&mut self, bytes_per_sec: Option<u64>, now: Duration) {
        self.refill(now);
        let was = self.budget.bytes_per_sec;
        self.budget.bytes_per_sec = bytes_per_sec.filter(|b| *b > 0);
        if was.is_none() && self.budget.bytes_per_sec.is_some() {
            // Agents start their balances at different points of one range, so a shop's agents do not
            // all take their first range at the same moment.
            let phase = f64::from(
                crate::sync::rendezvous_score(&self.cfg.me, &BlobId::of(b"budget phase"))[0],
            ) / 255.0;
            self.budget.tokens = -phase * self.range_cap() as f64;
        }
    }

    /// Recounts the agents fetching from the origin (at most every 250 ms, or when the group changed).
    pub(super) fn count_fetching(&mut self, now: Duration) {
        let (at, epoch, _) = self.budget.fetching;
        if self.budget.bytes_per_sec.is_none()
            || (epoch == self.designation.group && now < at + Duration::from_millis(250))
        {
            return;
        }
        let mut active: BTreeSet<usize> = BTreeSet::new();
        for p in 0..self.layout.places.len() {
            let (b, piece) = (
                self.layout.places[p].blob_of_piece,
                self.layout.places[p].piece,
            );
            match self.designated_for(b, piece) {
                Some(ME) if self.missing.contains(&p) => {
                    active.insert(ME);
                }
                Some(d) if d != ME && !self.peers.views[d].has(p) => {
                    active.insert(d);
                }
                _ => {}
            }
        }
        self.budget.fetching = (now, self.designation.group, active.len().max(1));
    }

    /// This agent's share of the shop's uplink budget now, bytes per second (`None`: no limit).
    pub fn origin_share(&mut self, now: Duration) -> Option<f64> {
        self.count_fetching(now);
        self.budget.share()
    }

    /// Under a budget, the longest Range GET: a quarter of a second of this agent's share (at least one
    /// average chunk, at most `max_range`), so no agent takes its share in bursts.
    pub(super) fn range_cap(&self) -> u64 {
        let cap = match self.budget.share() {
            Some(share) => ((share * 0.25) as u64).clamp(MIN_WINDOW, self.cfg.max_range.max(1)),
            None => self.cfg.max_range,
        };
        cap.min(self.origin.cwnd).max(MIN_WINDOW)
    }

    /// Adds the tokens earned since the last refill (at most one range's worth is kept).
    pub(super) fn refill(&mut self, now: Duration) {
        // Nothing is earned while gathering: the shop's agents would all start with a full balance.
        let b = &mut self.budget;
        b.tokens_at = b.tokens_at.max(self.timers.gather_until.min(now));
        if let Some(share) = b.share() {
            let dt = now.saturating_sub(b.tokens_at).as_secs_f64();
            let cap = self.range_cap() as f64;
            let b = &mut self.budget;
            b.tokens = (b.tokens + share * dt).min(cap);
        }
        let b = &mut self.budget;
        b.tokens_at = b.tokens_at.max(now);
    }
}
