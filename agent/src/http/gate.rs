//! Who holds a connection to the HTTP API when a LAN client opens too many.
//!
//! The API shares the shop's LAN with everything on it. A client that opens connections and sends
//! nothing (or a header and a little of a large body, then waits) must not keep the tills out. Each
//! connection's reads are timed ([`Activity`]); when an address holds its share or the server holds its
//! cap, the quietest connection that has been quiet for a while is shed to admit the new one, and only
//! when every connection is busy is the newcomer refused. A till's request reads its bytes and is
//! answered within a few hundred milliseconds, so it is never the quiet one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The gate's limits (`http_max_connections`, `http_max_per_address`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once, from everyone.
    pub max_connections: usize,
    /// Connections held at once from one address.
    pub per_address: usize,
    /// A connection that read nothing for this long may be shed for a newcomer.
    pub quiet: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            per_address: 64,
            quiet: Duration::from_secs(1),
        }
    }
}

/// When a connection last read bytes (or opened), shared between the gate and the connection's
/// stream, which touches it on every read; and how many of its requests are being worked on (read
/// whole, waiting for their answer), which makes it busy however long it has been quiet.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
    working: AtomicU32,
}

/// Marks a connection busy while it lives (see [`Activity::working`]).
pub struct Working<'a>(&'a Activity);

impl Drop for Working<'_> {
    fn drop(&mut self) {
        self.0.working.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn new(start: Instant, now: Instant) -> Self {
        let a = Activity {
            start,
            last_ms: AtomicU64::new(0),
            working: AtomicU32::new(0),
        };
        a.touch_at(now);
        a
    }

    /// Records a read now.
    pub fn touch(&self) {
        self.touch_at(Instant::now());
    }

    /// A request on this connection was read whole and is being answered: the connection is busy
    /// until the returned guard drops.
    pub fn working(&self) -> Working<'_> {
        self.working.fetch_add(1, Ordering::Relaxed);
        Working(self)
    }

    fn touch_at(&self, now: Instant) {
        let ms = u64::try_from(now.saturating_duration_since(self.start).as_millis())
            .unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self, now: Instant) -> Duration {
        if self.working.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }
}

/// What the gate decided about a new connection.
#[derive(Debug)]
pub enum Admission {
    /// Serve it. `shed` resolves when the gate sheds it for a newcomer: the connection is dropped.
    Admit {
        id: u64,
        activity: Arc<Activity>,
        shed: tokio::sync::oneshot::Receiver<()>,
    },
    /// Close it at once: every connection is busy.
    Refuse(Refusal),
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this address holds {0} busy connections, its limit")]
    Address(usize),
    #[error("the server holds {0} busy connections, its limit")]
    Server(usize),
}

struct Slot {
    addr: IpAddr,
    activity: Arc<Activity>,
    /// Dropped (or sent on) to shed the connection.
    shed: tokio::sync::oneshot::Sender<()>,
}

/// The connections being served and their activity.
pub struct Gate {
    limits: Limits,
    start: Instant,
    next_id: u64,
    slots: HashMap<u64, Slot>,
    shed_total: u64,
    refused_total: u64,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        Gate {
            limits,
            start: Instant::now(),
            next_id: 0,
            slots: HashMap::new(),
            shed_total: 0,
            refused_total: 0,
        }
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Connections shed for newcomers, and refused, since start.
    pub fn counts(&self) -> (u64, u64) {
        (self.shed_total, self.refused_total)
    }

    /// Decides about a connection from `addr` arriving at `now`.
    pub fn admit(&mut self, addr: IpAddr, now: Instant) -> Admission {
        let from_addr = self.slots.values().filter(|s| s.addr == addr).count();
        if from_addr >= self.limits.per_address {
            match self.quietest(now, Some(addr)) {
                Some(id) => self.shed(id),
                None => return self.refuse(Refusal::Address(from_addr)),
            }
        }
        if self.slots.len() >= self.limits.max_connections {
            match self.quietest(now, None) {
                Some(id) => self.shed(id),
                None => return self.refuse(Refusal::Server(self.slots.len())),
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let activity = Arc::new(Activity::new(self.start, now));
        let (tx, shed) = tokio::sync::oneshot::channel();
        self.slots.insert(
            id,
            Slot {
                addr,
                activity: activity.clone(),
                shed: tx,
            },
        );
        Admission::Admit { id, activity, shed }
    }

    /// A connection ended.
    pub fn close(&mut self, id: u64) {
        self.slots.remove(&id);
    }

    /// The connection (from `addr`, if given) that has read nothing for longest, if that is at least
    /// `quiet`.
    fn quietest(&self, now: Instant, addr: Option<IpAddr>) -> Option<u64> {
        self.slots
            .iter()
            .filter(|(_, s)| addr.is_none_or(|a| s.addr == a))
            .map(|(id, s)| (s.activity.quiet_for(now), *id))
            .filter(|(quiet, _)| *quiet >= self.limits.quiet)
            .max()
            .map(|(_, id)| id)
    }

    fn shed(&mut self, id: u64) {
        if let Some(slot) = self.slots.remove(&id) {
            self.shed_total += 1;
            let _ = slot.shed.send(());
        }
    }

    fn refuse(&mut self, why: Refusal) -> Admission {
        self.refused_total += 1;
        Admission::Refuse(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn admitted(a: Admission) -> (u64, Arc<Activity>, tokio::sync::oneshot::Receiver<()>) {
        match a {
            Admission::Admit { id, activity, shed } => (id, activity, shed),
            Admission::Refuse(why) => panic!("refused: {why}"),
        }
    }

    #[test]
    fn the_quietest_connection_is_shed_for_a_newcomer_and_busy_ones_never_are() {
        let limits = Limits {
            max_connections: 3,
            per_address: 2,
            quiet: Duration::from_secs(1),
        };
        let mut gate = Gate::new(limits);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Two connections from one address: the first goes quiet, the second keeps reading.
        let (_, quiet, mut quiet_shed) = admitted(gate.admit(ip(9), at(0)));
        let (_, busy, mut busy_shed) = admitted(gate.admit(ip(9), at(100)));
        busy.touch_at(at(2_000));
        // A third from that address sheds the quiet one, not the busy one.
        let (_, third, _) = admitted(gate.admit(ip(9), at(2_100)));
        assert!(
            quiet_shed.try_recv().is_ok(),
            "the quiet connection is shed"
        );
        assert!(busy_shed.try_recv().is_err(), "the busy one is kept");
        assert_eq!(gate.len(), 2);
        drop(quiet);
        // Both of that address's connections busy now: a fourth from it is refused.
        third.touch_at(at(2_500));
        busy.touch_at(at(2_500));
        assert!(matches!(
            gate.admit(ip(9), at(2_600)),
            Admission::Refuse(Refusal::Address(2))
        ));
        // Another address fills the server's cap; at the cap, the quietest of all is shed.
        let (_, other, mut other_shed) = admitted(gate.admit(ip(1), at(2_700)));
        assert_eq!(gate.len(), 3);
        busy.touch_at(at(4_000));
        other.touch_at(at(4_000));
        let (_, _, _) = admitted(gate.admit(ip(2), at(4_100)));
        assert!(other_shed.try_recv().is_err());
        assert!(busy_shed.try_recv().is_err());
        assert_eq!(gate.len(), 3, "the quiet third connection made room");
        // Nothing quiet at the cap: refused.
        assert!(matches!(
            gate.admit(ip(3), at(4_200)),
            Admission::Refuse(Refusal::Server(3))
        ));
        assert_eq!(gate.counts(), (2, 2));
        // A request being answered keeps its connection however long it has been quiet: the quietest
        // of the others goes.
        let working = busy.working();
        admitted(gate.admit(ip(4), at(9_000)));
        assert!(
            other_shed.try_recv().is_ok(),
            "the quietest idle connection is shed"
        );
        assert!(
            busy_shed.try_recv().is_err(),
            "a connection at work is never shed"
        );
        drop(working);
        assert_eq!(gate.counts(), (3, 2));
    }

    #[test]
    fn a_closed_connection_frees_its_slot() {
        let mut gate = Gate::new(Limits {
            max_connections: 1,
            per_address: 1,
            quiet: Duration::from_secs(1),
        });
        let now = Instant::now();
        let (id, _, _) = admitted(gate.admit(ip(1), now));
        assert!(matches!(
            gate.admit(ip(1), now),
            Admission::Refuse(Refusal::Address(1))
        ));
        gate.close(id);
        assert!(gate.is_empty());
        admitted(gate.admit(ip(1), now));
    }
}
