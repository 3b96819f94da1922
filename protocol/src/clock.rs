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

/// How long before something dated (a certificate, the fleet CA, the trust root, a manifest) stops
/// working that status, the page and /metrics start warning.
pub const WARN_BEFORE: SignedDuration = SignedDuration::from_hours(30 * 24);

/// How long before a manifest expires it is warned of: a quarter of its validity, at most
/// [`WARN_BEFORE`] (a manifest published for 30 days is warned of a week ahead: the bucket has been
/// frozen three weeks).
pub fn manifest_warn_before(created_at: Timestamp, expires_at: Timestamp) -> SignedDuration {
    (expires_at.duration_since(created_at) / 4).min(WARN_BEFORE)
}

/// The warning for `what`, which stops working at `expires_at`, judged at the trusted `now`: `None`
/// while more than `lead` is left.
pub fn expiry_warning(
    what: &str,
    expires_at: Timestamp,
    now: Timestamp,
    lead: SignedDuration,
) -> Option<String> {
    let left = expires_at.duration_since(now);
    if left > lead {
        return None;
    }
    let days = |d: SignedDuration| match d.as_secs().unsigned_abs().div_ceil(86_400) {
        1 => "1 day".to_owned(),
        n => format!("{n} days"),
    };
    Some(if left.is_positive() {
        format!("{what} expires in {} ({expires_at})", days(left))
    } else {
        format!("{what} expired {} ago ({expires_at})", days(left))
    })
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

    #[test]
    fn an_expiry_is_warned_of_thirty_days_ahead_and_after_it_passed() {
        let day = 86_400;
        let at = t(1_800_000_000);
        let w = |what, now| expiry_warning(what, at, t(now), WARN_BEFORE);
        assert_eq!(w("certificate", 1_800_000_000 - 31 * day), None);
        assert_eq!(
            w("certificate", 1_800_000_000 - 30 * day).as_deref(),
            Some("certificate expires in 30 days (2027-01-15T08:00:00Z)")
        );
        assert_eq!(
            w("trust root", 1_800_000_000 - 1).as_deref(),
            Some("trust root expires in 1 day (2027-01-15T08:00:00Z)")
        );
        assert_eq!(
            w("fleet CA", 1_800_000_000 + 2 * day).as_deref(),
            Some("fleet CA expired 2 days ago (2027-01-15T08:00:00Z)")
        );
        // A manifest valid for 30 days is warned of a week and a half-day ahead; one valid for a year
        // 30 days ahead.
        let published = t(1_800_000_000 - 30 * day);
        assert_eq!(
            manifest_warn_before(published, at),
            SignedDuration::from_hours(180)
        );
        assert_eq!(
            manifest_warn_before(t(1_800_000_000 - 365 * day), at),
            WARN_BEFORE
        );
    }
}
