//! deckhand's content-addressed blob store: files named by their blake3 hash, catalogued in SQLite.
//!
//! Complete blobs live at `blobs/<hex>`; a blob being fetched lives at `partial/<hex>`, preallocated to its
//! size and filled chunk by chunk at the offsets its chunk map gives. A chunk is verified against its id
//! before it is written, and recorded only after its bytes are synced. A blob becomes complete only after
//! the whole file hashes to its id, is synced, and is renamed into `blobs/`. Pins keep releases; `gc` drops
//! everything else. `store/DESIGN.md` walks through every write and what a crash at each step leaves.
//!
//! The API is synchronous: async callers run it on a blocking thread.

mod catalog;
mod fsx;
mod reader;
mod repair;

pub use reader::StoreReader;
pub use repair::Rebuilt;

use catalog::{Catalog, sql};
use deckhand_protocol::chunk::MAX_CHUNK_LEN;
use deckhand_protocol::{BlobId, Chunk, ChunkMap};
use fsx::io;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Everything that can go wrong in the store. Messages name the file, blob or chunk involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog: {context}: {source}")]
    Sqlite {
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog commit failed: {0}")]
    Commit(String),
    #[error("catalog is unusable: {0}")]
    Corrupt(String),
    #[error("catalog is damaged: {0}")]
    Damaged(String),
    #[error("store at {0} is in use by another process")]
    Locked(PathBuf),
    #[error("blob {0} is not in the store")]
    NotFound(BlobId),
    #[error(
        "blob {0} left the store while it was being read (its owner collected it: a newer release went \
         live); read again"
    )]
    Gone(BlobId),
    #[error("no store at {0} (no catalog.sqlite there)")]
    NoStore(PathBuf),
    #[error("content for {expected} failed verification: {len} bytes hashing to {actual}")]
    ContentMismatch {
        expected: BlobId,
        actual: BlobId,
        len: usize,
    },
    #[error("chunk {id} is {got} bytes but the chunk map of blob {blob} says {expected}")]
    ChunkLength {
        id: BlobId,
        blob: BlobId,
        expected: u32,
        got: usize,
    },
    #[error("blob {blob} still misses {missing} of its chunks")]
    Incomplete { blob: BlobId, missing: u64 },
    #[error(
        "blob {expected}: its verified chunks hash to {actual} as a whole; the chunk map is inconsistent"
    )]
    BlobMismatch { expected: BlobId, actual: BlobId },
    #[error("blob {blob} is {size} bytes, too large to read whole into memory (limit {limit})")]
    TooLarge { blob: BlobId, size: u64, limit: u64 },
    #[error(
        "store budget exceeded: the release needs {needed} more bytes, {used} of the {budget}-byte budget are \
         used; run gc or raise --store-budget"
    )]
    BudgetExceeded { needed: u64, used: u64, budget: u64 },
    #[error("store writer thread has stopped")]
    WriterGone,
}

/// How to open a store.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The most bytes of blobs the store may hold; `None` for no limit.
    pub budget: Option<u64>,
}

/// A blob as imported: its id, size and chunk map.
#[derive(Clone, Debug)]
pub struct Imported {
    pub blob: BlobId,
    pub size: u64,
    pub chunk_map: ChunkMap,
    /// The id of the stored chunk map blob.
    pub chunk_map_id: BlobId,
}

/// One catalogued blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub id: BlobId,
    pub size: u64,
    pub complete: bool,
    pub chunk_map: Option<BlobId>,
    /// Bytes of verified chunks held (the size, for a complete blob).
    pub have_bytes: u64,
}

/// What `gc` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    /// Complete blobs whose content no longer hashes to their id, now quarantined.
    pub corrupt: Vec<(BlobId, String)>,
    /// Recorded chunks of partial blobs that failed verification and will be fetched again.
    pub chunks_reset: u64,
}

/// What [`Store::scrub_blob`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scrubbed {
    /// The file still hashes to its id.
    Sound { bytes: u64 },
    /// It did not (or could not be read): quarantined, and forgotten by the catalog.
    Quarantined { why: String },
    /// Not a complete blob of this store (any more): nothing to check.
    Absent,
    /// `pace` asked to stop before the end.
    Stopped,
}

/// Space the store uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub blobs: u64,
    pub complete_bytes: u64,
    pub partial_bytes: u64,
    pub budget: Option<u64>,
}

/// What recovery at open found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub temp_files_removed: u64,
    pub orphan_files_removed: u64,
    pub lost_blobs_forgotten: u64,
    pub completions_finished: u64,
    pub partials_recreated: u64,
    /// Partial blobs whose files could not be recreated (the disk is full): forgotten, to be fetched
    /// again once there is room.
    pub partials_dropped: u64,
    /// The catalog was damaged or missing beside blobs, and rebuilt from them ([`repair`]).
    pub rebuilt: Option<Rebuilt>,
    /// The disk was full at open: the store's reserve ([`RESERVE_BYTES`]) was released so that SQLite
    /// had room to open the catalog.
    pub reserve_released: bool,
}

/// The size of `reserve`, a file the store keeps to release when it opens on a full disk: SQLite needs a
/// little room to open a WAL catalog (its shared-memory index), and recovery a little to commit.
pub const RESERVE_BYTES: u64 = 1 << 20;
const RESERVE_FILE: &str = "reserve";

/// A handle to an open store. Cheap to clone; every clone shares the one writer.
impl StoreError {
    /// Whether the disk is full (ENOSPC from a file, or SQLite's "database or disk is full"), as opposed
    /// to a budget this store was given ([`StoreError::BudgetExceeded`]).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => {
                source.raw_os_error() == Some(libc::ENOSPC)
                    || source.kind() == std::io::ErrorKind::StorageFull
            }
            StoreError::Sqlite { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            StoreError::Commit(message) => message.contains("disk is full"),
            _ => false,
        }
    }
}

/// What [`Store::put_chunks`] did.
#[derive(Debug)]
pub struct PutChunks {
    /// How many of the given chunks, from the first, were written and recorded.
    pub stored: usize,
    /// How many places in begun blobs they filled.
    pub places: usize,
    /// Why the batch stopped early, if it did.
    pub error: Option<StoreError>,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    catalog: Catalog,
    budget: Option<u64>,
    /// Open partial files, shared by concurrent chunk writers and synced by the writer thread.
    partials: Mutex<HashMap<BlobId, Arc<File>>>,
    tmp_counter: AtomicU64,
    recovery: Recovery,
    /// Held while the mirror of meta and pins is read and written, so the last writer's is the newest.
    mirror: Mutex<()>,
    /// Held for the life of the store: a second process opening the same directory is refused.
    _lock: File,
}

const CATALOG_FILE: &str = "catalog.sqlite";

fn key(id: &BlobId) -> &[u8] {
    id.as_bytes()
}

fn blob_id(bytes: Vec<u8>) -> Result<BlobId, StoreError> {
    let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        StoreError::Corrupt(format!("catalog holds a {}-byte content id", b.len()))
    })?;
    Ok(BlobId::from_bytes(arr))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

struct Row {
    size: u64,
    complete: bool,
    chunk_map: Option<BlobId>,
}

fn blob_row(conn: &Connection, id: &BlobId) -> Result<Option<Row>, StoreError> {
    let row = conn
        .query_row(
            "SELECT size, complete, chunk_map FROM blobs WHERE id = ?1",
            [key(id)],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                ))
            },
        )
        .optional()
        .map_err(sql("read blob"))?;
    row.map(|(size, complete, map)| {
        Ok(Row {
            size: size as u64,
            complete,
            chunk_map: map.map(blob_id).transpose()?,
        })
    })
    .transpose()
}

/// Everything the catalog knows about one blob.
fn blob_info(c: &Connection, id: &BlobId) -> Result<Option<BlobInfo>, StoreError> {
    let Some(row) = blob_row(c, id)? else {
        return Ok(None);
    };
    let have_bytes = if row.complete {
        row.size
    } else {
        c.query_row(
            "SELECT COALESCE(SUM(len), 0) FROM chunks WHERE blob = ?1 AND have = 1",
            [key(id)],
            |r| r.get::<_, i64>(0),
        )
        .map_err(sql("sum chunks"))? as u64
    };
    Ok(Some(BlobInfo {
        id: *id,
        size: row.size,
        complete: row.complete,
        chunk_map: row.chunk_map,
        have_bytes,
    }))
}

/// The blobs pinned under `name`.
fn pinned(c: &Connection, name: &str) -> Result<Vec<BlobId>, StoreError> {
    let mut stmt = c
        .prepare_cached("SELECT blob FROM pins WHERE name = ?1 ORDER BY blob")
        .map_err(sql("read pins"))?;
    let rows = stmt
        .query_map([name], |r| r.get::<_, Vec<u8>>(0))
        .map_err(sql("read pins"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql("read pins"))?;
    rows.into_iter().map(blob_id).collect()
}

fn forget(conn: &Connection, id: &BlobId) -> Result<(), StoreError> {
    conn.execute("DELETE FROM chunks WHERE blob = ?1", [key(id)])
        .map_err(sql("forget chunks"))?;
    conn.execute("DELETE FROM blobs WHERE id = ?1", [key(id)])
        .map_err(sql("forget blob"))?;
    Ok(())
}

fn insert_chunks(conn: &Connection, map: &ChunkMap, have: bool) -> Result<(), StoreError> {
    let blob = map.blob();
    conn.execute("DELETE FROM chunks WHERE blob = ?1", [key(&blob)])
        .map_err(sql("clear chunks"))?;
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO chunks (blob, idx, offset, len, id, have) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(sql("prepare chunk insert"))?;
    for (idx, c) in map.chunks().iter().enumerate() {
        stmt.execute(params![
            key(&blob),
            idx as i64,
            c.offset as i64,
            c.len,
            key(&c.id),
            have
        ])
        .map_err(sql("insert chunk"))?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store at `root`, and repairs what an interrupted process left.
    pub fn open(root: impl AsRef<Path>, options: Options) -> Result<Self, StoreError> {
        let root = root.as_ref().to_owned();
        for dir in ["", "blobs", "partial", "tmp", "quarantine"] {
            let d = root.join(dir);
            fsx::create_dir_durable(&d)?;
        }
        let lock_path = root.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(root)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", &lock_path)(e)),
        }
        let reserve = root.join(RESERVE_FILE);
        let full = fsx::free_bytes(&root).is_ok_and(|free| free < RESERVE_BYTES);
        let reserve_released = full && reserve.exists();
        if reserve_released {
            std::fs::remove_file(&reserve).map_err(io("release the reserve", &reserve))?;
            fsx::sync_dir(&root)?;
            tracing::warn!(root = %root.display(), "the disk is full: the store's reserve was released so it can open");
        }
        let db = root.join(CATALOG_FILE);
        let existed = db.exists();
        let (mut conn, damaged) = match catalog::open_write(&db) {
            Ok(conn) => (conn, None),
            Err(e) if repair::is_damage(&e) => {
                let aside = repair::set_aside(&root, &db)?;
                tracing::error!(
                    catalog = %db.display(),
                    set_aside = %aside.display(),
                    cause = %e,
                    "the store's catalog is damaged; set aside, rebuilding it from the blobs on disk"
                );
                (catalog::open_write(&db)?, Some((aside, e.to_string())))
            }
            Err(e) => return Err(e),
        };
        // The catalog's name, when it was just created (SQLite syncs the directory for its WAL, not for
        // the database file itself).
        fsx::sync_dir(&root)?;
        let rebuilt = if damaged.is_some() || (!existed && repair::has_blobs(&root)?) {
            let mut rebuilt = repair::rebuild(&mut conn, &root)?;
            if let Some((aside, why)) = damaged {
                rebuilt.set_aside = Some(aside);
                rebuilt.why = Some(why);
            }
            tracing::warn!(root = %root.display(), ?rebuilt, "store catalog rebuilt");
            Some(rebuilt)
        } else {
            None
        };
        let mut recovery = recover(&mut conn, &root)?;
        recovery.rebuilt = rebuilt;
        recovery.reserve_released = reserve_released;
        if !reserve.exists()
            && fsx::free_bytes(&root).is_ok_and(|free| free >= 4 * RESERVE_BYTES)
            && let Err(e) =
                recreate_partial(&reserve, RESERVE_BYTES).and_then(|()| fsx::sync_dir(&root))
        {
            tracing::warn!(cause = %e, "cannot set the store's reserve aside");
            let _ = std::fs::remove_file(&reserve);
        }
        if recovery != Recovery::default() {
            tracing::info!(root = %root.display(), ?recovery, "store recovered from an interrupted run");
        }
        let catalog = Catalog::start(db, conn)?;
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                catalog,
                budget: options.budget,
                partials: Mutex::new(HashMap::new()),
                tmp_counter: AtomicU64::new(0),
                recovery,
                mirror: Mutex::new(()),
                _lock: lock,
            }),
        })
    }

    /// Bytes free on the file system that holds the store (for an unprivileged writer).
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        fsx::free_bytes(&self.inner.root)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Closes the store for every handle on it: the catalog's writer finishes the writes already
    /// sent, checkpoints its log into the catalog and stops; later writes fail with
    /// [`StoreError::WriterGone`]. The owner calls it at a clean stop, so that the catalog is one
    /// self-contained file even when some task still holds a handle (dropping the last handle closes
    /// it too).
    pub fn close(&self) {
        self.inner.catalog.shutdown();
    }

    /// What recovery at open repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.inner.recovery
    }

    fn complete_path(&self, id: &BlobId) -> PathBuf {
        self.inner.root.join("blobs").join(id.to_hex())
    }

    fn partial_path(&self, id: &BlobId) -> PathBuf {
        self.inner.root.join("partial").join(id.to_hex())
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.inner
            .root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// True when the blob is complete and verified.
    pub fn has(&self, id: &BlobId) -> Result<bool, StoreError> {
        self.inner
            .catalog
            .read(|c| Ok(blob_row(c, id)?.is_some_and(|r| r.complete)))
    }

    /// Everything the catalog knows about one blob.
    pub fn info(&self, id: &BlobId) -> Result<Option<BlobInfo>, StoreError> {
        self.inner.catalog.read(|c| blob_info(c, id))
    }

    /// Every catalogued blob.
    pub fn list(&self) -> Result<Vec<BlobInfo>, StoreError> {
        let ids: Vec<BlobId> = self.inner.catalog.read(|c| {
            let mut stmt = c
                .prepare("SELECT id FROM blobs ORDER BY id")
                .map_err(sql("list blobs"))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, Vec<u8>>(0))
                .map_err(sql("list blobs"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("list blobs"))?;
            rows.into_iter().map(blob_id).collect()
        })?;
        ids.iter()
            .filter_map(|id| self.info(id).transpose())
            .collect()
    }

    /// The path of a complete blob, for memory-mapping. The file is never modified while catalogued.
    pub fn blob_path(&self, id: &BlobId) -> Result<PathBuf, StoreError> {
        if self.has(id)? {
            Ok(self.complete_path(id))
        } else {
            Err(StoreError::NotFound(*id))
        }
    }

    /// Reads a whole complete blob into memory, verified (for small blobs: chunk maps, labels, images).
    pub fn read_blob(&self, id: &BlobId, limit: u64) -> Result<Vec<u8>, StoreError> {
        let info = self
            .info(id)?
            .filter(|i| i.complete)
            .ok_or(StoreError::NotFound(*id))?;
        if info.size > limit {
            return Err(StoreError::TooLarge {
                blob: *id,
                size: info.size,
                limit,
            });
        }
        let path = self.complete_path(id);
        let data = std::fs::read(&path).map_err(io("read", &path))?;
        let actual = BlobId::of(&data);
        if actual != *id {
            self.quarantine(id, "content no longer matches its id on read")?;
            return Err(StoreError::ContentMismatch {
                expected: *id,
                actual,
                len: data.len(),
            });
        }
        Ok(data)
    }

    /// Reads and decodes the chunk map stored under `id`.
    pub fn read_chunk_map(&self, id: &BlobId) -> Result<ChunkMap, StoreError> {
        let bytes = self.read_blob(id, 64 << 20)?;
        ChunkMap::decode(&bytes).map_err(|e| StoreError::Corrupt(format!("chunk map {id}: {e}")))
    }

    /// Imports a local file: copies it in, chunks and hashes it, and records it complete.
    pub fn import_file(&self, path: &Path) -> Result<Imported, StoreError> {
        let tmp = self.tmp_path("import");
        let result = (|| {
            std::fs::copy(path, &tmp).map_err(io("copy", path))?;
            let file = File::open(&tmp).map_err(io("open", &tmp))?;
            file.sync_all().map_err(io("sync", &tmp))?;
            let map = if file.metadata().map_err(io("stat", &tmp))?.len() == 0 {
                ChunkMap::build(&[])
            } else {
                // SAFETY: the file is private to this store (under tmp/) and nothing writes to it while mapped.
                let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io("map", &tmp))?;
                ChunkMap::build(&mmap)
            };
            self.finish_import(&tmp, map)
        })();
        if tmp.exists() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Imports bytes held in memory, like [`Store::import_file`].
    pub fn import_bytes(&self, data: &[u8]) -> Result<Imported, StoreError> {
        let tmp = self.tmp_path("import");
        let result = fsx::write_synced(&tmp, data)
            .and_then(|()| self.finish_import(&tmp, ChunkMap::build(data)));
        if tmp.exists() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn finish_import(&self, tmp: &Path, map: ChunkMap) -> Result<Imported, StoreError> {
        let blob = map.blob();
        let chunk_map_id = self.put_raw(&map.encode())?;
        let imported = Imported {
            blob,
            size: map.size(),
            chunk_map_id,
            chunk_map: map,
        };
        if self.has(&blob)? {
            return Ok(imported);
        }
        let dest = self.complete_path(&blob);
        fsx::durable_rename(tmp, &dest)?;
        let map = imported.chunk_map.clone();
        self.inner.catalog.write(false, Vec::new(), move |c| {
            c.execute(
                "INSERT OR REPLACE INTO blobs (id, size, complete, chunk_map, added_at) VALUES (?1, ?2, 1, ?3, ?4)",
                params![key(&blob), map.size() as i64, key(&chunk_map_id), now_unix()],
            )
            .map_err(sql("record imported blob"))?;
            insert_chunks(c, &map, true)
        })?;
        // A download of the same blob may have been under way: its partial file is now redundant.
        self.drop_partial_file(&blob);
        Ok(imported)
    }

    /// Stores a small blob whole (a chunk map, a manifest): it has no chunk map of its own.
    pub fn put_raw(&self, data: &[u8]) -> Result<BlobId, StoreError> {
        let id = BlobId::of(data);
        self.put_raw_expect(&id, data)?;
        Ok(id)
    }

    /// Stores a small blob whole after checking it hashes to `expected` (as fetched from a peer or S3).
    pub fn put_raw_expect(&self, expected: &BlobId, data: &[u8]) -> Result<(), StoreError> {
        let actual = BlobId::of(data);
        if actual != *expected {
            return Err(StoreError::ContentMismatch {
                expected: *expected,
                actual,
                len: data.len(),
            });
        }
        if self.has(expected)? {
            return Ok(());
        }
        let tmp = self.tmp_path("raw");
        let result = fsx::write_synced(&tmp, data)
            .and_then(|()| fsx::durable_rename(&tmp, &self.complete_path(expected)));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        let (id, size) = (*expected, data.len() as i64);
        self.inner.catalog.write(false, Vec::new(), move |c| {
            c.execute(
                "INSERT OR IGNORE INTO blobs (id, size, complete, chunk_map, added_at) VALUES (?1, ?2, 1, NULL, ?3)",
                params![key(&id), size, now_unix()],
            )
            .map_err(sql("record raw blob"))?;
            Ok(())
        })
    }

    /// Registers a blob to be filled chunk by chunk: stores its chunk map, creates and preallocates
    /// `partial/<hex>`, and records every chunk as missing. Idempotent: a blob already complete or already
    /// begun is left as it is.
    pub fn begin(&self, map: &ChunkMap) -> Result<(), StoreError> {
        let blob = map.blob();
        let chunk_map_id = self.put_raw(&map.encode())?;
        if self.inner.catalog.read(|c| blob_row(c, &blob))?.is_some() {
            return Ok(());
        }
        let path = self.partial_path(&blob);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("create", &path))?;
        fsx::preallocate(&file, map.size(), &path)?;
        file.sync_all().map_err(io("sync", &path))?;
        fsx::sync_dir(&self.inner.root.join("partial"))?;
        let map = map.clone();
        // Durably (one sync per blob, and the chunk map's row before it): chunks recorded later are
        // never orphaned by a power cut that lost the row they belong to.
        self.inner.catalog.write(true, Vec::new(), move |c| {
            if blob_row(c, &blob)?.is_some() {
                return Ok(());
            }
            c.execute(
                "INSERT INTO blobs (id, size, complete, chunk_map, added_at) VALUES (?1, ?2, 0, ?3, ?4)",
                params![key(&blob), map.size() as i64, key(&chunk_map_id), now_unix()],
            )
            .map_err(sql("record partial blob"))?;
            insert_chunks(c, &map, false)
        })?;
        self.partial_file(&blob)?;
        Ok(())
    }

    fn partial_file(&self, blob: &BlobId) -> Result<Arc<File>, StoreError> {
        let mut open = self
            .inner
            .partials
            .lock()
            .map_err(|_| StoreError::WriterGone)?;
        if let Some(f) = open.get(blob) {
            return Ok(f.clone());
        }
        let path = self.partial_path(blob);
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io("open", &path))?,
        );
        open.insert(*blob, f.clone());
        Ok(f)
    }

    fn drop_partial_file(&self, blob: &BlobId) {
        if let Ok(mut open) = self.inner.partials.lock() {
            open.remove(blob);
        }
        let path = self.partial_path(blob);
        if path.exists() {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// The chunks of a begun blob not yet held, in order.
    pub fn missing(&self, blob: &BlobId) -> Result<Vec<Chunk>, StoreError> {
        self.inner.catalog.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT offset, len, id FROM chunks WHERE blob = ?1 AND have = 0 ORDER BY idx",
                )
                .map_err(sql("list missing chunks"))?;
            let rows = stmt
                .query_map([key(blob)], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .map_err(sql("list missing chunks"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("list missing chunks"))?;
            rows.into_iter()
                .map(|(offset, len, id)| {
                    Ok(Chunk {
                        offset: offset as u64,
                        len,
                        id: blob_id(id)?,
                    })
                })
                .collect()
        })
    }

    /// Which chunks of a blob are held, one bit per chunk in chunk-map order (least significant bit
    /// first), or `None` for a blob the store does not know or that has no chunk map.
    pub fn have_bitmap(&self, blob: &BlobId) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.catalog.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT have FROM chunks WHERE blob = ?1 ORDER BY idx")
                .map_err(sql("read chunk bitmap"))?;
            let haves = stmt
                .query_map([key(blob)], |r| r.get::<_, bool>(0))
                .map_err(sql("read chunk bitmap"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("read chunk bitmap"))?;
            if haves.is_empty() {
                return Ok(None);
            }
            let mut bits = vec![0u8; haves.len().div_ceil(8)];
            for (i, _) in haves.iter().enumerate().filter(|(_, h)| **h) {
                bits[i / 8] |= 1 << (i % 8);
            }
            Ok(Some(bits))
        })
    }

    /// Writes a fetched chunk into every begun blob that misses it, after checking it hashes to `id`.
    /// Returns how many places it filled (0 when nothing needed it). The record is committed, after the
    /// bytes are synced, before this returns.
    pub fn put_chunk(&self, id: &BlobId, data: &[u8]) -> Result<usize, StoreError> {
        let put = self.put_chunks(&[(*id, data)]);
        match put.error {
            Some(e) => Err(e),
            None => Ok(put.places),
        }
    }

    /// [`Store::put_chunk`] for several chunks (an origin range) with one sync and one commit, so a
    /// download writes each catalog page and each page of data once, not once per chunk. Chunks are
    /// checked in order; the first that fails (wrong hash, wrong length, a write error) stops the batch,
    /// and the ones before it are still written and recorded.
    pub fn put_chunks(&self, chunks: &[(BlobId, &[u8])]) -> PutChunks {
        let mut out = PutChunks {
            stored: 0,
            places: 0,
            error: None,
        };
        let mut places: Vec<(BlobId, i64)> = Vec::new();
        let mut files: Vec<Arc<std::fs::File>> = Vec::new();
        for (id, data) in chunks {
            match self.write_chunk(id, data, &mut files) {
                Ok(p) => {
                    for place in p {
                        // A chunk twice in one batch fills its places once.
                        if !places.contains(&place) {
                            places.push(place);
                            out.places += 1;
                        }
                    }
                    out.stored += 1;
                }
                Err(e) => {
                    out.error = Some(e);
                    break;
                }
            }
        }
        if places.is_empty() {
            return out;
        }
        let recorded = self.inner.catalog.write(false, files, move |c| {
            let mut stmt = c
                .prepare_cached("UPDATE chunks SET have = 1 WHERE blob = ?1 AND idx = ?2")
                .map_err(sql("record chunk"))?;
            for (blob, idx) in &places {
                stmt.execute(params![key(blob), idx])
                    .map_err(sql("record chunk"))?;
            }
            Ok(())
        });
        if let Err(e) = recorded {
            // Nothing of this batch is recorded: the bytes are written again when fetched again.
            out.stored = 0;
            out.places = 0;
            out.error = Some(e);
        }
        out
    }

    /// Checks one chunk and writes it into every begun blob that misses it; returns the places written
    /// (to be recorded) and adds their files to `files` (to be synced before the record commits).
    fn write_chunk(
        &self,
        id: &BlobId,
        data: &[u8],
        files: &mut Vec<Arc<std::fs::File>>,
    ) -> Result<Vec<(BlobId, i64)>, StoreError> {
        let actual = BlobId::of(data);
        if actual != *id {
            return Err(StoreError::ContentMismatch {
                expected: *id,
                actual,
                len: data.len(),
            });
        }
        let places: Vec<(BlobId, i64, u64, u32)> = self.inner.catalog.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT c.blob, c.idx, c.offset, c.len FROM chunks c JOIN blobs b ON b.id = c.blob \
                     WHERE c.id = ?1 AND c.have = 0 AND b.complete = 0",
                )
                .map_err(sql("find chunk places"))?;
            let rows = stmt
                .query_map([key(id)], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, u32>(3)?))
                })
                .map_err(sql("find chunk places"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("find chunk places"))?;
            rows.into_iter()
                .map(|(b, idx, off, len)| Ok((blob_id(b)?, idx, off as u64, len)))
                .collect()
        })?;
        for (blob, _, offset, len) in &places {
            if *len as usize != data.len() {
                return Err(StoreError::ChunkLength {
                    id: *id,
                    blob: *blob,
                    expected: *len,
                    got: data.len(),
                });
            }
            let file = self.partial_file(blob)?;
            file.write_all_at(data, *offset)
                .map_err(io("write chunk to", &self.partial_path(blob)))?;
            if !files.iter().any(|f| Arc::ptr_eq(f, &file)) {
                files.push(file);
            }
        }
        Ok(places.into_iter().map(|(b, idx, _, _)| (b, idx)).collect())
    }

    /// Copies into a begun blob every missing chunk the store already holds elsewhere (reused, never
    /// fetched). Returns (chunks, bytes) copied.
    pub fn fill_local(&self, blob: &BlobId) -> Result<(u64, u64), StoreError> {
        let ids: Vec<BlobId> = self.inner.catalog.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT DISTINCT m.id FROM chunks m WHERE m.blob = ?1 AND m.have = 0 \
                     AND EXISTS (SELECT 1 FROM chunks h WHERE h.id = m.id AND h.have = 1)",
                )
                .map_err(sql("find local chunks"))?;
            let rows = stmt
                .query_map([key(blob)], |r| r.get::<_, Vec<u8>>(0))
                .map_err(sql("find local chunks"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("find local chunks"))?;
            rows.into_iter().map(blob_id).collect()
        })?;
        let (mut chunks, mut bytes) = (0, 0);
        for id in ids {
            if let Some(data) = self.read_chunk(&id)? {
                self.put_chunk(&id, &data)?;
                chunks += 1;
                bytes += data.len() as u64;
            }
        }
        Ok((chunks, bytes))
    }

    /// Marks a begun blob complete once every chunk is held: hashes the whole file, syncs it, renames it
    /// into `blobs/`, syncs the directory, then commits. A blob whose chunks do not add up to its id is
    /// discarded with [`StoreError::BlobMismatch`].
    pub fn complete(&self, blob: &BlobId) -> Result<(), StoreError> {
        let (row, missing) = self.inner.catalog.read(|c| {
            let row = blob_row(c, blob)?;
            let missing: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM chunks WHERE blob = ?1 AND have = 0",
                    [key(blob)],
                    |r| r.get(0),
                )
                .map_err(sql("count missing chunks"))?;
            Ok((row, missing as u64))
        })?;
        let row = row.ok_or(StoreError::NotFound(*blob))?;
        if row.complete {
            return Ok(());
        }
        if missing > 0 {
            return Err(StoreError::Incomplete {
                blob: *blob,
                missing,
            });
        }
        let path = self.partial_path(blob);
        let file = self.partial_file(blob)?;
        file.sync_all().map_err(io("sync", &path))?;
        let (hash, len) = fsx::hash_file(&path)?;
        let actual = BlobId::from_hash(hash);
        if actual != *blob || len != row.size {
            let id = *blob;
            self.inner
                .catalog
                .write(false, Vec::new(), move |c| forget(c, &id))?;
            self.drop_partial_file(blob);
            return Err(StoreError::BlobMismatch {
                expected: *blob,
                actual,
            });
        }
        if let Ok(mut open) = self.inner.partials.lock() {
            open.remove(blob);
        }
        fsx::durable_rename(&path, &self.complete_path(blob))?;
        let id = *blob;
        // Durably, and with it every record before it (the blob's row, its chunk map's): a whole blob
        // fetched is never lost to a power cut and fetched again.
        self.inner.catalog.write(true, Vec::new(), move |c| {
            c.execute("UPDATE blobs SET complete = 1 WHERE id = ?1", [key(&id)])
                .map_err(sql("mark blob complete"))?;
            Ok(())
        })
    }

    /// Reads a verified chunk (or a small raw blob) by content id, from complete or partial blobs.
    /// Content that fails verification is never returned: its blob is quarantined (complete) or the chunk
    /// is marked missing again (partial), and the next copy is tried.
    pub fn read_chunk(&self, id: &BlobId) -> Result<Option<Vec<u8>>, StoreError> {
        let places: Vec<(BlobId, u64, u32, bool)> = self.inner.catalog.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT c.blob, c.offset, c.len, b.complete FROM chunks c JOIN blobs b ON b.id = c.blob \
                     WHERE c.id = ?1 AND c.have = 1 LIMIT 8",
                )
                .map_err(sql("find chunk"))?;
            let rows = stmt
                .query_map([key(id)], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, u32>(2)?, r.get::<_, bool>(3)?))
                })
                .map_err(sql("find chunk"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("find chunk"))?;
            rows.into_iter()
                .map(|(b, off, len, complete)| Ok((blob_id(b)?, off as u64, len, complete)))
                .collect()
        })?;
        for (blob, offset, len, complete) in places {
            // A partial blob may complete (and move) between the query and the open: try both homes.
            let candidates = if complete {
                vec![self.complete_path(&blob)]
            } else {
                vec![self.partial_path(&blob), self.complete_path(&blob)]
            };
            let Some((file, path)) = candidates
                .into_iter()
                .find_map(|p| File::open(&p).ok().map(|f| (f, p)))
            else {
                continue;
            };
            let data = fsx::read_at(&file, offset, len, &path)?;
            if BlobId::of(&data) == *id {
                return Ok(Some(data));
            }
            tracing::error!(chunk = %id, blob = %blob, "stored chunk failed verification on read");
            if complete {
                self.quarantine(&blob, "a chunk failed verification on read")?;
            } else {
                let (b, off) = (blob, offset as i64);
                self.inner.catalog.write(false, Vec::new(), move |c| {
                    c.execute(
                        "UPDATE chunks SET have = 0 WHERE blob = ?1 AND offset = ?2",
                        params![key(&b), off],
                    )
                    .map_err(sql("reset chunk"))?;
                    Ok(())
                })?;
            }
        }
        let raw = self.inner.catalog.read(|c| blob_row(c, id))?;
        match raw {
            Some(r)
                if r.complete && r.chunk_map.is_none() && r.size <= u64::from(MAX_CHUNK_LEN) =>
            {
                match self.read_blob(id, u64::from(MAX_CHUNK_LEN)) {
                    Ok(data) => Ok(Some(data)),
                    Err(StoreError::ContentMismatch { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            _ => Ok(None),
        }
    }

    /// Re-hashes one complete blob's file while the store is in use, in 1 MiB reads, calling `pace` with
    /// the bytes of each read (the caller sleeps there to keep to an I/O budget; `false` stops early). A
    /// file that no longer hashes to its id (bit rot), or cannot be read, is quarantined as `verify`
    /// does: a reader holding it open keeps its bytes; the next reader finds the blob missing.
    pub fn scrub_blob(
        &self,
        id: &BlobId,
        pace: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Scrubbed, StoreError> {
        let Some(row) = self.inner.catalog.read(|c| blob_row(c, id))? else {
            return Ok(Scrubbed::Absent);
        };
        if !row.complete {
            return Ok(Scrubbed::Absent);
        }
        let why = match fsx::hash_file_paced(&self.complete_path(id), pace) {
            Ok(None) => return Ok(Scrubbed::Stopped),
            Ok(Some((hash, len))) if BlobId::from_hash(hash) == *id && len == row.size => {
                return Ok(Scrubbed::Sound { bytes: len });
            }
            Ok(Some((hash, len))) => format!("{len} bytes hash to {}", BlobId::from_hash(hash)),
            Err(e) => e.to_string(),
        };
        // Gone between the row and the read (a gc): not rot.
        if self.inner.catalog.read(|c| blob_row(c, id))?.is_none() {
            return Ok(Scrubbed::Absent);
        }
        self.quarantine(id, &format!("scrub: {why}"))?;
        Ok(Scrubbed::Quarantined { why })
    }

    /// Moves a complete blob aside (it is never served again) and forgets it.
    fn quarantine(&self, id: &BlobId, reason: &str) -> Result<(), StoreError> {
        let from = self.complete_path(id);
        let name = format!("{}.{}", id.to_hex(), now_unix());
        let to = self.inner.root.join("quarantine").join(&name);
        if from.exists() {
            fsx::durable_rename(&from, &to)?;
        }
        tracing::error!(blob = %id, reason, file = %to.display(), "blob quarantined");
        let (id, reason) = (*id, reason.to_owned());
        self.inner.catalog.write(true, Vec::new(), move |c| {
            forget(c, &id)?;
            c.execute(
                "INSERT INTO quarantine (id, file, reason, at) VALUES (?1, ?2, ?3, ?4)",
                params![key(&id), name, reason, now_unix()],
            )
            .map_err(sql("record quarantine"))?;
            Ok(())
        })
    }

    /// Replaces the set of blobs pinned under `name` (a release: "active", "previous", "pending").
    /// A pinned blob's chunk map is kept with it. The change is committed durably.
    pub fn set_pin(&self, name: &str, blobs: &[BlobId]) -> Result<(), StoreError> {
        self.set_pins_and_meta(&[(name, blobs)], &[])
    }

    /// Replaces several pins and writes several small values in one durable commit: a release swap
    /// (active, previous, pending, and their envelopes) is recorded all at once or not at all.
    pub fn set_pins_and_meta(
        &self,
        pins: &[(&str, &[BlobId])],
        meta: &[(&str, &[u8])],
    ) -> Result<(), StoreError> {
        let pins: Vec<(String, Vec<BlobId>)> = pins
            .iter()
            .map(|(n, b)| ((*n).to_owned(), b.to_vec()))
            .collect();
        let meta: Vec<(String, Vec<u8>)> = meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect();
        self.inner.catalog.write(true, Vec::new(), move |c| {
            for (name, blobs) in &pins {
                c.execute("DELETE FROM pins WHERE name = ?1", [name])
                    .map_err(sql("clear pin"))?;
                let mut stmt = c
                    .prepare_cached("INSERT OR IGNORE INTO pins (name, blob) VALUES (?1, ?2)")
                    .map_err(sql("pin"))?;
                for b in blobs {
                    stmt.execute(params![name, key(b)]).map_err(sql("pin"))?;
                }
            }
            for (k, v) in &meta {
                c.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                    params![k, v],
                )
                .map_err(sql("write meta"))?;
            }
            Ok(())
        })?;
        self.write_mirror();
        Ok(())
    }

    /// Writes the mirror of meta and pins ([`repair`]) after a commit that changed them. The commit
    /// stands whatever happens here; a mirror that cannot be written (a full disk) is reported and
    /// written again at the next such commit.
    fn write_mirror(&self) {
        let _serial = self.inner.mirror.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let written = self
            .inner
            .catalog
            .read(repair::Mirror::read)
            .and_then(|m| m.write(&self.inner.root, &format!("mirror.{n}")));
        if let Err(e) = written {
            tracing::warn!(
                cause = %e,
                "cannot write the catalog mirror: losing the catalog now would lose what it holds since the last mirror"
            );
        }
    }

    /// The blobs pinned under `name`.
    pub fn pins(&self, name: &str) -> Result<Vec<BlobId>, StoreError> {
        self.inner.catalog.read(|c| pinned(c, name))
    }

    /// Removes every blob no pin keeps, complete or partial. The catalog forgets them first; files are
    /// deleted only after that commit, so a crash leaves orphan files (removed at the next open), never a
    /// record pointing at a deleted file.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let doomed: Vec<(BlobId, u64, bool)> = self.inner.catalog.write(true, Vec::new(), |c| {
            let rows = {
                let mut stmt = c
                    .prepare(
                        "SELECT id, size, complete FROM blobs WHERE id NOT IN (SELECT blob FROM pins) \
                         AND id NOT IN (SELECT b.chunk_map FROM blobs b JOIN pins p ON p.blob = b.id \
                                        WHERE b.chunk_map IS NOT NULL)",
                    )
                    .map_err(sql("find unpinned blobs"))?;
                stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, bool>(2)?)))
                    .map_err(sql("find unpinned blobs"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql("find unpinned blobs"))?
            };
            let mut out = Vec::with_capacity(rows.len());
            for (id, size, complete) in rows {
                let id = blob_id(id)?;
                forget(c, &id)?;
                out.push((id, size as u64, complete));
            }
            Ok(out)
        })?;
        let mut report = GcReport::default();
        for (id, size, complete) in &doomed {
            if *complete {
                let path = self.complete_path(id);
                std::fs::remove_file(&path).map_err(io("remove", &path))?;
            } else {
                self.drop_partial_file(id);
            }
            report.blobs_removed += 1;
            report.bytes_freed += size;
        }
        if !doomed.is_empty() {
            fsx::sync_dir(&self.inner.root.join("blobs"))?;
            fsx::sync_dir(&self.inner.root.join("partial"))?;
        }
        Ok(report)
    }

    /// Refuses, before any byte is written, a set of blobs that would push the store over its budget.
    /// Blobs already catalogued (complete or begun) cost nothing more.
    pub fn reserve(&self, blobs: &[(BlobId, u64)]) -> Result<(), StoreError> {
        let Some(budget) = self.inner.budget else {
            return Ok(());
        };
        let (used, needed) = self.inner.catalog.read(|c| {
            let used: i64 = c
                .query_row("SELECT COALESCE(SUM(size), 0) FROM blobs", [], |r| r.get(0))
                .map_err(sql("sum store size"))?;
            let mut needed = 0u64;
            let mut seen = BTreeSet::new();
            for (id, size) in blobs {
                if seen.insert(*id) && blob_row(c, id)?.is_none() {
                    needed += size;
                }
            }
            Ok((used as u64, needed))
        })?;
        if used + needed > budget {
            return Err(StoreError::BudgetExceeded {
                needed,
                used,
                budget,
            });
        }
        Ok(())
    }

    /// Bytes held, complete and partial.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let (blobs, complete, partial) = self.inner.catalog.read(|c| {
            c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN complete = 1 THEN size END), 0), \
                 COALESCE(SUM(CASE WHEN complete = 0 THEN size END), 0) FROM blobs",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .map_err(sql("sum usage"))
        })?;
        Ok(Usage {
            blobs: blobs as u64,
            complete_bytes: complete as u64,
            partial_bytes: partial as u64,
            budget: self.inner.budget,
        })
    }

    /// Re-hashes everything. Complete blobs that no longer match their id (bit rot on an SD card) are
    /// quarantined and reported; recorded chunks of partial blobs that fail are marked missing again.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let blobs = self.list()?;
        for b in blobs.iter().filter(|b| b.complete) {
            let path = self.complete_path(&b.id);
            let problem = match fsx::hash_file(&path) {
                Ok((hash, len)) if BlobId::from_hash(hash) == b.id && len == b.size => None,
                Ok((hash, len)) => Some(format!("{len} bytes hash to {}", BlobId::from_hash(hash))),
                Err(e) => Some(e.to_string()),
            };
            report.blobs_checked += 1;
            report.bytes_checked += b.size;
            if let Some(problem) = problem {
                self.quarantine(&b.id, &format!("verify: {problem}"))?;
                report.corrupt.push((b.id, problem));
            }
        }
        for b in blobs.iter().filter(|b| !b.complete) {
            let held: Vec<(i64, u64, u32, BlobId)> = self.inner.catalog.read(|c| {
                let mut stmt = c
                    .prepare("SELECT idx, offset, len, id FROM chunks WHERE blob = ?1 AND have = 1")
                    .map_err(sql("list held chunks"))?;
                let rows = stmt
                    .query_map([key(&b.id)], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, u32>(2)?,
                            r.get::<_, Vec<u8>>(3)?,
                        ))
                    })
                    .map_err(sql("list held chunks"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql("list held chunks"))?;
                rows.into_iter()
                    .map(|(i, o, l, id)| Ok((i, o as u64, l, blob_id(id)?)))
                    .collect()
            })?;
            report.blobs_checked += 1;
            let file = self.partial_file(&b.id)?;
            let path = self.partial_path(&b.id);
            let mut bad = Vec::new();
            for (idx, offset, len, id) in held {
                report.bytes_checked += u64::from(len);
                let ok =
                    fsx::read_at(&file, offset, len, &path).is_ok_and(|d| BlobId::of(&d) == id);
                if !ok {
                    bad.push(idx);
                }
            }
            if !bad.is_empty() {
                report.chunks_reset += bad.len() as u64;
                tracing::error!(blob = %b.id, chunks = bad.len(), "recorded chunks failed verification; will fetch again");
                let id = b.id;
                self.inner.catalog.write(false, Vec::new(), move |c| {
                    for idx in &bad {
                        c.execute(
                            "UPDATE chunks SET have = 0 WHERE blob = ?1 AND idx = ?2",
                            params![key(&id), idx],
                        )
                        .map_err(sql("reset chunk"))?;
                    }
                    Ok(())
                })?;
            }
        }
        Ok(report)
    }

    /// Reads a small durable value (the highest accepted manifest version, the active release, ...).
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.catalog.read(|c| catalog::get_meta(c, key))
    }

    /// Writes a small value. With `durable`, the commit is synced (`synchronous=FULL`) before returning.
    pub fn set_meta(&self, key: &str, value: &[u8], durable: bool) -> Result<(), StoreError> {
        let (k, v) = (key.to_owned(), value.to_vec());
        self.inner.catalog.write(durable, Vec::new(), move |c| {
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(sql("write meta"))?;
            Ok(())
        })?;
        if durable {
            self.write_mirror();
        }
        Ok(())
    }
}

/// Repairs what an interrupted process left (see DESIGN.md, "Recovery at open"). Runs before the writer
/// thread starts, on the write connection, in one transaction.
fn recover(conn: &mut Connection, root: &Path) -> Result<Recovery, StoreError> {
    let mut rec = Recovery::default();
    let tmp = root.join("tmp");
    for entry in std::fs::read_dir(&tmp).map_err(io("list", &tmp))? {
        let path = entry.map_err(io("list", &tmp))?.path();
        std::fs::remove_file(&path).map_err(io("remove temporary file", &path))?;
        rec.temp_files_removed += 1;
    }
    let blobs_dir = root.join("blobs");
    let partial_dir = root.join("partial");
    // The repair commits durably: a partial file recreated below holds zeros where its chunk rows said
    // `have = 1`; if the reset of those rows were lost to a second power cut, the next open would find
    // the file the right size and trust the rows.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql("set synchronous"))?;
    let tx = conn.transaction().map_err(sql("begin recovery"))?;
    let rows: Vec<(BlobId, u64, bool)> = {
        let mut stmt = tx
            .prepare("SELECT id, size, complete FROM blobs")
            .map_err(sql("list blobs for recovery"))?;
        let raw = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .map_err(sql("list blobs for recovery"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("list blobs for recovery"))?;
        raw.into_iter()
            .map(|(id, size, complete)| Ok((blob_id(id)?, size as u64, complete)))
            .collect::<Result<_, StoreError>>()?
    };
    let mut known_complete = BTreeSet::new();
    let mut known_partial = BTreeSet::new();
    for (id, size, complete) in rows {
        let done = blobs_dir.join(id.to_hex());
        let part = partial_dir.join(id.to_hex());
        let done_len = std::fs::metadata(&done).ok().map(|m| m.len());
        if complete {
            if done_len == Some(size) {
                known_complete.insert(id);
            } else {
                tracing::warn!(blob = %id, "complete blob's file is missing or truncated; forgetting it");
                forget(&tx, &id)?;
                rec.lost_blobs_forgotten += 1;
            }
            continue;
        }
        // Partial. A crash between the rename into blobs/ and the commit leaves the file already there.
        if done_len.is_some() {
            let (hash, len) = fsx::hash_file(&done)?;
            if BlobId::from_hash(hash) == id && len == size {
                tx.execute("UPDATE blobs SET complete = 1 WHERE id = ?1", [key(&id)])
                    .map_err(sql("finish completion"))?;
                tx.execute("UPDATE chunks SET have = 1 WHERE blob = ?1", [key(&id)])
                    .map_err(sql("finish completion"))?;
                known_complete.insert(id);
                rec.completions_finished += 1;
                continue;
            }
            std::fs::remove_file(&done).map_err(io("remove", &done))?;
        }
        let part_len = std::fs::metadata(&part).ok().map(|m| m.len());
        if part_len != Some(size) {
            // The file is gone or the wrong size: nothing recorded in it can be trusted.
            match recreate_partial(&part, size) {
                Ok(()) => {
                    tx.execute("UPDATE chunks SET have = 0 WHERE blob = ?1", [key(&id)])
                        .map_err(sql("reset chunks"))?;
                    rec.partials_recreated += 1;
                }
                Err(e) if e.is_disk_full() => {
                    // A full disk at boot: the store opens without the partial (the active release
                    // serves); the download starts it again when there is room.
                    tracing::warn!(blob = %id, cause = %e, "no room to recreate a partial blob; forgotten");
                    let _ = std::fs::remove_file(&part);
                    forget(&tx, &id)?;
                    rec.partials_dropped += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        known_partial.insert(id);
    }
    for (dir, known) in [
        (&blobs_dir, &known_complete),
        (&partial_dir, &known_partial),
    ] {
        for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
            let path = entry.map_err(io("list", dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let keep = BlobId::from_hex(name).is_ok_and(|id| known.contains(&id));
            if !keep {
                std::fs::remove_file(&path).map_err(io("remove orphan", &path))?;
                rec.orphan_files_removed += 1;
            }
        }
        fsx::sync_dir(dir)?;
    }
    tx.commit().map_err(sql("commit recovery"))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql("set synchronous"))?;
    Ok(rec)
}

/// A file (a partial blob, the reserve), empty and preallocated to `size`, synced.
fn recreate_partial(part: &Path, size: u64) -> Result<(), StoreError> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(part)
        .map_err(io("recreate", part))?;
    fsx::preallocate(&f, size, part)?;
    f.sync_all().map_err(io("sync", part))
}

#[cfg(test)]
mod tests;
