//! `deckhand publish` and `deckhand rollback`: turn release files into a signed release in the origin.
//!
//! Order of writes: blobs, chunk maps, the manifest (a conditional PUT that only creates), then
//! current.json. An interrupted publish therefore never leaves a manifest naming a missing blob, and a
//! re-run skips every blob and chunk map already present. Publishing happens in two steps, [`prepare`]
//! (validate, upload, choose the version, sign) and [`commit`] (write the manifest and the pointer), so a
//! race with another publisher can be tested deterministically.

use crate::error::ToolError;
use crate::origin::{Bucket, OriginConfig, OriginError, OriginUrl};
use deckhand_agent::origin::Fetched;
use deckhand_agent::release::{DetectorFiles, ReleaseFiles, SettingsOverrides, check_release};
use deckhand_protocol::envelope::inspect_unverified;
use deckhand_protocol::layout::{Key, Name};
use deckhand_protocol::manifest::{Artifact, BlobRef, Canary, Manifest, Role, SCHEMA};
use deckhand_protocol::{BlobId, ChunkMap, Envelope, SecretKey, delta, pack};
use indicatif::{ProgressBar, ProgressStyle};
use jiff::{SignedDuration, Timestamp};
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A release input: a local file, or an object in S3 (`s3://bucket/key`) read with the origin's
/// endpoint and credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Local(PathBuf),
    Remote { bucket: String, key: String },
}

impl FromStr for Input {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, key) = rest
                .split_once('/')
                .filter(|(b, k)| !b.is_empty() && !k.is_empty())
                .ok_or_else(|| format!("{s:?} is not s3://bucket/key"))?;
            return Ok(Input::Remote {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
        if s.is_empty() {
            return Err("empty path".into());
        }
        Ok(Input::Local(PathBuf::from(s)))
    }
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Local(p) => write!(f, "{}", p.display()),
            Input::Remote { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

/// The files of a release to publish.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub hef: Input,
    pub onnx: Input,
    pub index: Input,
    pub labels: Input,
    pub metadata: Input,
    pub embeddings: Option<Input>,
    /// The card detector: its ONNX model and its HEF.
    pub detector: Option<(Input, Input)>,
    pub canaries: Vec<(Input, String)>,
}

#[derive(Clone, Debug)]
pub struct PublishOptions {
    pub deployment: Name,
    pub inputs: Inputs,
    pub expires_in: SignedDuration,
    pub overrides: SettingsOverrides,
    /// How the release goes live (`None`: each agent's own setting), and not before when.
    pub activate: Option<deckhand_protocol::switch::Mode>,
    pub not_before: Option<Timestamp>,
    /// Agents do not hold it for their maintenance windows.
    pub urgent: bool,
    /// What a shadow evaluation on each agent must show before it goes live (`None`: each agent's own
    /// setting).
    pub shadow: Option<deckhand_protocol::shadow::Policy>,
    /// How each agent watches it after it goes live, and rolls it back (`None`: each agent's own
    /// setting).
    pub rollout: Option<deckhand_protocol::probation::Rollout>,
    /// Draw a progress bar (only ever on a terminal).
    pub progress: bool,
}

impl PublishOptions {
    /// Options to publish a release's local files (defaults for everything else).
    pub fn local(
        deployment: Name,
        files: &deckhand_agent::release::ReleaseFiles,
        expires_in: SignedDuration,
    ) -> Self {
        let l = |p: &std::path::Path| Input::Local(p.to_owned());
        PublishOptions {
            deployment,
            inputs: Inputs {
                hef: l(&files.hef),
                onnx: l(&files.onnx),
                index: l(&files.index),
                labels: l(&files.labels),
                metadata: l(&files.metadata),
                embeddings: files.embeddings.as_deref().map(l),
                detector: files.detector.as_ref().map(|d| (l(&d.onnx), l(&d.hef))),
                canaries: files
                    .canaries
                    .iter()
                    .map(|(p, c)| (l(p), c.clone()))
                    .collect(),
            },
            expires_in,
            overrides: Default::default(),
            activate: None,
            not_before: None,
            urgent: false,
            shadow: None,
            rollout: None,
            progress: false,
        }
    }
}

/// A signed release whose blobs are uploaded, not yet committed.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub manifest: Manifest,
    pub envelope: Vec<u8>,
    pub id: BlobId,
    /// Blobs and chunk maps uploaded by this publish.
    pub uploaded: Vec<BlobId>,
    /// Blobs and chunk maps already present.
    pub skipped: Vec<BlobId>,
    /// Bytes uploaded: the blobs and their packs.
    pub bytes_uploaded: u64,
    /// What the operator should know of a release that was still published: each a sentence.
    pub warnings: Vec<String>,
}

/// A committed release.
#[derive(Clone, Debug)]
pub struct Published {
    pub version: u64,
    pub id: BlobId,
    pub manifest_key: String,
    /// False when a newer version already occupied current.json.
    pub current_updated: bool,
}

/// Fetches remote inputs into `work`; local inputs are used in place.
async fn localize(
    input: &Input,
    cfg: &OriginConfig,
    work: &Path,
    name: &str,
) -> Result<PathBuf, ToolError> {
    match input {
        Input::Local(p) => Ok(p.clone()),
        Input::Remote { bucket, key } => {
            let url = OriginUrl::S3 {
                bucket: bucket.clone(),
                prefix: String::new(),
            };
            let origin = crate::origin::connect(&url, cfg).await?;
            let dest = work.join(name);
            // During a layout migration an input may be named by its old or its new key: whichever holds
            // it now is read (004 R4.3, R5.5).
            let found = crate::layout::journal::locate(&*origin, key)
                .await?
                .ok_or_else(|| ToolError::NoSuchInput {
                    name: name.to_string(),
                    input: input.to_string(),
                })?;
            origin.download(&found, &dest).await?;
            Ok(dest)
        }
    }
}

/// A file to publish, chunked.
pub(crate) struct Blob {
    pub(crate) path: PathBuf,
    pub(crate) map: ChunkMap,
}

fn chunk_file(path: &Path) -> Result<ChunkMap, ToolError> {
    let file = std::fs::File::open(path).map_err(ToolError::io("open", path))?;
    let len = file.metadata().map_err(ToolError::io("stat", path))?.len();
    if len == 0 {
        return Err(ToolError::EmptyFile(path.to_owned()));
    }
    // SAFETY: the operator's input file is only read; if it changes while mapped, the blob id computed here
    // no longer matches what is uploaded and verification (here and on every agent) refuses it.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(ToolError::io("map", path))?;
    Ok(ChunkMap::build(&mmap))
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Uploads whatever of `blobs` (and their chunk maps) the origin lacks: blobs first, then chunk maps.
async fn upload_missing(
    origin: &dyn Bucket,
    blobs: &[Blob],
    progress: bool,
) -> Result<(Vec<BlobId>, Vec<BlobId>, u64), ToolError> {
    let layout = origin.layout();
    let mut todo = Vec::new();
    let mut skipped = Vec::new();
    for b in blobs {
        let key = layout.blob(&b.map.blob());
        match origin.head(&key).await? {
            Some(info) if info.size == b.map.size() => skipped.push(b.map.blob()),
            _ => todo.push(b),
        }
    }
    let total: u64 = todo.iter().map(|b| b.map.size()).sum();
    let bar = progress_bar(progress, total);
    bar.set_message("uploading");
    let mut uploaded = Vec::new();
    for b in &todo {
        let key = layout.blob(&b.map.blob());
        tracing::info!(blob = %b.map.blob(), size = b.map.size(), file = %b.path.display(), "uploading blob");
        origin.put_file(&key, &b.path, &|n| bar.inc(n)).await?;
        uploaded.push(b.map.blob());
    }
    bar.finish_and_clear();
    let packed = upload_packs(origin, blobs).await?;
    for b in blobs {
        let encoded = b.map.encode();
        let id = BlobId::of(&encoded);
        let key = layout.blob(&id);
        if origin
            .head(&key)
            .await?
            .is_some_and(|i| i.size == encoded.len() as u64)
        {
            skipped.push(id);
            continue;
        }
        origin.put(&key, encoded.into()).await?;
        uploaded.push(id);
    }
    Ok((uploaded, skipped, total + packed))
}

/// Uploads the pack of each of `blobs` the origin lacks (`deckhand_protocol::pack`: its chunks
/// compressed, what agents fetch over the uplink), after the blobs and before their chunk maps, so an
/// agent that finds a chunk map finds its pack. Returns the bytes uploaded.
pub(crate) async fn upload_packs(origin: &dyn Bucket, blobs: &[Blob]) -> Result<u64, ToolError> {
    let layout = origin.layout();
    let mut bytes = 0;
    for b in blobs {
        let key = layout.pack(&b.map.id());
        if origin.head(&key).await?.is_some() {
            continue;
        }
        let (path, map) = (b.path.clone(), b.map.clone());
        let file = tokio::task::spawn_blocking(move || write_pack(&path, &map)).await??;
        let size = file
            .as_file()
            .metadata()
            .map_err(ToolError::io("stat", file.path()))?
            .len();
        tracing::info!(blob = %b.map.blob(), size = b.map.size(), packed = size, "uploading pack");
        origin.put_file(&key, file.path(), &|_| {}).await?;
        bytes += size;
    }
    Ok(bytes)
}

/// Uploads, for each artifact of `new` that changed since the release `base` (the one current.json
/// names when publishing), its delta pack against `base`'s blob of the same role
/// (`deckhand_protocol::delta`): the chunks a Pi serving `base` lacks, each patched against the old
/// blob's bytes around its place. `base` is only a guess at what the Pis hold (and read unverified: a
/// wrong guess costs bytes, not trust, since agents hash every chunk): an agent holding another
/// release reads the packs. The old blobs are read from `origin`. Returns the bytes uploaded.
pub(crate) async fn upload_deltas(
    origin: &dyn Bucket,
    base: &Manifest,
    new: &[(Role, &Blob)],
) -> Result<u64, ToolError> {
    let layout = origin.layout();
    // Every chunk the base release holds: a Pi serving it copies these locally.
    let mut held = std::collections::HashSet::new();
    for b in base.blobs() {
        let Some(bytes) = origin.get_opt(&layout.blob(&b.chunk_map)).await? else {
            return Ok(0);
        };
        let Ok(map) = ChunkMap::decode(&bytes) else {
            return Ok(0);
        };
        held.extend(map.chunks().iter().map(|c| c.id));
    }
    let held = std::sync::Arc::new(held);
    let mut bytes = 0;
    for (role, b) in new {
        let Some(old) = base.artifact(*role).filter(|a| a.blob != b.map.blob()) else {
            continue;
        };
        let key = layout.delta(&b.map.id(), &old.blob);
        if origin.head(&key).await?.is_some() || b.map.chunks().iter().all(|c| held.contains(&c.id))
        {
            continue;
        }
        let old_file = tempfile::NamedTempFile::new().map_err(ToolError::TempDir)?;
        // A base the bucket lost is no base: the packs serve.
        match origin
            .download(&layout.blob(&old.blob), old_file.path())
            .await
        {
            Err(OriginError::NotFound { .. }) => continue,
            r => r?,
        };
        let (path, map, base_id, held) = (b.path.clone(), b.map.clone(), old.blob, held.clone());
        let built = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, ToolError> {
            let new = read_mapped(&path, map.size())?;
            let base = read_mapped(old_file.path(), 0)?;
            if BlobId::of(&base) != base_id {
                return Ok(None);
            }
            let delta = delta::build(
                &map,
                &new,
                base_id,
                &base,
                |c| !held.contains(&c.id),
                pack::PACK_LEVEL,
            );
            drop(base);
            drop(old_file);
            Ok(delta)
        })
        .await??;
        if let Some(delta) = built {
            tracing::info!(blob = %b.map.blob(), base = %old.blob, size = delta.len(), "uploading delta pack");
            bytes += delta.len() as u64;
            origin.put(&key, delta.into()).await?;
        }
    }
    Ok(bytes)
}

/// The file at `path` mapped, checked to be `len` bytes long (0: any length).
fn read_mapped(path: &Path, len: u64) -> Result<memmap2::Mmap, ToolError> {
    let file = std::fs::File::open(path).map_err(ToolError::io("open", path))?;
    // SAFETY: as in `chunk_file`: a file changed while mapped fails a length or hash check here, or
    // every agent's hash check of the chunks it gives.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(ToolError::io("map", path))?;
    if len != 0 && mmap.len() as u64 != len {
        return Err(ToolError::Corrupt {
            what: path.display().to_string(),
            why: "changed while it was being published",
        });
    }
    Ok(mmap)
}

/// Writes the pack of the file at `path` (chunked as `map`) to a temporary file.
fn write_pack(path: &Path, map: &ChunkMap) -> Result<tempfile::NamedTempFile, ToolError> {
    use std::io::Write;
    let mmap = read_mapped(path, map.size())?;
    let stored = pack::stored(map, &mmap, pack::PACK_LEVEL);
    let mut out = tempfile::NamedTempFile::new().map_err(ToolError::TempDir)?;
    let tmp = out.path().to_owned();
    let mut w = std::io::BufWriter::new(out.as_file_mut());
    w.write_all(&pack::header(map, &stored))
        .map_err(ToolError::io("write", &tmp))?;
    for s in &stored {
        w.write_all(s).map_err(ToolError::io("write", &tmp))?;
    }
    w.flush().map_err(ToolError::io("write", &tmp))?;
    drop(w);
    Ok(out)
}

/// The version after the highest one the origin holds for `deployment` (listed manifests and
/// current.json both count).
pub async fn next_version(origin: &dyn Bucket, deployment: &Name) -> Result<u64, ToolError> {
    let layout = origin.layout();
    let mut highest = 0u64;
    for obj in origin.list(&layout.manifest_dir(deployment)).await? {
        if let Ok(Key::Manifest { version, .. }) = layout.classify(&obj.key) {
            highest = highest.max(version);
        }
    }
    if let Some(current) = origin.get_opt(&layout.current(deployment)).await?
        && let Ok(m) = inspect_unverified(&current)
    {
        highest = highest.max(m.version);
    }
    if let Some(next) = highest.checked_add(1) {
        return Ok(next);
    }
    // A leaked key published the last version there is. Agents admit it only until a rotation of the
    // release keys starts a new epoch, where any version not yet in the bucket will do: the lowest.
    let taken: std::collections::BTreeSet<u64> = origin
        .list(&layout.manifest_dir(deployment))
        .await?
        .iter()
        .filter_map(|obj| match layout.classify(&obj.key) {
            Ok(Key::Manifest { version, .. }) => Some(version),
            _ => None,
        })
        .collect();
    (1..u64::MAX)
        .find(|v| !taken.contains(v))
        .ok_or(ToolError::VersionsExhausted)
}

fn media_type(role: Role) -> &'static str {
    match role {
        Role::Hef => "application/vnd.hailo.hef",
        Role::Onnx => "application/onnx",
        Role::Index => "application/vnd.usearch.index",
        Role::Labels | Role::Metadata => "application/json",
        Role::Embeddings => "application/x-npy",
        Role::Detector => "application/onnx",
        Role::DetectorHef => "application/vnd.hailo.hef",
    }
}

/// Validates the release as a whole, uploads what the origin lacks, chooses the next version and signs.
pub async fn prepare(
    origin: &dyn Bucket,
    cfg: &OriginConfig,
    key: &SecretKey,
    opts: &PublishOptions,
    work: &Path,
) -> Result<Prepared, ToolError> {
    let i = &opts.inputs;
    let mut files = ReleaseFiles {
        hef: localize(&i.hef, cfg, work, "input.hef").await?,
        onnx: localize(&i.onnx, cfg, work, "input.onnx").await?,
        index: localize(&i.index, cfg, work, "input.index").await?,
        labels: localize(&i.labels, cfg, work, "input-labels.json").await?,
        metadata: localize(&i.metadata, cfg, work, "input-metadata.json").await?,
        embeddings: None,
        detector: None,
        canaries: Vec::new(),
    };
    if let Some(e) = &i.embeddings {
        files.embeddings = Some(localize(e, cfg, work, "input-embeddings.npy").await?);
    }
    if let Some((onnx, hef)) = &i.detector {
        files.detector = Some(DetectorFiles {
            onnx: localize(onnx, cfg, work, "input-detector.onnx").await?,
            hef: localize(hef, cfg, work, "input-detector.hef").await?,
        });
    }
    for (n, (input, card)) in i.canaries.iter().enumerate() {
        files.canaries.push((
            localize(input, cfg, work, &format!("canary-{n}")).await?,
            card.clone(),
        ));
    }

    // Everything is checked before a single byte is uploaded.
    let checked = {
        let (files, overrides) = (files.clone(), opts.overrides.clone());
        tokio::task::spawn_blocking(move || check_release(&files, &overrides)).await??
    };
    let mut warnings = Vec::new();
    if let Some(in_place) = checked.index_rows_in_place.filter(|n| *n < checked.rows) {
        warnings.push(format!(
            "{} of the {} vectors in {} are not at their row of {} (an index built on several threads \
             stores them in the order the threads added them): every release that rebuilds it sends the \
             whole index to every shop, where an index built on one thread from the rows in order \
             (usearch: index.add(keys, vectors, threads=1)) sends its new rows and graph; `deckhand bench \
             delta` measures both",
            checked.rows - in_place,
            checked.rows,
            files.index.display(),
            files
                .embeddings
                .as_deref()
                .map_or_else(|| "embeddings.npy".into(), |p| p.display().to_string())
        ));
    }

    let mut roles: Vec<(Role, PathBuf)> = vec![
        (Role::Hef, files.hef.clone()),
        (Role::Onnx, files.onnx.clone()),
        (Role::Index, files.index.clone()),
        (Role::Labels, files.labels.clone()),
        (Role::Metadata, files.metadata.clone()),
    ];
    if let Some(e) = &files.embeddings {
        roles.push((Role::Embeddings, e.clone()));
    }
    if let Some(d) = &files.detector {
        roles.push((Role::Detector, d.onnx.clone()));
        roles.push((Role::DetectorHef, d.hef.clone()));
    }
    let paths: Vec<PathBuf> = roles
        .iter()
        .map(|(_, p)| p.clone())
        .chain(files.canaries.iter().map(|(p, _)| p.clone()))
        .collect();
    let maps = tokio::task::spawn_blocking(move || {
        paths
            .iter()
            .map(|p| chunk_file(p))
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    let all_paths = roles
        .iter()
        .map(|(_, p)| p.clone())
        .chain(files.canaries.iter().map(|(p, _)| p.clone()));
    let blobs: Vec<Blob> = all_paths
        .zip(maps)
        .map(|(path, map)| Blob { path, map })
        .collect();

    let (uploaded, skipped, mut bytes_uploaded) =
        upload_missing(origin, &blobs, opts.progress).await?;
    if let Some(current) = origin
        .get_opt(&origin.layout().current(&opts.deployment))
        .await?
        && let Ok(base) = inspect_unverified(&current)
    {
        let new: Vec<(Role, &Blob)> = roles.iter().map(|(r, _)| *r).zip(&blobs).collect();
        bytes_uploaded += upload_deltas(origin, &base, &new).await?;
    }

    let artifacts = roles
        .iter()
        .zip(&blobs)
        .map(|((role, _), b)| Artifact {
            role: *role,
            blob: b.map.blob(),
            size: b.map.size(),
            chunk_map: b.map.id(),
            media_type: media_type(*role).to_owned(),
        })
        .collect();
    let canaries = files
        .canaries
        .iter()
        .zip(&blobs[roles.len()..])
        .zip(&checked.canary_media_types)
        .map(|(((_, card), b), media)| Canary {
            image: b.map.blob(),
            size: b.map.size(),
            chunk_map: b.map.id(),
            media_type: (*media).to_owned(),
            card_id: card.clone(),
        })
        .collect();
    let now = Timestamp::now();
    let manifest = Manifest {
        schema: SCHEMA.to_owned(),
        deployment: opts.deployment.to_string(),
        version: next_version(origin, &opts.deployment).await?,
        created_at: now,
        expires_at: now
            .checked_add(opts.expires_in)
            .map_err(|e| ToolError::Usage(format!("--expires-in: {e}")))?,
        artifacts,
        recognizer: checked.settings,
        canaries,
        activate: opts.activate,
        not_before: opts.not_before,
        urgent: opts.urgent,
        shadow: opts.shadow,
        rollout: opts.rollout,
        detector: checked.detector,
    };
    let mut prepared = sign(manifest, key, uploaded, skipped, bytes_uploaded)?;
    prepared.warnings = warnings;
    Ok(prepared)
}

fn sign(
    manifest: Manifest,
    key: &SecretKey,
    uploaded: Vec<BlobId>,
    skipped: Vec<BlobId>,
    bytes_uploaded: u64,
) -> Result<Prepared, ToolError> {
    manifest.validate().map_err(ToolError::BuiltManifest)?;
    let payload = manifest.to_payload();
    let envelope = Envelope::sign(&payload, &[key]).to_bytes();
    Ok(Prepared {
        id: BlobId::of(&payload),
        manifest,
        envelope,
        uploaded,
        skipped,
        bytes_uploaded,
        warnings: Vec::new(),
    })
}

/// Writes the manifest with `If-None-Match: *` (so of two publishers racing for a version exactly one
/// wins), then points current.json at it unless a newer version is already there.
pub async fn commit(origin: &dyn Bucket, prepared: &Prepared) -> Result<Published, ToolError> {
    let m = &prepared.manifest;
    let deployment = Name::deployment(&m.deployment)?;
    let layout = origin.layout();
    let manifest_key = layout.manifest(&deployment, m.version);
    match origin
        .put_new(&manifest_key, prepared.envelope.clone().into())
        .await
    {
        Ok(()) => {}
        Err(OriginError::AlreadyExists { .. }) => {
            return Err(ToolError::VersionTaken {
                deployment: m.deployment.clone(),
                version: m.version,
            });
        }
        Err(e) => return Err(e.into()),
    }
    let current_updated =
        advance_current(origin, &deployment, m.version, &prepared.envelope).await?;
    Ok(Published {
        version: m.version,
        id: prepared.id,
        manifest_key,
        current_updated,
    })
}

/// Points current.json at `envelope` (version `version`) unless it already names a newer version.
/// Returns whether it was written.
pub async fn advance_current(
    origin: &dyn Bucket,
    deployment: &Name,
    version: u64,
    envelope: &[u8],
) -> Result<bool, ToolError> {
    let current_key = origin.layout().current(deployment);
    // Read, decide, then write only if nothing changed since the read (If-Match on the entity tag, or
    // If-None-Match when there was nothing): a publisher that read an older current.json cannot
    // overwrite a newer one another publisher wrote meanwhile. It reads again instead.
    for _ in 0..CURRENT_ATTEMPTS {
        let (current, etag) = match origin
            .get_if_changed(
                &current_key,
                None,
                deckhand_protocol::envelope::MAX_ENVELOPE as u64,
            )
            .await?
        {
            Fetched::Changed { body, etag } => (Some(body), etag),
            Fetched::Missing | Fetched::NotModified => (None, None),
        };
        if current
            .as_ref()
            .is_some_and(|b| inspect_unverified(b).is_ok_and(|c| c.version > version))
        {
            return Ok(false);
        }
        let body = bytes::Bytes::copy_from_slice(envelope);
        let written = match (&current, etag) {
            (None, _) => origin.put_new(&current_key, body).await,
            (Some(_), Some(tag)) => origin.put_if_match(&current_key, body, &tag).await,
            // A server that gives no entity tag cannot be asked for a conditional write.
            (Some(_), None) => origin.put(&current_key, body).await,
        };
        match written {
            Ok(()) => return Ok(true),
            Err(OriginError::Changed { .. } | OriginError::AlreadyExists { .. }) => {
                tracing::info!(
                    version,
                    "current.json changed while this publisher wrote it; reading it again"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ToolError::CurrentContended {
        attempts: CURRENT_ATTEMPTS,
    })
}

/// How many times [`advance_current`] reads and tries again when other publishers keep writing.
const CURRENT_ATTEMPTS: u32 = 10;

/// Validates, uploads, signs and commits.
pub async fn publish(
    origin: &dyn Bucket,
    cfg: &OriginConfig,
    key: &SecretKey,
    opts: &PublishOptions,
    work: &Path,
) -> Result<(Prepared, Published), ToolError> {
    let prepared = prepare(origin, cfg, key, opts, work).await?;
    let published = commit(origin, &prepared).await?;
    Ok((prepared, published))
}

/// The blobs a manifest needs, with their chunk maps, that the origin does not hold (by HEAD and size).
pub async fn missing_blobs(origin: &dyn Bucket, m: &Manifest) -> Result<Vec<String>, ToolError> {
    let layout = origin.layout();
    let mut missing = Vec::new();
    for BlobRef {
        blob,
        size,
        chunk_map,
    } in m.blobs()
    {
        match origin.head(&layout.blob(&blob)).await? {
            Some(i) if i.size == size => {}
            Some(i) => missing.push(format!(
                "blob {blob} is {} bytes, the manifest says {size}",
                i.size
            )),
            None => missing.push(format!("blob {blob} is missing")),
        }
        if origin.head(&layout.blob(&chunk_map)).await?.is_none() {
            missing.push(format!("chunk map {chunk_map} (of blob {blob}) is missing"));
        }
    }
    Ok(missing)
}

/// Publishes a new, higher version naming the artifacts of version `to`. Nothing is uploaded: the old
/// blobs must all still be in the origin. Version `to` must verify with `trust` (signatures and
/// threshold; its old expiry does not matter, the new manifest gets a fresh one).
pub async fn rollback(
    origin: &dyn Bucket,
    deployment: &Name,
    to: u64,
    key: &SecretKey,
    trust: &deckhand_protocol::TrustPolicy,
    expires_in: SignedDuration,
) -> Result<(Prepared, Published), ToolError> {
    let layout = origin.layout();
    let key_name = layout.manifest(deployment, to);
    let envelope = origin
        .get_opt(&key_name)
        .await?
        .ok_or_else(|| ToolError::NoSuchVersion {
            version: to,
            deployment: deployment.to_string(),
            key: key_name.clone(),
        })?;
    let old = trust
        .verify_ignoring_expiry(&envelope)
        .map_err(|source| ToolError::Verify {
            context: format!(
                "version {to} ({key_name}) does not verify, refusing to roll back to it"
            ),
            source,
        })?
        .manifest;
    let missing = missing_blobs(origin, &old).await?;
    if !missing.is_empty() {
        return Err(ToolError::RollbackIncomplete {
            version: to,
            missing,
        });
    }
    let now = Timestamp::now();
    // A rollback is urgent: the release it replaces is the one to get away from, windows or not.
    let manifest = Manifest {
        version: next_version(origin, deployment).await?,
        urgent: true,
        shadow: None,
        rollout: None,
        created_at: now,
        expires_at: now
            .checked_add(expires_in)
            .map_err(|e| ToolError::Usage(format!("--expires-in: {e}")))?,
        ..old
    };
    let prepared = sign(manifest, key, Vec::new(), Vec::new(), 0)?;
    let published = commit(origin, &prepared).await?;
    Ok((prepared, published))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn after_the_last_version_a_leaked_key_took_the_lowest_free_one_is_next() {
        let dir = tempfile::tempdir().unwrap();
        let file = deckhand_agent::origin::FileOrigin::new(dir.path()).unwrap();
        let bucket: &dyn Bucket = &file;
        let d = Name::deployment("shop-1").unwrap();
        for v in [1, 2, 4] {
            let key = bucket.layout().manifest(&d, v);
            bucket.put(&key, Bytes::from_static(b"{}")).await.unwrap();
        }
        assert_eq!(next_version(bucket, &d).await.unwrap(), 5);
        let key = bucket.layout().manifest(&d, u64::MAX);
        bucket.put(&key, Bytes::from_static(b"{}")).await.unwrap();
        assert_eq!(next_version(bucket, &d).await.unwrap(), 3);
    }
}
