//! `deckhand bench fleet`: N agents sync one release from an S3 server behind a shared, limited uplink;
//! as a fleet (QUIC peers, rendezvous-assigned origin fetches) and as the baseline of every agent for
//! itself (as `aws s3 sync` on each Pi does today), each from a warm start (the agents have met when the
//! release is published) and a cold start (the release is published when the agents boot together).
//! Prints the bytes S3 sent and the time until every agent serves the release (from the publish, or from
//! the first agent's start).

use crate::ToolError;
use crate::shop::Fleet;
use crate::shop::fixtures::{self, ReferenceSpec};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

/// How one run of the benchmark is set up.
#[derive(Clone, Copy)]
struct Opts {
    /// Agents share through QUIC peers (else each pulls from S3).
    peers: bool,
    /// The release is published before the agents start.
    cold: bool,
    /// S3's uplink, bytes per second.
    uplink: u64,
}

struct Row {
    mode: &'static str,
    s3_bytes: u64,
    from_peers: u64,
    first: Duration,
    all: Duration,
    /// Per agent: (name, bytes from peers, bytes from the origin, time until it served the release).
    agents: Vec<(String, u64, u64, Duration)>,
}

pub async fn run(agents: usize, size_mib: u64, uplink_mbps: u64) -> Result<(), ToolError> {
    let tmp = tempfile::Builder::new()
        .prefix("deckhand-bench-fleet-")
        .tempdir()
        .map_err(ToolError::io(
            "create a directory in",
            &std::env::temp_dir(),
        ))?;
    let release_dir = tmp.path().join("release");
    let spec = ReferenceSpec::small(40);
    let files = tokio::task::spawn_blocking(move || {
        fixtures::write_sized_release(&release_dir, &spec, size_mib << 20, 1)
    })
    .await??;
    let uplink = uplink_mbps * 1_000_000 / 8;
    let release_bytes: u64 = files
        .paths()
        .into_iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "fleet of {agents} agents, a release of {:.1} MiB, S3 behind one {uplink_mbps} Mbit/s uplink \
         (all on 127.0.0.1; {} cores)",
        release_bytes as f64 / MIB,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows = Vec::new();
    for (mode, peers, cold) in [
        ("fleet, warm start", true, false),
        ("every Pi from S3, warm", false, false),
        ("fleet, cold start", true, true),
        ("every Pi from S3, cold", false, true),
    ] {
        let opts = Opts {
            peers,
            cold,
            uplink,
        };
        rows.push(one(tmp.path(), mode, agents, &files, &opts).await?);
    }
    println!(
        "{:<26} {:>10} {:>8} {:>14} {:>12} {:>12}",
        "mode", "S3 MiB", "x size", "peers MiB", "first (s)", "all (s)"
    );
    let size = release_bytes as f64 / MIB;
    for r in &rows {
        println!(
            "{:<26} {:>10.1} {:>8.2} {:>14.1} {:>12.2} {:>12.2}",
            r.mode,
            r.s3_bytes as f64 / MIB,
            r.s3_bytes as f64 / MIB / size,
            r.from_peers as f64 / MIB,
            r.first.as_secs_f64(),
            r.all.as_secs_f64()
        );
    }
    for r in &rows {
        println!("\n{}: per agent", r.mode);
        println!(
            "  {:<8} {:>14} {:>14} {:>12}",
            "agent", "peers MiB", "origin MiB", "active (s)"
        );
        for (name, peers, origin, t) in &r.agents {
            println!(
                "  {:<8} {:>14.1} {:>14.1} {:>12.2}",
                name,
                *peers as f64 / MIB,
                *origin as f64 / MIB,
                t.as_secs_f64()
            );
        }
    }
    Ok(())
}

async fn one(
    dir: &std::path::Path,
    mode: &'static str,
    n: usize,
    files: &deckhand_agent::release::ReleaseFiles,
    opts: &Opts,
) -> Result<Row, ToolError> {
    let Opts {
        peers,
        cold,
        uplink,
    } = *opts;
    let mut builder = Fleet::new().dir(&dir.join(format!(
        "{}-{}",
        if peers { "fleet" } else { "baseline" },
        if cold { "cold" } else { "warm" }
    )));
    if !peers {
        builder = builder.without_peers();
    }
    let mut shop = builder.start().await?;
    shop.s3().stats().set_uplink(uplink);
    let names: Vec<String> = (0..n).map(|i| format!("pi-{i}")).collect();
    let t0 = if cold {
        // A morning in the shop: the release is already published when the Pis boot together.
        shop.publish(files).await?;
        shop.s3().stats().reset();
        let t0 = Instant::now();
        for name in &names {
            shop.start_agent(name).await?;
        }
        t0
    } else {
        // The agents have met when the release is published.
        for name in &names {
            shop.start_agent(name).await?;
        }
        if peers && n > 1 {
            shop.wait_all(Duration::from_secs(30), "every other agent live", |s| {
                s.live_peers() + 1 == n
            })
            .await?;
        }
        shop.s3().stats().reset();
        let t0 = Instant::now();
        shop.publish(files).await?;
        t0
    };
    let before = 0;
    let mut done: Vec<Option<Duration>> = vec![None; n];
    let deadline = t0 + Duration::from_secs(1800);
    while done.iter().any(Option::is_none) {
        for (i, a) in shop.agents.iter().enumerate() {
            if done[i].is_none() && a.status().await?.active_version() == Some(1) {
                done[i] = Some(t0.elapsed());
            }
        }
        if Instant::now() > deadline {
            return Err(ToolError::BenchTimeout { mode, secs: 1800 });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s3_bytes = shop.s3().stats().bytes_sent() - before;
    let mut from_peers = 0;
    let mut per_agent = Vec::new();
    for (i, a) in shop.agents.iter().enumerate() {
        let s = a.status().await?;
        let (p, o) = (s.bytes_from_peers, s.bytes_from_origin);
        from_peers += p;
        per_agent.push((format!("pi-{i}"), p, o, done[i].unwrap_or_default()));
    }
    shop.stop().await?;
    let times: Vec<Duration> = done.into_iter().flatten().collect();
    Ok(Row {
        mode,
        s3_bytes,
        from_peers,
        first: times.iter().min().copied().unwrap_or_default(),
        all: times.iter().max().copied().unwrap_or_default(),
        agents: per_agent,
    })
}
