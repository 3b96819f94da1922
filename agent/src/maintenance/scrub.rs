//! The background scrub: bit rot in the live release is found while the agent runs, not only by
//! `store verify` with the agent stopped.
//!
//! One owned thread re-hashes the blobs of the active and previous releases ([`Store::scrub_blob`]),
//! pass after pass, within a budget of bytes per hour (`scrub_per_hour`), at the idle I/O priority so
//! a recognition or a download never waits for it. A blob that no longer hashes to its id is
//! quarantined by the store and the sync engine is told, which fetches it again from peers or S3 as it
//! fetches any missing blob. Status shows the passes, the bytes checked and what was found.

use deckhand_protocol::status::ScrubStatus;
use deckhand_store::{Scrubbed, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The pause between passes when there is nothing to check (no active release yet).
const IDLE: Duration = Duration::from_secs(10);

/// The scrub thread, stopped (at once when it waits, after one 1 MiB read when it reads) when dropped or
/// stopped.
pub struct Scrubber {
    stop: Arc<AtomicBool>,
    /// Wakes the thread from its pause between reads (it sleeps on it, so an idle agent is not woken
    /// to look at its stop flag).
    wake: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    status: Arc<Mutex<ScrubStatus>>,
}

impl Scrubber {
    /// Starts scrubbing `store` at `per_hour` bytes an hour; each blob quarantined is sent on `found`
    /// (bounded; the engine looks at the whole release when it takes one).
    pub fn start(
        store: Store,
        per_hour: u64,
        found: tokio::sync::mpsc::Sender<()>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let status = Arc::new(Mutex::new(ScrubStatus {
            bytes_per_hour: per_hour,
            ..ScrubStatus::default()
        }));
        let run = Run {
            store,
            per_second: (per_hour as f64 / 3600.0).max(1.0),
            found,
            stop: stop.clone(),
            woken,
            status: status.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || run.run())?;
        Ok(Self {
            stop,
            wake: Some(wake),
            thread: Some(thread),
            status,
        })
    }

    /// A handle on the status, for the reports.
    pub fn status_handle(&self) -> Arc<Mutex<ScrubStatus>> {
        self.status.clone()
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the sender wakes a pause at once.
        self.wake.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the scrub thread panicked");
        }
    }
}

impl Drop for Scrubber {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Run {
    store: Store,
    per_second: f64,
    found: tokio::sync::mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    woken: Receiver<()>,
    status: Arc<Mutex<ScrubStatus>>,
}

impl Run {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d`, or until asked to stop (then false).
    fn sleep(&self, d: Duration) -> bool {
        if self.stopped() {
            return false;
        }
        match self.woken.recv_timeout(d) {
            Err(RecvTimeoutError::Timeout) => !self.stopped(),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    fn note(&self, f: impl FnOnce(&mut ScrubStatus)) {
        f(&mut crate::locks::lock(&self.status, "scrub status"));
    }

    fn run(self) {
        idle_io_priority();
        while !self.stopped() {
            let mut blobs = Vec::new();
            for pin in ["active", "previous"] {
                match self.store.pins(pin) {
                    Ok(ids) => blobs.extend(ids),
                    Err(e) => tracing::warn!(cause = %e, "scrub: cannot list the pinned blobs"),
                }
            }
            blobs.sort();
            blobs.dedup();
            let mut checked_any = false;
            for id in blobs {
                let mut pace = |n: u64| {
                    self.note(|s| s.bytes_checked += n);
                    self.sleep(Duration::from_secs_f64(n as f64 / self.per_second))
                };
                match self.store.scrub_blob(&id, &mut pace) {
                    Ok(Scrubbed::Sound { .. }) => checked_any = true,
                    Ok(Scrubbed::Absent) => {}
                    Ok(Scrubbed::Stopped) => return,
                    Ok(Scrubbed::Quarantined { why }) => {
                        checked_any = true;
                        tracing::error!(blob = %id, why, "scrub: bit rot in a stored blob; quarantined, to be fetched again");
                        self.note(|s| {
                            s.quarantined += 1;
                            s.last_found = Some(format!(
                                "blob {id} at {}: {why}; quarantined and fetched again",
                                jiff::Timestamp::now()
                            ));
                        });
                        // Full: the engine has a repair queued already, and it looks at every blob.
                        let _ = self.found.try_send(());
                    }
                    Err(e) => tracing::warn!(blob = %id, cause = %e, "scrub: cannot check a blob"),
                }
                if self.stopped() {
                    return;
                }
            }
            if checked_any {
                self.note(|s| {
                    s.passes += 1;
                    s.last_pass_at = Some(jiff::Timestamp::now().to_string());
                });
            } else if !self.sleep(IDLE) {
                return;
            }
        }
    }
}

/// Puts the calling thread in the idle I/O class (`ioprio_set`): its reads wait for every other
/// reader of the disk.
fn idle_io_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: ioprio_set takes three integers and touches no memory of ours; `0` names this thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if r != 0 {
        tracing::debug!(cause = %std::io::Error::last_os_error(), "scrub: cannot lower its I/O priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Voluntary context switches of this process's thread named `name` (each time it blocked).
    fn switches_of(name: &str) -> Option<u64> {
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            if comm.trim_end() != name {
                continue;
            }
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok());
        }
        None
    }

    #[test]
    fn between_reads_the_scrub_sleeps_without_waking_and_stops_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(dir.path().join("store"), deckhand_store::Options::default()).unwrap();
        let blob = store.import_bytes(&vec![7u8; 3 << 20]).unwrap().blob;
        store.set_pin("active", &[blob]).unwrap();
        let (found, _rx) = tokio::sync::mpsc::channel(1);
        // 1 MiB a day: after its first read, the thread pauses for hours.
        let scrubber = Scrubber::start(store, 24 << 20, found).unwrap();
        let status = scrubber.status_handle();
        let read_once = std::time::Instant::now();
        while status.lock().unwrap().bytes_checked == 0 {
            assert!(read_once.elapsed() < Duration::from_secs(30), "no read");
            std::thread::yield_now();
        }
        let before = switches_of("scrub").unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let after = switches_of("scrub").unwrap();
        // Sleeping in slices to look at a stop flag woke it ten times a second.
        assert!(after - before <= 1, "{} wake-ups in 1 s", after - before);
        let stopping = std::time::Instant::now();
        scrubber.stop();
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "stopped after {:?}",
            stopping.elapsed()
        );
    }
}
