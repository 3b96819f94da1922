//! A complete release goes live: loaded and canary-checked off the runtime's threads, held until it
//! is due ([`deckhand_protocol::switch`]: the agent's gate (maintenance windows, an idle counter) open,
//! then at once or together with the shop, never before the manifest's `not_before`), then swapped in
//! and recorded active, or refused and named. While the gate holds a release the engine goes on
//! (polling, serving peers, taking a newer release, which replaces the one held).

use super::{Engine, SyncError, joined};
use crate::recognizer::service::check_canaries;
use crate::sync::activation;
use deckhand_protocol::VerifiedManifest;
use deckhand_protocol::probation::Canary;
use deckhand_protocol::shadow::{Policy, Verdict};
use deckhand_protocol::switch::{self, Decision, Member, Mode, Plan};
use deckhand_protocol::wire::ReleaseRef;
use std::time::{Duration, Instant};

/// A verified, loaded, canary-checked release held aside: by the agent's gate until a maintenance
/// window or an idle counter, or by shadow evaluation.
pub(crate) struct Held {
    v: VerifiedManifest,
    recognizer: crate::recognizer::Recognizer,
    ready_at: jiff::Timestamp,
    /// What it waits for.
    until: Until,
}

/// What a held release waits for.
enum Until {
    /// The agent's gate: a maintenance window, an idle counter.
    Gate,
    /// The shop's canaries to serve it through their probation (this many).
    Canaries(u32),
    /// Nothing: it fell below the shadow policy, and stays held until a newer release replaces it.
    ShadowFailed,
    /// Too few shadow samples, and the policy says wait: evaluated again once `policy.min_samples`
    /// of the active release's answers are kept.
    ShadowSamples(Policy),
}

impl Held {
    pub(super) fn id(&self) -> deckhand_protocol::BlobId {
        self.v.id
    }

    pub(super) fn version(&self) -> u64 {
        self.v.manifest.version
    }
}

/// What shadow evaluation made of a release.
enum Evaluated {
    /// On to the gate.
    Go(crate::recognizer::Recognizer),
    /// Held for samples (already kept aside).
    Held,
    /// Below the policy: held, not activated, for this reason.
    Below(crate::recognizer::Recognizer, String),
    /// The evaluation could not run and the release went with it: refused.
    Lost(String),
}

/// How often a ready release waiting to switch looks at the peers again.
const SWITCH_POLL: Duration = Duration::from_millis(100);

impl Engine {
    /// `v` goes live when due: when the agent's gate lets it ([`switch::Gate`]: a maintenance window, an idle
    /// counter; until then it is [`Held`] and the engine goes on), then as [`Engine::switch_when_due`]
    /// says. A `repair` of the release already live swaps at once.
    pub(super) async fn activate(
        &mut self,
        v: &VerifiedManifest,
        repair: bool,
    ) -> Result<(), SyncError> {
        match &self.held {
            Some(h) if h.id() == v.id => return Ok(()),
            // A newer release replaces the one held.
            Some(h) if !repair && h.version() < v.manifest.version => {
                tracing::info!(
                    held = h.version(),
                    newer = v.manifest.version,
                    "a newer release replaces the one held for the gate"
                );
                self.held = None;
            }
            _ => {}
        }
        let release = ReleaseRef {
            version: v.manifest.version,
            manifest: v.id,
        };
        if !repair && self.refuses(release).await? {
            // Rejected since it was accepted (a peer rolled it back): not activated.
            tracing::warn!(
                version = v.manifest.version,
                "a rejected release is not activated"
            );
            self.note_status(|s| s.pending = None);
            self.pending = None;
            self.on_store(|store| Ok(crate::ledger::Ledger::new(store).clear_pending()?))
                .await?;
            self.announce();
            return Ok(());
        }
        let (s2, v2, backend) = (self.store.clone(), v.clone(), self.cfg.backend);
        // Loaded and canary-checked off the runtime's threads: only the swap is left.
        let checked = joined(
            tokio::task::spawn_blocking(move || {
                let r =
                    activation::load_recognizer(&s2, &v2, backend).map_err(|e| e.to_string())?;
                let c = activation::canaries(&s2, &v2.manifest).map_err(|e| e.to_string())?;
                check_canaries(&r, &c).map_err(|e| e.to_string())?;
                Ok::<_, String>(r)
            })
            .await,
        )?;
        let ready_at = jiff::Timestamp::now();
        // Shadow evaluation, for a release that would replace a live one.
        let checked = match checked {
            Ok(r) if !repair => match self.shadow(v, r).await {
                Evaluated::Go(r) => Ok(r),
                Evaluated::Held => return Ok(()),
                Evaluated::Below(r, why) => {
                    self.hold(v, r, ready_at, Until::ShadowFailed, why);
                    return Ok(());
                }
                Evaluated::Lost(why) => Err(why),
            },
            other => other,
        };
        self.canaries_then_live(v, checked, ready_at, repair).await
    }

    /// After shadow evaluation: the canaries (when the release is rolled out to canaries first), then
    /// the gate, then live.
    async fn canaries_then_live(
        &mut self,
        v: &VerifiedManifest,
        checked: Result<crate::recognizer::Recognizer, String>,
        ready_at: jiff::Timestamp,
        repair: bool,
    ) -> Result<(), SyncError> {
        let n = self.rollout_policy(&v.manifest).map_or(0, |p| p.canary);
        let checked = match checked {
            Ok(r) if !repair && n > 0 => match self.canary_step(v, n).await? {
                Some(why) => {
                    return self
                        .gate_then_live(v, Ok(r), ready_at, false, Some(why))
                        .await;
                }
                None => {
                    if let Some(waiting) = self.canary_waiting(v, n) {
                        self.hold(v, r, ready_at, Until::Canaries(n), waiting);
                    }
                    return Ok(());
                }
            },
            other => other,
        };
        self.gate_then_live(v, checked, ready_at, repair, None)
            .await
    }

    /// Where `v` stands with its canaries: `Some(why)` to go on, `None` to wait (or, a member rejected
    /// it, dropped and recorded).
    async fn canary_step(
        &mut self,
        v: &VerifiedManifest,
        n: u32,
    ) -> Result<Option<switch::Why>, SyncError> {
        let release = ReleaseRef {
            version: v.manifest.version,
            manifest: v.id,
        };
        match self.canary_decision(release, n) {
            Canary::Go(why) => {
                tracing::info!(version = release.version, why = %why, "canary rollout: going live");
                Ok(Some(if why == "a canary" {
                    switch::Why::Canary
                } else {
                    switch::Why::AfterCanaries
                }))
            }
            Canary::Wait(_) => Ok(None),
            Canary::Rejected(peer) => {
                self.drop_rejected(release, peer).await?;
                Ok(None)
            }
        }
    }

    /// After the canaries (`canary`: why this agent goes on, if they were asked): the gate, then live.
    async fn gate_then_live(
        &mut self,
        v: &VerifiedManifest,
        checked: Result<crate::recognizer::Recognizer, String>,
        ready_at: jiff::Timestamp,
        repair: bool,
        canary: Option<switch::Why>,
    ) -> Result<(), SyncError> {
        let gate = match &checked {
            Ok(_) if repair => Some(switch::Why::AtOnce),
            Ok(_) => match self.gate(&v.manifest).await? {
                Ok(switch::Why::AtOnce) => Some(canary.unwrap_or(switch::Why::AtOnce)),
                Ok(why) => Some(why),
                Err(wait) => {
                    if let Ok(recognizer) = checked {
                        let waiting = format!(
                            "goes live in {} (in {} s at the soonest)",
                            self.cfg.gate.describe(),
                            wait.as_secs()
                        );
                        self.hold(v, recognizer, ready_at, Until::Gate, waiting);
                    }
                    return Ok(());
                }
            },
            Err(_) => None,
        };
        self.go_live(v, checked, ready_at, repair, gate).await
    }

    /// Whether the agent's gate lets `m` go live now (and why), or how long until it may at the
    /// soonest. An urgent release, and the first release of an agent with nothing live, pass.
    async fn gate(
        &self,
        m: &deckhand_protocol::manifest::Manifest,
    ) -> Result<Result<switch::Why, Duration>, SyncError> {
        if m.urgent && self.cfg.gate.is_set() {
            return Ok(Ok(switch::Why::Urgent));
        }
        if !self.cfg.gate.is_set() || self.service.active().is_none() {
            return Ok(Ok(switch::Why::AtOnce));
        }
        // Local time by the trusted clock: a Pi whose clock fell back does not reach its window early.
        let floor = self
            .on_store(|store| Ok(crate::ledger::Ledger::new(store).time_floor()?))
            .await?;
        let now = deckhand_protocol::clock::trusted_now(jiff::Timestamp::now(), floor)
            .to_zoned(jiff::tz::TimeZone::system());
        let idle = self
            .service
            .metrics()
            .idle_for()
            .unwrap_or_else(|| self.started.elapsed());
        let minute =
            u16::try_from(now.hour()).unwrap_or(0) * 60 + u16::try_from(now.minute()).unwrap_or(0);
        let second = u8::try_from(now.second()).unwrap_or(0);
        Ok(self.cfg.gate.check(minute, second, idle))
    }

    /// Keeps a verified, loaded release aside (for the gate, or by shadow evaluation); status says what
    /// it waits for.
    fn hold(
        &mut self,
        v: &VerifiedManifest,
        recognizer: crate::recognizer::Recognizer,
        ready_at: jiff::Timestamp,
        until: Until,
        waiting: String,
    ) {
        tracing::info!(version = v.manifest.version, waiting = %waiting, "release held");
        self.pending_update(|p| p.waiting = Some(waiting));
        self.held = Some(Held {
            v: v.clone(),
            recognizer,
            ready_at,
            until,
        });
    }

    /// The shadow policy `m` goes live under, if any: the manifest's, else the agent's. An urgent
    /// release (the operator's call, every rollback) is not evaluated.
    fn shadow_policy(&self, m: &deckhand_protocol::manifest::Manifest) -> Option<Policy> {
        if m.urgent {
            return None;
        }
        m.shadow.or(self.cfg.shadow)
    }

    /// Shadow evaluation of a checked release before it may replace the live one
    /// ([`deckhand_protocol::shadow`]): `Some` to go on to the gate, `None` when it is held for samples,
    /// `Err` (with the release and why) when it falls below the policy. Status says what it decided.
    async fn shadow(
        &mut self,
        v: &VerifiedManifest,
        candidate: crate::recognizer::Recognizer,
    ) -> Evaluated {
        let Some(policy) = self.shadow_policy(&v.manifest) else {
            return Evaluated::Go(candidate);
        };
        let Some(active) = self.service.active().map(|a| a.version) else {
            return Evaluated::Go(candidate);
        };
        let version = v.manifest.version;
        let samples = self.service.samples();
        let have = samples.as_ref().map_or(0, |s| s.answered_by(active));
        let (verdict, figures, candidate) = match (Verdict::before(&policy, have), samples) {
            (Some(verdict), _) => (verdict, None, candidate),
            (None, Some(samples)) => {
                tracing::info!(version, active, samples = have, "shadow evaluation");
                match crate::recognizer::shadow::evaluate(samples, active, candidate).await {
                    Ok((c, f)) => (Verdict::judge(&policy, &f), Some(f), c),
                    // The candidate went with the thread: refused, the live release serves on.
                    Err(why) => return Evaluated::Lost(why),
                }
            }
            (None, None) => (
                Verdict::Wait {
                    have,
                    need: policy.min_samples,
                },
                None,
                candidate,
            ),
        };
        let outcome = match &verdict {
            Verdict::Pass(_) => "passed",
            Verdict::Hold(_) => "held",
            Verdict::Wait { .. } => "waiting",
        };
        let why = verdict.to_string();
        tracing::info!(version, outcome, why = %why, "shadow evaluation decided");
        let report = deckhand_protocol::status::Shadow {
            version,
            outcome: outcome.into(),
            why: why.clone(),
            at: jiff::Timestamp::now().to_string(),
            figures,
        };
        self.note_status(|s| s.shadow = Some(report));
        match verdict {
            Verdict::Pass(_) => Evaluated::Go(candidate),
            Verdict::Hold(why) => Evaluated::Below(candidate, why),
            Verdict::Wait { .. } => {
                let ready_at = jiff::Timestamp::now();
                self.hold(v, candidate, ready_at, Until::ShadowSamples(policy), why);
                Evaluated::Held
            }
        }
    }

    /// The held release goes live if what it waits for came: its gate opened, its canaries served it
    /// through their probation (or, one rejected it, it is dropped), or its shadow samples are kept and
    /// it passes.
    pub(super) async fn release_held(&mut self) -> Result<(), SyncError> {
        let Some(until) = self.held.as_ref().map(|h| &h.until) else {
            return Ok(());
        };
        match until {
            Until::ShadowFailed => Ok(()),
            Until::ShadowSamples(policy) => {
                let policy = *policy;
                let active = self.service.active().map(|a| a.version);
                let have = match (self.service.samples(), active) {
                    (Some(s), Some(a)) => s.answered_by(a),
                    _ => 0,
                };
                if have < policy.min_samples {
                    let waiting = Verdict::Wait {
                        have,
                        need: policy.min_samples,
                    }
                    .to_string();
                    self.pending_update(|p| p.waiting = Some(waiting));
                    return Ok(());
                }
                let Some(h) = self.held.take() else {
                    return Ok(());
                };
                match self.shadow(&h.v, h.recognizer).await {
                    Evaluated::Go(r) => {
                        self.canaries_then_live(&h.v, Ok(r), h.ready_at, false)
                            .await
                    }
                    Evaluated::Held => Ok(()),
                    Evaluated::Below(r, why) => {
                        self.hold(&h.v, r, h.ready_at, Until::ShadowFailed, why);
                        Ok(())
                    }
                    Evaluated::Lost(why) => {
                        self.canaries_then_live(&h.v, Err(why), h.ready_at, false)
                            .await
                    }
                }
            }
            Until::Canaries(n) => {
                let n = *n;
                let Some(v) = self.held.as_ref().map(|h| h.v.clone()) else {
                    return Ok(());
                };
                let Some(why) = self.canary_step(&v, n).await? else {
                    if let Some(waiting) = self.canary_waiting(&v, n) {
                        self.pending_update(|p| p.waiting = Some(waiting));
                    }
                    return Ok(());
                };
                let Some(h) = self.held.take() else {
                    return Ok(());
                };
                self.gate_then_live(&h.v, Ok(h.recognizer), h.ready_at, false, Some(why))
                    .await
            }
            Until::Gate => {
                let Some(m) = self.held.as_ref().map(|h| h.v.manifest.clone()) else {
                    return Ok(());
                };
                let why = match self.gate(&m).await? {
                    Ok(why) => why,
                    Err(_) => return Ok(()),
                };
                let Some(h) = self.held.take() else {
                    return Ok(());
                };
                self.go_live(&h.v, Ok(h.recognizer), h.ready_at, false, Some(why))
                    .await
            }
        }
    }

    /// A checked release swapped in when due and recorded active, or its refusal recorded.
    async fn go_live(
        &mut self,
        v: &VerifiedManifest,
        checked: Result<crate::recognizer::Recognizer, String>,
        ready_at: jiff::Timestamp,
        repair: bool,
        gate: Option<switch::Why>,
    ) -> Result<(), SyncError> {
        let m = &v.manifest;
        let mut before = None;
        let result = match checked {
            Ok(recognizer) => {
                let due = if repair {
                    Ok(switch::Why::AtOnce)
                } else {
                    // A canary goes live on its own: the others wait for it, not it for them.
                    self.switch_when_due(v, gate == Some(switch::Why::Canary))
                        .await
                };
                self.set_ready(None);
                // Going live at once: the gate's reason is the one to show.
                let why = match (due?, gate) {
                    (switch::Why::AtOnce, Some(g)) => g,
                    (why, _) => why,
                };
                // The swap is published with the status that goes with it, in one change of the
                // watched snapshot (status documents read the active release while they hold the
                // snapshot): no reader sees the new release beside an error from the way to it,
                // which is over. The swap itself is one pointer store.
                let service = &self.service;
                // What the release it replaces served while it was live: its probation's yardstick.
                before = service.active().and_then(|a| service.health(a.version));
                self.status.send_modify(|s| {
                    service.swap(recognizer);
                    s.pending = None;
                    s.last_error = None;
                    s.disk_full = None;
                    s.last_switch = Some(deckhand_protocol::status::Switch {
                        version: m.version,
                        ready_at: ready_at.to_string(),
                        switched_at: jiff::Timestamp::now().to_string(),
                        why: why.to_string(),
                    });
                });
                Ok(())
            }
            Err(why) => {
                self.service.refuse(m.version, &v.id.to_string(), &why);
                Err(why)
            }
        };
        // Refused: nothing is pending any more (a swap cleared it with the swap).
        self.note_status(|s| {
            s.pending = None;
        });
        return_freed_memory();
        self.pending = None;
        match result {
            Ok(()) => {
                // Recording it active clears the pending envelope in the same commit: a power cut
                // before it resumes the release at the next start (it is accepted, so only resuming
                // reaches it).
                let v2 = v.clone();
                // The ledger notes it live as the commit starts; collecting what it replaced
                // follows in the same call and can take a while (a busy disk): the probation
                // counts from the first, as it does when it resumes after a restart.
                let recorded = std::time::Instant::now();
                let gc = self
                    .on_store(move |s| Ok(activation::record_active(s, &v2)?))
                    .await?;
                self.set_active_envelope(Some(v.envelope.clone()));
                tracing::info!(
                    version = m.version,
                    freed = gc.bytes_freed,
                    "release active"
                );
                if !repair {
                    // A newer release live clears a rejection of an older one.
                    if self
                        .rejected
                        .as_ref()
                        .is_some_and(|r| r.version < m.version)
                    {
                        self.rejected = None;
                    }
                    self.start_probation(v, before, recorded.elapsed());
                }
            }
            Err(why) => {
                self.on_store(|store| Ok(crate::ledger::Ledger::new(store).clear_pending()?))
                    .await?;
                tracing::error!(version = m.version, reason = %why, "release refused; the active release keeps serving");
            }
        }
        self.announce();
        Ok(())
    }

    /// Holds a ready release until it is due ([`deckhand_protocol::switch`]): not before the manifest's
    /// `not_before`, and when the shop switches together (and this agent does not go `alone`, as a
    /// canary does), until every live member is ready for it, one
    /// already serves it, or the deadline passed. Meanwhile this agent announces it ready, status says
    /// what it waits for, and a newer release announced by a peer ends the wait (superseded).
    pub(super) async fn switch_when_due(
        &mut self,
        v: &VerifiedManifest,
        alone: bool,
    ) -> Result<switch::Why, SyncError> {
        let m = &v.manifest;
        let plan = Plan {
            mode: if alone {
                Mode::AtOnce
            } else {
                m.activate.unwrap_or(self.cfg.activate)
            },
            not_before: m.not_before,
            deadline: self.cfg.activate_deadline,
        };
        let release = ReleaseRef {
            version: m.version,
            manifest: v.id,
        };
        // Judged by the trusted clock: a Pi whose clock is behind does not switch before not_before.
        let floor = self
            .on_store(|store| Ok(crate::ledger::Ledger::new(store).time_floor()?))
            .await?;
        if plan.mode == Mode::Together {
            self.set_ready(Some(release));
        }
        let mut since: Option<Instant> = None;
        loop {
            self.beat.beat();
            let members: Vec<(String, Member)> = self
                .peers
                .as_ref()
                .map(|n| n.usable())
                .unwrap_or_default()
                .into_iter()
                .map(|(id, h)| {
                    let state = if h.active == Some(release) {
                        Member::Serving
                    } else if h.ready == Some(release) {
                        Member::Ready
                    } else {
                        Member::NotReady
                    };
                    (id, state)
                })
                .collect();
            let states: Vec<Member> = members.iter().map(|(_, m)| *m).collect();
            let now = deckhand_protocol::clock::trusted_now(jiff::Timestamp::now(), floor);
            // The deadline runs on the monotonic clock, from when not_before (if any) had passed.
            if plan.not_before.is_some_and(|t| now < t) {
                since = None;
            } else if since.is_none() {
                since = Some(Instant::now());
            }
            let waited = since.map_or(Duration::ZERO, |s| s.elapsed());
            let left = match switch::decide(&plan, now, waited, &states) {
                Decision::Switch(why) => {
                    tracing::info!(version = m.version, why = %why, members = states.len(), "switching");
                    self.pending_update(|p| p.waiting = None);
                    return Ok(why);
                }
                Decision::Wait(left) => left,
            };
            let until = now
                .checked_add(
                    jiff::SignedDuration::try_from(left).unwrap_or(jiff::SignedDuration::MAX),
                )
                .unwrap_or(now);
            let waiting = match plan.not_before {
                Some(t) if now < t => format!("switching at {t} (the manifest's not_before)"),
                _ => {
                    let missing: Vec<&str> = members
                        .iter()
                        .filter(|(_, m)| *m == Member::NotReady)
                        .map(|(id, _)| id.as_str())
                        .collect();
                    format!(
                        "switching together: {} of {} agents ready, waiting for {}; at {until} at the latest",
                        states.len() + 1 - missing.len(),
                        states.len() + 1,
                        missing.join(", ")
                    )
                }
            };
            self.pending_update(|p| p.waiting = Some(waiting.clone()));
            if let Some((peer, newer)) = self.superseded(&release) {
                self.pending_update(|p| p.waiting = None);
                return Err(SyncError::Superseded {
                    version: m.version,
                    newer,
                    peer,
                });
            }
            tokio::time::sleep(left.min(SWITCH_POLL)).await;
        }
    }

    /// What this agent announces as ready to switch to.
    pub(super) fn set_ready(&mut self, release: Option<ReleaseRef>) {
        self.ready = release;
        self.announce();
    }
}

/// Hands the memory a finished download and a replaced release freed back to the system. glibc keeps
/// freed memory in its per-thread arenas, so without this an idle agent stays at its sync's high-water
/// mark (`deckhand bench footprint` shows the difference in anonymous RSS).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of glibc's own arenas; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
