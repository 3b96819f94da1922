//! When a complete, canary-checked release goes live: at once, or together with the rest of the shop.
//!
//! A release is *ready* on an agent once every blob is stored and verified and its recognizer loaded and
//! canary-checked; only the swap is left. With [`Mode::AtOnce`] the agent swaps then. With
//! [`Mode::Together`] it announces "ready" to its peers and swaps when
//! * every live member following the deployment is ready for the same release (or already serves it),
//! * or any member already serves it (the shop follows the first to switch, so a deadline run out on one
//!   agent switches them all within moments),
//! * or the deadline passed: counted from when this agent became ready, so a member that cannot finish
//!   does not hold the others longer than that.
//!
//! Either way no release goes live before the manifest's `not_before` (the operator's "switch at 03:00"),
//! judged against the agent's trusted clock ([`crate::clock`]). The deadline is not a wall-clock time: the
//! caller measures how long it has waited on its monotonic clock, so a wall clock that jumps (NTP syncing
//! on a Pi without an RTC) neither fires it early nor holds it back. The decision is pure: the agent
//! passes the peers' states, the trusted now and how long it waited, and sleeps for the duration returned
//! or until a peer changes.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How a ready release goes live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// As soon as this agent is ready.
    #[default]
    AtOnce,
    /// When the shop is ready, or the deadline passed.
    Together,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "at-once" => Ok(Mode::AtOnce),
            "together" => Ok(Mode::Together),
            other => Err(format!("{other:?} is not at-once or together")),
        }
    }
}

/// A live member of the deployment, as this release concerns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    /// It serves this release already.
    Serving,
    /// It holds this release ready and waits to switch.
    Ready,
    /// Anything else: still downloading, behind, or on another release.
    NotReady,
}

/// The rule for one release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub mode: Mode,
    /// Not live before this time.
    pub not_before: Option<Timestamp>,
    /// With [`Mode::Together`]: the longest wait for the others, from when this agent was ready and
    /// `not_before` had passed.
    pub deadline: Duration,
}

/// Why a release goes live now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    AtOnce,
    AllReady,
    MemberSwitched,
    Deadline,
    /// The agent's [`Gate`] opened: inside a maintenance window.
    Window,
    /// The agent's [`Gate`] opened: nothing recognised for its idle time.
    Idle,
    /// The operator marked the release urgent: the gate does not hold it.
    Urgent,
    /// The release is rolled out to canaries first, and this agent is one ([`crate::probation`]).
    Canary,
    /// The shop's canaries served the release through their probation.
    AfterCanaries,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::AtOnce => "at once",
            Why::AllReady => "all ready",
            Why::MemberSwitched => "a member switched",
            Why::Deadline => "deadline",
            Why::Window => "in the maintenance window",
            Why::Idle => "the counter was idle",
            Why::Urgent => "urgent",
            Why::Canary => "a canary",
            Why::AfterCanaries => "the canary passed its probation",
        })
    }
}

/// When an agent lets a ready release go live, by its own settings: inside one of its maintenance
/// windows (local time), or once nothing was recognised for `when_idle`, whichever comes first. With
/// neither set it holds nothing. Downloading and checking are never held, only the swap; a release
/// marked urgent, the first release of an agent (nothing serves yet) and a repair of the live one are
/// not held either ([`Gate::check`]'s caller decides those).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gate {
    pub windows: Vec<crate::daily::Span>,
    pub when_idle: Option<Duration>,
}

impl Gate {
    /// Whether the gate holds anything at all.
    pub fn is_set(&self) -> bool {
        !self.windows.is_empty() || self.when_idle.is_some()
    }

    /// Open now (and why), or at the soonest after the duration returned. `minute`: the minute of the
    /// local day, by the trusted clock; `second`: the seconds into it; `idle`: how long since the last
    /// recognition. A gate with nothing set is open ([`Why::AtOnce`]).
    pub fn check(&self, minute: u16, second: u8, idle: Duration) -> Result<Why, Duration> {
        if !self.is_set() {
            return Ok(Why::AtOnce);
        }
        if self.windows.iter().any(|w| w.covers(minute)) {
            return Ok(Why::Window);
        }
        let idle_left = match self.when_idle {
            Some(need) if idle >= need => return Ok(Why::Idle),
            Some(need) => Some(need - idle),
            None => None,
        };
        let window_in = self
            .windows
            .iter()
            .map(|w| {
                Duration::from_secs(u64::from(w.starts_in(minute)) * 60)
                    .saturating_sub(Duration::from_secs(u64::from(second)))
            })
            .min();
        Err(match (window_in, idle_left) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => Duration::ZERO,
        })
    }

    /// What the gate waits for, in words (for status).
    pub fn describe(&self) -> String {
        let windows: Vec<String> = self.windows.iter().map(|w| w.to_string()).collect();
        match (windows.is_empty(), self.when_idle) {
            (false, None) => format!("the maintenance window {}", windows.join(", ")),
            (true, Some(d)) => format!("{} s without a recognition", d.as_secs()),
            (false, Some(d)) => format!(
                "the maintenance window {} or {} s without a recognition",
                windows.join(", "),
                d.as_secs()
            ),
            (true, None) => "nothing".into(),
        }
    }
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Switch(Why),
    /// Ask again after this long at the latest (or when a member changes).
    Wait(Duration),
}

/// The crash-loop rule: more than `restarts` unclean ends of the agent (it was found running at its
/// next start: killed, crashed, stopped by the watchdog) within `within` of a release going live make
/// the next start serve the release before it. `restarts` 0 turns it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashLoop {
    pub restarts: u32,
    pub within: Duration,
}

impl CrashLoop {
    /// Whether the unclean ends noticed at `unclean` (start times) after the release went live at
    /// `activated_at` make a loop.
    pub fn tripped(&self, activated_at: Timestamp, unclean: &[Timestamp]) -> bool {
        let within =
            jiff::SignedDuration::try_from(self.within).unwrap_or(jiff::SignedDuration::MAX);
        let counted = unclean
            .iter()
            .filter(|t| **t >= activated_at && t.duration_since(activated_at) <= within)
            .count();
        self.restarts > 0 && counted > self.restarts as usize
    }
}

/// Decides whether a ready release goes live now. `now`: the trusted time; `waited`: how long this
/// agent has held the release ready since `not_before` passed (measured on a monotonic clock; zero while
/// `not_before` is ahead); `members`: the live members of the deployment other than this agent.
pub fn decide(plan: &Plan, now: Timestamp, waited: Duration, members: &[Member]) -> Decision {
    if let Some(t) = plan.not_before
        && now < t
    {
        return Decision::Wait(t.duration_since(now).unsigned_abs());
    }
    if plan.mode == Mode::AtOnce {
        return Decision::Switch(Why::AtOnce);
    }
    if members.contains(&Member::Serving) {
        return Decision::Switch(Why::MemberSwitched);
    }
    if members.iter().all(|m| *m == Member::Ready) {
        return Decision::Switch(Why::AllReady);
    }
    match plan.deadline.checked_sub(waited) {
        Some(left) if !left.is_zero() => Decision::Wait(left),
        _ => Decision::Switch(Why::Deadline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn together(not_before: Option<Timestamp>) -> Plan {
        Plan {
            mode: Mode::Together,
            not_before,
            deadline: secs(60),
        }
    }

    #[test]
    fn at_once_switches_when_ready_unless_not_before_is_ahead() {
        let plan = Plan {
            mode: Mode::AtOnce,
            not_before: None,
            deadline: secs(60),
        };
        let some = [Member::NotReady];
        assert_eq!(
            decide(&plan, t(0), secs(0), &some),
            Decision::Switch(Why::AtOnce)
        );
        let later = Plan {
            not_before: Some(t(100)),
            ..plan
        };
        assert_eq!(
            decide(&later, t(5), secs(0), &some),
            Decision::Wait(secs(95))
        );
        assert_eq!(
            decide(&later, t(100), secs(0), &some),
            Decision::Switch(Why::AtOnce)
        );
    }

    #[test]
    fn together_waits_for_every_live_member_then_switches() {
        let plan = together(None);
        use Member::*;
        assert_eq!(
            decide(&plan, t(1), secs(1), &[Ready, NotReady]),
            Decision::Wait(secs(59))
        );
        assert_eq!(
            decide(&plan, t(2), secs(2), &[Ready, Ready]),
            Decision::Switch(Why::AllReady)
        );
        // Alone in the shop: nobody to wait for.
        assert_eq!(
            decide(&plan, t(0), secs(0), &[]),
            Decision::Switch(Why::AllReady)
        );
        // A member that switched (its deadline ran out first) is followed at once.
        assert_eq!(
            decide(&plan, t(3), secs(3), &[Serving, NotReady]),
            Decision::Switch(Why::MemberSwitched)
        );
    }

    #[test]
    fn a_member_that_cannot_finish_holds_the_others_only_until_the_deadline() {
        let plan = together(None);
        let m = [Member::Ready, Member::NotReady];
        assert_eq!(decide(&plan, t(69), secs(59), &m), Decision::Wait(secs(1)));
        assert_eq!(
            decide(&plan, t(70), secs(60), &m),
            Decision::Switch(Why::Deadline)
        );
        // The deadline is the time waited, not the wall clock: a clock that jumps a day ahead (NTP on
        // a Pi without an RTC) does not fire it.
        assert_eq!(
            decide(&plan, t(86_400), secs(5), &m),
            Decision::Wait(secs(55))
        );
    }

    #[test]
    fn not_before_holds_everyone() {
        let plan = together(Some(t(1000)));
        use Member::*;
        assert_eq!(
            decide(&plan, t(999), secs(0), &[Ready]),
            Decision::Wait(secs(1))
        );
        // Even a member serving it (its clock runs ahead) does not move this agent before not_before.
        assert_eq!(
            decide(&plan, t(999), secs(0), &[Serving]),
            Decision::Wait(secs(1))
        );
        assert_eq!(
            decide(&plan, t(1000), secs(0), &[Ready]),
            Decision::Switch(Why::AllReady)
        );
        assert_eq!(
            decide(&plan, t(1001), secs(1), &[NotReady]),
            Decision::Wait(secs(59))
        );
    }

    #[test]
    fn the_gate_opens_in_a_window_or_after_idle_and_says_how_long_until() {
        use crate::daily::Span;
        let min = |h: u16, m: u16| h * 60 + m;
        let none = Gate::default();
        assert_eq!(none.check(min(12, 0), 0, Duration::ZERO), Ok(Why::AtOnce));
        let night = Gate {
            windows: vec![Span::parse("02:00-06:00").unwrap()],
            when_idle: None,
        };
        assert_eq!(night.check(min(3, 0), 0, Duration::ZERO), Ok(Why::Window));
        assert_eq!(
            night.check(min(1, 59), 50, Duration::from_secs(9999)),
            Err(Duration::from_secs(10))
        );
        assert_eq!(
            night.check(min(6, 0), 0, Duration::ZERO),
            Err(Duration::from_secs(20 * 3600))
        );
        let both = Gate {
            windows: vec![
                Span::parse("02:00-06:00").unwrap(),
                Span::parse("13:00-13:30").unwrap(),
            ],
            when_idle: Some(Duration::from_secs(300)),
        };
        assert_eq!(
            both.check(min(12, 0), 0, Duration::from_secs(60)),
            Err(Duration::from_secs(240))
        );
        assert_eq!(
            both.check(min(12, 58), 0, Duration::from_secs(60)),
            Err(Duration::from_secs(120))
        );
        assert_eq!(
            both.check(min(12, 0), 0, Duration::from_secs(300)),
            Ok(Why::Idle)
        );
        assert_eq!(both.check(min(13, 10), 0, Duration::ZERO), Ok(Why::Window));
        assert_eq!(
            both.describe(),
            "the maintenance window 02:00-06:00, 13:00-13:30 or 300 s without a recognition"
        );
    }

    #[test]
    fn a_crash_loop_is_more_unclean_ends_than_allowed_soon_after_going_live() {
        let rule = CrashLoop {
            restarts: 3,
            within: secs(600),
        };
        let live = t(1000);
        let ends = |at: &[i64]| at.iter().map(|s| t(*s)).collect::<Vec<_>>();
        assert!(!rule.tripped(live, &ends(&[1010, 1020, 1030])));
        assert!(rule.tripped(live, &ends(&[1010, 1020, 1030, 1040])));
        // Before the release went live, or long after it: not its doing.
        assert!(!rule.tripped(live, &ends(&[900, 1020, 1030, 1040])));
        assert!(!rule.tripped(live, &ends(&[1010, 1020, 1030, 1601])));
        let off = CrashLoop {
            restarts: 0,
            ..rule
        };
        assert!(!off.tripped(live, &ends(&[1010, 1020, 1030, 1040, 1050])));
    }
}
