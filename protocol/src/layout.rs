//! The S3 key layout (requirements document 004), built in this one module.
//!
//! ```text
//! {prefix}/datasets/{dataset}/{path}
//! {prefix}/models/training/{job}/{path}
//! {prefix}/models/compilation/{job}/{target}/{path}
//! {prefix}/deployments/{deployment}/manifest/{version as 20 digits}.json
//! {prefix}/deployments/{deployment}/current.json
//! {prefix}/deployments/_blob/{64 hex}          content-addressed blobs and chunk maps
//! {prefix}/deployments/_pack/{64 hex}          a blob's chunks compressed (crate::pack), by chunk map id
//! {prefix}/deployments/_delta/{64 hex}/{64 hex} a blob's new chunks patched against a base blob
//!                                               (crate::delta), by chunk map id and base blob id
//! {prefix}/migration/{journal}/{path}          layout migration journals
//! ```
//!
//! Every part is validated: no empty segment, no `//`, no `.` or `..`, only S3's safe characters, and
//! length limits. Names (deployment, dataset, job, target, journal) are stricter than path segments.
//! [`Layout::classify`] reads a key back, so an audit can say which keys fit.

use crate::id::BlobId;
use std::fmt;

/// The longest S3 key, in bytes.
pub const MAX_KEY: usize = 1024;
/// The longest name (deployment, dataset, job, target, journal).
pub const MAX_NAME: usize = 128;
/// The longest path segment.
pub const MAX_SEGMENT: usize = 255;

/// Why a key or a part of one is invalid. `what` says which part, `value` what it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error(
        "{what} {value:?} contains an empty path segment (\"//\", or a leading or trailing \"/\")"
    )]
    EmptySegment { what: &'static str, value: String },
    #[error("{what} {value:?} contains a \".\" or \"..\" segment")]
    DotSegment { what: &'static str, value: String },
    #[error(
        "{what} {value:?} contains the character {ch:?}, outside the safe set [A-Za-z0-9!_.*'()-]"
    )]
    BadChar {
        what: &'static str,
        value: String,
        ch: char,
    },
    #[error("{what} {value:?} must start with a letter or digit")]
    BadStart { what: &'static str, value: String },
    #[error("{what} is {len} bytes, over the limit of {limit}")]
    TooLong {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("key {0:?} does not fit the layout")]
    Unrecognized(String),
}

/// A validated single-segment name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

/// A validated relative path: one or more safe segments separated by single slashes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

fn is_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!-_.*'()".contains(c)
}

fn check_segment(what: &'static str, whole: &str, seg: &str) -> Result<(), LayoutError> {
    if seg.is_empty() {
        return Err(LayoutError::EmptySegment {
            what,
            value: whole.to_owned(),
        });
    }
    if seg == "." || seg == ".." {
        return Err(LayoutError::DotSegment {
            what,
            value: whole.to_owned(),
        });
    }
    if seg.len() > MAX_SEGMENT {
        return Err(LayoutError::TooLong {
            what,
            len: seg.len(),
            limit: MAX_SEGMENT,
        });
    }
    if let Some(ch) = seg.chars().find(|c| !is_safe(*c)) {
        return Err(LayoutError::BadChar {
            what,
            value: whole.to_owned(),
            ch,
        });
    }
    Ok(())
}

impl Name {
    /// Validates a name; `what` names it in errors ("deployment", "dataset", "job", ...).
    pub fn new(what: &'static str, s: &str) -> Result<Self, LayoutError> {
        if s.is_empty() {
            return Err(LayoutError::Empty { what });
        }
        if s.len() > MAX_NAME {
            return Err(LayoutError::TooLong {
                what,
                len: s.len(),
                limit: MAX_NAME,
            });
        }
        if s.contains('/') {
            return Err(LayoutError::BadChar {
                what,
                value: s.to_owned(),
                ch: '/',
            });
        }
        check_segment(what, s, s)?;
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
        {
            return Err(LayoutError::BadChar {
                what,
                value: s.to_owned(),
                ch,
            });
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(LayoutError::BadStart {
                what,
                value: s.to_owned(),
            });
        }
        Ok(Self(s.to_owned()))
    }

    pub fn deployment(s: &str) -> Result<Self, LayoutError> {
        Self::new("deployment", s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl RelPath {
    pub fn new(what: &'static str, s: &str) -> Result<Self, LayoutError> {
        if s.is_empty() {
            return Err(LayoutError::Empty { what });
        }
        if s.len() > MAX_KEY {
            return Err(LayoutError::TooLong {
                what,
                len: s.len(),
                limit: MAX_KEY,
            });
        }
        for seg in s.split('/') {
            check_segment(what, s, seg)?;
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a key in the layout is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Dataset {
        dataset: Name,
        path: RelPath,
    },
    Training {
        job: Name,
        path: RelPath,
    },
    Compilation {
        job: Name,
        target: Name,
        path: RelPath,
    },
    Manifest {
        deployment: Name,
        version: u64,
    },
    Current {
        deployment: Name,
    },
    /// A deployment's trust root of one version ([`Layout::trust_root`]).
    Root {
        deployment: Name,
        version: u64,
    },
    Blob(BlobId),
    /// The pack of the blob a chunk map (this id) describes ([`Layout::pack`]).
    Pack(BlobId),
    /// The delta pack of the blob chunk map `map` describes against blob `base` ([`Layout::delta`]).
    Delta {
        map: BlobId,
        base: BlobId,
    },
    /// The fleet's certificates and revocation lists ([`Layout::fleet`]).
    Fleet,
    Migration {
        journal: Name,
        path: RelPath,
    },
}

/// The key layout under one bucket prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Empty, or validated segments joined by `/`, with no leading or trailing slash.
    prefix: String,
}

const BLOB_DIR: &str = "deployments/_blob";
const PACK_DIR: &str = "deployments/_pack";
const DELTA_DIR: &str = "deployments/_delta";

impl Layout {
    /// `prefix` may be empty (the bucket root); otherwise it must be a valid relative path.
    /// One trailing slash is accepted and dropped (`s3://bucket/prefix/` is common).
    pub fn new(prefix: &str) -> Result<Self, LayoutError> {
        let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
        if trimmed.is_empty() {
            if prefix.is_empty() {
                return Ok(Self {
                    prefix: String::new(),
                });
            }
            return Err(LayoutError::EmptySegment {
                what: "bucket prefix",
                value: prefix.to_owned(),
            });
        }
        RelPath::new("bucket prefix", trimmed)?;
        Ok(Self {
            prefix: trimmed.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn join(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_owned()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// The prefix under which every key of the layout lives (empty or ending in `/`).
    pub fn root(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }

    pub fn dataset(&self, dataset: &Name, path: &RelPath) -> String {
        self.join(&format!("datasets/{dataset}/{path}"))
    }

    pub fn training(&self, job: &Name, path: &RelPath) -> String {
        self.join(&format!("models/training/{job}/{path}"))
    }

    pub fn compilation(&self, job: &Name, target: &Name, path: &RelPath) -> String {
        self.join(&format!("models/compilation/{job}/{target}/{path}"))
    }

    /// The key of one signed manifest version. Twenty digits keep lexical order equal to numeric order.
    pub fn manifest(&self, deployment: &Name, version: u64) -> String {
        self.join(&format!(
            "deployments/{deployment}/manifest/{version:020}.json"
        ))
    }

    /// The prefix to list a deployment's manifest versions under.
    pub fn manifest_dir(&self, deployment: &Name) -> String {
        self.join(&format!("deployments/{deployment}/manifest/"))
    }

    /// A deployment's signed trust root of `version` (1, 2, ...): the manifest keys and threshold.
    pub fn trust_root(&self, deployment: &Name, version: u64) -> String {
        self.join(&format!("deployments/{deployment}/root/{version:020}.json"))
    }

    /// The pointer to the newest manifest of a deployment.
    pub fn current(&self, deployment: &Name) -> String {
        self.join(&format!("deployments/{deployment}/current.json"))
    }

    /// The fleet's renewed certificates, CA cross-certificates and CA-signed revocation lists (PEM),
    /// written by `deckhand fleet renew|revoke|rotate-ca`, read by every agent at its poll. Each part is
    /// signed by a fleet CA, so the bucket is not trusted with it.
    pub fn fleet(&self) -> String {
        self.join("fleet/bundle.pem")
    }

    /// A content-addressed blob or chunk map.
    pub fn blob(&self, id: &BlobId) -> String {
        self.join(&format!("{BLOB_DIR}/{}", id.to_hex()))
    }

    pub fn blob_dir(&self) -> String {
        self.join(&format!("{BLOB_DIR}/"))
    }

    /// The pack of the blob that chunk map `map` describes: its chunks compressed ([`crate::pack`]).
    pub fn pack(&self, map: &BlobId) -> String {
        self.join(&format!("{PACK_DIR}/{}", map.to_hex()))
    }

    /// The delta pack of the blob that chunk map `map` describes against blob `base` ([`crate::delta`]).
    pub fn delta(&self, map: &BlobId, base: &BlobId) -> String {
        self.join(&format!("{DELTA_DIR}/{}/{}", map.to_hex(), base.to_hex()))
    }

    pub fn migration(&self, journal: &Name, path: &RelPath) -> String {
        self.join(&format!("migration/{journal}/{path}"))
    }

    /// The plan of a layout migration journal.
    pub fn journal_plan(&self, journal: &Name) -> String {
        self.join(&format!("migration/{journal}/plan.json"))
    }

    /// Batch `seq` of a journal's records. Twenty digits keep lexical order equal to numeric order.
    pub fn journal_batch(&self, journal: &Name, seq: u64) -> String {
        self.join(&format!("migration/{journal}/batch-{seq:020}.json"))
    }

    /// The prefix of one journal's objects.
    pub fn journal_dir(&self, journal: &Name) -> String {
        self.join(&format!("migration/{journal}/"))
    }

    pub fn migration_dir(&self) -> String {
        self.join("migration/")
    }

    /// Reads a full key back into what it is, or says why it does not fit the layout.
    pub fn classify(&self, key: &str) -> Result<Key, LayoutError> {
        let unrecognized = || LayoutError::Unrecognized(key.to_owned());
        if key.len() > MAX_KEY {
            return Err(LayoutError::TooLong {
                what: "key",
                len: key.len(),
                limit: MAX_KEY,
            });
        }
        let rest = key.strip_prefix(&self.root()).ok_or_else(unrecognized)?;
        RelPath::new("key", rest)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let tail = |from: usize| RelPath::new("path", &parts[from..].join("/"));
        match parts.as_slice() {
            ["datasets", dataset, _, ..] => Ok(Key::Dataset {
                dataset: Name::new("dataset", dataset)?,
                path: tail(2)?,
            }),
            ["models", "training", job, _, ..] => Ok(Key::Training {
                job: Name::new("job", job)?,
                path: tail(3)?,
            }),
            ["models", "compilation", job, target, _, ..] => Ok(Key::Compilation {
                job: Name::new("job", job)?,
                target: Name::new("target", target)?,
                path: tail(4)?,
            }),
            ["fleet", "bundle.pem"] => Ok(Key::Fleet),
            ["deployments", "_blob", hex] => BlobId::from_hex(hex)
                .map(Key::Blob)
                .map_err(|_| unrecognized()),
            ["deployments", "_pack", hex] => BlobId::from_hex(hex)
                .map(Key::Pack)
                .map_err(|_| unrecognized()),
            ["deployments", "_delta", map, base] => Ok(Key::Delta {
                map: BlobId::from_hex(map).map_err(|_| unrecognized())?,
                base: BlobId::from_hex(base).map_err(|_| unrecognized())?,
            }),
            ["deployments", deployment, "current.json"] => Ok(Key::Current {
                deployment: Name::deployment(deployment)?,
            }),
            ["deployments", deployment, "root", file] => {
                let digits = file.strip_suffix(".json").ok_or_else(unrecognized)?;
                if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(unrecognized());
                }
                Ok(Key::Root {
                    deployment: Name::deployment(deployment)?,
                    version: digits.parse().map_err(|_| unrecognized())?,
                })
            }
            ["deployments", deployment, "manifest", file] => {
                let digits = file.strip_suffix(".json").ok_or_else(unrecognized)?;
                if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(unrecognized());
                }
                Ok(Key::Manifest {
                    deployment: Name::deployment(deployment)?,
                    version: digits.parse().map_err(|_| unrecognized())?,
                })
            }
            ["migration", journal, _, ..] => Ok(Key::Migration {
                journal: Name::new("journal", journal)?,
                path: tail(2)?,
            }),
            _ => Err(unrecognized()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new("name", s).unwrap()
    }

    fn rel(s: &str) -> RelPath {
        RelPath::new("path", s).unwrap()
    }

    #[test]
    fn builds_every_kind_of_key_and_reads_it_back() {
        for prefix in ["", "fleet", "a/b"] {
            let l = Layout::new(prefix).unwrap();
            let id = BlobId::of(b"x");
            let keys = [
                (
                    l.dataset(&name("cards"), &rel("raw/card_0001.png")),
                    Key::Dataset {
                        dataset: name("cards"),
                        path: rel("raw/card_0001.png"),
                    },
                ),
                (
                    l.training(&name("job-1"), &rel("output/model.tar.gz")),
                    Key::Training {
                        job: name("job-1"),
                        path: rel("output/model.tar.gz"),
                    },
                ),
                (
                    l.compilation(&name("job-2"), &name("hailo8"), &rel("model.hef")),
                    Key::Compilation {
                        job: name("job-2"),
                        target: name("hailo8"),
                        path: rel("model.hef"),
                    },
                ),
                (
                    l.manifest(&name("shop"), 42),
                    Key::Manifest {
                        deployment: name("shop"),
                        version: 42,
                    },
                ),
                (
                    l.current(&name("shop")),
                    Key::Current {
                        deployment: name("shop"),
                    },
                ),
                (
                    l.trust_root(&name("shop"), 3),
                    Key::Root {
                        deployment: name("shop"),
                        version: 3,
                    },
                ),
                (l.blob(&id), Key::Blob(id)),
                (l.pack(&id), Key::Pack(id)),
                (
                    l.delta(&id, &BlobId::of(b"y")),
                    Key::Delta {
                        map: id,
                        base: BlobId::of(b"y"),
                    },
                ),
                (l.fleet(), Key::Fleet),
                (
                    l.migration(&name("m1"), &rel("journal.json")),
                    Key::Migration {
                        journal: name("m1"),
                        path: rel("journal.json"),
                    },
                ),
            ];
            for (key, kind) in keys {
                assert!(!key.contains("//") && !key.starts_with('/'), "{key}");
                assert_eq!(l.classify(&key).unwrap(), kind, "{key}");
            }
        }
        let l = Layout::new("p").unwrap();
        assert_eq!(
            l.manifest(&name("shop"), 7),
            "p/deployments/shop/manifest/00000000000000000007.json"
        );
        assert_eq!(
            l.manifest(&name("shop"), u64::MAX),
            "p/deployments/shop/manifest/18446744073709551615.json"
        );
        assert_eq!(Layout::new("p/").unwrap(), l);
    }

    #[test]
    fn every_class_of_invalid_name_is_refused_with_its_part_named() {
        let err = |s: &str| Name::new("deployment", s).unwrap_err();
        assert_eq!(err(""), LayoutError::Empty { what: "deployment" });
        assert!(matches!(err("a/b"), LayoutError::BadChar { ch: '/', .. }));
        assert!(matches!(err("."), LayoutError::DotSegment { .. }));
        assert!(matches!(err(".."), LayoutError::DotSegment { .. }));
        assert!(matches!(
            err("shop 1"),
            LayoutError::BadChar { ch: ' ', .. }
        ));
        assert!(matches!(
            err("shop\u{e9}"),
            LayoutError::BadChar { ch: '\u{e9}', .. }
        ));
        assert!(matches!(err("shop\n"), LayoutError::BadChar { .. }));
        assert!(matches!(err("shop*"), LayoutError::BadChar { ch: '*', .. }));
        assert!(matches!(err("_blob"), LayoutError::BadStart { .. }));
        assert!(matches!(err("-x"), LayoutError::BadStart { .. }));
        assert!(matches!(err(".hidden"), LayoutError::BadStart { .. }));
        assert!(matches!(
            err(&"a".repeat(MAX_NAME + 1)),
            LayoutError::TooLong {
                limit: MAX_NAME,
                ..
            }
        ));
        Name::new("deployment", &"a".repeat(MAX_NAME)).unwrap();
        assert!(
            err("shop 1")
                .to_string()
                .starts_with("deployment \"shop 1\"")
        );
    }

    #[test]
    fn every_class_of_invalid_path_is_refused() {
        let err = |s: &str| RelPath::new("path", s).unwrap_err();
        assert_eq!(err(""), LayoutError::Empty { what: "path" });
        assert!(matches!(err("a//b"), LayoutError::EmptySegment { .. }));
        assert!(matches!(err("/a"), LayoutError::EmptySegment { .. }));
        assert!(matches!(err("a/"), LayoutError::EmptySegment { .. }));
        assert!(matches!(err("a/./b"), LayoutError::DotSegment { .. }));
        assert!(matches!(err("a/../b"), LayoutError::DotSegment { .. }));
        assert!(matches!(err("a/b c"), LayoutError::BadChar { ch: ' ', .. }));
        assert!(matches!(err("a\\b"), LayoutError::BadChar { ch: '\\', .. }));
        assert!(matches!(err("a/%20"), LayoutError::BadChar { ch: '%', .. }));
        assert!(matches!(
            err(&"a".repeat(MAX_SEGMENT + 1)),
            LayoutError::TooLong {
                limit: MAX_SEGMENT,
                ..
            }
        ));
        assert!(matches!(
            err(&"a/".repeat(600)),
            LayoutError::TooLong { limit: MAX_KEY, .. }
        ));
        RelPath::new("path", "card(1)/it's_*!.png").unwrap();
        assert!(matches!(
            Layout::new("//"),
            Err(LayoutError::EmptySegment { .. })
        ));
        assert!(matches!(
            Layout::new("/"),
            Err(LayoutError::EmptySegment { .. })
        ));
        assert!(matches!(
            Layout::new("a b"),
            Err(LayoutError::BadChar { .. })
        ));
    }

    #[test]
    fn classify_refuses_keys_outside_the_layout() {
        let l = Layout::new("").unwrap();
        for key in [
            "data/reference/usearch.index",
            "project/pokemon-card-recognition/models/x.onnx",
            "models/embedding/student/x.onnx",
            "models/training/job",
            "deployments/shop/manifest/7.json",
            "deployments/shop/manifest/0000000000000000000x.json",
            "deployments/_blob/XYZ",
            "deployments/_pack/XYZ",
            "deployments/_delta/XYZ",
            "deployments/shop/other.json",
            "datasets/cards",
        ] {
            assert!(l.classify(key).is_err(), "{key}");
        }
        assert!(matches!(
            l.classify("datasets//x"),
            Err(LayoutError::EmptySegment { .. })
        ));
        assert!(matches!(
            l.classify("datasets/a b/x"),
            Err(LayoutError::BadChar { .. })
        ));
        assert!(matches!(
            l.classify(&"a".repeat(2000)),
            Err(LayoutError::TooLong { .. })
        ));
        let p = Layout::new("fleet").unwrap();
        assert!(matches!(
            p.classify("other/datasets/a/b"),
            Err(LayoutError::Unrecognized(_))
        ));
    }
}
