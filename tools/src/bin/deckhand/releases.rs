//! `deckhand versions`, `rollback`, `verify` and `bundle export|push`: the releases in an origin, read
//! back, checked, published again, and carried to and from a shop without internet.

use crate::output::emit;
use crate::settle::{
    OriginArgs, optional_policy, parse_duration, policy, read_public_keys, read_secret_key, target,
    usage, work_dir,
};
use clap::{Args, Subcommand};
use deckhand_protocol::TrustPolicy;
use deckhand_tools::{ToolError, publish, releases};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct VersionsArgs {
    #[command(flatten)]
    origin: OriginArgs,
    /// Public keys to check signatures with (repeatable); without, signatures are not checked.
    #[arg(long)]
    trust: Vec<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub async fn versions(a: VersionsArgs) -> Result<(), ToolError> {
    let t = target(&a.origin).await?;
    let policy = optional_policy(&a.trust)?;
    let lines = releases::versions(&*t.origin, &t.deployment, policy.as_ref()).await?;
    emit(a.json, &lines, |lines| {
        if lines.is_empty() {
            println!("no versions of {} in {}", t.deployment, t.origin.url());
        }
        for v in lines {
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
    })
}

#[derive(Args)]
pub struct RollbackArgs {
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
}

pub async fn rollback(a: RollbackArgs) -> Result<(), ToolError> {
    let t = target(&a.origin).await?;
    let key = read_secret_key(&a.key)?;
    let expires_in = parse_duration("expires-in", &a.expires_in)?;
    let mut keys = read_public_keys(&a.trust)?;
    keys.push(key.public().clone());
    let policy = TrustPolicy::new(keys, 1).map_err(|e| usage("trust", "", e))?;
    let (_, published) =
        publish::rollback(&*t.origin, &t.deployment, a.to, &key, &policy, expires_in).await?;
    let report = serde_json::json!({
        "version": published.version, "rolled_back_to": a.to, "manifest_id": published.id.to_string()
    });
    emit(a.json, &report, |_| {
        println!(
            "published version {} with the artifacts of version {}, manifest {}",
            published.version, a.to, published.id
        );
    })
}

#[derive(Args)]
pub struct VerifyArgs {
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
}

/// Exits 1 when the release has problems (each printed).
pub async fn verify(a: VerifyArgs) -> Result<ExitCode, ToolError> {
    let t = target(&a.origin).await?;
    let policy = policy(&a.trust, a.threshold)?;
    let work = work_dir()?;
    let report =
        releases::verify(&*t.origin, &t.deployment, a.version, &policy, work.path()).await?;
    emit(a.json, &report, |report| {
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
    })?;
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Subcommand)]
pub enum BundleCommand {
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

pub async fn bundle(command: BundleCommand) -> Result<(), ToolError> {
    match command {
        BundleCommand::Export {
            origin,
            version,
            out,
            trust,
            json,
        } => {
            let t = target(&origin).await?;
            let policy = optional_policy(&trust)?;
            let report =
                releases::bundle_export(&*t.origin, &t.deployment, version, policy.as_ref(), &out)
                    .await?;
            emit(json, &report, |report| {
                println!(
                    "exported version {} to {}: {} blobs and chunk maps, {} bytes",
                    report.version, report.dir, report.blobs, report.bytes
                );
            })
        }
        BundleCommand::Push {
            origin,
            from,
            trust,
            threshold,
            json,
        } => {
            let t = target(&origin).await?;
            let policy = policy(&trust, threshold)?;
            let work = work_dir()?;
            let report =
                releases::bundle_push(&from, &*t.origin, &t.deployment, &policy, work.path())
                    .await?;
            emit(json, &report, |report| {
                for m in &report.manifests {
                    let what = if m.written {
                        "written"
                    } else {
                        "already there"
                    };
                    println!("version {} (manifest {}): {what}", m.version, m.id);
                }
                println!(
                    "uploaded {} blobs and chunk maps ({} bytes with their packs); {} already there",
                    report.uploaded, report.bytes_uploaded, report.present
                );
                if !report.roots.is_empty() {
                    println!("trust roots written: versions {:?}", report.roots);
                }
                if report.fleet_bundle {
                    println!("fleet bundle written");
                }
                match report.current_set_to {
                    Some(v) => println!("current.json now names version {v}"),
                    None => println!(
                        "current.json left at version {}",
                        report
                            .current_before
                            .map_or("?".to_owned(), |v| v.to_string())
                    ),
                }
            })?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            Ok(())
        }
    }
}
