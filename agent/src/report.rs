//! The agent's status documents (`/v1/status`, `/v1/fleet`, and what peers and the watchdog read),
//! assembled in one place.
//!
//! [`Sources`] takes one snapshot of each part that has something to say (the sync engine's status,
//! the recognizer service, the peer table, the store's usage and ledger); [`status`] and [`fleet`] are
//! pure functions of those snapshots, so what a document shows is decided here and nowhere else.

use crate::peer::PeerNode;
use crate::peer::statuses::PeerStatuses;
use crate::recognizer::service::Service;
use crate::sync::SyncStatus;
use deckhand_protocol::status::{
    ActiveRelease, FleetMember, FleetView, PeerInfo, Pending, RecentRecognition, RecognitionStats,
    Refusal, ReleaseSummary, Status,
};
use deckhand_store::Store;

/// Everything a status document shows, as read at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub agent_id: String,
    pub deployment: String,
    pub sync: SyncStatus,
    pub active: Option<ActiveRelease>,
    pub last_refused: Option<Refusal>,
    /// The durable time floor, when the system clock is behind it.
    pub clock_behind: Option<jiff::Timestamp>,
    pub bytes_served: u64,
    pub quic_listen: Option<String>,
    pub peers: Vec<PeerInfo>,
    pub recognitions: RecognitionStats,
    pub recent: Vec<RecentRecognition>,
    pub releases: Vec<ReleaseSummary>,
    /// The store's bytes (complete and partial) and its budget.
    pub store_bytes: Option<u64>,
    pub store_budget: Option<u64>,
}

/// `/v1/status`.
pub fn status(s: Snapshot) -> Status {
    Status {
        agent_id: s.agent_id,
        deployment: s.deployment,
        active: s.active,
        pending: s.sync.pending,
        offline_since: s.sync.offline_since,
        disk_full: s.sync.disk_full,
        last_error: s.sync.last_error,
        last_refused: s.last_refused,
        last_switch: s.sync.last_switch,
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
        Snapshot {
            agent_id: self.agent_id.clone(),
            deployment: self.deployment.clone(),
            sync,
            active: active.map(|r| ActiveRelease {
                version: r.version,
                manifest: r.manifest_id.to_string(),
                backend: r.backend().to_owned(),
                activated_at: r.activated_at().map(|t| t.to_string()),
            }),
            last_refused: self.service.last_refusal(),
            clock_behind: crate::ledger::Ledger::new(&self.store)
                .time_floor()
                .ok()
                .flatten()
                .filter(|f| *f > jiff::Timestamp::now()),
            bytes_served: metrics.served(),
            quic_listen: self.peers.as_ref().map(|p| p.listen_addr().to_string()),
            peers: self.peers.as_ref().map(|p| p.peers()).unwrap_or_default(),
            recognitions: metrics.recognition_stats(),
            recent: metrics.recent(),
            releases: crate::sync::activation::release_summaries(&self.store).unwrap_or_default(),
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
}
