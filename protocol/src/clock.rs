//! The agent's idea of now on a Pi without an RTC battery.
//!
//! Such a Pi boots at 1970, or at the time fake-hwclock last saved, until NTP syncs (and in a shop
//! without internet it may never sync). An agent keeps a durable **time floor**: the newest `created_at`
//! of any manifest it verified. The operator signed that time, so real time is at least that. The
//! agent's *trusted now* is the later of its system clock and the floor, and manifest expiry is judged
//! against it:
//! * a clock behind (1970, stale) never makes a valid manifest look expired: expiry is at least the floor
//!   away, and a manifest is judged at the floor, so a fresh release is accepted;
//! * a clock behind does not let an expired manifest look valid either, once the agent has seen a newer
//!   one: it expired before the floor;
//! * a clock ahead makes unexpired manifests look expired: that is indistinguishable from an attacker
//!   withholding releases, so they are refused until the clock is right (status shows the error).
//!
//! Expiry stops new activations, never service: the active release serves whatever the clock says.
//! The floor only moves forward, and only through signed times.

use jiff::{SignedDuration, Timestamp};

/// The later of the system clock and the floor.
pub fn trusted_now(system: Timestamp, floor: Option<Timestamp>) -> Timestamp {
    floor.map_or(system, |f| f.max(system))
}

/// The floor after verifying a manifest created at `created_at`.
pub fn raise_floor(floor: Option<Timestamp>, created_at: Timestamp) -> Timestamp {
    floor.map_or(created_at, |f| f.max(created_at))
}

/// How far the system clock is behind the floor, when it is.
pub fn behind(system: Timestamp, floor: Option<Timestamp>) -> Option<SignedDuration> {
    floor
        .filter(|f| *f > system)
        .map(|f| f.duration_since(system))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn the_later_of_clock_and_floor_and_the_floor_only_rises() {
        let floor = Some(t(1_800_000_000));
        assert_eq!(trusted_now(t(5), floor), t(1_800_000_000));
        assert_eq!(trusted_now(t(1_900_000_000), floor), t(1_900_000_000));
        assert_eq!(trusted_now(t(5), None), t(5));
        assert_eq!(raise_floor(floor, t(1_700_000_000)), t(1_800_000_000));
        assert_eq!(raise_floor(floor, t(1_850_000_000)), t(1_850_000_000));
        assert_eq!(raise_floor(None, t(7)), t(7));
        assert_eq!(
            behind(t(1_799_999_000), floor),
            Some(SignedDuration::from_secs(1000))
        );
        assert_eq!(behind(t(1_900_000_000), floor), None);
    }
}
