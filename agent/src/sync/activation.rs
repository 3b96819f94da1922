//! From a verified manifest to the live recognizer, through the store.
//!
//! Order, and why:
//! 1. `accept`: verify the envelope (trusted keys, threshold, schema, expiry) and that its version is
//!    strictly above the highest accepted, then record the new highest durably (`synchronous=FULL`) before
//!    anything else happens, so a reboot can never be used to roll an agent back.
//! 2. Blobs are fetched or imported into the store under the `pending` pin (the sync engine, or
//!    `import_bundle` for a bundle directory).
//! 3. `load_recognizer` builds the candidate from the store's blob files, off the serving path, and
//!    the recognizer service checks its canaries and swaps it in.
//! 4. `record_active`: only after the swap, the pins move (previous := old active, active := new) and
//!    the active envelope is recorded durably; then gc drops everything unpinned.

use crate::ledger::Ledger;
use crate::recognizer::{BackendChoice, Recognizer, RecognizerError, ReleasePaths};
use deckhand_protocol::floors::SystemClock;
use deckhand_protocol::manifest::{BlobRef, Manifest, Role};
use deckhand_protocol::{BlobId, ChunkMap, TrustPolicy, VerifiedManifest, VerifyError};
use deckhand_store::{Store, StoreError};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("manifest refused: {0}")]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Recognizer(#[from] RecognizerError),
    #[error("release version {version}: {why}")]
    Release { version: u64, why: String },
}

/// Verifies an envelope (expiry judged at the trusted now: the later of the system clock and the time
/// floor) and, if the floors admit it ([`deckhand_protocol::floors::Floors::admit`]: newer than
/// anything accepted in this epoch, not from before the epoch, not far ahead of a synchronised clock),
/// raises the floors to it and records it as pending, in one durable commit, and returns it.
pub fn accept(
    store: &Store,
    policy: &TrustPolicy,
    deployment: &str,
    envelope: &[u8],
    clock: SystemClock,
) -> Result<VerifiedManifest, ActivationError> {
    let ledger = Ledger::new(store);
    let floors = ledger.floors(deployment)?;
    let verified = policy.verify(envelope, floors.trusted_now(clock.now))?;
    floors.admit(&verified.manifest, deployment, clock)?;
    ledger.record_accepted(deployment, &verified, &floors.after(&verified.manifest))?;
    Ok(verified)
}

/// Every blob id a release keeps pinned: its blobs and their chunk maps.
pub fn release_blobs(m: &Manifest) -> Vec<BlobId> {
    m.blobs()
        .iter()
        .flat_map(|b| [b.blob, b.chunk_map])
        .collect()
}

/// Imports a release from a bundle directory (a `file://` origin written by `deckhand bundle export`):
/// each blob is imported and must hash to the id the manifest gives; each chunk map is stored after the
/// same check. Returns the bytes imported.
pub fn import_bundle(store: &Store, bundle: &Path, m: &Manifest) -> Result<u64, ActivationError> {
    let layout =
        deckhand_protocol::layout::Layout::new("").map_err(|e| ActivationError::Release {
            version: m.version,
            why: e.to_string(),
        })?;
    store.set_pin("pending", &release_blobs(m))?;
    let mut bytes = 0;
    for BlobRef {
        blob,
        size,
        chunk_map,
    } in m.blobs()
    {
        let map_path = bundle.join(layout.blob(&chunk_map));
        let map_bytes = std::fs::read(&map_path).map_err(|e| ActivationError::Release {
            version: m.version,
            why: format!(
                "chunk map {} is missing from the bundle: {e}",
                map_path.display()
            ),
        })?;
        store.put_raw_expect(&chunk_map, &map_bytes)?;
        if store.has(&blob)? {
            continue;
        }
        let path = bundle.join(layout.blob(&blob));
        let imported = store.import_file(&path)?;
        if imported.blob != blob || imported.size != size {
            return Err(ActivationError::Release {
                version: m.version,
                why: format!(
                    "{} hashes to {}, the manifest says {blob}",
                    path.display(),
                    imported.blob
                ),
            });
        }
        bytes += size;
    }
    Ok(bytes)
}

/// Whether every blob of a release is complete in the store.
pub fn is_complete(store: &Store, m: &Manifest) -> Result<bool, StoreError> {
    for b in m.blobs() {
        if !store.has(&b.blob)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn path_of(store: &Store, m: &Manifest, role: Role) -> Result<std::path::PathBuf, ActivationError> {
    let a = m.artifact(role).ok_or_else(|| ActivationError::Release {
        version: m.version,
        why: format!("no {role} artifact"),
    })?;
    Ok(store.blob_path(&a.blob)?)
}

/// Loads a release from the store's blob files (call off the serving path).
pub fn load_recognizer(
    store: &Store,
    v: &VerifiedManifest,
    backend: BackendChoice,
) -> Result<Recognizer, ActivationError> {
    let m = &v.manifest;
    let paths = ReleasePaths {
        hef: path_of(store, m, Role::Hef)?,
        onnx: path_of(store, m, Role::Onnx)?,
        index: path_of(store, m, Role::Index)?,
        labels: path_of(store, m, Role::Labels)?,
        metadata: path_of(store, m, Role::Metadata)?,
    };
    let recognizer = Recognizer::load(&paths, &m.recognizer, m.version, v.id, backend)?;
    let Some(settings) = &m.detector else {
        return Ok(recognizer);
    };
    let detector = crate::recognizer::load_detector(
        &path_of(store, m, Role::Detector)?,
        &path_of(store, m, Role::DetectorHef)?,
        settings,
        recognizer.backend(),
    )
    .map_err(RecognizerError::Backend)?;
    Ok(recognizer.with_detector(detector))
}

/// The canary images of a release, read from the store.
pub fn canaries(store: &Store, m: &Manifest) -> Result<Vec<(Vec<u8>, String)>, ActivationError> {
    m.canaries
        .iter()
        .map(|c| Ok((store.read_blob(&c.image, 64 << 20)?, c.card_id.clone())))
        .collect()
}

/// Records a release as active after its swap: the old active becomes previous (still pinned, for
/// rollback), the envelope is stored durably, and everything else is collected.
pub fn record_active(
    store: &Store,
    v: &VerifiedManifest,
) -> Result<deckhand_store::GcReport, StoreError> {
    // One durable commit: the swap is recorded whole or not at all.
    Ledger::new(store).record_active(v, &release_blobs(&v.manifest))?;
    store.gc()
}

/// Collects at start what no release keeps, unless a release is pending (its download resumes, and
/// activating it collects): a power cut between recording a release active and collecting the one it
/// replaced leaves that one's blobs behind.
pub fn collect_at_start(store: &Store) -> Result<Option<deckhand_store::GcReport>, StoreError> {
    if Ledger::new(store).pending()?.is_some() {
        return Ok(None);
    }
    store.gc().map(Some)
}

/// The active and previous releases as their recorded manifests describe them (for the shop page). The
/// envelopes were verified when they were accepted; they are only read here.
pub fn release_summaries(
    store: &Store,
) -> Result<Vec<deckhand_protocol::status::ReleaseSummary>, StoreError> {
    use deckhand_protocol::status::{ArtifactSummary, ReleaseSummary};
    let mut out = Vec::new();
    let [active, previous] = Ledger::new(store).releases()?;
    for (role, env) in [("active", active), ("previous", previous)] {
        let Some(env) = env else {
            continue;
        };
        let Ok(m) = deckhand_protocol::envelope::inspect_unverified(&env) else {
            tracing::warn!(role, "a recorded release envelope does not parse");
            continue;
        };
        out.push(ReleaseSummary {
            role: role.to_owned(),
            version: m.version,
            created_at: m.created_at.to_string(),
            expires_at: m.expires_at.to_string(),
            artifacts: m
                .artifacts
                .iter()
                .map(|a| ArtifactSummary {
                    role: a.role.as_str().to_owned(),
                    blob: a.blob.to_string(),
                    size: a.size,
                })
                .collect(),
        });
    }
    Ok(out)
}

/// A chunk map that describes another blob than the manifest says (a mix-and-match).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "chunk map {map} describes {described} ({described_size} bytes), not {blob} ({size} bytes)"
)]
pub struct ChunkMapMismatch {
    pub map: BlobId,
    pub described: BlobId,
    pub described_size: u64,
    pub blob: BlobId,
    pub size: u64,
}

/// Checks that a chunk map fetched for a blob describes that blob.
pub fn check_chunk_map(map: &ChunkMap, b: &BlobRef) -> Result<(), ChunkMapMismatch> {
    if map.blob() != b.blob || map.size() != b.size {
        return Err(ChunkMapMismatch {
            map: b.chunk_map,
            described: map.blob(),
            described_size: map.size(),
            blob: b.blob,
            size: b.size,
        });
    }
    Ok(())
}
