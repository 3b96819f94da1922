//! The peers' own status documents, for the shop page's fleet view: how far each Pi got with a pending
//! release is in its status, which it serves over QUIC ([`PeerNode::get_status`]). [`watch`] asks every
//! live peer for it every [`REFRESH`], but only while somebody looks (the page or `/v1/fleet` asked in
//! the last [`WATCHED`]), so an unwatched shop sends nothing more than before.

use super::PeerNode;
use deckhand_protocol::status::Status;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often live peers are asked for their status while watched.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How long after the last look peers are still asked.
pub const WATCHED: Duration = Duration::from_secs(30);

/// The latest status document of each live peer, while the fleet is watched. Cheap to clone.
#[derive(Clone, Default)]
pub struct PeerStatuses {
    latest: Arc<Mutex<HashMap<String, Status>>>,
    asked: Arc<Mutex<Option<Instant>>>,
}

impl PeerStatuses {
    /// Somebody looked at the fleet: keep the statuses fresh for [`WATCHED`].
    pub fn touch(&self) {
        {
            let mut a = crate::locks::lock(&self.asked, "asked");
            *a = Some(Instant::now());
        }
    }

    fn watched(&self) -> bool {
        crate::locks::lock(&self.asked, "asked").is_some_and(|t| t.elapsed() < WATCHED)
    }

    /// The latest status `peer` gave, if it is live and answered.
    pub fn get(&self, peer: &str) -> Option<Status> {
        crate::locks::lock(&self.latest, "peer statuses")
            .get(peer)
            .cloned()
    }

    fn replace(&self, fresh: HashMap<String, Status>) {
        {
            let mut l = crate::locks::lock(&self.latest, "latest");
            *l = fresh;
        }
    }
}

/// Asks every live peer for its status every [`REFRESH`] while the fleet is watched, until `stop`.
/// Each ask is bounded by the peer node's status timeout; they run concurrently.
pub async fn watch(
    node: PeerNode,
    statuses: PeerStatuses,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if !statuses.watched() {
            // Nobody looks: forget what peers said rather than show it stale later.
            statuses.replace(HashMap::new());
            continue;
        }
        let live: Vec<String> = node
            .peers()
            .into_iter()
            .filter(|p| p.live)
            .map(|p| p.id)
            .collect();
        let asks = live.into_iter().map(|id| {
            let node = node.clone();
            async move {
                let answer = node.get_status(&id).await;
                if let Err(e) = &answer {
                    tracing::debug!(peer = %id, cause = %e, "no status from the peer");
                }
                (id, answer.ok())
            }
        });
        let answers = tokio::select! {
            _ = stop.changed() => return,
            a = futures::future::join_all(asks) => a,
        };
        statuses.replace(
            answers
                .into_iter()
                .filter_map(|(id, s)| s.map(|s| (id, s)))
                .collect(),
        );
    }
}
