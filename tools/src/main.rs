//! `deckhand`: the operator's CLI. Flags are parsed by clap, then validated into settled values; a bad
//! value is a usage error (exit 2) naming the flag. Failures exit 1.

use clap::{Args, Parser, Subcommand};
use deckhand_agent::release::SettingsOverrides;
use deckhand_protocol::layout::Name;
use deckhand_protocol::manifest::{ChannelLayout, Metric};
use deckhand_protocol::{PublicKey, SecretKey, TrustPolicy};
use deckhand_tools::origin::{Bucket, OriginConfig, OriginUrl};
use deckhand_tools::publish::{Input, Inputs, PublishOptions};
use deckhand_tools::{ToolError, bench, keygen, layout, publish, releases};
use jiff::SignedDuration;
use std::path::{Path, PathBuf};
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

#[derive(Args, Clone)]
struct OriginArgs {
    /// Where releases live: s3://bucket/prefix or file:///dir.
    #[arg(long)]
    origin: String,
    /// An S3-compatible endpoint; path-style addressing is used with it.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// The deployment name (e.g. shop-1).
    #[arg(long)]
    deployment: String,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create root version 1 of a deployment, signed by every --key it lists: written to --out (what
    /// agents are installed with, `--trust-root`) and to the bucket.
    Root {
        #[command(flatten)]
        origin: OriginArgs,
        /// A signing key the root lists (NAME.key); repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// How many distinct listed keys must sign a manifest (and the next root).
        #[arg(long, default_value_t = 1)]
        threshold: u16,
        /// How long the root admits manifests: 365d, 52w, ...
        #[arg(long, default_value = "365d")]
        expires_in: String,
        /// Where to write the root for installing on the Pis.
        #[arg(long)]
        out: PathBuf,
    },
    /// Publish the next root of a deployment: --new-key replaces the keys, signed by enough of the
    /// current root's keys (--key) and by the new ones. Agents follow it at their next poll.
    Rotate {
        #[command(flatten)]
        origin: OriginArgs,
        /// A key of the current root (NAME.key); repeatable, up to its threshold.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// A key of the new root (NAME.key); repeatable.
        #[arg(long = "new-key", required = true)]
        new_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        threshold: u16,
        #[arg(long, default_value = "365d")]
        expires_in: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ed25519 signing key: NAME.key (mode 0600) and NAME.pub. Prints the key id.
    Keygen {
        /// Path and base name of the key files.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A deployment's signed trust root: the keys agents accept manifests from.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Validate a release, upload what the origin lacks, and publish a signed manifest as the next version.
    Publish(Box<PublishArgs>),
    /// List a deployment's versions with their artifacts and dates.
    Versions {
        #[command(flatten)]
        origin: OriginArgs,
        /// Public keys to check signatures with (repeatable); without, signatures are not checked.
        #[arg(long)]
        trust: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Publish a new, higher version naming the artifacts of version V. Nothing is re-uploaded.
    Rollback {
        #[command(flatten)]
        origin: OriginArgs,
        /// The version whose artifacts to publish again.
        #[arg(long)]
        to: u64,
        /// The signing key.
        #[arg(long)]
        key: PathBuf,
        /// Further keys version V may be signed with (the signing key is always trusted).
        #[arg(long)]
        trust: Vec<PathBuf>,
        /// How long the new manifest stays valid (e.g. 30d, 12h).
        #[arg(long, default_value = "30d")]
        expires_in: String,
        #[arg(long)]
        json: bool,
    },
    /// Check a release: signatures, and every blob and chunk map present with the right size and hash.
    Verify {
        #[command(flatten)]
        origin: OriginArgs,
        /// The version to check (default: current.json).
        #[arg(long)]
        version: Option<u64>,
        /// Trusted public keys (repeatable, at least one).
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// How many distinct trusted keys must have signed.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        #[arg(long)]
        json: bool,
    },
    /// Export releases for a shop with no internet.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// The fleet's certificate authority: who may exchange chunks and manifests over QUIC.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Move an existing bucket to the layout (seeds 003 and 004): plan, migrate, finalize, roll back,
    /// audit.
    Layout {
        #[command(subcommand)]
        command: LayoutCommand,
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
    /// Measure and print performance figures.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    origin: OriginArgs,
    /// The signing key (NAME.key from `deckhand keygen`).
    #[arg(long)]
    key: PathBuf,
    /// The Hailo model (a local path or s3://bucket/key).
    #[arg(long)]
    hef: String,
    /// The same model as ONNX.
    #[arg(long)]
    onnx: String,
    /// The usearch index of reference embeddings.
    #[arg(long)]
    index: String,
    /// index.json: row -> card id.
    #[arg(long)]
    labels: String,
    /// metadata.json: card id -> details.
    #[arg(long)]
    metadata: String,
    /// embeddings.npy (optional).
    #[arg(long)]
    embeddings: Option<String>,
    /// How long the manifest stays valid (e.g. 30d, 12h, 90m).
    #[arg(long, default_value = "30d")]
    expires_in: String,
    /// IMAGE=CARD_ID: an image the release must recognise as CARD_ID before agents activate it (repeatable).
    #[arg(long)]
    canary: Vec<String>,
    /// Model input size, WxH or N (default: read from the ONNX input).
    #[arg(long)]
    input_size: Option<String>,
    /// Input channel layout, nchw or nhwc (default: read from the ONNX input).
    #[arg(long)]
    layout: Option<String>,
    /// Per-channel mean, R,G,B, for pixels scaled to 0..1 (default: ImageNet's).
    #[arg(long)]
    mean: Option<String>,
    /// Per-channel standard deviation, R,G,B (default: ImageNet's).
    #[arg(long)]
    std: Option<String>,
    /// Index metric, cos, ip or l2sq (default: from the index header).
    #[arg(long)]
    metric: Option<String>,
    /// Minimum similarity for a match (default 0.5).
    #[arg(long)]
    min_score: Option<f32>,
    /// How agents switch to the release once they hold it: at-once, or together (each waits until every
    /// live agent of the shop is ready, or its deadline passes). Default: each agent's own setting.
    #[arg(long)]
    activate: Option<deckhand_protocol::switch::Mode>,
    /// No agent switches before this time (RFC 3339, e.g. 2026-12-03T03:00:00Z).
    #[arg(long)]
    not_before: Option<String>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Write the signed manifest and every blob it names to DIR (itself a file:// origin).
    Export {
        #[command(flatten)]
        origin: OriginArgs,
        /// The version to export (default: current.json).
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        out: PathBuf,
        /// Check the manifest against these keys before exporting.
        #[arg(long)]
        trust: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Restore a bundle (from `bundle export` or `deckhand-agent store export`) into an origin: verify
    /// every manifest and blob, upload what the origin lacks, write each manifest under its own version
    /// (never over a different one), and point current.json at the newest unless it names a newer one.
    Push {
        #[command(flatten)]
        origin: OriginArgs,
        /// The bundle directory.
        #[arg(long)]
        from: PathBuf,
        /// A trusted release-signing public key (NAME.pub); repeatable.
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// How many distinct trusted keys must have signed each manifest.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        #[arg(long)]
        json: bool,
    },
}

/// Where a layout command works: a bucket (and prefix), without a deployment.
#[derive(Args, Clone)]
struct BucketArgs {
    /// The bucket: s3://bucket[/prefix] (or file:///dir).
    #[arg(long)]
    origin: String,
    /// An S3-compatible endpoint; path-style addressing is used with it.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
}

/// How `layout migrate` and `layout rollback` copy.
#[derive(Args, Clone)]
struct CopyArgs {
    /// Copies in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: u64,
    /// How each copy is checked: etag (size and entity tag; content where tags cannot be compared)
    /// or content (size and a hash of both objects, always).
    #[arg(long, default_value = "etag")]
    verify: String,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

impl CopyArgs {
    fn settle(&self) -> Result<layout::MigrateOptions, ToolError> {
        let verify = match self.verify.as_str() {
            "etag" => layout::VerifyMode::Etag,
            "content" => layout::VerifyMode::Content,
            other => return Err(usage("verify", other, "expected etag or content")),
        };
        Ok(layout::MigrateOptions {
            parallel: self.parallel as usize,
            verify,
            progress: !self.no_progress,
            ..layout::MigrateOptions::default()
        })
    }
}

#[derive(Subcommand)]
enum LayoutCommand {
    /// List every object and classify it: already in the layout, moved (old key -> new key), or left
    /// alone (with the reason). Writes nothing to the bucket.
    Plan {
        #[command(flatten)]
        bucket: BucketArgs,
        /// A TOML file of extra rules, tried before the defaults: [[rule]] from = "old/prefix",
        /// to = "datasets/NAME" (or models/training/JOB, models/compilation/JOB/TARGET), suffix = ".hef".
        #[arg(long)]
        rules: Option<PathBuf>,
        /// Write the plan (JSON, the input of `migrate`) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy every planned object to its new key (server-side), verify each copy, and journal it in the
    /// bucket under migration/. Deletes nothing. Run it again to resume.
    Migrate {
        /// The plan file from `layout plan --out`.
        #[arg(long)]
        plan: PathBuf,
        /// An S3-compatible endpoint; path-style addressing is used with it.
        #[arg(long, env = "AWS_ENDPOINT_URL")]
        endpoint_url: Option<String>,
        #[command(flatten)]
        copy: CopyArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete the old key of every verified copy at least --min-age old, after checking both once more.
    Finalize {
        #[command(flatten)]
        bucket: BucketArgs,
        /// The journal id `migrate` printed.
        #[arg(long)]
        journal: String,
        /// How long a copy must have been verified before its source is deleted (e.g. 24h, 0).
        #[arg(long, default_value = "24h")]
        min_age: String,
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
        parallel: u64,
        #[arg(long)]
        no_progress: bool,
        #[arg(long)]
        json: bool,
    },
    /// Restore the layout a journal started from: copy back what finalize deleted (verified), then remove
    /// the new keys the migration created.
    Rollback {
        #[command(flatten)]
        bucket: BucketArgs,
        #[arg(long)]
        journal: String,
        #[command(flatten)]
        copy: CopyArgs,
        #[arg(long)]
        json: bool,
    },
    /// Check the bucket: keys fit the layout, manifests verify, every blob they name is present with the
    /// right size and hash, migrated copies are reachable, no orphaned blobs; counts and sizes per folder.
    /// Exits 1 on any violation.
    Audit {
        #[command(flatten)]
        bucket: BucketArgs,
        /// Public keys manifests must be signed with (repeatable); without, signatures are not checked.
        #[arg(long)]
        trust: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Make the fleet CA in DIR: ca.crt (copy it to every Pi), ca.key (keep it with the operator).
    Init {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// A name for the fleet (shown in the CA certificate).
        #[arg(long, default_value = "deckhand")]
        name: String,
    },
    /// Issue an agent certificate: OUT/NAME.crt and OUT/NAME.key, for the Pi with that agent id.
    Enroll {
        #[arg(long)]
        dir: PathBuf,
        /// The agent id (lowercase letters, digits, '-').
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
    /// Revoke an agent's certificates: rewrites DIR/crl.pem; give it to agents with --fleet-crl.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// The fleet as one agent sees it: its peers, their versions and what was exchanged.
    Status {
        /// The agent's HTTP address (host:port).
        #[arg(long)]
        agent: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
    /// Recognition accuracy on perturbed photos, throughput, latency, search time, cold start, swap p99.
    Recognizer {
        /// Use the seeds' full 17,592 x 768 reference DB (otherwise 2,200 rows).
        #[arg(long)]
        full: bool,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells its story on stdout and sets up its own logging (to a file unless -v).
    if !matches!(cli.command, Command::Demo { .. }) {
        deckhand_agent::telemetry::init(false);
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

fn usage(flag: &str, value: &str, why: impl std::fmt::Display) -> ToolError {
    ToolError::Usage(format!("--{flag} {value:?}: {why}"))
}

/// Settled origin flags.
struct Target {
    origin: std::sync::Arc<dyn Bucket>,
    config: OriginConfig,
    deployment: Name,
}

async fn target(a: &OriginArgs) -> Result<Target, ToolError> {
    let url: OriginUrl = a
        .origin
        .parse()
        .map_err(|e| usage("origin", &a.origin, e))?;
    let deployment =
        Name::deployment(&a.deployment).map_err(|e| usage("deployment", &a.deployment, e))?;
    let config = OriginConfig {
        endpoint_url: a.endpoint_url.clone().filter(|e| !e.is_empty()),
        ..OriginConfig::default()
    };
    let origin = deckhand_tools::origin::connect(&url, &config).await?;
    Ok(Target {
        origin,
        config,
        deployment,
    })
}

fn read_secret_key(path: &Path) -> Result<SecretKey, ToolError> {
    let text = std::fs::read_to_string(path).map_err(ToolError::io("read key", path))?;
    SecretKey::from_file_text(&text).map_err(|e| usage("key", &path.display().to_string(), e))
}

fn read_public_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>, ToolError> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(ToolError::io("read trusted key", p))?;
            PublicKey::from_file_text(&text)
                .map_err(|e| usage("trust", &p.display().to_string(), e))
        })
        .collect()
}

/// A policy of one trusted signature from any of `paths`, or `None` when no key is given (signatures are
/// then not checked, and output says so).
/// The trust policy of `--trust` keys and `--threshold`.
fn policy(paths: &[PathBuf], threshold: usize) -> Result<TrustPolicy, ToolError> {
    TrustPolicy::new(read_public_keys(paths)?, threshold)
        .map_err(|e| usage("threshold", &threshold.to_string(), e))
}

fn optional_policy(paths: &[PathBuf]) -> Result<Option<TrustPolicy>, ToolError> {
    let keys = read_public_keys(paths)?;
    if keys.is_empty() {
        return Ok(None);
    }
    TrustPolicy::new(keys, 1)
        .map(Some)
        .map_err(|e| usage("trust", "", e))
}

/// Parses `30d`, `12h`, `90m`, `45s` or `2w`.
fn parse_duration(flag: &str, s: &str) -> Result<SignedDuration, ToolError> {
    let bad = |why: &str| usage(flag, s, why);
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| bad("needs a unit: s, m, h, d or w"))?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| bad("expected a whole number and a unit, like 30d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad("the unit must be s, m, h, d or w")),
    };
    if n <= 0 {
        return Err(bad("must be above zero"));
    }
    n.checked_mul(secs)
        .map(SignedDuration::from_secs)
        .ok_or_else(|| bad("too long"))
}

fn parse_triple(flag: &str, s: &str) -> Result<[f32; 3], ToolError> {
    let v: Vec<f32> = s
        .split(',')
        .map(|p| p.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| usage(flag, s, "expected three numbers, R,G,B"))?;
    let arr: [f32; 3] = v
        .try_into()
        .map_err(|_| usage(flag, s, "expected exactly three numbers, R,G,B"))?;
    if arr.iter().any(|x| !x.is_finite()) {
        return Err(usage(flag, s, "numbers must be finite"));
    }
    Ok(arr)
}

fn parse_input(flag: &str, s: &str) -> Result<Input, ToolError> {
    s.parse().map_err(|e: String| usage(flag, s, e))
}

fn publish_options(a: &PublishArgs, deployment: Name) -> Result<PublishOptions, ToolError> {
    let input_size = match &a.input_size {
        None => None,
        Some(s) => {
            let parse = |p: &str| p.parse::<u32>().ok().filter(|v| (1..=4096).contains(v));
            let (w, h) = match s.split_once('x') {
                Some((w, h)) => (parse(w), parse(h)),
                None => (parse(s), parse(s)),
            };
            match (w, h) {
                (Some(w), Some(h)) => Some((w, h)),
                _ => return Err(usage("input-size", s, "expected WxH or N, each 1..=4096")),
            }
        }
    };
    let layout = match a.layout.as_deref() {
        None => None,
        Some("nchw") => Some(ChannelLayout::Nchw),
        Some("nhwc") => Some(ChannelLayout::Nhwc),
        Some(other) => return Err(usage("layout", other, "expected nchw or nhwc")),
    };
    let metric = match a.metric.as_deref() {
        None => None,
        Some("cos") => Some(Metric::Cos),
        Some("ip") => Some(Metric::Ip),
        Some("l2sq") => Some(Metric::L2sq),
        Some(other) => return Err(usage("metric", other, "expected cos, ip or l2sq")),
    };
    if let Some(m) = a.min_score
        && !m.is_finite()
    {
        return Err(usage(
            "min-score",
            &m.to_string(),
            "must be a finite number",
        ));
    }
    let mut canaries = Vec::new();
    for c in &a.canary {
        let (img, card) = c
            .rsplit_once('=')
            .filter(|(i, c)| !i.is_empty() && !c.is_empty())
            .ok_or_else(|| usage("canary", c, "expected IMAGE=CARD_ID"))?;
        canaries.push((parse_input("canary", img)?, card.to_owned()));
    }
    Ok(PublishOptions {
        deployment,
        inputs: Inputs {
            hef: parse_input("hef", &a.hef)?,
            onnx: parse_input("onnx", &a.onnx)?,
            index: parse_input("index", &a.index)?,
            labels: parse_input("labels", &a.labels)?,
            metadata: parse_input("metadata", &a.metadata)?,
            embeddings: a
                .embeddings
                .as_deref()
                .map(|e| parse_input("embeddings", e))
                .transpose()?,
            canaries,
        },
        expires_in: parse_duration("expires-in", &a.expires_in)?,
        overrides: SettingsOverrides {
            input_size,
            layout,
            mean: a
                .mean
                .as_deref()
                .map(|m| parse_triple("mean", m))
                .transpose()?,
            std: a
                .std
                .as_deref()
                .map(|s| parse_triple("std", s))
                .transpose()?,
            metric,
            min_score: a.min_score,
        },
        activate: a.activate,
        not_before: a
            .not_before
            .as_deref()
            .map(|t| {
                t.parse::<jiff::Timestamp>()
                    .map_err(|e| usage("not-before", t, format!("not an RFC 3339 time: {e}")))
            })
            .transpose()?,
        progress: !a.no_progress,
    })
}

fn work_dir() -> Result<tempfile::TempDir, ToolError> {
    tempfile::Builder::new()
        .prefix("deckhand-")
        .tempdir()
        .map_err(ToolError::io(
            "create a work directory in",
            &std::env::temp_dir(),
        ))
}

async fn keys(cmd: KeysCmd) -> Result<(), ToolError> {
    let read_keys = |paths: &[PathBuf]| -> Result<Vec<SecretKey>, ToolError> {
        paths.iter().map(|p| read_secret_key(p)).collect()
    };
    match cmd {
        KeysCmd::Root {
            origin,
            keys,
            threshold,
            expires_in,
            out,
        } => {
            let expires_in = parse_duration("expires-in", &expires_in)?;
            let t = target(&origin).await?;
            let w = deckhand_tools::trust_root::init(
                Some(&*t.origin),
                &t.deployment,
                &read_keys(&keys)?,
                threshold,
                expires_in,
                jiff::Timestamp::now(),
            )
            .await?;
            std::fs::write(&out, &w.envelope).map_err(ToolError::io("write", &out))?;
            eprintln!(
                "wrote root version 1 of {} to {} and the bucket",
                t.deployment,
                out.display()
            );
        }
        KeysCmd::Rotate {
            origin,
            keys,
            new_keys,
            threshold,
            expires_in,
            json,
        } => {
            let expires_in = parse_duration("expires-in", &expires_in)?;
            let t = target(&origin).await?;
            let w = deckhand_tools::trust_root::rotate(
                &*t.origin,
                &t.deployment,
                &read_keys(&keys)?,
                &read_keys(&new_keys)?,
                threshold,
                expires_in,
                jiff::Timestamp::now(),
            )
            .await?;
            if json {
                print_json(&serde_json::json!({"version": w.version}));
            } else {
                println!("published root version {} of {}", w.version, t.deployment);
            }
        }
    }
    Ok(())
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(command: Command) -> Result<ExitCode, ToolError> {
    match command {
        Command::Keygen { out, json } => {
            let pair = keygen::keygen(&out)?;
            if json {
                print_json(
                    &serde_json::json!({"key_id": pair.key_id, "secret": pair.secret, "public": pair.public}),
                );
            } else {
                println!("{}", pair.key_id);
                eprintln!(
                    "wrote {} (keep it secret) and {}",
                    pair.secret.display(),
                    pair.public.display()
                );
            }
        }
        Command::Keys { cmd } => keys(cmd).await?,
        Command::Publish(a) => {
            let key = read_secret_key(&a.key)?;
            let deployment = Name::deployment(&a.origin.deployment)
                .map_err(|e| usage("deployment", &a.origin.deployment, e))?;
            let opts = publish_options(&a, deployment)?;
            let t = target(&a.origin).await?;
            let work = work_dir()?;
            let (prepared, published) =
                publish::publish(&*t.origin, &t.config, &key, &opts, work.path()).await?;
            if a.json {
                print_json(&serde_json::json!({
                    "version": published.version,
                    "manifest_id": published.id.to_string(),
                    "manifest_key": published.manifest_key,
                    "uploaded": prepared.uploaded.len(),
                    "already_present": prepared.skipped.len(),
                    "bytes_uploaded": prepared.bytes_uploaded,
                    "current_updated": published.current_updated,
                }));
            } else {
                println!(
                    "published version {} manifest {}",
                    published.version, published.id
                );
                eprintln!(
                    "uploaded {} blobs and chunk maps ({} bytes of blobs); {} already present",
                    prepared.uploaded.len(),
                    prepared.bytes_uploaded,
                    prepared.skipped.len()
                );
                if !published.current_updated {
                    eprintln!(
                        "note: current.json already names a newer version and was left as it is"
                    );
                }
            }
        }
        Command::Versions {
            origin,
            trust,
            json,
        } => {
            let t = target(&origin).await?;
            let policy = optional_policy(&trust)?;
            let lines = releases::versions(&*t.origin, &t.deployment, policy.as_ref()).await?;
            if json {
                print_json(&lines);
            } else if lines.is_empty() {
                println!("no versions of {} in {}", t.deployment, t.origin.url());
            } else {
                for v in &lines {
                    println!(
                        "version {:>4}  created {}  expires {}  signature {}{}",
                        v.version,
                        v.created_at.as_deref().unwrap_or("?"),
                        v.expires_at.as_deref().unwrap_or("?"),
                        v.signature,
                        if v.current { "  (current)" } else { "" }
                    );
                    for (role, blob, size) in &v.artifacts {
                        println!("    {role:<10} {blob}  {size} bytes");
                    }
                }
            }
        }
        Command::Rollback {
            origin,
            to,
            key,
            trust,
            expires_in,
            json,
        } => {
            let t = target(&origin).await?;
            let key = read_secret_key(&key)?;
            let expires_in = parse_duration("expires-in", &expires_in)?;
            let mut keys = read_public_keys(&trust)?;
            keys.push(key.public().clone());
            let policy = TrustPolicy::new(keys, 1).map_err(|e| usage("trust", "", e))?;
            let (_, published) =
                publish::rollback(&*t.origin, &t.deployment, to, &key, &policy, expires_in).await?;
            if json {
                print_json(&serde_json::json!({
                    "version": published.version, "rolled_back_to": to, "manifest_id": published.id.to_string()
                }));
            } else {
                println!(
                    "published version {} with the artifacts of version {to}, manifest {}",
                    published.version, published.id
                );
            }
        }
        Command::Verify {
            origin,
            version,
            trust,
            threshold,
            json,
        } => {
            let t = target(&origin).await?;
            let policy = policy(&trust, threshold)?;
            let work = work_dir()?;
            let report =
                releases::verify(&*t.origin, &t.deployment, version, &policy, work.path()).await?;
            if json {
                print_json(&report);
            } else {
                println!(
                    "{}: version {}, {} blobs, {} bytes checked",
                    report.manifest_key,
                    report.version.map_or("?".to_owned(), |v| v.to_string()),
                    report.blobs_checked,
                    report.bytes_checked
                );
                for p in &report.problems {
                    println!("PROBLEM: {p}");
                }
                if report.problems.is_empty() {
                    println!("ok");
                }
            }
            if !report.problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Bundle {
            command:
                BundleCommand::Export {
                    origin,
                    version,
                    out,
                    trust,
                    json,
                },
        } => {
            let t = target(&origin).await?;
            let policy = optional_policy(&trust)?;
            let report =
                releases::bundle_export(&*t.origin, &t.deployment, version, policy.as_ref(), &out)
                    .await?;
            if json {
                print_json(&report);
            } else {
                println!(
                    "exported version {} to {}: {} blobs and chunk maps, {} bytes",
                    report.version, report.dir, report.blobs, report.bytes
                );
            }
        }
        Command::Bundle {
            command:
                BundleCommand::Push {
                    origin,
                    from,
                    trust,
                    threshold,
                    json,
                },
        } => {
            let t = target(&origin).await?;
            let policy = policy(&trust, threshold)?;
            let work = work_dir()?;
            let report =
                releases::bundle_push(&from, &*t.origin, &t.deployment, &policy, work.path())
                    .await?;
            if json {
                print_json(&report);
            } else {
                for m in &report.manifests {
                    println!(
                        "version {} (manifest {}): {}",
                        m.version,
                        m.id,
                        if m.written {
                            "written"
                        } else {
                            "already there"
                        }
                    );
                }
                println!(
                    "uploaded {} blobs and chunk maps ({} bytes); {} already there",
                    report.uploaded, report.bytes_uploaded, report.present
                );
                match report.current_set_to {
                    Some(v) => println!("current.json now names version {v}"),
                    None => println!(
                        "current.json left at version {}",
                        report
                            .current_before
                            .map_or("?".to_owned(), |v| v.to_string())
                    ),
                }
            }
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
        }
        Command::Fleet { command } => fleet(command).await?,
        Command::Layout { command } => return layout(command).await,
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
            .await?;
        }
        Command::Bench { what } => {
            let result = match what {
                BenchCommand::Store {
                    size_mib,
                    dir,
                    rounds,
                } => bench::store(size_mib, dir.as_deref(), rounds as usize),
                BenchCommand::Chunking => bench::chunking(),
                BenchCommand::Recognizer { full } => {
                    deckhand_tools::bench::recognizer::run(full).await
                }
                BenchCommand::Fleet {
                    agents,
                    size,
                    uplink_mbps,
                    budget_mbps,
                } => {
                    deckhand_tools::bench::fleet::run(
                        agents as usize,
                        size,
                        uplink_mbps,
                        budget_mbps,
                    )
                    .await
                }
                BenchCommand::Footprint {
                    size,
                    idle_secs,
                    dir,
                } => deckhand_tools::bench::footprint::run(size, idle_secs, dir.as_deref()).await,
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
            };
            result?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn bucket(
    origin: &str,
    endpoint_url: Option<&str>,
) -> Result<std::sync::Arc<dyn Bucket>, ToolError> {
    let url: OriginUrl = origin.parse().map_err(|e| usage("origin", origin, e))?;
    let config = OriginConfig {
        endpoint_url: endpoint_url.filter(|e| !e.is_empty()).map(str::to_owned),
        ..OriginConfig::default()
    };
    Ok(deckhand_tools::origin::connect(&url, &config).await?)
}

fn journal_name(s: &str) -> Result<Name, ToolError> {
    Name::new("journal", s).map_err(|e| usage("journal", s, e))
}

fn read_rules(path: &Path) -> Result<deckhand_protocol::migration::Rules, ToolError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RulesFile {
        #[serde(default)]
        rule: Vec<deckhand_protocol::migration::RuleSpec>,
    }
    let text = std::fs::read_to_string(path).map_err(ToolError::io("read rules", path))?;
    let file: RulesFile = toml::from_str(&text)
        .map_err(|e| usage("rules", &path.display().to_string(), e.message()))?;
    deckhand_protocol::migration::Rules::with_defaults(&file.rule)
        .map_err(|e| usage("rules", &path.display().to_string(), e))
}

fn print_steps(what: &str, r: &layout::StepReport, json: bool) -> ExitCode {
    if json {
        print_json(r);
    } else {
        println!(
            "journal {}: {what} {} objects ({} bytes); {} done before; {} waiting; {} failed",
            r.journal,
            r.done,
            r.bytes,
            r.already,
            r.waiting,
            r.failures.len()
        );
        for f in &r.failures {
            println!("  failed: {f}");
        }
    }
    if r.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn layout(command: LayoutCommand) -> Result<ExitCode, ToolError> {
    use deckhand_protocol::migration::{Plan, Rules};
    match command {
        LayoutCommand::Plan {
            bucket: b,
            rules,
            out,
            json,
        } => {
            let rules = match &rules {
                Some(p) => read_rules(p)?,
                None => Rules::defaults(),
            };
            let origin = bucket(&b.origin, b.endpoint_url.as_deref()).await?;
            let plan = layout::plan(&*origin, &rules).await?;
            if let Some(out) = &out {
                std::fs::write(out, plan.encode()).map_err(ToolError::io("write plan", out))?;
            }
            if json {
                print_json(&plan);
            } else {
                for m in &plan.moves {
                    println!("{} -> {}", m.source, m.target);
                }
                for u in &plan.unplaced {
                    println!("left alone: {} ({})", u.key, u.reason);
                }
                eprintln!(
                    "{} objects to move ({} bytes), {} already in the layout, {} left alone",
                    plan.moves.len(),
                    plan.bytes(),
                    plan.in_place,
                    plan.unplaced.len()
                );
                if let Some(out) = &out {
                    eprintln!("plan written to {}", out.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LayoutCommand::Migrate {
            plan,
            endpoint_url,
            copy,
            json,
        } => {
            let opts = copy.settle()?;
            let bytes = std::fs::read(&plan).map_err(ToolError::io("read plan", &plan))?;
            let p =
                Plan::decode(&bytes).map_err(|e| usage("plan", &plan.display().to_string(), e))?;
            let origin = bucket(&p.origin, endpoint_url.as_deref()).await?;
            if !json {
                eprintln!(
                    "journal {}",
                    p.journal_id().map_err(|e| usage("plan", "", e))?
                );
            }
            let r = layout::migrate(&*origin, &p, &opts).await?;
            Ok(print_steps("copied and verified", &r, json))
        }
        LayoutCommand::Finalize {
            bucket: b,
            journal,
            min_age,
            parallel,
            no_progress,
            json,
        } => {
            let id = journal_name(&journal)?;
            // Zero (with or without a unit) is allowed here: finalize at once.
            let digits = min_age.trim_end_matches(['s', 'm', 'h', 'd', 'w']);
            let min_age = if !digits.is_empty() && digits.bytes().all(|b| b == b'0') {
                SignedDuration::ZERO
            } else {
                parse_duration("min-age", &min_age)?
            };
            let origin = bucket(&b.origin, b.endpoint_url.as_deref()).await?;
            let r =
                layout::finalize(&*origin, &id, min_age, parallel as usize, !no_progress).await?;
            Ok(print_steps("deleted the old keys of", &r, json))
        }
        LayoutCommand::Rollback {
            bucket: b,
            journal,
            copy,
            json,
        } => {
            let id = journal_name(&journal)?;
            let opts = copy.settle()?;
            let origin = bucket(&b.origin, b.endpoint_url.as_deref()).await?;
            let r = layout::rollback(&*origin, &id, &opts).await?;
            Ok(print_steps("restored or removed", &r, json))
        }
        LayoutCommand::Audit {
            bucket: b,
            trust,
            json,
        } => {
            let policy = optional_policy(&trust)?;
            let origin = bucket(&b.origin, b.endpoint_url.as_deref()).await?;
            let work = work_dir()?;
            let r = layout::audit(&*origin, policy.as_ref(), work.path()).await?;
            if json {
                print_json(&r);
            } else {
                println!("{} objects, {} bytes", r.objects, r.bytes);
                for (folder, c) in &r.folders {
                    println!("  {folder}/: {} objects, {} bytes", c.objects, c.bytes);
                }
                println!(
                    "{} manifests, {} blobs checked; {} legacy keys awaiting finalize",
                    r.manifests, r.blobs_checked, r.awaiting_finalize
                );
                for (what, list) in [
                    ("misplaced", &r.misplaced),
                    ("bad manifest", &r.bad_manifests),
                    ("missing", &r.missing),
                    ("unreachable", &r.unreachable),
                    ("orphan", &r.orphans),
                ] {
                    for item in list {
                        println!("  {what}: {item}");
                    }
                }
                println!("{} violations", r.violations());
            }
            Ok(if r.violations() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn fleet(command: FleetCommand) -> Result<(), ToolError> {
    use deckhand_tools::fleet_ca::CaDir;
    let fleet_err = |e: deckhand_tools::fleet_ca::CaError| match e {
        e @ deckhand_tools::fleet_ca::CaError::AgentId(_) => {
            ToolError::Usage(format!("--name: {e}"))
        }
        e => ToolError::Ca(e),
    };
    match command {
        FleetCommand::Init { dir, name } => {
            let ca = CaDir::new(&dir);
            ca.init(&name).map_err(fleet_err)?;
            println!("fleet CA in {}", dir.display());
            eprintln!(
                "copy {} to every Pi; keep ca.key with the operator",
                ca.cert_path().display()
            );
        }
        FleetCommand::Enroll {
            dir,
            name,
            out,
            days,
        } => {
            let (crt, key) = CaDir::new(&dir)
                .enroll(&name, days, &out)
                .map_err(fleet_err)?;
            println!("{name}");
            eprintln!(
                "wrote {} and {} (copy both to the Pi, with ca.crt)",
                crt.display(),
                key.display()
            );
        }
        FleetCommand::Revoke { dir, name } => {
            let ca = CaDir::new(&dir);
            let n = ca.revoke(&name).map_err(fleet_err)?;
            println!(
                "revoked {n} certificate(s) of {name}; give {} to every agent (--fleet-crl)",
                ca.crl_path().display()
            );
        }
        FleetCommand::Status { agent, json } => {
            let view =
                deckhand_agent::http::get_fleet(&agent)
                    .await
                    .map_err(|e| ToolError::AgentApi {
                        name: format!("--agent {agent}"),
                        why: e.to_string(),
                    })?;
            if json {
                print_json(&view);
            } else {
                print!("{}", view.render());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_name_the_flag() {
        assert_eq!(
            parse_duration("expires-in", "30d").unwrap(),
            SignedDuration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_duration("expires-in", "90m").unwrap(),
            SignedDuration::from_secs(5400)
        );
        for bad in ["30", "d", "-1d", "0h", "3y", "1.5d", ""] {
            let err = parse_duration("expires-in", bad).unwrap_err();
            assert!(
                matches!(err, ToolError::Usage(ref m) if m.starts_with("--expires-in")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn triples_and_inputs_parse_or_name_the_flag() {
        assert_eq!(parse_triple("mean", "0.5, 0.5,0.5").unwrap(), [0.5; 3]);
        assert!(
            parse_triple("mean", "1,2")
                .unwrap_err()
                .to_string()
                .starts_with("--mean")
        );
        assert!(
            parse_triple("std", "a,b,c")
                .unwrap_err()
                .to_string()
                .starts_with("--std")
        );
        assert_eq!(
            parse_input("hef", "s3://b/models/compilation/j/hailo8/m.hef").unwrap(),
            Input::Remote {
                bucket: "b".into(),
                key: "models/compilation/j/hailo8/m.hef".into()
            }
        );
        assert!(
            parse_input("hef", "s3://b")
                .unwrap_err()
                .to_string()
                .starts_with("--hef")
        );
    }
}
