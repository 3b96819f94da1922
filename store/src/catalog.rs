//! The SQLite catalog: its schema, the one writer thread that owns the write connection, and a small pool
//! of read connections.
//!
//! Writes are jobs sent over a bounded channel to the writer thread, which drains whatever is waiting
//! (up to [`MAX_BATCH`] jobs), syncs every file those jobs wrote to, runs each job in its own savepoint
//! inside one transaction, commits, and only then answers each caller. A job that fails rolls back its own
//! savepoint and nothing else. Jobs that record something a power cut must not lose ask for a durable
//! commit, and the batch then commits with `synchronous=FULL`.

use crate::StoreError;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

/// The most jobs committed in one transaction.
const MAX_BATCH: usize = 256;
/// The most jobs waiting for the writer; callers block beyond this.
const QUEUE: usize = 1024;
/// The most idle read connections kept.
const MAX_IDLE_READERS: usize = 8;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blobs (
    id        BLOB PRIMARY KEY,          -- blake3 of the content, 32 bytes
    size      INTEGER NOT NULL,
    complete  INTEGER NOT NULL,          -- 0: filling under partial/, 1: verified under blobs/
    chunk_map BLOB,                      -- id of its chunk map blob; NULL for raw blobs (chunk maps themselves)
    added_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    blob   BLOB NOT NULL,
    idx    INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    len    INTEGER NOT NULL,
    id     BLOB NOT NULL,
    have   INTEGER NOT NULL,             -- 1 once the bytes at offset were verified, written and synced
    PRIMARY KEY (blob, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_id ON chunks (id);
CREATE TABLE IF NOT EXISTS pins (
    name TEXT NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (name, blob)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    id     BLOB NOT NULL,
    file   TEXT NOT NULL,
    reason TEXT NOT NULL,
    at     INTEGER NOT NULL
);
";

pub(crate) fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql("set busy timeout"))?;
    conn.pragma_update(None, "foreign_keys", "OFF")
        .map_err(sql("set pragmas"))?;
    Ok(())
}

/// Opens the catalog, creating or checking its schema, in WAL mode.
pub(crate) fn open_write(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sql("open catalog"))?;
    configure(&conn)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(sql("enable WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "catalog refused WAL mode (got {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql("set synchronous"))?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("read schema version"))?;
    match version {
        0 => {
            conn.execute_batch(SCHEMA).map_err(sql("create schema"))?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sql("set schema version"))?;
        }
        SCHEMA_VERSION => {
            // Damage SQLite only meets when it reads the page (an SD card's bad sector): look now, while
            // the store can still be rebuilt, rather than at some later read.
            let check: String = conn
                .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
                .map_err(sql("check catalog"))?;
            if check != "ok" {
                return Err(StoreError::Damaged(check));
            }
        }
        other => {
            return Err(StoreError::Corrupt(format!(
                "catalog schema version {other} is newer than this build understands ({SCHEMA_VERSION})"
            )));
        }
    }
    Ok(conn)
}

/// Opens the catalog read-only, for a process that does not own the store (`StoreReader`): it creates
/// nothing, changes no setting, and refuses a schema it does not know.
pub(crate) fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql("open catalog read-only"))?;
    configure(&conn)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("read schema version"))?;
    if version != SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "catalog schema version {version}; this build reads version {SCHEMA_VERSION}"
        )));
    }
    Ok(conn)
}

/// What a job returns to the writer: whether to keep its savepoint, and how to answer its caller once the
/// commit outcome is known.
type Answer = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> (bool, Answer) + Send>;

struct Envelope {
    job: Job,
    /// Answers the caller without running the job (the batch failed before reaching it).
    fail: Box<dyn FnOnce(String) + Send>,
    durable: bool,
    sync: Vec<Arc<File>>,
}

/// The sending side of the writer thread, plus the read pool.
pub(crate) struct Catalog {
    path: PathBuf,
    tx: Mutex<Option<SyncSender<Envelope>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
}

impl Catalog {
    pub(crate) fn start(path: PathBuf, conn: Connection) -> Result<Self, StoreError> {
        let (tx, rx) = sync_channel::<Envelope>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("deckhand-store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|source| StoreError::Io {
                op: "spawn writer thread",
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            path,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f` in the writer's transaction. Before the commit, every file in `sync` is synced; with
    /// `durable`, the commit itself is synced (`synchronous=FULL`). Returns after the commit.
    pub(crate) fn write<T, F>(
        &self,
        durable: bool,
        sync: Vec<Arc<File>>,
        f: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply_tx, reply_rx) = sync_channel::<Result<T, StoreError>>(1);
        let fail_tx = reply_tx.clone();
        let fail = Box::new(move |message: String| {
            let _ = fail_tx.send(Err(StoreError::Commit(message)));
        });
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let keep = result.is_ok();
            let answer: Answer = Box::new(move |commit| {
                let outcome = match commit {
                    Ok(()) => result,
                    Err(message) => Err(StoreError::Commit(message)),
                };
                // The caller may have given up waiting; nothing to do then.
                let _ = reply_tx.send(outcome);
            });
            (keep, answer)
        });
        let sender = self
            .tx
            .lock()
            .map_err(|_| StoreError::WriterGone)?
            .clone()
            .ok_or(StoreError::WriterGone)?;
        sender
            .send(Envelope {
                job,
                fail,
                durable,
                sync,
            })
            .map_err(|_| StoreError::WriterGone)?;
        reply_rx.recv().map_err(|_| StoreError::WriterGone)?
    }

    /// Runs a read-only query on a pooled connection.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = match self
            .readers
            .lock()
            .map_err(|_| StoreError::WriterGone)?
            .pop()
        {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(sql("open read connection"))?;
                configure(&c)?;
                c
            }
        };
        let out = f(&conn);
        if let Ok(mut pool) = self.readers.lock()
            && pool.len() < MAX_IDLE_READERS
        {
            pool.push(conn);
        }
        out
    }

    /// Stops the writer after it has finished every job already sent; it checkpoints the WAL into the
    /// catalog before it closes. The idle read connections are closed first, so the writer's connection
    /// is normally the last: closing, it removes the WAL too (a read-only connection closing last
    /// cannot).
    pub(crate) fn shutdown(&self) {
        if let Ok(mut pool) = self.readers.lock() {
            pool.clear();
        }
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut t) = self.thread.lock()
            && let Some(handle) = t.take()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// However many commits asked only for `NORMAL`, one is synced at least this often while writes come:
/// with WAL and `NORMAL`, SQLite syncs the log only at a checkpoint (every ~4 MiB of log, hundreds of
/// chunk ranges), so a power cut could otherwise lose the record of a whole download's progress.
const DURABLE_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

fn writer_loop(mut conn: Connection, rx: Receiver<Envelope>) {
    write_jobs(&mut conn, rx);
    // Every sender is gone: the store is closing. Everything in the WAL goes into the catalog now,
    // whoever else still holds a connection, so that a clean stop leaves one self-contained file (a
    // damaged first page of it is then found at the next start, not masked by a log).
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => {}
        Ok(_) => tracing::warn!(
            "the catalog's log was busy at close: it is checkpointed at the next start"
        ),
        Err(e) => tracing::warn!(cause = %e, "could not checkpoint the catalog's log at close"),
    }
}

fn write_jobs(conn: &mut Connection, rx: Receiver<Envelope>) {
    let mut full = false;
    let mut last_durable = std::time::Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        // 1. Data before the records that point at it: sync every file this batch wrote to.
        let mut synced: Vec<*const File> = Vec::new();
        let mut sync_error = None;
        for file in batch.iter().flat_map(|e| e.sync.iter()) {
            let ptr = Arc::as_ptr(file);
            if synced.contains(&ptr) {
                continue;
            }
            synced.push(ptr);
            if let Err(e) = file.sync_data() {
                sync_error = Some(format!("sync data before commit: {e}"));
                break;
            }
        }
        if let Some(message) = sync_error {
            tracing::error!(cause = %message, "store writer could not sync data; failing the batch");
            for e in batch {
                (e.fail)(message.clone());
            }
            continue;
        }
        // 2. One transaction, one savepoint per job.
        let durable =
            batch.iter().any(|e| e.durable) || last_durable.elapsed() >= DURABLE_AT_LEAST_EVERY;
        if durable != full {
            let level = if durable { "FULL" } else { "NORMAL" };
            if let Err(e) = conn.pragma_update(None, "synchronous", level) {
                tracing::warn!(cause = %e, level, "could not change synchronous level");
            } else {
                full = durable;
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let outcome = (|| -> Result<(), String> {
            let mut tx = conn
                .transaction()
                .map_err(|e| format!("begin transaction: {e}"))?;
            for e in batch.drain(..) {
                let mut sp = tx.savepoint().map_err(|e| format!("savepoint: {e}"))?;
                let (keep, answer) = (e.job)(&sp);
                if keep {
                    sp.commit().map_err(|e| format!("release savepoint: {e}"))?;
                } else {
                    sp.rollback()
                        .map_err(|e| format!("roll back savepoint: {e}"))?;
                }
                answers.push(answer);
            }
            tx.commit().map_err(|e| format!("commit: {e}"))
        })();
        match &outcome {
            Err(message) => tracing::error!(cause = %message, "store writer transaction failed"),
            Ok(()) if full => last_durable = std::time::Instant::now(),
            Ok(()) => {}
        }
        for answer in answers {
            answer(outcome.clone());
        }
        // Jobs never reached because the transaction failed early are answered too.
        for e in batch {
            (e.fail)(
                outcome
                    .clone()
                    .err()
                    .unwrap_or_else(|| "transaction aborted".into()),
            );
        }
    }
}

/// Reads a meta value.
pub(crate) fn get_meta(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(sql("read meta"))
}
