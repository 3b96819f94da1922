//! `deckhand versions`, `deckhand verify` and `deckhand bundle export`: reading releases back.

use crate::check::{check_blob, describe};
use crate::error::ToolError;
use crate::origin::{Bucket, OriginConfig, OriginError, OriginUrl};
use deckhand_protocol::envelope::inspect_unverified;
use deckhand_protocol::layout::{Key, Name};
use deckhand_protocol::manifest::BlobRef;
use deckhand_protocol::{BlobId, TrustPolicy};
use jiff::Timestamp;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;

/// One published version, as listed.
#[derive(Clone, Debug, Serialize)]
pub struct VersionLine {
    pub version: u64,
    pub key: String,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    /// "ok", "unverified" (no --trust given) or the reason it failed.
    pub signature: String,
    pub current: bool,
    pub artifacts: Vec<(String, String, u64)>,
}

/// Every version of a deployment, oldest first.
pub async fn versions(
    origin: &dyn Bucket,
    deployment: &Name,
    trust: Option<&TrustPolicy>,
) -> Result<Vec<VersionLine>, ToolError> {
    let layout = origin.layout();
    let current = origin
        .get_opt(&layout.current(deployment))
        .await?
        .and_then(|b| inspect_unverified(&b).ok())
        .map(|m| m.version);
    let mut out = Vec::new();
    for obj in origin.list(&layout.manifest_dir(deployment)).await? {
        let Ok(Key::Manifest { version, .. }) = layout.classify(&obj.key) else {
            continue;
        };
        let bytes = origin.get(&obj.key).await?;
        let signature = match trust {
            None => "unverified".to_owned(),
            Some(t) => match t.verify(&bytes, Timestamp::now()) {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.to_string(),
            },
        };
        let (created_at, expires_at, artifacts) = match inspect_unverified(&bytes) {
            Ok(m) => (
                Some(m.created_at.to_string()),
                Some(m.expires_at.to_string()),
                m.artifacts
                    .iter()
                    .map(|a| (a.role.to_string(), a.blob.to_string(), a.size))
                    .collect(),
            ),
            Err(e) => (None, None, vec![("unreadable".into(), e.to_string(), 0)]),
        };
        out.push(VersionLine {
            version,
            key: obj.key,
            created_at,
            expires_at,
            signature,
            current: current == Some(version),
            artifacts,
        });
    }
    out.sort_by_key(|v| v.version);
    Ok(out)
}

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub version: Option<u64>,
    pub manifest_key: String,
    pub blobs_checked: usize,
    pub bytes_checked: u64,
    pub problems: Vec<String>,
}

/// The seeds' verification checklist, automated: the manifest's signatures, then every blob and chunk
/// map it names is present, with the right size and hash, and every chunk map agrees with its blob.
pub async fn verify(
    origin: &dyn Bucket,
    deployment: &Name,
    version: Option<u64>,
    trust: &TrustPolicy,
    work: &Path,
) -> Result<VerifyReport, ToolError> {
    let layout = origin.layout();
    let mut report = VerifyReport::default();
    let key = match version {
        Some(v) => layout.manifest(deployment, v),
        None => layout.current(deployment),
    };
    report.manifest_key = key.clone();
    let Some(envelope) = origin.get_opt(&key).await? else {
        report.problems.push(format!("{key} is missing"));
        return Ok(report);
    };
    let m = match trust.verify(&envelope, Timestamp::now()) {
        Ok(v) => v.manifest,
        Err(e) => {
            report.problems.push(format!("{key}: {e}"));
            return Ok(report);
        }
    };
    report.version = Some(m.version);
    if m.deployment != deployment.as_str() {
        report.problems.push(format!(
            "{key} is a manifest for deployment {:?}",
            m.deployment
        ));
    }
    if version.is_none() {
        let versioned = layout.manifest(deployment, m.version);
        match origin.get_opt(&versioned).await? {
            Some(b) if b == envelope => {}
            Some(_) => report
                .problems
                .push(format!("current.json differs from {versioned}")),
            None => report.problems.push(format!(
                "current.json names version {}, but {versioned} is missing",
                m.version
            )),
        }
    }
    for b in m.blobs() {
        let what = describe(&m, &b.blob);
        report.blobs_checked += 1;
        report.bytes_checked += check_blob(origin, &b, &what, work, &mut report.problems).await?;
    }
    Ok(report)
}

/// What `bundle export` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct BundleReport {
    pub version: u64,
    pub dir: String,
    pub blobs: usize,
    pub bytes: u64,
}

/// Writes a release (signed manifest, every blob and chunk map) to `out`, in the origin key layout, so the
/// directory is itself a `file://` origin an agent can sideload with no network. Every blob is hashed as it
/// is written.
pub async fn bundle_export(
    origin: &dyn Bucket,
    deployment: &Name,
    version: Option<u64>,
    trust: Option<&TrustPolicy>,
    out: &Path,
) -> Result<BundleReport, ToolError> {
    let layout = origin.layout();
    let key = match version {
        Some(v) => layout.manifest(deployment, v),
        None => layout.current(deployment),
    };
    let envelope = origin
        .get_opt(&key)
        .await?
        .ok_or_else(|| ToolError::NoSuchObject(key.clone()))?;
    let m = match trust {
        Some(t) => {
            t.verify(&envelope, Timestamp::now())
                .map_err(|source| ToolError::Verify {
                    context: format!("{key} does not verify"),
                    source,
                })?
                .manifest
        }
        None => inspect_unverified(&envelope).map_err(|source| ToolError::Verify {
            context: format!("{key} is not a readable manifest"),
            source,
        })?,
    };
    std::fs::create_dir_all(out).map_err(ToolError::io("create directory", out))?;
    let abs = std::fs::canonicalize(out).map_err(ToolError::io("resolve", out))?;
    let dest = crate::origin::connect(
        &OriginUrl::File { root: abs.clone() },
        &OriginConfig::default(),
    )
    .await?;
    let dl = dest.layout().clone();
    let mut report = BundleReport {
        version: m.version,
        dir: abs.display().to_string(),
        blobs: 0,
        bytes: 0,
    };
    for BlobRef {
        blob, chunk_map, ..
    } in m.blobs()
    {
        for id in [blob, chunk_map] {
            let target = abs.join(dl.blob(&id));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(ToolError::io("create directory", parent))?;
            }
            let n = origin.download(&layout.blob(&id), &target).await?;
            let (hash, _) = {
                let mut h = blake3::Hasher::new();
                h.update_mmap(&target)
                    .map_err(ToolError::io("hash", &target))?;
                (h.finalize(), ())
            };
            if BlobId::from_hash(hash) != id {
                let _ = std::fs::remove_file(&target);
                return Err(ToolError::Corrupt {
                    what: layout.blob(&id),
                    why: "it does not hash to its name",
                });
            }
            report.blobs += 1;
            report.bytes += n;
        }
    }
    // The manifest last: a bundle with a manifest is a complete bundle.
    let d = Name::deployment(&m.deployment)?;
    dest.put(&dl.manifest(&d, m.version), envelope.clone())
        .await?;
    dest.put(&dl.current(&d), envelope).await?;
    Ok(report)
}

/// One manifest `bundle push` restored.
#[derive(Clone, Debug, Serialize)]
pub struct PushedManifest {
    pub version: u64,
    /// The manifest's id: the blake3 of its signed payload.
    pub id: String,
    pub key: String,
    /// True if it was written; false if the origin already held these exact bytes.
    pub written: bool,
}

/// What `bundle push` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PushReport {
    pub manifests: Vec<PushedManifest>,
    /// Blobs and chunk maps uploaded; the bytes uploaded, their packs' included.
    pub uploaded: usize,
    pub bytes_uploaded: u64,
    /// Blobs and chunk maps the origin already held.
    pub present: usize,
    /// The version current.json names after the push, if this push wrote it.
    pub current_set_to: Option<u64>,
    /// The version current.json named before, if any.
    pub current_before: Option<u64>,
    /// What the operator should know (a restored manifest that has expired).
    pub warnings: Vec<String>,
    /// The trust root versions written (the bundle's, checked as a chain).
    pub roots: Vec<u64>,
    /// Whether the bundle's fleet bundle was written (the origin had none).
    pub fleet_bundle: bool,
}

/// Restores a bundle directory (`deckhand bundle export` or `deckhand-agent store export`) into an
/// origin: every manifest of `deployment` in it is verified against `trust` (expiry aside: an expired
/// manifest is restored, with a warning, since agents judge expiry themselves), every blob and chunk map
/// they name is verified against its id, and only when everything verified is anything written:
/// the missing blobs and chunk maps, then each manifest under its own version with `If-None-Match: *`
/// (the same bytes already there are fine; different bytes at that version are refused), then
/// current.json, only if it is missing or names an older version. The deployment's trust roots in the
/// bundle are checked as a chain and restored where missing, and its fleet bundle where the origin has
/// none.
pub async fn bundle_push(
    from: &Path,
    origin: &dyn Bucket,
    deployment: &Name,
    trust: &TrustPolicy,
    work: &Path,
) -> Result<PushReport, ToolError> {
    let root = std::fs::canonicalize(from).map_err(ToolError::io("open the bundle", from))?;
    let bundle = crate::origin::connect(
        &OriginUrl::File { root: root.clone() },
        &OriginConfig::default(),
    )
    .await?;
    let mut report = PushReport::default();
    let manifests = bundle_manifests(&*bundle, deployment, trust, &mut report).await?;
    let mut problems = Vec::new();
    let already = already_restored(origin, deployment, &manifests, &mut problems).await?;
    let lacking = check_bundle_blobs(
        &*bundle,
        origin,
        &manifests,
        work,
        &mut report,
        &mut problems,
    )
    .await?;
    let roots = bundle_roots(&*bundle, origin, deployment, &mut problems).await?;
    if !problems.is_empty() {
        return Err(ToolError::BundleRefused { problems });
    }
    // Only now is anything written: blobs and chunk maps, the trust roots and the fleet bundle, then
    // the manifests, then current.json.
    let bl = bundle.layout().clone();
    let dl = origin.layout().clone();
    for id in &lacking {
        let key = dl.blob(id);
        let path = root.join(bl.blob(id));
        let size = std::fs::metadata(&path)
            .map_err(ToolError::io("read", &path))?
            .len();
        origin.put_file(&key, &path, &|_| {}).await?;
        report.uploaded += 1;
        report.bytes_uploaded += size;
    }
    // Each blob's pack (its chunks compressed, what agents fetch over the uplink), made where the
    // origin lacks it: a bundle holds blobs and chunk maps, not packs.
    let mut packable: Vec<crate::publish::Blob> = Vec::new();
    for b in manifests.iter().flat_map(|v| v.manifest.blobs()) {
        if packable.iter().any(|p| p.map.id() == b.chunk_map) {
            continue;
        }
        let path = root.join(bl.blob(&b.chunk_map));
        let bytes = std::fs::read(&path).map_err(ToolError::io("read", &path))?;
        // Checked against its id and its blob above.
        let map = deckhand_protocol::ChunkMap::decode(&bytes).map_err(|_| ToolError::Corrupt {
            what: path.display().to_string(),
            why: "is not a chunk map",
        })?;
        packable.push(crate::publish::Blob {
            path: root.join(bl.blob(&b.blob)),
            map,
        });
    }
    report.bytes_uploaded += crate::publish::upload_packs(origin, &packable).await?;
    // And each manifest's delta packs against the one before it in the bundle (what a Pi serving
    // that one fetches).
    for pair in manifests.windows(2) {
        let (base, next) = (&pair[0].manifest, &pair[1].manifest);
        let new: Vec<(deckhand_protocol::manifest::Role, &crate::publish::Blob)> = next
            .artifacts
            .iter()
            .filter_map(|a| Some((a.role, packable.iter().find(|p| p.map.id() == a.chunk_map)?)))
            .collect();
        report.bytes_uploaded += crate::publish::upload_deltas(origin, base, &new).await?;
    }
    for (version, envelope) in roots {
        let key = dl.trust_root(deployment, version);
        match origin.put_new(&key, envelope).await {
            Ok(()) => report.roots.push(version),
            // Checked above to hold these bytes, or written since with them.
            Err(OriginError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The fleet bundle (each part signed by a fleet CA, judged by the agents): restored only where
    // the origin has none, never over a newer one the operator wrote since.
    if let Some(fleet) = bundle.get_opt(&bl.fleet()).await? {
        match origin.put_new(&dl.fleet(), fleet).await {
            Ok(()) => report.fleet_bundle = true,
            Err(OriginError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    write_manifests(origin, deployment, &manifests, &already, &mut report).await?;
    report.current_before = origin
        .get_opt(&dl.current(deployment))
        .await?
        .and_then(|b| inspect_unverified(&b).ok())
        .map(|m| m.version);
    if let Some(newest) = manifests.last()
        && report
            .current_before
            .is_none_or(|before| before < newest.manifest.version)
        && crate::publish::advance_current(
            origin,
            deployment,
            newest.manifest.version,
            &newest.envelope,
        )
        .await?
    {
        report.current_set_to = Some(newest.manifest.version);
    }
    Ok(report)
}

/// The deployment's trust roots in the bundle (`store export` writes those a Pi kept), oldest first,
/// each checked to follow the one before it (signed by enough of its root keys), the first one
/// self-signed; a root the origin holds with other bytes is a problem. Returns those to write.
async fn bundle_roots(
    bundle: &dyn Bucket,
    origin: &dyn Bucket,
    deployment: &Name,
    problems: &mut Vec<String>,
) -> Result<Vec<(u64, bytes::Bytes)>, ToolError> {
    let bl = bundle.layout().clone();
    let first = bl.trust_root(deployment, 1);
    let dir = first.rsplit_once('/').map_or("", |(d, _)| d);
    let mut found = Vec::new();
    for obj in bundle.list(&format!("{dir}/")).await? {
        if let Ok(Key::Root { version, .. }) = bl.classify(&obj.key) {
            found.push((version, bundle.get(&obj.key).await?));
        }
    }
    found.sort_by_key(|(v, _)| *v);
    let mut chain: Option<deckhand_protocol::root::TrustedRoot> = None;
    for (version, envelope) in &found {
        let next = match &chain {
            None => deckhand_protocol::root::TrustedRoot::installed(envelope, deployment.as_str()),
            Some(prev) => prev.update(envelope),
        };
        match next {
            Ok(root) if root.version() == *version => chain = Some(root),
            Ok(root) => {
                problems.push(format!(
                    "{} holds root version {}",
                    bl.trust_root(deployment, *version),
                    root.version()
                ));
                return Ok(Vec::new());
            }
            Err(e) => {
                problems.push(format!(
                    "{} in the bundle does not follow the root before it: {e}",
                    bl.trust_root(deployment, *version)
                ));
                return Ok(Vec::new());
            }
        }
        let key = origin.layout().trust_root(deployment, *version);
        if let Some(there) = origin.get_opt(&key).await?
            && there != *envelope
        {
            problems.push(format!(
                "{key} holds another root than the bundle's; refusing to overwrite it"
            ));
        }
    }
    Ok(found)
}

/// Step 1: every manifest of `deployment` in the bundle, verified against `trust` (expiry aside, with a
/// warning), oldest first.
async fn bundle_manifests(
    bundle: &dyn Bucket,
    deployment: &Name,
    trust: &TrustPolicy,
    report: &mut PushReport,
) -> Result<Vec<deckhand_protocol::VerifiedManifest>, ToolError> {
    let bl = bundle.layout().clone();
    let mut manifests = Vec::new();
    for obj in bundle.list(&bl.manifest_dir(deployment)).await? {
        let Ok(Key::Manifest { version, .. }) = bl.classify(&obj.key) else {
            continue;
        };
        let envelope = bundle.get(&obj.key).await?;
        let v = trust
            .verify_ignoring_expiry(&envelope)
            .map_err(|source| ToolError::Verify {
                context: format!("{} in the bundle does not verify", obj.key),
                source,
            })?;
        if v.manifest.deployment != deployment.as_str() || v.manifest.version != version {
            return Err(ToolError::BundleRefused {
                problems: vec![format!(
                    "{} holds version {} of deployment {:?}",
                    obj.key, v.manifest.version, v.manifest.deployment
                )],
            });
        }
        if v.manifest.expires_at <= Timestamp::now() {
            report.warnings.push(format!(
                "version {version} expired at {}: agents refuse it until a newer version is published \
                 (deckhand rollback re-signs its content)",
                v.manifest.expires_at
            ));
        }
        manifests.push(v);
    }
    if manifests.is_empty() {
        return Err(ToolError::BundleRefused {
            problems: vec![format!(
                "it holds no manifest of deployment {deployment} ({})",
                bl.manifest_dir(deployment)
            )],
        });
    }
    manifests.sort_by_key(|v| v.manifest.version);
    Ok(manifests)
}

/// Step 2: nothing may already sit at a restored version but the same bytes. Returns the versions
/// already there.
async fn already_restored(
    origin: &dyn Bucket,
    deployment: &Name,
    manifests: &[deckhand_protocol::VerifiedManifest],
    problems: &mut Vec<String>,
) -> Result<BTreeSet<u64>, ToolError> {
    let dl = origin.layout().clone();
    let mut already = BTreeSet::new();
    for v in manifests {
        let key = dl.manifest(deployment, v.manifest.version);
        match origin.get_opt(&key).await? {
            Some(b) if b == v.envelope => {
                already.insert(v.manifest.version);
            }
            Some(_) => problems.push(format!(
                "{key} already holds a different manifest; refusing to overwrite it"
            )),
            None => {}
        }
    }
    Ok(already)
}

/// Step 3: every blob and chunk map verified in the bundle (all of them: a bundle that does not verify
/// is refused whole), and what the origin lacks, before anything is written.
async fn check_bundle_blobs(
    bundle: &dyn Bucket,
    origin: &dyn Bucket,
    manifests: &[deckhand_protocol::VerifiedManifest],
    work: &Path,
    report: &mut PushReport,
    problems: &mut Vec<String>,
) -> Result<Vec<BlobId>, ToolError> {
    let dl = origin.layout().clone();
    let mut lacking: Vec<BlobId> = Vec::new();
    let mut seen = BTreeSet::new();
    for v in manifests {
        for b in v.manifest.blobs() {
            if !seen.insert(b.blob) {
                continue;
            }
            let mut missing = Vec::new();
            match origin.head(&dl.blob(&b.blob)).await? {
                Some(i) if i.size == b.size => report.present += 1,
                _ => missing.push(b.blob),
            }
            if seen.insert(b.chunk_map) {
                match origin.head(&dl.blob(&b.chunk_map)).await? {
                    Some(_) => report.present += 1,
                    None => missing.push(b.chunk_map),
                }
            }
            // Every blob of the bundle is checked, not only those uploaded: a bundle that does not
            // verify is refused whole.
            let what = describe(&v.manifest, &b.blob);
            check_blob(bundle, &b, &what, work, problems).await?;
            lacking.extend(missing);
        }
    }
    Ok(lacking)
}

/// Each manifest under its own version with `If-None-Match: *`: the same bytes already there are fine,
/// different bytes refuse the push.
async fn write_manifests(
    origin: &dyn Bucket,
    deployment: &Name,
    manifests: &[deckhand_protocol::VerifiedManifest],
    already: &BTreeSet<u64>,
    report: &mut PushReport,
) -> Result<(), ToolError> {
    let dl = origin.layout().clone();
    for v in manifests {
        let version = v.manifest.version;
        let key = dl.manifest(deployment, version);
        let written = if already.contains(&version) {
            false
        } else {
            match origin.put_new(&key, v.envelope.clone().into()).await {
                Ok(()) => true,
                // Written by someone else since step 2: fine only if it is these bytes.
                Err(OriginError::AlreadyExists { .. })
                    if origin.get_opt(&key).await?.as_deref() == Some(&v.envelope[..]) =>
                {
                    false
                }
                Err(OriginError::AlreadyExists { .. }) => {
                    return Err(ToolError::BundleRefused {
                        problems: vec![format!(
                            "{key} was written with a different manifest during this push; \
                             refusing to overwrite it"
                        )],
                    });
                }
                Err(e) => return Err(e.into()),
            }
        };
        report.manifests.push(PushedManifest {
            version,
            id: v.id.to_string(),
            key,
            written,
        });
    }
    Ok(())
}
