//! Watching a bundle directory (a USB stick with `deckhand bundle export` output): when files in it change
//! and then stay quiet for a moment, the engine is told to look at it. The directory is also looked at
//! once at start, for a stick that was inserted before the agent started.

use notify::{RecursiveMode, Watcher as _};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

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
    pub fn start(dir: PathBuf, tx: mpsc::Sender<PathBuf>) -> Result<BundleWatcher, BundleError> {
        if !dir.is_dir() {
            return Err(BundleError::Watch {
                path: dir,
                why: "is not a directory".into(),
            });
        }
        let (ev_tx, ev_rx) = std::sync::mpsc::sync_channel::<()>(64);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
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
        std::thread::Builder::new()
            .name("deckhand-bundle".into())
            .spawn(move || {
                while ev_rx.recv().is_ok() {
                    // Debounce: wait until nothing happened for QUIET.
                    while ev_rx.recv_timeout(QUIET).is_ok() {}
                    if tx.blocking_send(dir.clone()).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| BundleError::Watch {
                path: PathBuf::new(),
                why: e.to_string(),
            })?;
        Ok(BundleWatcher { _watcher: watcher })
    }
}
