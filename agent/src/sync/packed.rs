//! Origin ranges read from a blob's delta pack (`deckhand_protocol::delta`: its new chunks patched
//! against the blob of the same role in the active release) or its pack (`deckhand_protocol::pack`:
//! its chunks each compressed alone): the same chunks as the blob's raw bytes, in fewer bytes over the
//! uplink. The machine still plans in the blob's offsets; a range is translated here to the packed
//! bytes of the same chunks. Each chunk
//! unpacked is hashed by the store against the signed chunk map as any other, so a pack needs no
//! trust: one that is missing (a release published before packs, a bucket restored from a Pi) or wrong
//! is set aside for the download and the blob's raw bytes are read instead.

use super::download::{RangeError, RangeOutcome, store_range};
use crate::origin::{Origin, OriginError};
use deckhand_protocol::delta::{self, DeltaIndex};
use deckhand_protocol::pack::{self, PackIndex};
use deckhand_protocol::{BlobId, Chunk, ChunkMap};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One blob's pack, as far as this download knows it.
pub(super) struct Pack {
    map: ChunkMap,
    /// The chunk map's id (its encoding hashed), which names the pack: computed once.
    map_id: BlobId,
    /// The pack's header, read once: `None` when there is no usable pack.
    index: tokio::sync::OnceCell<Option<Arc<PackIndex>>>,
    /// Set when the pack answered bytes that are not its chunks: the raw blob is read from then on.
    refused: AtomicBool,
}

impl Pack {
    pub(super) fn new(map: &ChunkMap) -> Self {
        Self {
            map: map.clone(),
            map_id: map.id(),
            index: tokio::sync::OnceCell::new(),
            refused: AtomicBool::new(false),
        }
    }

    /// The pack's index, reading its header the first time; `Ok(None)` when the blob has no usable
    /// pack; `Err` when the origin could not be asked (the range fails as a raw one would).
    async fn index(&self, origin: &dyn Origin) -> Result<Option<Arc<PackIndex>>, OriginError> {
        if self.refused.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let key = origin.layout().pack(&self.map_id);
        let index = self
            .index
            .get_or_try_init(|| async {
                match origin
                    .get_range(&key, 0..pack::header_len(&self.map))
                    .await
                {
                    Ok(header) => match PackIndex::decode(&self.map, &header) {
                        Ok(index) => Ok(Some(Arc::new(index))),
                        Err(e) => {
                            tracing::warn!(key = %key, cause = %e, "the blob's pack is not usable; reading the blob itself");
                            Ok(None)
                        }
                    },
                    Err(OriginError::NotFound { .. } | OriginError::Short { .. }) => {
                        tracing::debug!(key = %key, "no pack; reading the blob itself");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(index.clone())
    }

    fn refuse(&self, why: &str) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(chunk_map = %self.map_id, why, "the blob's pack answered wrong bytes; reading the blob itself");
        }
    }
}

/// One blob's delta pack against the blob of the same role in the active release (its base, complete
/// in the store), as far as this download knows it.
pub(super) struct Delta {
    map: ChunkMap,
    map_id: BlobId,
    base: BlobId,
    base_size: u64,
    index: tokio::sync::OnceCell<Option<Arc<DeltaIndex>>>,
    refused: AtomicBool,
}

impl Delta {
    pub(super) fn new(map: &ChunkMap, base: BlobId, base_size: u64) -> Self {
        Self {
            map: map.clone(),
            map_id: map.id(),
            base,
            base_size,
            index: tokio::sync::OnceCell::new(),
            refused: AtomicBool::new(false),
        }
    }

    fn key(&self, origin: &dyn Origin) -> String {
        origin.layout().delta(&self.map_id, &self.base)
    }

    /// As [`Pack::index`], for the delta pack; `Ok(None)` also when the base is not in the store.
    async fn index(
        &self,
        origin: &dyn Origin,
        store: &deckhand_store::Store,
    ) -> Result<Option<Arc<DeltaIndex>>, OriginError> {
        if self.refused.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let key = self.key(origin);
        let index = self
            .index
            .get_or_try_init(|| async {
                let (st, base) = (store.clone(), self.base);
                let held = tokio::task::spawn_blocking(move || st.has(&base).unwrap_or(false));
                if !held.await.unwrap_or(false) {
                    return Ok(None);
                }
                let header = origin
                    .get_range(&key, 0..delta::header_len(&self.map))
                    .await;
                match header {
                    Ok(header) => {
                        match DeltaIndex::decode(&self.map, self.base, self.base_size, &header) {
                            Ok(index) => Ok(Some(Arc::new(index))),
                            Err(e) => {
                                tracing::warn!(key = %key, cause = %e, "the blob's delta pack is not usable; reading its pack");
                                Ok(None)
                            }
                        }
                    }
                    Err(OriginError::NotFound { .. } | OriginError::Short { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(index.clone())
    }

    fn refuse(&self, why: &str) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(chunk_map = %self.map_id, base = %self.base, why, "the blob's delta pack answered wrong bytes; reading its pack");
        }
    }
}

/// Reads `range` of `blob` (whole `chunks`) from the origin into the store: patched against the active
/// release's blob when there is a usable delta pack covering the range, else from the blob's pack
/// when it has a usable one, else (or when either answers wrong bytes) from the blob.
pub(super) async fn get_range(
    origin: &dyn Origin,
    store: &deckhand_store::Store,
    delta: Option<&Delta>,
    pack: Option<&Pack>,
    blob: &BlobId,
    range: Range<u64>,
    chunks: Vec<Chunk>,
) -> RangeOutcome {
    let mut received = 0;
    if let Some(d) = delta {
        let index = match d.index(origin, store).await {
            Ok(index) => index,
            Err(e) => return RangeOutcome::failed(RangeError::Origin(e)),
        };
        if let Some(index) = index
            && let Some((patched, first)) = index.locate(&range)
        {
            match origin.get_range(&d.key(origin), patched.clone()).await {
                Ok(data) => {
                    received += data.len() as u64;
                    let (st, ch, base, start) =
                        (store.clone(), chunks.clone(), d.base, patched.start);
                    let unpatched = tokio::task::spawn_blocking(move || {
                        store_patched(&st, &index, base, first, start, &data, &ch)
                    })
                    .await;
                    match unpatched {
                        Ok(out) => match out.error {
                            Some(RangeError::Bad(why)) => d.refuse(why),
                            _ => return out,
                        },
                        Err(e) => {
                            return RangeOutcome::failed(RangeError::Store(
                                super::SyncError::Worker(e),
                            ));
                        }
                    }
                }
                Err(OriginError::NotFound { .. } | OriginError::Short { .. }) => {
                    d.refuse("the delta pack is shorter than its header says");
                }
                Err(e) => return RangeOutcome::failed(RangeError::Origin(e)),
            }
        }
    }
    if let Some(p) = pack {
        let index = match p.index(origin).await {
            Ok(index) => index,
            Err(e) => return RangeOutcome::failed(RangeError::Origin(e)),
        };
        if let Some(index) = index
            && let Some((packed, first)) = index.locate(&range)
        {
            let key = origin.layout().pack(&p.map_id);
            match origin.get_range(&key, packed.clone()).await {
                Ok(data) => {
                    let got = data.len() as u64;
                    received += got;
                    let (st, ch) = (store.clone(), chunks.clone());
                    let unpacked = tokio::task::spawn_blocking(move || {
                        store_packed(&st, &index, first, &data, &ch)
                    })
                    .await;
                    match unpacked {
                        Ok(mut out) => match out.error {
                            Some(RangeError::Bad(why)) => p.refuse(why),
                            _ => {
                                out.received += received - got;
                                return out;
                            }
                        },
                        Err(e) => {
                            return RangeOutcome::failed(RangeError::Store(
                                super::SyncError::Worker(e),
                            ));
                        }
                    }
                }
                Err(OriginError::NotFound { .. } | OriginError::Short { .. }) => {
                    p.refuse("the pack is shorter than its header says");
                }
                Err(e) => return RangeOutcome::failed(RangeError::Origin(e)),
            }
        }
    }
    let key = origin.layout().blob(blob);
    let mut out = match origin.get_range(&key, range.clone()).await {
        Err(OriginError::Short { .. }) => {
            RangeOutcome::failed(RangeError::Bad("fewer bytes than the range"))
        }
        Err(e) => RangeOutcome::failed(RangeError::Origin(e)),
        Ok(data) => {
            let (st, start) = (store.clone(), range.start);
            tokio::task::spawn_blocking(move || store_range(&st, start, &data, &chunks))
                .await
                .unwrap_or_else(|e| {
                    RangeOutcome::failed(RangeError::Store(super::SyncError::Worker(e)))
                })
        }
    };
    out.received += received;
    out
}

/// Unpatches the chunks `data` holds (the patches of `chunks`, from byte `start` of the delta pack,
/// the first being chunk `first` of the blob) against windows of the complete blob `base`, and stores
/// them with one sync and one commit.
fn store_patched(
    store: &deckhand_store::Store,
    index: &DeltaIndex,
    base: BlobId,
    first: usize,
    start: u64,
    data: &[u8],
    chunks: &[Chunk],
) -> RangeOutcome {
    use std::os::unix::fs::FileExt as _;
    let io = |op, path: &std::path::Path, source| {
        RangeOutcome::failed(RangeError::Store(
            deckhand_store::StoreError::Io {
                op,
                path: path.to_owned(),
                source,
            }
            .into(),
        ))
    };
    let path = match store.blob_path(&base) {
        Ok(p) => p,
        Err(e) => return RangeOutcome::failed(RangeError::Store(e.into())),
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => return io("open", &path, e),
    };
    let mut unpatched = Vec::with_capacity(chunks.len());
    let mut bad = None;
    let mut window = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let Some((patch, w)) = index.patch(first + i) else {
            bad = Some("fewer bytes than the range");
            break;
        };
        let at = (patch.start - start) as usize;
        let Some(bytes) = data.get(at..at + (patch.end - patch.start) as usize) else {
            bad = Some("fewer bytes than the range");
            break;
        };
        window.resize((w.end - w.start) as usize, 0);
        if let Err(e) = file.read_exact_at(&mut window, w.start) {
            return io("read", &path, e);
        }
        match delta::unpatch(c, bytes, &window) {
            Ok(b) => unpatched.push((c.id, b)),
            Err(_) => {
                bad = Some("patches that do not apply to the blob they were made against");
                break;
            }
        }
    }
    store_decoded(store, &unpatched, data.len() as u64, bad)
}

/// Unpacks the chunks `data` holds (the packed bytes of `chunks`, the first being chunk `first` of
/// the blob) and stores them with one sync and one commit.
fn store_packed(
    store: &deckhand_store::Store,
    index: &PackIndex,
    first: usize,
    data: &[u8],
    chunks: &[Chunk],
) -> RangeOutcome {
    let mut unpacked = Vec::with_capacity(chunks.len());
    let mut at = 0usize;
    let mut bad = None;
    for (i, c) in chunks.iter().enumerate() {
        let n = index.stored_len(first + i).unwrap_or_default() as usize;
        let Some(bytes) = data.get(at..at + n) else {
            bad = Some("fewer bytes than the range");
            break;
        };
        at += n;
        match pack::unpack(c, bytes) {
            Ok(b) => unpacked.push((c.id, b)),
            Err(_) => {
                bad = Some("packed bytes that do not unpack to the chunk map's lengths");
                break;
            }
        }
    }
    store_decoded(store, &unpacked, data.len() as u64, bad)
}

/// Stores the chunks decoded from one origin answer (`received` bytes) with one sync and one commit;
/// `bad` says why decoding stopped before the last (the answer is then refused, after what came
/// before it is kept).
fn store_decoded<B: AsRef<[u8]>>(
    store: &deckhand_store::Store,
    decoded: &[(BlobId, B)],
    received: u64,
    bad: Option<&'static str>,
) -> RangeOutcome {
    let batch: Vec<(BlobId, &[u8])> = decoded.iter().map(|(id, b)| (*id, b.as_ref())).collect();
    let mut out = super::download::store_batch(store, &batch, received);
    if let Some(why) = bad
        && out.error.is_none()
    {
        out.error = Some(RangeError::Bad(why));
    }
    out
}
