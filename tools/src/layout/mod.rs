//! `deckhand layout`: plan, migrate, finalize, roll back and audit a bucket's key layout (seeds 003 and
//! 004: copy, verify, wait, then delete; and a way back).
//!
//! The decisions (which key goes where, what a journal adds up to) are pure code in
//! `deckhand_protocol::migration`; the journal's I/O is `crate::layout::journal`. This module runs the
//! steps against the origin with bounded parallelism, recording each verified step in the journal.
//!
//! Every step checks before it acts, so a run killed at any point and run again neither repeats work nor
//! loses an object: a copy made but not yet journaled is found by comparing the target with the plan; a
//! source is deleted only after its copy was checked once more; a target is removed by a rollback only
//! when its source is back and verified.

pub mod journal;

use crate::check::{check_blob, describe};
use crate::layout::journal::Journal;
use crate::origin::{Bucket, CopyOptions, ObjectInfo, OriginError};
use deckhand_protocol::envelope::inspect_unverified;
use deckhand_protocol::layout::{Key, Name};
use deckhand_protocol::manifest::BlobRef;
use deckhand_protocol::migration::{self, Listed, Move, Plan, Record, Rules, VerifiedBy};
use deckhand_protocol::{BlobId, TrustPolicy};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::path::Path;

/// How a copy is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyMode {
    /// Size and entity tag; where the tags cannot be compared (a multipart source, a copy made in parts),
    /// the content of both objects is hashed.
    Etag,
    /// Size, and the content of both objects hashed, always.
    Content,
}

/// How `migrate` runs.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Copies in flight at once.
    pub parallel: usize,
    /// Steps per journal batch (a killed run redoes at most this many checks, never a copy).
    pub batch: usize,
    pub verify: VerifyMode,
    pub copy: CopyOptions,
    pub progress: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            parallel: 16,
            batch: 64,
            verify: VerifyMode::Etag,
            copy: CopyOptions::default(),
            progress: true,
        }
    }
}

/// What a `migrate`, `finalize` or `rollback` run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepReport {
    pub journal: String,
    /// Steps this run did (copies, deletions, restores, removals).
    pub done: usize,
    /// Steps an earlier run had already done and journaled.
    pub already: usize,
    /// Steps not due yet (finalize: copies younger than --min-age).
    pub waiting: usize,
    pub bytes: u64,
    /// Steps that failed, each with the key and the reason; the object was left as it was.
    pub failures: Vec<String>,
}

fn bar(enabled: bool, total: u64, what: &str) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {pos}/{len} objects, {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// Lists the origin and classifies every key.
pub async fn plan(origin: &dyn Bucket, rules: &Rules) -> Result<Plan, LayoutError> {
    let layout = origin.layout();
    // S3 lists every object with its entity tag; where a server does not, HEAD asks for it (objects that
    // meet at one new key are compared by it).
    let listing: Vec<Listed> = futures::stream::iter(origin.list(&layout.root()).await?)
        .map(|o| async move {
            let etag = match o.etag {
                Some(e) => Some(e),
                None => origin.head(&o.key).await?.and_then(|i| i.etag),
            };
            Ok::<_, OriginError>(Listed {
                key: o.key,
                size: o.size,
                etag,
            })
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok(migration::plan(
        layout,
        rules,
        &listing,
        &origin.url().to_string(),
        Timestamp::now(),
    ))
}

/// Whether an object still is what was listed or recorded: same size, and the same entity tag where both
/// are known.
fn same(info: &ObjectInfo, size: u64, etag: &Option<String>) -> bool {
    info.size == size
        && match (&info.etag, etag) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

/// Why one step of a migration, finalize or rollback failed for one object. The step is not journaled;
/// the others go on, and a re-run tries it again.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
    #[error("the plan was made for {planned}, not {origin}")]
    OtherOrigin { planned: String, origin: String },
    #[error("journal {0} was already finalized or rolled back; make a new plan")]
    JournalClosed(String),
    #[error("journal {0} was rolled back; nothing is deleted")]
    RolledBack(String),
    #[error("{target}: the copy of {source_key} is missing right after copying")]
    CopyMissing { target: String, source_key: String },
    #[error("{target}: the copy is {copy} bytes, the source {source_key} {size} bytes")]
    CopySize {
        target: String,
        source_key: String,
        copy: u64,
        size: u64,
    },
    #[error(
        "{target}: the copy's content differs from {source_key} (blake3 {copy} against {original})"
    )]
    CopyContent {
        target: String,
        source_key: String,
        copy: String,
        original: String,
    },
    #[error("{0}: the source is gone")]
    SourceGone(String),
    #[error(
        "{key}: changed since the plan was made ({size} bytes, tag {etag:?}; planned {planned_size} bytes, tag {planned_etag:?}); make a new plan"
    )]
    SourceChanged {
        key: String,
        size: u64,
        etag: Option<String>,
        planned_size: u64,
        planned_etag: Option<String>,
    },
    #[error("{key}: changed since the plan was made ({size} bytes, tag {etag:?}); make a new plan")]
    TargetChanged {
        key: String,
        size: u64,
        etag: Option<String>,
    },
    #[error("not a copy record")]
    NotACopy,
    #[error(
        "{target}: the copy changed since it was verified ({size} bytes, tag {etag:?}); {source_key} kept"
    )]
    CopyChanged {
        target: String,
        source_key: String,
        size: u64,
        etag: Option<String>,
    },
    #[error("{target}: the copy is gone; {source_key} kept")]
    CopyGone { target: String, source_key: String },
    #[error("{source_key}: changed since it was copied ({size} bytes, tag {etag:?}); kept")]
    SourceChangedSinceCopy {
        source_key: String,
        size: u64,
        etag: Option<String>,
    },
    #[error("{target}: gone, so {source_key} cannot be restored from it")]
    RestoreFromGone { target: String, source_key: String },
    #[error("{source_key}: {size} bytes, not {planned}; {target} kept")]
    RestoredSize {
        source_key: String,
        size: u64,
        planned: u64,
        target: String,
    },
    #[error("{source_key}: missing; {target} kept")]
    RestoredMissing { source_key: String, target: String },
}

/// Checks that `target` holds what `source` holds.
async fn verify_copy(
    origin: &dyn Bucket,
    source: (&str, &ObjectInfo),
    target: &str,
    mode: VerifyMode,
) -> Result<(VerifiedBy, Option<String>), LayoutError> {
    let (skey, sinfo) = source;
    let tinfo = origin
        .head(target)
        .await?
        .ok_or_else(|| LayoutError::CopyMissing {
            target: target.to_owned(),
            source_key: skey.to_owned(),
        })?;
    if tinfo.size != sinfo.size {
        return Err(LayoutError::CopySize {
            target: target.to_owned(),
            source_key: skey.to_owned(),
            copy: tinfo.size,
            size: sinfo.size,
        });
    }
    if mode == VerifyMode::Etag && sinfo.etag.is_some() && tinfo.etag == sinfo.etag {
        return Ok((VerifiedBy::Etag, tinfo.etag));
    }
    let (a, b) = tokio::join!(origin.hash(skey), origin.hash(target));
    let (a, b) = (a?, b?);
    if a != b {
        return Err(LayoutError::CopyContent {
            target: target.to_owned(),
            source_key: skey.to_owned(),
            copy: b.1.to_hex().to_string(),
            original: a.1.to_hex().to_string(),
        });
    }
    Ok((VerifiedBy::Content, tinfo.etag))
}

/// Copies one planned move, or finds the copy an interrupted run made, and verifies it.
async fn copy_one(
    origin: &dyn Bucket,
    m: &Move,
    opts: &MigrateOptions,
) -> Result<Record, LayoutError> {
    let src = origin
        .head(&m.source)
        .await?
        .ok_or_else(|| LayoutError::SourceGone(m.source.clone()))?;
    if !same(&src, m.size, &m.etag) {
        return Err(LayoutError::SourceChanged {
            key: m.source.clone(),
            size: src.size,
            etag: src.etag,
            planned_size: m.size,
            planned_etag: m.etag.clone(),
        });
    }
    let existing = origin.head(&m.target).await?;
    match existing {
        Some(t) if same(&t, m.size, &m.etag) => {
            // Copied by an earlier, interrupted run (or it held this content already): verified below.
        }
        Some(t) if m.target_existed => {
            return Err(LayoutError::TargetChanged {
                key: m.target.clone(),
                size: t.size,
                etag: t.etag,
            });
        }
        _ => {
            origin
                .copy(&m.source, &m.target, m.size, &opts.copy)
                .await?;
        }
    }
    let (verified, target_etag) =
        verify_copy(origin, (&m.source, &src), &m.target, opts.verify).await?;
    Ok(Record::Copied {
        source: m.source.clone(),
        target: m.target.clone(),
        size: m.size,
        etag: src.etag,
        target_etag,
        created: !m.target_existed,
        verified,
        at: Timestamp::now(),
    })
}

/// Runs `step` over `items` with `parallel` in flight, journaling the records of each batch as it
/// completes. Failures are collected, not fatal: the other objects still move.
#[allow(clippy::too_many_arguments)]
async fn run_steps<'a, T, F, Fut>(
    origin: &dyn Bucket,
    journal: &mut Journal,
    items: Vec<&'a T>,
    batch: usize,
    parallel: usize,
    bar: &ProgressBar,
    report: &mut StepReport,
    step: F,
) -> Result<(), LayoutError>
where
    F: Fn(&'a T) -> Fut,
    Fut: Future<Output = Result<(Record, u64), LayoutError>>,
{
    for chunk in items.chunks(batch.max(1)) {
        let results: Vec<_> = futures::stream::iter(chunk.iter().map(|&item| step(item)))
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        let mut records = Vec::new();
        for r in results {
            bar.inc(1);
            match r {
                Ok((record, bytes)) => {
                    report.done += 1;
                    report.bytes += bytes;
                    records.push(record);
                }
                Err(why) => {
                    tracing::warn!(problem = %why, "layout step failed");
                    report.failures.push(why.to_string());
                }
            }
        }
        journal.append(origin, records).await?;
    }
    Ok(())
}

/// Copies every move of `plan` not yet journaled, verifying each copy. Deletes nothing.
pub async fn migrate(
    origin: &dyn Bucket,
    plan: &Plan,
    opts: &MigrateOptions,
) -> Result<StepReport, LayoutError> {
    if plan.origin != origin.url().to_string() {
        return Err(LayoutError::OtherOrigin {
            planned: plan.origin.clone(),
            origin: origin.url().to_string(),
        });
    }
    let mut journal = Journal::create_or_resume(origin, plan).await?;
    let mut report = StepReport {
        journal: journal.id.to_string(),
        ..StepReport::default()
    };
    if !journal.state.deleted.is_empty() || !journal.state.restored.is_empty() {
        return Err(LayoutError::JournalClosed(journal.id.to_string()));
    }
    let todo: Vec<&Move> = plan
        .moves
        .iter()
        .filter(|m| !journal.state.copied.contains_key(&m.source))
        .collect();
    report.already = plan.moves.len() - todo.len();
    let bar = bar(opts.progress, todo.len() as u64, "copying");
    tracing::info!(journal = %journal.id, todo = todo.len(), already = report.already, "migrating");
    run_steps(
        origin,
        &mut journal,
        todo,
        opts.batch,
        opts.parallel,
        &bar,
        &mut report,
        |m| async move { copy_one(origin, m, opts).await.map(|r| (r, m.size)) },
    )
    .await?;
    bar.finish_and_clear();
    Ok(report)
}

/// Deletes the source of every verified copy at least `min_age` old, after checking both objects once
/// more.
pub async fn finalize(
    origin: &dyn Bucket,
    journal_id: &Name,
    min_age: SignedDuration,
    parallel: usize,
    progress: bool,
) -> Result<StepReport, LayoutError> {
    let mut journal = Journal::load(origin, journal_id).await?;
    if !journal.state.restored.is_empty() || !journal.state.removed.is_empty() {
        return Err(LayoutError::RolledBack(journal_id.to_string()));
    }
    let now = Timestamp::now();
    let due: Vec<Record> = journal
        .state
        .finalizable(now, min_age)
        .into_iter()
        .cloned()
        .collect();
    let mut report = StepReport {
        journal: journal_id.to_string(),
        already: journal.state.deleted.len(),
        waiting: journal
            .state
            .copied
            .len()
            .saturating_sub(journal.state.deleted.len() + due.len()),
        ..StepReport::default()
    };
    let bar = bar(progress, due.len() as u64, "deleting");
    run_steps(
        origin,
        &mut journal,
        due.iter().collect(),
        64,
        parallel,
        &bar,
        &mut report,
        |r| async move { delete_source(origin, r).await },
    )
    .await?;
    bar.finish_and_clear();
    Ok(report)
}

async fn delete_source(origin: &dyn Bucket, r: &Record) -> Result<(Record, u64), LayoutError> {
    let Record::Copied {
        source,
        target,
        size,
        etag,
        target_etag,
        ..
    } = r
    else {
        return Err(LayoutError::NotACopy);
    };
    match origin.head(target).await? {
        Some(t) if same(&t, *size, target_etag) => {}
        Some(t) => {
            return Err(LayoutError::CopyChanged {
                target: target.clone(),
                source_key: source.clone(),
                size: t.size,
                etag: t.etag,
            });
        }
        None => {
            return Err(LayoutError::CopyGone {
                target: target.clone(),
                source_key: source.clone(),
            });
        }
    }
    match origin.head(source).await? {
        // Deleted by an earlier run killed before it journaled the deletion.
        None => {}
        Some(s) if same(&s, *size, etag) => {
            origin.delete(source).await?;
        }
        Some(s) => {
            return Err(LayoutError::SourceChangedSinceCopy {
                source_key: source.clone(),
                size: s.size,
                etag: s.etag,
            });
        }
    }
    Ok((
        Record::Deleted {
            source: source.clone(),
            at: Timestamp::now(),
        },
        *size,
    ))
}

/// Restores the layout a journal started from: copies back every deleted source (verified), then removes
/// every target the migration created, once its source is in place.
pub async fn rollback(
    origin: &dyn Bucket,
    journal_id: &Name,
    opts: &MigrateOptions,
) -> Result<StepReport, LayoutError> {
    let mut journal = Journal::load(origin, journal_id).await?;
    let mut report = StepReport {
        journal: journal_id.to_string(),
        ..StepReport::default()
    };
    let state = journal.state.clone();
    // 1. Copy back what finalize deleted.
    let restore: Vec<&Record> = state
        .copied
        .values()
        .filter(|r| match r {
            Record::Copied { source, .. } => {
                state.deleted.contains(source) && !state.restored.contains(source)
            }
            _ => false,
        })
        .collect();
    report.already += state.restored.len();
    // 2. Remove created targets: journaled copies, and copies an interrupted migrate made before it could
    //    journal them (a planned target the plan did not find, present now).
    let mut remove: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for r in state.copied.values() {
        if let Record::Copied {
            source,
            target,
            size,
            created: true,
            ..
        } = r
            && !state.removed.contains(target)
        {
            remove.insert(target.clone(), (source.clone(), *size));
        }
    }
    for m in &journal.plan.moves {
        if !m.target_existed
            && !state.copied.contains_key(&m.source)
            && !state.removed.contains(&m.target)
        {
            remove
                .entry(m.target.clone())
                .or_insert((m.source.clone(), m.size));
        }
    }
    report.already += state.removed.len();
    let bar = bar(
        opts.progress,
        (restore.len() + remove.len()) as u64,
        "restoring",
    );
    run_steps(
        origin,
        &mut journal,
        restore,
        opts.batch,
        opts.parallel,
        &bar,
        &mut report,
        |r| async move { restore_source(origin, r, opts).await },
    )
    .await?;
    let removals: Vec<(String, (String, u64))> = remove.into_iter().collect();
    run_steps(
        origin,
        &mut journal,
        removals.iter().collect(),
        opts.batch,
        opts.parallel,
        &bar,
        &mut report,
        |(target, (source, size))| async move {
            remove_target(origin, source, target, *size).await
        },
    )
    .await?;
    bar.finish_and_clear();
    Ok(report)
}

async fn restore_source(
    origin: &dyn Bucket,
    r: &Record,
    opts: &MigrateOptions,
) -> Result<(Record, u64), LayoutError> {
    let Record::Copied {
        source,
        target,
        size,
        etag,
        ..
    } = r
    else {
        return Err(LayoutError::NotACopy);
    };
    let done = |size| {
        Ok((
            Record::Restored {
                source: source.clone(),
                at: Timestamp::now(),
            },
            size,
        ))
    };
    let tinfo = origin
        .head(target)
        .await?
        .ok_or_else(|| LayoutError::RestoreFromGone {
            target: target.clone(),
            source_key: source.clone(),
        })?;
    if let Some(s) = origin.head(source).await?
        && same(&s, *size, etag)
    {
        // Restored by an earlier run killed before it journaled the restore: check it.
        verify_copy(origin, (target, &tinfo), source, opts.verify).await?;
        return done(0);
    }
    origin.copy(target, source, tinfo.size, &opts.copy).await?;
    verify_copy(origin, (target, &tinfo), source, opts.verify).await?;
    done(*size)
}

async fn remove_target(
    origin: &dyn Bucket,
    source: &str,
    target: &str,
    size: u64,
) -> Result<(Record, u64), LayoutError> {
    // Never remove the only copy: the source must be in place with the planned size.
    match origin.head(source).await? {
        Some(s) if s.size == size => {}
        Some(s) => {
            return Err(LayoutError::RestoredSize {
                source_key: source.to_owned(),
                size: s.size,
                planned: size,
                target: target.to_owned(),
            });
        }
        None => {
            return Err(LayoutError::RestoredMissing {
                source_key: source.to_owned(),
                target: target.to_owned(),
            });
        }
    }
    match origin.delete(target).await {
        Ok(()) | Err(OriginError::NotFound { .. }) => Ok((
            Record::Removed {
                target: target.to_owned(),
                at: Timestamp::now(),
            },
            0,
        )),
        Err(e) => Err(e.into()),
    }
}

/// Objects and bytes under one top-level folder.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct FolderCount {
    pub objects: u64,
    pub bytes: u64,
}

/// What `audit` found. Every list is sorted.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditReport {
    pub objects: u64,
    pub bytes: u64,
    pub folders: BTreeMap<String, FolderCount>,
    /// Keys that do not fit the layout, with the reason.
    pub misplaced: Vec<String>,
    /// Legacy keys a migration copied and has not finalized: in place on purpose, not violations.
    pub awaiting_finalize: u64,
    /// Manifests that do not verify or cannot be read.
    pub bad_manifests: Vec<String>,
    pub manifests: u64,
    pub blobs_checked: u64,
    /// Blobs or chunk maps a manifest names that are missing, of the wrong size or content.
    pub missing: Vec<String>,
    /// Migrated copies that are no longer reachable at their new key.
    pub unreachable: Vec<String>,
    /// Content-addressed objects no manifest names.
    pub orphans: Vec<String>,
}

impl AuditReport {
    pub fn violations(&self) -> usize {
        self.misplaced.len()
            + self.bad_manifests.len()
            + self.missing.len()
            + self.unreachable.len()
            + self.orphans.len()
    }
}

/// Checks a whole origin: every key fits the layout (legacy keys of an unfinished migration excepted);
/// every manifest reads (and verifies, with `trust`); every blob and chunk map a manifest names is present
/// with the right size and hash; every migrated copy is reachable; no blob is orphaned.
pub async fn audit(
    origin: &dyn Bucket,
    trust: Option<&TrustPolicy>,
    work: &Path,
) -> Result<AuditReport, LayoutError> {
    let layout = origin.layout();
    let root = layout.root();
    let listing = origin.list(&root).await?;
    let journals = journal::journals(origin).await?;
    // A rolled-back journal's old keys are the live layout again: they must fit like any other.
    let live: Vec<&Journal> = journals
        .iter()
        .filter(|j| j.state.restored.is_empty() && j.state.removed.is_empty())
        .collect();
    let migrating: BTreeSet<&str> = live
        .iter()
        .flat_map(|j| j.state.migrating_sources())
        .collect();
    let mut report = AuditReport::default();
    let mut manifests = Vec::new();
    let mut blobs_present = BTreeSet::new();
    let mut packs_present = BTreeSet::new();
    for obj in &listing {
        report.objects += 1;
        report.bytes += obj.size;
        let rel = obj.key.strip_prefix(root.as_str()).unwrap_or(&obj.key);
        let top = rel.split('/').next().unwrap_or_default();
        let f = report.folders.entry(top.to_owned()).or_default();
        f.objects += 1;
        f.bytes += obj.size;
        match layout.classify(&obj.key) {
            Ok(Key::Manifest { .. } | Key::Current { .. }) => manifests.push(obj.key.clone()),
            Ok(Key::Blob(id)) => {
                blobs_present.insert(id);
            }
            Ok(Key::Pack(map)) => {
                packs_present.insert((map, obj.key.clone()));
            }
            Ok(Key::Delta { map, .. }) => {
                packs_present.insert((map, obj.key.clone()));
            }
            Ok(_) => {}
            Err(_) if migrating.contains(obj.key.as_str()) => report.awaiting_finalize += 1,
            Err(e) => report.misplaced.push(e.to_string()),
        }
    }
    // Manifests and what they name.
    let mut named: BTreeMap<BlobRef, String> = BTreeMap::new();
    let mut maps = BTreeSet::new();
    for key in &manifests {
        report.manifests += 1;
        let bytes = origin.get(key).await?;
        let m = match trust {
            Some(t) => t
                .verify(&bytes, Timestamp::now())
                .map(|v| v.manifest)
                .or_else(|e| match e {
                    // An expired manifest is history, not a violation: its blobs are still checked.
                    deckhand_protocol::VerifyError::Expired { .. } => {
                        t.verify_ignoring_expiry(&bytes).map(|v| v.manifest)
                    }
                    other => Err(other),
                }),
            None => inspect_unverified(&bytes),
        };
        match m {
            Ok(m) => {
                for b in m.blobs() {
                    maps.insert(b.chunk_map);
                    named
                        .entry(b)
                        .or_insert_with(|| format!("{} of {key}", describe(&m, &b.blob)));
                }
            }
            Err(e) => report.bad_manifests.push(format!("{key}: {e}")),
        }
    }
    for (b, what) in &named {
        report.blobs_checked += 1;
        check_blob(origin, b, what, work, &mut report.missing).await?;
    }
    // A pack or delta pack is named through its chunk map.
    let orphan_packs: Vec<String> = packs_present
        .iter()
        .filter(|(map, _)| !maps.contains(map))
        .map(|(_, key)| format!("{key} is the pack of no manifest's chunk map"))
        .collect();
    let named_ids: BTreeSet<BlobId> = named.keys().map(|b| b.blob).chain(maps).collect();
    report.orphans = blobs_present
        .difference(&named_ids)
        .map(|id| format!("{} is named by no manifest", layout.blob(id)))
        .chain(orphan_packs)
        .collect();
    // Migrated copies must be reachable at their new keys (R4.4, R6.2).
    let present: BTreeMap<&str, u64> = listing.iter().map(|o| (o.key.as_str(), o.size)).collect();
    for j in &live {
        for r in j.state.copied.values() {
            if let Record::Copied { target, size, .. } = r
                && present.get(target.as_str()) != Some(size)
            {
                report.unreachable.push(format!(
                    "{target} (journal {}): missing or not {size} bytes",
                    j.id
                ));
            }
        }
    }
    report.misplaced.sort();
    report.missing.sort();
    Ok(report)
}
