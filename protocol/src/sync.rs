//! Fleet sync decisions, as pure functions of what an agent knows and `now`.
//!
//! * **Rendezvous assignment.** Among the live agents that want the same release, each chunk has one
//!   designated origin fetcher: the agent whose `blake3(agent id || chunk id)` is highest. Every agent
//!   computes the same answer from the same membership, with no tracker; when membership changes, only
//!   the chunks of the agents that came or went move.
//! * **Planning a chunk.** A chunk some peer already holds is fetched from that peer. A chunk this agent is
//!   designated for is fetched from the origin. Any other chunk waits for its designated fetcher, for a
//!   bounded time, then is fetched from the origin by this agent too.
//! * **Coalescing.** Chunks fetched from the origin are grouped into Range GETs of adjacent chunks.

use crate::chunk::Chunk;
use crate::id::BlobId;
use std::ops::Range;
use std::time::Duration;

/// The score of `agent` for `chunk` in rendezvous hashing.
pub fn rendezvous_score(agent: &str, chunk: &BlobId) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&(agent.len() as u64).to_le_bytes());
    h.update(agent.as_bytes());
    h.update(chunk.as_bytes());
    *h.finalize().as_bytes()
}

/// The designated origin fetcher of `chunk` among `agents` (ties, impossible in practice, go to the
/// smaller id). `None` when there are no agents.
pub fn designated<'a>(agents: &'a [String], chunk: &BlobId) -> Option<&'a str> {
    agents
        .iter()
        .map(|a| (rendezvous_score(a, chunk), a))
        .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| b.cmp(a)))
        .map(|(_, a)| a.as_str())
}

/// Groups chunks (in any order) into byte ranges of adjacent chunks, each at most `max_len` bytes long
/// (a single chunk longer than that is its own range).
pub fn coalesce(chunks: &[Chunk], max_len: u64) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = chunks.iter().map(Chunk::range).collect();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last) if last.end == r.start && r.end - last.start <= max_len => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// What one agent should do about one missing chunk now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Fetch it from this peer, which holds it.
    FromPeer(String),
    /// Fetch it from the origin.
    FromOrigin,
    /// Wait: the designated fetcher (named) should have it by `until` (a deadline on the caller's clock).
    Wait { fetcher: String, until: Duration },
}

/// What an agent knows when deciding about a chunk.
#[derive(Clone, Debug)]
pub struct View<'a> {
    /// This agent's id.
    pub me: &'a str,
    /// Live agents (this one included) that want the same release.
    pub group: &'a [String],
    /// Peers known to hold the chunk, best first (the caller orders them, e.g. by past speed), excluding
    /// banned peers.
    pub holders: &'a [String],
    /// Whether the origin can be reached at all.
    pub origin_reachable: bool,
    /// When this agent started waiting for the chunk (caller's clock), and for how long it may wait.
    pub waiting_since: Duration,
    pub max_wait: Duration,
    pub now: Duration,
}

/// Decides what to do about one missing chunk.
pub fn decide(chunk: &BlobId, v: &View<'_>) -> Decision {
    if let Some(peer) = v.holders.iter().find(|p| p.as_str() != v.me) {
        return Decision::FromPeer(peer.clone());
    }
    let fetcher = designated(v.group, chunk).unwrap_or(v.me);
    if fetcher == v.me || !v.origin_reachable {
        // Without an origin, waiting longer is all there is; the caller retries the origin later.
        if fetcher != v.me {
            return Decision::Wait {
                fetcher: fetcher.to_owned(),
                until: v.now + v.max_wait,
            };
        }
        return Decision::FromOrigin;
    }
    let until = v.waiting_since + v.max_wait;
    if v.now >= until {
        Decision::FromOrigin
    } else {
        Decision::Wait {
            fetcher: fetcher.to_owned(),
            until,
        }
    }
}

/// Reads bit `i` of a chunk bitmap (least significant bit first within each byte).
pub fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// The next poll after a failed one: the backoff doubles up to `max`, and the wait is jittered to
/// 50%..100% of it, from a hash of the agent's id and the attempt number, so a shop's agents (which
/// fail together when the uplink drops) do not retry in lockstep. Returns (new backoff, wait).
pub fn poll_backoff(
    previous: Duration,
    max: Duration,
    agent: &str,
    attempt: u64,
) -> (Duration, Duration) {
    let backoff = previous.saturating_mul(2).min(max);
    let mut h = blake3::Hasher::new();
    h.update(b"deckhand poll jitter");
    h.update(&(agent.len() as u64).to_le_bytes());
    h.update(agent.as_bytes());
    h.update(&attempt.to_le_bytes());
    let j = f64::from(h.finalize().as_bytes()[0]) / 255.0;
    (backoff, backoff.mul_f64(0.5 + 0.5 * j))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn agents(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("agent-{i}")).collect()
    }

    fn ids(n: usize) -> Vec<BlobId> {
        (0..n as u32)
            .map(|i| BlobId::of(&i.to_le_bytes()))
            .collect()
    }

    #[test]
    fn rendezvous_spreads_chunks_evenly_and_moves_few_on_membership_change() {
        let five = agents(5);
        let chunks = ids(5000);
        let mut load: HashMap<&str, usize> = HashMap::new();
        for c in &chunks {
            *load.entry(designated(&five, c).unwrap()).or_default() += 1;
        }
        for (a, n) in &load {
            assert!((800..1200).contains(n), "{a} got {n} of 5000");
        }
        // Agent 4 leaves: only its chunks move.
        let four = agents(4);
        let moved = chunks
            .iter()
            .filter(|c| designated(&five, c) != designated(&four, c))
            .count();
        assert_eq!(moved, load["agent-4"]);
        // Order of the group does not matter.
        let mut shuffled = five.clone();
        shuffled.reverse();
        assert!(
            chunks
                .iter()
                .all(|c| designated(&five, c) == designated(&shuffled, c))
        );
        assert_eq!(designated(&[], &chunks[0]), None);
    }

    #[test]
    fn coalescing_merges_adjacent_chunks_up_to_a_limit() {
        let c = |offset: u64, len: u32| Chunk {
            offset,
            len,
            id: BlobId::of(&offset.to_le_bytes()),
        };
        let chunks = [c(200, 100), c(0, 100), c(100, 100), c(400, 50), c(450, 50)];
        assert_eq!(coalesce(&chunks, 1000), vec![0..300, 400..500]);
        assert_eq!(coalesce(&chunks, 200), vec![0..200, 200..300, 400..500]);
        assert_eq!(coalesce(&[c(0, 5000)], 1000), vec![0..5000]);
        assert!(coalesce(&[], 10).is_empty());
    }

    fn view<'a>(me: &'a str, group: &'a [String], holders: &'a [String], now: u64) -> View<'a> {
        View {
            me,
            group,
            holders,
            origin_reachable: true,
            waiting_since: Duration::from_secs(10),
            max_wait: Duration::from_secs(5),
            now: Duration::from_secs(now),
        }
    }

    #[test]
    fn decisions_prefer_peers_then_the_designated_fetcher_then_the_origin() {
        let group = agents(3);
        let chunk = ids(1)[0];
        let fetcher = designated(&group, &chunk).unwrap().to_owned();
        let other = group.iter().find(|a| **a != fetcher).unwrap().clone();

        // A peer holds it: from the peer, even for the designated fetcher.
        let holders = vec![other.clone()];
        assert_eq!(
            decide(&chunk, &view(&fetcher, &group, &holders, 10)),
            Decision::FromPeer(other.clone())
        );
        // Nobody holds it: the designated fetcher goes to the origin at once.
        assert_eq!(
            decide(&chunk, &view(&fetcher, &group, &[], 10)),
            Decision::FromOrigin
        );
        // The others wait for it, for a bounded time, then go to the origin themselves.
        assert_eq!(
            decide(&chunk, &view(&other, &group, &[], 12)),
            Decision::Wait {
                fetcher: fetcher.clone(),
                until: Duration::from_secs(15)
            }
        );
        assert_eq!(
            decide(&chunk, &view(&other, &group, &[], 15)),
            Decision::FromOrigin
        );
        // With no origin at all, waiting is all there is.
        let mut v = view(&other, &group, &[], 30);
        v.origin_reachable = false;
        assert!(matches!(decide(&chunk, &v), Decision::Wait { .. }));
        // A holder list naming only this agent is not a peer.
        let me_only = vec![other.clone()];
        assert_ne!(
            decide(&chunk, &view(&other, &group, &me_only, 10)),
            Decision::FromPeer(other.clone())
        );
    }

    /// Five agents fetching one release with virtual time: each chunk crosses the uplink once, when every
    /// agent shares what it fetched before the others' waits run out.
    #[test]
    fn a_fleet_fetches_each_chunk_from_the_origin_once() {
        let group = agents(5);
        let chunks = ids(400);
        let mut held: HashMap<BlobId, Vec<String>> = HashMap::new();
        let mut origin_fetches = 0;
        let mut peer_fetches = 0;
        for round in 0..3u64 {
            for me in &group {
                for c in &chunks {
                    let mine = held.get(c).is_some_and(|h| h.contains(me));
                    if mine {
                        continue;
                    }
                    let holders = held.get(c).cloned().unwrap_or_default();
                    match decide(c, &view(me, &group, &holders, 10 + round)) {
                        Decision::FromOrigin => origin_fetches += 1,
                        Decision::FromPeer(_) => peer_fetches += 1,
                        Decision::Wait { .. } => continue,
                    }
                    held.entry(*c).or_default().push(me.clone());
                }
            }
        }
        assert_eq!(
            origin_fetches, 400,
            "each chunk from the origin exactly once"
        );
        assert_eq!(peer_fetches, 400 * 4);
        assert!(held.values().all(|h| h.len() == 5));
    }

    #[test]
    fn poll_backoff_doubles_to_a_cap_and_agents_do_not_retry_in_lockstep() {
        let (poll, max) = (Duration::from_secs(30), Duration::from_secs(300));
        let mut b = poll;
        let mut seen = Vec::new();
        for attempt in 0..8 {
            let (next, wait) = poll_backoff(b, max, "pi-1", attempt);
            assert_eq!(next, (b * 2).min(max));
            assert!(wait >= next / 2 && wait <= next, "{wait:?} of {next:?}");
            assert_eq!(
                poll_backoff(b, max, "pi-1", attempt),
                (next, wait),
                "deterministic"
            );
            seen.push(wait);
            b = next;
        }
        assert_eq!(b, max);
        // Ten agents failing at the same moment spread their retries.
        let waits: std::collections::BTreeSet<Duration> = (0..10)
            .map(|i| poll_backoff(poll, max, &format!("pi-{i}"), 0).1)
            .collect();
        assert!(waits.len() >= 8, "{waits:?}");
        let (lo, hi) = (waits.first().unwrap(), waits.last().unwrap());
        assert!(*hi - *lo >= Duration::from_secs(10), "{lo:?}..{hi:?}");
    }
}
