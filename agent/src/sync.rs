//! The sync loop, origin side: resolve the deployment's current.json (conditional GET with the ETag),
//! verify it, fetch what the store misses with Range GETs of adjacent missing chunks, complete and verify
//! every blob, then hand the release to the recognizer and record it active.
//!
//! Errors never stop the loop: the origin being unreachable sets `offline_since` and the loop retries
//! with jittered exponential backoff, while the active release keeps serving. An accepted manifest is
//! recorded as pending, so a restart resumes its download without fetching again what is stored.

use crate::activation::{self, ActivationError};
use crate::metrics::Source;
use crate::origin::{Fetched, Origin, OriginError};
use crate::recognizer::BackendChoice;
use crate::recognizer::service::Service;
use deckhand_protocol::layout::Name;
use deckhand_protocol::manifest::BlobRef;
use deckhand_protocol::sync::coalesce;
use deckhand_protocol::{ChunkMap, TrustPolicy, VerifiedManifest, VerifyError};
use deckhand_store::Store;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest Range GET: adjacent missing chunks are merged up to this many bytes.
pub const MAX_RANGE: u64 = 8 * 1024 * 1024;
const META_PENDING: &str = "pending_envelope";

/// What status shows about syncing.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncStatus {
    pub pending: Option<Pending>,
    pub offline_since: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Pending {
    pub version: u64,
    pub bytes_total: u64,
    pub bytes_have: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
}

#[derive(Clone)]
pub struct SyncConfig {
    pub origin: Origin,
    pub deployment: Name,
    pub policy: TrustPolicy,
    pub backend: BackendChoice,
    pub poll: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error(transparent)]
    Store(#[from] deckhand_store::StoreError),
    #[error("{0}")]
    Other(String),
}

/// Runs until `stop` turns true.
pub async fn run(
    cfg: SyncConfig,
    store: Store,
    service: Service,
    status: Arc<Mutex<SyncStatus>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut etag: Option<String> = None;
    let mut backoff = cfg.poll;
    let mut rng = blake3::Hasher::new();
    rng.update(cfg.deployment.as_str().as_bytes());
    // A download accepted before a restart resumes first.
    if let Ok(Some(env)) = store.get_meta(META_PENDING)
        && let Ok(v) = cfg.policy.verify_ignoring_expiry(&env)
        && let Err(e) = fetch_and_activate(&cfg, &store, &service, &status, &v).await
    {
        tracing::warn!(cause = %e, "resuming the pending release failed; will retry");
    }
    loop {
        let outcome = poll_once(&cfg, &store, &service, &status, &mut etag).await;
        let wait = match outcome {
            Ok(()) => {
                backoff = cfg.poll;
                if let Ok(mut s) = status.lock() {
                    s.offline_since = None;
                    s.last_error = None;
                }
                cfg.poll
            }
            Err(e) => {
                let unreachable = matches!(&e, SyncError::Origin(o) if o.is_unreachable());
                if let Ok(mut s) = status.lock() {
                    if unreachable && s.offline_since.is_none() {
                        s.offline_since = Some(jiff::Timestamp::now().to_string());
                    }
                    s.last_error = Some(e.to_string());
                }
                if unreachable {
                    tracing::debug!(cause = %e, "origin unreachable; serving the active release");
                } else {
                    tracing::warn!(cause = %e, "sync failed");
                }
                backoff = (backoff * 2).min(cfg.max_backoff);
                // Jitter: 50%..100% of the backoff, so a fleet does not retry in lockstep.
                rng.update(b"j");
                let j = u64::from(rng.finalize().as_bytes()[0]) as f64 / 255.0;
                backoff.mul_f64(0.5 + 0.5 * j)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn poll_once(
    cfg: &SyncConfig,
    store: &Store,
    service: &Service,
    status: &Arc<Mutex<SyncStatus>>,
    etag: &mut Option<String>,
) -> Result<(), SyncError> {
    let key = cfg.origin.layout().current(&cfg.deployment);
    let (body, new_etag) = match cfg.origin.get_if_changed(&key, etag.as_deref()).await? {
        Fetched::NotModified | Fetched::Missing => return Ok(()),
        Fetched::Changed { body, etag } => (body, etag),
    };
    let highest = activation::highest_accepted(store, cfg.deployment.as_str())?;
    let verified = match activation::accept(
        store,
        &cfg.policy,
        cfg.deployment.as_str(),
        &body,
        jiff::Timestamp::now(),
    ) {
        Ok(v) => {
            store.set_meta(META_PENDING, &v.envelope, true)?;
            v
        }
        Err(ActivationError::Verify(VerifyError::Stale { version, .. }))
            if Some(version) == highest =>
        {
            // The newest accepted release: nothing new, unless its download is unfinished.
            *etag = new_etag;
            return Ok(());
        }
        Err(ActivationError::Verify(e @ VerifyError::Stale { .. })) => {
            tracing::warn!(cause = %e, "origin offers an older manifest; refused");
            *etag = new_etag;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    fetch_and_activate(cfg, store, service, status, &verified).await?;
    *etag = new_etag;
    Ok(())
}

async fn fetch_and_activate(
    cfg: &SyncConfig,
    store: &Store,
    service: &Service,
    status: &Arc<Mutex<SyncStatus>>,
    v: &VerifiedManifest,
) -> Result<(), SyncError> {
    let m = &v.manifest;
    let blobs = m.blobs();
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let set = |f: &dyn Fn(&mut Pending)| {
        if let Ok(mut s) = status.lock() {
            let p = s.pending.get_or_insert_with(Pending::default);
            p.version = m.version;
            p.bytes_total = total;
            f(p);
        }
    };
    set(&|_| {});
    store.set_pin("pending", &activation::release_blobs(m))?;
    let sizes: Vec<_> = blobs.iter().map(|b| (b.blob, b.size)).collect();
    {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.reserve(&sizes))
            .await
            .map_err(|e| SyncError::Other(e.to_string()))??;
    }
    for b in &blobs {
        let from_origin = fetch_blob(cfg, store, b).await?;
        service.metrics().sync_bytes(Source::Origin, from_origin);
        set(&|p| {
            p.bytes_from_origin += from_origin;
            p.bytes_have += b.size;
        });
    }
    let (s2, v2, backend) = (store.clone(), v.clone(), cfg.backend);
    let loaded = tokio::task::spawn_blocking(move || {
        let r = activation::load_recognizer(&s2, &v2, backend)?;
        let c = activation::canaries(&s2, &v2.manifest)?;
        Ok::<_, ActivationError>((r, c))
    })
    .await
    .map_err(|e| SyncError::Other(e.to_string()))?;
    let result = match loaded {
        Ok((recognizer, canaries)) => service
            .activate(recognizer, &canaries)
            .map_err(|e| e.to_string()),
        Err(e) => {
            service.refuse(m.version, &v.id.to_string(), &e.to_string());
            Err(e.to_string())
        }
    };
    if let Ok(mut s) = status.lock() {
        s.pending = None;
    }
    store.set_meta(META_PENDING, b"", true)?;
    match result {
        Ok(()) => {
            let (s2, v2) = (store.clone(), v.clone());
            let gc = tokio::task::spawn_blocking(move || activation::record_active(&s2, &v2))
                .await
                .map_err(|e| SyncError::Other(e.to_string()))??;
            tracing::info!(
                version = m.version,
                freed = gc.bytes_freed,
                "release active"
            );
            Ok(())
        }
        Err(why) => {
            tracing::error!(version = m.version, reason = %why, "release refused; the active release keeps serving");
            Ok(())
        }
    }
}

/// Brings one blob into the store; returns the bytes fetched from the origin.
async fn fetch_blob(cfg: &SyncConfig, store: &Store, b: &BlobRef) -> Result<u64, SyncError> {
    if store.has(&b.blob)? {
        return Ok(0);
    }
    let layout = cfg.origin.layout();
    let map = match store.read_chunk_map(&b.chunk_map) {
        Ok(m) => m,
        Err(_) => {
            let bytes = cfg.origin.get(&layout.blob(&b.chunk_map)).await?;
            store.put_raw_expect(&b.chunk_map, &bytes)?;
            ChunkMap::decode(&bytes)
                .map_err(|e| SyncError::Other(format!("chunk map {}: {e}", b.chunk_map)))?
        }
    };
    activation::check_chunk_map(&map, b).map_err(SyncError::Other)?;
    let (s, m) = (store.clone(), map.clone());
    let missing = tokio::task::spawn_blocking(move || -> Result<_, deckhand_store::StoreError> {
        s.begin(&m)?;
        s.fill_local(&m.blob())?;
        s.missing(&m.blob())
    })
    .await
    .map_err(|e| SyncError::Other(e.to_string()))??;
    let key = layout.blob(&b.blob);
    let mut fetched = 0;
    for range in coalesce(&missing, MAX_RANGE) {
        let data = cfg.origin.get_range(&key, range.clone()).await?;
        fetched += data.len() as u64;
        let chunks: Vec<_> = missing
            .iter()
            .filter(|c| c.offset >= range.start && c.offset < range.end)
            .copied()
            .collect();
        let s = store.clone();
        tokio::task::spawn_blocking(move || -> Result<(), deckhand_store::StoreError> {
            for c in chunks {
                let at = (c.offset - range.start) as usize;
                s.put_chunk(&c.id, &data[at..at + c.len as usize])?;
            }
            Ok(())
        })
        .await
        .map_err(|e| SyncError::Other(e.to_string()))??;
    }
    let (s, id) = (store.clone(), b.blob);
    tokio::task::spawn_blocking(move || s.complete(&id))
        .await
        .map_err(|e| SyncError::Other(e.to_string()))??;
    Ok(fetched)
}
