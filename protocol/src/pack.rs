//! Packs: a blob's chunks compressed, each on its own, for the trip over the shop's uplink.
//!
//! Publishing writes, beside each blob (`_blob/<hex>`, as it is), its pack (`_pack/<chunk map hex>`): the
//! blob's chunks in order, each compressed alone with zstd, behind a header that gives every chunk's
//! stored length. An agent reads the header once per blob (its length follows from the chunk map) and
//! then asks for the packed bytes of a run of chunks in one Range GET, as it would ask the blob for
//! their raw bytes. Ids stay those of the uncompressed bytes: each chunk unpacked is hashed against the
//! signed chunk map like any other, so a pack needs no trust of its own. A pack that is missing (a
//! release published before packs, a bucket restored from a Pi) or found wrong is simply not used: the
//! blob's raw bytes are always there.
//!
//! Encoding (all integers little-endian):
//!
//! ```text
//! "DHPK" | version u8 = 1 | chunk map id [32] | count u32 | count stored lengths u32
//! then each chunk's stored bytes, in the chunk map's order
//! ```
//!
//! A stored length equal to the chunk's length means the chunk is stored as it is (zstd did not make it
//! smaller); a shorter one is one zstd frame that decompresses to exactly the chunk.

use crate::chunk::{Chunk, ChunkMap};
use crate::id::BlobId;
use std::borrow::Cow;
use std::ops::Range;

/// The zstd level packs are written at. Publishing compresses once, so it can afford more than casync's
/// default (3); `deckhand bench delta` measured what each level fetches.
pub const PACK_LEVEL: i32 = 19;

/// The fast level every chunk is tried at first ([`pack_chunk`]).
pub const PROBE_LEVEL: i32 = 3;

const MAGIC: &[u8; 4] = b"DHPK";
const VERSION: u8 = 1;
const FIXED_LEN: usize = 4 + 1 + 32 + 4;

/// Why bytes are not the pack of a chunk map, or a packed chunk does not unpack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("pack header is {got} bytes, not the {want} its chunk map implies")]
    HeaderLen { got: usize, want: usize },
    #[error("pack does not start with the DHPK magic")]
    Magic,
    #[error("pack version {0} is not supported (expected {VERSION})")]
    Version(u8),
    #[error("pack is of chunk map {got}, not {want}")]
    Map { got: BlobId, want: BlobId },
    #[error("pack lists {got} chunks, its chunk map {want}")]
    Count { got: u32, want: usize },
    #[error("pack stores chunk {index} in {stored} bytes, outside 1..={len} (its length)")]
    Stored { index: usize, stored: u32, len: u32 },
    #[error("delta pack is against another base blob, or a base of another size")]
    Base,
    #[error(
        "delta pack's window for chunk {index} is outside its base or wider than a patch reads"
    )]
    Window { index: usize },
    #[error("packed chunk does not unpack to its {len} bytes: {why}")]
    Unpack { len: u32, why: String },
}

/// The length of the header of the pack of `map`: what to read first.
pub fn header_len(map: &ChunkMap) -> u64 {
    (FIXED_LEN + 4 * map.chunks().len()) as u64
}

/// Packs `data`, the blob `map` describes, at `level`: the pack's whole encoding.
///
/// # Panics
/// If `data` is not `map.size()` bytes long (the caller chunked it).
pub fn build(map: &ChunkMap, data: &[u8], level: i32) -> Vec<u8> {
    let stored = stored(map, data, level);
    let mut out = header(map, &stored);
    for s in &stored {
        out.extend_from_slice(s);
    }
    out
}

/// Each chunk of `data` (the blob `map` describes) in its stored form ([`pack_chunk`]): what follows
/// the [`header`] in the pack, in this order.
///
/// # Panics
/// If `data` is not `map.size()` bytes long (the caller chunked it).
pub fn stored<'a>(map: &ChunkMap, data: &'a [u8], level: i32) -> Vec<Cow<'a, [u8]>> {
    assert_eq!(
        data.len() as u64,
        map.size(),
        "the blob the map was cut from"
    );
    map.chunks()
        .iter()
        .map(|c| {
            pack_chunk(
                &data[c.range().start as usize..c.range().end as usize],
                level,
            )
        })
        .collect()
}

/// The pack's header for `map` and its chunks' `stored` forms.
pub fn header(map: &ChunkMap, stored: &[Cow<'_, [u8]>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(map) as usize);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(map.id().as_bytes());
    out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    for s in stored {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    }
    out
}

/// One chunk's stored form in a pack: as it is, or compressed, whichever is smaller. A chunk is first
/// compressed at zstd's fast level [`PROBE_LEVEL`]; only one that shrinks by at least an eighth there
/// (text, a graph of row numbers) is compressed again at `level`. Float vectors and weights gain a few
/// percent at any level, and the high levels spend seconds a megabyte on them.
pub fn pack_chunk(raw: &[u8], level: i32) -> Cow<'_, [u8]> {
    let Ok(probe) = zstd::bulk::compress(raw, PROBE_LEVEL) else {
        return Cow::Borrowed(raw);
    };
    let best = if level > PROBE_LEVEL && probe.len() * 8 <= raw.len() * 7 {
        match zstd::bulk::compress(raw, level) {
            Ok(z) if z.len() < probe.len() => z,
            _ => probe,
        }
    } else {
        probe
    };
    if best.len() < raw.len() {
        Cow::Owned(best)
    } else {
        Cow::Borrowed(raw)
    }
}

/// Where each chunk of a blob lies in its pack, read from the pack's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackIndex {
    /// Each chunk's offset in the blob (the chunk map's), ascending.
    raw: Vec<u64>,
    /// Each chunk's offset in the pack, and one past the last chunk's end.
    packed: Vec<u64>,
}

impl PackIndex {
    /// Reads the header of `map`'s pack (exactly [`header_len`] bytes) and checks it against the map.
    pub fn decode(map: &ChunkMap, header: &[u8]) -> Result<Self, PackError> {
        let want = header_len(map) as usize;
        check_header(header, want, MAGIC, VERSION, map)?;
        let count = u32::from_le_bytes([header[37], header[38], header[39], header[40]]);
        let chunks = map.chunks();
        if count as usize != chunks.len() {
            return Err(PackError::Count {
                got: count,
                want: chunks.len(),
            });
        }
        let mut packed = Vec::with_capacity(chunks.len() + 1);
        let mut at = want as u64;
        for (index, (c, le)) in chunks
            .iter()
            .zip(header[FIXED_LEN..].chunks_exact(4))
            .enumerate()
        {
            let stored = u32::from_le_bytes([le[0], le[1], le[2], le[3]]);
            if stored == 0 || stored > c.len {
                return Err(PackError::Stored {
                    index,
                    stored,
                    len: c.len,
                });
            }
            packed.push(at);
            at += u64::from(stored);
        }
        packed.push(at);
        Ok(Self {
            raw: chunks.iter().map(|c| c.offset).collect(),
            packed,
        })
    }

    /// The pack's bytes holding the chunks that make up `range` of the blob, and the index of its first
    /// chunk; `None` when `range` does not start and end on chunk boundaries.
    pub fn locate(&self, range: &Range<u64>) -> Option<(Range<u64>, usize)> {
        let (first, end) = chunk_run(&self.raw, range)?;
        Some((self.packed[first]..self.packed[end], first))
    }

    /// The stored length of chunk `index`.
    pub fn stored_len(&self, index: usize) -> Option<u64> {
        Some(self.packed.get(index + 1)? - self.packed.get(index)?)
    }

    /// The whole pack's length.
    pub fn len(&self) -> u64 {
        self.packed.last().copied().unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

/// Checks what a pack's and a delta pack's headers open with: their length (`want`), magic, version,
/// and the chunk map id at bytes 5..37.
pub(crate) fn check_header(
    header: &[u8],
    want: usize,
    magic: &[u8; 4],
    version: u8,
    map: &ChunkMap,
) -> Result<(), PackError> {
    if header.len() != want {
        return Err(PackError::HeaderLen {
            got: header.len(),
            want,
        });
    }
    if header[..4] != *magic {
        return Err(PackError::Magic);
    }
    if header[4] != version {
        return Err(PackError::Version(header[4]));
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&header[5..37]);
    let (got, want_map) = (BlobId::from_bytes(id), map.id());
    if got != want_map {
        return Err(PackError::Map {
            got,
            want: want_map,
        });
    }
    Ok(())
}

/// The chunks (first, one past the last) that make up `range` of a blob whose chunks start at `raw`;
/// `None` when `range` is empty or not on chunk boundaries.
pub(crate) fn chunk_run(raw: &[u64], range: &Range<u64>) -> Option<(usize, usize)> {
    let first = raw.binary_search(&range.start).ok()?;
    let end = match raw.binary_search(&range.end) {
        Ok(i) => i,
        // The blob's end: one past the last chunk.
        Err(i) if i == raw.len() => i,
        Err(_) => return None,
    };
    (end > first).then_some((first, end))
}

/// The bytes of `chunk` from its stored form: as they are when stored at full length, else
/// decompressed, never to more than the chunk's length. The caller still checks the hash.
pub fn unpack<'a>(chunk: &Chunk, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, PackError> {
    let len = chunk.len;
    if stored.len() == len as usize {
        return Ok(Cow::Borrowed(stored));
    }
    let out = zstd::bulk::decompress(stored, len as usize).map_err(|e| PackError::Unpack {
        len,
        why: e.to_string(),
    })?;
    if out.len() != len as usize {
        return Err(PackError::Unpack {
            len,
            why: format!("it gave {} bytes", out.len()),
        });
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{CHUNK_PARAMS, ChunkMap};

    /// A blob with compressible stretches (text) and incompressible ones (noise), several chunks long.
    fn blob() -> Vec<u8> {
        let mut rng = crate::testdata::SplitMix(7);
        let mut data = Vec::new();
        for i in 0..8 {
            if i % 2 == 0 {
                while data.len() < (i + 1) * 100_000 {
                    data.extend_from_slice(format!("card {} price {}\n", data.len(), i).as_bytes());
                }
            } else {
                data.extend((0..100_000).map(|_| rng.next_u64() as u8));
            }
        }
        data
    }

    #[test]
    fn every_run_of_chunks_unpacks_from_its_packed_range_to_the_chunk_maps_bytes() {
        let data = blob();
        let map = ChunkMap::build_with(CHUNK_PARAMS, &data);
        let pack = build(&map, &data, 3);
        let index = PackIndex::decode(&map, &pack[..header_len(&map) as usize]).unwrap();
        assert_eq!(index.len(), pack.len() as u64);
        assert!(pack.len() < data.len() * 3 / 4, "text compresses");
        let chunks = map.chunks();
        let (mut raw_kept, mut packed_kept) = (0, 0);
        for first in 0..chunks.len() {
            for end in first + 1..=chunks.len() {
                let range = chunks[first].offset..chunks[end - 1].range().end;
                let (packed, at) = index.locate(&range).unwrap();
                assert_eq!(at, first);
                let mut pos = packed.start as usize;
                for (i, c) in chunks[first..end].iter().enumerate() {
                    let n = index.stored_len(first + i).unwrap() as usize;
                    let bytes = unpack(c, &pack[pos..pos + n]).unwrap();
                    assert_eq!(BlobId::of(&bytes), c.id);
                    if end == first + 1 && n == c.len as usize {
                        raw_kept += 1;
                    } else if end == first + 1 {
                        packed_kept += 1;
                    }
                    pos += n;
                }
                assert_eq!(pos as u64, packed.end);
            }
        }
        assert!(raw_kept > 0 && packed_kept > 0, "{raw_kept} {packed_kept}");
        // Not on chunk boundaries.
        assert_eq!(index.locate(&(1..chunks[0].len as u64)), None);
        assert_eq!(index.locate(&(0..chunks[0].len as u64 + 1)), None);
        assert_eq!(index.locate(&(5..5)), None);
    }

    #[test]
    fn a_header_that_is_not_the_maps_pack_is_refused_by_what_is_wrong() {
        let data = blob();
        let map = ChunkMap::build(&data);
        let other = ChunkMap::build(&data[1..]);
        let pack = build(&map, &data, 3);
        let n = header_len(&map) as usize;
        let header = &pack[..n];
        let refused = |h: &[u8], m: &ChunkMap| PackIndex::decode(m, h).unwrap_err();
        assert!(matches!(
            refused(&header[..n - 1], &map),
            PackError::HeaderLen { .. }
        ));
        assert!(matches!(
            refused(header, &other),
            PackError::HeaderLen { .. } | PackError::Map { .. }
        ));
        let mut bad = header.to_vec();
        bad[0] = b'X';
        assert_eq!(refused(&bad, &map), PackError::Magic);
        let mut bad = header.to_vec();
        bad[4] = 2;
        assert_eq!(refused(&bad, &map), PackError::Version(2));
        let mut bad = header.to_vec();
        bad[10] ^= 1;
        assert!(matches!(refused(&bad, &map), PackError::Map { .. }));
        let mut bad = header.to_vec();
        bad[37] ^= 1;
        assert!(matches!(refused(&bad, &map), PackError::Count { .. }));
        // A stored length longer than the chunk, or empty.
        let len0 = map.chunks()[0].len;
        for stored in [0, len0 + 1] {
            let mut bad = header.to_vec();
            bad[FIXED_LEN..FIXED_LEN + 4].copy_from_slice(&stored.to_le_bytes());
            assert_eq!(
                refused(&bad, &map),
                PackError::Stored {
                    index: 0,
                    stored,
                    len: len0
                }
            );
        }
    }

    #[test]
    fn a_packed_chunk_never_unpacks_to_more_or_other_than_its_length() {
        let data = vec![b'a'; 100_000];
        let map = ChunkMap::build(&data);
        let c = map.chunks()[0];
        let z = zstd::bulk::compress(&data[..c.len as usize], 3).unwrap();
        assert_eq!(unpack(&c, &z).unwrap().len(), c.len as usize);
        // A frame of a longer chunk (a decompression bomb) is cut off at the chunk's length.
        let bomb = zstd::bulk::compress(&vec![b'a'; c.len as usize * 4], 3).unwrap();
        assert!(matches!(unpack(&c, &bomb), Err(PackError::Unpack { .. })));
        // A shorter one, and garbage.
        let short = zstd::bulk::compress(&data[..c.len as usize - 1], 3).unwrap();
        assert!(matches!(unpack(&c, &short), Err(PackError::Unpack { .. })));
        assert!(matches!(
            unpack(&c, b"garbage"),
            Err(PackError::Unpack { .. })
        ));
    }
}
