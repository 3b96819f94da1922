//! Being a good systemd citizen (`Type=notify`): `READY=1` once the HTTP API listens (with or without an
//! active release), `STATUS=` one human line whenever it changes, `WATCHDOG=1` at half of
//! `WATCHDOG_USEC` but only while the inference thread and the sync loop are alive, so a hung inference
//! thread gets the agent restarted, and `STOPPING=1` on shutdown. Without `NOTIFY_SOCKET` (not under
//! systemd) every message is dropped, and the status loop does not run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The inference thread counts as wedged once inside one batch for this long (a batch takes
/// milliseconds on a Hailo-8 and well under a second on a Pi's CPU).
pub const INFERENCE_LIMIT: Duration = Duration::from_secs(10);
/// The sync loop counts as hung once it has not gone round for this long (its longest single step is a
/// bounded network call or loading a release).
pub const SYNC_LIMIT: Duration = Duration::from_secs(120);
/// How often the status line is looked at when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// A loop's heartbeat: when it last went round. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Beat(Arc<(Instant, AtomicU64)>);

impl Default for Beat {
    fn default() -> Self {
        Beat(Arc::new((Instant::now(), AtomicU64::new(0))))
    }
}

impl Beat {
    /// The loop went round now.
    pub fn beat(&self) {
        let ms = self.0.0.elapsed().as_millis() as u64;
        self.0.1.store(ms, Ordering::Relaxed);
    }

    /// How long ago it last went round.
    pub fn since(&self) -> Duration {
        let last = Duration::from_millis(self.0.1.load(Ordering::Relaxed));
        self.0.0.elapsed().saturating_sub(last)
    }
}

fn send(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(cause = %e, "sd_notify failed");
    }
}

/// The daemon is ready: its HTTP API listens.
pub fn ready() {
    send(&[sd_notify::NotifyState::Ready]);
}

/// The daemon is stopping.
pub fn stopping() {
    send(&[sd_notify::NotifyState::Stopping]);
}

/// Keeps the service manager told until `stop`: the status line from `status` when it changes, and the
/// watchdog (if `WATCHDOG_USEC` asks for one) while `alive` says so. When `alive` fails the watchdog is
/// withheld and the reason logged once, so systemd restarts the agent after `WatchdogSec`.
pub async fn run(
    status: impl Fn() -> String + Send + 'static,
    alive: impl Fn() -> Result<(), String> + Send + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        // Not under systemd: nobody to tell, so nothing to wake for.
        let _ = stop.wait_for(|s| *s).await;
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).max(Duration::from_millis(50)));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    let mut withheld = false;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let line = status();
        if line != last_status {
            send(&[sd_notify::NotifyState::Status(&line)]);
            last_status = line;
        }
        if watchdog.is_none() {
            continue;
        }
        match alive() {
            Ok(()) => {
                if withheld {
                    tracing::info!("alive again; watchdog resumed");
                    withheld = false;
                }
                send(&[sd_notify::NotifyState::Watchdog]);
            }
            Err(why) => {
                if !withheld {
                    tracing::error!(reason = %why, "watchdog withheld; systemd will restart the agent");
                    withheld = true;
                }
            }
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit (systemd's `LimitNOFILE=` sets
/// both; a shell usually leaves the soft one at 1,024): the HTTP gate's connection cap and the store's
/// files then stay clear of it, and a flood of connections meets the gate, not EMFILE.
pub fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write and read only the struct passed, which lives on this stack.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let from = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        (libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0).then_some(from)
    };
    match raised {
        Some(from) => tracing::debug!(from, to = lim.rlim_max, "raised the open files limit"),
        None => tracing::warn!(
            cause = %std::io::Error::last_os_error(),
            "cannot raise the open files limit"
        ),
    }
}

/// The malloc arenas the daemon's threads share: one. glibc gives each thread that allocates an
/// arena of its own, up to 8 per core (32 on a Pi), and an idle agent kept its few megabytes of live
/// heap scattered over them: `deckhand bench footprint` on 2 cores measured 7.2-10.5 MB anonymous
/// memory without the model's weights with glibc's default, 6.4-8.0 MB with two arenas, 5.1-6.0 MB
/// with one (ARCHITECTURE.md, "Idle"). Each thread's cache (tcache) still serves small allocations
/// without the lock: `deckhand bench recognizer` served 743-759 recognitions a second with 4 clients
/// against 673-715 with the default, and a 128 MiB sync took as long. A lower mmap threshold
/// (128 KiB) saved a little more but doubled the embed time: tract's buffers were then mapped and
/// faulted in on every run.
pub const MALLOC_ARENAS: i32 = 1;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`] before any thread starts, unless the operator set
/// `glibc.malloc.arena_max` in `GLIBC_TUNABLES`, which then stands.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set_by_operator = std::env::var_os("GLIBC_TUNABLES")
            .is_some_and(|t| t.to_string_lossy().contains("glibc.malloc.arena_max"));
        if set_by_operator {
            return;
        }
        // SAFETY: mallopt only sets an allocator parameter; it is called before the runtime's threads.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) } != 1 {
            tracing::warn!(arenas = MALLOC_ARENAS, "cannot cap the malloc arenas");
        }
    }
}

/// Whether the system clock is taken as synchronised, for refusing a manifest created far ahead of it
/// ([`deckhand_protocol::floors::MAX_AHEAD`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockSync {
    /// As the kernel says: its NTP status (set by systemd-timesyncd, chrony or ntpd) is synchronised.
    Auto,
    /// Always (a Pi with a trusted clock the kernel does not know of, such as a GPS-disciplined one).
    Yes,
    /// Never: only the floors judge a manifest's time.
    No,
}

impl std::str::FromStr for ClockSync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "yes" => Ok(Self::Yes),
            "no" => Ok(Self::No),
            other => Err(format!("{other:?} is not auto, yes or no")),
        }
    }
}

impl ClockSync {
    /// The system clock now, and whether it is synchronised.
    pub fn now(self) -> deckhand_protocol::floors::SystemClock {
        deckhand_protocol::floors::SystemClock {
            now: jiff::Timestamp::now(),
            synchronised: match self {
                Self::Auto => kernel_clock_synchronised(),
                Self::Yes => true,
                Self::No => false,
            },
        }
    }
}

/// The kernel's word on the clock: `adjtimex` answers `TIME_ERROR` while it is not synchronised (the
/// NTP daemon sets and clears `STA_UNSYNC`).
fn kernel_clock_synchronised() -> bool {
    // SAFETY: a zeroed `timex` with `modes` 0 only reads the kernel's state into the struct, which
    // lives on this stack.
    let state = unsafe {
        let mut t: libc::timex = std::mem::zeroed();
        libc::adjtimex(&mut t)
    };
    state >= 0 && state != libc::TIME_ERROR
}
