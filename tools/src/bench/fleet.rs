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
    /// The shop's uplink budget given to every agent, Mbit/s.
    budget_mbps: Option<u64>,
}

struct Row {
    mode: &'static str,
    s3_bytes: u64,
    from_peers: u64,
    first: Duration,
    all: Duration,
    /// Per agent: (name, bytes from peers, bytes from the origin, time until it served the release).
    agents: Vec<(String, u64, u64, Duration)>,
    /// The highest rate S3 sent at over any 5 s, bytes per second.
    peak: f64,
}

pub async fn run(
    agents: usize,
    size_mib: u64,
    uplink_mbps: u64,
    budget_mbps: Option<u64>,
) -> Result<(), ToolError> {
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
    let (download, plain) = pipeline(tmp.path(), &files).await?;
    println!(
        "one agent's pipeline from an unlimited local S3: {:.0} MiB/s (range GETs, verify, store; {:.2} s from the first byte to the last), beside {:.0} MiB/s to write, sync and blake3-hash the same bytes",
        release_bytes as f64 / MIB / download.as_secs_f64(),
        download.as_secs_f64(),
        release_bytes as f64 / MIB / plain.as_secs_f64()
    );
    // The uplink limit: the release over the uplink, or over the budget when that is lower.
    let rate = budget_mbps.map_or(uplink, |b| (b * 1_000_000 / 8).min(uplink));
    let limit = release_bytes as f64 / rate as f64;
    match budget_mbps {
        Some(b) => println!(
            "uplink budget {b} Mbit/s for the shop (--uplink-budget on every agent); uplink limit (release / min(uplink, budget)): {limit:.2} s"
        ),
        None => println!("uplink limit (release / uplink): {limit:.2} s"),
    }
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
            budget_mbps,
        };
        rows.push(one(tmp.path(), mode, agents, &files, &opts).await?);
    }
    println!(
        "{:<26} {:>10} {:>8} {:>14} {:>12} {:>12} {:>10} {:>16}",
        "mode",
        "S3 MiB",
        "x size",
        "peers MiB",
        "first (s)",
        "all (s)",
        "x limit",
        "S3 peak Mbit/s"
    );
    let size = release_bytes as f64 / MIB;
    for r in &rows {
        println!(
            "{:<26} {:>10.1} {:>8.3} {:>14.1} {:>12.2} {:>12.2} {:>10.2} {:>16.1}",
            r.mode,
            r.s3_bytes as f64 / MIB,
            r.s3_bytes as f64 / MIB / size,
            r.from_peers as f64 / MIB,
            r.first.as_secs_f64(),
            r.all.as_secs_f64(),
            r.all.as_secs_f64() / limit,
            r.peak * 8.0 / 1e6
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

/// One agent with no peers and an unlimited S3: the time from the first stored byte of the release to
/// the last (seen through status), and the time to write, sync and hash the same bytes plainly.
async fn pipeline(
    dir: &std::path::Path,
    files: &deckhand_agent::release::ReleaseFiles,
) -> Result<(Duration, Duration), ToolError> {
    let plain_dir = dir.join("plain");
    std::fs::create_dir_all(&plain_dir).map_err(ToolError::io("create", &plain_dir))?;
    let mut plain = Duration::ZERO;
    for (i, p) in files.paths().into_iter().enumerate() {
        let data = std::fs::read(p).map_err(ToolError::io("read", p))?;
        let out = plain_dir.join(i.to_string());
        let t = Instant::now();
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&out).map_err(ToolError::io("create", &out))?;
            f.write_all(&data).map_err(ToolError::io("write", &out))?;
            f.sync_all().map_err(ToolError::io("sync", &out))?;
        }
        std::hint::black_box(blake3::hash(&data));
        plain += t.elapsed();
    }
    let mut shop = Fleet::new()
        .dir(&dir.join("pipeline"))
        .without_peers()
        .start()
        .await?;
    shop.start_agent("pi-0").await?;
    shop.publish(files).await?;
    let published = Instant::now();
    let deadline = published + Duration::from_secs(600);
    let (mut first, mut last) = (None, None);
    while last.is_none() {
        let s = shop.agents[0].status().await?;
        let now = Instant::now();
        match &s.pending {
            Some(p) if p.bytes_have > 0 && first.is_none() => first = Some(now),
            Some(p) if p.bytes_total > 0 && p.bytes_have >= p.bytes_total => last = Some(now),
            None if s.active_version() == Some(1) => last = Some(now),
            _ => {}
        }
        if now > deadline {
            return Err(ToolError::BenchTimeout {
                mode: "pipeline",
                secs: 600,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shop.stop().await?;
    let last = last.unwrap_or(published);
    Ok((last.duration_since(first.unwrap_or(published)), plain))
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
        budget_mbps,
    } = *opts;
    let mut builder = Fleet::new().dir(&dir.join(format!(
        "{}-{}",
        if peers { "fleet" } else { "baseline" },
        if cold { "cold" } else { "warm" }
    )));
    if !peers {
        builder = builder.without_peers();
    }
    let budget = budget_mbps.map(|b| format!("{b}Mbit"));
    if let Some(b) = &budget {
        builder = builder.agent_args(&["--uplink-budget", b]);
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
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    while done.iter().any(Option::is_none) {
        samples.push((t0.elapsed(), shop.s3().stats().bytes_carried()));
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
    samples.push((t0.elapsed(), shop.s3().stats().bytes_carried()));
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
        peak: deckhand_protocol::sim::peak_rate(&samples, Duration::from_secs(5)),
    })
}
