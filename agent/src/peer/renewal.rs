//! Fleet credentials that change while the agent runs: a fleet bundle (`deckhand fleet renew|revoke|
//! rotate-ca|retire-ca`) read from the bucket at each poll, from a peer that announces a newer one, or
//! from a stick, is taken if it is newer and verifies ([`FleetCredentials::take`]); it is kept in the
//! store's ledger before it is used, and the QUIC endpoint switches to the new credentials without a
//! restart (the peer node follows [`Fleet::subscribe`]).

use super::anchors::Bundle;
use super::tls::{FleetCredentials, FleetError};
use deckhand_store::Store;
use std::sync::{Arc, Mutex};

/// This agent's fleet credentials, as they are now.
pub struct Fleet {
    current: Mutex<Arc<FleetCredentials>>,
    store: Store,
    /// The number of the bundle in force, changed after each bundle taken.
    changed: tokio::sync::watch::Sender<Option<u64>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("bundle", &*self.changed.borrow())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// The installed credentials with the bundle the ledger keeps (a bundle that no longer parses is
    /// ignored with a warning: the installed credentials still serve).
    pub fn new(installed: FleetCredentials, store: Store) -> Arc<Self> {
        let held = match crate::ledger::Ledger::new(&store).fleet_bundle() {
            Ok(Some(bytes)) => match Bundle::parse(&bytes) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(cause = %e, "the fleet bundle kept in the store does not parse; using the installed credentials");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(cause = %e, "cannot read the fleet bundle kept in the store");
                None
            }
        };
        let creds = installed.with_bundle(held);
        let (changed, _) = tokio::sync::watch::channel(creds.number());
        Arc::new(Fleet {
            current: Mutex::new(Arc::new(creds)),
            store,
            changed,
        })
    }

    pub fn current(&self) -> Arc<FleetCredentials> {
        crate::locks::lock(&self.current, "fleet credentials").clone()
    }

    /// The number of the bundle in force; changes each time one is taken.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<u64>> {
        self.changed.subscribe()
    }

    /// Offers a fleet bundle from `from` (the origin, a peer, a stick). Taken if it verifies and is
    /// newer than the one in force: kept in the store first, then used. `Ok(Some(n))`: taken, its
    /// number; `Ok(None)`: not newer. Blocking (one durable commit): call it off the runtime. Called
    /// by one task (the sync engine), so two offers never race.
    pub fn offer(&self, bytes: &[u8], from: &str) -> Result<Option<u64>, FleetError> {
        let bundle = Bundle::parse(bytes).map_err(|e| FleetError::Bundle(e.to_string()))?;
        // Offers come one at a time (from the sync engine); the lock is held only to swap, so status
        // and Hellos never wait for the store's commit.
        let Some(next) = self.current().take(bundle)? else {
            return Ok(None);
        };
        crate::ledger::Ledger::new(&self.store)
            .keep_fleet_bundle(bytes)
            .map_err(|e| FleetError::Bundle(format!("cannot keep it in the store: {e}")))?;
        let number = next.number();
        let (anchors, retired) = next.anchors();
        let (cert_expires, _) = next.not_after();
        tracing::info!(
            from,
            number,
            anchors = ?anchors,
            retired = ?retired,
            certificate_expires = ?cert_expires,
            "fleet bundle taken"
        );
        if let Err(e) = next.check() {
            tracing::warn!(cause = %e, "after the fleet bundle, this agent's certificate does not check");
        }
        *crate::locks::lock(&self.current, "fleet credentials") = Arc::new(next);
        self.changed.send_replace(number);
        Ok(number)
    }
}
