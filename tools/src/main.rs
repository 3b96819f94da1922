//! `deckhand`: the operator's CLI.

mod bench;
mod keygen;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "deckhand",
    version,
    about = "Publish and inspect deckhand releases"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ed25519 signing key: NAME.key (mode 0600) and NAME.pub. Prints the key id.
    Keygen {
        /// Path and base name of the key files.
        #[arg(long)]
        out: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Measure and print performance figures.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    deckhand_agent::telemetry::init(false);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deckhand: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen { out, json } => {
            let pair = keygen::keygen(&out)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"key_id": pair.key_id, "secret": pair.secret, "public": pair.public})
                );
            } else {
                println!("{}", pair.key_id);
                eprintln!(
                    "wrote {} (keep it secret) and {}",
                    pair.secret.display(),
                    pair.public.display()
                );
            }
            Ok(())
        }
        Command::Bench { what } => match what {
            Bench::Store {
                size_mib,
                dir,
                rounds,
            } => bench::store(size_mib, dir.as_deref(), rounds as usize),
            Bench::Chunking => bench::chunking(),
        },
    }
}
