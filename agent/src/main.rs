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
    Run(Box<RunArgs>),
    /// Show a running agent's status (from its HTTP API).
    Status(StatusArgs),
    /// Sideload the newest release of a bundle directory (from `deckhand bundle export`) and activate it.
    Import(ImportArgs),
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
struct TrustArgs {
    /// The agent's data directory.
    #[arg(long, default_value = "/var/lib/deckhand", env = "DECKHAND_DATA_DIR")]
    data_dir: PathBuf,
    /// The deployment this agent follows.
    #[arg(long)]
    deployment: String,
    /// A trusted release-signing public key (NAME.pub); repeatable.
    #[arg(long, required = true)]
    trust: Vec<PathBuf>,
    /// How many distinct trusted keys must sign a manifest.
    #[arg(long, default_value_t = 1)]
    threshold: usize,
    /// auto (Hailo if built with it and a device answers, else CPU), cpu or hailo.
    #[arg(long, default_value = "auto")]
    backend: String,
}

/// `run`'s flags. Each may also be set in the config file (same name, `_` for `-`); a flag wins.
#[derive(clap::Args)]
struct RunArgs {
    /// A TOML config file [default: /etc/deckhand/agent.toml, if present].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The agent's data directory [default: /var/lib/deckhand].
    #[arg(long, env = "DECKHAND_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The deployment this agent follows.
    #[arg(long)]
    deployment: Option<String>,
    /// A trusted release-signing public key (NAME.pub); repeatable.
    #[arg(long)]
    trust: Vec<PathBuf>,
    /// How many distinct trusted keys must sign a manifest [default: 1].
    #[arg(long)]
    threshold: Option<usize>,
    /// auto (Hailo if built with it and a device answers, else CPU), cpu or hailo [default: auto].
    #[arg(long)]
    backend: Option<String>,
    /// Where the HTTP API listens [default: 127.0.0.1:8640].
    #[arg(long)]
    http_listen: Option<String>,
    /// Where QUIC listens for fleet peers [default: 0.0.0.0:8641].
    #[arg(long)]
    quic_listen: Option<String>,
    /// A peer to dial (host:port); repeatable. mDNS finds the others.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// LAN discovery with mDNS: on or off [default: on].
    #[arg(long)]
    mdns: Option<String>,
    /// A directory to watch for images; answers go to --outbox.
    #[arg(long)]
    inbox: Option<PathBuf>,
    /// Where inbox answers go (default: "outbox" beside the inbox).
    #[arg(long)]
    outbox: Option<PathBuf>,
    /// A directory watched for release bundles (`deckhand bundle export`, e.g. a USB stick).
    #[arg(long)]
    bundle_dir: Option<PathBuf>,
    /// The most bytes the store may hold (e.g. 2000000000).
    #[arg(long)]
    store_budget: Option<u64>,
    /// Where releases are published: s3://bucket/prefix or file:///dir. Without it the agent syncs from
    /// peers and bundles only.
    #[arg(long)]
    origin: Option<String>,
    /// An S3-compatible endpoint (path-style addressing is used with it).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// Seconds between polls of the deployment's current.json [default: 30].
    #[arg(long)]
    poll_secs: Option<u64>,
    /// The fleet CA certificate (`deckhand fleet init`).
    #[arg(long)]
    fleet_ca: Option<PathBuf>,
    /// This agent's fleet certificate (`deckhand fleet enroll`); its name is the agent id.
    #[arg(long)]
    fleet_cert: Option<PathBuf>,
    /// This agent's fleet private key.
    #[arg(long)]
    fleet_key: Option<PathBuf>,
    /// The fleet's certificate revocation list (`deckhand fleet revoke`).
    #[arg(long)]
    fleet_crl: Option<PathBuf>,
    /// Cap on bytes per second served to peers [default: none].
    #[arg(long)]
    serve_bytes_per_sec: Option<u64>,
    /// Seconds to wait for a chunk's designated origin fetcher while it makes no progress [default: 20].
    #[arg(long)]
    max_wait_secs: Option<u64>,
    /// Milliseconds to let peers hear of a new release before planning its download [default: 500].
    #[arg(long)]
    settle_ms: Option<u64>,
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
        Command::Run(args) => run_daemon(*args),
        Command::Status(args) => status(args),
        Command::Import(args) => {
            let (trust, backend) = settle(&args.common)?;
            let cfg = daemon::ImportConfig {
                data_dir: args.common.data_dir.clone(),
                deployment: args.common.deployment.clone(),
                trust,
                threshold: args.common.threshold,
                bundle: args.bundle.clone(),
                backend,
            };
            let version = daemon::import(&cfg)
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

fn run_daemon(args: RunArgs) -> anyhow::Result<ExitCode> {
    use deckhand_agent::config::{DEFAULT_CONFIG, Settings};
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let file = Settings::from_file(&path, explicit)?;
    let nonempty = |v: Vec<PathBuf>| (!v.is_empty()).then_some(v);
    let flags = Settings {
        data_dir: args.data_dir,
        deployment: args.deployment,
        trust: nonempty(args.trust),
        threshold: args.threshold,
        origin: args.origin,
        endpoint_url: args.endpoint_url,
        poll_secs: args.poll_secs,
        http_listen: args.http_listen,
        quic_listen: args.quic_listen,
        peers: (!args.peers.is_empty()).then_some(args.peers),
        mdns: args.mdns,
        inbox: args.inbox,
        outbox: args.outbox,
        bundle_dir: args.bundle_dir,
        store_budget: args.store_budget,
        backend: args.backend,
        fleet_ca: args.fleet_ca,
        fleet_cert: args.fleet_cert,
        fleet_key: args.fleet_key,
        fleet_crl: args.fleet_crl,
        serve_bytes_per_sec: args.serve_bytes_per_sec,
        max_wait_secs: args.max_wait_secs,
        settle_ms: args.settle_ms,
    };
    let cfg = flags.over(file).resolve()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(daemon::run(cfg, shutdown_signal()))?;
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

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
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
