//! `deckhand-agent`: the daemon on each Pi, and its maintenance commands.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use deckhand_agent::{daemon, maintenance, telemetry};
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
    /// Serve card recognitions from the active release in the store (HTTP and inbox).
    Run(Box<deckhand_agent::config::Settings>),
    /// Show a running agent's status (from its HTTP API).
    Status(StatusArgs),
    /// Sideload the newest release of a bundle directory (from `deckhand bundle export`) and activate it.
    Import(ImportArgs),
    /// Inspect and maintain the local content-addressed store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Print a config file listing every `run` setting, commented out, with its default (the packaged
    /// /etc/deckhand/agent.toml).
    ExampleConfig,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// List the blobs held, their state, and the pins.
    Ls(StoreArgs),
    /// Re-hash every blob; quarantine corrupt ones. Exits 1 if anything was corrupt.
    Verify(StoreArgs),
    /// Remove every blob that no release pins.
    Gc(StoreArgs),
    /// Write the releases this Pi holds as a bundle (signed manifests and every blob and chunk map they
    /// name, verified on the way out), to restore a bucket with `deckhand bundle push` or carry on a
    /// stick. Safe while the agent runs: it reads the store without taking it.
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The agent's data directory (the store lives in DATA_DIR/store).
    #[arg(long, default_value = "/var/lib/deckhand", env = "DECKHAND_DATA_DIR")]
    data_dir: PathBuf,
    /// The bundle directory to write (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Which releases to export.
    #[arg(long, value_enum, default_value = "all")]
    release: maintenance::export::Which,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TrustArgs {
    /// The agent's data directory.
    #[arg(long, default_value = "/var/lib/deckhand", env = "DECKHAND_DATA_DIR")]
    data_dir: PathBuf,
    /// The deployment this agent follows.
    #[arg(long)]
    deployment: String,
    /// A trusted release-signing public key (NAME.pub); repeatable.
    #[arg(long, required_unless_present = "trust_root")]
    trust: Vec<PathBuf>,
    /// How many distinct trusted keys must sign a manifest (with --trust).
    #[arg(long, default_value_t = 1, conflicts_with = "trust_root")]
    threshold: usize,
    /// The deployment's trust root as installed (`deckhand keys root`), instead of --trust: newer roots
    /// found in the bundle (and the newest this Pi already follows) are followed first.
    #[arg(long, conflicts_with = "trust")]
    trust_root: Option<PathBuf>,
    /// auto (Hailo if built with it and a device answers, else CPU), cpu or hailo.
    #[arg(long, default_value = "auto")]
    backend: String,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The agent's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8640")]
    http: String,
    /// Print the JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ImportArgs {
    #[command(flatten)]
    common: TrustArgs,
    /// The bundle directory.
    #[arg(long)]
    bundle: PathBuf,
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
    // Before any thread: a thread's first allocation fixes the arena limit.
    deckhand_agent::systemd::limit_malloc_arenas();
    let cli = Cli::parse();
    telemetry::init(cli.log_json);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("deckhand-agent: error: {e:#}");
            // A wrong or missing setting is a usage error, as clap's own are.
            if e.downcast_ref::<deckhand_agent::config::ConfigError>()
                .is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Store { command } => store(command),
        Command::ExampleConfig => {
            print!("{}", deckhand_agent::config::example_file());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(_) => run_daemon(),
        Command::Status(args) => status(args),
        Command::Import(args) => {
            let (trust, backend) = settle(&args.common)?;
            let trust_root = args
                .common
                .trust_root
                .as_ref()
                .map(|p| std::fs::read(p).with_context(|| format!("--trust-root {}", p.display())))
                .transpose()?;
            let cfg = daemon::ImportConfig {
                data_dir: args.common.data_dir.clone(),
                deployment: args.common.deployment.clone(),
                trust,
                threshold: args.common.threshold,
                trust_root,
                bundle: args.bundle.clone(),
                backend,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let version = rt
                .block_on(daemon::import(&cfg))
                .with_context(|| format!("importing {}", args.bundle.display()))?;
            println!("activated version {version}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads the trusted keys and the backend choice, naming the flag on error.
fn settle(
    a: &TrustArgs,
) -> anyhow::Result<(
    Vec<deckhand_protocol::PublicKey>,
    deckhand_agent::recognizer::BackendChoice,
)> {
    let backend = a
        .backend
        .parse()
        .map_err(|e| anyhow::anyhow!("--backend {}: {e}", a.backend))?;
    deckhand_protocol::layout::Name::deployment(&a.deployment)
        .map_err(|e| anyhow::anyhow!("--deployment {:?}: {e}", a.deployment))?;
    let trust = a
        .trust
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("--trust {}", p.display()))?;
            deckhand_protocol::PublicKey::from_file_text(&text)
                .map_err(|e| anyhow::anyhow!("--trust {}: {e}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((trust, backend))
}

/// `run`: the settings are parsed once more from the raw arguments after `run`, over the config file
/// (`deckhand_agent::config`), so the file goes through the same parser as the flags.
fn run_daemon() -> anyhow::Result<ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .skip_while(|a| a != "run")
        .skip(1)
        .filter(|a| a != "--log-json")
        .collect();
    let cfg = deckhand_agent::config::parse(&args)?.resolve()?;
    deckhand_agent::systemd::raise_open_files();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        // The handlers are installed now, before the daemon starts anything. A tokio signal future
        // installs its handler only when first polled, and the daemon first polls its shutdown future
        // in the HTTP server's accept loop, whose `select!` may accept (and answer) connections before
        // it polls that branch: a SIGTERM until then ended the process by the default action,
        // uncleanly (seen once in CI, a stop right after the first status answer).
        let shutdown = shutdown_signal().context("installing the SIGTERM and SIGINT handlers")?;
        daemon::run(cfg, shutdown)
            .await
            .map_err(anyhow::Error::from)
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `deckhand-agent status`: the running agent's status, from its HTTP API.
fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let status = rt
        .block_on(deckhand_agent::http::get_status(&args.http))
        .with_context(|| format!("asking the agent at {}", args.http))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    Ok(ExitCode::SUCCESS)
}

/// Installs the SIGTERM and SIGINT handlers at once; the future resolves on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutting down");
    })
}

fn store(command: StoreCommand) -> anyhow::Result<ExitCode> {
    let (args, what) = match &command {
        StoreCommand::Ls(a) => (a, "list"),
        StoreCommand::Verify(a) => (a, "verify"),
        StoreCommand::Gc(a) => (a, "gc"),
        // Not as the store's owner: the agent may be running.
        StoreCommand::Export(a) => return export(a),
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
        StoreCommand::Export(a) => export(&a),
    }
}

/// `store export`: reads the store without opening it as its owner, so the agent may keep running.
fn export(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let report = maintenance::export::export(&args.data_dir, &args.out, args.release)
        .with_context(|| {
            format!(
                "exporting the store in {} to {}",
                args.data_dir.display(),
                args.out.display()
            )
        })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for r in &report.releases {
            println!(
                "{} release: {} version {} (manifest {})",
                r.which, r.deployment, r.version, r.manifest_id
            );
        }
        if let (Some(first), Some(last)) = (report.roots.first(), report.roots.last()) {
            println!("trust roots: versions {first} to {last}");
        }
        if report.fleet_bundle {
            println!("fleet bundle: the one this Pi took");
        }
        println!(
            "wrote {} blobs and chunk maps, {} bytes, to {}",
            report.blobs, report.bytes, report.dir
        );
    }
    Ok(ExitCode::SUCCESS)
}
