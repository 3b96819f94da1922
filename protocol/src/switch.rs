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
//! judged against the agent's trusted clock. The decision is pure: the agent passes the peers' states
//! and `now`, and sleeps until the time returned or the next change of a peer.

use jiff::{SignedDuration, Timestamp};
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
    /// With [`Mode::Together`]: the longest wait for the others, from when this agent was ready (or from
    /// `not_before`, if later).
    pub deadline: Duration,
}

/// Why a release goes live now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    AtOnce,
    AllReady,
    MemberSwitched,
    Deadline,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::AtOnce => "at once",
            Why::AllReady => "all ready",
            Why::MemberSwitched => "a member switched",
            Why::Deadline => "deadline",
        })
    }
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Switch(Why),
    /// Ask again at this time at the latest (or when a member changes).
    Wait(Timestamp),
}

/// Decides whether a ready release goes live now. `ready_at`: when this agent became ready;
/// `members`: the live members of the deployment other than this agent.
pub fn decide(plan: &Plan, ready_at: Timestamp, now: Timestamp, members: &[Member]) -> Decision {
    if let Some(t) = plan.not_before
        && now < t
    {
        return Decision::Wait(t);
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
    let from = plan.not_before.map_or(ready_at, |t| t.max(ready_at));
    let deadline = from
        .checked_add(SignedDuration::try_from(plan.deadline).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX);
    if now >= deadline {
        Decision::Switch(Why::Deadline)
    } else {
        Decision::Wait(deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn together(not_before: Option<Timestamp>) -> Plan {
        Plan {
            mode: Mode::Together,
            not_before,
            deadline: Duration::from_secs(60),
        }
    }

    #[test]
    fn at_once_switches_when_ready_unless_not_before_is_ahead() {
        let plan = Plan {
            mode: Mode::AtOnce,
            not_before: None,
            deadline: Duration::from_secs(60),
        };
        let some = [Member::NotReady];
        assert_eq!(
            decide(&plan, t(0), t(0), &some),
            Decision::Switch(Why::AtOnce)
        );
        let later = Plan {
            not_before: Some(t(100)),
            ..plan
        };
        assert_eq!(decide(&later, t(0), t(5), &some), Decision::Wait(t(100)));
        assert_eq!(
            decide(&later, t(0), t(100), &some),
            Decision::Switch(Why::AtOnce)
        );
    }

    #[test]
    fn together_waits_for_every_live_member_then_switches() {
        let plan = together(None);
        use Member::*;
        assert_eq!(
            decide(&plan, t(0), t(1), &[Ready, NotReady]),
            Decision::Wait(t(60))
        );
        assert_eq!(
            decide(&plan, t(0), t(2), &[Ready, Ready]),
            Decision::Switch(Why::AllReady)
        );
        // Alone in the shop: nobody to wait for.
        assert_eq!(
            decide(&plan, t(0), t(0), &[]),
            Decision::Switch(Why::AllReady)
        );
        // A member that switched (its deadline ran out first) is followed at once.
        assert_eq!(
            decide(&plan, t(0), t(3), &[Serving, NotReady]),
            Decision::Switch(Why::MemberSwitched)
        );
    }

    #[test]
    fn a_member_that_cannot_finish_holds_the_others_only_until_the_deadline() {
        let plan = together(None);
        let m = [Member::Ready, Member::NotReady];
        assert_eq!(decide(&plan, t(10), t(69), &m), Decision::Wait(t(70)));
        assert_eq!(
            decide(&plan, t(10), t(70), &m),
            Decision::Switch(Why::Deadline)
        );
    }

    #[test]
    fn not_before_holds_everyone_and_the_deadline_counts_from_it() {
        let plan = together(Some(t(1000)));
        use Member::*;
        assert_eq!(
            decide(&plan, t(0), t(999), &[Ready]),
            Decision::Wait(t(1000))
        );
        // Even a member serving it (its clock runs ahead) does not move this agent before not_before.
        assert_eq!(
            decide(&plan, t(0), t(999), &[Serving]),
            Decision::Wait(t(1000))
        );
        assert_eq!(
            decide(&plan, t(0), t(1000), &[Ready]),
            Decision::Switch(Why::AllReady)
        );
        assert_eq!(
            decide(&plan, t(0), t(1001), &[NotReady]),
            Decision::Wait(t(1060))
        );
    }
}
