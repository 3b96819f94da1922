//! The inbox: images dropped into a directory are recognised, and each gets `<name>.json` in the outbox;
//! the image itself is moved to the outbox beside its answer.
//!
//! A file is read only once it is complete: on close-after-write or on being renamed into the inbox
//! (write to a temporary name, then rename, is the safe way to drop a file). Names starting with `.` or
//! ending in `.tmp`/`.part` are ignored. Files already present at start are processed first.

use crate::recognizer::service::{RecognizeError, Service};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

/// The most file events waiting; beyond this the watcher rescans the directory instead.
const EVENT_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch inbox {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

fn ignored(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return true;
    };
    name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with(".json")
}

/// Processes one image: writes `<outbox>/<name>.json` (atomically) and moves the image beside it.
pub fn process(service: &Service, path: &Path, outbox: &Path) -> Result<(), InboxError> {
    let io = |source| InboxError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let answer = match service.recognize_blocking(&bytes) {
        // Serialised from the struct, exactly as the HTTP answer is (no detour through f64 values).
        Ok(r) => serde_json::to_vec_pretty(&r).unwrap_or_default(),
        Err(RecognizeError::NoRelease) => {
            // Leave the image for later: it will be answered once a release is active.
            tracing::warn!(file = %path.display(), "no release active yet; leaving the image in the inbox");
            return Ok(());
        }
        Err(e) => serde_json::to_vec_pretty(&serde_json::json!({ "error": e.to_string() }))
            .unwrap_or_default(),
    };
    let json = outbox.join(format!("{name}.json"));
    let tmp = outbox.join(format!(".{name}.json.tmp"));
    std::fs::write(&tmp, answer).map_err(io)?;
    std::fs::rename(&tmp, &json).map_err(io)?;
    let moved = outbox.join(&name);
    if std::fs::rename(path, &moved).is_err() {
        // Another file system: copy, then remove.
        std::fs::copy(path, &moved).map_err(io)?;
        std::fs::remove_file(path).map_err(io)?;
    }
    Ok(())
}

fn scan(service: &Service, inbox: &Path, outbox: &Path) {
    let Ok(entries) = std::fs::read_dir(inbox) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && !ignored(p))
        .collect();
    paths.sort();
    for p in paths {
        if let Err(e) = process(service, &p, outbox) {
            tracing::error!(cause = %e, "inbox image failed");
        }
    }
}

/// What wakes the inbox thread: the file system, or the end. It sleeps on its queue in between.
enum Wake {
    Fs(notify::Result<notify::Event>),
    Stop,
}

/// A running inbox watcher; stops when dropped.
pub struct Inbox {
    stop: Option<SyncSender<Wake>>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Inbox {
    /// Watches `inbox`, answering into `outbox` (both are created if missing).
    pub fn start(service: Service, inbox: PathBuf, outbox: PathBuf) -> Result<Self, InboxError> {
        for d in [&inbox, &outbox] {
            std::fs::create_dir_all(d).map_err(|source| InboxError::Io {
                path: d.clone(),
                source,
            })?;
        }
        let (tx, rx) = sync_channel::<Wake>(EVENT_QUEUE);
        let stop_tx = tx.clone();
        let overflow = Arc::new(AtomicBool::new(false));
        let stopping = Arc::new(AtomicBool::new(false));
        let (flag, ending) = (overflow.clone(), stopping.clone());
        let mut watcher = notify::recommended_watcher(move |ev| {
            if let Err(TrySendError::Full(_)) = tx.try_send(Wake::Fs(ev)) {
                flag.store(true, Ordering::SeqCst);
            }
        })
        .map_err(|source| InboxError::Watch {
            path: inbox.clone(),
            source,
        })?;
        watcher
            .watch(&inbox, RecursiveMode::NonRecursive)
            .map_err(|source| InboxError::Watch {
                path: inbox.clone(),
                source,
            })?;
        let thread = std::thread::Builder::new()
            .name("deckhand-inbox".into())
            .spawn(move || {
                let _watcher = watcher;
                scan(&service, &inbox, &outbox);
                while !ending.load(Ordering::SeqCst) {
                    match rx.recv() {
                        Ok(Wake::Fs(Ok(ev))) => {
                            let complete = matches!(
                                ev.kind,
                                EventKind::Access(AccessKind::Close(AccessMode::Write))
                                    | EventKind::Modify(ModifyKind::Name(
                                        RenameMode::To | RenameMode::Both
                                    ))
                                    | EventKind::Create(CreateKind::Folder)
                            );
                            if complete {
                                for p in ev.paths.iter().filter(|p| p.is_file() && !ignored(p)) {
                                    if let Err(e) = process(&service, p, &outbox) {
                                        tracing::error!(cause = %e, "inbox image failed");
                                    }
                                }
                            }
                        }
                        Ok(Wake::Fs(Err(e))) => tracing::warn!(cause = %e, "inbox watch error"),
                        Ok(Wake::Stop) | Err(_) => break,
                    }
                    if overflow.swap(false, Ordering::SeqCst) {
                        scan(&service, &inbox, &outbox);
                    }
                }
            })
            .map_err(|source| InboxError::Io {
                path: PathBuf::from("<thread>"),
                source,
            })?;
        Ok(Self {
            stop: Some(stop_tx),
            stopping,
            thread: Some(thread),
        })
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // The thread ends after the image it is on, whatever is queued behind it. The send waits for
        // room in a full queue, which the thread drains; it fails at once if the thread has ended.
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(s) = self.stop.take() {
            let _ = s.send(Wake::Stop);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
