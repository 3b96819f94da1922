//! The child process of the store crash test: imports and fills blobs from a source directory until all
//! are complete, logging each chunk it is about to fetch. The test kills it at random points.
//!
//! Usage: store-crash-child STORE_DIR SOURCE_DIR FETCH_LOG

use deckhand_protocol::ChunkMap;
use deckhand_store::{Options, Store};
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: store-crash-child STORE_DIR SOURCE_DIR FETCH_LOG");
        std::process::exit(2);
    }
    if let Err(e) = run(&args[1], &args[2], &args[3]) {
        eprintln!("store-crash-child: {e}");
        std::process::exit(1);
    }
}

fn run(store_dir: &str, source_dir: &str, log: &str) -> Result<(), Box<dyn std::error::Error>> {
    // The test process opened the store just before starting this child. It runs the suite's other
    // stories beside this one, and a process one of them forks (chromium is forked, not spawned, for
    // its pipe descriptors) holds a copy of every descriptor the test process had open, the store's
    // LOCK among them, until it executes its program: the lock (flock, held by the open file
    // description) can outlive the test's own close by that long. A lock still held after a second is
    // a real failure.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let store = loop {
        match Store::open(store_dir, Options::default()) {
            Err(deckhand_store::StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other?,
        }
    };
    let log = std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?,
    );
    let mut sources: Vec<_> = std::fs::read_dir(source_dir)?.collect::<Result<Vec<_>, _>>()?;
    sources.sort_by_key(|e| e.file_name());
    for (i, entry) in sources.iter().enumerate() {
        let path = entry.path();
        if i % 2 == 0 {
            // Local import: copy, chunk, hash, rename, commit.
            store.import_file(&path)?;
            continue;
        }
        // Fetch-style fill: chunk by chunk from the "origin" (the source file), on two threads.
        let data = std::fs::read(&path)?;
        let map = ChunkMap::build(&data);
        if store.has(&map.blob())? {
            continue;
        }
        store.begin(&map)?;
        store.fill_local(&map.blob())?;
        let missing = store.missing(&map.blob())?;
        let half = missing.len().div_ceil(2).max(1);
        let blob_hex = map.blob().to_hex();
        std::thread::scope(|s| -> Result<(), String> {
            let workers: Vec<_> = missing
                .chunks(half)
                .map(|part| {
                    let (store, data, log, blob_hex) = (&store, &data, &log, &blob_hex);
                    s.spawn(move || -> Result<(), String> {
                        for c in part {
                            // Say what is about to be fetched before fetching it.
                            {
                                let mut log = log.lock().map_err(|_| "log lock poisoned")?;
                                // One write call per line, so a kill cannot leave half a line.
                                let line = format!("{blob_hex} {}\n", c.offset);
                                log.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
                            }
                            let r = c.offset as usize..(c.offset + u64::from(c.len)) as usize;
                            store
                                .put_chunk(&c.id, &data[r])
                                .map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in workers {
                w.join().map_err(|_| "worker panicked")??;
            }
            Ok(())
        })?;
        store.complete(&map.blob())?;
    }
    Ok(())
}
