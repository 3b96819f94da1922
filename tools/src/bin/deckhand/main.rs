//! `deckhand`: the operator's CLI. Flags are parsed by clap, then settled into checked values
//! (`settle`); a bad value is a usage error (exit 2) naming the flag. Failures exit 1. One module per
//! command, each with its flags, its run and its report (`output::emit`: JSON with `--json`, else lines).

mod bench;
mod fleet;
mod keys;
mod layout;
mod output;
mod publish;
mod releases;
mod scenes;
mod settle;

use clap::{Parser, Subcommand};
use deckhand_tools::ToolError;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "deckhand",
    version,
    about = "Publish, inspect and roll back deckhand releases"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ed25519 signing key: NAME.key (mode 0600) and NAME.pub. Prints the key id.
    Keygen(keys::KeygenArgs),
    /// A deployment's signed trust root: the keys agents accept manifests from.
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCommand,
    },
    /// Validate a release, upload what the origin lacks, and publish a signed manifest as the next version.
    Publish(Box<publish::PublishArgs>),
    /// List a deployment's versions with their artifacts and dates.
    Versions(releases::VersionsArgs),
    /// Publish a new, higher version naming the artifacts of version V. Nothing is re-uploaded.
    Rollback(releases::RollbackArgs),
    /// Check a release: signatures, and every blob and chunk map present with the right size and hash.
    Verify(releases::VerifyArgs),
    /// Export releases for a shop with no internet.
    Bundle {
        #[command(subcommand)]
        command: releases::BundleCommand,
    },
    /// The fleet's certificate authority: who may exchange chunks and manifests over QUIC.
    Fleet {
        #[command(subcommand)]
        command: fleet::FleetCommand,
    },
    /// Move an existing bucket to the layout (seeds 003 and 004): plan, migrate, finalize, roll back,
    /// audit.
    Layout {
        #[command(subcommand)]
        command: layout::LayoutCommand,
    },
    /// Run the whole system on an embedded sample: S3, a signed release, three agents syncing from each
    /// other, recognitions, a new release swapped in live.
    Demo {
        /// Keep the demo's files in this directory (default: a temporary directory, removed at the end).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Agents to run.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
        agents: u64,
        /// Keep the shop running at the end, until Ctrl-C, to look at the shop page.
        #[arg(long)]
        keep: bool,
        /// This process's logs on stderr (by default they go to demo.log in the demo's directory).
        #[arg(short, long)]
        verbose: bool,
    },
    /// A generated shop counter (cards placed, left still, taken away) as MJPEG on stdout: a camera
    /// for the tests and the demo.
    #[command(hide = true)]
    Scenes(scenes::ScenesArgs),
    /// Measure and print performance figures (figures only: this process's logs go to a file).
    Bench {
        /// This process's logs on stderr instead of the log file.
        #[arg(short, long, global = true)]
        verbose: bool,
        /// Where the logs go [default: deckhand-bench.log in the system temporary directory].
        #[arg(long, global = true)]
        log: Option<PathBuf>,
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells its story on stdout and sets up its own logging (to a file unless -v); a bench
    // prints figures, its logs going to a file unless -v.
    match &cli.command {
        Command::Demo { .. } => {}
        Command::Bench {
            verbose: false,
            log,
            ..
        } => {
            let path = log
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("deckhand-bench.log"));
            if let Err(e) = deckhand_agent::telemetry::init_file(&path) {
                eprintln!(
                    "deckhand: error: cannot write the log {}: {e}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        }
        _ => deckhand_agent::telemetry::init(false),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deckhand: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("deckhand: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs one command: the commands that judge something (verify, layout) choose their exit code.
async fn run(command: Command) -> Result<ExitCode, ToolError> {
    match command {
        Command::Keygen(a) => keys::keygen(a)?,
        Command::Scenes(a) => tokio::task::spawn_blocking(move || scenes::run(&a)).await??,
        Command::Keys { cmd } => keys::keys(cmd).await?,
        Command::Publish(a) => publish::run(&a).await?,
        Command::Versions(a) => releases::versions(a).await?,
        Command::Rollback(a) => releases::rollback(a).await?,
        Command::Verify(a) => return releases::verify(a).await,
        Command::Bundle { command } => releases::bundle(command).await?,
        Command::Fleet { command } => fleet::run(command).await?,
        Command::Layout { command } => return layout::run(command).await,
        Command::Demo {
            dir,
            agents,
            keep,
            verbose,
        } => {
            deckhand_tools::shop::demo::run(deckhand_tools::shop::demo::DemoOptions {
                dir,
                agents: agents as usize,
                verbose,
                keep,
            })
            .await?
        }
        Command::Bench { what, .. } => bench::run(what).await?,
    }
    Ok(ExitCode::SUCCESS)
}
