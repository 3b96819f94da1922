//! After a release goes live here it is on probation ([`deckhand_protocol::probation`]): every second
//! what it served is judged against what the release before served while it was live, and a release
//! that serves worse is rolled back to that release (still pinned) by the agent itself, recorded
//! rejected in the ledger (one commit, [`crate::ledger::Ledger::fall_back`]) and announced so. A
//! release a peer rejected is not taken here either: not accepted from the origin, not activated once
//! downloaded, dropped when held, and rolled back when it is live here and still on probation. The
//! operator's next release clears a rejection.

use super::{Engine, SyncError, activation, joined};
use crate::ledger::Ledger;
use deckhand_protocol::VerifiedManifest;
use deckhand_protocol::probation::{Canary, Health, Judgement, Member, Rollout, canary, judge};
use deckhand_protocol::status::{Probation, Rejected};
use deckhand_protocol::wire::ReleaseRef;
use std::time::Instant;

/// The active release on probation here.
pub(super) struct OnProbation {
    release: ReleaseRef,
    policy: Rollout,
    since: Instant,
    /// What the release before served while it was live (none after a restart).
    before: Option<Health>,
    /// Judged (passed, or rolled back, or it could not be): no longer watched.
    done: bool,
    passed: bool,
}

impl Engine {
    /// The probation `m` goes live under: the manifest's, else the agent's; none for an urgent
    /// release (the operator's call, and every rollback) or `probation=0`.
    pub(super) fn rollout_policy(
        &self,
        m: &deckhand_protocol::manifest::Manifest,
    ) -> Option<Rollout> {
        if m.urgent {
            return None;
        }
        Some(m.rollout.unwrap_or(self.cfg.rollout)).filter(|p| p.probation > 0)
    }

    /// `v` went live `served` ago, replacing a release that served `before`: its probation starts
    /// (from then).
    pub(super) fn start_probation(
        &mut self,
        v: &VerifiedManifest,
        before: Option<Health>,
        served: std::time::Duration,
    ) {
        let Some(policy) = self.rollout_policy(&v.manifest) else {
            self.probation = None;
            self.note_status(|s| s.probation = None);
            return;
        };
        let ago = jiff::SignedDuration::try_from(served).unwrap_or(jiff::SignedDuration::ZERO);
        let now = jiff::Timestamp::now();
        let since = now.checked_sub(ago).unwrap_or(now);
        let until = since
            .checked_add(jiff::SignedDuration::from_secs(
                i64::try_from(policy.probation).unwrap_or(i64::MAX),
            ))
            .unwrap_or(since);
        tracing::info!(version = v.manifest.version, policy = %policy, "release on probation");
        self.probation = Some(OnProbation {
            release: ReleaseRef {
                version: v.manifest.version,
                manifest: v.id,
            },
            policy,
            since: Instant::now()
                .checked_sub(served)
                .unwrap_or_else(Instant::now),
            before,
            done: false,
            passed: false,
        });
        let report = Probation {
            version: v.manifest.version,
            since: since.to_string(),
            until: until.to_string(),
            outcome: "watching".into(),
            health: Health::default(),
            before,
            why: None,
        };
        self.note_status(|s| s.probation = Some(report));
    }

    /// At start, the active release `v`'s probation goes on where the ledger says it went live: passed
    /// (and announced so) when its time is over, else watched for the rest of it. What the release
    /// before served was in memory and is gone: only failures are judged.
    pub(super) async fn resume_probation(&mut self, v: &VerifiedManifest) -> Result<(), SyncError> {
        let Some(policy) = self.rollout_policy(&v.manifest) else {
            return Ok(());
        };
        let Some(at) = self
            .on_store(|s| Ok(Ledger::new(s).activated_at()?))
            .await?
        else {
            return Ok(());
        };
        let served = jiff::Timestamp::now()
            .duration_since(at)
            .try_into()
            .unwrap_or(std::time::Duration::ZERO);
        self.start_probation(v, None, served);
        if let Some(p) = self.probation.as_mut()
            && served >= policy.probation()
        {
            p.done = true;
            p.passed = true;
            self.note_status(|s| {
                if let Some(r) = s.probation.as_mut() {
                    r.outcome = "passed".into();
                }
            });
        }
        Ok(())
    }

    /// Whether a release is watched (the engine then looks every second).
    pub(super) fn watching(&self) -> bool {
        self.probation.as_ref().is_some_and(|p| !p.done)
    }

    /// The active release, once it passed its probation here (what peers are told).
    pub(super) fn proven(&self) -> Option<ReleaseRef> {
        self.probation
            .as_ref()
            .filter(|p| p.passed)
            .map(|p| p.release)
    }

    /// The release this agent will not take, as announced.
    pub(super) fn rejected_ref(&self) -> Option<ReleaseRef> {
        let r = self.rejected.as_ref()?;
        Some(ReleaseRef {
            version: r.version,
            manifest: r.manifest_id.parse().ok()?,
        })
    }

    /// Judges the release on probation by what it served so far; rolls it back when it is worse.
    pub(super) async fn watch_probation(&mut self) -> Result<(), SyncError> {
        let Some(p) = self.probation.as_mut().filter(|p| !p.done) else {
            return Ok(());
        };
        let health = self.service.health(p.release.version).unwrap_or_default();
        let judged = judge(&p.policy, p.since.elapsed(), &health, p.before.as_ref());
        let version = p.release.version;
        match judged {
            Judgement::Watching => {
                // Status changes only when the figures did (an idle counter wakes nobody).
                self.status
                    .send_if_modified(|s| match s.probation.as_mut() {
                        Some(r) if r.health != health => {
                            r.health = health;
                            true
                        }
                        _ => false,
                    });
                Ok(())
            }
            Judgement::Passed => {
                p.done = true;
                p.passed = true;
                tracing::info!(version, health = %health, "release passed its probation");
                self.note_status(|s| {
                    if let Some(r) = s.probation.as_mut() {
                        r.health = health;
                        r.outcome = "passed".into();
                    }
                });
                self.announce();
                Ok(())
            }
            Judgement::Worse(why) => {
                let by = self.cfg.agent_id.clone();
                self.roll_back(why, by, health).await
            }
        }
    }

    /// Falls back from the active release (on probation) to the one before it, still pinned: loaded
    /// off the runtime's threads, recorded in one ledger commit (the one left rejected, by `by`, for
    /// `why`), then swapped in. If the release before cannot be loaded, the active one serves on and
    /// status says why.
    async fn roll_back(
        &mut self,
        why: String,
        by: String,
        health: Health,
    ) -> Result<(), SyncError> {
        let Some(p) = self.probation.as_mut() else {
            return Ok(());
        };
        p.done = true;
        let from = p.release.version;
        let previous = self
            .on_store(|s| Ok(Ledger::new(s).releases()?[1].clone()))
            .await?;
        let loaded = match previous {
            None => Err("there is no release before it in the store".to_owned()),
            Some(env) => match self.cfg.trust.policy().verify_ignoring_expiry(&env) {
                Err(e) => Err(format!("the release before no longer verifies: {e}")),
                Ok(v) => {
                    let (s2, v2, backend) = (self.store.clone(), v.clone(), self.cfg.backend);
                    joined(
                        tokio::task::spawn_blocking(move || {
                            activation::load_recognizer(&s2, &v2, backend)
                                .map_err(|e| format!("the release before does not load: {e}"))
                        })
                        .await,
                    )?
                    .map(|r| (v, r))
                }
            },
        };
        let (v, recognizer) = match loaded {
            Ok(loaded) => loaded,
            Err(cannot) => {
                tracing::error!(version = from, why = %why, cannot = %cannot, "a release worse on probation cannot be rolled back; it serves on");
                let why = format!("{why}; not rolled back: {cannot}");
                self.note_status(|s| {
                    if let Some(r) = s.probation.as_mut() {
                        r.health = health;
                        r.outcome = "worse".into();
                        r.why = Some(why.clone());
                    }
                    s.last_error = Some(why);
                });
                return Ok(());
            }
        };
        let (why2, by2) = (why.clone(), by.clone());
        let fell = self
            .on_store(move |s| {
                let ledger = Ledger::new(s);
                let now = ledger.trusted_now(jiff::Timestamp::now())?;
                Ok(ledger.fall_back(now, |_| why2, &by2)?)
            })
            .await?;
        if fell.is_none() {
            // The ledger holds no release before (nothing was swapped): the active one serves on.
            return Ok(());
        }
        let to = v.manifest.version;
        let service = &self.service;
        let now = jiff::Timestamp::now().to_string();
        self.status.send_modify(|s| {
            service.swap(recognizer);
            if let Some(r) = s.probation.as_mut() {
                r.health = health;
                r.outcome = "rolled back".into();
                r.why = Some(why.clone());
            }
            s.last_switch = Some(deckhand_protocol::status::Switch {
                version: to,
                ready_at: now.clone(),
                switched_at: now,
                why: "rolled back".into(),
            });
        });
        tracing::error!(from, to, by = %by, why = %why, "release rolled back on probation; serving the release before it");
        self.set_active_envelope(Some(v.envelope.clone()));
        self.rejected = self.on_store(|s| Ok(Ledger::new(s).rejected()?)).await?;
        self.announce();
        Ok(())
    }

    /// Whether this agent will not take `release`: it rejected it, or a peer announces that it did (then
    /// recorded here, and announced in turn).
    pub(super) async fn refuses(&mut self, release: ReleaseRef) -> Result<bool, SyncError> {
        if self.rejected_ref() == Some(release) {
            return Ok(true);
        }
        let by = self.peers.as_ref().and_then(|n| {
            n.usable()
                .into_iter()
                .find(|(_, h)| h.rejected == Some(release))
                .map(|(id, _)| id)
        });
        match by {
            Some(peer) => {
                self.learn_rejection(release, peer).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Records that `peer` rejected `release`, a release this agent does not serve.
    async fn learn_rejection(
        &mut self,
        release: ReleaseRef,
        peer: String,
    ) -> Result<(), SyncError> {
        let rejected = Rejected {
            version: release.version,
            manifest_id: release.manifest.to_string(),
            why: format!("peer {peer} rolled it back"),
            by: peer,
            at: jiff::Timestamp::now().to_string(),
        };
        tracing::warn!(version = release.version, peer = %rejected.by, "a peer rolled this release back; it is not taken here");
        let r2 = rejected.clone();
        self.on_store(move |s| Ok(Ledger::new(s).reject(&r2)?))
            .await?;
        self.rejected = Some(rejected);
        self.announce();
        Ok(())
    }

    /// Heeds the releases peers rejected (when a peer announces one, and every time the engine looks
    /// at what it holds): one held here is
    /// dropped, and one live here and still on probation is rolled back; one newer than what this agent
    /// serves is recorded, so it is not taken later.
    pub(super) async fn heed_rejections(&mut self) -> Result<(), SyncError> {
        let Some(node) = &self.peers else {
            return Ok(());
        };
        let active = self.live_active();
        let mine = self.rejected_ref();
        let Some((peer, release)) = node.usable().into_iter().find_map(|(id, h)| {
            h.rejected
                .filter(|r| Some(*r) != mine && Some(*r) != self.proven())
                .filter(|r| active.is_none_or(|a| r.version >= a.version))
                .map(|r| (id, r))
        }) else {
            return Ok(());
        };
        if active == Some(release) {
            if self.watching() {
                let health = self.service.health(release.version).unwrap_or_default();
                let why = format!("peer {peer} rolled version {} back", release.version);
                return self.roll_back(why, peer, health).await;
            }
            return Ok(());
        }
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.id() == release.manifest)
        {
            return self.drop_rejected(release, peer).await;
        }
        self.learn_rejection(release, peer).await
    }
}

impl Engine {
    /// Where this agent stands on `release` rolled out to `n` canaries, by what its live peers announce
    /// ([`deckhand_protocol::probation::canary`]).
    pub(super) fn canary_decision(&self, release: ReleaseRef, n: u32) -> Canary {
        let heard = self
            .peers
            .as_ref()
            .map(|node| node.usable())
            .unwrap_or_default();
        let members: Vec<Member<'_>> = heard
            .iter()
            .map(|(id, h)| Member {
                id: id.as_str(),
                proven: h.proven == Some(release),
                rejected: h.rejected == Some(release),
            })
            .collect();
        canary(&self.cfg.agent_id, &members, &release.manifest, n)
    }

    /// What a release held for its canaries waits for, in words (`None` once it does not wait).
    pub(super) fn canary_waiting(&self, v: &VerifiedManifest, n: u32) -> Option<String> {
        let release = ReleaseRef {
            version: v.manifest.version,
            manifest: v.id,
        };
        match self.canary_decision(release, n) {
            Canary::Wait(names) => Some(format!(
                "rolled out to canaries first: waiting for {} to serve version {} through its probation",
                names.join(", "),
                release.version
            )),
            _ => None,
        }
    }

    /// A member rejected `release`, held or about to be held here: it is recorded rejected and
    /// dropped (nothing pending).
    pub(super) async fn drop_rejected(
        &mut self,
        release: ReleaseRef,
        peer: String,
    ) -> Result<(), SyncError> {
        self.learn_rejection(release, peer).await?;
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.id() == release.manifest)
        {
            self.held = None;
        }
        tracing::warn!(
            version = release.version,
            "the release is dropped: a peer rolled it back"
        );
        self.pending = None;
        self.set_ready(None);
        self.note_status(|s| s.pending = None);
        self.on_store(|s| Ok(Ledger::new(s).clear_pending()?))
            .await?;
        Ok(())
    }
}
