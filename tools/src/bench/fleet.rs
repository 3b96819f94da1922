//! `deckhand bench fleet`: N agents sync one release from an S3 server behind a shared, limited uplink;
//! once as a fleet (QUIC peers, rendezvous-assigned origin fetches), once as the baseline of every agent
//! for itself (as `aws s3 sync` on each Pi does today). Prints the bytes S3 sent and the time from publish
//! until every agent serves the release.

use crate::ToolError;
use crate::shop::Fleet;
use crate::shop::fixtures::{self, ReferenceSpec};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

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
    for (mode, peers) in [
        ("fleet (QUIC peers)", true),
        ("baseline (each from S3)", false),
    ] {
        rows.push(one(tmp.path(), mode, peers, agents, &files, uplink).await?);
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
    peers: bool,
    n: usize,
    files: &deckhand_agent::release::ReleaseFiles,
    uplink: u64,
) -> Result<Row, ToolError> {
    let mut builder = Fleet::new()
        .dir(&dir.join(if peers { "fleet" } else { "baseline" }))
        .agents(n);
    if !peers {
        builder = builder.without_peers();
    }
    let shop = builder.start().await?;
    shop.s3().stats().set_uplink(uplink);
    shop.s3().stats().reset();
    let t0 = Instant::now();
    shop.publish(files).await?;
    let before = shop.s3().stats().bytes_sent();
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
