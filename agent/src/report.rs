//! The agent's status documents (`/v1/status`, `/v1/fleet`, and what peers and the watchdog read),
//! assembled in one place.
//!
//! [`Sources`] takes one snapshot of each part that has something to say (the sync engine's status,
//! the recognizer service, the peer table, the store's usage and ledger); [`status`] and [`fleet`] are
//! pure functions of those snapshots, so what a document shows is decided here and nowhere else.

use crate::peer::PeerNode;
use crate::peer::renewal::Fleet;
use crate::peer::statuses::PeerStatuses;
use crate::recognizer::service::Service;
use crate::sync::SyncStatus;
use crate::sync::trust::Trust;
use deckhand_protocol::clock::{WARN_BEFORE, expiry_warning, manifest_warn_before};
use deckhand_protocol::status::{
    ActiveRelease, Expiry, FleetMember, FleetView, PeerInfo, Pending, RecentRecognition,
    RecognitionStats, Refusal, ReleaseSummary, Status,
};
use deckhand_store::Store;
use jiff::Timestamp;
use std::sync::Arc;

/// Everything a status document shows, as read at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub agent_id: String,
    pub deployment: String,
    pub sync: SyncStatus,
    pub active: Option<ActiveRelease>,
    pub last_refused: Option<Refusal>,
    /// The trusted now (the later of the system clock and the time floor).
    pub now: Timestamp,
    /// The durable time floor, when the system clock is behind it.
    pub clock_behind: Option<Timestamp>,
    /// The durable time floor: the newest `created_at` verified.
    pub time_floor: Option<Timestamp>,
    /// When this Pi's fleet certificate, the fleet CA, the followed trust root and the active manifest
    /// expire.
    pub certificate_expires: Option<Timestamp>,
    pub ca_expires: Option<Timestamp>,
    pub root_expires: Option<Timestamp>,
    /// The active manifest's `created_at` and `expires_at`.
    pub manifest_dates: Option<(Timestamp, Timestamp)>,
    /// Why this agent is not a fleet member, when it is not.
    pub fleet_error: Option<String>,
    pub fleet_trust: Option<deckhand_protocol::status::FleetTrust>,
    pub dial_table: Option<deckhand_protocol::status::DialTable>,
    /// What the store repaired at open ([`store_repair`]).
    pub store_repair: Option<String>,
    pub scrub: Option<deckhand_protocol::status::ScrubStatus>,
    pub events: Option<deckhand_protocol::status::EventsStatus>,
    pub cameras: Vec<deckhand_protocol::status::CameraStatus>,
    pub bytes_served: u64,
    pub quic_listen: Option<String>,
    pub peers: Vec<PeerInfo>,
    pub recognitions: RecognitionStats,
    pub recent: Vec<RecentRecognition>,
    pub releases: Vec<ReleaseSummary>,
    /// The agent's own fall back from a release, until the next goes live.
    pub fallback: Option<deckhand_protocol::status::Fallback>,
    /// The release this agent will not take.
    pub rejected: Option<deckhand_protocol::status::Rejected>,
    /// The store's bytes (complete and partial) and its budget.
    pub store_bytes: Option<u64>,
    pub store_budget: Option<u64>,
}

/// `/v1/status`.
pub fn status(s: Snapshot) -> Status {
    let manifest_lead = s
        .manifest_dates
        .map(|(created, expires)| manifest_warn_before(created, expires));
    let expiries = [
        ("certificate", s.certificate_expires, WARN_BEFORE),
        ("fleet CA", s.ca_expires, WARN_BEFORE),
        ("trust root", s.root_expires, WARN_BEFORE),
        (
            "manifest",
            s.manifest_dates.map(|(_, expires)| expires),
            manifest_lead.unwrap_or(WARN_BEFORE),
        ),
    ]
    .into_iter()
    .filter_map(|(what, at, lead)| {
        at.map(|at| Expiry {
            what: what.to_owned(),
            expires_at: at.to_string(),
            warning: expiry_warning(what, at, s.now, lead),
        })
    })
    .collect();
    Status {
        expiries,
        newest_manifest_at: s.time_floor.map(|t| t.to_string()),
        fleet_error: s.fleet_error,
        fleet_trust: s.fleet_trust,
        dial_table: s.dial_table,
        store_repair: s.store_repair,
        scrub: s.scrub,
        events: s.events,
        cameras: s.cameras,
        agent_id: s.agent_id,
        deployment: s.deployment,
        active: s.active,
        pending: s.sync.pending,
        offline_since: s.sync.offline_since,
        disk_full: s.sync.disk_full,
        last_error: s.sync.last_error,
        last_refused: s.last_refused,
        last_switch: s.sync.last_switch,
        fallback: s.fallback,
        shadow: s.sync.shadow,
        probation: s.sync.probation,
        origin_polls: s.sync.origin_polls,
        rejected: s.rejected,
        clock_behind_trusting: s.clock_behind.map(|f| f.to_string()),
        last_refused_manifest: s.sync.last_refused_manifest,
        bytes_from_peers: s.sync.bytes_from_peers,
        bytes_from_origin: s.sync.bytes_from_origin,
        bytes_from_bundles: s.sync.bytes_from_bundles,
        bytes_served: s.bytes_served,
        quic_listen: s.quic_listen,
        peers: s.peers,
        recognitions: Some(s.recognitions),
        recent: s.recent,
        releases: s.releases,
        store_bytes: s.store_bytes,
        store_budget: s.store_budget,
    }
}

/// `/v1/fleet`: this agent first, then every peer it knows; a live peer's progress on a pending
/// release comes from the status document it served (`progress_of`).
pub fn fleet(s: Status, progress_of: impl Fn(&str) -> Option<Pending>) -> FleetView {
    let mut agents = vec![FleetMember {
        id: s.agent_id,
        is_self: true,
        live: true,
        active: s.active.map(|a| a.version),
        pending: s.pending.as_ref().map(|p| p.version),
        bytes_from_peers: s.bytes_from_peers,
        bytes_from_origin: s.bytes_from_origin,
        last_error: s.last_error,
        progress: s.pending,
        reaches_origin: Some(s.offline_since.is_none()),
        ..FleetMember::default()
    }];
    agents.extend(s.peers.into_iter().map(|p| FleetMember {
        progress: p.live.then(|| progress_of(&p.id)).flatten(),
        id: p.id,
        is_self: false,
        live: p.live,
        addr: Some(p.addr),
        active: p.active,
        pending: p.pending,
        banned: p.banned,
        bytes_from: p.bytes_from,
        bytes_to: p.bytes_to,
        last_error: p.last_error,
        reaches_origin: p.origin,
        last_seen: p.last_seen,
        banned_until: p.banned_until,
        ..FleetMember::default()
    }));
    FleetView {
        deployment: s.deployment,
        agents,
    }
}

/// Where a snapshot is read from.
#[derive(Clone)]
pub struct Sources {
    pub agent_id: String,
    pub deployment: String,
    /// What the sync engine publishes.
    pub sync: tokio::sync::watch::Receiver<SyncStatus>,
    pub service: Service,
    pub peers: Option<PeerNode>,
    pub store: Store,
    pub trust: Arc<Trust>,
    /// This agent's fleet credentials, or why they did not load (neither with no `--fleet-*`).
    pub fleet: Result<Option<Arc<Fleet>>, String>,
    /// The background scrub's progress, when it runs.
    pub scrub: Option<Arc<std::sync::Mutex<deckhand_protocol::status::ScrubStatus>>>,
    /// The recognition event log and its sinks.
    pub events: Option<crate::events::Events>,
    /// The counter's cameras.
    pub cameras: Vec<Arc<crate::camera::CameraState>>,
}

impl Sources {
    /// Reads every part once. The active release is read while the engine's snapshot is held, and the
    /// engine publishes a swap with its status in one change: a document never shows the new release
    /// beside the old one's errors or progress.
    pub fn snapshot(&self) -> Snapshot {
        let (sync, active) = {
            let sync = self.sync.borrow();
            (sync.clone(), self.service.active())
        };
        let usage = self.store.usage().ok();
        let metrics = self.service.metrics();
        let system = Timestamp::now();
        let time_floor = crate::ledger::Ledger::new(&self.store)
            .time_floor()
            .ok()
            .flatten();
        let releases = crate::sync::activation::release_summaries(&self.store).unwrap_or_default();
        let manifest_dates = releases
            .iter()
            .find(|r| r.role == "active")
            .and_then(|r| Some((r.created_at.parse().ok()?, r.expires_at.parse().ok()?)));
        let creds = self
            .fleet
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .map(|f| f.current());
        let (certificate_expires, ca_expires) = match &creds {
            Some(creds) => creds.not_after(),
            None => (None, None),
        };
        let fleet_error = match (&self.fleet, &creds) {
            (_, Some(creds)) => creds.check().err().map(|e| e.to_string()),
            (Err(e), None) => Some(e.clone()),
            (Ok(_), None) => None,
        };
        let active_version = active.as_ref().map(|r| r.version);
        Snapshot {
            now: deckhand_protocol::clock::trusted_now(system, time_floor),
            time_floor,
            certificate_expires,
            ca_expires,
            root_expires: self.trust.root_expires_at(),
            manifest_dates,
            fleet_error,
            fleet_trust: creds.map(|c| c.trust()),
            dial_table: self.peers.as_ref().map(|p| p.dial_table()),
            store_repair: store_repair(self.store.recovery()),
            scrub: self
                .scrub
                .as_ref()
                .map(|s| crate::locks::lock(s, "scrub status").clone()),
            events: self.events.as_ref().map(|e| e.status()),
            cameras: crate::camera::statuses(&self.cameras),
            agent_id: self.agent_id.clone(),
            deployment: self.deployment.clone(),
            sync,
            active: active.map(|r| ActiveRelease {
                version: r.version,
                manifest: r.manifest_id.to_string(),
                backend: r.backend().to_owned(),
                engine: Some(r.engine().to_owned()),
                activated_at: r.activated_at().map(|t| t.to_string()),
            }),
            last_refused: self.service.last_refusal(),
            clock_behind: time_floor.filter(|f| *f > system),
            bytes_served: metrics.served(),
            quic_listen: self.peers.as_ref().map(|p| p.listen_addr().to_string()),
            peers: self.peers.as_ref().map(|p| p.peers()).unwrap_or_default(),
            recognitions: metrics.recognition_stats(),
            recent: metrics.recent(),
            releases,
            // A fall back lasts until the next release goes live; that release is swapped in just
            // before the ledger records it (and clears the fall back), so one the live release is not
            // the end of is over already.
            fallback: crate::ledger::Ledger::new(&self.store)
                .fallback()
                .ok()
                .flatten()
                .filter(|f| active_version == Some(f.to_version)),
            rejected: crate::ledger::Ledger::new(&self.store)
                .rejected()
                .ok()
                .flatten(),
            store_bytes: usage.as_ref().map(|u| u.complete_bytes + u.partial_bytes),
            store_budget: usage.as_ref().and_then(|u| u.budget),
        }
    }

    pub fn status(&self) -> Status {
        status(self.snapshot())
    }

    /// The fleet view; marks the fleet watched, so peers' statuses are kept fresh.
    pub fn fleet(&self, peer_statuses: &PeerStatuses) -> FleetView {
        peer_statuses.touch();
        fleet(self.status(), |id| {
            peer_statuses.get(id).and_then(|st| st.pending)
        })
    }
}

/// What the store repaired at open, for status: `None` when it was only the routine recovery of an
/// interrupted run.
pub fn store_repair(r: &deckhand_store::Recovery) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(b) = &r.rebuilt {
        let what = match (&b.set_aside, &b.why) {
            (Some(aside), Some(why)) => format!(
                "the catalog was damaged ({why}) and is kept at {}",
                aside.display()
            ),
            _ => "the catalog was missing".to_owned(),
        };
        parts.push(format!(
            "{what}; rebuilt from {} blob(s) on disk ({} bytes, each hashed), {} quarantined; {}",
            b.blobs_adopted,
            b.bytes_adopted,
            b.blobs_quarantined,
            if b.from_mirror {
                "floors, trust roots and releases restored from the mirror"
            } else {
                "no mirror: floors and releases start again"
            }
        ));
    }
    if r.reserve_released {
        parts.push(format!(
            "the disk was full: the store released its {} MiB reserve to open",
            deckhand_store::RESERVE_BYTES >> 20
        ));
    }
    if r.partials_dropped > 0 {
        parts.push(format!(
            "{} partial download(s) dropped: no room to recreate them (the disk is full)",
            r.partials_dropped
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_puts_this_agent_first_and_takes_a_peers_progress_only_while_it_is_live() {
        let pending = Pending {
            version: 3,
            bytes_total: 10,
            bytes_have: 4,
            ..Pending::default()
        };
        let peer = |id: &str, live: bool| PeerInfo {
            id: id.into(),
            addr: "10.0.0.2:4433".into(),
            live,
            ..PeerInfo::default()
        };
        let s = status(Snapshot {
            agent_id: "me".into(),
            deployment: "shop".into(),
            peers: vec![peer("a", true), peer("b", false)],
            ..Snapshot::default()
        });
        assert!(s.recognitions.is_some());
        let view = fleet(s, |_| Some(pending.clone()));
        let ids: Vec<_> = view
            .agents
            .iter()
            .map(|a| (a.id.as_str(), a.is_self))
            .collect();
        assert_eq!(ids, [("me", true), ("a", false), ("b", false)]);
        assert_eq!(
            view.agents[1].progress.as_ref().map(|p| p.bytes_have),
            Some(4)
        );
        assert_eq!(
            view.agents[2].progress, None,
            "a peer gone shows no stale progress"
        );
        assert_eq!(view.agents[0].reaches_origin, Some(true));
    }

    #[test]
    fn what_expires_within_thirty_days_is_warned_of() {
        let now: Timestamp = "2027-06-01T00:00:00Z".parse().unwrap();
        let days = |d: i64| Some(now + jiff::SignedDuration::from_hours(d * 24));
        let s = status(Snapshot {
            now,
            certificate_expires: days(12),
            ca_expires: days(3000),
            root_expires: days(-2),
            manifest_dates: days(-9).zip(days(31)),
            time_floor: days(-40),
            ..Snapshot::default()
        });
        let warned: Vec<_> = s
            .expiries
            .iter()
            .map(|e| (e.what.as_str(), e.warning.is_some()))
            .collect();
        assert_eq!(
            warned,
            [
                ("certificate", true),
                ("fleet CA", false),
                ("trust root", true),
                ("manifest", false)
            ]
        );
        assert_eq!(
            s.expiries[0].warning.as_deref(),
            Some("certificate expires in 12 days (2027-06-13T00:00:00Z)")
        );
        assert_eq!(
            s.newest_manifest_at.as_deref(),
            Some("2027-04-22T00:00:00Z")
        );
        let line = s.summary_line();
        assert!(line.contains("certificate expires in 12 days"), "{line}");
        assert!(line.contains("trust root expired 2 days ago"), "{line}");
    }
}
