//! `deckhand bench footprint`: what one agent costs a Pi. One real `deckhand-agent` syncs a release from
//! the local S3 server, then idles with the default poll interval. Printed:
//! - resident memory once idle, split into anonymous and file-backed (`/proc/PID/status`), beside the
//!   model weights the CPU backend holds (the ONNX file's size), which the anonymous figure includes;
//! - bytes the agent wrote to disk while syncing, over the release's bytes (`write_bytes` of
//!   `/proc/PID/io`: what reached the block layer, so the directory must be on a disk, not a tmpfs);
//! - CPU while idle over the window (the process's CPU-time clock, `clock_getcpuclockid`: every thread's
//!   user and system time to the nanosecond, where `/proc/PID/stat` counts 1/100 s ticks), under a notify
//!   socket and the shipped unit's `WatchdogSec`, as systemd runs the agent on a Pi;
//! - the stripped size of both binaries for each target and profile built in this target directory;
//! - then a shop of `shop` agents idling together as Pis on one LAN do: each in its own network namespace
//!   plugged into one bridge (made here and deleted after; needs root and iproute2), finding the others
//!   by mDNS, with fleet certificates, one reading the release from a USB stick and the others fetching
//!   it from their peers; once all serve it and see every peer live, the CPU each uses idle.

use crate::ToolError;
use crate::shop::fixtures::{self, ReferenceSpec};
use crate::shop::netns::NetNs;
use crate::shop::{AgentOptions, Credentials, Fleet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

/// The agent's default `--poll-secs`: idling is measured as a Pi idles.
const DEFAULT_POLL_SECS: u64 = 30;

pub async fn run(
    size_mib: u64,
    idle_secs: u64,
    dir: Option<&Path>,
    shop: usize,
) -> Result<(), ToolError> {
    let base = dir.map_or_else(std::env::temp_dir, Path::to_owned);
    let tmp = tempfile::Builder::new()
        .prefix("deckhand-bench-footprint-")
        .tempdir_in(&base)
        .map_err(ToolError::io("create a directory in", &base))?;
    let release_dir = tmp.path().join("release");
    let spec = ReferenceSpec::small(40);
    let files = tokio::task::spawn_blocking(move || {
        fixtures::write_sized_release(&release_dir, &spec, size_mib << 20, 1)
    })
    .await??;
    let release_bytes: u64 = files
        .paths()
        .into_iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let weights = std::fs::metadata(&files.onnx).map_or(0, |m| m.len());
    let mut fleet = Fleet::new()
        .name("footprint")
        .dir(&tmp.path().join("shop"))
        .without_peers()
        .poll_secs(DEFAULT_POLL_SECS)
        .start()
        .await?;
    fleet.publish(&files).await?;
    println!(
        "one agent (CPU backend, no peers) syncs a release of {:.1} MiB from the local S3 server into {}, \
         then idles {idle_secs} s polling every {DEFAULT_POLL_SECS} s",
        release_bytes as f64 / MIB,
        tmp.path().display()
    );
    let notify = ServiceManager::bind(&tmp.path().join("notify-pi"))?;
    let started = Instant::now();
    fleet
        .start_agent_with(AgentOptions {
            name: "pi".into(),
            origin: true,
            credentials: Credentials::None,
            env: notify.env(),
            ..AgentOptions::default()
        })
        .await?;
    let agent = &fleet.agents[0];
    let pid = agent.pid().ok_or_else(|| ToolError::AgentApi {
        name: "pi".into(),
        why: "no process id".into(),
    })?;
    agent
        .wait_for(Duration::from_secs(600), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await?;
    let synced = started.elapsed();
    let written = proc_field(pid, "io", "write_bytes:")?;
    println!(
        "synced in {:.1} s; wrote {:.1} MiB to disk = {:.3}x the release",
        synced.as_secs_f64(),
        written as f64 / MIB,
        written as f64 / release_bytes as f64
    );

    // Idle: the sync is done and the recognizer loaded; no request is made.
    let cpu_before = cpu_time(pid)?;
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
    let idle_cpu = cpu.as_secs_f64() / idle_started.elapsed().as_secs_f64() * 100.0;
    let kib = |field: &str| proc_field(pid, "status", field);
    let (rss, anon, file, shmem) = (
        kib("VmRSS:")?,
        kib("RssAnon:")?,
        kib("RssFile:")?,
        kib("RssShmem:")?,
    );
    let mb = |k: u64| k as f64 / 1000.0 * 1.024;
    println!(
        "idle RSS {:.1} MB: anonymous {:.1} MB (of which model weights {:.1} MB: {:.1} MB without), \
         file-backed {:.1} MB, shared memory {:.1} MB",
        mb(rss),
        mb(anon),
        weights as f64 / 1e6,
        mb(anon) - weights as f64 / 1e6,
        mb(file),
        mb(shmem)
    );
    println!(
        "idle CPU over {:.0} s: {idle_cpu:.3}% of one core ({:.1} ms), under a systemd-like notify \
         socket with the unit's WatchdogSec={} s ({} watchdog pings)",
        idle_started.elapsed().as_secs_f64(),
        cpu.as_secs_f64() * 1e3,
        notify.watchdog.as_secs(),
        notify.pings()
    );
    fleet.stop().await?;

    println!("stripped binaries in this target directory:");
    for (target, profile, bin, size) in stripped_sizes(tmp.path())? {
        println!(
            "  {target:<28} {profile:<8} {bin:<15} {:>6.1} MiB",
            size as f64 / MIB
        );
    }
    if shop > 1 {
        let base = dir.map_or_else(std::env::temp_dir, Path::to_owned);
        if let Err(e) = idle_shop(shop, idle_secs, &base).await {
            println!("a shop of {shop} agents could not be measured: {e}");
        }
    }
    Ok(())
}

/// `n` agents converged on a LAN of network namespaces, with mDNS: the idle CPU of each.
async fn idle_shop(n: usize, idle_secs: u64, base: &Path) -> Result<(), ToolError> {
    let tmp = tempfile::Builder::new()
        .prefix("deckhand-bench-shop-")
        .tempdir_in(base)
        .map_err(ToolError::io("create a directory in", base))?;
    let hub = NetNs::new("fphub")?;
    hub.bridge("br0")?;
    let pis = (0..n)
        .map(|i| NetNs::new(&format!("fp{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, ns) in pis.iter().enumerate() {
        hub.plug(
            "br0",
            &format!("port{i}"),
            ns,
            &format!("10.231.91.{}/24", i + 1),
        )?;
    }
    let mut fleet = Fleet::new()
        .name("footprint-shop")
        .dir(&tmp.path().join("shop"))
        .poll_secs(DEFAULT_POLL_SECS)
        .start()
        .await?;
    let release_dir = tmp.path().join("release");
    let files = tokio::task::spawn_blocking(move || {
        fixtures::write_reference_release(&release_dir, &ReferenceSpec::small(40))
    })
    .await??;
    let stick = tmp.path().join("usb");
    fleet.publish_to_dir(&files, &stick).await?;
    let managers = (0..n)
        .map(|i| ServiceManager::bind(&tmp.path().join(format!("notify-{i}"))))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, ns) in pis.iter().enumerate() {
        let extra = if i == 0 {
            vec!["--bundle-dir".to_owned(), stick.display().to_string()]
        } else {
            Vec::new()
        };
        fleet
            .start_agent_with(AgentOptions {
                name: format!("pi-{i}"),
                extra,
                netns: Some(ns.name.clone()),
                mdns: true,
                env: managers[i].env(),
                ..AgentOptions::default()
            })
            .await?;
    }
    let mut pids = Vec::new();
    for agent in &fleet.agents {
        agent
            .wait_for(
                Duration::from_secs(300),
                "version 1 active and every peer live",
                |s| s.active_version() == Some(1) && s.live_peers() == n - 1,
            )
            .await?;
        pids.push(agent.pid().ok_or_else(|| ToolError::AgentApi {
            name: agent.name.clone(),
            why: "no process id".into(),
        })?);
    }
    let before = pids
        .iter()
        .map(|p| cpu_time(*p))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let secs = started.elapsed().as_secs_f64();
    let mut each = Vec::new();
    for (pid, b) in pids.iter().zip(before) {
        let cpu = cpu_time(*pid)?.saturating_sub(b);
        each.push(cpu.as_secs_f64() / secs * 100.0);
    }
    fleet.stop().await?;
    let list: Vec<String> = each.iter().map(|c| format!("{c:.3}%")).collect();
    let pings: Vec<String> = managers.iter().map(|m| m.pings().to_string()).collect();
    println!(
        "a shop of {n} agents (each in its own network namespace on one bridge, mDNS on, fleet \
         certificates, release from a USB stick to pi-0 and from peers to the rest, under notify \
         sockets with WatchdogSec={} s), converged, idle CPU over {secs:.0} s: {} (mean {:.3}% of one \
         core); watchdog pings {}",
        watchdog()?.as_secs(),
        list.join(", "),
        each.iter().sum::<f64>() / n as f64,
        pings.join("/")
    );
    drop((pis, hub));
    Ok(())
}

/// The shipped unit, whose `WatchdogSec` the agents idle under as on a Pi.
const UNIT: &str = include_str!("../../../packaging/deckhand-agent.service");

/// The unit's `WatchdogSec` (whole seconds, as the unit writes it).
fn watchdog() -> Result<Duration, ToolError> {
    UNIT.lines()
        .find_map(|l| l.strip_prefix("WatchdogSec="))
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_secs)
        .ok_or_else(|| ToolError::Corrupt {
            what: "packaging/deckhand-agent.service (built into this binary)".into(),
            why: "it has no WatchdogSec= in whole seconds",
        })
}

/// What systemd gives the agent on a Pi (`Type=notify`, the unit's watchdog): a notify socket, read
/// here, and `WATCHDOG_USEC`, so that the idle figures include the status and watchdog loop a Pi runs.
struct ServiceManager {
    path: PathBuf,
    watchdog: Duration,
    pings: std::sync::Arc<std::sync::atomic::AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
}

impl ServiceManager {
    fn bind(path: &Path) -> Result<Self, ToolError> {
        let socket = tokio::net::UnixDatagram::bind(path)
            .map_err(ToolError::io("bind a notify socket at", path))?;
        let pings = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = pings.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                if buf[..n].split(|b| *b == b'\n').any(|l| l == b"WATCHDOG=1") {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        Ok(Self {
            path: path.to_owned(),
            watchdog: watchdog()?,
            pings,
            reader,
        })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NOTIFY_SOCKET", self.path.display().to_string()),
            ("WATCHDOG_USEC", self.watchdog.as_micros().to_string()),
        ]
    }

    fn pings(&self) -> u64 {
        self.pings.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A numeric field of `/proc/PID/<file>` (`write_bytes:` of io; `VmRSS:` and the like, in kB, of status).
fn proc_field(pid: u32, file: &str, field: &str) -> Result<u64, ToolError> {
    let path = PathBuf::from(format!("/proc/{pid}/{file}"));
    let text = std::fs::read_to_string(&path).map_err(ToolError::io("read", &path))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ToolError::Usage(format!("{} has no {field}", path.display())))
}

/// The CPU time a process has used, user and system, all its threads' (those that exited too), read
/// from its CPU-time clock to the nanosecond.
pub(crate) fn cpu_time(pid: u32) -> Result<Duration, ToolError> {
    let no_clock = |why: String| ToolError::Usage(format!("process {pid}'s CPU-time clock: {why}"));
    let id = libc::pid_t::try_from(pid).map_err(|_| no_clock("no such process id".into()))?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes only the clock id passed, which lives on this stack.
    let e = unsafe { libc::clock_getcpuclockid(id, &mut clock) };
    if e != 0 {
        return Err(no_clock(std::io::Error::from_raw_os_error(e).to_string()));
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec passed, which lives on this stack.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(no_clock(std::io::Error::last_os_error().to_string()));
    }
    match (u64::try_from(ts.tv_sec), u32::try_from(ts.tv_nsec)) {
        (Ok(secs), Ok(nanos)) => Ok(Duration::new(secs, nanos)),
        _ => Err(no_clock(format!("{}.{} s", ts.tv_sec, ts.tv_nsec))),
    }
}

/// (target, profile, binary, stripped bytes) for every deckhand binary built beside this one: the host's
/// profiles under `target/` and each cross target's under `target/<triple>/`.
fn stripped_sizes(work: &Path) -> Result<Vec<(String, String, String, u64)>, ToolError> {
    let exe = std::env::current_exe().map_err(ToolError::io("find", Path::new("deckhand")))?;
    // target/<profile>/deckhand -> target
    let Some(target_dir) = exe.parent().and_then(Path::parent) else {
        return Ok(Vec::new());
    };
    let mut dirs: Vec<(String, PathBuf, &str)> = Vec::new();
    for profile in ["release", "dist", "debug"] {
        dirs.push(("x86_64 (host)".into(), target_dir.join(profile), "strip"));
        dirs.push((
            "aarch64-unknown-linux-gnu".into(),
            target_dir.join("aarch64-unknown-linux-gnu").join(profile),
            "aarch64-linux-gnu-strip",
        ));
    }
    let mut out = Vec::new();
    for (target, dir, strip) in dirs {
        for bin in ["deckhand-agent", "deckhand"] {
            let path = dir.join(bin);
            if !path.is_file() {
                continue;
            }
            let copy = work.join(format!("stripped-{bin}"));
            std::fs::copy(&path, &copy).map_err(ToolError::io("copy", &path))?;
            let status = std::process::Command::new(strip).arg(&copy).status();
            if !status.is_ok_and(|s| s.success()) {
                println!("  ({strip} could not strip {})", path.display());
                continue;
            }
            let size = std::fs::metadata(&copy).map_or(0, |m| m.len());
            let _ = std::fs::remove_file(&copy);
            let profile = dir
                .file_name()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((target.clone(), profile, bin.to_owned(), size));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_cpu_time() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes only the timespec passed.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) },
            0
        );
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn a_process_cpu_time_keeps_threads_that_exited_and_names_a_process_that_is_gone() {
        let me = std::process::id();
        let before = cpu_time(me).unwrap();
        // A thread that works 30 ms of CPU and exits, as an idle runtime's blocking threads do.
        std::thread::spawn(|| {
            let mut x = 0u64;
            while thread_cpu_time() < Duration::from_millis(30) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        })
        .join()
        .unwrap();
        let after = cpu_time(me).unwrap();
        assert!(
            after.saturating_sub(before) >= Duration::from_millis(30),
            "{before:?} then {after:?}"
        );
        // A child that exited and was reaped has no clock left.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let e = cpu_time(pid).unwrap_err().to_string();
        assert!(
            e.contains(&format!("process {pid}'s CPU-time clock")) && e.contains("No such process"),
            "{e}"
        );
    }
}
