//! Layout migration (seeds 003 and 004) as pure code: the rules that map legacy keys into the layout,
//! the plan they make of a bucket listing, and the journal's records and the state they add up to.
//!
//! `deckhand layout` does the I/O (listing, copying, deleting, writing the journal); every decision is
//! made here, from a listing and `now`, so it is tested without a bucket.
//!
//! The journal lives in the bucket under `migration/{journal}/`: `plan.json` (the plan, written before the
//! first copy) and numbered batches of [`Record`]s. A record is written only after what it records was
//! done and verified, so replaying the batches in order gives a state that never claims more than is true;
//! work done but not yet recorded when a run was killed is found again by comparing the bucket with the
//! plan.

use crate::layout::{Key, Layout, LayoutError, Name, RelPath};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The schema of a plan file.
pub const PLAN_SCHEMA: &str = "deckhand.layout-plan/v1";
/// The schema of a journal batch.
pub const BATCH_SCHEMA: &str = "deckhand.layout-journal/v1";
/// The largest plan or batch accepted, in bytes.
pub const MAX_JOURNAL_OBJECT: usize = 256 * 1024 * 1024;

/// Why a rule, a plan or a journal is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    #[error("rule {index} (from {from:?}): {why}")]
    Rule {
        index: usize,
        from: String,
        why: String,
    },
    #[error("destination {to:?}: {why}")]
    Destination { to: String, why: String },
    #[error("{what} is not valid JSON of schema {schema}: {why}")]
    Decode {
        what: &'static str,
        schema: &'static str,
        why: String,
    },
    #[error("{what} is {len} bytes, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("journal batch {seq} belongs to journal {found:?}, not {expected:?}")]
    WrongJournal {
        seq: u64,
        expected: String,
        found: String,
    },
}

/// Where a rule sends keys: one of the layout's data areas, optionally below a sub-path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Dataset {
        dataset: Name,
        under: Option<RelPath>,
    },
    Training {
        job: Name,
        under: Option<RelPath>,
    },
    Compilation {
        job: Name,
        target: Name,
        under: Option<RelPath>,
    },
}

impl Destination {
    /// Parses `datasets/NAME[/SUB]`, `models/training/JOB[/SUB]` or
    /// `models/compilation/JOB/TARGET[/SUB]` (a trailing `/` is allowed).
    pub fn parse(to: &str) -> Result<Self, MigrationError> {
        let bad = |why: String| MigrationError::Destination {
            to: to.to_owned(),
            why,
        };
        let trimmed = to.strip_suffix('/').unwrap_or(to);
        let parts: Vec<&str> = trimmed.split('/').collect();
        let under = |from: usize| -> Result<Option<RelPath>, MigrationError> {
            if parts.len() <= from {
                return Ok(None);
            }
            RelPath::new("sub-path", &parts[from..].join("/"))
                .map(Some)
                .map_err(|e| bad(e.to_string()))
        };
        let name = |what: &'static str, s: &str| Name::new(what, s).map_err(|e| bad(e.to_string()));
        match parts.as_slice() {
            ["datasets", dataset, ..] => Ok(Destination::Dataset {
                dataset: name("dataset", dataset)?,
                under: under(2)?,
            }),
            ["models", "training", job, ..] => Ok(Destination::Training {
                job: name("job", job)?,
                under: under(3)?,
            }),
            ["models", "compilation", job, target, ..] => Ok(Destination::Compilation {
                job: name("job", job)?,
                target: name("target", target)?,
                under: under(4)?,
            }),
            _ => Err(bad(
                "expected datasets/NAME, models/training/JOB or models/compilation/JOB/TARGET"
                    .into(),
            )),
        }
    }

    /// The new key of an object whose key, below the rule's prefix, is `rest`.
    pub fn key(&self, layout: &Layout, rest: &RelPath) -> Result<String, LayoutError> {
        let path = |under: &Option<RelPath>| match under {
            None => Ok(rest.clone()),
            Some(u) => RelPath::new("path", &format!("{u}/{rest}")),
        };
        Ok(match self {
            Destination::Dataset { dataset, under } => layout.dataset(dataset, &path(under)?),
            Destination::Training { job, under } => layout.training(job, &path(under)?),
            Destination::Compilation { job, target, under } => {
                layout.compilation(job, target, &path(under)?)
            }
        })
    }
}

/// A rule as written in a rules file (`[[rule]] from = "...", to = "...", suffix = "..."`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// A legacy key prefix, relative to the origin's prefix (a trailing `/` is implied).
    pub from: String,
    /// Only keys ending with this (e.g. `.hef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// The destination: `datasets/NAME[/SUB]`, `models/training/JOB[/SUB]` or
    /// `models/compilation/JOB/TARGET[/SUB]`.
    pub to: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    /// Ends with `/`.
    from: String,
    suffix: Option<String>,
    to: Destination,
}

/// An ordered list of rules: the first that matches a key places it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules(Vec<Rule>);

const PROJECT: &str = "project/pokemon-card-recognition";

/// The seeds' legacy layouts (000: data/ and models/ at the bucket root; 001-003: the project folder),
/// most specific first.
fn default_specs() -> Vec<RuleSpec> {
    let r = |from: String, suffix: Option<&str>, to: &str| RuleSpec {
        from,
        suffix: suffix.map(str::to_owned),
        to: to.to_owned(),
    };
    let mut out = Vec::new();
    // Datasets, at the bucket root (seed 000) and in the project folder (seeds 001-003).
    for base in ["data".to_owned(), format!("{PROJECT}/data")] {
        for (sub, to) in [
            ("raw/card_images", "datasets/card-images"),
            ("raw", "datasets/raw"),
            ("processed/classification", "datasets/card-classification"),
            ("processed/detection", "datasets/card-detection"),
            ("processed", "datasets/processed"),
            ("calibration", "datasets/hailo-calibration"),
            ("reference", "datasets/reference-db"),
        ] {
            out.push(r(format!("{base}/{sub}"), None, to));
        }
    }
    let p = |s: &str| format!("{PROJECT}/{s}");
    out.extend([
        // Models in the project folder (seeds 001-003): calibration images are a dataset; the HEF is a
        // compilation output for the Hailo-8; the rest are training outputs.
        r(
            p("models/efficientnet-hailo/calibration"),
            None,
            "datasets/hailo-calibration",
        ),
        r(
            p("models/efficientnet-hailo"),
            None,
            "models/compilation/efficientnet-hailo/hailo8",
        ),
        r(
            p("models/efficientnet-student"),
            None,
            "models/training/efficientnet-student",
        ),
        r(
            p("models/dinov3-teacher"),
            None,
            "models/training/dinov3-teacher",
        ),
        r(p("models"), None, "models/training/project-models"),
        // Project bookkeeping: experiment tracking and profiles belong to training runs; metrics,
        // dashboards, the project manifest and README are data about the project.
        r(p("experiments"), None, "models/training/experiments"),
        r(p("profiling"), None, "models/training/profiling"),
        r(p("pipelines"), None, "models/training/pipelines"),
        r(p("analytics"), None, "datasets/project-analytics"),
        r(p("metadata"), None, "datasets/project-metadata"),
        r(PROJECT.to_owned(), None, "datasets/project-metadata"),
        // Older model folders at the bucket root (seed 000).
        r(
            "models/embedding/student".into(),
            Some(".hef"),
            "models/compilation/embedding-student/hailo8",
        ),
        r(
            "models/embedding/student".into(),
            None,
            "models/training/embedding-student",
        ),
        r(
            "models/embedding/teacher".into(),
            None,
            "models/training/embedding-teacher",
        ),
        r("models/detection".into(), None, "models/training/detection"),
        r("models/registry".into(), None, "models/training/registry"),
        r("pipelines".into(), None, "models/training/pipelines"),
    ]);
    out
}

impl Rules {
    /// Validates rules, in order.
    pub fn new(specs: &[RuleSpec]) -> Result<Self, MigrationError> {
        let mut out = Vec::with_capacity(specs.len());
        for (index, s) in specs.iter().enumerate() {
            let bad = |why: String| MigrationError::Rule {
                index,
                from: s.from.clone(),
                why,
            };
            let from = s.from.trim_end_matches('/');
            RelPath::new("from", from).map_err(|e| bad(e.to_string()))?;
            if from.starts_with("migration/") || from == "migration" {
                return Err(bad(
                    "the migration/ folder holds journals and is never moved".into(),
                ));
            }
            if s.suffix.as_deref().is_some_and(str::is_empty) {
                return Err(bad(
                    "an empty suffix matches everything: leave it out".into()
                ));
            }
            let to = Destination::parse(&s.to).map_err(|e| bad(e.to_string()))?;
            out.push(Rule {
                from: format!("{from}/"),
                suffix: s.suffix.clone(),
                to,
            });
        }
        Ok(Self(out))
    }

    /// The rules for the seeds' legacy layouts.
    pub fn defaults() -> Self {
        // The default specs are constants checked by a test; an invalid one would leave no rules rather
        // than panic.
        Self::new(&default_specs()).unwrap_or(Self(Vec::new()))
    }

    /// `specs` first, then the defaults.
    pub fn with_defaults(specs: &[RuleSpec]) -> Result<Self, MigrationError> {
        let mut all = specs.to_vec();
        all.extend(default_specs());
        Self::new(&all)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find<'k>(&self, rel: &'k str) -> Option<(&Rule, &'k str)> {
        self.0.iter().find_map(|r| {
            let rest = rel.strip_prefix(r.from.as_str())?;
            match &r.suffix {
                Some(s) if !rel.ends_with(s.as_str()) => None,
                _ => Some((r, rest)),
            }
        })
    }
}

/// One object of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
}

/// A copy the plan makes: `source` to `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub source: String,
    pub target: String,
    pub size: u64,
    pub etag: Option<String>,
    /// The target already held this content when the plan was made (a rollback leaves it).
    pub target_existed: bool,
}

/// A key the plan cannot place, left where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    pub key: String,
    pub reason: String,
}

/// The mapping old key -> new key for a whole bucket (or prefix).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub schema: String,
    /// The origin the listing came from (`s3://bucket/prefix`).
    pub origin: String,
    pub created_at: Timestamp,
    /// Keys that already fit the layout (left in place).
    pub in_place: u64,
    pub moves: Vec<Move>,
    pub unplaced: Vec<Unplaced>,
}

impl Plan {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MigrationError> {
        decode_limited(bytes, "plan", PLAN_SCHEMA).and_then(|p: Plan| {
            if p.schema == PLAN_SCHEMA {
                Ok(p)
            } else {
                Err(MigrationError::Decode {
                    what: "plan",
                    schema: PLAN_SCHEMA,
                    why: format!("schema is {:?}", p.schema),
                })
            }
        })
    }

    /// The journal id of this plan, `m-YYYYMMDD-<16 hex of its hash>`: the same plan always resumes the
    /// same journal.
    pub fn journal_id(&self) -> Result<Name, LayoutError> {
        let hash = blake3::hash(&self.encode());
        let day = self.created_at.strftime("%Y%m%d");
        Name::new("journal", &format!("m-{day}-{}", &hash.to_hex()[..16]))
    }

    pub fn bytes(&self) -> u64 {
        self.moves.iter().map(|m| m.size).sum()
    }
}

fn decode_limited<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    what: &'static str,
    schema: &'static str,
) -> Result<T, MigrationError> {
    if bytes.len() > MAX_JOURNAL_OBJECT {
        return Err(MigrationError::TooLarge {
            what,
            len: bytes.len(),
            limit: MAX_JOURNAL_OBJECT,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| MigrationError::Decode {
        what,
        schema,
        why: e.to_string(),
    })
}

/// Makes a key segment safe: characters outside S3's safe set become `-`.
fn sanitize(seg: &str) -> String {
    seg.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "!-_.*'()".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The path below a rule's prefix, made valid: empty segments (from `//`) dropped, unsafe characters
/// replaced. `.` and `..` segments cannot be placed.
fn clean_rest(rest: &str) -> Result<RelPath, String> {
    let segs: Vec<String> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(sanitize)
        .collect();
    if segs.is_empty() {
        return Err("a folder marker (an empty name below the rule's prefix); the layout has no folder objects".into());
    }
    if segs.iter().any(|s| s == "." || s == "..") {
        return Err("a \".\" or \"..\" segment cannot be placed".into());
    }
    RelPath::new("path", &segs.join("/")).map_err(|e| e.to_string())
}

/// Classifies every listed key: already in the layout, moved by a rule, or unplaced (with the reason).
/// Keys under `migration/` (journals) are neither moved nor reported. Deterministic: the listing's order
/// does not matter.
pub fn plan(
    layout: &Layout,
    rules: &Rules,
    listing: &[Listed],
    origin: &str,
    now: Timestamp,
) -> Plan {
    let root = layout.root();
    let existing: BTreeMap<&str, &Listed> = listing.iter().map(|l| (l.key.as_str(), l)).collect();
    let mut in_place = 0u64;
    let mut unplaced = Vec::new();
    let mut by_target: BTreeMap<String, Vec<&Listed>> = BTreeMap::new();
    for &obj in existing.values() {
        let Some(rel) = obj.key.strip_prefix(root.as_str()) else {
            unplaced.push(Unplaced {
                key: obj.key.clone(),
                reason: format!("outside the origin's prefix {root:?}"),
            });
            continue;
        };
        if rel.starts_with("migration/") {
            continue;
        }
        if layout.classify(&obj.key).is_ok() {
            in_place += 1;
            continue;
        }
        let Some((rule, rest)) = rules.find(rel) else {
            unplaced.push(Unplaced {
                key: obj.key.clone(),
                reason: "no rule places it".into(),
            });
            continue;
        };
        let target =
            clean_rest(rest).and_then(|r| rule.to.key(layout, &r).map_err(|e| e.to_string()));
        match target {
            Ok(t) => by_target.entry(t).or_default().push(obj),
            Err(reason) => unplaced.push(Unplaced {
                key: obj.key.clone(),
                reason,
            }),
        }
    }
    let mut moves = Vec::new();
    for (target, sources) in by_target {
        let same =
            |a: &Listed, b: &Listed| a.size == b.size && a.etag.is_some() && a.etag == b.etag;
        let first = sources[0];
        let existed = existing.get(target.as_str()).copied();
        let agree = sources[1..].iter().all(|s| same(s, first));
        let conflict = if !agree {
            Some(format!(
                "{} keys map to {target} with different content",
                sources.len()
            ))
        } else if existed.is_some_and(|e| !same(e, first)) {
            Some(format!("{target} already exists with different content"))
        } else {
            None
        };
        for s in sources {
            match &conflict {
                Some(reason) => unplaced.push(Unplaced {
                    key: s.key.clone(),
                    reason: reason.clone(),
                }),
                None => moves.push(Move {
                    source: s.key.clone(),
                    target: target.clone(),
                    size: s.size,
                    etag: s.etag.clone(),
                    target_existed: existed.is_some(),
                }),
            }
        }
    }
    moves.sort_by(|a, b| a.source.cmp(&b.source));
    unplaced.sort_by(|a, b| a.key.cmp(&b.key));
    Plan {
        schema: PLAN_SCHEMA.into(),
        origin: origin.to_owned(),
        created_at: now,
        in_place,
        moves,
        unplaced,
    }
}

/// How a copy was verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifiedBy {
    /// Same size, and S3's entity tag (the MD5 of a single-part object) equal to the source's.
    Etag,
    /// Same size, and both objects read back with equal blake3 hashes.
    Content,
}

/// One step of a migration, recorded after it was done and verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// `target` holds a verified copy of `source`. `etag` is the source's entity tag, `target_etag` the
    /// copy's. `created`: the migration made the target (a rollback removes it).
    Copied {
        source: String,
        target: String,
        size: u64,
        etag: Option<String>,
        target_etag: Option<String>,
        created: bool,
        verified: VerifiedBy,
        at: Timestamp,
    },
    /// finalize deleted `source` after checking its copy once more.
    Deleted { source: String, at: Timestamp },
    /// rollback copied `source` back from its target and verified it.
    Restored { source: String, at: Timestamp },
    /// rollback deleted a target the migration had created.
    Removed { target: String, at: Timestamp },
}

/// A numbered batch of records: one object in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub schema: String,
    pub journal: String,
    pub seq: u64,
    pub records: Vec<Record>,
}

impl Batch {
    pub fn new(journal: &Name, seq: u64, records: Vec<Record>) -> Self {
        Self {
            schema: BATCH_SCHEMA.into(),
            journal: journal.to_string(),
            seq,
            records,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8], journal: &Name) -> Result<Self, MigrationError> {
        let b: Batch = decode_limited(bytes, "journal batch", BATCH_SCHEMA)?;
        if b.schema != BATCH_SCHEMA {
            return Err(MigrationError::Decode {
                what: "journal batch",
                schema: BATCH_SCHEMA,
                why: format!("schema is {:?}", b.schema),
            });
        }
        if b.journal != journal.as_str() {
            return Err(MigrationError::WrongJournal {
                seq: b.seq,
                expected: journal.to_string(),
                found: b.journal,
            });
        }
        Ok(b)
    }
}

/// The sequence number of a batch key, if `key` is one of `journal`'s (see [`Layout::journal_batch`]).
pub fn batch_seq(layout: &Layout, journal: &Name, key: &str) -> Option<u64> {
    match layout.classify(key) {
        Ok(Key::Migration { journal: j, path }) if j == *journal => {
            let digits = path
                .as_str()
                .strip_prefix("batch-")?
                .strip_suffix(".json")?;
            if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        }
        _ => None,
    }
}

/// What a journal's records add up to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalState {
    /// Verified copies, by source.
    pub copied: BTreeMap<String, Record>,
    pub deleted: BTreeSet<String>,
    pub restored: BTreeSet<String>,
    pub removed: BTreeSet<String>,
    /// The next batch number to write.
    pub next_seq: u64,
}

impl JournalState {
    /// Replays batches (any order: they are sorted by number).
    pub fn replay(mut batches: Vec<Batch>) -> Self {
        batches.sort_by_key(|b| b.seq);
        let mut s = Self::default();
        for b in batches {
            s.next_seq = s.next_seq.max(b.seq + 1);
            for r in b.records {
                s.apply(r);
            }
        }
        s
    }

    pub fn apply(&mut self, r: Record) {
        match r {
            Record::Copied { ref source, .. } => {
                self.copied.insert(source.clone(), r);
            }
            Record::Deleted { source, .. } => {
                self.deleted.insert(source);
            }
            Record::Restored { source, .. } => {
                self.restored.insert(source);
            }
            Record::Removed { target, .. } => {
                self.removed.insert(target);
            }
        }
    }

    /// Sources whose verified copy is at least `min_age` old and that are not deleted yet.
    pub fn finalizable(&self, now: Timestamp, min_age: SignedDuration) -> Vec<&Record> {
        self.copied
            .values()
            .filter(|r| match r {
                Record::Copied { source, at, .. } => {
                    !self.deleted.contains(source) && now.duration_since(*at) >= min_age
                }
                _ => false,
            })
            .collect()
    }

    /// Whether a rollback finished: every deleted source restored, every created target removed.
    pub fn rolled_back(&self) -> bool {
        self.deleted.iter().all(|s| self.restored.contains(s))
            && self.copied.values().all(|r| match r {
                Record::Copied {
                    target, created, ..
                } => !created || self.removed.contains(target),
                _ => true,
            })
    }

    /// Copies made but neither rolled back nor finalized: their sources are still in place on purpose.
    pub fn migrating_sources(&self) -> BTreeSet<&str> {
        self.copied
            .keys()
            .filter(|s| !self.deleted.contains(*s))
            .map(String::as_str)
            .collect()
    }
}

/// Where else an object may be during a migration: its new key if `key` is a planned source, its old key
/// if `key` is a planned target (R4.3, R5.5: old and new references both keep working).
pub fn alternate<'p>(plan: &'p Plan, key: &str) -> Option<&'p str> {
    plan.moves.iter().find_map(|m| {
        if m.source == key {
            Some(m.target.as_str())
        } else if m.target == key {
            Some(m.source.as_str())
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests;
