//! A fleet simulator: the agents' own [`Fetch`] state machines driven in virtual time.
//!
//! N agents download one release. The shop's uplink is one link of a fixed rate, shared fairly by every
//! Range GET in flight (after a first-byte latency); each agent's LAN interface sends and receives at a
//! fixed rate, one transfer after another, plus a latency. Agents meet after a discovery delay, push HAVE
//! announcements of what they stored every [`SimConfig::have_every`], and may join late, die (their peers
//! notice after [`SimConfig::detect`], and requests to them time out) or leave (noticed at once).
//! Everything is deterministic: the same configuration gives the same report, to the nanosecond.
//!
//! `deckhand bench sim` prints its figures; the tests below hold the fleet to one uplink.

use crate::chunk::Chunk;
use crate::fetch::{Action, BlobChunks, Event, Fetch, FetchConfig, PeerFailure};
use crate::id::BlobId;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::time::Duration;

/// One simulated shop.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub agents: usize,
    pub release_bytes: u64,
    /// The average chunk length (lengths vary from half to one and a half of it).
    pub chunk: u32,
    /// The shop's uplink, bytes per second, shared by all agents.
    pub uplink: f64,
    /// Each agent's LAN rate, bytes per second (each way).
    pub lan: f64,
    pub lan_latency: Duration,
    /// From a Range GET to its first byte.
    pub origin_latency: Duration,
    /// Two agents know each other this long after the later of them starts, spread over this range.
    pub discover: Range<Duration>,
    /// When each agent starts (missing entries start at zero).
    pub start: Vec<Duration>,
    /// Agents that crash, and when.
    pub deaths: Vec<(usize, Duration)>,
    /// Agents that shut down gracefully, and when.
    pub leaves: Vec<(usize, Duration)>,
    /// How long after a crash its peers stop counting it live.
    pub detect: Duration,
    /// How long a request to a dead peer takes to time out.
    pub chunk_timeout: Duration,
    /// How often an agent pushes HAVE announcements of what it stored.
    pub have_every: Duration,
    /// How long a request may queue behind an agent's sending before it is answered Busy (the agent's
    /// serving cap waits this long for a slot).
    pub busy_after: Duration,
    /// The shop's uplink budget, bytes per second for all agents together.
    pub budget: Option<u64>,
    /// Each agent's download settings (`me` is set per agent).
    pub fetch: FetchConfig,
    /// The simulation ends here even if some agent is not done.
    pub limit: Duration,
    pub seed: u64,
}

impl SimConfig {
    /// A shop of `agents` Pis booting together with a release of `release_bytes` published.
    pub fn new(agents: usize, release_bytes: u64, uplink_mbps: f64, lan_mbps: f64) -> Self {
        SimConfig {
            agents,
            release_bytes,
            chunk: 64 * 1024,
            uplink: uplink_mbps * 1e6 / 8.0,
            lan: lan_mbps * 1e6 / 8.0,
            lan_latency: Duration::from_micros(500),
            origin_latency: Duration::from_millis(40),
            discover: Duration::from_millis(200)..Duration::from_millis(1500),
            start: Vec::new(),
            deaths: Vec::new(),
            leaves: Vec::new(),
            detect: Duration::from_secs(8),
            chunk_timeout: Duration::from_secs(10),
            have_every: Duration::from_millis(100),
            busy_after: Duration::from_secs(2),
            budget: None,
            fetch: FetchConfig::new("sim"),
            limit: Duration::from_secs(3600),
            seed: 1,
        }
    }
}

/// What a simulation measured.
#[derive(Clone, Debug)]
pub struct SimReport {
    pub release_bytes: u64,
    /// Bytes that crossed the uplink.
    pub origin_bytes: u64,
    /// Bytes that crossed the LAN between agents.
    pub lan_bytes: u64,
    /// When each agent held the whole release (`None`: never, or it died first).
    pub done: Vec<Option<Duration>>,
    /// When every agent alive at the end was done.
    pub converged: Option<Duration>,
    /// The release over the uplink rate: no fleet can be faster.
    pub uplink_limit: Duration,
    pub origin_gets: usize,
    pub peer_asks: usize,
    /// Every Range GET: when, by which agent, of which piece of the release (blob, range).
    pub origin_log: Vec<(Duration, usize, BlobId, Range<u64>)>,
    /// Chunks fetched from the origin more than once.
    pub refetched: usize,
    /// The highest rate the uplink carried over any 5 s (bytes per second).
    pub peak_rate: f64,
}

impl SimReport {
    pub fn origin_ratio(&self) -> f64 {
        self.origin_bytes as f64 / self.release_bytes.max(1) as f64
    }
    pub fn convergence_ratio(&self) -> Option<f64> {
        self.converged
            .map(|c| c.as_secs_f64() / self.uplink_limit.as_secs_f64().max(1e-9))
    }
}

/// The highest rate between two samples (time, bytes so far) at least `window` apart (the shortest
/// such span from each sample), in bytes per second: how a rate meter reads a transfer.
pub fn peak_rate(samples: &[(Duration, u64)], window: Duration) -> f64 {
    let mut best = 0.0f64;
    let mut j = 0;
    for i in 0..samples.len() {
        let (ti, bi) = samples[i];
        while j + 1 < i && samples[j + 1].0 + window <= ti {
            j += 1;
        }
        let (tj, bj) = samples[j];
        if ti >= tj + window {
            best = best.max(bi.saturating_sub(bj) as f64 / (ti - tj).as_secs_f64());
        }
    }
    best
}

/// The release the simulation downloads: one blob of deterministic chunk lengths.
pub fn release(cfg: &SimConfig) -> Vec<BlobChunks> {
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    let mut i = 0u64;
    let avg = u64::from(cfg.chunk.max(2));
    while offset < cfg.release_bytes {
        let h = jitter(cfg.seed, &[b"len", &i.to_le_bytes()]);
        let len = (avg / 2 + (h % avg)).min(cfg.release_bytes - offset).max(1) as u32;
        chunks.push(Chunk {
            offset,
            len,
            id: BlobId::of(&[&cfg.seed.to_le_bytes()[..], &i.to_le_bytes()].concat()),
        });
        offset += u64::from(len);
        i += 1;
    }
    vec![BlobChunks {
        blob: BlobId::of(&cfg.seed.to_le_bytes()),
        chunks,
    }]
}

fn jitter(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"deckhand sim");
    h.update(&seed.to_le_bytes());
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

#[derive(Clone, Debug)]
enum Ev {
    Start(usize),
    Die(usize),
    Leave(usize),
    Meet(usize, usize),
    Deliver(usize, Event),
    Flush(usize),
    Tick(usize),
    /// A peer transfer ends: `to` asked `from` for `id` at `asked`.
    PeerDone {
        to: usize,
        from: usize,
        id: BlobId,
        asked: Duration,
    },
    /// A Range GET's first byte arrives: it joins the uplink.
    UplinkStart(usize, BlobId, Range<u64>, Vec<Chunk>),
}

struct Transfer {
    agent: usize,
    blob: BlobId,
    range: Range<u64>,
    chunks: Vec<Chunk>,
    remaining: f64,
}

struct SimAgent {
    fetch: Option<Fetch>,
    alive: bool,
    started: bool,
    holds: Vec<bool>,
    pending_have: BTreeSet<u32>,
    knows: BTreeSet<usize>,
    send_free: Duration,
    recv_free: Duration,
    next_tick: Option<Duration>,
    done: Option<Duration>,
    flushing: bool,
}

/// Runs a simulation to the end.
pub fn run(cfg: &SimConfig) -> SimReport {
    Sim::new(cfg).run()
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    release: Vec<BlobChunks>,
    /// Places of each chunk id (within the single blob).
    by_id: HashMap<BlobId, Vec<u32>>,
    agents: Vec<SimAgent>,
    names: Vec<String>,
    queue: BTreeMap<(Duration, u64), Ev>,
    seq: u64,
    uplink: Vec<Transfer>,
    uplink_at: Duration,
    report: SimReport,
    dirty: BTreeSet<usize>,
    origin_count: HashMap<BlobId, usize>,
    /// (time, origin bytes so far), at most every 100 ms.
    samples: Vec<(Duration, u64)>,
    /// Bytes the uplink carried, unrounded.
    carried: f64,
}

impl<'a> Sim<'a> {
    fn new(cfg: &'a SimConfig) -> Self {
        let release = release(cfg);
        let mut by_id: HashMap<BlobId, Vec<u32>> = HashMap::new();
        for (i, c) in release[0].chunks.iter().enumerate() {
            by_id.entry(c.id).or_default().push(i as u32);
        }
        let n = release[0].chunks.len();
        let release_bytes = release[0].chunks.iter().map(|c| u64::from(c.len)).sum();
        let names: Vec<String> = (0..cfg.agents).map(|i| format!("pi-{i:03}")).collect();
        let agents = (0..cfg.agents)
            .map(|_| SimAgent {
                fetch: None,
                alive: false,
                started: false,
                holds: vec![false; n],
                pending_have: BTreeSet::new(),
                knows: BTreeSet::new(),
                send_free: Duration::ZERO,
                recv_free: Duration::ZERO,
                next_tick: None,
                done: None,
                flushing: false,
            })
            .collect();
        let mut s = Sim {
            cfg,
            release,
            by_id,
            agents,
            names,
            queue: BTreeMap::new(),
            seq: 0,
            uplink: Vec::new(),
            uplink_at: Duration::ZERO,
            report: SimReport {
                release_bytes,
                origin_bytes: 0,
                lan_bytes: 0,
                done: vec![None; cfg.agents],
                converged: None,
                uplink_limit: Duration::from_secs_f64(release_bytes as f64 / cfg.uplink.max(1.0)),
                origin_gets: 0,
                peer_asks: 0,
                origin_log: Vec::new(),
                refetched: 0,
                peak_rate: 0.0,
            },
            dirty: BTreeSet::new(),
            origin_count: HashMap::new(),
            samples: vec![(Duration::ZERO, 0)],
            carried: 0.0,
        };
        for a in 0..cfg.agents {
            let t = cfg.start.get(a).copied().unwrap_or(Duration::ZERO);
            s.at(t, Ev::Start(a));
        }
        for &(a, t) in &cfg.deaths {
            s.at(t, Ev::Die(a));
        }
        for &(a, t) in &cfg.leaves {
            s.at(t, Ev::Leave(a));
        }
        s
    }

    fn at(&mut self, t: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    /// The next uplink completion at the current share.
    fn uplink_next(&self) -> Option<Duration> {
        let k = self.uplink.len();
        if k == 0 {
            return None;
        }
        let rate = self.cfg.uplink.max(1.0) / k as f64;
        let least = self
            .uplink
            .iter()
            .map(|t| t.remaining)
            .fold(f64::INFINITY, f64::min);
        Some(self.uplink_at + Duration::from_secs_f64((least / rate).max(0.0)))
    }

    fn advance_uplink(&mut self, t: Duration) {
        let k = self.uplink.len();
        if k > 0 && t > self.uplink_at {
            let moved = (t - self.uplink_at).as_secs_f64() * self.cfg.uplink.max(1.0) / k as f64;
            for tr in &mut self.uplink {
                let m = moved.min(tr.remaining);
                tr.remaining -= m;
                self.carried += m;
            }
            self.report.origin_bytes = self.carried.round() as u64;
        }
        self.uplink_at = t;
        if self
            .samples
            .last()
            .is_some_and(|(at, _)| t >= *at + Duration::from_millis(100))
        {
            self.samples.push((t, self.report.origin_bytes));
        }
    }

    fn peak(&self) -> f64 {
        peak_rate(&self.samples, Duration::from_secs(5))
    }

    fn run(mut self) -> SimReport {
        loop {
            let next_ev = self.queue.keys().next().map(|(t, _)| *t);
            let next_up = self.uplink_next();
            let t = match (next_ev, next_up) {
                (None, None) => break,
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
            };
            if t > self.cfg.limit {
                break;
            }
            self.advance_uplink(t);
            if next_up.is_some_and(|u| u <= t) {
                self.finish_uplink(t);
            } else if let Some(((_, _), ev)) = self.queue.pop_first() {
                self.process(t, ev);
            }
            // At the end of an instant every agent touched in it decides once.
            let later = self.queue.keys().next().is_none_or(|(n, _)| *n > t)
                && self.uplink_next().is_none_or(|u| u > t);
            if later {
                let dirty = std::mem::take(&mut self.dirty);
                for a in dirty {
                    self.poll(a, t);
                }
            }
            if self.all_done() {
                break;
            }
        }
        let alive: Vec<usize> = (0..self.cfg.agents)
            .filter(|a| self.agents[*a].alive || !self.agents[*a].started)
            .collect();
        self.report.converged = alive
            .iter()
            .map(|a| self.report.done[*a])
            .collect::<Option<Vec<_>>>()
            .and_then(|d| d.into_iter().max());
        self.report.refetched = self.origin_count.values().filter(|n| **n > 1).count();
        self.report.peak_rate = self.peak();
        self.report
    }

    fn all_done(&self) -> bool {
        let pending_events = self
            .queue
            .values()
            .any(|e| matches!(e, Ev::Start(_) | Ev::Die(_) | Ev::Leave(_)));
        !pending_events && self.agents.iter().all(|a| !a.alive || a.done.is_some())
    }

    fn finish_uplink(&mut self, t: Duration) {
        let (done, rest): (Vec<Transfer>, Vec<Transfer>) =
            self.uplink.drain(..).partition(|tr| tr.remaining <= 0.5);
        self.uplink = rest;
        for tr in done {
            if !self.agents[tr.agent].alive {
                continue;
            }
            for c in &tr.chunks {
                *self.origin_count.entry(c.id).or_default() += 1;
                self.stored(tr.agent, c.id, t);
            }
            self.deliver(
                tr.agent,
                Event::RangeDone {
                    blob: tr.blob,
                    range: tr.range,
                },
                t,
            );
        }
    }

    fn deliver(&mut self, a: usize, e: Event, t: Duration) {
        let ag = &mut self.agents[a];
        if !ag.alive {
            return;
        }
        if let Some(f) = ag.fetch.as_mut() {
            f.handle(e, t);
            self.dirty.insert(a);
        }
    }

    fn stored(&mut self, a: usize, id: BlobId, t: Duration) {
        let places = self.by_id.get(&id).cloned().unwrap_or_default();
        let ag = &mut self.agents[a];
        for p in places {
            if !ag.holds[p as usize] {
                ag.holds[p as usize] = true;
                ag.pending_have.insert(p);
            }
        }
        self.deliver(a, Event::Stored { id }, t);
        let ag = &mut self.agents[a];
        if ag.done.is_none() && ag.fetch.as_ref().is_some_and(Fetch::is_complete) {
            ag.done = Some(t);
            self.report.done[a] = Some(t);
        }
        if !ag.flushing {
            ag.flushing = true;
            // Announcements go out on the shop-wide tick, so everyone decides once per tick.
            let every = self.cfg.have_every.max(Duration::from_millis(1));
            let next = every * (t.as_nanos() / every.as_nanos()).saturating_add(1) as u32;
            self.at(next.max(t), Ev::Flush(a));
        }
    }

    fn bitmap(&self, a: usize) -> Vec<u8> {
        let holds = &self.agents[a].holds;
        let mut bits = vec![0u8; holds.len().div_ceil(8)];
        for (i, _) in holds.iter().enumerate().filter(|(_, h)| **h) {
            bits[i / 8] |= 1 << (i % 8);
        }
        bits
    }

    fn process(&mut self, t: Duration, ev: Ev) {
        let blob = self.release[0].blob;
        match ev {
            Ev::Start(a) => self.start_agent(a, t),
            Ev::Meet(a, b) => {
                if !(self.agents[a].alive && self.agents[b].alive) {
                    return;
                }
                self.agents[a].knows.insert(b);
                self.agents[b].knows.insert(a);
                for (x, y) in [(a, b), (b, a)] {
                    let up = Event::PeerUp {
                        peer: self.names[y].clone(),
                        shares: true,
                    };
                    let bm = Event::Bitmap {
                        peer: self.names[y].clone(),
                        blob,
                        bitmap: self.bitmap(y),
                    };
                    let at = t + self.cfg.lan_latency;
                    self.at(at, Ev::Deliver(x, up));
                    self.at(at, Ev::Deliver(x, bm));
                }
            }
            Ev::Die(a) => self.gone(a, false, t),
            Ev::Leave(a) => self.gone(a, true, t),
            Ev::Deliver(a, e) => self.deliver(a, e, t),
            Ev::Tick(a) => {
                if self.agents[a].next_tick.is_some_and(|w| w <= t) {
                    self.agents[a].next_tick = None;
                }
                self.dirty.insert(a);
            }
            Ev::Flush(a) => self.flush(a, t),
            Ev::PeerDone {
                to,
                from,
                id,
                asked,
            } => self.peer_done(to, from, id, asked, t),
            Ev::UplinkStart(a, blob, range, chunks) => {
                if !self.agents[a].alive {
                    return;
                }
                let remaining = (range.end - range.start) as f64;
                self.uplink.push(Transfer {
                    agent: a,
                    blob,
                    range,
                    chunks,
                    remaining,
                });
            }
        }
    }

    fn start_agent(&mut self, a: usize, t: Duration) {
        let mut fc = self.cfg.fetch.clone();
        fc.me = self.names[a].clone();
        let ag = &mut self.agents[a];
        let mut fetch = Fetch::new(fc, &self.release, &[Vec::new()], t);
        fetch.handle(
            Event::Budget {
                bytes_per_sec: self.cfg.budget,
            },
            t,
        );
        ag.fetch = Some(fetch);
        ag.alive = true;
        ag.started = true;
        self.dirty.insert(a);
        let others: Vec<usize> = (0..self.cfg.agents)
            .filter(|b| *b != a && self.agents[*b].alive)
            .collect();
        let span = self
            .cfg
            .discover
            .end
            .saturating_sub(self.cfg.discover.start);
        for b in others {
            let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
            let j = jitter(
                self.cfg.seed,
                &[b"meet", &lo.to_le_bytes(), &hi.to_le_bytes()],
            );
            let frac = (j % 10_000) as f64 / 10_000.0;
            let d = self.cfg.discover.start + span.mul_f64(frac);
            self.at(t + d, Ev::Meet(a, b));
        }
    }

    /// Agent `a` dies (its peers notice after `detect`) or leaves (they are told at once).
    fn gone(&mut self, a: usize, graceful: bool, t: Duration) {
        if !self.agents[a].alive {
            return;
        }
        self.agents[a].alive = false;
        self.uplink.retain(|tr| tr.agent != a);
        let knows: Vec<usize> = self.agents[a].knows.iter().copied().collect();
        let notice = if graceful {
            self.cfg.lan_latency
        } else {
            self.cfg.detect
        };
        for b in knows {
            self.agents[b].knows.remove(&a);
            let down = Event::PeerDown {
                peer: self.names[a].clone(),
            };
            self.at(t + notice, Ev::Deliver(b, down));
        }
    }

    /// Agent `a` pushes what it stored since its last push to the peers it knows.
    fn flush(&mut self, a: usize, t: Duration) {
        let blob = self.release[0].blob;
        self.agents[a].flushing = false;
        if !self.agents[a].alive {
            return;
        }
        let chunks: Vec<u32> = std::mem::take(&mut self.agents[a].pending_have)
            .into_iter()
            .collect();
        if chunks.is_empty() {
            return;
        }
        let knows: Vec<usize> = self.agents[a].knows.iter().copied().collect();
        for b in knows {
            let have = Event::Have {
                peer: self.names[a].clone(),
                blob,
                chunks: chunks.clone(),
            };
            self.at(t + self.cfg.lan_latency, Ev::Deliver(b, have));
        }
    }

    /// A chunk request from `to` to `from`, asked at `asked`, is answered (or, `from` being dead, times
    /// out).
    fn peer_done(&mut self, to: usize, from: usize, id: BlobId, asked: Duration, t: Duration) {
        if !self.agents[to].alive {
            return;
        }
        if !self.agents[from].alive {
            // A dead peer never answers: the request times out; a peer that left refused at once.
            let fail = Event::PeerFailed {
                peer: self.names[from].clone(),
                id,
                failure: PeerFailure::Timeout,
            };
            self.at(
                (asked + self.cfg.chunk_timeout).max(t),
                Ev::Deliver(to, fail),
            );
            return;
        }
        let len = self.chunk_len(&id);
        self.report.lan_bytes += u64::from(len);
        self.stored(to, id, t);
    }

    fn chunk_len(&self, id: &BlobId) -> u32 {
        self.by_id
            .get(id)
            .and_then(|p| p.first())
            .and_then(|p| self.release[0].chunks.get(*p as usize))
            .map_or(0, |c| c.len)
    }

    fn poll(&mut self, a: usize, t: Duration) {
        if !self.agents[a].alive {
            return;
        }
        let Some(f) = self.agents[a].fetch.as_mut() else {
            return;
        };
        let actions = f.poll(t);
        let wake = f.next_wake();
        for action in actions {
            match action {
                Action::Ask { peer, id, len } => {
                    self.report.peer_asks += 1;
                    let Some(b) = self.names.iter().position(|n| *n == peer) else {
                        continue;
                    };
                    let lat = self.cfg.lan_latency;
                    let queued = self.agents[b].send_free.saturating_sub(t + lat);
                    if self.agents[b].alive && queued > self.cfg.busy_after {
                        let busy = Event::PeerFailed {
                            peer,
                            id,
                            failure: PeerFailure::Busy,
                        };
                        self.at(t + self.cfg.busy_after + lat, Ev::Deliver(a, busy));
                        continue;
                    }
                    let xfer = Duration::from_secs_f64(f64::from(len) / self.cfg.lan.max(1.0));
                    // The sender's link and the receiver's each carry one transfer after another;
                    // a transfer ends when both have carried it (a slow sender does not hold up what
                    // the receiver takes from others).
                    let send_end = (t + lat).max(self.agents[b].send_free) + xfer;
                    let recv_end = (t + lat).max(self.agents[a].recv_free) + xfer;
                    let end = send_end.max(recv_end);
                    if self.agents[b].alive {
                        self.agents[b].send_free = send_end;
                        self.agents[a].recv_free = recv_end;
                    }
                    self.at(
                        end,
                        Ev::PeerDone {
                            to: a,
                            from: b,
                            id,
                            asked: t,
                        },
                    );
                }
                Action::Get {
                    blob,
                    range,
                    chunks,
                } => {
                    self.report.origin_gets += 1;
                    self.report.origin_log.push((t, a, blob, range.clone()));
                    self.at(
                        t + self.cfg.origin_latency,
                        Ev::UplinkStart(a, blob, range, chunks),
                    );
                }
            }
        }
        if let Some(w) = wake.filter(|w| *w > t)
            && self.agents[a].next_tick.is_none_or(|n| w < n)
        {
            self.agents[a].next_tick = Some(w);
            self.at(w, Ev::Tick(a));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop(agents: usize, mib: u64) -> SimConfig {
        SimConfig::new(agents, mib * 1024 * 1024, 40.0, 300.0)
    }

    #[test]
    fn eight_agents_converge_with_each_chunk_fetched_from_the_origin_once() {
        let cfg = shop(8, 16);
        let r = run(&cfg);
        assert!(r.converged.is_some(), "{r:?}");
        assert_eq!(r.refetched, 0, "no chunk crossed the uplink twice");
        assert!(
            r.origin_ratio() <= 1.0001,
            "origin {:.4}x",
            r.origin_ratio()
        );
        // Convergence near the uplink limit once the peers are gathered: the uplink stays busy, and
        // what is left is the LAN spreading the last pieces.
        let busy = r.converged.unwrap_or_default() - cfg.fetch.gather;
        let c = busy.as_secs_f64() / r.uplink_limit.as_secs_f64();
        assert!(
            c < 1.3,
            "convergence {c:.2}x the uplink limit after gathering"
        );
        // Deterministic.
        let again = run(&cfg);
        assert_eq!(again.converged, r.converged);
        assert_eq!(again.origin_bytes, r.origin_bytes);
    }

    #[test]
    fn a_cold_start_pulls_about_once_and_without_gathering_it_pulls_more() {
        // Eight Pis boot together with the release already published; mDNS takes up to 1.5 s.
        let cfg = shop(8, 16);
        let r = run(&cfg);
        assert!(r.origin_ratio() <= 1.05, "origin {:.3}x", r.origin_ratio());
        let mut eager = cfg.clone();
        eager.fetch.gather = Duration::ZERO;
        let e = run(&eager);
        assert!(e.converged.is_some());
        // Without gathering, the agents that start first take pieces the others are designated for
        // once they appear. (Since the origin window follows the rate, little is in flight when the
        // designation changes, so the difference is smaller than it was: 1.15x against 1.00x here.)
        assert!(
            e.origin_ratio() > r.origin_ratio() + 0.1,
            "without gathering {:.3}x, with {:.3}x",
            e.origin_ratio(),
            r.origin_ratio()
        );
    }

    #[test]
    fn a_designated_fetcher_that_dies_half_way_is_replaced_within_max_wait() {
        let mut cfg = shop(8, 16);
        let limit = cfg.uplink_limit_secs();
        let victim = 3;
        let death = Duration::from_secs_f64(cfg.fetch.gather.as_secs_f64() + limit / 2.0);
        cfg.deaths.push((victim, death));
        let r = run(&cfg);
        assert!(r.converged.is_some(), "the others converge");
        assert!(r.done[victim].is_none());
        // The pieces the victim was designated for and had not fetched: others take them from the origin
        // within max_wait of its death (its last progress), not after it is noticed dead.
        let victim_ranges: Vec<Range<u64>> = r
            .origin_log
            .iter()
            .filter(|(_, a, _, _)| *a == victim)
            .map(|(_, _, _, g)| g.clone())
            .collect();
        assert!(
            !victim_ranges.is_empty(),
            "the victim was a designated fetcher"
        );
        let takeover = r
            .origin_log
            .iter()
            .filter(|(t, a, _, g)| {
                *t > death
                    && *a != victim
                    && victim_ranges
                        .iter()
                        .any(|v| v.start < g.end && g.start < v.end)
            })
            .map(|(t, _, _, _)| *t)
            .min();
        let Some(takeover) = takeover else {
            panic!("nobody took over: {r:?}")
        };
        assert!(
            takeover <= death + cfg.fetch.max_wait + Duration::from_millis(200),
            "taken over {:?} after the death",
            takeover - death
        );
        // What the victim had in flight when it crashed is lost with it.
        assert!(r.origin_ratio() < 1.25, "origin {:.3}x", r.origin_ratio());
    }

    #[test]
    fn a_late_joiner_syncs_from_its_peers() {
        let mut cfg = shop(4, 8);
        cfg.start = vec![
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_secs(60),
        ];
        let r = run(&cfg);
        let late = r.done[3].expect("the late agent finishes");
        assert!(late < Duration::from_secs(65), "{late:?}");
        assert!(r.origin_ratio() <= 1.05, "origin {:.3}x", r.origin_ratio());
        assert!(!r.origin_log.iter().any(|(_, a, _, _)| *a == 3));
    }

    #[test]
    fn the_shop_stays_within_its_uplink_budget() {
        let mut cfg = shop(8, 32);
        // A 40 Mbit/s line, of which the shop lets deckhand take 16 Mbit/s.
        cfg.budget = Some(2_000_000);
        let r = run(&cfg);
        assert!(r.converged.is_some());
        assert!(
            r.peak_rate <= 2_000_000.0 * 1.05,
            "peak {:.0} B/s over 5 s",
            r.peak_rate
        );
        assert!(r.origin_ratio() <= 1.05, "origin {:.3}x", r.origin_ratio());
        // And it uses most of the budget: at least 80% of it, once the peers are gathered.
        let busy = r.converged.unwrap_or_default() - cfg.fetch.gather;
        assert!(
            r.origin_bytes as f64 / busy.as_secs_f64() >= 0.8 * 2_000_000.0,
            "{} bytes in {busy:?}",
            r.origin_bytes
        );
    }

    impl SimConfig {
        fn uplink_limit_secs(&self) -> f64 {
            self.release_bytes as f64 / self.uplink
        }
    }
}
