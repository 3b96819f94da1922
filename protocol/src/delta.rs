//! Delta packs: the chunks of a blob that a base blob lacks, each patched against the base: compressed
//! by zstd with the base's bytes around the chunk's place as its dictionary. The base is the blob of
//! the same role in the release a Pi serves; what it lacks is what the Pi fetches. A rebuilt usearch
//! graph or a price list with scattered edits changes every chunk a little: a chunk's pack carries the
//! whole chunk, its patch carries the edits (`deckhand bench delta`: 2.98 MiB packed, 1.55 MiB patched).
//!
//! Encoding (all integers little-endian):
//!
//! ```text
//! "DHDP" | version u8 = 1 | chunk map id [32] | base blob id [32] | base size u64 | count u32
//! then count entries of: stored length u32 (0: no patch) | window start u64 | window length u32
//! then the patches, in the chunk map's order
//! ```
//!
//! As with packs, ids are those of the raw chunks: a chunk unpatched is hashed against the signed
//! chunk map, so a delta pack needs no trust of its own, and one that is wrong is set aside.

use crate::chunk::{Chunk, ChunkMap};
use crate::id::BlobId;
use crate::pack::{PROBE_LEVEL, PackError, check_header, chunk_run, pack_chunk};
use std::ops::Range;

/// How far either side of a chunk's place in the base its dictionary reaches.
pub const WINDOW: u64 = 512 * 1024;

const MAGIC: &[u8; 4] = b"DHDP";
const VERSION: u8 = 1;
const FIXED_LEN: usize = 4 + 1 + 32 + 32 + 8 + 4;
const ENTRY_LEN: usize = 4 + 8 + 4;

/// The length of the header of `map`'s delta pack.
pub fn header_len(map: &ChunkMap) -> u64 {
    (FIXED_LEN + ENTRY_LEN * map.chunks().len()) as u64
}

/// The bytes of a `base_size`-byte base that `chunk` of a `size`-byte blob is patched against: its
/// place scaled by the blob's growth, [`WINDOW`] either side.
pub fn window(chunk: &Chunk, size: u64, base_size: u64) -> Range<u64> {
    if size == 0 || base_size == 0 {
        return 0..0;
    }
    let centre = (u128::from(chunk.offset) * u128::from(base_size) / u128::from(size)) as u64;
    let end = (centre + u64::from(chunk.len) + WINDOW).min(base_size);
    centre.saturating_sub(WINDOW).min(end)..end
}

/// `raw` patched against `dict` (zstd with it as dictionary; the high level only where the fast one
/// shrank it by an eighth, as packs do), or `None` when that is no smaller than its pack would store.
pub fn patch(raw: &[u8], dict: &[u8], level: i32) -> Option<Vec<u8>> {
    let with = |level| {
        zstd::bulk::Compressor::with_dictionary(level, dict)
            .and_then(|mut c| c.compress(raw))
            .ok()
    };
    let probe = with(PROBE_LEVEL)?;
    let best = if level > PROBE_LEVEL && probe.len() * 8 <= raw.len() * 7 {
        match with(level) {
            Some(z) if z.len() < probe.len() => z,
            _ => probe,
        }
    } else {
        probe
    };
    (best.len() < pack_chunk(raw, level).len()).then_some(best)
}

/// The chunk's bytes from its patch and the base's window it was patched against. Never inflates past
/// the chunk's length; the caller checks the hash.
pub fn unpatch(chunk: &Chunk, stored: &[u8], dict: &[u8]) -> Result<Vec<u8>, PackError> {
    let len = chunk.len;
    let bad = |why: String| PackError::Unpack { len, why };
    let mut d = zstd::bulk::Decompressor::with_dictionary(dict).map_err(|e| bad(e.to_string()))?;
    let out = d
        .decompress(stored, len as usize)
        .map_err(|e| bad(e.to_string()))?;
    if out.len() != len as usize {
        return Err(bad(format!("it gave {} bytes", out.len())));
    }
    Ok(out)
}

/// The delta pack of `data` (the blob `map` describes) against `base` (`base_id`): a patch for each
/// chunk `wanted` says a Pi holding the base lacks, where the patch is smaller than the chunk's pack;
/// `None` when no chunk has one.
///
/// # Panics
/// If `data` is not `map.size()` bytes long (the caller chunked it).
pub fn build(
    map: &ChunkMap,
    data: &[u8],
    base_id: BlobId,
    base: &[u8],
    wanted: impl Fn(&Chunk) -> bool,
    level: i32,
) -> Option<Vec<u8>> {
    assert_eq!(
        data.len() as u64,
        map.size(),
        "the blob the map was cut from"
    );
    if base.is_empty() {
        return None;
    }
    let mut entries = Vec::with_capacity(map.chunks().len());
    let mut body = Vec::new();
    for c in map.chunks() {
        let w = window(c, map.size(), base.len() as u64);
        let raw = &data[c.range().start as usize..c.range().end as usize];
        let p = wanted(c)
            .then(|| patch(raw, &base[w.start as usize..w.end as usize], level))
            .flatten();
        match p {
            Some(p) => {
                entries.push((p.len() as u32, w));
                body.extend_from_slice(&p);
            }
            None => entries.push((0, 0..0)),
        }
    }
    if body.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(header_len(map) as usize + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(map.id().as_bytes());
    out.extend_from_slice(base_id.as_bytes());
    out.extend_from_slice(&(base.len() as u64).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (stored, w) in &entries {
        out.extend_from_slice(&stored.to_le_bytes());
        out.extend_from_slice(&w.start.to_le_bytes());
        out.extend_from_slice(&((w.end - w.start) as u32).to_le_bytes());
    }
    out.extend_from_slice(&body);
    Some(out)
}

/// Where each patch of a delta pack lies, and the base window each was made against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaIndex {
    raw: Vec<u64>,
    /// Each chunk's patch in the delta pack (empty: none).
    patches: Vec<Range<u64>>,
    windows: Vec<Range<u64>>,
}

impl DeltaIndex {
    /// Reads the header of `map`'s delta pack against `base` (`base_size` bytes) and checks it.
    pub fn decode(
        map: &ChunkMap,
        base: BlobId,
        base_size: u64,
        header: &[u8],
    ) -> Result<Self, PackError> {
        let want = header_len(map) as usize;
        check_header(header, want, MAGIC, VERSION, map)?;
        let id = |at: usize| {
            let mut b = [0u8; 32];
            b.copy_from_slice(&header[at..at + 32]);
            BlobId::from_bytes(b)
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[at..at + 4]);
            u32::from_le_bytes(b)
        };
        if id(37) != base || u64_at(69) != base_size {
            return Err(PackError::Base);
        }
        let count = u32_at(77);
        let chunks = map.chunks();
        if count as usize != chunks.len() {
            return Err(PackError::Count {
                got: count,
                want: chunks.len(),
            });
        }
        let mut at = want as u64;
        let (mut patches, mut windows) = (Vec::new(), Vec::new());
        for (index, c) in chunks.iter().enumerate() {
            let e = FIXED_LEN + ENTRY_LEN * index;
            let (stored, start, wlen) = (u32_at(e), u64_at(e + 4), u32_at(e + 12));
            if stored > c.len {
                return Err(PackError::Stored {
                    index,
                    stored,
                    len: c.len,
                });
            }
            let end = start
                .checked_add(u64::from(wlen))
                .filter(|e| *e <= base_size);
            let Some(end) = end else {
                return Err(PackError::Window { index });
            };
            if u64::from(wlen) > 2 * WINDOW + u64::from(c.len) {
                return Err(PackError::Window { index });
            }
            patches.push(at..at + u64::from(stored));
            windows.push(start..end);
            at += u64::from(stored);
        }
        Ok(Self {
            raw: chunks.iter().map(|c| c.offset).collect(),
            patches,
            windows,
        })
    }

    /// The delta pack's bytes holding patches for every chunk of `range` of the blob, and the index of
    /// its first chunk; `None` when `range` is not on chunk boundaries or a chunk in it has no patch.
    pub fn locate(&self, range: &Range<u64>) -> Option<(Range<u64>, usize)> {
        let (first, end) = chunk_run(&self.raw, range)?;
        if self.patches[first..end].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some((self.patches[first].start..self.patches[end - 1].end, first))
    }

    /// Chunk `index`'s patch (in the delta pack) and the base window it was made against.
    pub fn patch(&self, index: usize) -> Option<(Range<u64>, Range<u64>)> {
        Some((
            self.patches.get(index)?.clone(),
            self.windows.get(index)?.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::noise;

    /// A base of noise, and the blob after 3 KiB inserted at its front and a byte changed every
    /// 100 KiB: every chunk new, each the base around its place but a byte.
    fn edited() -> (Vec<u8>, Vec<u8>) {
        let base = noise(5, 2 << 20);
        let mut new = noise(6, 3 << 10);
        new.extend_from_slice(&base);
        for at in (5_000..new.len()).step_by(100 << 10) {
            new[at] ^= 0xff;
        }
        (base, new)
    }

    #[test]
    fn each_chunk_unpatches_from_its_patch_and_its_window_of_the_base() {
        let (base, new) = edited();
        let map = ChunkMap::build(&new);
        let base_id = BlobId::of(&base);
        let d = build(&map, &new, base_id, &base, |_| true, 3).unwrap();
        assert!(d.len() * 20 < new.len(), "{} bytes of patches", d.len());
        let n = header_len(&map) as usize;
        let index = DeltaIndex::decode(&map, base_id, base.len() as u64, &d[..n]).unwrap();
        let chunks = map.chunks();
        let whole = chunks[0].offset..chunks[chunks.len() - 1].range().end;
        let (patched, first) = index.locate(&whole).unwrap();
        assert_eq!((patched, first), (n as u64..d.len() as u64, 0));
        for (i, c) in chunks.iter().enumerate() {
            let (p, w) = index.patch(i).unwrap();
            let window = &base[w.start as usize..w.end as usize];
            let bytes = unpatch(c, &d[p.start as usize..p.end as usize], window).unwrap();
            assert_eq!(BlobId::of(&bytes), c.id);
            // Against other bytes the patch does not give the chunk.
            let other = noise(9, window.len());
            assert!(
                unpatch(c, &d[p.start as usize..p.end as usize], &other)
                    .map_or(true, |b| BlobId::of(&b) != c.id)
            );
        }
    }

    #[test]
    fn only_runs_of_patched_chunks_are_located_and_none_is_built_without_any() {
        let (base, new) = edited();
        let map = ChunkMap::build(&new);
        let chunks = map.chunks();
        assert!(chunks.len() >= 4);
        let skipped = chunks[1].id;
        let base_id = BlobId::of(&base);
        let d = build(&map, &new, base_id, &base, |c| c.id != skipped, 3).unwrap();
        let n = header_len(&map) as usize;
        let index = DeltaIndex::decode(&map, base_id, base.len() as u64, &d[..n]).unwrap();
        assert!(index.locate(&chunks[0].range()).is_some());
        assert_eq!(index.locate(&(chunks[0].offset..chunks[2].offset)), None);
        assert_eq!(index.locate(&chunks[1].range()), None);
        let (_, first) = index
            .locate(&(chunks[2].offset..chunks[3].range().end))
            .unwrap();
        assert_eq!(first, 2);
        assert_eq!(build(&map, &new, base_id, &base, |_| false, 3), None);
        // Noise against unrelated noise: no patch beats the pack.
        let unrelated = noise(8, 2 << 20);
        assert_eq!(build(&map, &new, base_id, &unrelated, |_| true, 3), None);
    }

    #[test]
    fn a_header_for_another_base_or_with_windows_outside_it_is_refused() {
        let (base, new) = edited();
        let map = ChunkMap::build(&new);
        let base_id = BlobId::of(&base);
        let d = build(&map, &new, base_id, &base, |_| true, 3).unwrap();
        let n = header_len(&map) as usize;
        let size = base.len() as u64;
        let decode = |h: &[u8], b: BlobId, s: u64| DeltaIndex::decode(&map, b, s, h);
        assert_eq!(
            decode(&d[..n], BlobId::of(b"x"), size),
            Err(PackError::Base)
        );
        assert_eq!(decode(&d[..n], base_id, size + 1), Err(PackError::Base));
        assert!(matches!(
            decode(&d[..n - 1], base_id, size),
            Err(PackError::HeaderLen { .. })
        ));
        let mut bad = d[..n].to_vec();
        bad[0] = b'X';
        assert_eq!(decode(&bad, base_id, size), Err(PackError::Magic));
        // The first chunk's window moved past the base's end.
        let mut bad = d[..n].to_vec();
        bad[FIXED_LEN + 4..FIXED_LEN + 12].copy_from_slice(&size.to_le_bytes());
        assert_eq!(
            decode(&bad, base_id, size),
            Err(PackError::Window { index: 0 })
        );
        // A stored length over the chunk's.
        let mut bad = d[..n].to_vec();
        let len0 = map.chunks()[0].len;
        bad[FIXED_LEN..FIXED_LEN + 4].copy_from_slice(&(len0 + 1).to_le_bytes());
        assert!(matches!(
            decode(&bad, base_id, size),
            Err(PackError::Stored { index: 0, .. })
        ));
    }
}
