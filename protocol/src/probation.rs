//! Probation: after a release goes live on an agent it is watched for a while, and rolled back by the
//! agent itself if it serves worse than the release it replaced. This module holds the rule: the
//! operator's policy (`deckhand publish --rollout probation=10m,answers=100,p99=3,errors=0.05,
//! uncertain=0.2`, or the agent's `rollout` setting), the tally of one release's answers, and the
//! judgement. The agent keeps the tallies and rolls back (agent/src/sync/probation.rs).
//!
//! A release is worse when, once it has answered `answers` requests, it fails a larger share of them
//! than the one before by more than `errors`, answers "no card" more often by more than `uncertain`, or
//! its p99 latency is more than `p99` times the one before's. The one before is judged on what it
//! served while it was live (kept in memory; after a restart there is none, and only failures are
//! judged, against none). A release passes its probation once it served `probation` and `answers`
//! requests without being worse.
//!
//! With `canary=N` the shop rolls a release out to N of its Pis first ([`canary`]): each Pi ranks the
//! live members (itself and the peers it hears) by rendezvous hashing of agent id and manifest id, so
//! every Pi picks the same ones; the canaries go live, the others hold the release until N members
//! announce it passed its probation, and do not take it if any member rejected it.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

/// How a release is watched after it goes live.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// How many Pis of the shop go live first ([`canary`]); 0: every Pi goes live when ready.
    #[serde(default)]
    pub canary: u32,
    /// How long a release is on probation, in seconds (0: no probation).
    pub probation: u64,
    /// How many requests it must have answered before it is judged, and to pass.
    pub answers: u32,
    /// Its p99 latency may be at most this many times the one before's.
    pub p99: f64,
    /// The share of requests it fails may exceed the one before's by at most this (0 to 1).
    pub errors: f64,
    /// The share of answers without a card may exceed the one before's by at most this (0 to 1).
    pub uncertain: f64,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            canary: 0,
            probation: 600,
            answers: 100,
            p99: 3.0,
            errors: 0.05,
            uncertain: 0.2,
        }
    }
}

/// Why a rollout policy did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error(
        "{0:?} is not a rollout setting (expected canary=N, probation=DURATION, answers=N, p99=RATIO, errors=0..1, uncertain=0..1)"
    )]
    Unknown(String),
    #[error("rollout {key}={value:?}: {why}")]
    Value {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

impl Rollout {
    /// The time on probation.
    pub fn probation(&self) -> Duration {
        Duration::from_secs(self.probation)
    }

    /// Checks the values a manifest or a setting brought.
    pub fn validate(&self) -> Result<(), RolloutError> {
        let bad = |key, value: String, why| Err(RolloutError::Value { key, value, why });
        if self.canary > 0 && self.probation == 0 {
            return bad(
                "canary",
                self.canary.to_string(),
                "needs a probation the canaries serve (probation=0 turns it off)",
            );
        }
        if self.canary > 100 {
            return bad("canary", self.canary.to_string(), "at most 100 Pis");
        }
        if self.probation > 7 * 86_400 {
            return bad("probation", self.probation.to_string(), "at most 7 days");
        }
        if self.answers == 0 {
            return bad("answers", "0".into(), "must be at least 1");
        }
        if !(self.p99 >= 1.0 && self.p99.is_finite()) {
            return bad("p99", self.p99.to_string(), "must be a ratio of at least 1");
        }
        for (key, v) in [("errors", self.errors), ("uncertain", self.uncertain)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(key, v.to_string(), "must be from 0 to 1");
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Rollout {
    type Err = RolloutError;

    /// `canary=1,probation=10m,answers=100,p99=3,errors=0.05,uncertain=0.2`; settings left out keep
    /// their defaults. `probation=0` turns probation off.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut r = Rollout::default();
        for pair in crate::pairs::pairs(s) {
            let crate::pairs::Pair { key, value, part } =
                pair.map_err(|part| RolloutError::Unknown(part.to_owned()))?;
            let bad = |key, why| RolloutError::Value {
                key,
                value: value.to_owned(),
                why,
            };
            let ratio = |key| value.parse::<f64>().map_err(|_| bad(key, "not a number"));
            match key {
                "probation" => {
                    r.probation = match value {
                        "0" => 0,
                        v => crate::daily::seconds(v).ok_or_else(|| {
                            bad("probation", "not a duration such as 90s, 10m, 1h")
                        })?,
                    };
                }
                "canary" => {
                    r.canary = value
                        .parse()
                        .map_err(|_| bad("canary", "not a whole number"))?;
                }
                "answers" => {
                    r.answers = value
                        .parse()
                        .map_err(|_| bad("answers", "not a whole number"))?;
                }
                "p99" => r.p99 = ratio("p99")?,
                "errors" => r.errors = ratio("errors")?,
                "uncertain" => r.uncertain = ratio("uncertain")?,
                _ => return Err(RolloutError::Unknown(part.to_owned())),
            }
        }
        r.validate()?;
        Ok(r)
    }
}

impl std::fmt::Display for Rollout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.canary > 0 {
            write!(f, "canary={},", self.canary)?;
        }
        write!(
            f,
            "probation={},answers={},p99={},errors={},uncertain={}",
            crate::daily::write_seconds(self.probation),
            self.answers,
            self.p99,
            self.errors,
            self.uncertain
        )
    }
}

/// How many latencies a tally keeps (the newest): its p99 is over these.
pub const LATENCIES: usize = 1000;

/// What one release served while it was live: answers, failures, answers without a card, and the
/// latest latencies.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    answers: u64,
    failures: u64,
    uncertain: u64,
    latencies_ms: VecDeque<f32>,
}

impl Tally {
    /// A request answered in `ms`, with a card or (`uncertain`) without one.
    pub fn answer(&mut self, uncertain: bool, ms: f64) {
        self.answers += 1;
        self.uncertain += u64::from(uncertain);
        if self.latencies_ms.len() == LATENCIES {
            self.latencies_ms.pop_front();
        }
        self.latencies_ms.push_back(ms as f32);
    }

    /// A request the release failed (the backend's error).
    pub fn failure(&mut self) {
        self.failures += 1;
    }

    /// The figures so far.
    pub fn health(&self) -> Health {
        let mut lat: Vec<f32> = self.latencies_ms.iter().copied().collect();
        lat.sort_by(f32::total_cmp);
        let p99 = (!lat.is_empty())
            .then(|| f64::from(lat[((lat.len() - 1) as f64 * 0.99).round() as usize]));
        Health {
            answers: self.answers,
            failures: self.failures,
            uncertain: self.uncertain,
            p99_ms: p99,
        }
    }
}

/// A release's figures while it served: what probation compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub answers: u64,
    pub failures: u64,
    /// Answers without a card (below the release's thresholds).
    pub uncertain: u64,
    /// Over the latest [`LATENCIES`] answers.
    pub p99_ms: Option<f64>,
}

impl Health {
    /// Requests answered or failed.
    pub fn requests(&self) -> u64 {
        self.answers + self.failures
    }

    pub fn error_rate(&self) -> f64 {
        ratio(self.failures, self.requests())
    }

    pub fn uncertain_rate(&self) -> f64 {
        ratio(self.uncertain, self.answers)
    }
}

fn ratio(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 / of as f64 }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests, {:.1}% failed, {:.1}% without a card",
            self.requests(),
            self.error_rate() * 100.0,
            self.uncertain_rate() * 100.0
        )?;
        if let Some(p) = self.p99_ms {
            write!(f, ", p99 {p:.1} ms")?;
        }
        Ok(())
    }
}

/// Where a release on probation stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Judgement {
    /// Not judged yet, or judged fine and still on probation.
    Watching,
    /// It served its time and its answers without being worse.
    Passed,
    /// Worse than the one before, in words with the figures: roll back.
    Worse(String),
}

/// Judges a release on probation for `elapsed`, by what it served (`now`) against what the one before
/// served (`before`, none after a restart).
pub fn judge(
    policy: &Rollout,
    elapsed: Duration,
    now: &Health,
    before: Option<&Health>,
) -> Judgement {
    let enough = |h: &Health| h.requests() >= u64::from(policy.answers);
    if !enough(now) {
        return Judgement::Watching;
    }
    let base = before.copied().unwrap_or_default();
    let against = |what: String| match before {
        Some(b) => format!("{what} (the release before: {b})"),
        None => format!("{what} (nothing recorded of the release before)"),
    };
    if now.error_rate() - base.error_rate() > policy.errors {
        return Judgement::Worse(against(format!(
            "failed {} of {} requests ({:.1}%, more than {:.1} points above the release before)",
            now.failures,
            now.requests(),
            now.error_rate() * 100.0,
            policy.errors * 100.0
        )));
    }
    if let Some(b) = before.filter(|b| enough(b)) {
        if now.uncertain_rate() - b.uncertain_rate() > policy.uncertain {
            return Judgement::Worse(against(format!(
                "answered {} of {} without a card ({:.1}%, more than {:.1} points above the release before)",
                now.uncertain,
                now.answers,
                now.uncertain_rate() * 100.0,
                policy.uncertain * 100.0
            )));
        }
        if let (Some(p), Some(q)) = (now.p99_ms, b.p99_ms)
            && p > q * policy.p99
        {
            return Judgement::Worse(against(format!(
                "p99 latency {p:.1} ms, more than {} times the release before's {q:.1} ms",
                policy.p99
            )));
        }
    }
    if elapsed >= policy.probation() {
        Judgement::Passed
    } else {
        Judgement::Watching
    }
}

/// What a live member of the shop announces about a release rolled out to canaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    pub id: &'a str,
    /// It passed its probation with the release.
    pub proven: bool,
    /// It rejected the release (rolled back from it, or learnt that another did).
    pub rejected: bool,
}

/// What a Pi does with a release ready here when the shop rolls it out to canaries first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Canary {
    /// Go live: this Pi is a canary, or enough canaries passed their probation with it (why, in
    /// words).
    Go(String),
    /// Hold it: the canaries named have not passed their probation with it yet.
    Wait(Vec<String>),
    /// Do not take it: this member rejected it.
    Rejected(String),
}

/// The canaries among `me` and `members` for `release`: the `n` ranked first by rendezvous hashing of
/// agent id and manifest id (the same on every Pi that hears the same members).
pub fn canaries<'a>(
    me: &'a str,
    members: &[Member<'a>],
    release: &crate::BlobId,
    n: usize,
) -> Vec<&'a str> {
    let mut ranked: Vec<(&'a str, [u8; 32])> = std::iter::once(me)
        .chain(members.iter().map(|m| m.id))
        .map(|id| (id, crate::sync::rendezvous_score(id, release)))
        .collect();
    ranked.sort_by(|(a, sa), (b, sb)| sb.cmp(sa).then_with(|| a.cmp(b)));
    ranked.dedup_by(|x, y| x.0 == y.0);
    ranked.into_iter().take(n).map(|(id, _)| id).collect()
}

/// Decides for `me`, which holds `release` ready, with `n` canaries: a member's rejection stops it; `n`
/// members that passed their probation with it let it go; otherwise a canary goes live and the rest
/// wait for the canaries.
pub fn canary(me: &str, members: &[Member<'_>], release: &crate::BlobId, n: u32) -> Canary {
    if let Some(m) = members.iter().find(|m| m.rejected) {
        return Canary::Rejected(m.id.to_owned());
    }
    let proven: Vec<&str> = members.iter().filter(|m| m.proven).map(|m| m.id).collect();
    if !proven.is_empty() && proven.len() >= n as usize {
        return Canary::Go(format!(
            "after the canary {} served it through its probation",
            proven.join(", ")
        ));
    }
    let chosen = canaries(me, members, release, n as usize);
    if chosen.contains(&me) {
        return Canary::Go("a canary".into());
    }
    Canary::Wait(
        chosen
            .into_iter()
            .filter(|c| !proven.contains(c))
            .map(str::to_owned)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(answers: u64, failures: u64, uncertain: u64, ms: f64) -> Health {
        let mut t = Tally::default();
        for i in 0..answers {
            t.answer(i < uncertain, ms);
        }
        for _ in 0..failures {
            t.failure();
        }
        t.health()
    }

    #[test]
    fn policies_parse_and_print_back() {
        let r: Rollout = "probation=2m,answers=40,p99=2.5,errors=0.01,uncertain=0.3"
            .parse()
            .unwrap();
        assert_eq!(
            r,
            Rollout {
                canary: 0,
                probation: 120,
                answers: 40,
                p99: 2.5,
                errors: 0.01,
                uncertain: 0.3
            }
        );
        assert_eq!(r.to_string().parse::<Rollout>().unwrap(), r);
        assert_eq!("".parse::<Rollout>().unwrap(), Rollout::default());
        assert_eq!("probation=0".parse::<Rollout>().unwrap().probation, 0);
        let c: Rollout = "canary=1,probation=5s".parse().unwrap();
        assert_eq!((c.canary, c.probation), (1, 5));
        assert_eq!(c.to_string().parse::<Rollout>().unwrap(), c);
        for (bad, says) in [
            ("canary", "not a rollout setting"),
            ("canary=1,probation=0", "needs a probation"),
            ("canary=x", "not a whole number"),
            ("speed=3", "not a rollout setting"),
            ("p99=0.5", "p99=\"0.5\": must be a ratio of at least 1"),
            ("errors=2", "must be from 0 to 1"),
            ("answers=0", "must be at least 1"),
            ("probation=soon", "not a duration"),
            ("probation=30d", "not a duration"),
        ] {
            let e = bad.parse::<Rollout>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_tally_keeps_the_newest_latencies_for_its_p99() {
        let mut t = Tally::default();
        for _ in 0..LATENCIES {
            t.answer(false, 500.0);
        }
        for _ in 0..LATENCIES {
            t.answer(false, 5.0);
        }
        let h = t.health();
        assert_eq!((h.answers, h.p99_ms), (2 * LATENCIES as u64, Some(5.0)));
        assert_eq!(Tally::default().health().p99_ms, None);
    }

    #[test]
    fn a_release_is_judged_once_it_answered_enough() {
        let p: Rollout = "probation=1m,answers=100".parse().unwrap();
        let before = served(500, 0, 10, 10.0);
        let minute = Duration::from_secs(60);
        // Too few answers: watching, however bad, and after its time too.
        assert_eq!(
            judge(&p, minute, &served(99, 0, 99, 900.0), Some(&before)),
            Judgement::Watching
        );
        // As good: watching until its time is served, then passed.
        let fine = served(150, 1, 8, 12.0);
        assert_eq!(
            judge(&p, minute / 2, &fine, Some(&before)),
            Judgement::Watching
        );
        assert_eq!(judge(&p, minute, &fine, Some(&before)), Judgement::Passed);
        // Slower beyond the ratio: worse at once.
        let Judgement::Worse(why) = judge(&p, minute / 2, &served(100, 0, 2, 31.0), Some(&before))
        else {
            panic!("a slow release passed");
        };
        assert!(
            why.contains("p99 latency 31.0 ms, more than 3 times"),
            "{why}"
        );
        assert!(why.contains("the release before: 500 requests"), "{why}");
        // More answers without a card.
        let Judgement::Worse(why) = judge(&p, minute, &served(200, 0, 60, 10.0), Some(&before))
        else {
            panic!("an uncertain release passed");
        };
        assert!(why.contains("60 of 200 without a card (30.0%"), "{why}");
        // Failures, judged even when nothing is recorded of the release before.
        let Judgement::Worse(why) = judge(&p, minute, &served(90, 10, 0, 10.0), None) else {
            panic!("a failing release passed");
        };
        assert!(why.contains("failed 10 of 100 requests (10.0%"), "{why}");
        assert!(
            why.contains("nothing recorded of the release before"),
            "{why}"
        );
        // Without a record of the one before, latency and no-card answers are not judged.
        assert_eq!(
            judge(&p, minute, &served(100, 0, 90, 900.0), None),
            Judgement::Passed
        );
        // Nor against a release before that answered too little to compare with.
        assert_eq!(
            judge(
                &p,
                minute,
                &served(100, 0, 0, 900.0),
                Some(&served(20, 0, 0, 1.0))
            ),
            Judgement::Passed
        );
    }

    #[test]
    fn every_pi_picks_the_same_canaries_and_the_rest_wait_for_them() {
        let release = crate::BlobId::of(b"manifest v2");
        let ids = ["pi-0", "pi-1", "pi-2", "pi-3"];
        let member = |id| Member {
            id,
            proven: false,
            rejected: false,
        };
        let view = |me: &str| -> Vec<Member<'static>> {
            ids.iter()
                .filter(|i| **i != me)
                .map(|i| member(*i))
                .collect()
        };
        // Each Pi, hearing the other three, ranks the same one first.
        let picks: Vec<Vec<&str>> = ids
            .iter()
            .map(|me| canaries(me, &view(me), &release, 1))
            .collect();
        assert!(picks.iter().all(|p| *p == picks[0]), "{picks:?}");
        let canary_id = picks[0][0];
        let decisions: Vec<Canary> = ids
            .iter()
            .map(|me| canary(me, &view(me), &release, 1))
            .collect();
        let going: Vec<&str> = ids
            .iter()
            .zip(&decisions)
            .filter(|(_, d)| matches!(d, Canary::Go(_)))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(going, [canary_id]);
        for (id, d) in ids.iter().zip(&decisions) {
            if *id != canary_id {
                assert_eq!(*d, Canary::Wait(vec![canary_id.to_owned()]));
            }
        }
        // Another release ranks the Pis again: over many, each is the canary about as often.
        let mut first = std::collections::HashMap::new();
        for k in 0..400u32 {
            let r = crate::BlobId::of(&k.to_le_bytes());
            *first
                .entry(canaries("pi-0", &view("pi-0"), &r, 1)[0])
                .or_insert(0) += 1;
        }
        assert!(first.values().all(|n| (60..140).contains(n)), "{first:?}");
        // The canary passed its probation: the rest go.
        let waiting = ids.iter().find(|i| **i != canary_id).unwrap();
        let mut members = view(waiting);
        for m in &mut members {
            m.proven = m.id == canary_id;
        }
        let Canary::Go(why) = canary(waiting, &members, &release, 1) else {
            panic!("still waiting after the canary passed");
        };
        assert_eq!(
            why,
            format!("after the canary {canary_id} served it through its probation")
        );
        // The canary rolled back: none of the rest take it.
        for m in &mut members {
            m.proven = false;
            m.rejected = m.id == canary_id;
        }
        assert_eq!(
            canary(waiting, &members, &release, 1),
            Canary::Rejected(canary_id.to_owned())
        );
        // Fewer Pis than canaries: each is one.
        assert_eq!(
            canary("pi-0", &[member("pi-1")], &release, 3),
            Canary::Go("a canary".into())
        );
    }
}
