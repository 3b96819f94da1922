//! `deckhand-agent`: the daemon on each Pi, and its maintenance commands.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use deckhand_agent::{maintenance, telemetry};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "deckhand-agent", version, about = "deckhand's edge sync agent")]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and maintain the local content-addressed store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// List the blobs held, their state, and the pins.
    Ls(StoreArgs),
    /// Re-hash every blob; quarantine corrupt ones. Exits 1 if anything was corrupt.
    Verify(StoreArgs),
    /// Remove every blob that no release pins.
    Gc(StoreArgs),
}

#[derive(clap::Args)]
struct StoreArgs {
    /// The agent's data directory (the store lives in DATA_DIR/store).
    #[arg(long, default_value = "/var/lib/deckhand", env = "DECKHAND_DATA_DIR")]
    data_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_json);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("deckhand-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Store { command } => store(command),
    }
}

fn store(command: StoreCommand) -> anyhow::Result<ExitCode> {
    let (args, what) = match &command {
        StoreCommand::Ls(a) => (a, "list"),
        StoreCommand::Verify(a) => (a, "verify"),
        StoreCommand::Gc(a) => (a, "gc"),
    };
    let store = maintenance::open(&args.data_dir)
        .with_context(|| format!("cannot open the store in {}", args.data_dir.display()))?;
    match command {
        StoreCommand::Ls(args) => {
            let listing = maintenance::list(&store).context(what)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                for b in &listing.blobs {
                    let state = if b.complete {
                        "complete".to_owned()
                    } else {
                        format!("{}/{} bytes", b.have_bytes, b.size)
                    };
                    println!("{}  {:>12}  {state}", b.id, b.size);
                }
                for (name, blobs) in &listing.pins {
                    println!("pin {name}: {} blob(s)", blobs.len());
                }
                println!(
                    "{} complete bytes, {} partial bytes, budget {}",
                    listing.complete_bytes,
                    listing.partial_bytes,
                    listing.budget.map_or("none".to_owned(), |b| b.to_string())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Verify(args) => {
            let report = maintenance::verify(&store).context(what)?;
            if args.json {
                let corrupt: Vec<_> = report
                    .corrupt
                    .iter()
                    .map(|(id, why)| serde_json::json!({"blob": id.to_string(), "problem": why}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"blobs_checked": report.blobs_checked, "bytes_checked": report.bytes_checked,
                        "corrupt": corrupt, "chunks_reset": report.chunks_reset})
                );
            } else {
                println!(
                    "checked {} blobs, {} bytes",
                    report.blobs_checked, report.bytes_checked
                );
                for (id, why) in &report.corrupt {
                    println!("CORRUPT {id}: {why} (quarantined)");
                }
                if report.chunks_reset > 0 {
                    println!(
                        "{} recorded chunks of partial blobs failed and will be fetched again",
                        report.chunks_reset
                    );
                }
            }
            Ok(if report.corrupt.is_empty() && report.chunks_reset == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        StoreCommand::Gc(args) => {
            let report = maintenance::gc(&store).context(what)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"blobs_removed": report.blobs_removed, "bytes_freed": report.bytes_freed})
                );
            } else {
                println!(
                    "removed {} blobs, freed {} bytes",
                    report.blobs_removed, report.bytes_freed
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
