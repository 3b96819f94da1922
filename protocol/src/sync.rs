//! Fleet sync decisions, as pure functions of what an agent knows and `now`.
//!
//! * **Rendezvous assignment.** Among the live agents that want the same release, each chunk has one
//!   designated origin fetcher: the agent whose `blake3(agent id || chunk id)` is highest. Every agent
//!   computes the same answer from the same membership, with no tracker; when membership changes, only
//!   the chunks of the agents that came or went move.
//! * **The download** that uses them is the state machine in [`crate::fetch`].

use crate::id::BlobId;
use std::time::Duration;

/// The score of `agent` for `chunk` in rendezvous hashing.
pub fn rendezvous_score(agent: &str, chunk: &BlobId) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&(agent.len() as u64).to_le_bytes());
    h.update(agent.as_bytes());
    h.update(chunk.as_bytes());
    *h.finalize().as_bytes()
}

/// The rendezvous key of a piece of a blob (the unit of origin assignment in [`crate::fetch`]): every
/// agent derives the same key from the blob id and the piece number.
pub fn piece_key(blob: &BlobId, piece: u64) -> BlobId {
    let mut h = blake3::Hasher::new();
    h.update(b"deckhand piece");
    h.update(blob.as_bytes());
    h.update(&piece.to_le_bytes());
    BlobId::from_bytes(*h.finalize().as_bytes())
}

/// The designated origin fetcher, among `agents`, of the piece of `blob` holding `offset` (pieces of
/// `piece` bytes): what [`crate::fetch`] decides with.
pub fn piece_fetcher<'a>(
    agents: &'a [String],
    blob: &BlobId,
    offset: u64,
    piece: u64,
) -> Option<&'a str> {
    designated(agents, &piece_key(blob, offset / piece.max(1)))
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
