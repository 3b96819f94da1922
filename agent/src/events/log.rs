//! The event log (the outbox): every recognition event, durable in its own SQLite file beside the store
//! (`events.sqlite` in the data directory), and how far each sink (MQTT, each webhook) has delivered.
//!
//! One thread owns the write connection. Recognitions are queued to it without waiting ([`QUEUE`]; a
//! full queue drops the event and counts it) and committed in batches (`synchronous = FULL`: a committed
//! event survives a power cut); only then are they numbered for readers, so a consumer never sees an
//! event a crash could take back. Sinks read after their cursor and move it once a batch is delivered,
//! so delivery is in order and at least once with the same id. The log is bounded by count and age
//! (`events_keep`, `events_max_age`): the oldest go first, delivered or not, and an undelivered one that
//! goes is counted (`expired`).
//!
//! A log that does not open (a damaged file) is set aside (`events.sqlite.damaged`) and a new one
//! begins with a new log id, so consumers see the ids change rather than repeat; recognitions never
//! stop for it.

use deckhand_protocol::event::{Event, EventId};
use rusqlite::{Connection, OptionalExtension as _, params};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Events waiting for the writer thread; beyond this a recognition's event is dropped (and counted).
pub const QUEUE: usize = 1024;
/// The most events one commit takes.
const BATCH: usize = 256;
/// How often the writer trims by age when nothing arrives.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// The log's file name in the data directory.
pub const FILE: &str = "events.sqlite";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("event log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the event log is closed")]
    Closed,
}

/// How much the log keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most events kept.
    pub keep: u64,
    /// The oldest an event may be and still be kept.
    pub max_age: Duration,
}

/// An event as stored: its number in the log, when it was made (ms since the epoch) and its JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub seq: u64,
    pub at_ms: i64,
    pub json: Arc<str>,
}

/// An event before the log numbered it (its `id` is filled in by the writer).
pub type Draft = Event;

#[derive(Clone)]
enum Job {
    Record(Box<Draft>),
    Advance { sink: String, seq: u64 },
    Stop,
}

/// What happened to the events since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub recorded: u64,
    /// Dropped at a full queue.
    pub dropped: u64,
    /// Trimmed (count or age) before every sink had them.
    pub expired: u64,
    /// Their commit failed on every attempt.
    pub unwritten: u64,
    /// Commit attempts that failed (each tried again, up to the last).
    pub failed_commits: u64,
}

/// Pauses before a failed commit is tried again (a busy or briefly full file); after the last, its
/// events are counted as unwritten.
const COMMIT_RETRIES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// Counters and positions readers may look at without touching SQLite.
#[derive(Debug, Default)]
struct Positions {
    /// The newest committed seq (0: none yet).
    head: AtomicU64,
    /// The oldest seq kept (head + 1 when empty).
    first: AtomicU64,
    recorded: AtomicU64,
    dropped_full: AtomicU64,
    /// Events whose commit failed on every attempt (the file could not be written).
    unwritten: AtomicU64,
    /// Commits that failed (each attempt counted).
    failed_commits: AtomicU64,
    expired: AtomicU64,
}

/// The event log. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    id: String,
    /// Why the previous file was set aside at open, if it was.
    reset: Option<String>,
    tx: Mutex<Option<SyncSender<Job>>>,
    reader: Mutex<Connection>,
    positions: Arc<Positions>,
    head: tokio::sync::watch::Sender<u64>,
    cursors: Arc<Mutex<HashMap<String, u64>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> LogError + '_ {
    move |source| LogError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL) STRICT;
";

fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    Ok(c)
}

/// A log file as opened: its connection, id, newest and oldest seq, and cursors.
struct Opened {
    conn: Connection,
    id: String,
    head: u64,
    first: u64,
    cursors: HashMap<String, u64>,
}

/// Opens (or makes) the log's file and reads its id, its newest and oldest seq and its cursors: one per
/// sink in `sinks` (a new sink starts at the newest event; a sink no longer configured is forgotten).
fn open_file(path: &Path, sinks: &[String]) -> Result<Opened, LogError> {
    let err = sqlite(path);
    let c = connect(path).map_err(&err)?;
    c.execute_batch(SCHEMA).map_err(&err)?;
    let check: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(&err)?;
    if check != "ok" {
        return Err(err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(check),
        )));
    }
    let id: Option<String> = c
        .query_row("SELECT value FROM meta WHERE key = 'log'", [], |r| r.get(0))
        .optional()
        .map_err(&err)?;
    let id = match id {
        // A log id that does not make valid event ids is damage.
        Some(id) if format!("{id}-0").parse::<EventId>().is_err() => {
            return Err(err(rusqlite::Error::InvalidColumnType(
                0,
                "log".into(),
                rusqlite::types::Type::Text,
            )));
        }
        Some(id) => id,
        None => {
            let mut raw = [0u8; 6];
            getrandom::fill(&mut raw).map_err(|e| LogError::Io {
                path: path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let id = hex::encode(raw);
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('log', ?1)",
                params![id],
            )
            .map_err(&err)?;
            id
        }
    };
    // The highest seq ever given (AUTOINCREMENT's own record survives deletes).
    let head: u64 = c
        .query_row(
            "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(&err)?
        .max(0) as u64;
    let first: u64 = c
        .query_row("SELECT MIN(seq) FROM events", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .map_err(&err)?
        .map_or(head + 1, |s| s.max(0) as u64);
    let mut cursors = HashMap::new();
    {
        let tx = c.unchecked_transaction().map_err(&err)?;
        let known: Vec<String> = {
            let mut stmt = tx.prepare("SELECT sink FROM cursors").map_err(&err)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(&err)?;
            rows.collect::<Result<_, _>>().map_err(&err)?
        };
        for gone in known.iter().filter(|k| !sinks.contains(k)) {
            tx.execute("DELETE FROM cursors WHERE sink = ?1", params![gone])
                .map_err(&err)?;
        }
        for new in sinks.iter().filter(|s| !known.contains(s)) {
            tx.execute(
                "INSERT INTO cursors (sink, seq) VALUES (?1, ?2)",
                params![new, head as i64],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
    }
    {
        let mut stmt = c.prepare("SELECT sink, seq FROM cursors").map_err(&err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(&err)?;
        for row in rows {
            let (sink, seq) = row.map_err(&err)?;
            cursors.insert(sink, seq.max(0) as u64);
        }
    }
    Ok(Opened {
        conn: c,
        id,
        head,
        first,
        cursors,
    })
}

/// Moves a damaged log (and its WAL) aside.
fn set_aside(path: &Path) -> Result<(), LogError> {
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        let to = PathBuf::from(format!("{}.damaged{suffix}", path.display()));
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LogError::Io { path: from, source }),
        }
    }
    Ok(())
}

impl EventLog {
    /// Opens the log at `path` (a damaged one is set aside and a new one begun) for `sinks` and starts
    /// its writer.
    pub fn open(path: &Path, limits: Limits, sinks: &[String]) -> Result<Self, LogError> {
        let (opened, reset) = match open_file(path, sinks) {
            Ok(o) => (o, None),
            Err(e @ LogError::Sqlite { .. }) => {
                tracing::error!(cause = %e, "the event log is damaged; set aside, a new one begins");
                set_aside(path)?;
                (open_file(path, sinks)?, Some(e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let Opened {
            conn: writer,
            id,
            head,
            first,
            cursors,
        } = opened;
        let reader = connect(path).map_err(sqlite(path))?;
        let positions = Arc::new(Positions::default());
        positions.head.store(head, Ordering::Relaxed);
        positions.first.store(first, Ordering::Relaxed);
        let (head_tx, _) = tokio::sync::watch::channel(head);
        let (tx, rx) = sync_channel(QUEUE);
        let cursors = Arc::new(Mutex::new(cursors));
        let writer = Writer {
            conn: writer,
            path: path.to_owned(),
            id: id.clone(),
            limits,
            positions: positions.clone(),
            head: head_tx.clone(),
            cursors: cursors.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("deckhand-events".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| LogError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(EventLog {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                id,
                reset,
                tx: Mutex::new(Some(tx)),
                reader: Mutex::new(reader),
                positions,
                head: head_tx,
                cursors,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// This log's id (the first part of every event id it gives).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Why the file was set aside at open, if it was.
    pub fn reset(&self) -> Option<&str> {
        self.inner.reset.as_deref()
    }

    /// Queues an event to be numbered and committed; never waits. A full queue drops it (counted).
    pub fn record(&self, draft: Draft) {
        let tx = crate::locks::lock(&self.inner.tx, "event log").clone();
        let Some(tx) = tx else { return };
        match tx.try_send(Job::Record(Box::new(draft))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let n = self
                    .inner
                    .positions
                    .dropped_full
                    .fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n + 1,
                        "the event log's queue is full; events dropped"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Records that `sink` delivered everything up to `seq` (durable with the writer's next commit;
    /// blocks while the writer's queue is full, so call it off the runtime's threads).
    pub fn advance(&self, sink: &str, seq: u64) -> Result<(), LogError> {
        {
            let mut c = crate::locks::lock(&self.inner.cursors, "event cursors");
            let at = c.entry(sink.to_owned()).or_default();
            *at = (*at).max(seq);
        }
        let tx = crate::locks::lock(&self.inner.tx, "event log")
            .clone()
            .ok_or(LogError::Closed)?;
        tx.send(Job::Advance {
            sink: sink.to_owned(),
            seq,
        })
        .map_err(|_| LogError::Closed)
    }

    /// Where `sink` has delivered to (0: nothing yet).
    pub fn cursor(&self, sink: &str) -> u64 {
        crate::locks::lock(&self.inner.cursors, "event cursors")
            .get(sink)
            .copied()
            .unwrap_or(0)
    }

    /// The newest committed seq, watched: it changes when a commit adds events.
    pub fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    pub fn head(&self) -> u64 {
        self.inner.positions.head.load(Ordering::Relaxed)
    }

    /// The oldest seq still kept.
    pub fn first(&self) -> u64 {
        self.inner.positions.first.load(Ordering::Relaxed)
    }

    /// Events after `seq`, oldest first, at most `limit` (blocking: SQLite).
    pub fn after(&self, seq: u64, limit: usize) -> Result<Vec<Stored>, LogError> {
        let head = self.head();
        let conn = crate::locks::lock(&self.inner.reader, "event log reader");
        let err = sqlite(&self.inner.path);
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, at_ms, body FROM events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map(params![seq as i64, head as i64, limit as i64], |r| {
                Ok(Stored {
                    seq: r.get::<_, i64>(0)?.max(0) as u64,
                    at_ms: r.get(1)?,
                    json: Arc::from(r.get::<_, String>(2)?),
                })
            })
            .map_err(&err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// When the oldest event after `seq` was made (ms since the epoch), if one is kept.
    pub fn made_after(&self, seq: u64) -> Option<i64> {
        let conn = crate::locks::lock(&self.inner.reader, "event log reader");
        conn.query_row(
            "SELECT at_ms FROM events WHERE seq > ?1 ORDER BY seq LIMIT 1",
            params![seq as i64],
            |r| r.get(0),
        )
        .optional()
        .ok()
        .flatten()
    }

    /// Events kept after `cursor`: what a sink still owes.
    pub fn backlog(&self, cursor: u64) -> u64 {
        let head = self.head();
        head.saturating_sub(cursor.max(self.first().saturating_sub(1)))
    }

    /// Events recorded since start, dropped at a full queue, trimmed before every sink had them, and
    /// lost because the file could not be written.
    pub fn counts(&self) -> Counts {
        let p = &self.inner.positions;
        Counts {
            recorded: p.recorded.load(Ordering::Relaxed),
            dropped: p.dropped_full.load(Ordering::Relaxed),
            expired: p.expired.load(Ordering::Relaxed),
            unwritten: p.unwritten.load(Ordering::Relaxed),
            failed_commits: p.failed_commits.load(Ordering::Relaxed),
        }
    }

    /// Commits what is queued and stops the writer (bounded: the queue is).
    pub fn close(&self) {
        let tx = crate::locks::lock(&self.inner.tx, "event log").take();
        if let Some(tx) = tx {
            let _ = tx.send(Job::Stop);
        }
        let thread = crate::locks::lock(&self.inner.thread, "event log writer").take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    id: String,
    limits: Limits,
    positions: Arc<Positions>,
    head: tokio::sync::watch::Sender<u64>,
    cursors: Arc<Mutex<HashMap<String, u64>>>,
}

impl Writer {
    fn run(self, rx: Receiver<Job>) {
        loop {
            let first = match rx.recv_timeout(TRIM_EVERY) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    // Trimming by age; a failure is tried again at the next tick.
                    if let Err(e) = self.commit(Vec::new()) {
                        tracing::warn!(log = %self.path.display(), cause = %e, "the event log was not trimmed");
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut jobs = vec![first];
            while jobs.len() < BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let stop = jobs.iter().any(|j| matches!(j, Job::Stop));
            self.commit_retrying(jobs);
            if stop {
                break;
            }
        }
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    }

    /// [`Writer::commit`], tried again after a pause when it fails (the file busy past its timeout, the
    /// disk briefly full): a failed transaction changed nothing, so the same jobs are simply committed
    /// again. What still fails after the last pause is counted as unwritten and logged.
    fn commit_retrying(&self, jobs: Vec<Job>) {
        for pause in COMMIT_RETRIES {
            match self.commit(jobs.clone()) {
                Ok(()) => return,
                Err(e) => {
                    self.positions
                        .failed_commits
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(log = %self.path.display(), cause = %e, retry_in = ?pause,
                        "events not recorded yet; trying again");
                    std::thread::sleep(pause);
                }
            }
        }
        if let Err(e) = self.commit(jobs.clone()) {
            self.positions
                .failed_commits
                .fetch_add(1, Ordering::Relaxed);
            let lost = jobs.iter().filter(|j| matches!(j, Job::Record(_))).count() as u64;
            self.positions.unwritten.fetch_add(lost, Ordering::Relaxed);
            tracing::error!(log = %self.path.display(), cause = %e, lost,
                "events not recorded: the event log could not be written");
        }
    }

    /// One transaction: the events numbered and inserted, the cursors moved, the log trimmed.
    fn commit(&self, jobs: Vec<Job>) -> Result<(), rusqlite::Error> {
        let mut seq = self.positions.head.load(Ordering::Relaxed);
        let result = (|| -> Result<u64, rusqlite::Error> {
            let tx = self.conn.unchecked_transaction()?;
            let mut added = 0;
            for job in jobs {
                match job {
                    Job::Record(mut event) => {
                        let next = seq + 1;
                        event.id = EventId::new(&self.id, next).to_string();
                        let at_ms = jiff::Timestamp::now().as_millisecond();
                        let body = serde_json::to_string(&event)
                            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                        tx.execute(
                            "INSERT INTO events (seq, at_ms, body) VALUES (?1, ?2, ?3)",
                            params![next as i64, at_ms, body],
                        )?;
                        seq = next;
                        added += 1;
                    }
                    Job::Advance { sink, seq } => {
                        tx.execute(
                            "INSERT INTO cursors (sink, seq) VALUES (?1, ?2)
                             ON CONFLICT (sink) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                            params![sink, seq as i64],
                        )?;
                    }
                    Job::Stop => {}
                }
            }
            let expired = self.trim(&tx, seq)?;
            tx.commit()?;
            self.positions.expired.fetch_add(expired, Ordering::Relaxed);
            Ok(added)
        })();
        let added = result?;
        if added > 0 {
            self.positions.head.store(seq, Ordering::Relaxed);
            self.positions.recorded.fetch_add(added, Ordering::Relaxed);
            // send_replace: the value is kept even while nobody watches (`send` drops it then, and a
            // reader that subscribes later would see a stale head).
            self.head.send_replace(seq);
        }
        Ok(())
    }

    /// Drops what is beyond the limits; returns how many of those some sink had not delivered.
    fn trim(&self, tx: &rusqlite::Transaction<'_>, head: u64) -> Result<u64, rusqlite::Error> {
        let oldest_kept_ms =
            jiff::Timestamp::now().as_millisecond() - self.limits.max_age.as_millis() as i64;
        let by_count = head.saturating_sub(self.limits.keep);
        let slowest = crate::locks::lock(&self.cursors, "event cursors")
            .values()
            .copied()
            .min();
        let expired: i64 = match slowest {
            Some(c) => tx.query_row(
                "SELECT COUNT(*) FROM events WHERE (seq <= ?1 OR at_ms < ?2) AND seq > ?3",
                params![by_count as i64, oldest_kept_ms, c as i64],
                |r| r.get(0),
            )?,
            None => 0,
        };
        tx.execute(
            "DELETE FROM events WHERE seq <= ?1 OR at_ms < ?2",
            params![by_count as i64, oldest_kept_ms],
        )?;
        let first: Option<i64> = tx.query_row("SELECT MIN(seq) FROM events", [], |r| r.get(0))?;
        self.positions.first.store(
            first.map_or(head + 1, |f| f.max(0) as u64),
            Ordering::Relaxed,
        );
        Ok(expired.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deckhand_protocol::event::Outcome;

    fn draft(card: &str) -> Draft {
        Event {
            id: String::new(),
            agent: "pi-1".into(),
            deployment: "shop-1".into(),
            source: "http".into(),
            at: "2026-12-05T00:00:00Z".into(),
            outcome: Outcome::Card,
            card_id: Some(card.into()),
            score: 0.9,
            margin: Some(0.2),
            metadata: None,
            candidates: Vec::new(),
            reason: None,
            release_version: 1,
            manifest_id: String::new(),
            corners: None,
            latency_ms: 1.0,
        }
    }

    const LIMITS: Limits = Limits {
        keep: 1000,
        max_age: Duration::from_secs(3600),
    };

    /// Waits until the writer committed up to `seq`.
    fn committed(log: &EventLog, seq: u64) {
        let mut head = log.watch_head();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while *head.borrow_and_update() < seq {
            assert!(
                std::time::Instant::now() < deadline,
                "seq {seq} never committed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn cards(stored: &[Stored]) -> Vec<String> {
        stored
            .iter()
            .map(|s| {
                let e: Event = serde_json::from_str(&s.json).unwrap();
                e.card_id.unwrap()
            })
            .collect()
    }

    /// A commit that fails (here: another process holds the file's write lock past the writer's busy
    /// timeout) is tried again, and its events are recorded once the file can be written, in order,
    /// none lost. (Before, the batch was dropped with an error in the log.)
    #[test]
    fn a_commit_that_fails_is_tried_again_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let log = EventLog::open(&path, LIMITS, &[]).unwrap();
        log.record(draft("a"));
        committed(&log, 1);
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        log.record(draft("b"));
        log.record(draft("c"));
        // Held until the writer's attempt failed (after its 5 s busy timeout).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while log.counts().failed_commits == 0 {
            assert!(std::time::Instant::now() < deadline, "no commit failed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            log.head(),
            1,
            "nothing could be committed while the lock was held"
        );
        other.execute_batch("COMMIT").unwrap();
        committed(&log, 3);
        assert_eq!(cards(&log.after(0, 10).unwrap()), ["a", "b", "c"]);
        let c = log.counts();
        assert_eq!((c.recorded, c.dropped, c.unwritten), (3, 0, 0));
        assert!(c.failed_commits >= 1);
        log.close();
    }

    #[test]
    fn events_are_numbered_kept_across_a_restart_and_cursors_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let sinks = ["mqtt".to_owned()];
        let log = EventLog::open(&path, LIMITS, &sinks).unwrap();
        let id = log.id().to_owned();
        for c in ["a", "b", "c"] {
            log.record(draft(c));
        }
        committed(&log, 3);
        let all = log.after(0, 10).unwrap();
        assert_eq!(cards(&all), ["a", "b", "c"]);
        let first: Event = serde_json::from_str(&all[0].json).unwrap();
        assert_eq!(first.id, format!("{id}-1"));
        log.advance("mqtt", 2).unwrap();
        log.close();

        let log = EventLog::open(&path, LIMITS, &sinks).unwrap();
        assert_eq!(log.id(), id, "the same log");
        assert_eq!(log.cursor("mqtt"), 2, "the cursor was durable");
        assert_eq!(log.backlog(2), 1);
        log.record(draft("d"));
        committed(&log, 4);
        assert_eq!(cards(&log.after(2, 10).unwrap()), ["c", "d"]);
        log.close();
    }

    #[test]
    fn the_log_is_bounded_and_counts_what_went_undelivered() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { keep: 16, ..LIMITS };
        let log = EventLog::open(&dir.path().join(FILE), limits, &["mqtt".into()]).unwrap();
        for i in 0..40 {
            log.record(draft(&format!("c{i}")));
            committed(&log, i + 1);
        }
        assert_eq!(log.first(), 25, "the newest 16 are kept");
        let kept = log.after(0, 100).unwrap();
        assert_eq!(kept.len(), 16);
        assert_eq!(kept[0].seq, 25);
        assert_eq!(log.backlog(0), 16);
        let c = log.counts();
        assert_eq!(
            (c.recorded, c.dropped, c.expired, c.unwritten),
            (40, 0, 24, 0)
        );
        log.close();
    }

    #[test]
    fn a_new_sink_starts_at_the_newest_event_and_a_removed_one_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let log = EventLog::open(&path, LIMITS, &["mqtt".into()]).unwrap();
        log.record(draft("a"));
        log.record(draft("b"));
        committed(&log, 2);
        log.close();
        let log = EventLog::open(&path, LIMITS, &["webhook:http://till/".into()]).unwrap();
        assert_eq!(log.cursor("webhook:http://till/"), 2);
        assert_eq!(log.cursor("mqtt"), 0, "forgotten");
        log.close();
    }

    #[test]
    fn a_damaged_log_is_set_aside_and_a_new_one_begins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let log = EventLog::open(&path, LIMITS, &[]).unwrap();
        let old = log.id().to_owned();
        log.record(draft("a"));
        committed(&log, 1);
        log.close();
        // The first page overwritten, as a failing card would.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..100].fill(0xAB);
        std::fs::write(&path, &bytes).unwrap();
        let log = EventLog::open(&path, LIMITS, &[]).unwrap();
        assert!(log.reset().is_some(), "the damage is reported");
        assert_ne!(log.id(), old, "a new log, so ids do not repeat");
        assert!(dir.path().join(format!("{FILE}.damaged")).exists());
        log.record(draft("b"));
        committed(&log, 1);
        assert_eq!(cards(&log.after(0, 10).unwrap()), ["b"]);
        log.close();
    }
}
