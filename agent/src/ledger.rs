//! The ledger: what a Pi must remember across restarts and power cuts, and what its security rests on.
//!
//! Every meta key of the store's catalog is named here, and read and written only through [`Ledger`]:
//! the agent's id, the floors ([`Floors`]: the highest manifest version accepted per deployment, the
//! time floor (the newest signed time seen) and the epoch they were raised in), the trust roots (each
//! kept by version, and the one followed), and the releases (pending, active, previous, with their
//! pins), and the fleet bundle taken last. Each write is one durable commit
//! (`synchronous=FULL`), so a power cut leaves either the state before it or the state after it
//! (store/DESIGN.md, "The ledger").

use deckhand_protocol::floors::{Epoch, Floors};
use deckhand_protocol::status::{Fallback, Rejected};
use deckhand_protocol::switch::CrashLoop;
use deckhand_protocol::{BlobId, VerifiedManifest};
use deckhand_store::{Store, StoreError, StoreReader};
use jiff::Timestamp;

const AGENT_ID: &str = "agent_id";
const TIME_FLOOR: &str = "time_floor";
/// The trust root that last changed the release keys, and its `created_at` ([`Epoch`]); absent until
/// one does.
const EPOCH: &str = "floor_epoch";
/// The newest verified trust root envelope: the one followed.
const ROOT: &str = "trust_root";
const ACTIVE: &str = "active_envelope";
const PREVIOUS: &str = "previous_envelope";
/// The envelope of the release accepted and not yet active (empty when none): recorded in the commit
/// that accepts it, cleared in the one that activates it, so a restart (or a power cut) in between
/// resumes it rather than leaving the highest accepted version out of reach.
const PENDING: &str = "pending_envelope";
/// The newest fleet bundle taken (`deckhand fleet`: renewed certificates, CA cross-certificates,
/// revocation lists), as received: a restart keeps the renewal and the revocations, and it is relayed
/// to peers that hold an older one.
const FLEET: &str = "fleet_bundle";
/// When the agent started, while it runs (empty after a clean stop): found set at a start, the last
/// run ended uncleanly (killed, crashed, stopped by the watchdog).
const RUNNING: &str = "running_since";
/// When the active release went live, and the unclean ends noticed since (RFC 3339, one a line): the
/// crash-loop rule's facts ([`deckhand_protocol::switch::CrashLoop`]).
const ACTIVATED_AT: &str = "activated_at";
const UNCLEAN: &str = "unclean_ends";
/// The agent's own fall back from a release (JSON [`Fallback`]), until the next release goes live.
const FELL_BACK: &str = "fell_back";
/// The release the agent will not take (JSON [`Rejected`]): it fell back from it, or learnt that a
/// peer did. Cleared when a newer release goes live.
const REJECTED: &str = "rejected_release";

fn highest_key(deployment: &str) -> String {
    format!("highest_accepted/{deployment}")
}

/// The key of the verified root of `version` (each is kept, to pass on to peers that are behind).
fn root_key(version: u64) -> String {
    format!("trust_root/{version:020}")
}

fn parsed<T: std::str::FromStr>(v: Option<Vec<u8>>) -> Option<T> {
    v.and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
}

fn nonempty(v: Option<Vec<u8>>) -> Option<Vec<u8>> {
    v.filter(|e| !e.is_empty())
}

/// The durable facts of one store.
#[derive(Clone, Copy)]
pub struct Ledger<'s> {
    store: &'s Store,
}

impl<'s> Ledger<'s> {
    pub fn new(store: &'s Store) -> Self {
        Self { store }
    }

    /// The agent id recorded at first start (or from its certificate).
    pub fn agent_id(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .get_meta(AGENT_ID)?
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|id| !id.is_empty()))
    }

    pub fn set_agent_id(&self, id: &str) -> Result<(), StoreError> {
        self.store.set_meta(AGENT_ID, id.as_bytes(), true)
    }

    /// The highest manifest version this agent ever accepted for `deployment`.
    pub fn highest_accepted(&self, deployment: &str) -> Result<Option<u64>, StoreError> {
        Ok(parsed(self.store.get_meta(&highest_key(deployment))?))
    }

    /// The time floor: the newest `created_at` of a manifest accepted ([`deckhand_protocol::clock`]), if
    /// any was accepted yet.
    pub fn time_floor(&self) -> Result<Option<jiff::Timestamp>, StoreError> {
        Ok(parsed(self.store.get_meta(TIME_FLOOR)?))
    }

    /// The agent's trusted now: the later of the system clock `system` and the time floor.
    pub fn trusted_now(&self, system: jiff::Timestamp) -> Result<jiff::Timestamp, StoreError> {
        Ok(deckhand_protocol::clock::trusted_now(
            system,
            self.time_floor()?,
        ))
    }

    /// The floors of `deployment`: its highest accepted version, the time floor and their epoch.
    pub fn floors(&self, deployment: &str) -> Result<Floors, StoreError> {
        Ok(Floors {
            highest: self.highest_accepted(deployment)?,
            time: self.time_floor()?,
            epoch: self
                .store
                .get_meta(EPOCH)?
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| Epoch::from_text(&s)),
        })
    }

    /// The meta writes that record `floors` for `deployment`.
    fn floor_writes(deployment: &str, floors: &Floors) -> [(String, Vec<u8>); 3] {
        let text = |v: Option<String>| v.unwrap_or_default().into_bytes();
        [
            (
                highest_key(deployment),
                text(floors.highest.map(|h| h.to_string())),
            ),
            (
                TIME_FLOOR.to_owned(),
                text(floors.time.map(|t| t.to_string())),
            ),
            (EPOCH.to_owned(), text(floors.epoch.map(|e| e.to_text()))),
        ]
    }

    /// Records a verified manifest as accepted, in one commit: the floors of `deployment` raised to
    /// `floors` ([`Floors::after`]) and its envelope as pending.
    pub fn record_accepted(
        &self,
        deployment: &str,
        verified: &VerifiedManifest,
        floors: &Floors,
    ) -> Result<(), StoreError> {
        let writes = Self::floor_writes(deployment, floors);
        let mut meta: Vec<(&str, &[u8])> = writes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        meta.push((PENDING, &verified.envelope));
        self.store.set_pins_and_meta(&[], &meta)
    }

    /// The accepted release not yet active, if any (its envelope, as accepted).
    pub fn pending(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(nonempty(self.store.get_meta(PENDING)?))
    }

    /// The pending release was refused (its canaries failed, it does not load): nothing is pending.
    pub fn clear_pending(&self) -> Result<(), StoreError> {
        self.store.set_meta(PENDING, b"", true)
    }

    /// The active release's envelope, as recorded.
    pub fn active(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(nonempty(self.store.get_meta(ACTIVE)?))
    }

    /// The active and previous releases' envelopes, as recorded.
    pub fn releases(&self) -> Result<[Option<Vec<u8>>; 2], StoreError> {
        Ok([
            nonempty(self.store.get_meta(ACTIVE)?),
            nonempty(self.store.get_meta(PREVIOUS)?),
        ])
    }

    /// Records `v` as the active release after its swap, in one commit: the old active becomes previous
    /// (its blobs still pinned, for rollback), `blobs` are pinned as active, nothing is pending.
    /// It also notes when it went live, and clears the unclean ends counted and any fall back.
    pub fn record_active(&self, v: &VerifiedManifest, blobs: &[BlobId]) -> Result<(), StoreError> {
        let old = self.active()?;
        let old_blobs = self.store.pins("active")?;
        let now = self.trusted_now(Timestamp::now())?.to_string();
        // A release the agent rejected stays rejected until a newer one goes live (a new Pi that
        // learnt of a rejection from its peers takes the older release they serve).
        let rejected = self
            .rejected()?
            .filter(|r| r.version >= v.manifest.version)
            .map(|r| serde_json::to_vec(&r).unwrap_or_default())
            .unwrap_or_default();
        let live = [
            (ACTIVATED_AT, now.as_bytes()),
            (UNCLEAN, b"".as_slice()),
            (FELL_BACK, b"".as_slice()),
            (REJECTED, rejected.as_slice()),
        ];
        match &old {
            Some(env) if *env != v.envelope => self.store.set_pins_and_meta(
                &[
                    ("previous", &old_blobs),
                    ("active", blobs),
                    ("pending", &[]),
                ],
                &[
                    &[
                        (PREVIOUS, env.as_slice()),
                        (ACTIVE, &v.envelope),
                        (PENDING, b""),
                    ],
                    &live[..],
                ]
                .concat(),
            ),
            _ => self.store.set_pins_and_meta(
                &[("active", blobs), ("pending", &[])],
                &[
                    &[(ACTIVE, v.envelope.as_slice()), (PENDING, b"")],
                    &live[..],
                ]
                .concat(),
            ),
        }
    }

    /// Notes that the agent (`by`) starts (at `now`, by the trusted clock). If its last run ended
    /// uncleanly soon after the active release went live, that is counted, and when `rule` says the
    /// release loops, the agent falls back to the previous release ([`Ledger::fall_back`]).
    pub fn note_start(
        &self,
        now: Timestamp,
        rule: &CrashLoop,
        by: &str,
    ) -> Result<Option<Fallback>, StoreError> {
        let unclean = nonempty(self.store.get_meta(RUNNING)?).is_some();
        self.store
            .set_meta(RUNNING, now.to_string().as_bytes(), true)?;
        let activated: Option<Timestamp> = parsed(self.store.get_meta(ACTIVATED_AT)?);
        let (true, Some(activated)) = (unclean, activated) else {
            return Ok(None);
        };
        let mut ends: Vec<Timestamp> = self
            .store
            .get_meta(UNCLEAN)?
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .filter(|t| *t >= activated)
            .collect();
        ends.push(now);
        let keep = ends.len().saturating_sub(rule.restarts as usize + 1);
        ends.drain(..keep);
        let text: Vec<String> = ends.iter().map(|t| t.to_string()).collect();
        if !rule.tripped(activated, &ends) {
            self.store
                .set_meta(UNCLEAN, text.join("\n").as_bytes(), true)?;
            return Ok(None);
        }
        let why = |from: u64| {
            format!(
                "the agent ended uncleanly {} times within {} min of version {from} going live",
                ends.len(),
                rule.within.as_secs() / 60,
            )
        };
        let fell = self.fall_back(now, why, by)?;
        if fell.is_none() {
            self.store
                .set_meta(UNCLEAN, text.join("\n").as_bytes(), true)?;
        }
        Ok(fell)
    }

    /// Falls back from the active release to the previous one (still pinned), in one durable commit:
    /// the previous becomes active, the one left is unpinned and recorded rejected ([`Rejected`], by
    /// `by`, for `why(its version)`) so that neither this agent nor its peers take it again (the
    /// floors keep the origin's copy out), and the fall back is recorded and returned. `None` when
    /// there is no previous release to fall back to.
    pub fn fall_back(
        &self,
        now: Timestamp,
        why: impl FnOnce(u64) -> String,
        by: &str,
    ) -> Result<Option<Fallback>, StoreError> {
        let [Some(active), Some(previous)] = self.releases()? else {
            return Ok(None);
        };
        let version = |env: &[u8]| {
            deckhand_protocol::envelope::inspect_unverified(env)
                .map(|m| m.version)
                .unwrap_or(0)
        };
        let from = version(&active);
        let why = why(from);
        let fallback = Fallback {
            from_version: from,
            to_version: version(&previous),
            at: now.to_string(),
            why: why.clone(),
        };
        let rejected = Rejected {
            version: from,
            manifest_id: deckhand_protocol::envelope::unverified_id(&active)
                .map(|id| id.to_string())
                .unwrap_or_default(),
            by: by.to_owned(),
            why,
            at: now.to_string(),
        };
        let json = serde_json::to_vec(&fallback).unwrap_or_default();
        let rejected = serde_json::to_vec(&rejected).unwrap_or_default();
        let previous_blobs = self.store.pins("previous")?;
        let now = now.to_string();
        self.store.set_pins_and_meta(
            &[("active", &previous_blobs), ("previous", &[])],
            &[
                (ACTIVE, previous.as_slice()),
                (PREVIOUS, b""),
                (ACTIVATED_AT, now.as_bytes()),
                (UNCLEAN, b""),
                (FELL_BACK, &json),
                (REJECTED, &rejected),
            ],
        )?;
        Ok(Some(fallback))
    }

    /// The release the agent will not take, if any.
    pub fn rejected(&self) -> Result<Option<Rejected>, StoreError> {
        Ok(nonempty(self.store.get_meta(REJECTED)?).and_then(|j| serde_json::from_slice(&j).ok()))
    }

    /// Records a release the agent will not take (a peer rolled back from it), until a newer one goes
    /// live.
    pub fn reject(&self, rejected: &Rejected) -> Result<(), StoreError> {
        let json = serde_json::to_vec(rejected).unwrap_or_default();
        self.store.set_meta(REJECTED, &json, true)
    }

    /// When the active release went live (by the trusted clock), if recorded.
    pub fn activated_at(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(parsed(self.store.get_meta(ACTIVATED_AT)?))
    }

    /// The agent stops cleanly: its next start is not counted as following an unclean end.
    pub fn note_clean_stop(&self) -> Result<(), StoreError> {
        self.store.set_meta(RUNNING, b"", true)
    }

    /// The agent's own fall back from a release, until the next release goes live.
    pub fn fallback(&self) -> Result<Option<Fallback>, StoreError> {
        Ok(nonempty(self.store.get_meta(FELL_BACK)?).and_then(|j| serde_json::from_slice(&j).ok()))
    }

    /// The trust root followed: the newest verified one, reached from an installed root.
    pub fn followed_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(nonempty(self.store.get_meta(ROOT)?))
    }

    /// The verified root of `version`, if this agent holds it.
    pub fn root(&self, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(nonempty(self.store.get_meta(&root_key(version))?))
    }

    /// The fleet bundle taken last, if any.
    pub fn fleet_bundle(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(nonempty(self.store.get_meta(FLEET)?))
    }

    /// Keeps a fleet bundle (checked by the caller: newer than the one held, signed by a fleet CA).
    pub fn keep_fleet_bundle(&self, bundle: &[u8]) -> Result<(), StoreError> {
        self.store.set_meta(FLEET, bundle, true)
    }

    /// Keeps a verified root by its version (to pass on to peers), without following it.
    pub fn keep_root(&self, version: u64, envelope: &[u8]) -> Result<(), StoreError> {
        self.store.set_meta(&root_key(version), envelope, true)
    }

    /// Follows a verified root, in one commit: kept by its version and recorded as the one followed;
    /// when it changed the release keys, `deployment`'s floors start its epoch ([`Floors::rotated`])
    /// in the same commit.
    pub fn follow_root(
        &self,
        version: u64,
        envelope: &[u8],
        epoch: Option<(&str, Epoch)>,
    ) -> Result<(), StoreError> {
        let key = root_key(version);
        let writes = epoch.map(|(d, e)| Self::floor_writes(d, &Floors::rotated(e)));
        let mut meta: Vec<(&str, &[u8])> = vec![(key.as_str(), envelope), (ROOT, envelope)];
        meta.extend(
            writes
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_slice())),
        );
        self.store.set_pins_and_meta(&[], &meta)
    }
}

/// The trust roots a store keeps (each verified when it was taken), by version, oldest first, and the
/// fleet bundle taken last, read through a [`StoreReader`] from one committed state: what a stick
/// exported from this Pi carries besides the releases. Roots are kept from the installed one up to the
/// one followed; a version this Pi never held is absent.
pub fn recorded_trust(reader: &StoreReader, deployment: &str) -> Result<RecordedTrust, StoreError> {
    let mut head = reader.get_meta_many(&[ROOT, FLEET])?.into_iter();
    let (followed, fleet) = (
        nonempty(head.next().flatten()),
        nonempty(head.next().flatten()),
    );
    let newest = followed
        .and_then(|e| deckhand_protocol::root::TrustedRoot::installed(&e, deployment).ok())
        .map_or(0, |r| r.version());
    let keys: Vec<String> = (1..=newest).map(root_key).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let roots = (1..=newest)
        .zip(reader.get_meta_many(&refs)?)
        .filter_map(|(v, e)| Some((v, nonempty(e)?)))
        .collect();
    Ok(RecordedTrust { roots, fleet })
}

/// What [`recorded_trust`] read.
pub struct RecordedTrust {
    /// Root envelopes by version, oldest first.
    pub roots: Vec<(u64, Vec<u8>)>,
    /// The fleet bundle taken last.
    pub fleet: Option<Vec<u8>>,
}

/// The active and previous releases' envelopes read through a [`StoreReader`] (another process, while
/// the agent runs), from one committed state of the catalog (a swap records them together).
pub fn recorded_releases(reader: &StoreReader) -> Result<[Option<Vec<u8>>; 2], StoreError> {
    let mut recorded = reader.get_meta_many(&[ACTIVE, PREVIOUS])?.into_iter();
    Ok([
        nonempty(recorded.next().flatten()),
        nonempty(recorded.next().flatten()),
    ])
}
