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
