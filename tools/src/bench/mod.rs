//! `deckhand bench ...`: measured figures, printed. Benchmarks print; tests assert.

pub mod counter;
pub mod delta;
pub mod fleet;
pub mod footprint;
pub mod recognizer;
pub mod shadow;
pub mod sim;

use crate::error::ToolError;
use crate::shop::fixtures::{SplitMix, metadata_json, noise, npy_f32};
use deckhand_protocol::chunk::{ChunkMap, ChunkParams};
use deckhand_store::{Options, Store};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB / d.as_secs_f64()
}

fn best_and_median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2])
}

/// Store import throughput of a `size_mib` file beside plain blake3 hashing of the same file.
pub fn store(size_mib: u64, dir: Option<&Path>, rounds: usize) -> Result<(), ToolError> {
    let parent = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    std::fs::create_dir_all(&parent).map_err(ToolError::io("create", &parent))?;
    let work = tempfile::Builder::new()
        .prefix("deckhand-bench-")
        .tempdir_in(&parent)
        .map_err(ToolError::io("create a benchmark directory in", &parent))?;
    let file = work.path().join("input.bin");
    let size = size_mib * 1024 * 1024;
    std::fs::write(&file, noise(0xbe7c, size as usize)).map_err(ToolError::io("write", &file))?;
    // Read once so every measurement below starts from the same warm page cache.
    std::fs::read(&file).map_err(ToolError::io("read", &file))?;
    let rounds = rounds.max(1);

    let mut multi = Vec::new();
    let mut single = Vec::new();
    let mut import = Vec::new();
    for round in 0..rounds {
        let t = Instant::now();
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(&file)
            .map_err(ToolError::io("hash", &file))?;
        let expected = h.finalize();
        multi.push(t.elapsed());

        let t = Instant::now();
        let mut h = blake3::Hasher::new();
        h.update_mmap(&file).map_err(ToolError::io("hash", &file))?;
        single.push(t.elapsed());

        let store_dir = work.path().join(format!("store-{round}"));
        let store = Store::open(&store_dir, Options::default())?;
        let t = Instant::now();
        let imported = store.import_file(&file)?;
        import.push(t.elapsed());
        if imported.blob.as_bytes() != expected.as_bytes() {
            return Err(ToolError::Corrupt {
                what: file.display().to_string(),
                why: "the store's import hashed it differently from blake3",
            });
        }
        drop(store);
        std::fs::remove_dir_all(&store_dir).map_err(ToolError::io("remove", &store_dir))?;
    }
    let (m_best, m_med) = best_and_median(multi);
    let (s_best, s_med) = best_and_median(single);
    let (i_best, i_med) = best_and_median(import);
    println!(
        "store import benchmark: {size_mib} MiB file, {rounds} rounds, {} cores",
        num_cores()
    );
    println!("  {:<44} {:>10} {:>10}", "", "best MiB/s", "median");
    let line = |name: &str, b: Duration, m: Duration| {
        println!(
            "  {name:<44} {:>10.0} {:>10.0}",
            rate(size, b),
            rate(size, m)
        );
    };
    line("blake3, mmap, all cores (b3sum)", m_best, m_med);
    line("blake3, mmap, one core", s_best, s_med);
    line("store import (copy+sync+chunk+hash+commit)", i_best, i_med);
    println!(
        "  import takes {:.2}x the time of plain multi-core blake3 (median)",
        i_med.as_secs_f64() / m_med.as_secs_f64()
    );
    Ok(())
}

/// Runs one of the benches' Python helpers: writes `script` into `work` as `name` and runs it with
/// `$DECKHAND_PYTHON` or `python3` and `args`. Returns the JSON lines it printed, or why there are none;
/// a helper that cannot import what it needs prints `{"missing": ...}`, answered with `install`.
fn python_helper(
    name: &str,
    script: &str,
    args: &[std::ffi::OsString],
    work: &Path,
    install: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let path = work.join(name);
    std::fs::write(&path, script).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let python = std::env::var_os("DECKHAND_PYTHON").unwrap_or_else(|| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&path)
        .args(args)
        .output()
        .map_err(|e| format!("{} does not run: {e}", python.to_string_lossy()))?;
    if !out.status.success() {
        return Err(format!(
            "the helper failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut lines = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("the helper printed {line:?}: {e}"))?;
        if let Some(missing) = v.get("missing") {
            return Err(format!(
                "{} cannot import it ({missing}); `{install}`, or point DECKHAND_PYTHON at a Python \
                 that has them",
                python.to_string_lossy()
            ));
        }
        lines.push(v);
    }
    Ok(lines)
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One file of a synthetic release and its edited successor.
struct Pair {
    name: &'static str,
    old: Vec<u8>,
    new: Vec<u8>,
}

/// A reference-DB update like the seeds describe: 17,592 x 768 embeddings gain 200 rows and 100 rows are
/// re-embedded; 1% of the metadata entries change their price.
fn release_pairs(rows: usize) -> Vec<Pair> {
    const DIM: usize = 768;
    let mut rng = SplitMix(42);
    let mut emb: Vec<f32> = (0..rows * DIM).map(|_| rng.normal()).collect();
    let old_npy = npy_f32(rows, DIM, &emb);
    for _ in 0..100 {
        let r = rng.range(0, rows as u64) as usize;
        for v in &mut emb[r * DIM..(r + 1) * DIM] {
            *v = rng.normal();
        }
    }
    emb.extend((0..200 * DIM).map(|_| rng.normal()));
    let new_npy = npy_f32(rows + 200, DIM, &emb);

    let cards = rows * 15_987 / 17_592;
    let old_meta = metadata_json(cards, 7);
    let mut meta: serde_json::Value = serde_json::from_slice(&old_meta).unwrap_or_default();
    if let Some(obj) = meta.as_object_mut() {
        let keys: Vec<String> = obj.keys().cloned().collect();
        for _ in 0..cards / 100 {
            let k = &keys[rng.range(0, keys.len() as u64) as usize];
            if let Some(card) = obj.get_mut(k) {
                card["price_usd"] = serde_json::json!(rng.range(5, 90_000) as f64 / 100.0);
            }
        }
    }
    let new_meta = serde_json::to_vec_pretty(&meta).unwrap_or_default();

    let blob = noise(9, 14 << 20);
    let mut edited = blob.clone();
    edited.insert(7 << 20, 0x5a);
    vec![
        Pair {
            name: "embeddings.npy (+200 rows, 100 rows changed)",
            old: old_npy,
            new: new_npy,
        },
        Pair {
            name: "metadata.json (1% of prices changed)",
            old: old_meta,
            new: new_meta,
        },
        Pair {
            name: "14 MiB blob, one byte inserted",
            old: blob,
            new: edited,
        },
    ]
}

/// Chunk-size trade-off: chunks per MiB (requests), bytes to transfer for a typical update (dedup), and
/// chunking speed, for several FastCDC parameter sets.
pub fn chunking() -> Result<(), ToolError> {
    let sets = [
        (16, 64, 256),
        (32, 128, 512),
        (64, 256, 1024),
        (128, 512, 2048),
    ];
    let pairs = release_pairs(17_592);
    let total_new: usize = pairs.iter().map(|p| p.new.len()).sum();
    println!(
        "chunking benchmark: a release update of {:.1} MiB; bytes to fetch = new chunks not in the old release",
        total_new as f64 / MIB
    );
    for (min, avg, max) in sets {
        let params = ChunkParams {
            min: min * 1024,
            avg: avg * 1024,
            max: max * 1024,
        };
        println!("\n  min/avg/max {min}/{avg}/{max} KiB");
        let mut chunk_total = 0usize;
        let mut fetch_total = 0u64;
        let mut map_bytes = 0usize;
        let mut elapsed = Duration::ZERO;
        for p in &pairs {
            let old = ChunkMap::build_with(params, &p.old);
            let t = Instant::now();
            let new = ChunkMap::build_with(params, &p.new);
            elapsed += t.elapsed();
            let held: HashSet<_> = old.chunks().iter().map(|c| c.id).collect();
            let fetch: u64 = new
                .chunks()
                .iter()
                .filter(|c| !held.contains(&c.id))
                .map(|c| u64::from(c.len))
                .sum();
            chunk_total += new.chunks().len();
            fetch_total += fetch;
            map_bytes += new.encode().len();
            println!(
                "    {:<48} {:>6} chunks, fetch {:>9.1} KiB of {:>8.1} MiB",
                p.name,
                new.chunks().len(),
                fetch as f64 / 1024.0,
                p.new.len() as f64 / MIB
            );
        }
        println!(
            "    total: {chunk_total} chunks ({:.1} per MiB), chunk maps {:.1} KiB, fetch {:.2} MiB, chunk+hash {:.0} MiB/s",
            chunk_total as f64 / (total_new as f64 / MIB),
            map_bytes as f64 / 1024.0,
            fetch_total as f64 / MIB,
            rate(total_new as u64, elapsed)
        );
    }
    Ok(())
}
