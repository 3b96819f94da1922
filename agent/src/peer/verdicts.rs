//! The verdicts passed on peers, kept beyond the download that passed them.
//!
//! The judge is the download's state machine ([`deckhand_protocol::fetch`]): it decides, from a failed
//! request, whether a peer is set aside or banned and for how long ([`FetchConfig::judge`]); the sync
//! engine applies the same rule to what a peer relays outside a download (a chunk map, a manifest).
//! This table only records those [`Judgement`]s, so that the node can enforce them (a banned peer's
//! streams are refused and its announcements ignored; a peer set aside is not offered to the next
//! download) and status can show them. It decides nothing.
//!
//! [`FetchConfig::judge`]: deckhand_protocol::fetch::FetchConfig::judge

use deckhand_protocol::fetch::{Judgement, Verdict};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// At most this many peers are remembered (the peer table's own bound); the verdict ending first is
/// forgotten first.
const MAX_VERDICTS: usize = super::MAX_PEERS;

#[derive(Clone, Debug)]
struct Entry {
    banned_until: Option<Instant>,
    aside_until: Option<Instant>,
    why: String,
}

impl Entry {
    fn ends(&self) -> Option<Instant> {
        self.banned_until.max(self.aside_until)
    }
}

/// What status shows of a peer's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    pub banned_until: Option<Instant>,
    pub why: String,
}

/// The record of verdicts; cheap to clone (one shared table).
#[derive(Clone, Debug, Default)]
pub struct Verdicts {
    table: Arc<Mutex<HashMap<String, Entry>>>,
}

impl Verdicts {
    /// Runs `f` on the table (a poisoned lock is reported and taken over: `crate::locks`).
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Entry>) -> T) -> T {
        f(&mut crate::locks::lock(&self.table, "verdicts"))
    }

    /// Records a judgement passed at `now`; `why` says what the peer did, for status.
    pub fn record(&self, j: &Judgement, why: &str, now: Instant) {
        let until = now + j.lasts;
        self.with(|t| {
            t.retain(|_, e| e.ends().is_some_and(|end| end > now));
            let e = t.entry(j.peer.clone()).or_insert(Entry {
                banned_until: None,
                aside_until: None,
                why: String::new(),
            });
            match j.verdict {
                Verdict::Banned => e.banned_until = Some(until),
                Verdict::SetAside => e.aside_until = Some(until),
            }
            e.why = why.to_owned();
            while t.len() > MAX_VERDICTS {
                let first = t
                    .iter()
                    .min_by_key(|(_, e)| e.ends())
                    .map(|(p, _)| p.clone());
                match first {
                    Some(p) => t.remove(&p),
                    None => break,
                };
            }
        });
    }

    /// Banned at `now`: neither asked nor served nor listened to.
    pub fn banned(&self, peer: &str, now: Instant) -> bool {
        self.with(|t| {
            t.get(peer)
                .is_some_and(|e| e.banned_until.is_some_and(|u| u > now))
        })
    }

    /// Neither banned nor set aside at `now`.
    pub fn clear(&self, peer: &str, now: Instant) -> bool {
        self.with(|t| {
            t.get(peer)
                .is_none_or(|e| e.ends().is_none_or(|end| end <= now))
        })
    }

    /// What status shows of `peer`: its ban (if it stands) and the reason of its last verdict.
    pub fn shown(&self, peer: &str, now: Instant) -> Option<Shown> {
        self.with(|t| {
            t.get(peer).map(|e| Shown {
                banned_until: e.banned_until.filter(|u| *u > now),
                why: e.why.clone(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deckhand_protocol::fetch::{FetchConfig, PeerFailure};
    use std::time::Duration;

    #[test]
    fn a_verdict_stands_for_its_duration_and_the_table_stays_bounded() {
        let cfg = FetchConfig::new("me");
        let v = Verdicts::default();
        let t0 = Instant::now();
        let ban = cfg.judge("liar", PeerFailure::Corrupt).unwrap();
        let aside = cfg.judge("slow", PeerFailure::Timeout).unwrap();
        v.record(&ban, "sent a bad chunk", t0);
        v.record(&aside, "timed out", t0);
        assert!(v.banned("liar", t0) && !v.clear("liar", t0));
        assert!(!v.banned("slow", t0) && !v.clear("slow", t0));
        assert!(v.clear("slow", t0 + cfg.set_aside));
        assert!(v.banned("liar", t0 + cfg.set_aside));
        assert!(!v.banned("liar", t0 + cfg.ban) && v.clear("liar", t0 + cfg.ban));
        let shown = v.shown("liar", t0).unwrap();
        assert_eq!(shown.banned_until, Some(t0 + cfg.ban));
        assert_eq!(shown.why, "sent a bad chunk");
        for i in 0..MAX_VERDICTS + 10 {
            let j = cfg.judge(&format!("p{i}"), PeerFailure::Other).unwrap();
            v.record(&j, "x", t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(v.with(|t| t.len()), MAX_VERDICTS);
        assert!(v.banned("liar", t0), "the verdict ending last is kept");
    }
}
