//! Origin ranges read from a blob's pack (`deckhand_protocol::pack`): the same chunks as the blob's
//! raw bytes, each compressed alone, so the uplink carries fewer bytes. The machine still plans in the
//! blob's offsets; a range is translated here to the packed bytes of the same chunks. Each chunk
//! unpacked is hashed by the store against the signed chunk map as any other, so a pack needs no
//! trust: one that is missing (a release published before packs, a bucket restored from a Pi) or wrong
//! is set aside for the download and the blob's raw bytes are read instead.

use super::download::{RangeError, RangeOutcome, store_range};
use crate::origin::{Origin, OriginError};
use deckhand_protocol::pack::{self, PackIndex};
use deckhand_protocol::{BlobId, Chunk, ChunkMap};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One blob's pack, as far as this download knows it.
pub(super) struct Pack {
    map: ChunkMap,
    /// The pack's header, read once: `None` when there is no usable pack.
    index: tokio::sync::OnceCell<Option<Arc<PackIndex>>>,
    /// Set when the pack answered bytes that are not its chunks: the raw blob is read from then on.
    refused: AtomicBool,
}

impl Pack {
    pub(super) fn new(map: &ChunkMap) -> Self {
        Self {
            map: map.clone(),
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
        let key = origin.layout().pack(&self.map.id());
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
            let key = self.map.id();
            tracing::warn!(chunk_map = %key, why, "the blob's pack answered wrong bytes; reading the blob itself");
        }
    }
}

/// Reads `range` of `blob` (whole `chunks`) from the origin into the store: from the blob's pack when
/// it has a usable one, else (or when the pack answers wrong bytes) from the blob.
pub(super) async fn get_range(
    origin: &dyn Origin,
    store: &deckhand_store::Store,
    pack: Option<&Pack>,
    blob: &BlobId,
    range: Range<u64>,
    chunks: Vec<Chunk>,
) -> RangeOutcome {
    let mut received = 0;
    if let Some(p) = pack {
        let index = match p.index(origin).await {
            Ok(index) => index,
            Err(e) => return RangeOutcome::failed(RangeError::Origin(e)),
        };
        if let Some(index) = index
            && let Some((packed, first)) = index.locate(&range)
        {
            let key = origin.layout().pack(&p.map.id());
            match origin.get_range(&key, packed.clone()).await {
                Ok(data) => {
                    received = data.len() as u64;
                    let (st, ch) = (store.clone(), chunks.clone());
                    let unpacked = tokio::task::spawn_blocking(move || {
                        store_packed(&st, &index, first, &data, &ch)
                    })
                    .await;
                    match unpacked {
                        Ok(out) => match out.error {
                            Some(RangeError::Bad(why)) => p.refuse(why),
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
    let batch: Vec<(BlobId, &[u8])> = unpacked.iter().map(|(id, b)| (*id, &b[..])).collect();
    let mut out = super::download::store_batch(store, &batch, data.len() as u64);
    if bad.is_some() && out.error.is_none() {
        out.error = bad.map(RangeError::Bad);
    }
    out
}
