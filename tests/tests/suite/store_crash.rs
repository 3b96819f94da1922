//! Crash safety of the store, tested by killing a real process (SIGKILL) at random points while it imports
//! and fills blobs, at least 50 times. After every kill: the store opens, verify finds nothing corrupt, and
//! the next run resumes without fetching again any chunk the store had recorded.

use deckhand_protocol::{BlobId, ChunkMap};
use deckhand_store::{Options, Store};
use deckhand_tests::{SplitMix, TestDir, noise};
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

const KILLS: usize = 50;
const FILES_PER_GENERATION: u64 = 16;

struct Sources {
    maps: HashMap<BlobId, ChunkMap>,
    next: u64,
}

impl Sources {
    fn add_generation(&mut self, dir: &std::path::Path) {
        let mut rng = SplitMix(self.next);
        for _ in 0..FILES_PER_GENERATION {
            let n = self.next;
            let data = noise(1000 + n, rng.range(700_000, 3_000_000) as usize);
            std::fs::write(dir.join(format!("{n:05}.bin")), &data).unwrap();
            let map = ChunkMap::build(&data);
            self.maps.insert(map.blob(), map);
            self.next += 1;
        }
    }
}

/// (blob, chunk offset) pairs the store has recorded as held.
fn recorded(store: &Store, sources: &Sources) -> HashSet<(String, u64)> {
    let mut out = HashSet::new();
    for (blob, map) in &sources.maps {
        let Some(bits) = store.have_bitmap(blob).unwrap() else {
            continue;
        };
        for (i, c) in map.chunks().iter().enumerate() {
            if bits[i / 8] & (1 << (i % 8)) != 0 {
                out.insert((blob.to_hex(), c.offset));
            }
        }
    }
    out
}

fn check_store(dir: &std::path::Path, sources: &Sources) -> HashSet<(String, u64)> {
    let store = Store::open(dir, Options::default()).unwrap();
    let report = store.verify().unwrap();
    assert!(
        report.corrupt.is_empty(),
        "corrupt complete blobs after a kill: {:?}",
        report.corrupt
    );
    assert_eq!(
        report.chunks_reset, 0,
        "a recorded chunk's bytes did not survive the kill"
    );
    recorded(&store, sources)
}

#[test]
fn store_survives_sigkill_at_random_points() {
    let child = env!("CARGO_BIN_EXE_store-crash-child");
    let t = TestDir::new("store-crash");
    let (store_dir, src_dir, log) = (t.join("store"), t.join("src"), t.join("fetch.log"));
    std::fs::create_dir_all(&src_dir).unwrap();
    let mut sources = Sources {
        maps: HashMap::new(),
        next: 0,
    };
    sources.add_generation(&src_dir);

    let mut rng = SplitMix(0xdecc);
    let (mut kills, mut runs) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(240);
    while kills < KILLS {
        assert!(
            Instant::now() < deadline,
            "only {kills} kills before the deadline"
        );
        let before = check_store(&store_dir, &sources);
        let _ = std::fs::remove_file(&log);
        let mut proc = Command::new(child)
            .arg(&store_dir)
            .arg(&src_dir)
            .arg(&log)
            .spawn()
            .unwrap();
        runs += 1;
        std::thread::sleep(Duration::from_millis(rng.range(2, 70)));
        let killed = match proc.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "child failed on its own: {status}");
                false
            }
            None => {
                proc.kill().unwrap();
                proc.wait().unwrap();
                true
            }
        };
        // Nothing recorded before this run may have been fetched again by it.
        let fetched = std::fs::read_to_string(&log).unwrap_or_default();
        // Only whole lines: the child writes each in one call, but stay strict about what counts.
        for line in fetched
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(str::trim_end)
        {
            let (blob, offset) = line.split_once(' ').unwrap();
            let k = (blob.to_owned(), offset.parse::<u64>().unwrap());
            assert!(
                !before.contains(&k),
                "run {runs} fetched chunk {k:?} again, though it was recorded"
            );
        }
        if killed {
            kills += 1;
        } else {
            // Everything finished before the kill: give the next run more work.
            sources.add_generation(&src_dir);
        }
    }

    // A last run without a kill completes everything, and every blob is exactly its source.
    let status = Command::new(child)
        .arg(&store_dir)
        .arg(&src_dir)
        .arg(&log)
        .status()
        .unwrap();
    assert!(status.success());
    check_store(&store_dir, &sources);
    let store = Store::open(&store_dir, Options::default()).unwrap();
    for (blob, map) in &sources.maps {
        assert!(
            store.has(blob).unwrap(),
            "blob {blob} not complete after the final run"
        );
        let (hash, len) = {
            let data = std::fs::read(store.blob_path(blob).unwrap()).unwrap();
            (BlobId::of(&data), data.len() as u64)
        };
        assert_eq!((hash, len), (*blob, map.size()));
    }
    eprintln!(
        "{kills} kills over {runs} runs, {} blobs",
        sources.maps.len()
    );
}
