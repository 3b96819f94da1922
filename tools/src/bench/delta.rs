//! `deckhand bench delta`: the bytes a Pi holding one reference DB fetches for the next (the common
//! release: cards added, prices edited, models unchanged), where they go, and casync's bytes for the same
//! update.
//!
//! The two DBs are built the way the seeds build theirs: embeddings.npy, index.json (row to card id),
//! metadata.json (card id to details) and a usearch.index rebuilt from all the embeddings by numpy and
//! usearch in a Python helper (`usearch_index.py`, `$DECKHAND_PYTHON` or `python3`; without them the
//! usearch crate builds it, with the same options, and the bench says so). The models are the same in
//! both releases and neither tool fetches them, so they are left out.
//!
//! deckhand's figure is what its download fetches: each chunk of the new release that no blob of the old
//! one holds (the store copies the others locally, `Store::fill_local`), once however many artifacts
//! share it, and the chunk map and pack header of each new blob. It is computed from the chunk maps a
//! publish writes, with the chunking the publish uses and with smaller chunks, raw (a chunk read from
//! its blob) and packed (as the blob's pack stores it, `deckhand_protocol::pack`, which is what an
//! agent fetches when the pack is there), and for the one-thread index as delta packs against the
//! first release (`deckhand_protocol::delta`: each chunk patched against the first release's bytes
//! around its place, what an agent serving the first release fetches). casync's figure (when `casync` is installed) is
//! the size of the chunk files its `make` of the new release adds to a store that holds the old one:
//! its new chunks, compressed.

use super::{MIB, python_helper};
use crate::error::ToolError;
use crate::shop::fixtures::{SplitMix, card_id, metadata_json, npy_f32, write_usearch_index};
use deckhand_protocol::chunk::{CHUNK_PARAMS, Chunk, ChunkMap, ChunkParams};
use deckhand_protocol::id::BlobId;
use deckhand_protocol::{delta, pack};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The reference vectors' width (the seeds' 768).
const DIM: usize = 768;
/// The index options of the seeds' script, the fixtures and the helper alike.
const CONNECTIVITY: usize = 16;
const EXPANSION_ADD: usize = 128;

/// What `deckhand bench delta` builds.
#[derive(Clone, Debug)]
pub struct DeltaArgs {
    /// Reference rows in the first DB (the seeds': 17,592).
    pub rows: usize,
    /// Cards the second DB adds, one row each.
    pub added: usize,
    /// Cards whose price the second DB edits, per thousand cards.
    pub edited_per_mille: usize,
    /// Where the releases are written (default: the system temporary directory).
    pub dir: Option<PathBuf>,
}

/// One artifact of the reference DB in both releases.
struct Artifact {
    name: &'static str,
    old: Vec<u8>,
    new: Vec<u8>,
}

/// The bytes one chunking fetches, per artifact and in all.
struct Fetched {
    /// Per artifact: bytes of chunks the old release does not hold, and those compressed.
    per_artifact: Vec<(u64, u64)>,
    /// usearch.index's fetched bytes that fall in its vectors (with the 8-byte matrix header) and in its
    /// graph.
    index_vectors: u64,
    index_graph: u64,
    /// Every fetched chunk once, raw and compressed.
    total: u64,
    total_zstd: u64,
    /// The encoded chunk maps of the new blobs.
    maps: u64,
    /// Every fetched chunk once, patched: compressed with the old artifact's bytes around its place as
    /// zstd's dictionary (what a delta against the release a Pi holds would carry), per artifact too.
    total_patched: u64,
    per_artifact_patched: Vec<u64>,
    /// The chunk maps and delta pack headers of the new blobs.
    maps_patched: u64,
}

/// A chunk of an artifact now `new_len` bytes as a delta pack against `old` carries it
/// (`deckhand_protocol::delta`: patched against the old bytes around its place), or packed when the
/// patch is no smaller.
fn patched_len(old: &[u8], new_len: usize, chunk: &Chunk, bytes: &[u8]) -> u64 {
    let w = delta::window(chunk, new_len as u64, old.len() as u64);
    let patch = (!w.is_empty())
        .then(|| {
            delta::patch(
                bytes,
                &old[w.start as usize..w.end as usize],
                pack::PACK_LEVEL,
            )
        })
        .flatten();
    match patch {
        Some(p) => p.len() as u64,
        None => pack::pack_chunk(bytes, pack::PACK_LEVEL).len() as u64,
    }
}

pub fn run(args: &DeltaArgs) -> Result<(), ToolError> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).map_err(ToolError::io("create", &parent))?;
    let work = tempfile::Builder::new()
        .prefix("deckhand-bench-delta-")
        .tempdir_in(&parent)
        .map_err(ToolError::io("create a benchmark directory in", &parent))?;
    let (old_dir, new_dir) = (work.path().join("release-1"), work.path().join("release-2"));
    for d in [&old_dir, &new_dir] {
        std::fs::create_dir_all(d).map_err(ToolError::io("create", d))?;
    }

    let rows = args.rows.max(1);
    let cards = (rows * 15_987 / 17_592).max(1);
    let mut rng = SplitMix(0xde17a);
    let old_vectors = unit_rows(&mut rng, rows);
    write_db(
        &old_dir,
        &old_vectors,
        &labels(rows, cards, 0),
        &metadata_json(cards, 7),
    )?;
    let mut vectors = old_vectors.clone();
    vectors.extend(unit_rows(&mut rng, args.added));
    let edited = cards * args.edited_per_mille / 1000;
    let metadata = edit_prices(
        &metadata_json(cards + args.added, 7),
        cards,
        edited,
        &mut rng,
    );
    write_db(
        &new_dir,
        &vectors,
        &labels(rows, cards, args.added),
        &metadata,
    )?;
    let read = |dir: &Path, name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(ToolError::io("read", &p))
    };
    let mut artifacts = Vec::new();
    for name in [
        "embeddings.npy",
        "usearch.index",
        "index.json",
        "metadata.json",
    ] {
        artifacts.push(Artifact {
            name,
            old: Vec::new(),
            new: Vec::new(),
        });
    }
    for a in artifacts.iter_mut().filter(|a| a.name != "usearch.index") {
        a.old = read(&old_dir, a.name)?;
        a.new = read(&new_dir, a.name)?;
    }

    let new_vectors = (args.added * DIM * 4) as u64;
    println!(
        "delta release benchmark: a reference DB of {rows} x {DIM} embeddings ({cards} cards) gains {} \
         cards and edits {edited} prices; the models are unchanged and fetched by neither tool",
        args.added
    );
    println!(
        "  the new information, the {} new vectors alone: {:.2} MiB; fetched = chunks no blob of release 1 \
         holds, each once, and the new chunk maps and pack headers; packed = each fetched chunk as its blob's pack stores it (deckhand's download); raw = the same chunks from the blobs",
        args.added,
        new_vectors as f64 / MIB
    );
    let small = ChunkParams {
        min: 4 * 1024,
        avg: 16 * 1024,
        max: 64 * 1024,
    };
    let chunkings = [CHUNK_PARAMS, small];
    // usearch adds a batch on all cores unless told otherwise, and a vector's place in the file is the
    // order it was added in; on one thread the rows keep their order.
    for threads in [0, 1] {
        let started = std::time::Instant::now();
        let builder = build_index(&old_dir, work.path(), &old_vectors, threads)?;
        let build_secs = started.elapsed().as_secs_f64();
        build_index(&new_dir, work.path(), &vectors, threads)?;
        if let Some(index) = artifacts.iter_mut().find(|a| a.name == "usearch.index") {
            index.old = read(&old_dir, index.name)?;
            index.new = read(&new_dir, index.name)?;
        }
        let release: u64 = artifacts.iter().map(|a| a.new.len() as u64).sum();
        let npy = read(&new_dir, "embeddings.npy")?;
        let in_place = deckhand_agent::release::loaders::npy_header(&npy)
            .ok()
            .and_then(|(rows, cols, start)| {
                deckhand_agent::release::vectors_in_row_order(
                    &new_dir.join("usearch.index"),
                    &npy[start..],
                    rows,
                    cols,
                )
                .ok()
                .flatten()
            });
        println!(
            "\n  usearch.index {}, built by {builder}: release 1's in {build_secs:.1} s here; {} of \
             release 2's {} vectors at their row's place (deckhand publish warns when any is not)",
            if threads == 0 {
                "on all cores (usearch's default)"
            } else {
                "on one thread"
            },
            in_place.map_or_else(|| "?".into(), |n| n.to_string()),
            vectors.len()
        );
        println!(
            "  release 2's DB: {:.1} MiB ({})",
            release as f64 / MIB,
            artifacts
                .iter()
                .map(|a| format!("{} {:.1}", a.name, a.new.len() as f64 / MIB))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let casync_bytes = casync(
            &old_dir,
            &new_dir,
            &work.path().join(format!("casync-{threads}")),
        );
        let all: Vec<&Artifact> = artifacts.iter().collect();
        let no_index: Vec<&Artifact> = artifacts
            .iter()
            .filter(|a| a.name != "usearch.index")
            .collect();
        // Patches only where the rows keep their order (an all-cores index moves every vector).
        let patch = threads == 1;
        let with = chunkings.map(|p| fetched(&all, p, vectors.len(), patch));
        let without = chunkings.map(|p| fetched(&no_index, p, vectors.len(), false));
        print!("    {:<40}", "KiB fetched, raw / packed, FastCDC");
        for p in chunkings {
            print!(
                " {:>21}",
                format!("{}/{}/{} KiB", p.min / 1024, p.avg / 1024, p.max / 1024)
            );
        }
        println!();
        let kib = |v: u64| v as f64 / 1024.0;
        let row = |name: &str, cell: &dyn Fn(&Fetched) -> (u64, u64)| {
            print!("    {name:<40}");
            for f in &with {
                let (raw, zstd) = cell(f);
                print!(" {:>10.1} {:>10.1}", kib(raw), kib(zstd));
            }
            println!();
        };
        let graph = artifacts
            .iter()
            .find(|a| a.name == "usearch.index")
            .map_or(0, |a| graph_len(&a.new, vectors.len()));
        for (i, a) in artifacts.iter().enumerate() {
            row(a.name, &|f| f.per_artifact[i]);
            if a.name == "usearch.index" {
                row("  of which its vectors (raw)", &|f| {
                    (f.index_vectors, f.index_vectors)
                });
                row(
                    &format!("  of which its graph (raw; {:.0} KiB)", kib(graph)),
                    &|f| (f.index_graph, f.index_graph),
                );
            }
        }
        row("chunk maps and pack headers", &|f| (f.maps, f.maps));
        let total = |f: &Fetched| (f.total + f.maps, f.total_zstd + f.maps);
        let verdict = |f: &Fetched| {
            let (raw, zstd) = total(f);
            let vs_casync = match &casync_bytes {
                Ok(c) => format!(
                    ", {:.2}x / {:.2}x casync",
                    raw as f64 / *c as f64,
                    zstd as f64 / *c as f64
                ),
                Err(_) => String::new(),
            };
            format!(
                "{:.2} / {:.2} MiB: {:.2}x / {:.2}x the new vectors{vs_casync}",
                raw as f64 / MIB,
                zstd as f64 / MIB,
                raw as f64 / new_vectors.max(1) as f64,
                zstd as f64 / new_vectors.max(1) as f64
            )
        };
        for (i, p) in chunkings.iter().enumerate() {
            let size = format!("{}/{}/{}", p.min / 1024, p.avg / 1024, p.max / 1024);
            println!("    in all, {size:<9} {}", verdict(&with[i]));
            if !patch {
                println!(
                    "      the index built on the Pi instead {}",
                    verdict(&without[i])
                );
                continue;
            }
            let patched = with[i].total_patched + with[i].maps_patched;
            println!(
                "      as delta packs against release 1 (what is fetched): {:.2} MiB, {:.2}x the new vectors{} ({})",
                patched as f64 / MIB,
                patched as f64 / new_vectors.max(1) as f64,
                casync_bytes.as_ref().map_or(String::new(), |c| format!(
                    ", {:.2}x casync",
                    patched as f64 / *c as f64
                )),
                artifacts
                    .iter()
                    .zip(&with[i].per_artifact_patched)
                    .map(|(a, p)| format!("{} {:.1} KiB", a.name, kib(*p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "      the index built on the Pi instead {}",
                verdict(&without[i])
            );
        }
        match casync_bytes {
            Ok(bytes) => println!(
                "    casync (its default 16/64/256 KiB chunks, zstd): {:.2} MiB of new chunks ({:.2}x the new vectors)",
                bytes as f64 / MIB,
                bytes as f64 / new_vectors.max(1) as f64
            ),
            Err(why) => println!("    casync not measured: {why}"),
        }
        if builder.starts_with("the usearch crate") {
            // The crate adds from this one thread: there is no all-cores build to show.
            break;
        }
    }
    Ok(())
}

/// `n` deterministic unit vectors of `DIM` floats.
fn unit_rows(rng: &mut SplitMix, n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            let mut v: Vec<f32> = (0..DIM).map(|_| rng.normal()).collect();
            let norm = v
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt()
                .max(f32::MIN_POSITIVE);
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
}

/// index.json: the card id of each row. The first `rows` rows cycle over `cards` cards (some cards have
/// several reference photos); each of the `added` rows after them is a new card.
fn labels(rows: usize, cards: usize, added: usize) -> Vec<u8> {
    let ids: Vec<String> = (0..rows)
        .map(|r| card_id(r % cards))
        .chain((0..added).map(|i| card_id(cards + i)))
        .collect();
    serde_json::to_vec(&ids).unwrap_or_default()
}

/// `metadata` with the price of `count` of its first `cards` cards changed.
fn edit_prices(metadata: &[u8], cards: usize, count: usize, rng: &mut SplitMix) -> Vec<u8> {
    let mut meta: serde_json::Value = serde_json::from_slice(metadata).unwrap_or_default();
    if let Some(obj) = meta.as_object_mut() {
        for _ in 0..count {
            let id = card_id(rng.range(0, cards as u64) as usize);
            if let Some(card) = obj.get_mut(&id) {
                card["price_usd"] = serde_json::json!(rng.range(5, 90_000) as f64 / 100.0);
            }
        }
    }
    serde_json::to_vec_pretty(&meta).unwrap_or_default()
}

fn write_db(
    dir: &Path,
    vectors: &[Vec<f32>],
    labels: &[u8],
    metadata: &[u8],
) -> Result<(), ToolError> {
    let flat: Vec<f32> = vectors.iter().flatten().copied().collect();
    for (name, bytes) in [
        ("embeddings.npy", npy_f32(vectors.len(), DIM, &flat)),
        ("index.json", labels.to_vec()),
        ("metadata.json", metadata.to_vec()),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(ToolError::io("write", &p))?;
    }
    Ok(())
}

/// Builds `dir/usearch.index` from `dir/embeddings.npy` with numpy and usearch when the helper can
/// import them, else with the usearch crate; says which.
fn build_index(
    dir: &Path,
    work: &Path,
    vectors: &[Vec<f32>],
    threads: usize,
) -> Result<String, ToolError> {
    let index = dir.join("usearch.index");
    let args = [
        dir.join("embeddings.npy").into_os_string(),
        index.clone().into_os_string(),
        CONNECTIVITY.to_string().into(),
        EXPANSION_ADD.to_string().into(),
        threads.to_string().into(),
    ];
    let why = match python_helper(
        "usearch_index.py",
        include_str!("usearch_index.py"),
        &args,
        work,
        "pip install numpy usearch",
    ) {
        Ok(lines) => match lines.first() {
            Some(v) if v.get("rows").and_then(|r| r.as_u64()) == Some(vectors.len() as u64) => {
                return Ok(format!(
                    "Python's usearch {} and numpy {}, a rebuild from all the embeddings as the seeds' script does",
                    v["usearch"].as_str().unwrap_or("?"),
                    v["numpy"].as_str().unwrap_or("?")
                ));
            }
            other => format!("the helper printed {other:?}"),
        },
        Err(why) => why,
    };
    write_usearch_index(&index, DIM, usearch::MetricKind::Cos, vectors)?;
    Ok(format!(
        "the usearch crate on one thread, a rebuild from all the embeddings (Python's were not used: {why})"
    ))
}

/// The bytes of a usearch.index after its vectors: the index's header and its graph. The file starts
/// with the vectors as a matrix (rows u32, bytes per row u32, then the rows).
fn graph_len(index: &[u8], rows: usize) -> u64 {
    (index.len() as u64).saturating_sub(vectors_end(rows))
}

fn vectors_end(rows: usize) -> u64 {
    8 + (rows * DIM * 4) as u64
}

/// What a Pi holding the old artifacts fetches for the new ones (`new_rows` vectors) cut with `params`.
/// With `patch`, each fetched chunk is also patched against the old artifact ([`patched_len`]).
fn fetched(artifacts: &[&Artifact], params: ChunkParams, new_rows: usize, patch: bool) -> Fetched {
    let held: HashSet<BlobId> = artifacts
        .iter()
        .flat_map(|a| {
            ChunkMap::build_with(params, &a.old)
                .chunks()
                .iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut once = HashSet::new();
    let mut f = Fetched {
        per_artifact: Vec::new(),
        index_vectors: 0,
        index_graph: 0,
        total: 0,
        total_zstd: 0,
        maps: 0,
        total_patched: 0,
        per_artifact_patched: Vec::new(),
        maps_patched: 0,
    };
    for a in artifacts {
        let map = ChunkMap::build_with(params, &a.new);
        if a.new != a.old {
            f.maps += map.encode().len() as u64 + pack::header_len(&map);
            f.maps_patched += map.encode().len() as u64 + delta::header_len(&map);
        }
        let (mut raw, mut zstd, mut patched) = (0, 0, 0);
        for c in map.chunks().iter().filter(|c| !held.contains(&c.id)) {
            let r = c.range();
            let bytes = &a.new[r.start as usize..r.end as usize];
            let packed = pack::pack_chunk(bytes, pack::PACK_LEVEL).len() as u64;
            let patch = if patch {
                patched_len(&a.old, a.new.len(), c, bytes)
            } else {
                packed
            };
            raw += u64::from(c.len);
            zstd += packed;
            patched += patch;
            if once.insert(c.id) {
                f.total += u64::from(c.len);
                f.total_zstd += packed;
                f.total_patched += patch;
            }
            if a.name == "usearch.index" {
                let end = vectors_end(new_rows);
                let vec_part = r.end.min(end).saturating_sub(r.start);
                f.index_vectors += vec_part;
                f.index_graph += u64::from(c.len) - vec_part;
            }
        }
        f.per_artifact.push((raw, zstd));
        f.per_artifact_patched.push(patched);
    }
    f
}

/// The bytes of the chunk files casync's `make` of `new` adds to a store holding `old`'s, or why there
/// is no figure. Its store and indexes go in `work`.
fn casync(old: &Path, new: &Path, work: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let store = work.join("store");
    let make = |dir: &Path, index: &str| -> Result<(), String> {
        let out = std::process::Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", store.display()))
            .arg(work.join(index))
            .arg(dir)
            .output()
            .map_err(|e| format!("casync does not run ({e}); `apt install casync` to compare"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "casync make failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    make(old, "release-1.caidx")?;
    let before: HashSet<PathBuf> = chunk_files(&store)?.into_iter().map(|(p, _)| p).collect();
    make(new, "release-2.caidx")?;
    Ok(chunk_files(&store)?
        .into_iter()
        .filter(|(p, _)| !before.contains(p))
        .map(|(_, len)| len)
        .sum())
}

/// Every file under `dir` with its size.
fn chunk_files(dir: &Path) -> Result<Vec<(PathBuf, u64)>, String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("reading {}: {e}", d.display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("reading {}: {e}", d.display()))?;
            let meta = e
                .metadata()
                .map_err(|err| format!("reading {}: {err}", e.path().display()))?;
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), meta.len()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shop::fixtures::noise;

    #[test]
    fn a_pi_fetches_what_the_old_release_lacks_and_a_chunk_two_artifacts_share_once() {
        let old = noise(1, 2 << 20);
        let tail = noise(2, 1 << 20);
        let mut grown = old.clone();
        grown.extend_from_slice(&tail);
        let same = noise(3, 300 << 10);
        let artifacts = [
            Artifact {
                name: "embeddings.npy",
                old: old.clone(),
                new: grown.clone(),
            },
            // The same new bytes in a second artifact, as usearch.index repeats the new vectors.
            Artifact {
                name: "metadata.json",
                old: noise(4, 100 << 10),
                new: tail.clone(),
            },
            Artifact {
                name: "index.json",
                old: same.clone(),
                new: same,
            },
        ];
        let f = fetched(&artifacts.iter().collect::<Vec<_>>(), CHUNK_PARAMS, 0, true);
        let max = u64::from(CHUNK_PARAMS.max);
        let (grown_raw, grown_zstd) = f.per_artifact[0];
        let tail_len = tail.len() as u64;
        assert!(
            (tail_len..=tail_len + max).contains(&grown_raw),
            "the appended MiB costs {grown_raw} bytes"
        );
        // Noise does not compress.
        assert!(grown_zstd >= grown_raw, "{grown_zstd} < {grown_raw}");
        assert_eq!(f.per_artifact[1].0, tail_len, "a new blob is fetched whole");
        assert_eq!(
            f.per_artifact[2],
            (0, 0),
            "an unchanged artifact costs nothing"
        );
        // Everything but the chunk where the two copies' boundaries have not met yet is fetched once.
        assert!(
            f.total < grown_raw + tail_len && f.total <= grown_raw + max,
            "{} fetched for {grown_raw} + {tail_len}",
            f.total
        );
        let two_maps = [&grown, &tail]
            .iter()
            .map(|b| {
                let map = ChunkMap::build(b);
                map.encode().len() as u64 + pack::header_len(&map)
            })
            .sum::<u64>();
        assert_eq!(
            f.maps, two_maps,
            "only the changed blobs' chunk maps and pack headers are fetched"
        );
    }

    #[test]
    fn a_patch_against_the_old_artifact_carries_the_edits_not_the_chunks_they_touch() {
        // Noise (which no compressor shrinks) with a byte changed every 100 KiB, after 3 KiB inserted
        // at the front: every chunk is new, but each is the old bytes around its place but one byte.
        let old = noise(5, 2 << 20);
        let mut new = noise(6, 3 << 10);
        new.extend_from_slice(&old);
        for at in (5_000..new.len()).step_by(100 << 10) {
            new[at] ^= 0xff;
        }
        let artifacts = [Artifact {
            name: "usearch.index",
            old,
            new,
        }];
        let f = fetched(&[&artifacts[0]], CHUNK_PARAMS, 0, true);
        let (raw, packed) = f.per_artifact[0];
        assert!(packed >= raw, "noise: {packed} of {raw}");
        assert!(
            f.total_patched * 20 < packed,
            "patched {} of {packed}",
            f.total_patched
        );
        // Without an old artifact there is nothing to patch against: packed it is.
        let fresh = [Artifact {
            name: "metadata.json",
            old: Vec::new(),
            new: noise(7, 1 << 20),
        }];
        let f = fetched(&[&fresh[0]], CHUNK_PARAMS, 0, true);
        assert_eq!(f.total_patched, f.total_zstd);
    }

    #[test]
    fn compressible_bytes_are_counted_compressed() {
        let json = edit_prices(&metadata_json(2_000, 7), 2_000, 20, &mut SplitMix(1));
        let artifacts = [Artifact {
            name: "metadata.json",
            old: Vec::new(),
            new: json.clone(),
        }];
        let f = fetched(&[&artifacts[0]], CHUNK_PARAMS, 0, true);
        assert_eq!(f.total, json.len() as u64);
        assert!(
            f.total_zstd * 3 < f.total,
            "{} of {}",
            f.total_zstd,
            f.total
        );
    }
}
