//! Where a release comes from besides the origin's current.json: a peer announcing a newer one (it
//! relays its verified envelope and the trust roots behind it), a bundle directory, and the chunk maps a
//! download needs (the store, a peer holding the release, the origin). What a peer relays is judged by
//! the download's own rule ([`FetchConfig::judge`]).

use super::{Engine, SyncError, Via, bundle, trust};
use crate::metrics::Source;
use crate::peer::Hint;
use deckhand_protocol::ChunkMap;
use deckhand_protocol::fetch::{FetchConfig, Judgement, PeerFailure, Verdict};
use deckhand_protocol::manifest::BlobRef;
use deckhand_protocol::wire::ReleaseRef;
use std::time::Instant;

impl Engine {
    /// Follows the deployment's trust root to the newest one `source` holds ([`trust::follow_roots`]).
    /// A root that does not verify is refused, named in status, and changes nothing.
    pub(super) async fn follow_roots(
        &self,
        source: trust::RootSource<'_>,
        from: &str,
    ) -> Result<(), SyncError> {
        let followed = trust::follow_roots(
            &self.cfg.trust,
            &self.store,
            &self.cfg.deployment,
            &source,
            from,
        )
        .await?;
        if let Some(e) = followed.refused {
            self.note_status(|s| s.last_refused_manifest = Some(format!("from {from}: {e}")));
        }
        if followed.taken > 0 {
            // Peers behind on roots learn of the rotation from our Hello.
            self.announce();
        }
        Ok(())
    }

    /// Offers a fleet bundle to this agent's credentials ([`crate::peer::renewal::Fleet::offer`]):
    /// taken if it verifies and is newer. One that does not verify is logged with why; nothing changes.
    pub(super) async fn offer_fleet(&self, bytes: Vec<u8>, from: String) {
        let Some(fleet) = self.peers.as_ref().map(|p| p.fleet().clone()) else {
            return;
        };
        let label = from.clone();
        match tokio::task::spawn_blocking(move || fleet.offer(&bytes, &from)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(from = %label, cause = %e, "a fleet bundle was refused"),
            Err(e) => tracing::warn!(from = %label, cause = %e, "offering a fleet bundle failed"),
        }
    }

    /// The fleet bundle in the bucket, when it changed since the last poll.
    pub(super) async fn fleet_from_origin(&mut self, origin: &dyn crate::origin::Origin) {
        use crate::origin::Fetched;
        if self.peers.is_none() {
            return;
        }
        let key = origin.layout().fleet();
        let limit = deckhand_protocol::wire::MAX_FLEET_BUNDLE as u64;
        match origin
            .get_if_changed(&key, self.fleet_etag.as_deref(), limit)
            .await
        {
            Ok(Fetched::Changed { body, etag }) => {
                self.offer_fleet(body.to_vec(), "the origin".into()).await;
                self.fleet_etag = etag;
            }
            Ok(Fetched::NotModified | Fetched::Missing) => {}
            Err(e) => tracing::debug!(cause = %e, "cannot read the fleet bundle from the origin"),
        }
    }

    /// The fleet bundle of a peer that announced a newer one.
    pub(super) async fn fleet_from_peer(&self, peer: &str) {
        let Some(node) = &self.peers else {
            return;
        };
        match node.get_fleet(peer).await {
            Ok(Some(bytes)) => self.offer_fleet(bytes, format!("peer {peer}")).await,
            Ok(None) => {}
            Err(e) => tracing::debug!(peer, cause = %e, "cannot get the fleet bundle from a peer"),
        }
    }

    pub(super) async fn release_from_peer(&mut self, h: &Hint) -> Result<(), SyncError> {
        let Some(node) = &self.peers else {
            return Ok(());
        };
        // Rotations first: the peer may relay a manifest signed by a key of a newer root.
        let source = trust::RootSource::Peer {
            node,
            peer: &h.peer,
        };
        self.follow_roots(source, &format!("peer {}", h.peer))
            .await?;
        let envelope = node.get_manifest(&h.peer).await?;
        // A fleet member that relays a forged manifest, or announces one version and relays an older
        // one (a replay), is lying: banned.
        match self.cfg.trust.policy().verify_ignoring_expiry(&envelope) {
            Ok(v) if v.manifest.version < h.version => self.judge(
                &h.peer,
                PeerFailure::Corrupt,
                &format!(
                    "announced version {} but relayed version {}",
                    h.version, v.manifest.version
                ),
            ),
            Ok(_) => {}
            Err(e) => self.judge(
                &h.peer,
                PeerFailure::Corrupt,
                &format!("relayed a manifest that does not verify: {e}"),
            ),
        }
        let from = Via::Peer(h.peer.clone());
        match self.admit(&envelope, &from).await {
            Ok(Some(v)) => self.fetch_and_activate(&v, from).await,
            Ok(None) => Ok(()),
            Err(e) => {
                tracing::warn!(peer = %h.peer, cause = %e, "a peer relayed a manifest that does not verify");
                Err(e)
            }
        }
    }

    /// A release from a bundle directory, taken in as `deckhand-agent import` does ([`bundle::Bundle`]):
    /// roots, then the manifest admitted, then the blobs imported; then fetched (nothing is missing)
    /// and activated. A root the stick carries that does not verify is named in status.
    pub(super) async fn release_from_bundle(
        &mut self,
        dir: &std::path::Path,
    ) -> Result<(), SyncError> {
        let bundle = bundle::Bundle::open(dir).await?;
        if let Some(bytes) = bundle.fleet().await? {
            self.offer_fleet(bytes, bundle.label()).await;
        }
        let followed = bundle
            .follow_roots(&self.cfg.trust, &self.store, &self.cfg.deployment)
            .await?;
        if let Some(e) = followed.refused {
            let from = bundle.label();
            self.note_status(|s| s.last_refused_manifest = Some(format!("from {from}: {e}")));
        }
        let Some(envelope) = bundle.envelope(&self.cfg.deployment).await? else {
            return Ok(());
        };
        let from = Via::Bundle(dir.to_owned());
        let Some(v) = self.admit(&envelope, &from).await? else {
            return Ok(());
        };
        let bytes = bundle.import_blobs(&self.store, &v.manifest).await?;
        self.service.metrics().sync_bytes(Source::Local, bytes);
        self.note_status(|s| s.bytes_from_bundles += bytes);
        self.fetch_and_activate(&v, from).await
    }

    /// Usable peers, each with whether it shares the origin fetches of `release`: it wants the release
    /// too and can reach the origin. Any peer may hold chunks of it (from an older release, say), so all
    /// are asked for bitmaps.
    pub(super) fn sharing(&self, release: &ReleaseRef) -> Vec<(String, bool)> {
        let Some(node) = &self.peers else {
            return Vec::new();
        };
        node.usable()
            .into_iter()
            .map(|(id, h)| {
                let wants = h.pending.is_some_and(|r| r.manifest == release.manifest);
                (id, wants && h.origin)
            })
            .collect()
    }

    /// A usable peer announcing a release newer than `release` under our root (or a newer one):
    /// downloading it is pointless.
    pub(super) fn superseded(&self, release: &ReleaseRef) -> Option<(String, u64)> {
        let node = self.peers.as_ref()?;
        let root = self.cfg.trust.version();
        node.usable().into_iter().find_map(|(id, h)| {
            h.announces_newer(release.version, root)
                .then(|| (id, h.newest().unwrap_or(0)))
        })
    }

    pub(super) async fn chunk_map(
        &mut self,
        b: &BlobRef,
        release: &ReleaseRef,
    ) -> Result<ChunkMap, SyncError> {
        let id = b.chunk_map;
        if let Ok(m) = self
            .on_store(move |store| Ok(store.read_chunk_map(&id)?))
            .await
        {
            return Ok(m);
        }
        let mut last: Option<SyncError> = None;
        if let Some(node) = &self.peers {
            for (peer, _) in self.sharing(release) {
                match node.get_chunk(&peer, &b.chunk_map).await {
                    Ok(bytes) => {
                        let bytes = self.put_raw(b.chunk_map, bytes).await?;
                        return ChunkMap::decode(&bytes).map_err(|source| SyncError::ChunkMap {
                            id: b.chunk_map,
                            source,
                        });
                    }
                    Err(e) => {
                        self.judge(&peer, e.failure(), &e.to_string());
                        last = Some(e.into());
                    }
                }
            }
        }
        if let Some(origin) = &self.cfg.origin
            && self.origin_usable()
        {
            let key = origin.layout().blob(&b.chunk_map);
            match origin
                .get_capped(&key, deckhand_protocol::chunk::max_encoded_len(b.size))
                .await
            {
                Ok(bytes) => {
                    self.origin_ok();
                    let bytes = self.put_raw(b.chunk_map, bytes.to_vec()).await?;
                    self.account(Source::Origin, bytes.len() as u64);
                    return ChunkMap::decode(&bytes).map_err(|source| SyncError::ChunkMap {
                        id: b.chunk_map,
                        source,
                    });
                }
                Err(e) => {
                    self.origin_failed(&e);
                    last = Some(e.into());
                }
            }
        }
        Err(last.unwrap_or(SyncError::ChunkMapUnavailable(b.chunk_map)))
    }

    /// The download rules this agent runs with ([`deckhand_protocol::fetch`]): the one home of every
    /// duration a download, a verdict on a peer or the origin's backoff takes.
    pub(super) fn fetch_config(&self) -> FetchConfig {
        let me = self
            .peers
            .as_ref()
            .map_or(self.cfg.agent_id.clone(), |n| n.me().to_owned());
        let mut fc = FetchConfig::new(me);
        fc.has_origin = self.cfg.origin.is_some();
        fc.max_wait = self.cfg.max_wait;
        fc.gather = self.cfg.gather;
        fc
    }

    /// Judges a peer for a failed request outside a download (a chunk map, a relayed manifest) by the
    /// download's own rule ([`FetchConfig::judge`]).
    pub(super) fn judge(&self, peer: &str, failure: PeerFailure, why: &str) {
        if let Some(j) = self.fetch_config().judge(peer, failure) {
            self.record_judgement(&j, why);
        }
    }

    /// Logs, counts and records a verdict passed on a peer; the peer node enforces it from then on.
    pub(super) fn record_judgement(&self, j: &Judgement, why: &str) {
        let Some(node) = &self.peers else { return };
        match j.verdict {
            Verdict::Banned => {
                tracing::warn!(peer = %j.peer, reason = why, ban_secs = j.lasts.as_secs(), "peer banned");
                self.service.metrics().peer_banned();
            }
            Verdict::SetAside => {
                tracing::info!(peer = %j.peer, reason = why, secs = j.lasts.as_secs(), "peer set aside");
            }
        }
        node.verdicts().record(j, why, Instant::now());
    }
}
