//! `deckhand-agent store export`: the releases a Pi holds, written out as a bundle, so a deployment whose
//! bucket was lost can be restored from any Pi (`deckhand bundle push`) or carried on a stick.
//!
//! The bundle has the layout `deckhand bundle export` writes, which is an origin's key layout under an
//! empty prefix: every blob and chunk map at `deployments/_blob/<hex>`, each signed manifest at
//! `deployments/<d>/manifest/<v>.json` byte for byte as it was signed, and `current.json` holding the
//! newest one exported, with the trust roots the Pi kept (`deployments/<d>/root/`) and the fleet bundle it
//! took (`fleet/bundle.pem`). It may run while the agent runs: it reads the store through
//! [`deckhand_store::StoreReader`], which takes no lock and writes nothing. Everything is verified on the
//! way out: each blob hashes to its id as it is copied, each chunk map decodes and describes its blob, and
//! a file appears under its final name only after its bytes were verified and synced. Manifests are
//! written last, so a bundle with a manifest is a complete bundle.

use deckhand_protocol::envelope::{inspect_unverified, unverified_id};
use deckhand_protocol::layout::{Layout, Name};
use deckhand_protocol::manifest::{BlobRef, Manifest};
use deckhand_protocol::{BlobId, ChunkMap};
use deckhand_store::{StoreError, StoreReader};
use serde::Serialize;
use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Which of the store's releases to export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Active,
    Previous,
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store holds no {0} release")]
    NoRelease(&'static str),
    #[error("the {which} release's recorded manifest is unreadable: {why}")]
    BadManifest { which: &'static str, why: String },
    #[error("chunk map {map} of blob {blob}: {why}")]
    BadChunkMap {
        map: BlobId,
        blob: BlobId,
        why: String,
    },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.to_owned();
    move |source| ExportError::Io { op, path, source }
}

/// One release written to the bundle.
#[derive(Clone, Debug, Serialize)]
pub struct ExportedRelease {
    /// "active" or "previous".
    pub which: &'static str,
    pub deployment: String,
    pub version: u64,
    /// The manifest's id: the blake3 of its signed payload.
    pub manifest_id: String,
    pub manifest_key: String,
}

/// What an export wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub dir: String,
    pub releases: Vec<ExportedRelease>,
    /// Blobs and chunk maps written (each once, however many releases name it).
    pub blobs: usize,
    pub bytes: u64,
    /// The versions of the deployment's trust roots written (`deployments/<d>/root/`).
    pub roots: Vec<u64>,
    /// Whether the fleet bundle this Pi took was written (`fleet/bundle.pem`).
    pub fleet_bundle: bool,
}

/// Exports the releases `which` of the store in `data_dir/store` to the bundle directory `out`.
pub fn export(data_dir: &Path, out: &Path, which: Which) -> Result<ExportReport, ExportError> {
    let reader = StoreReader::open(data_dir.join("store"))?;
    // Both envelopes from one committed state of the catalog (a swap records them together).
    let recorded = crate::ledger::recorded_releases(&reader)?;
    let wanted: &[(&'static str, usize)] = match which {
        Which::Active => &[("active", 0)],
        Which::Previous => &[("previous", 1)],
        Which::All => &[("active", 0), ("previous", 1)],
    };
    let mut releases: Vec<(&'static str, Vec<u8>, Manifest)> = Vec::new();
    for &(name, i) in wanted {
        let Some(envelope) = recorded[i].clone() else {
            // `all` exports what there is; asking for one release that is not there is an error.
            if which == Which::All && name == "previous" {
                continue;
            }
            return Err(ExportError::NoRelease(name));
        };
        let m = inspect_unverified(&envelope).map_err(|e| ExportError::BadManifest {
            which: name,
            why: e.to_string(),
        })?;
        releases.push((name, envelope, m));
    }

    std::fs::create_dir_all(out).map_err(io("create directory", out))?;
    let root = std::fs::canonicalize(out).map_err(io("resolve", out))?;
    let layout = Layout::new("").map_err(|e| ExportError::BadManifest {
        which: "active",
        why: e.to_string(),
    })?;
    let mut report = ExportReport {
        dir: root.display().to_string(),
        releases: Vec::new(),
        blobs: 0,
        bytes: 0,
        roots: Vec::new(),
        fleet_bundle: false,
    };
    let mut written = BTreeSet::new();
    for (_, _, m) in &releases {
        for b in m.blobs() {
            for id in [b.chunk_map, b.blob] {
                if !written.insert(id) {
                    continue;
                }
                report.bytes += write_blob(&reader, &root, &layout, &b, id)?;
                report.blobs += 1;
            }
        }
    }
    sync_dirs(&root, &layout.blob_dir())?;

    // The trust roots this Pi kept and the fleet bundle it took, so that a Pi given the stick follows
    // the key rotations and takes the renewed certificates and revocations (each verified there as
    // from the bucket). Before the manifests, which mark a complete bundle.
    if let Some((_, _, m)) = releases.first() {
        let deployment = Name::deployment(&m.deployment).map_err(|e| ExportError::BadManifest {
            which: "active",
            why: e.to_string(),
        })?;
        let crate::ledger::RecordedTrust { roots, fleet } =
            crate::ledger::recorded_trust(&reader, &m.deployment)?;
        for (version, envelope) in &roots {
            write_file(
                &root.join(layout.trust_root(&deployment, *version)),
                envelope,
            )?;
            report.roots.push(*version);
        }
        if !roots.is_empty() {
            let dir = layout.trust_root(&deployment, 1);
            if let Some((dir, _)) = dir.rsplit_once('/') {
                sync_dirs(&root, dir)?;
            }
        }
        if let Some(bundle) = &fleet {
            let key = layout.fleet();
            write_file(&root.join(&key), bundle)?;
            if let Some((dir, _)) = key.rsplit_once('/') {
                sync_dirs(&root, dir)?;
            }
            report.fleet_bundle = true;
        }
    }

    // The manifests last, oldest first; current.json names the newest.
    releases.sort_by_key(|(_, _, m)| m.version);
    for (name, envelope, m) in &releases {
        let deployment = Name::deployment(&m.deployment).map_err(|e| ExportError::BadManifest {
            which: name,
            why: e.to_string(),
        })?;
        let key = layout.manifest(&deployment, m.version);
        write_file(&root.join(&key), envelope)?;
        sync_dirs(&root, &layout.manifest_dir(&deployment))?;
        report.releases.push(ExportedRelease {
            which: name,
            deployment: m.deployment.clone(),
            version: m.version,
            manifest_id: unverified_id(envelope)
                .map_err(|e| ExportError::BadManifest {
                    which: name,
                    why: e.to_string(),
                })?
                .to_string(),
            manifest_key: key,
        });
    }
    if let Some((_, envelope, m)) = releases.last() {
        let deployment = Name::deployment(&m.deployment).map_err(|e| ExportError::BadManifest {
            which: "active",
            why: e.to_string(),
        })?;
        let key = layout.current(&deployment);
        write_file(&root.join(&key), envelope)?;
        if let Some(parent) = root.join(&key).parent() {
            sync_dir(parent)?;
        }
    }
    Ok(report)
}

/// Copies blob `id` (the blob of `b`, or its chunk map) into the bundle, verified; returns its size.
fn write_blob(
    reader: &StoreReader,
    root: &Path,
    layout: &Layout,
    b: &BlobRef,
    id: BlobId,
) -> Result<u64, ExportError> {
    let target = root.join(layout.blob(&id));
    let parent = target.parent().unwrap_or(root);
    std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    let tmp = parent.join(format!(".{}.part-{}", id.to_hex(), std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        if id == b.chunk_map {
            // A chunk map is small: read, check it describes its blob, then write.
            let mut bytes = Vec::new();
            reader.copy_blob(&id, &mut bytes)?;
            let bad = |why: String| ExportError::BadChunkMap {
                map: id,
                blob: b.blob,
                why,
            };
            let map = ChunkMap::decode(&bytes).map_err(|e| bad(e.to_string()))?;
            if map.blob() != b.blob || map.size() != b.size {
                return Err(bad(format!(
                    "it describes {} ({} bytes)",
                    map.blob(),
                    map.size()
                )));
            }
            file.write_all(&bytes).map_err(io("write", &tmp))?;
        } else {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut file);
            reader.copy_blob(&id, &mut w)?;
            w.flush().map_err(io("write", &tmp))?;
        }
        file.sync_all().map_err(io("sync", &tmp))?;
        let len = file.metadata().map_err(io("stat", &tmp))?.len();
        std::fs::rename(&tmp, &target).map_err(io("rename into place", &target))?;
        Ok(len)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a small file whole: to a temporary name, synced, then renamed over `path`.
fn write_file(path: &Path, data: &[u8]) -> Result<(), ExportError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    let tmp = parent.join(format!(".write-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(data).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))
}

fn sync_dir(dir: &Path) -> Result<(), ExportError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

/// Syncs `root/key_dir` and each directory above it up to `root`, so the new names survive a power cut.
fn sync_dirs(root: &Path, key_dir: &str) -> Result<(), ExportError> {
    let mut dir = root.join(key_dir);
    loop {
        sync_dir(&dir)?;
        if dir == root {
            return Ok(());
        }
        match dir.parent() {
            Some(p) if p.starts_with(root) => dir = p.to_owned(),
            _ => return Ok(()),
        }
    }
}
