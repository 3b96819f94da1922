//! `deckhand layout plan|migrate|finalize|rollback|audit`: moving an existing bucket to the layout
//! (seeds 003 and 004).

use crate::output::emit;
use crate::settle::{BucketArgs, bucket, optional_policy, parse_duration, usage, work_dir};
use clap::{Args, Subcommand};
use deckhand_protocol::layout::Name;
use deckhand_tools::{ToolError, layout};
use jiff::SignedDuration;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// How `layout migrate` and `layout rollback` copy.
#[derive(Args, Clone)]
pub struct CopyArgs {
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
pub enum LayoutCommand {
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

fn print_steps(what: &str, r: &layout::StepReport, json: bool) -> Result<ExitCode, ToolError> {
    emit(json, r, |r| {
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
    })?;
    Ok(if r.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn run(command: LayoutCommand) -> Result<ExitCode, ToolError> {
    use deckhand_protocol::migration::Plan;
    match command {
        LayoutCommand::Plan {
            bucket: b,
            rules,
            out,
            json,
        } => plan(&b, rules.as_deref(), out.as_deref(), json).await,
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
            print_steps("copied and verified", &r, json)
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
            print_steps("deleted the old keys of", &r, json)
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
            print_steps("restored or removed", &r, json)
        }
        LayoutCommand::Audit {
            bucket: b,
            trust,
            json,
        } => audit(&b, &trust, json).await,
    }
}

/// `deckhand layout plan`: the moves the rules make of the bucket's keys, written to `out` if given.
async fn plan(
    b: &BucketArgs,
    rules: Option<&std::path::Path>,
    out: Option<&std::path::Path>,
    json: bool,
) -> Result<ExitCode, ToolError> {
    use deckhand_protocol::migration::Rules;
    let rules = match rules {
        Some(p) => read_rules(p)?,
        None => Rules::defaults(),
    };
    let origin = bucket(&b.origin, b.endpoint_url.as_deref()).await?;
    let plan = layout::plan(&*origin, &rules).await?;
    if let Some(out) = out {
        std::fs::write(out, plan.encode()).map_err(ToolError::io("write plan", out))?;
    }
    emit(json, &plan, |plan| {
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
        if let Some(out) = out {
            eprintln!("plan written to {}", out.display());
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `deckhand layout audit`: what the bucket holds against the layout; fails on any violation.
async fn audit(b: &BucketArgs, trust: &[PathBuf], json: bool) -> Result<ExitCode, ToolError> {
    let policy = optional_policy(trust)?;
    let origin = bucket(&b.origin, b.endpoint_url.as_deref()).await?;
    let work = work_dir()?;
    let r = layout::audit(&*origin, policy.as_ref(), work.path()).await?;
    emit(json, &r, |r| {
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
    })?;
    Ok(if r.violations() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
