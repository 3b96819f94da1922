//! What this agent trusts to sign manifests: a fixed list of keys (`--trust`), or a deployment's trust
//! root (`--trust-root`), which the agent follows to newer roots published in the bucket
//! (`deckhand keys rotate`). The newest verified root is kept in the store (`crate::ledger`), so a restart does
//! not walk back to the installed one.

use deckhand_protocol::TrustPolicy;
use deckhand_protocol::floors::Epoch;
use deckhand_protocol::root::{RootError, TrustedRoot};
use std::sync::{Mutex, MutexGuard};

/// The most roots followed in one go (from the origin in one poll, from a peer, from a bundle); a Pi
/// further behind catches up over a few.
pub const MAX_ROOTS_FOLLOWED: usize = 32;

#[derive(Debug)]
pub struct Trust {
    state: Mutex<State>,
}

#[derive(Debug, Clone)]
enum State {
    Keys(TrustPolicy),
    Root(Box<TrustedRoot>),
}

impl Trust {
    pub fn keys(policy: TrustPolicy) -> Self {
        Self {
            state: Mutex::new(State::Keys(policy)),
        }
    }

    pub fn root(root: TrustedRoot) -> Self {
        Self {
            state: Mutex::new(State::Root(Box::new(root))),
        }
    }

    /// The state. Only a panic inside one of the short sections below could poison the lock, and each
    /// of them leaves the state whole (it is replaced by one assignment), so a poisoned lock is reported
    /// and its state used: root following never stops quietly.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| {
            tracing::error!("the trust state's lock was poisoned by a panic; its state is kept");
            poisoned.into_inner()
        })
    }

    fn state(&self) -> State {
        self.lock().clone()
    }

    /// The policy to check signatures of what was accepted before (stored, resumed, relayed by a peer).
    pub fn policy(&self) -> TrustPolicy {
        match self.state() {
            State::Keys(p) => p,
            State::Root(r) => r.policy_ignoring_expiry().clone(),
        }
    }

    /// The policy to admit a new manifest with at `now`: a root that expired admits nothing.
    pub fn admit_policy(&self, now: jiff::Timestamp) -> Result<TrustPolicy, RootError> {
        Ok(match self.state() {
            State::Keys(p) => p,
            State::Root(r) => r.policy_at(now)?.clone(),
        })
    }

    /// When the followed root expires (`None` with a fixed list of keys).
    pub fn root_expires_at(&self) -> Option<jiff::Timestamp> {
        match &*self.lock() {
            State::Keys(_) => None,
            State::Root(r) => Some(r.root().expires_at),
        }
    }

    /// The version of the root followed (`None` with a fixed list of keys).
    pub fn version(&self) -> Option<u64> {
        match &*self.lock() {
            State::Keys(_) => None,
            State::Root(r) => Some(r.version()),
        }
    }

    /// The version of the next root to look for, when following a root.
    pub fn next_root(&self) -> Option<u64> {
        match self.state() {
            State::Keys(_) => None,
            State::Root(r) => r.version().checked_add(1),
        }
    }

    /// Takes `envelope` as the next root if it is one. Returns the verified root for the caller to
    /// keep, with the floor epoch it starts if it changed the release keys (`None` when no root is
    /// followed: the agent trusts a fixed list of keys); the policy changes at once.
    pub fn advance(
        &self,
        envelope: &[u8],
    ) -> Result<Option<(TrustedRoot, Option<Epoch>)>, RootError> {
        let mut state = self.lock();
        let State::Root(current) = &*state else {
            return Ok(None);
        };
        let next = current.update(envelope)?;
        let epoch = next.epoch_after(current);
        *state = State::Root(Box::new(next.clone()));
        Ok(Some((next, epoch)))
    }
}

/// Where the next trust roots are read from: the origin (the bucket, or a bundle directory read as a
/// file origin: the same layout), or a peer that holds them.
pub enum RootSource<'a> {
    Origin(&'a dyn crate::origin::Origin),
    Peer {
        node: &'a crate::peer::PeerNode,
        peer: &'a str,
    },
}

impl RootSource<'_> {
    /// Root `version` of `deployment`, or `None` when the source does not hold it.
    async fn root(
        &self,
        deployment: &deckhand_protocol::layout::Name,
        version: u64,
    ) -> Result<Option<Vec<u8>>, super::SyncError> {
        use crate::origin::Fetched;
        match self {
            RootSource::Origin(origin) => {
                let key = origin.layout().trust_root(deployment, version);
                let limit = deckhand_protocol::envelope::MAX_ENVELOPE as u64;
                match origin.get_if_changed(&key, None, limit).await? {
                    Fetched::Changed { body, .. } => Ok(Some(body.to_vec())),
                    Fetched::NotModified | Fetched::Missing => Ok(None),
                }
            }
            RootSource::Peer { node, peer } => Ok(node.get_root(peer, version).await?),
        }
    }
}

/// What following the chain of roots at a source came to.
#[derive(Debug, Default)]
pub struct Followed {
    /// Roots taken (each kept in the store before it was used).
    pub taken: usize,
    /// The root that was refused, if one was: nothing after it was looked at.
    pub refused: Option<RootError>,
}

/// The one way roots are followed, from S3, a peer or a stick: one version at a time, at most
/// [`MAX_ROOTS_FOLLOWED`] in one go (a Pi further behind catches up over a few), each verified along
/// the chain ([`Trust::advance`]) and kept in the store by the ledger in one commit before the next is
/// looked at. A root that does not verify changes nothing and is returned for the caller to report.
pub async fn follow_roots(
    trust: &Trust,
    store: &deckhand_store::Store,
    deployment: &deckhand_protocol::layout::Name,
    source: &RootSource<'_>,
    from: &str,
) -> Result<Followed, super::SyncError> {
    let mut followed = Followed::default();
    for _ in 0..MAX_ROOTS_FOLLOWED {
        let Some(next) = trust.next_root() else {
            break;
        };
        let Some(body) = source.root(deployment, next).await? else {
            break;
        };
        let (root, epoch) = match trust.advance(&body) {
            Ok(Some(taken)) => taken,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(from, cause = %e, "a trust root was refused");
                followed.refused = Some(e);
                break;
            }
        };
        let (envelope, version, s) = (root.envelope().to_vec(), root.version(), store.clone());
        let deployment = root.root().deployment.clone();
        tokio::task::spawn_blocking(move || {
            crate::ledger::Ledger::new(&s).follow_root(
                version,
                &envelope,
                epoch.map(|e| (deployment.as_str(), e)),
            )
        })
        .await??;
        tracing::info!(
            version,
            from,
            keys = root.root().keys.len(),
            threshold = root.root().threshold,
            "trust root updated"
        );
        if let Some(e) = epoch {
            tracing::warn!(
                version,
                since = %e.since,
                "the trust root changed the release keys: the version and time floors start again from it"
            );
        }
        followed.taken += 1;
    }
    Ok(followed)
}
