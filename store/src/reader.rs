//! A read-only way into a store that another process may own (`deckhand-agent store export` while the
//! agent runs). See "Reading a store another process owns" in `store/DESIGN.md`.
//!
//! A [`StoreReader`] takes no lock, starts no writer, runs no recovery and writes nothing: not a catalog
//! row, not a file, not a SQLite setting. It reads the catalog through a read-only connection (WAL lets it
//! read while the owner commits; like every WAL reader it records its read marks in SQLite's shared-memory
//! index, `catalog.sqlite-shm`) and reads complete blobs, which are never modified once in `blobs/`. The
//! one thing the owner may do underneath it is remove a blob (gc after a newer release went live, or
//! quarantine): a blob that is gone when it is opened is [`StoreError::Gone`], and one opened before it was
//! removed is read whole, since an open file outlives its name. Every byte read is hashed against the
//! blob's id on the way out.

use crate::catalog::{self, sql};
use crate::fsx::io;
use crate::{BlobInfo, CATALOG_FILE, StoreError, blob_info, pinned};
use deckhand_protocol::BlobId;
use rusqlite::Connection;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Bytes read from a blob file per step while copying it out.
const COPY_BUF: usize = 1 << 20;

/// A read-only view of a store; see the module documentation.
pub struct StoreReader {
    root: PathBuf,
    conn: Mutex<Connection>,
}

impl StoreReader {
    /// Opens the store at `root` for reading. Fails if there is no catalog there.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_owned();
        let db = root.join(CATALOG_FILE);
        if !db.is_file() {
            return Err(StoreError::NoStore(root));
        }
        let conn = catalog::open_read_only(&db)?;
        Ok(Self {
            root,
            conn: Mutex::new(conn),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StoreError::Corrupt("a reader of the catalog panicked".into()))?;
        // One read transaction: what `f` reads is one committed state of the catalog.
        let tx = conn.transaction().map_err(sql("begin read"))?;
        let out = f(&tx)?;
        tx.finish().map_err(sql("end read"))?;
        Ok(out)
    }

    /// Several small durable values, read from one committed state of the catalog.
    pub fn get_meta_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.read(|c| keys.iter().map(|k| catalog::get_meta(c, k)).collect())
    }

    /// The blobs pinned under `name`.
    pub fn pins(&self, name: &str) -> Result<Vec<BlobId>, StoreError> {
        self.read(|c| pinned(c, name))
    }

    /// Everything the catalog knows about one blob.
    pub fn info(&self, id: &BlobId) -> Result<Option<BlobInfo>, StoreError> {
        self.read(|c| blob_info(c, id))
    }

    /// Copies a complete blob into `out`, hashing every byte: returns its size once the bytes hashed to
    /// `id`. On any error the caller must discard what was written (a blob that no longer matches is
    /// [`StoreError::ContentMismatch`]; the owner's `store verify` quarantines it).
    pub fn copy_blob(&self, id: &BlobId, out: &mut dyn Write) -> Result<u64, StoreError> {
        let info = self
            .info(id)?
            .filter(|i| i.complete)
            .ok_or(StoreError::NotFound(*id))?;
        let path = self.root.join("blobs").join(id.to_hex());
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Gone(*id));
            }
            Err(e) => return Err(io("open", &path)(e)),
        };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; COPY_BUF];
        let mut len = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io("read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io("write a copy of", &path))?;
            len += n as u64;
        }
        let actual = BlobId::from_hash(hasher.finalize());
        if actual != *id || len != info.size {
            return Err(StoreError::ContentMismatch {
                expected: *id,
                actual,
                len: usize::try_from(len).unwrap_or(usize::MAX),
            });
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Options, Store};

    #[test]
    fn a_reader_sees_what_the_owner_committed_while_the_owner_keeps_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let a = store.import_bytes(&vec![7u8; 300_000]).unwrap();
        store
            .set_pins_and_meta(&[("active", &[a.blob])], &[("k", b"v1")])
            .unwrap();
        let reader = StoreReader::open(dir.path()).unwrap();
        assert_eq!(reader.pins("active").unwrap(), vec![a.blob]);
        assert_eq!(
            reader.get_meta_many(&["k", "absent"]).unwrap(),
            vec![Some(b"v1".to_vec()), None]
        );
        let mut out = Vec::new();
        assert_eq!(reader.copy_blob(&a.blob, &mut out).unwrap(), 300_000);
        assert_eq!(out, vec![7u8; 300_000]);
        // The owner goes on writing; the reader sees the new state at its next read.
        store.set_meta("k", b"v2", true).unwrap();
        assert_eq!(
            reader.get_meta_many(&["k"]).unwrap(),
            vec![Some(b"v2".to_vec())]
        );
        // The owner still holds the store: a second owner is refused, the reader was not one.
        assert!(matches!(
            Store::open(dir.path(), Options::default()),
            Err(StoreError::Locked(_))
        ));
    }

    #[test]
    fn a_reader_writes_nothing_and_names_a_blob_collected_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let a = store.import_bytes(&vec![1u8; 100_000]).unwrap();
        let b = store.import_bytes(&vec![2u8; 100_000]).unwrap();
        store.set_pin("active", &[a.blob, b.blob]).unwrap();
        drop(store);
        // Every file but SQLite's shared-memory index (`-shm`), where every WAL reader records what it
        // reads, and the empty log (`-wal`) SQLite opens for a reader when the owner's clean stop
        // checkpointed and removed it.
        let listing = |p: &Path| {
            let mut v: Vec<_> = walk(p)
                .into_iter()
                .filter(|(f, len, _)| {
                    let name = f.to_string_lossy();
                    !(name.ends_with("-shm") || (name.ends_with("-wal") && *len == 0))
                })
                .collect();
            v.sort();
            v
        };
        let before = listing(dir.path());
        let reader = StoreReader::open(dir.path()).unwrap();
        let mut out = Vec::new();
        reader.copy_blob(&b.blob, &mut out).unwrap();
        assert_eq!(
            listing(dir.path()),
            before,
            "opening and reading changed the store's files"
        );

        // The blob file disappears while the catalog still names it (the owner's gc between its commit
        // and the unlink): the reader names the blob.
        std::fs::remove_file(dir.path().join("blobs").join(a.blob.to_hex())).unwrap();
        let err = reader.copy_blob(&a.blob, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, StoreError::Gone(id) if id == a.blob), "{err}");
        assert!(err.to_string().contains(&a.blob.to_string()), "{err}");

        // Bit rot under a reader: refused, named, and the reader does not quarantine.
        let path = dir.path().join("blobs").join(b.blob.to_hex());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = reader.copy_blob(&b.blob, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, StoreError::ContentMismatch { .. }), "{err}");
        assert!(path.exists());
    }

    #[test]
    fn a_store_whose_owner_stopped_cleanly_is_read_without_its_wal_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let a = store.import_bytes(&vec![9u8; 50_000]).unwrap();
        store.set_pin("active", &[a.blob]).unwrap();
        drop(store);
        // The last connection to close checkpoints and removes the WAL and its index; the catalog stays
        // in WAL mode.
        let c = Connection::open(dir.path().join(CATALOG_FILE)).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM blobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        drop(c);
        assert!(!dir.path().join("catalog.sqlite-wal").exists());
        assert!(!dir.path().join("catalog.sqlite-shm").exists());
        let reader = StoreReader::open(dir.path()).unwrap();
        assert_eq!(reader.pins("active").unwrap(), vec![a.blob]);
    }

    #[test]
    fn no_store_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = StoreReader::open(dir.path().join("nothing")).err().unwrap();
        assert!(matches!(err, StoreError::NoStore(_)), "{err}");
        assert!(err.to_string().contains("nothing"), "{err}");
    }

    /// Every file under `p` with its size and modification time.
    fn walk(p: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push((e.path(), m.len(), m.modified().unwrap()));
            }
        }
        out
    }
}
