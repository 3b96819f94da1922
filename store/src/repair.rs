//! Repairing a catalog that was damaged or lost (an SD card's failure mode), from what is on disk.
//!
//! Two things make it possible:
//! * **The blobs name themselves.** Every file under `blobs/` is named by the blake3 of its content, so
//!   a catalog can be rebuilt by hashing each one: a file that hashes to its name is adopted as a
//!   complete blob, one that does not is set aside in `quarantine/`. Chunk maps are blobs too; each one
//!   that decodes and describes an adopted blob gives that blob its chunk rows back (so it is served to
//!   peers again).
//! * **The mirror.** After every commit that changes pins or durable meta (the agent's ledger: its
//!   floors, trust roots and releases), the store writes them to `catalog.mirror`, a small file replaced
//!   atomically (written, synced, renamed, directory synced) and sealed with its own blake3. A rebuilt
//!   catalog takes its meta and pins back from it, so the highest accepted version, the time floor and
//!   the followed root are never lowered by losing the catalog, and the active release stays pinned.
//!
//! A damaged catalog (SQLite says "not a database" or "malformed", or `quick_check` finds damage) is
//! moved into `quarantine/` with its WAL, never deleted; a missing catalog beside blobs is rebuilt the
//! same way instead of the blobs being removed as orphans.

use crate::catalog::sql;
use crate::fsx::{self, io};
use crate::{StoreError, insert_chunks, key, now_unix};
use deckhand_protocol::{BlobId, ChunkMap};
use rusqlite::{Connection, params};
use std::path::{Path, PathBuf};

pub(crate) const MIRROR_FILE: &str = "catalog.mirror";
const MAGIC: &[u8] = b"deckhand-catalog-mirror/1\n";
/// The largest mirror read back (meta and pins are a few KiB; a bigger file is not one of ours).
const MAX_MIRROR: u64 = 64 << 20;
/// The largest blob tried as a chunk map when rebuilding.
const MAX_MAP_FILE: u64 = 16 << 20;

/// What a catalog's meta and pins held, as the mirror keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Mirror {
    pub meta: Vec<(String, Vec<u8>)>,
    pub pins: Vec<(String, Vec<BlobId>)>,
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn take<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = input.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    *input = rest;
    Some(value)
}

impl Mirror {
    /// The catalog's meta and pins, read in one transaction.
    pub(crate) fn read(c: &Connection) -> Result<Self, StoreError> {
        let meta = c
            .prepare("SELECT key, value FROM meta ORDER BY key")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(sql("read meta for the mirror"))?;
        let rows = c
            .prepare("SELECT name, blob FROM pins ORDER BY name, blob")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(sql("read pins for the mirror"))?;
        let mut pins: Vec<(String, Vec<BlobId>)> = Vec::new();
        for (name, blob) in rows {
            let id = crate::blob_id(blob)?;
            match pins.last_mut() {
                Some((n, ids)) if *n == name => ids.push(id),
                _ => pins.push((name, vec![id])),
            }
        }
        Ok(Self { meta, pins })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(self.meta.len() as u32).to_be_bytes());
        for (k, v) in &self.meta {
            put(&mut out, k.as_bytes());
            put(&mut out, v);
        }
        out.extend_from_slice(&(self.pins.len() as u32).to_be_bytes());
        for (name, ids) in &self.pins {
            put(&mut out, name.as_bytes());
            let flat: Vec<u8> = ids.iter().flat_map(|i| *i.as_bytes()).collect();
            put(&mut out, &flat);
        }
        let seal = blake3::hash(&out);
        out.extend_from_slice(seal.as_bytes());
        out
    }

    /// `None` for anything that is not a whole, sealed mirror.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let (body, seal) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if blake3::hash(body).as_bytes() != seal {
            return None;
        }
        let mut input = body.strip_prefix(MAGIC)?;
        let count = |input: &mut &[u8]| -> Option<usize> {
            let (n, rest) = input.split_first_chunk::<4>()?;
            *input = rest;
            Some(u32::from_be_bytes(*n) as usize)
        };
        let mut mirror = Self::default();
        for _ in 0..count(&mut input)? {
            let k = String::from_utf8(take(&mut input)?.to_vec()).ok()?;
            mirror.meta.push((k, take(&mut input)?.to_vec()));
        }
        for _ in 0..count(&mut input)? {
            let name = String::from_utf8(take(&mut input)?.to_vec()).ok()?;
            let flat = take(&mut input)?;
            if flat.len() % 32 != 0 {
                return None;
            }
            let ids = flat
                .chunks_exact(32)
                .map(|c| {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(c);
                    BlobId::from_bytes(a)
                })
                .collect();
            mirror.pins.push((name, ids));
        }
        input.is_empty().then_some(mirror)
    }

    /// Replaces the mirror file atomically and durably.
    pub(crate) fn write(&self, root: &Path, tmp_name: &str) -> Result<(), StoreError> {
        let tmp = root.join("tmp").join(tmp_name);
        fsx::write_synced(&tmp, &self.encode())?;
        fsx::durable_rename(&tmp, &root.join(MIRROR_FILE))
    }

    /// The mirror on disk, if there is a whole one.
    pub(crate) fn load(root: &Path) -> Option<Self> {
        let path = root.join(MIRROR_FILE);
        let len = std::fs::metadata(&path).ok()?.len();
        if len > MAX_MIRROR {
            return None;
        }
        let mirror = Self::decode(&std::fs::read(&path).ok()?);
        if mirror.is_none() {
            tracing::warn!(path = %path.display(), "the catalog mirror is damaged; not used");
        }
        mirror
    }
}

/// What rebuilding the catalog did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Where the damaged catalog was moved (`None` when it was missing).
    pub set_aside: Option<PathBuf>,
    /// Why it was set aside.
    pub why: Option<String>,
    /// Blobs that hashed to their names and were adopted, and their bytes.
    pub blobs_adopted: u64,
    pub bytes_adopted: u64,
    /// Files under `blobs/` that did not hash to their names (moved to `quarantine/`).
    pub blobs_quarantined: u64,
    /// Chunk maps matched to their blobs.
    pub chunk_maps: u64,
    /// Whether the meta and pins came back from the mirror.
    pub from_mirror: bool,
}

/// Whether an error opening the catalog means its file is damaged (as opposed to a schema this build
/// does not know, a lock, or a full disk).
pub(crate) fn is_damage(e: &StoreError) -> bool {
    match e {
        StoreError::Damaged(_) => true,
        StoreError::Sqlite { source, .. } => matches!(
            source.sqlite_error_code(),
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
        ),
        _ => false,
    }
}

/// Moves a damaged catalog and its WAL into `quarantine/` (durably), and returns the new path.
pub(crate) fn set_aside(root: &Path, db: &Path) -> Result<PathBuf, StoreError> {
    let dest = root
        .join("quarantine")
        .join(format!("catalog-{}.sqlite", now_unix()));
    for suffix in ["-wal", "-shm", ""] {
        let from = PathBuf::from(format!("{}{suffix}", db.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", dest.display()));
            std::fs::rename(&from, &to).map_err(io("set aside", &from))?;
        }
    }
    fsx::sync_dir(&root.join("quarantine"))?;
    fsx::sync_dir(root)?;
    Ok(dest)
}

/// Whether `blobs/` holds any file (a store whose catalog is missing must then be rebuilt, not emptied).
pub(crate) fn has_blobs(root: &Path) -> Result<bool, StoreError> {
    let dir = root.join("blobs");
    Ok(std::fs::read_dir(&dir)
        .map_err(io("list", &dir))?
        .next()
        .is_some())
}

/// Rebuilds an empty catalog from the blobs on disk and the mirror, in one durable transaction.
pub(crate) fn rebuild(conn: &mut Connection, root: &Path) -> Result<Rebuilt, StoreError> {
    let mut done = Rebuilt::default();
    let blobs_dir = root.join("blobs");
    let mut adopted: Vec<(BlobId, u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&blobs_dir).map_err(io("list", &blobs_dir))? {
        let path = entry.map_err(io("list", &blobs_dir))?.path();
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| BlobId::from_hex(n).ok());
        let (hash, len) = fsx::hash_file(&path)?;
        match named {
            Some(id) if BlobId::from_hash(hash) == id => {
                done.bytes_adopted += len;
                adopted.push((id, len, path));
            }
            _ => {
                let name = path
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_default();
                let dest = root.join("quarantine").join(name);
                tracing::warn!(file = %path.display(), "a blob file does not hash to its name; quarantined");
                std::fs::rename(&path, &dest).map_err(io("quarantine", &path))?;
                done.blobs_quarantined += 1;
            }
        }
    }
    fsx::sync_dir(&blobs_dir)?;
    fsx::sync_dir(&root.join("quarantine"))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql("set synchronous"))?;
    let tx = conn.transaction().map_err(sql("begin rebuild"))?;
    let sizes: std::collections::HashMap<BlobId, u64> =
        adopted.iter().map(|(id, len, _)| (*id, *len)).collect();
    for (id, len, _) in &adopted {
        tx.execute(
            "INSERT OR REPLACE INTO blobs (id, size, complete, chunk_map, added_at) VALUES (?1, ?2, 1, NULL, ?3)",
            params![key(id), *len as i64, now_unix()],
        )
        .map_err(sql("adopt blob"))?;
    }
    done.blobs_adopted = adopted.len() as u64;
    for (id, len, path) in &adopted {
        if *len > MAX_MAP_FILE {
            continue;
        }
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        let Ok(map) = ChunkMap::decode(&bytes) else {
            continue;
        };
        if sizes.get(&map.blob()) != Some(&map.size()) || map.blob() == *id {
            continue;
        }
        tx.execute(
            "UPDATE blobs SET chunk_map = ?1 WHERE id = ?2",
            params![key(id), key(&map.blob())],
        )
        .map_err(sql("adopt chunk map"))?;
        insert_chunks(&tx, &map, true)?;
        done.chunk_maps += 1;
    }
    if let Some(mirror) = Mirror::load(root) {
        for (k, v) in &mirror.meta {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(sql("restore meta"))?;
        }
        for (name, ids) in &mirror.pins {
            for id in ids {
                tx.execute(
                    "INSERT OR IGNORE INTO pins (name, blob) VALUES (?1, ?2)",
                    params![name, key(id)],
                )
                .map_err(sql("restore pin"))?;
            }
        }
        done.from_mirror = true;
    }
    tx.commit().map_err(sql("commit rebuild"))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql("set synchronous"))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_round_trips_and_any_damage_is_refused() {
        let m = Mirror {
            meta: vec![
                ("highest_accepted/shop-1".into(), b"7".to_vec()),
                ("active_envelope".into(), vec![0, 1, 2, 255]),
            ],
            pins: vec![
                ("active".into(), vec![BlobId::of(b"a"), BlobId::of(b"b")]),
                ("previous".into(), vec![]),
            ],
        };
        let bytes = m.encode();
        assert_eq!(Mirror::decode(&bytes), Some(m));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert_eq!(Mirror::decode(&bad), None, "flipped byte {i}");
        }
        for n in 0..bytes.len() {
            assert_eq!(Mirror::decode(&bytes[..n]), None, "cut at {n}");
        }
    }
}
