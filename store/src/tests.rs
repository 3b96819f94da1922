//! Unit tests of the store against real files and a real SQLite catalog in a temporary directory.

use super::*;

use deckhand_protocol::testdata::noise;

fn open(dir: &Path) -> Store {
    Store::open(dir, Options::default()).unwrap()
}

/// Fills a begun blob from `data`, chunk by chunk.
fn fill(store: &Store, map: &ChunkMap, data: &[u8]) -> usize {
    let mut n = 0;
    for c in store.missing(&map.blob()).unwrap() {
        let r = c.offset as usize..(c.offset + u64::from(c.len)) as usize;
        n += store.put_chunk(&c.id, &data[r]).unwrap();
    }
    n
}

#[test]
fn import_then_read_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(1, 1_500_000);
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let imp = store.import_file(&src).unwrap();
    assert_eq!(imp.blob, BlobId::of(&data));
    assert_eq!(imp.size, data.len() as u64);
    assert!(store.has(&imp.blob).unwrap());
    assert_eq!(
        std::fs::read(store.blob_path(&imp.blob).unwrap()).unwrap(),
        data
    );
    assert_eq!(
        store.read_chunk_map(&imp.chunk_map_id).unwrap(),
        imp.chunk_map
    );
    for c in imp.chunk_map.chunks() {
        let got = store.read_chunk(&c.id).unwrap().unwrap();
        assert_eq!(BlobId::of(&got), c.id);
    }
    // The chunk map is itself served as content by id.
    assert_eq!(
        store.read_chunk(&imp.chunk_map_id).unwrap().unwrap(),
        imp.chunk_map.encode()
    );
    let bitmap = store.have_bitmap(&imp.blob).unwrap().unwrap();
    assert_eq!(bitmap.len(), imp.chunk_map.chunks().len().div_ceil(8));
    // Importing again is a no-op that returns the same answer.
    let again = store.import_bytes(&data).unwrap();
    assert_eq!(again.blob, imp.blob);
    assert_eq!(store.usage().unwrap().blobs, 2);
    assert!(matches!(
        store.blob_path(&BlobId::of(b"nope")),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn a_range_of_chunks_is_stored_in_one_batch_up_to_the_first_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(9, 1_200_000);
    let map = ChunkMap::build(&data);
    assert!(map.chunks().len() >= 6, "the test needs several chunks");
    store.begin(&map).unwrap();
    let bytes = |c: &Chunk| &data[c.offset as usize..(c.offset + u64::from(c.len)) as usize];
    let chunks = map.chunks();

    // The third chunk's bytes are damaged: the two before it are stored and recorded, the rest are not.
    let mut bad = bytes(&chunks[2]).to_vec();
    bad[0] ^= 1;
    let mut batch: Vec<(BlobId, &[u8])> = vec![
        (chunks[0].id, bytes(&chunks[0])),
        (chunks[1].id, bytes(&chunks[1])),
        (chunks[2].id, &bad),
        (chunks[3].id, bytes(&chunks[3])),
    ];
    let put = store.put_chunks(&batch);
    assert_eq!(put.stored, 2);
    assert_eq!(put.places, 2);
    assert!(
        matches!(put.error, Some(StoreError::ContentMismatch { expected, .. }) if expected == chunks[2].id),
        "{:?}",
        put.error
    );
    let missing: Vec<u64> = store
        .missing(&map.blob())
        .unwrap()
        .iter()
        .map(|c| c.offset)
        .collect();
    let expected: Vec<u64> = chunks[2..].iter().map(|c| c.offset).collect();
    assert_eq!(missing, expected);

    // The rest in one batch, with a chunk given twice: each place is filled once, and the blob completes.
    batch = chunks[2..]
        .iter()
        .map(|c| (c.id, bytes(c)))
        .chain(std::iter::once((chunks[4].id, bytes(&chunks[4]))))
        .collect();
    let put = store.put_chunks(&batch);
    assert!(put.error.is_none(), "{:?}", put.error);
    assert_eq!(put.stored, batch.len());
    assert_eq!(put.places, chunks.len() - 2);
    store.complete(&map.blob()).unwrap();
    assert_eq!(
        std::fs::read(store.blob_path(&map.blob()).unwrap()).unwrap(),
        data
    );
}

#[test]
fn a_blob_is_filled_chunk_by_chunk_and_completed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(2, 900_000);
    let map = ChunkMap::build(&data);
    store.begin(&map).unwrap();
    store.begin(&map).unwrap();
    assert!(!store.has(&map.blob()).unwrap());
    let missing = store.missing(&map.blob()).unwrap();
    assert_eq!(missing.len(), map.chunks().len());
    assert!(matches!(
        store.complete(&map.blob()),
        Err(StoreError::Incomplete { .. })
    ));

    // Bytes that do not hash to the id are refused and change nothing.
    let c0 = missing[0];
    let mut bad = data[..c0.len as usize].to_vec();
    bad[10] ^= 1;
    assert!(matches!(
        store.put_chunk(&c0.id, &bad),
        Err(StoreError::ContentMismatch { .. })
    ));
    assert_eq!(
        store.missing(&map.blob()).unwrap().len(),
        map.chunks().len()
    );
    assert_eq!(store.read_chunk(&c0.id).unwrap(), None);

    // One good chunk is then readable from the partial blob, verified.
    assert_eq!(
        store.put_chunk(&c0.id, &data[..c0.len as usize]).unwrap(),
        1
    );
    assert_eq!(
        store.read_chunk(&c0.id).unwrap().unwrap(),
        &data[..c0.len as usize]
    );
    assert_eq!(store.have_bitmap(&map.blob()).unwrap().unwrap()[0] & 1, 1);
    let info = store.info(&map.blob()).unwrap().unwrap();
    assert_eq!(info.have_bytes, u64::from(c0.len));

    fill(&store, &map, &data);
    assert!(store.missing(&map.blob()).unwrap().is_empty());
    store.complete(&map.blob()).unwrap();
    assert!(store.has(&map.blob()).unwrap());
    assert_eq!(
        std::fs::read(store.blob_path(&map.blob()).unwrap()).unwrap(),
        data
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("partial"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn chunks_held_in_any_blob_are_reused_not_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let old = noise(3, 2_000_000);
    store.import_bytes(&old).unwrap();
    let mut new = old.clone();
    new.splice(1_000_000..1_000_000, noise(4, 500));
    let map = ChunkMap::build(&new);
    store.begin(&map).unwrap();
    let (copied, _) = store.fill_local(&map.blob()).unwrap();
    let missing = store.missing(&map.blob()).unwrap();
    assert!(
        copied as usize >= map.chunks().len() - 3,
        "copied {copied} of {}",
        map.chunks().len()
    );
    assert!(missing.len() <= 3, "{} chunks still missing", missing.len());
    fill(&store, &map, &new);
    store.complete(&map.blob()).unwrap();
}

#[test]
fn a_chunk_map_that_lies_about_its_blob_is_refused_at_completion() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(5, 300_000);
    let real = ChunkMap::build(&data);
    // Same chunks, but a different blob id: every chunk verifies, the whole does not.
    let mut bytes = real.encode();
    bytes[17..49].copy_from_slice(BlobId::of(b"other").as_bytes());
    let liar = ChunkMap::decode(&bytes).unwrap();
    store.begin(&liar).unwrap();
    fill(&store, &liar, &data);
    assert!(matches!(
        store.complete(&liar.blob()),
        Err(StoreError::BlobMismatch { .. })
    ));
    assert!(!store.has(&liar.blob()).unwrap());
    assert!(store.info(&liar.blob()).unwrap().is_none());
}

#[test]
fn gc_keeps_pinned_blobs_and_their_chunk_maps() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = store.import_bytes(&noise(6, 400_000)).unwrap();
    let b = store.import_bytes(&noise(7, 300_000)).unwrap();
    let c = ChunkMap::build(&noise(8, 200_000));
    store.begin(&c).unwrap();
    store.set_pin("active", &[a.blob]).unwrap();
    let report = store.gc().unwrap();
    // b, b's chunk map, c (partial) and c's chunk map go; a and a's chunk map stay.
    assert_eq!(report.blobs_removed, 4);
    assert_eq!(
        report.bytes_freed,
        300_000 + 200_000 + b.chunk_map.encode().len() as u64 + c.encode().len() as u64
    );
    assert!(store.has(&a.blob).unwrap());
    assert!(store.has(&a.chunk_map_id).unwrap());
    assert!(!store.has(&b.blob).unwrap());
    assert!(store.info(&c.blob()).unwrap().is_none());
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs")).unwrap().count(),
        2
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("partial"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(store.pins("active").unwrap(), vec![a.blob]);
    assert_eq!(store.gc().unwrap(), GcReport::default());
}

#[test]
fn a_release_over_budget_is_refused_before_any_byte_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        Options {
            budget: Some(1_000_000),
        },
    )
    .unwrap();
    let a = store.import_bytes(&noise(9, 600_000)).unwrap();
    let big = ChunkMap::build(&noise(10, 500_000));
    let err = store
        .reserve(&[(a.blob, a.size), (big.blob(), big.size())])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::BudgetExceeded {
                needed: 500_000,
                budget: 1_000_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("budget"));
    assert!(store.info(&big.blob()).unwrap().is_none());
    // What is already held costs nothing more.
    store.reserve(&[(a.blob, a.size)]).unwrap();
    store.reserve(&[(big.blob(), 300_000)]).unwrap();
}

#[test]
fn verify_quarantines_bit_rot_and_it_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(11, 700_000);
    let imp = store.import_bytes(&data).unwrap();
    assert!(store.verify().unwrap().corrupt.is_empty());

    // Flip one byte in the middle of the stored file, as an SD card might.
    let path = store.blob_path(&imp.blob).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[350_000] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let report = store.verify().unwrap();
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].0, imp.blob);
    assert!(!store.has(&imp.blob).unwrap());
    for c in imp.chunk_map.chunks() {
        assert_eq!(store.read_chunk(&c.id).unwrap(), None);
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .count(),
        1
    );
}

#[test]
fn a_corrupt_chunk_is_detected_on_read_even_without_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(12, 400_000);
    let map = ChunkMap::build(&data);
    store.begin(&map).unwrap();
    fill(&store, &map, &data);
    // Damage a recorded chunk of the partial blob behind the store's back.
    let c = map.chunks()[1];
    let part = dir.path().join("partial").join(map.blob().to_hex());
    let f = OpenOptions::new().write(true).open(&part).unwrap();
    f.write_all_at(&[0xff; 8], c.offset + 3).unwrap();
    assert_eq!(store.read_chunk(&c.id).unwrap(), None);
    assert_eq!(store.missing(&map.blob()).unwrap(), vec![c]);
    let report = store.verify().unwrap();
    assert_eq!(report.chunks_reset, 0, "the read already reset it");
}

#[test]
fn verify_resets_bad_chunks_of_partial_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(13, 400_000);
    let map = ChunkMap::build(&data);
    store.begin(&map).unwrap();
    fill(&store, &map, &data);
    let c = map.chunks()[2];
    let part = dir.path().join("partial").join(map.blob().to_hex());
    OpenOptions::new()
        .write(true)
        .open(&part)
        .unwrap()
        .write_all_at(&[1, 2, 3], c.offset)
        .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.chunks_reset, 1);
    assert_eq!(store.missing(&map.blob()).unwrap(), vec![c]);
}

#[test]
fn a_second_process_cannot_open_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    // flock locks belong to the open file description, so a second open in this process conflicts too.
    assert!(matches!(
        Store::open(dir.path(), Options::default()),
        Err(StoreError::Locked(_))
    ));
}

#[test]
fn recovery_repairs_what_a_crash_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let data = noise(14, 600_000);
    let map = ChunkMap::build(&data);
    let kept = noise(15, 100_000);
    {
        let store = open(dir.path());
        store.import_bytes(&kept).unwrap();
        store.begin(&map).unwrap();
        fill(&store, &map, &data);
    }
    // A crash between the rename into blobs/ and the commit: the file moved, the catalog still says partial.
    std::fs::rename(
        dir.path().join("partial").join(map.blob().to_hex()),
        dir.path().join("blobs").join(map.blob().to_hex()),
    )
    .unwrap();
    // Leftovers: a temporary import file and an orphan blob file the catalog never recorded.
    std::fs::write(dir.path().join("tmp").join("import-1-0"), b"half").unwrap();
    std::fs::write(
        dir.path()
            .join("blobs")
            .join(BlobId::of(b"orphan").to_hex()),
        b"orphan",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("partial").join(BlobId::of(b"p").to_hex()),
        b"p",
    )
    .unwrap();

    let store = open(dir.path());
    let rec = store.recovery().clone();
    assert_eq!(rec.completions_finished, 1);
    assert_eq!(rec.temp_files_removed, 1);
    assert_eq!(rec.orphan_files_removed, 2);
    assert!(store.has(&map.blob()).unwrap());
    assert!(store.has(&BlobId::of(&kept)).unwrap());
    assert!(store.verify().unwrap().corrupt.is_empty());
}

#[test]
fn recovery_forgets_a_complete_blob_whose_file_vanished() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = open(dir.path());
        store.import_bytes(&noise(16, 50_000)).unwrap().blob
    };
    std::fs::remove_file(dir.path().join("blobs").join(id.to_hex())).unwrap();
    let store = open(dir.path());
    assert_eq!(store.recovery().lost_blobs_forgotten, 1);
    assert!(!store.has(&id).unwrap());
}

#[test]
fn meta_values_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.set_meta("highest_version", b"7", true).unwrap();
        let pinned = store.import_bytes(b"pinned").unwrap().blob;
        store
            .set_pins_and_meta(&[("active", &[pinned])], &[("a", b"1"), ("b", b"2")])
            .unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store.get_meta("highest_version").unwrap().as_deref(),
        Some(&b"7"[..])
    );
    assert_eq!(store.get_meta("b").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(store.get_meta("missing").unwrap(), None);
    assert_eq!(store.pins("active").unwrap().len(), 1);
}

#[test]
fn close_leaves_the_catalog_whole_in_one_file_while_handles_are_still_held() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let pinned = store.import_bytes(b"pinned").unwrap().blob;
    store.set_pin("active", &[pinned]).unwrap();
    store.set_meta("highest_version", b"9", true).unwrap();
    // A task that never ended still holds a handle, and another process reads the store: its
    // connection stays open, so the writer's is not the last to close.
    let leaked = store.clone();
    let reader = StoreReader::open(dir.path()).unwrap();
    assert_eq!(reader.pins("active").unwrap(), vec![pinned]);
    store.close();
    // Everything is in catalog.sqlite itself: a copy of that one file, without the log, holds it.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join(CATALOG_FILE),
        copy.path().join(CATALOG_FILE),
    )
    .unwrap();
    let c = rusqlite::Connection::open(copy.path().join(CATALOG_FILE)).unwrap();
    let meta: Vec<u8> = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'highest_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(meta, b"9");
    let log = dir.path().join(format!("{CATALOG_FILE}-wal"));
    assert!(
        std::fs::metadata(&log).map_or(true, |m| m.len() == 0),
        "{} still holds frames",
        log.display()
    );
    // Writes after close are refused; reads of what is there still answer.
    assert!(matches!(
        leaked.set_meta("highest_version", b"10", true),
        Err(StoreError::WriterGone)
    ));
    assert_eq!(reader.pins("active").unwrap(), vec![pinned]);
}

#[test]
fn concurrent_chunk_writers_share_one_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(17, 3_000_000);
    let map = ChunkMap::build(&data);
    store.begin(&map).unwrap();
    let missing = store.missing(&map.blob()).unwrap();
    std::thread::scope(|s| {
        for part in missing.chunks(missing.len().div_ceil(4)) {
            let (store, data) = (&store, &data);
            s.spawn(move || {
                for c in part {
                    let r = c.offset as usize..(c.offset + u64::from(c.len)) as usize;
                    store.put_chunk(&c.id, &data[r]).unwrap();
                }
            });
        }
    });
    store.complete(&map.blob()).unwrap();
    assert_eq!(
        std::fs::read(store.blob_path(&map.blob()).unwrap()).unwrap(),
        data
    );
}

#[test]
fn raw_blobs_are_checked_against_their_expected_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = store.put_raw_expect(&BlobId::of(b"a"), b"b").unwrap_err();
    assert!(matches!(err, StoreError::ContentMismatch { .. }));
    let id = store.put_raw(b"hello").unwrap();
    assert_eq!(store.read_blob(&id, 100).unwrap(), b"hello");
    assert!(matches!(
        store.read_blob(&id, 2),
        Err(StoreError::TooLarge { .. })
    ));
}

/// A store holding one imported blob (with its chunk map), pinned, and a durable meta value.
fn store_with_a_release(dir: &Path) -> Imported {
    let store = open(dir);
    let src = dir.join("src.bin");
    std::fs::write(&src, noise(7, 700_000)).unwrap();
    let imp = store.import_file(&src).unwrap();
    store
        .set_pins_and_meta(
            &[("active", &[imp.blob, imp.chunk_map_id])],
            &[("highest_accepted/shop-1", b"9")],
        )
        .unwrap();
    store
        .set_meta("time_floor", b"2026-12-01T00:00:00Z", true)
        .unwrap();
    imp
}

/// What a rebuilt store must hold again: the blob and its chunks (served to peers), the pin, the meta.
fn assert_whole(store: &Store, imp: &Imported) {
    assert!(store.has(&imp.blob).unwrap());
    for c in imp.chunk_map.chunks() {
        let got = store.read_chunk(&c.id).unwrap().unwrap();
        assert_eq!(BlobId::of(&got), c.id);
    }
    assert_eq!(
        store.read_chunk_map(&imp.chunk_map_id).unwrap(),
        imp.chunk_map
    );
    let mut pinned = store.pins("active").unwrap();
    pinned.sort();
    let mut want = vec![imp.blob, imp.chunk_map_id];
    want.sort();
    assert_eq!(pinned, want);
    assert_eq!(
        store
            .get_meta("highest_accepted/shop-1")
            .unwrap()
            .as_deref(),
        Some(&b"9"[..])
    );
    assert_eq!(
        store.get_meta("time_floor").unwrap().as_deref(),
        Some(&b"2026-12-01T00:00:00Z"[..])
    );
    // gc keeps what the pin keeps.
    store.gc().unwrap();
    assert!(store.has(&imp.blob).unwrap());
}

#[test]
fn a_catalog_whose_first_page_was_overwritten_is_set_aside_and_rebuilt_from_the_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let imp = store_with_a_release(dir.path());
    // A bad sector: the first 4 KiB of the catalog overwritten.
    let db = dir.path().join(CATALOG_FILE);
    // Stopped cleanly, the catalog holds everything (no WAL to read page 1 from).
    assert!(!dir.path().join("catalog.sqlite-wal").exists());
    let f = OpenOptions::new().write(true).open(&db).unwrap();
    f.write_all_at(&[0xA5; 4096], 0).unwrap();
    f.sync_all().unwrap();
    // A file in blobs/ that does not hash to its name (bit rot in a blob) is quarantined, not adopted.
    let rotten = BlobId::of(b"was something else");
    std::fs::write(dir.path().join("blobs").join(rotten.to_hex()), b"rotten").unwrap();
    let store = open(dir.path());
    let rebuilt = store.recovery().rebuilt.clone().unwrap_or_else(|| {
        panic!(
            "not rebuilt: {:?}; first bytes {:?}",
            store.recovery(),
            &std::fs::read(&db).unwrap()[..16]
        )
    });
    assert!(rebuilt.from_mirror, "{rebuilt:?}");
    assert_eq!(rebuilt.blobs_adopted, 2, "{rebuilt:?}");
    assert_eq!(rebuilt.blobs_quarantined, 1, "{rebuilt:?}");
    assert_eq!(rebuilt.chunk_maps, 1, "{rebuilt:?}");
    let aside = rebuilt.set_aside.unwrap();
    assert!(aside.exists() && aside.starts_with(dir.path().join("quarantine")));
    assert!(rebuilt.why.unwrap().contains("not a database"));
    assert!(!store.has(&rotten).unwrap());
    assert_whole(&store, &imp);
    drop(store);
    // Opened again, nothing more to repair.
    assert_eq!(open(dir.path()).recovery().rebuilt, None);
}

#[test]
fn a_missing_catalog_beside_blobs_is_rebuilt_instead_of_the_blobs_being_removed() {
    let dir = tempfile::tempdir().unwrap();
    let imp = store_with_a_release(dir.path());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("{CATALOG_FILE}{suffix}")));
    }
    let store = open(dir.path());
    let rebuilt = store.recovery().rebuilt.clone().unwrap();
    assert_eq!(rebuilt.set_aside, None);
    assert_eq!(store.recovery().orphan_files_removed, 0);
    assert_whole(&store, &imp);
    // Without the mirror too, the blobs are still adopted (meta and pins are gone).
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("{CATALOG_FILE}{suffix}")));
    }
    std::fs::remove_file(dir.path().join(repair::MIRROR_FILE)).unwrap();
    let store = open(dir.path());
    let rebuilt = store.recovery().rebuilt.clone().unwrap();
    assert!(!rebuilt.from_mirror);
    assert!(store.has(&imp.blob).unwrap());
    assert_eq!(store.get_meta("time_floor").unwrap(), None);
}

#[test]
fn a_scrub_finds_bit_rot_in_a_blob_in_use_quarantines_it_and_can_be_paced_or_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = noise(3, 3_000_000);
    let imp = store.import_bytes(&data).unwrap();
    let mut reads = Vec::new();
    let sound = store
        .scrub_blob(&imp.blob, &mut |n| {
            reads.push(n);
            true
        })
        .unwrap();
    assert_eq!(sound, Scrubbed::Sound { bytes: 3_000_000 });
    assert_eq!(reads, vec![1 << 20, 1 << 20, 3_000_000 - (2 << 20)]);
    assert_eq!(
        store.scrub_blob(&imp.blob, &mut |_| false).unwrap(),
        Scrubbed::Stopped
    );
    // One flipped bit in the file, as an SD card loses it.
    let path = store.blob_path(&imp.blob).unwrap();
    let held = File::open(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[2_500_000] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let found = store.scrub_blob(&imp.blob, &mut |_| true).unwrap();
    assert!(
        matches!(&found, Scrubbed::Quarantined { why } if why.contains("hash to")),
        "{found:?}"
    );
    assert!(!store.has(&imp.blob).unwrap());
    assert!(!path.exists());
    // A reader that held the file open still reads it; the store no longer serves it.
    assert_eq!(held.metadata().unwrap().len(), 3_000_000);
    assert!(
        store
            .read_chunk(&imp.chunk_map.chunks()[0].id)
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.scrub_blob(&imp.blob, &mut |_| true).unwrap(),
        Scrubbed::Absent
    );
}
