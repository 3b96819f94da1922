//! The floors: what an agent never goes below, so that nothing replayed rolls it back.
//!
//! * the **highest version** accepted: a manifest must be strictly newer;
//! * the **time floor**: the newest signed `created_at` seen ([`crate::clock`]), the agent's idea of the
//!   earliest the time can be;
//! * the **epoch**: which trust root's release keys the two floors above were raised under.
//!
//! The floors only rise, with one exception, TUF's answer to a leaked release key that fast-forwarded
//! the fleet (a manifest at version 2^63, or created in 9999, signed by a key the operator no longer
//! controls; after it nothing the operator signs is newer). A v2 trust root is signed by root keys kept
//! offline. When a root changes the release keys, the floors raised under the old ones are not to be
//! trusted any more: the root starts a new epoch ([`Floors::rotated`]) whose highest version is empty
//! and whose time floor is the root's own signed `created_at`. No manifest signed before the rotation
//! is admitted in the new epoch (its `created_at` is before the root's), so the reset is no window for
//! a replay; and only a root signed by the offline root keys can start one.
//!
//! A manifest created far ahead of a synchronised system clock ([`MAX_AHEAD`]) is refused outright:
//! with NTP the agent knows the time, and a `created_at` of 9999 is a leaked key at work, not the
//! operator. Without a synchronised clock (a Pi at 1970 in a shop without internet) only the floors
//! judge.

use crate::envelope::VerifyError;
use crate::manifest::Manifest;
use jiff::{SignedDuration, Timestamp};

/// How far ahead of a synchronised clock a manifest's `created_at` may be (the operator's clock may
/// be a little ahead of the Pi's).
pub const MAX_AHEAD: SignedDuration = SignedDuration::from_hours(1);

/// The trust root whose release keys the floors were raised under, from its signed content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch {
    /// The root version that changed the release keys.
    pub root: u64,
    /// The root's `created_at`: no manifest created before it is admitted in this epoch.
    pub since: Timestamp,
}

impl Epoch {
    /// The durable text form, `ROOT SINCE`.
    pub fn to_text(&self) -> String {
        format!("{} {}", self.root, self.since)
    }

    pub fn from_text(s: &str) -> Option<Self> {
        let (root, since) = s.split_once(' ')?;
        Some(Self {
            root: root.parse().ok()?,
            since: since.parse().ok()?,
        })
    }
}

/// The system clock and whether the system says it is synchronised (NTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemClock {
    pub now: Timestamp,
    pub synchronised: bool,
}

/// The floors of one deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Floors {
    pub highest: Option<u64>,
    pub time: Option<Timestamp>,
    /// `None` until a root changes the release keys (the installed root's epoch).
    pub epoch: Option<Epoch>,
}

impl Floors {
    /// The floors of a new epoch, started by a root that changed the release keys.
    pub fn rotated(epoch: Epoch) -> Self {
        Self {
            highest: None,
            time: Some(epoch.since),
            epoch: Some(epoch),
        }
    }

    /// The trusted now: the later of the system clock and the time floor.
    pub fn trusted_now(&self, system: Timestamp) -> Timestamp {
        crate::clock::trusted_now(system, self.time)
    }

    /// Whether a verified manifest may be accepted: for `deployment`, strictly above the highest
    /// version, not created before the epoch began, and not created far ahead of a synchronised clock.
    pub fn admit(
        &self,
        m: &Manifest,
        deployment: &str,
        clock: SystemClock,
    ) -> Result<(), VerifyError> {
        if m.deployment != deployment {
            return Err(VerifyError::Deployment {
                expected: deployment.to_owned(),
                found: m.deployment.clone(),
            });
        }
        if let Some(highest) = self.highest.filter(|h| m.version <= *h) {
            return Err(VerifyError::Stale {
                version: m.version,
                highest,
            });
        }
        if let Some(e) = self.epoch.filter(|e| m.created_at < e.since) {
            return Err(VerifyError::BeforeEpoch {
                version: m.version,
                created_at: m.created_at,
                root: e.root,
                since: e.since,
            });
        }
        if clock.synchronised && m.created_at.duration_since(clock.now) > MAX_AHEAD {
            return Err(VerifyError::Ahead {
                version: m.version,
                created_at: m.created_at,
                now: clock.now,
            });
        }
        Ok(())
    }

    /// The floors once `m` is accepted.
    pub fn after(&self, m: &Manifest) -> Self {
        Self {
            highest: Some(m.version),
            time: Some(crate::clock::raise_floor(self.time, m.created_at)),
            epoch: self.epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn clock(now: &str, synchronised: bool) -> SystemClock {
        SystemClock {
            now: t(now),
            synchronised,
        }
    }

    #[test]
    fn floors_refuse_the_stale_the_other_deployment_and_rise_with_each_manifest() {
        let m = sample(5);
        let c = clock("2026-11-15T00:00:00Z", true);
        let none = Floors::default();
        none.admit(&m, "shop-1", c).unwrap();
        assert!(matches!(
            none.admit(&m, "shop-2", c),
            Err(VerifyError::Deployment { .. })
        ));
        let after = none.after(&m);
        assert_eq!(after.highest, Some(5));
        assert_eq!(after.time, Some(m.created_at));
        assert_eq!(
            after.admit(&m, "shop-1", c),
            Err(VerifyError::Stale {
                version: 5,
                highest: 5
            })
        );
        // The time floor never falls.
        let mut older = sample(6);
        older.created_at = t("2020-01-01T00:00:00Z");
        assert_eq!(after.after(&older).time, Some(m.created_at));
    }

    #[test]
    fn a_manifest_from_the_far_future_is_refused_only_by_a_synchronised_clock() {
        let mut m = sample(5);
        m.created_at = t("9999-01-01T00:00:00Z");
        m.expires_at = t("9999-06-01T00:00:00Z");
        let floors = Floors::default();
        let err = floors
            .admit(&m, "shop-1", clock("2026-11-15T00:00:00Z", true))
            .unwrap_err();
        assert!(
            matches!(err, VerifyError::Ahead { version: 5, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("ahead of this Pi's synchronised clock")
        );
        // Without NTP the agent cannot tell; a little ahead is the operator's clock.
        floors
            .admit(&m, "shop-1", clock("2026-11-15T00:00:00Z", false))
            .unwrap();
        m.created_at = t("2026-11-15T00:59:00Z");
        floors
            .admit(&m, "shop-1", clock("2026-11-15T00:00:00Z", true))
            .unwrap();
    }

    #[test]
    fn a_rotation_resets_the_floors_and_nothing_signed_before_it_is_admitted() {
        // A leaked key fast-forwarded the floors.
        let mut leaked = sample(u64::MAX);
        leaked.created_at = t("9999-01-01T00:00:00Z");
        leaked.expires_at = t("9999-06-01T00:00:00Z");
        let frozen = Floors::default().after(&leaked);
        let c = clock("2026-12-01T00:00:00Z", false);
        let mut next = sample(13);
        next.created_at = t("2026-12-01T00:00:00Z");
        assert!(matches!(
            frozen.admit(&next, "shop-1", c),
            Err(VerifyError::Stale { .. })
        ));
        let epoch = Epoch {
            root: 3,
            since: t("2026-11-30T12:00:00Z"),
        };
        let rotated = Floors::rotated(epoch);
        assert_eq!(rotated.time, Some(epoch.since));
        assert_eq!(rotated.trusted_now(t("1970-01-01T00:00:00Z")), epoch.since);
        rotated.admit(&next, "shop-1", c).unwrap();
        // A manifest of the old keys' days (still valid, signed by a key both roots list) is not
        // replayed into the new epoch.
        let mut old = sample(12);
        old.created_at = t("2026-11-20T00:00:00Z");
        let err = rotated.admit(&old, "shop-1", c).unwrap_err();
        assert!(
            matches!(err, VerifyError::BeforeEpoch { root: 3, .. }),
            "{err}"
        );
        assert_eq!(rotated.after(&next).epoch, Some(epoch));
        assert_eq!(Epoch::from_text(&epoch.to_text()), Some(epoch));
        assert_eq!(Epoch::from_text("3"), None);
    }
}
