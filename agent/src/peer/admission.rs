//! Who may start a QUIC handshake with this agent, as pure bookkeeping (the accept loop does the I/O).
//!
//! A handshake costs the agent a slot until it completes or times out, and anyone on the LAN can start
//! one: a script replaying captured Initial packets from fresh ports holds a slot per packet without
//! ever finishing. So handshakes in flight are bounded in total and per source address, and when a
//! bound is reached the **oldest** handshake of that address (or of all) is shed: a member's handshake
//! completes in milliseconds on a LAN, a stalled one never does, so shedding the oldest keeps a member's
//! way in open. Under pressure (an address at its bound, or half the slots taken) an address that has
//! not proved it receives our packets is first sent a QUIC Retry, which costs nothing to hold: replayed
//! or spoofed Initials never come back with the token.
//!
//! Connections that completed the handshake are members (their certificate checked) and are counted
//! apart, per agent id: a stalled stranger never takes a member's place.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshakes in flight at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Handshakes in flight from one address.
pub const PER_ADDRESS: usize = 8;
/// How long a handshake may take before it is dropped (a LAN handshake takes milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections one member may hold open to this agent at once (a dial each way, and a spare while an
/// old one is being replaced).
pub const PER_MEMBER: usize = 4;

/// What to do with a new Initial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Ask the address to prove it receives our packets first (a QUIC Retry).
    Retry,
    /// Start the handshake under `ticket`; cancel the handshake `shed` (the oldest) to make room.
    Start { ticket: u64, shed: Option<u64> },
}

/// Handshakes in flight, oldest first.
#[derive(Debug, Default)]
pub struct Handshakes {
    pending: VecDeque<(u64, IpAddr, Instant)>,
    next: u64,
    shed: u64,
}

impl Handshakes {
    /// Admits an Initial from `ip`; `validated` says its address was proved (it came back with a Retry
    /// token).
    pub fn admit(&mut self, ip: IpAddr, validated: bool, now: Instant) -> Admit {
        let from_ip = self.pending.iter().filter(|(_, a, _)| *a == ip).count();
        let pressed = from_ip >= PER_ADDRESS || self.pending.len() >= MAX_HANDSHAKES / 2;
        if pressed && !validated {
            return Admit::Retry;
        }
        let shed = if from_ip >= PER_ADDRESS {
            self.pending.iter().position(|(_, a, _)| *a == ip)
        } else if self.pending.len() >= MAX_HANDSHAKES {
            Some(0)
        } else {
            None
        }
        .and_then(|i| self.pending.remove(i))
        .map(|(t, _, _)| t);
        self.shed += u64::from(shed.is_some());
        let ticket = self.next;
        self.next += 1;
        self.pending.push_back((ticket, ip, now));
        Admit::Start { ticket, shed }
    }

    /// The handshake under `ticket` ended (completed, failed, timed out or shed).
    pub fn done(&mut self, ticket: u64) {
        self.pending.retain(|(t, _, _)| *t != ticket);
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Handshakes shed to make room, since the start.
    pub fn shed_total(&self) -> u64 {
        self.shed
    }
}

/// Addresses this agent dials (from mDNS, `--peer`, a peer's Hello), at most [`MAX_ADDRESSES`].
pub const MAX_ADDRESSES: usize = 256;
/// Failed dials in a row after which an address found by discovery is forgotten (about 3 minutes of
/// backing off); it is learnt again when it is advertised again.
pub const MAX_FAILURES: u32 = 6;
/// Addresses that did not fit in a full table, waiting for their one dial (the oldest dropped first).
pub const MAX_FRESH: usize = 1024;
/// Waiting addresses dialed per round of the dial loop.
pub const FRESH_PER_ROUND: usize = 16;
/// The wait before the first retry of a failed dial, doubled after each failure (at most 16 times).
pub const RETRY: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
struct Dial {
    next: Instant,
    failures: u32,
    /// Configured (`--peer`): never forgotten nor evicted.
    pinned: bool,
}

/// What [`DialTable::add`] did with an address: the dial loop is woken only when there is a dial to
/// make that it does not know of already (an idle shop hears each peer's address in every Hello).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// New, or known and waiting out a backoff: it is due now.
    Due,
    /// The table is full of addresses that have not failed yet: it waits outside for its one dial,
    /// due now too.
    Waiting,
    /// Known and due already, or connected (not dialed while it stays so), or waiting outside already.
    Unchanged,
}

/// The addresses to dial. An advert that never connects backs off and ages out, and when the table is
/// full a new address takes the place of the one that failed most (never a configured one, never one
/// that has not failed). One that finds no place (every address in the table is new) is not refused:
/// it waits in a bounded queue and is dialed once, a few per round, and kept if it reaches a member.
/// Every advert is tried, so a LAN full of fake adverts cannot keep a member's address out.
#[derive(Debug, Default)]
pub struct DialTable {
    addrs: std::collections::HashMap<std::net::SocketAddr, Dial>,
    /// Addresses waiting for their one dial, oldest first.
    fresh: VecDeque<std::net::SocketAddr>,
    evicted: u64,
    aged_out: u64,
}

impl DialTable {
    /// Adds an address to dial now; `pinned` for a configured peer. An address already known is dialed
    /// at once again if it was waiting (a peer that reconnects, an advert that came back). When the
    /// table is full of addresses that have not failed yet, a new one waits for its one dial instead.
    pub fn add(&mut self, addr: std::net::SocketAddr, pinned: bool, now: Instant) -> Added {
        if let Some(d) = self.addrs.get_mut(&addr) {
            d.pinned |= pinned;
            if d.next <= now {
                return Added::Unchanged;
            }
            d.next = now;
            return Added::Due;
        }
        if !self.make_room() && !pinned {
            if self.fresh.contains(&addr) {
                return Added::Unchanged;
            }
            if self.fresh.len() >= MAX_FRESH {
                self.fresh.pop_front();
            }
            self.fresh.push_back(addr);
            return Added::Waiting;
        }
        self.addrs.insert(
            addr,
            Dial {
                next: now,
                failures: 0,
                pinned,
            },
        );
        Added::Due
    }

    /// Whether there is room for one more address, evicting the one that failed most if need be.
    fn make_room(&mut self) -> bool {
        if self.addrs.len() >= MAX_ADDRESSES {
            let worst = self
                .addrs
                .iter()
                .filter(|(_, d)| !d.pinned && d.failures > 0)
                .max_by_key(|(_, d)| (d.failures, std::cmp::Reverse(d.next)))
                .map(|(a, _)| *a);
            match worst {
                Some(w) => {
                    self.addrs.remove(&w);
                    self.evicted += 1;
                }
                None => return false,
            }
        }
        true
    }

    /// The addresses due for a dial at `now`, not in `skip` (connected already); each is given its next
    /// attempt as if this one fails.
    pub fn due(
        &mut self,
        now: Instant,
        skip: &std::collections::HashSet<std::net::SocketAddr>,
    ) -> Vec<std::net::SocketAddr> {
        let mut due = Vec::new();
        for (a, d) in &mut self.addrs {
            if d.next <= now && !skip.contains(a) {
                d.next = now + backoff(d.failures);
                due.push(*a);
            }
        }
        let mut taken = 0;
        while taken < FRESH_PER_ROUND {
            let Some(a) = self.fresh.pop_front() else {
                break;
            };
            if !skip.contains(&a) && !self.addrs.contains_key(&a) {
                due.push(a);
                taken += 1;
            }
        }
        due
    }

    /// When the next address not in `skip` (connected already) is due for a dial (`now` when one
    /// waits outside a full table), `None` when there is nothing to dial.
    pub fn next_due(
        &self,
        now: Instant,
        skip: &std::collections::HashSet<std::net::SocketAddr>,
    ) -> Option<Instant> {
        let waiting = self
            .fresh
            .iter()
            .any(|a| !skip.contains(a) && !self.addrs.contains_key(a));
        let next = self
            .addrs
            .iter()
            .filter(|(a, _)| !skip.contains(*a))
            .map(|(_, d)| d.next)
            .min();
        if waiting {
            Some(next.map_or(now, |n| n.min(now)))
        } else {
            next
        }
    }

    /// A dial of `addr` failed: it backs off further, and one found by discovery that failed
    /// [`MAX_FAILURES`] times in a row is forgotten.
    pub fn failed(&mut self, addr: std::net::SocketAddr, now: Instant) {
        let Some(d) = self.addrs.get_mut(&addr) else {
            return;
        };
        d.failures = d.failures.saturating_add(1);
        d.next = now + backoff(d.failures);
        if d.failures >= MAX_FAILURES && !d.pinned {
            self.addrs.remove(&addr);
            self.aged_out += 1;
        }
    }

    /// A dial of `addr` reached a member: kept (an address that waited outside a full table takes a
    /// place if one failed).
    pub fn connected(&mut self, addr: std::net::SocketAddr, now: Instant) {
        if let Some(d) = self.addrs.get_mut(&addr) {
            d.failures = 0;
        } else if self.make_room() {
            self.addrs.insert(
                addr,
                Dial {
                    next: now + RETRY,
                    failures: 0,
                    pinned: false,
                },
            );
        }
    }

    pub fn remove(&mut self, addr: &std::net::SocketAddr) {
        self.addrs.remove(addr);
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Addresses evicted for newer ones, and forgotten after failing, since the start.
    pub fn dropped(&self) -> (u64, u64) {
        (self.evicted, self.aged_out)
    }
}

/// The wait after `failures` failed dials in a row.
fn backoff(failures: u32) -> Duration {
    RETRY * 2u32.pow(failures.min(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_address_holds_at_most_its_share_and_its_oldest_is_shed() {
        let mut h = Handshakes::default();
        let now = Instant::now();
        let mut tickets = Vec::new();
        for _ in 0..PER_ADDRESS {
            match h.admit(ip(1), false, now) {
                Admit::Start { ticket, shed: None } => tickets.push(ticket),
                other => panic!("{other:?}"),
            }
        }
        // At its share: an unproved address is asked to prove itself, which holds nothing.
        assert_eq!(h.admit(ip(1), false, now), Admit::Retry);
        assert_eq!(h.in_flight(), PER_ADDRESS);
        // Proved (a member behind the same address, a Retry answered): its oldest is shed.
        match h.admit(ip(1), true, now) {
            Admit::Start { shed, .. } => assert_eq!(shed, Some(tickets[0])),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.in_flight(), PER_ADDRESS);
        assert_eq!(h.shed_total(), 1);
        // Another address is not held back by this one.
        assert!(matches!(
            h.admit(ip(2), false, now),
            Admit::Start { shed: None, .. }
        ));
    }

    #[test]
    fn when_every_slot_is_taken_the_oldest_handshake_makes_room() {
        let mut h = Handshakes::default();
        let now = Instant::now();
        let mut first = None;
        for i in 0..MAX_HANDSHAKES {
            let a = ip(u8::try_from(i / PER_ADDRESS).unwrap());
            match h.admit(a, true, now) {
                Admit::Start { ticket, shed: None } => {
                    first.get_or_insert(ticket);
                }
                other => panic!("{other:?}"),
            }
        }
        // Half the slots taken: a new unproved address is retried; a proved one sheds the oldest.
        assert_eq!(h.admit(ip(200), false, now), Admit::Retry);
        match h.admit(ip(200), true, now) {
            Admit::Start { shed, .. } => assert_eq!(shed, first),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.in_flight(), MAX_HANDSHAKES);
        // Done handshakes free their slots.
        for t in 0..200 {
            h.done(t);
        }
        assert_eq!(h.in_flight(), 0);
    }

    fn addr(i: u32) -> std::net::SocketAddr {
        std::net::SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 7000))
    }

    #[test]
    fn fake_adverts_age_out_and_a_full_table_makes_room_for_a_new_one() {
        let mut t = DialTable::default();
        let now = Instant::now();
        assert_eq!(t.add(addr(0), true, now), Added::Due, "a configured peer");
        for i in 1..MAX_ADDRESSES as u32 {
            assert_eq!(Added::Due, t.add(addr(i), false, now));
        }
        // Full of addresses not yet tried: a new one waits outside, and is dialed once all the same.
        assert_eq!(Added::Waiting, t.add(addr(8888), false, now));
        let none = std::collections::HashSet::new();
        let due = t.due(now, &none);
        assert_eq!(due.len(), MAX_ADDRESSES + 1);
        assert!(due.contains(&addr(8888)));
        // Every dial fails (fake adverts; the configured peer is down too); the waiting one is gone.
        for a in &due {
            t.failed(*a, now);
        }
        assert_eq!(t.len(), MAX_ADDRESSES);
        // Nothing is due again before the backoff.
        assert!(t.due(now + RETRY / 2, &none).is_empty());
        // A member's advert takes the place of one that failed, and is dialed at once.
        assert_eq!(Added::Due, t.add(addr(9999), false, now));
        assert_eq!(t.len(), MAX_ADDRESSES);
        assert_eq!(t.due(now, &none), vec![addr(9999)]);
        assert_eq!(t.dropped(), (1, 0));
        // Failing on, the fakes are forgotten; the configured peer stays.
        let mut at = now;
        for _ in 0..MAX_FAILURES {
            at += Duration::from_secs(3600);
            for a in t.due(at, &none) {
                if a != addr(9999) {
                    t.failed(a, at);
                } else {
                    t.connected(a, at);
                }
            }
        }
        assert_eq!(t.len(), 2, "the configured peer and the member");
        assert_eq!(t.dropped().1, MAX_ADDRESSES as u64 - 2);
        // Connected addresses are not dialed again.
        let skip: std::collections::HashSet<_> = [addr(9999)].into();
        assert_eq!(t.due(at + Duration::from_secs(3600), &skip), vec![addr(0)]);
    }

    #[test]
    fn the_dial_loop_sleeps_until_the_next_address_not_connected_is_due() {
        let mut t = DialTable::default();
        let now = Instant::now();
        let none = std::collections::HashSet::new();
        assert_eq!(t.next_due(now, &none), None, "nothing to dial: no wake-up");
        t.add(addr(1), false, now);
        t.add(addr(2), false, now);
        assert_eq!(t.next_due(now, &none), Some(now));
        assert_eq!(t.due(now, &none).len(), 2);
        // Both dialed: each is next due after a retry's wait, as if it failed.
        assert_eq!(t.next_due(now, &none), Some(now + RETRY));
        t.failed(addr(1), now);
        t.connected(addr(2), now);
        let connected: std::collections::HashSet<_> = [addr(2)].into();
        // The connected one is not dialed while it stays connected; the failed one backs off.
        assert_eq!(t.next_due(now, &connected), Some(now + backoff(1)));
        t.remove(&addr(1));
        assert_eq!(
            t.next_due(now, &connected),
            None,
            "all connected: no wake-up"
        );
        // The connection closes: its address is due a retry's wait after it was dialed, as if that failed.
        assert_eq!(t.next_due(now + RETRY, &none), Some(now + RETRY));
        // An advert waiting outside a full table is due now.
        for i in 10..(MAX_ADDRESSES as u32 + 9) {
            t.add(addr(i), false, now);
        }
        let all: std::collections::HashSet<_> = (0..MAX_ADDRESSES as u32 + 9).map(addr).collect();
        assert_eq!(t.next_due(now, &all), None);
        assert_eq!(Added::Waiting, t.add(addr(9999), false, now));
        assert_eq!(t.next_due(now, &all), Some(now));
    }

    #[test]
    fn an_address_heard_again_changes_the_table_only_when_it_was_waiting() {
        let mut t = DialTable::default();
        let now = Instant::now();
        let none = std::collections::HashSet::new();
        assert_eq!(t.add(addr(1), false, now), Added::Due);
        assert_eq!(t.add(addr(1), false, now), Added::Unchanged, "due already");
        assert_eq!(t.due(now, &none), vec![addr(1)]);
        t.connected(addr(1), now);
        // Connected: its next dial is a retry's wait away, and the peer's every Hello names it.
        let later = now + RETRY * 2;
        assert_eq!(t.add(addr(1), false, later), Added::Unchanged);
        assert_eq!(t.next_due(later, &none), Some(now + RETRY));
        // Failing, it backs off; heard again (an advert that came back), it is due at once.
        t.failed(addr(1), later);
        let soon = later + Duration::from_millis(10);
        assert_eq!(t.next_due(soon, &none), Some(later + backoff(1)));
        assert_eq!(t.add(addr(1), false, soon), Added::Due);
        assert_eq!(t.next_due(soon, &none), Some(soon));
        // A configured peer heard as an advert first is pinned all the same.
        assert_eq!(t.add(addr(1), true, soon), Added::Unchanged);
        for _ in 0..MAX_FAILURES + 1 {
            t.failed(addr(1), soon);
        }
        assert_eq!(t.len(), 1, "pinned: never forgotten");
    }

    #[test]
    fn an_advert_that_found_no_room_is_dialed_once_and_kept_if_it_reaches_a_member() {
        let mut t = DialTable::default();
        let now = Instant::now();
        for i in 0..MAX_ADDRESSES as u32 {
            assert_eq!(Added::Due, t.add(addr(i), false, now));
        }
        let none = std::collections::HashSet::new();
        assert_eq!(t.due(now, &none).len(), MAX_ADDRESSES);
        // More fresh adverts than a round takes: they wait, in order, a round's worth at a time.
        for i in 0..(FRESH_PER_ROUND as u32 + 4) {
            assert_eq!(Added::Waiting, t.add(addr(1000 + i), false, now));
        }
        let round = t.due(now, &none);
        assert_eq!(round.len(), FRESH_PER_ROUND);
        assert_eq!(round[0], addr(1000));
        assert_eq!(t.due(now, &none).len(), 4);
        // The member's address is kept once a table address failed to make room for it.
        t.connected(addr(1000), now);
        assert_eq!(t.len(), MAX_ADDRESSES, "no room yet: nothing failed");
        t.failed(addr(0), now);
        t.connected(addr(1000), now);
        assert!(
            t.due(now + Duration::from_secs(60), &none)
                .contains(&addr(1000))
        );
        // The queue is bounded: the oldest waiting are dropped first.
        for i in 0..(MAX_FRESH as u32 + 10) {
            t.add(addr(5000 + i), false, now);
        }
        assert_eq!(t.fresh.len(), MAX_FRESH);
        assert_eq!(t.fresh.front(), Some(&addr(5010)));
    }
}
