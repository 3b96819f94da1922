//! `deckhand bench ...`: benchmarks that print figures (tests never time anything).

use clap::Subcommand;
use deckhand_tools::{ToolError, bench};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Store import throughput of a large file beside plain blake3 hashing of the same file.
    Store {
        /// Size of the file to import, in MiB.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
        size_mib: u64,
        /// Directory for the file and the stores (default: the system temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// How many times to measure each figure.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
    },
    /// Chunk-size trade-offs (requests, dedup, speed) on a synthetic reference-DB update.
    Chunking,
    /// A reference-DB update (cards added, prices edited, the index rebuilt with numpy and usearch as
    /// the seeds do): the bytes a Pi holding the old DB fetches, where they go, raw and compressed, and
    /// casync's bytes for the same update when casync is installed.
    Delta {
        /// Reference rows in the first DB.
        #[arg(long, default_value_t = 17_592, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
        rows: u64,
        /// Cards the second DB adds.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=100_000))]
        added: u64,
        /// Prices the second DB edits, per thousand cards.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=1000))]
        edited_per_mille: u64,
        /// Directory for the two releases (default: the system temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Recognition accuracy on perturbed photos, throughput, latency, search time, cold start, swap p99.
    Recognizer {
        /// Use the seeds' full 17,592 x 768 reference DB (otherwise 2,200 rows).
        #[arg(long)]
        full: bool,
    },
    /// Shadow evaluation of a release on the kept samples (CPU backend): its time, and live p50/p99
    /// with and without an evaluation running.
    Shadow {
        /// Samples kept and evaluated.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=5000))]
        samples: u64,
    },
    /// The counter loop: decode and find per frame and embed per placement (in process), then a real
    /// agent with a camera of generated scenes publishing to mosquitto: idle CPU, frames analysed, and
    /// the time from a card lying still to its MQTT message.
    Counter {
        /// Cards placed one after another.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
        placements: u64,
        /// How long to measure the empty counter, in seconds.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
        idle_secs: u64,
    },
    /// A fleet of agents syncing one release from an S3 server with a limited uplink, with and without
    /// peers: bytes pulled from S3 and time until every agent serves it.
    Fleet {
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=32))]
        agents: u64,
        /// Release size in MiB.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
        size: u64,
        /// The S3 server's uplink, in Mbit/s (shared by all agents).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100000))]
        uplink_mbps: u64,
        /// Give every agent this shop-wide uplink budget, in Mbit/s, and print S3's peak rate.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100000))]
        budget_mbps: Option<u64>,
    },
    /// What one agent costs a Pi: idle RSS (anonymous and file-backed), bytes written to disk while
    /// syncing over the release's bytes, idle CPU, and the stripped sizes of the binaries built here.
    Footprint {
        /// Release size in MiB.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=4096))]
        size: u64,
        /// How long to measure idling, in seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        idle_secs: u64,
        /// Directory on a disk (not a tmpfs) for the store (default: the system temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Then this many agents idling together on a LAN of network namespaces with mDNS (needs
        /// root); 0 or 1 to skip.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(0..=16))]
        shop: u64,
    },
    /// The agents' download state machines in the fleet simulator (virtual time): origin bytes per
    /// release and convergence against the uplink limit, for fleets too large to run live.
    Sim {
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
        agents: u64,
        /// Release size in MiB.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=4096))]
        size: u64,
        /// The shop's uplink in Mbit/s, shared by all agents.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100000))]
        uplink_mbps: u64,
        /// Each agent's LAN rate in Mbit/s.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=100000))]
        lan_mbps: u64,
        /// Also simulate this many agents crashing half way.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=1000))]
        deaths: u64,
    },
}

pub async fn run(what: BenchCommand) -> Result<(), ToolError> {
    match what {
        BenchCommand::Store {
            size_mib,
            dir,
            rounds,
        } => bench::store(size_mib, dir.as_deref(), rounds as usize),
        BenchCommand::Chunking => bench::chunking(),
        BenchCommand::Delta {
            rows,
            added,
            edited_per_mille,
            dir,
        } => bench::delta::run(&bench::delta::DeltaArgs {
            rows: rows as usize,
            added: added as usize,
            edited_per_mille: edited_per_mille as usize,
            dir,
        }),
        BenchCommand::Recognizer { full } => deckhand_tools::bench::recognizer::run(full).await,
        BenchCommand::Shadow { samples } => bench::shadow::run(samples as usize).await,
        BenchCommand::Counter {
            placements,
            idle_secs,
        } => bench::counter::run(placements as usize, idle_secs).await,
        BenchCommand::Fleet {
            agents,
            size,
            uplink_mbps,
            budget_mbps,
        } => {
            deckhand_tools::bench::fleet::run(agents as usize, size, uplink_mbps, budget_mbps).await
        }
        BenchCommand::Footprint {
            size,
            idle_secs,
            dir,
            shop,
        } => {
            deckhand_tools::bench::footprint::run(size, idle_secs, dir.as_deref(), shop as usize)
                .await
        }
        BenchCommand::Sim {
            agents,
            size,
            uplink_mbps,
            lan_mbps,
            deaths,
        } => {
            deckhand_tools::bench::sim::run(&deckhand_tools::bench::sim::SimArgs {
                agents: agents as usize,
                size_mib: size,
                uplink_mbps: uplink_mbps as f64,
                lan_mbps: lan_mbps as f64,
                deaths: deaths as usize,
            });
            Ok(())
        }
    }
}
