//! Chunk maps: how a blob is cut into content-defined chunks, and the compact encoding that names them.
//!
//! A blob is cut with FastCDC (2020) so that an edit moves only the chunk boundaries near it; every chunk
//! is named by its blake3 hash. The chunk map lists (offset, length, id) for each chunk and is itself a
//! blob, named by the hash of its encoding. The encoding is deterministic: the same blob and parameters
//! always give the same bytes, so the same chunk map id.
//!
//! Encoding (all integers little-endian):
//!
//! ```text
//! "DHCM" | version u8 = 1 | min u32 | avg u32 | max u32 | blob id [32] | blob size u64 | count u32
//! then `count` entries of: chunk length u32 | chunk id [32]
//! ```
//!
//! Offsets are not stored: each is the sum of the lengths before it.

use crate::id::BlobId;

/// The FastCDC size parameters a chunk map was cut with, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// The parameters deckhand publishes with. ARCHITECTURE.md records the measurement behind them.
pub const CHUNK_PARAMS: ChunkParams = ChunkParams {
    min: 16 * 1024,
    avg: 64 * 1024,
    max: 256 * 1024,
};

/// The largest chunk any chunk map may name (FastCDC's own ceiling). Wire frames are sized from it.
pub const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;
/// The most chunks one map may list: 16 Mi chunks, far beyond a 128 MiB blob at any sane size.
pub const MAX_CHUNKS: u32 = 1 << 24;

/// The longest encoding a valid chunk map of a `size`-byte blob can have: every chunk but the last is at
/// least FastCDC's smallest minimum (64 bytes) long, whatever parameters a map names. A reader fetching a
/// chunk map refuses anything longer before reading it.
pub fn max_encoded_len(size: u64) -> u64 {
    let chunks = (size / fastcdc::v2020::MINIMUM_MIN as u64 + 1).min(u64::from(MAX_CHUNKS));
    HEADER_LEN as u64 + ENTRY_LEN as u64 * chunks
}

const MAGIC: &[u8; 4] = b"DHCM";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 12 + 32 + 8 + 4;
const ENTRY_LEN: usize = 4 + 32;

/// Blobs at least this large are hashed whole on a second thread while the chunks are hashed.
const PARALLEL_THRESHOLD: usize = 1 << 20;

/// One chunk of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u32,
    pub id: BlobId,
}

impl Chunk {
    /// The byte range of the chunk within its blob.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }
}

/// A blob's content-defined chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMap {
    params: ChunkParams,
    blob: BlobId,
    size: u64,
    chunks: Vec<Chunk>,
}

/// Why bytes are not a valid chunk map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkMapError {
    #[error("chunk map is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    Truncated(usize),
    #[error("chunk map does not start with the DHCM magic")]
    Magic,
    #[error("chunk map version {0} is not supported (expected {VERSION})")]
    Version(u8),
    #[error("chunk map parameters min {min} / avg {avg} / max {max} are out of range")]
    Params { min: u32, avg: u32, max: u32 },
    #[error("chunk map lists {0} chunks, more than the limit of {MAX_CHUNKS}")]
    TooManyChunks(u32),
    #[error("chunk map claims {count} chunks but carries {bytes} bytes of entries")]
    EntryBytes { count: u32, bytes: usize },
    #[error("chunk {index} has length {len}, outside {min}..={max}")]
    ChunkLen {
        index: usize,
        len: u32,
        min: u32,
        max: u32,
    },
    #[error("chunk lengths add up to {sum}, but the blob size is {size}")]
    SizeMismatch { sum: u64, size: u64 },
}

impl ChunkParams {
    fn check(self) -> Result<Self, ChunkMapError> {
        let ChunkParams { min, avg, max } = self;
        let ok = (fastcdc::v2020::MINIMUM_MIN as u32..=fastcdc::v2020::MINIMUM_MAX as u32)
            .contains(&min)
            && (fastcdc::v2020::AVERAGE_MIN as u32..=fastcdc::v2020::AVERAGE_MAX as u32)
                .contains(&avg)
            && (fastcdc::v2020::MAXIMUM_MIN as u32..=MAX_CHUNK_LEN).contains(&max)
            && min <= avg
            && avg <= max;
        if ok {
            Ok(self)
        } else {
            Err(ChunkMapError::Params { min, avg, max })
        }
    }
}

/// Cuts `data` into content-defined chunks: yields (offset, length) pairs covering `data` exactly.
pub fn cut(params: ChunkParams, data: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    fastcdc::v2020::FastCDC::new(
        data,
        params.min as usize,
        params.avg as usize,
        params.max as usize,
    )
    .map(|c| (c.offset, c.length))
}

impl ChunkMap {
    /// Chunks and hashes `data` with [`CHUNK_PARAMS`].
    pub fn build(data: &[u8]) -> Self {
        Self::build_with(CHUNK_PARAMS, data)
    }

    /// Chunks and hashes `data` with the given parameters. Large blobs are hashed whole on a second
    /// thread while the chunks are cut and hashed on this one.
    ///
    /// # Panics
    /// If `params` are outside FastCDC's ranges; [`CHUNK_PARAMS`] are not.
    pub fn build_with(params: ChunkParams, data: &[u8]) -> Self {
        #[allow(clippy::expect_used)]
        let params = params
            .check()
            .expect("chunk parameters are compile-time constants within range");
        let chunks_of = |data: &[u8]| -> Vec<Chunk> {
            cut(params, data)
                .map(|(offset, len)| Chunk {
                    offset: offset as u64,
                    len: len as u32,
                    id: BlobId::of(&data[offset..offset + len]),
                })
                .collect()
        };
        let (blob, chunks) = if data.len() >= PARALLEL_THRESHOLD {
            std::thread::scope(|s| {
                let whole = s.spawn(|| BlobId::of(data));
                let chunks = chunks_of(data);
                // A panic in blake3 would be a bug in blake3; re-raise it rather than invent a hash.
                let blob = whole
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e));
                (blob, chunks)
            })
        } else {
            (BlobId::of(data), chunks_of(data))
        };
        Self {
            params,
            blob,
            size: data.len() as u64,
            chunks,
        }
    }

    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// The id of the blob this map describes.
    pub fn blob(&self) -> BlobId {
        self.blob
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The deterministic encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * self.chunks.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.params.min.to_le_bytes());
        out.extend_from_slice(&self.params.avg.to_le_bytes());
        out.extend_from_slice(&self.params.max.to_le_bytes());
        out.extend_from_slice(self.blob.as_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(c.id.as_bytes());
        }
        out
    }

    /// The chunk map's own content id: the hash of its encoding.
    pub fn id(&self) -> BlobId {
        BlobId::of(&self.encode())
    }

    /// Decodes and checks an encoded chunk map. Allocation is bounded by the input length.
    pub fn decode(bytes: &[u8]) -> Result<Self, ChunkMapError> {
        if bytes.len() < HEADER_LEN {
            return Err(ChunkMapError::Truncated(bytes.len()));
        }
        let (header, entries) = bytes.split_at(HEADER_LEN);
        let mut r = Reader(header);
        if r.take::<4>() != *MAGIC {
            return Err(ChunkMapError::Magic);
        }
        let version = r.take::<1>()[0];
        if version != VERSION {
            return Err(ChunkMapError::Version(version));
        }
        let params = ChunkParams {
            min: u32::from_le_bytes(r.take()),
            avg: u32::from_le_bytes(r.take()),
            max: u32::from_le_bytes(r.take()),
        }
        .check()?;
        let blob = BlobId::from_bytes(r.take());
        let size = u64::from_le_bytes(r.take());
        let count = u32::from_le_bytes(r.take());
        if count > MAX_CHUNKS {
            return Err(ChunkMapError::TooManyChunks(count));
        }
        if entries.len() != count as usize * ENTRY_LEN {
            return Err(ChunkMapError::EntryBytes {
                count,
                bytes: entries.len(),
            });
        }
        let mut chunks = Vec::with_capacity(count as usize);
        let mut offset = 0u64;
        let last = count as usize;
        for (index, entry) in entries.chunks_exact(ENTRY_LEN).enumerate() {
            let mut r = Reader(entry);
            let len = u32::from_le_bytes(r.take());
            let id = BlobId::from_bytes(r.take());
            // Every chunk but the last is at least `min` long: that is what CDC produces.
            let min = if index + 1 == last { 1 } else { params.min };
            if len < min || len > params.max {
                return Err(ChunkMapError::ChunkLen {
                    index,
                    len,
                    min,
                    max: params.max,
                });
            }
            chunks.push(Chunk { offset, len, id });
            offset += u64::from(len);
        }
        if offset != size {
            return Err(ChunkMapError::SizeMismatch { sum: offset, size });
        }
        Ok(Self {
            params,
            blob,
            size,
            chunks,
        })
    }
}

/// A cursor over a slice whose length the caller has already checked.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let (head, rest) = self.0.split_at(N);
        out.copy_from_slice(head);
        self.0 = rest;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    // Deterministic bytes (splitmix64), so large cases cost no proptest shrinking.
    use crate::testdata::noise;

    fn assert_covers(map: &ChunkMap, data: &[u8]) {
        let mut next = 0u64;
        for c in map.chunks() {
            assert_eq!(c.offset, next, "chunks must be contiguous");
            assert!(c.len > 0);
            let r = c.offset as usize..(c.offset + u64::from(c.len)) as usize;
            assert_eq!(c.id, BlobId::of(&data[r]));
            next += u64::from(c.len);
        }
        assert_eq!(next, data.len() as u64);
        assert_eq!(map.size(), data.len() as u64);
        assert_eq!(map.blob(), BlobId::of(data));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn chunking_is_deterministic_and_covers_exactly(seed: u64, len in 0usize..3_000_000) {
            let data = noise(seed, len);
            let a = ChunkMap::build(&data);
            let b = ChunkMap::build(&data);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.encode(), b.encode());
            assert_covers(&a, &data);
        }

        #[test]
        fn small_parameters_cover_exactly(data in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let params = ChunkParams { min: 64, avg: 256, max: 1024 };
            let map = ChunkMap::build_with(params, &data);
            assert_covers(&map, &data);
            prop_assert_eq!(ChunkMap::decode(&map.encode()).unwrap(), map);
        }

        #[test]
        fn encoding_round_trips(seed: u64, len in 0usize..600_000) {
            let map = ChunkMap::build(&noise(seed, len));
            let bytes = map.encode();
            let back = ChunkMap::decode(&bytes).unwrap();
            prop_assert_eq!(back.id(), map.id());
            prop_assert_eq!(back, map);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = ChunkMap::decode(&bytes);
        }

        /// Valid chunk maps, damaged (bytes flipped, inserted, cut off), so the parser is exercised past
        /// the header and the magic: decoding never panics, and a map that still decodes encodes back
        /// to exactly the bytes it came from.
        #[test]
        fn damaged_valid_maps_never_panic_and_decode_exactly(
            seed: u64,
            len in 1usize..400_000,
            edits in proptest::collection::vec((any::<u32>(), any::<u8>(), 0u8..3), 1..6),
        ) {
            let mut b = ChunkMap::build(&noise(seed, len)).encode();
            crate::testdata::mutate(&mut b, &edits);
            if let Ok(m) = ChunkMap::decode(&b) {
                prop_assert_eq!(m.encode(), b);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn inserting_one_byte_changes_at_most_three_chunks(seed: u64, at in 0usize..(10 << 20), byte: u8) {
            let data = noise(seed, 10 << 20);
            let mut edited = data.clone();
            edited.insert(at, byte);
            let before: HashSet<BlobId> = ChunkMap::build(&data).chunks().iter().map(|c| c.id).collect();
            let after = ChunkMap::build(&edited);
            let changed = after.chunks().iter().filter(|c| !before.contains(&c.id)).count();
            prop_assert!(changed <= 3, "{} chunks changed", changed);
        }
    }

    #[test]
    fn decode_rejects_each_kind_of_damage() {
        let data = noise(7, 300_000);
        let good = ChunkMap::build(&data).encode();

        assert_eq!(
            ChunkMap::decode(&good[..10]),
            Err(ChunkMapError::Truncated(10))
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(ChunkMap::decode(&bad), Err(ChunkMapError::Magic));
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(ChunkMap::decode(&bad), Err(ChunkMapError::Version(9)));
        let mut bad = good.clone();
        bad[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ChunkMap::decode(&bad),
            Err(ChunkMapError::Params { .. })
        ));
        // Claiming a huge count must fail before allocating for it.
        let mut bad = good.clone();
        bad[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            ChunkMap::decode(&bad),
            Err(ChunkMapError::TooManyChunks(u32::MAX))
        );
        let mut bad = good.clone();
        bad.push(0);
        assert!(matches!(
            ChunkMap::decode(&bad),
            Err(ChunkMapError::EntryBytes { .. })
        ));
        let mut bad = good.clone();
        let size_at = HEADER_LEN - 12;
        bad[size_at..size_at + 8].copy_from_slice(&1u64.to_le_bytes());
        assert!(matches!(
            ChunkMap::decode(&bad),
            Err(ChunkMapError::SizeMismatch { .. })
        ));
        let mut bad = good.clone();
        bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            ChunkMap::decode(&bad),
            Err(ChunkMapError::ChunkLen { index: 0, .. })
        ));
    }

    #[test]
    fn a_valid_map_fits_the_read_limit_its_blob_size_gives() {
        for size in [0usize, 1, 100, 70_000, 3 << 20] {
            let data = crate::testdata::noise(5, size);
            let map = ChunkMap::build(&data);
            assert!(
                map.encode().len() as u64 <= max_encoded_len(size as u64),
                "{size}"
            );
        }
        // The smallest chunks any parameters allow (64 bytes) still fit.
        assert_eq!(
            max_encoded_len(640),
            HEADER_LEN as u64 + ENTRY_LEN as u64 * 11
        );
        // A 128 MiB blob's map is read to at most ~72 MiB, never a claimed billion entries.
        assert!(max_encoded_len(128 << 20) < 80 << 20);
    }

    #[test]
    fn empty_blob_has_no_chunks() {
        let map = ChunkMap::build(&[]);
        assert!(map.chunks().is_empty());
        assert_eq!(ChunkMap::decode(&map.encode()).unwrap(), map);
    }
}
