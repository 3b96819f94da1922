//! `deckhand bench sim`: the agents' download state machines in the fleet simulator (virtual time), for
//! fleets larger than this machine can run live.

use deckhand_protocol::sim::{self, SimConfig, SimReport};
use std::time::{Duration, Instant};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimArgs {
    pub agents: usize,
    pub size_mib: u64,
    pub uplink_mbps: f64,
    pub lan_mbps: f64,
    /// Agents that crash half way through the uplink limit.
    pub deaths: usize,
}

fn line(label: &str, r: &SimReport, cfg: &SimConfig, wall: Duration) {
    let conv = r
        .converged
        .map(|c| format!("{:.1} s", c.as_secs_f64()))
        .unwrap_or_else(|| "never".into());
    let ratio = r
        .convergence_ratio()
        .map(|c| format!("{c:.2}x"))
        .unwrap_or_else(|| "-".into());
    let after_gather = r
        .converged
        .map(|c| {
            format!(
                "{:.2}x",
                c.saturating_sub(cfg.fetch.gather).as_secs_f64() / r.uplink_limit.as_secs_f64()
            )
        })
        .unwrap_or_else(|| "-".into());
    println!(
        "{label:<26} origin {:>7.3}x  converged {conv:>9}  {ratio:>6} of the uplink limit ({after_gather} after gathering)  GETs {:>5}  peer asks {:>8}  refetched chunks {:>4}  [{:.1} s to simulate]",
        r.origin_ratio(),
        r.origin_gets,
        r.peer_asks,
        r.refetched,
        wall.as_secs_f64()
    );
}

pub fn run(a: &SimArgs) {
    let base = SimConfig::new(
        a.agents,
        a.size_mib * 1024 * 1024,
        a.uplink_mbps,
        a.lan_mbps,
    );
    let limit = base.release_bytes as f64 / base.uplink;
    println!(
        "fleet simulator: {} agents, {} MiB release, uplink {} Mbit/s shared, LAN {} Mbit/s per agent; uplink limit {:.1} s; gather {:.1} s, max_wait {} s",
        a.agents,
        a.size_mib,
        a.uplink_mbps,
        a.lan_mbps,
        limit,
        base.fetch.gather.as_secs_f64(),
        base.fetch.max_wait.as_secs()
    );
    let mut cases: Vec<(String, SimConfig)> = vec![("cold start".into(), base.clone())];
    let mut eager = base.clone();
    eager.fetch.gather = Duration::ZERO;
    cases.push(("cold start, no gathering".into(), eager));
    let mut spread = base.clone();
    spread.start = (0..a.agents)
        .map(|i| Duration::from_millis(i as u64 * 5000 / a.agents.max(1) as u64))
        .collect();
    cases.push(("boots spread over 5 s".into(), spread));
    if a.deaths > 0 {
        let mut dying = base.clone();
        let at = base.fetch.gather + Duration::from_secs_f64(limit / 2.0);
        dying.deaths = (0..a.deaths.min(a.agents.saturating_sub(1)))
            .map(|i| (i * a.agents / a.deaths.max(1), at))
            .collect();
        cases.push((format!("{} die half way", dying.deaths.len()), dying));
    }
    let mut solo = base.clone();
    solo.fetch.max_wait = Duration::ZERO;
    solo.fetch.gather = Duration::ZERO;
    solo.fetch.piece = 1;
    cases.push(("every Pi from S3".into(), every_pi_from_s3(solo)));
    for (label, cfg) in cases {
        let t = Instant::now();
        let r = sim::run(&cfg);
        line(&label, &r, &cfg, t.elapsed());
    }
}

/// The baseline: agents that never learn of each other.
fn every_pi_from_s3(mut cfg: SimConfig) -> SimConfig {
    cfg.discover = cfg.limit..cfg.limit;
    cfg
}
