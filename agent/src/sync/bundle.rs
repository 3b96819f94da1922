//! Watching a bundle directory (a USB stick with `deckhand bundle export` output): when files in it change
//! and then stay quiet for a moment, the engine is told to look at it. The directory is also looked at
//! once at start, for a stick that was inserted before the agent started.

use notify::{RecursiveMode, Watcher as _};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long the directory must stay quiet before it is read (a copy in progress keeps it busy).
const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle directory {path}: {why}")]
    Watch { path: PathBuf, why: String },
}

/// A running watcher. Dropping it stops watching.
pub struct BundleWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl BundleWatcher {
    /// Starts watching `dir`. The returned future tells `tx` about changes once they settle; the
    /// caller owns it (runs it on its task set) and it ends when `stop` turns true or the engine's end
    /// of `tx` closes.
    pub fn start(
        dir: PathBuf,
        tx: mpsc::Sender<PathBuf>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(BundleWatcher, impl Future<Output = ()> + Send + 'static), BundleError> {
        if !dir.is_dir() {
            return Err(BundleError::Watch {
                path: dir,
                why: "is not a directory".into(),
            });
        }
        let (ev_tx, mut ev_rx) = mpsc::channel::<()>(64);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| changes(&e)) {
                // Full: a wake-up is already queued, which is all this needs.
                let _ = ev_tx.try_send(());
            }
        })
        .map_err(|e| BundleError::Watch {
            path: dir.clone(),
            why: e.to_string(),
        })?;
        watcher
            .watch(&dir, RecursiveMode::Recursive)
            .map_err(|e| BundleError::Watch {
                path: dir.clone(),
                why: e.to_string(),
            })?;
        let _ = tx.try_send(dir.clone());
        let debounce = async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    ev = ev_rx.recv() => if ev.is_none() { return },
                }
                // Debounce: wait until nothing happened for QUIET.
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        ev = tokio::time::timeout(QUIET, ev_rx.recv()) => match ev {
                            Ok(Some(())) => {}
                            Ok(None) => return,
                            Err(_) => break,
                        },
                    }
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    sent = tx.send(dir.clone()) => if sent.is_err() { return },
                }
            }
        };
        Ok((BundleWatcher { _watcher: watcher }, debounce))
    }
}

/// Whether an event on the stick may have changed what it holds. Opening and reading a file do not
/// (closing one written does): the engine reading the bundle opens its files, and were that an event
/// it would read the stick again a second later, forever.
fn changes(e: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match e.kind {
        notify::EventKind::Access(a) => a == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

/// A bundle directory (`deckhand bundle export`: the origin's layout on a stick), read the one way
/// both the engine and `deckhand-agent import` take a release in from one: its trust roots first
/// ([`Bundle::follow_roots`]), then its current.json ([`Bundle::envelope`]), admitted by the caller,
/// then every blob of the release imported and checked ([`Bundle::import_blobs`]).
pub struct Bundle {
    dir: PathBuf,
    /// The directory read as a file origin (same layout as the bucket).
    origin: std::sync::Arc<dyn crate::origin::Origin>,
}

impl Bundle {
    pub async fn open(dir: &std::path::Path) -> Result<Bundle, super::SyncError> {
        let url = crate::origin::OriginUrl::File {
            root: dir.to_owned(),
        };
        let origin = crate::origin::connect(&url, &crate::origin::OriginConfig::default()).await?;
        Ok(Bundle {
            dir: dir.to_owned(),
            origin,
        })
    }

    pub fn label(&self) -> String {
        format!("bundle {}", self.dir.display())
    }

    /// Follows the trust roots the operator put in the bundle ([`super::trust::follow_roots`]).
    pub async fn follow_roots(
        &self,
        trust: &super::trust::Trust,
        store: &deckhand_store::Store,
        deployment: &deckhand_protocol::layout::Name,
    ) -> Result<super::trust::Followed, super::SyncError> {
        let source = super::trust::RootSource::Origin(self.origin.as_ref());
        super::trust::follow_roots(trust, store, deployment, &source, &self.label()).await
    }

    /// The deployment's current.json in the bundle (`None` if it has none), read only up to
    /// [`deckhand_protocol::envelope::MAX_ENVELOPE`]: a stick is not trusted to be small.
    pub async fn envelope(
        &self,
        deployment: &deckhand_protocol::layout::Name,
    ) -> Result<Option<Vec<u8>>, super::SyncError> {
        let layout = deckhand_protocol::layout::Layout::new("")?;
        let current = self.dir.join(layout.current(deployment));
        super::read_capped(&current, deckhand_protocol::envelope::MAX_ENVELOPE).await
    }

    /// The fleet bundle on the stick (`None` if it has none), read only up to
    /// [`deckhand_protocol::wire::MAX_FLEET_BUNDLE`].
    pub async fn fleet(&self) -> Result<Option<Vec<u8>>, super::SyncError> {
        let layout = deckhand_protocol::layout::Layout::new("")?;
        let path = self.dir.join(layout.fleet());
        super::read_capped(&path, deckhand_protocol::wire::MAX_FLEET_BUNDLE).await
    }

    /// Imports every blob of the admitted release `m` from the bundle into the store, each checked
    /// against the manifest. Returns the bytes imported (blobs the store held already are skipped).
    pub async fn import_blobs(
        &self,
        store: &deckhand_store::Store,
        m: &deckhand_protocol::Manifest,
    ) -> Result<u64, super::SyncError> {
        let (store, dir, m) = (store.clone(), self.dir.clone(), m.clone());
        let imported =
            tokio::task::spawn_blocking(move || super::activation::import_bundle(&store, &dir, &m))
                .await??;
        Ok(imported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reading_the_stick_does_not_wake_the_engine_and_writing_it_does() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("current.json"), b"{}").unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let (_stop_tx, stop) = watch::channel(false);
        let (_watcher, debounce) = BundleWatcher::start(dir.path().to_owned(), tx, stop).unwrap();
        let task = tokio::spawn(debounce);
        // The look at start.
        assert_eq!(rx.recv().await.as_deref(), Some(dir.path()));
        // The engine reads the bundle: nothing to look at again (it looked at it every second).
        for _ in 0..3 {
            std::fs::read(dir.path().join("current.json")).unwrap();
        }
        let woke = tokio::time::timeout(QUIET * 3, rx.recv()).await;
        assert!(woke.is_err(), "reading the stick woke the engine: {woke:?}");
        // A new release copied on: looked at once it settles.
        std::fs::write(dir.path().join("current.json"), b"{\"v\": 2}").unwrap();
        assert_eq!(rx.recv().await.as_deref(), Some(dir.path()));
        task.abort();
    }
}
